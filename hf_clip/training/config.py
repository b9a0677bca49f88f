"""`TrainConfig`, the one dataclass of a training run, its parsing (JSON file and/or command line), and building the
model, tokenizer and processor it names."""

import glob
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from transformers import AutoTokenizer, HfArgumentParser, TokenizersBackend
from transformers.hf_argparser import DataClassType

from ..configuration_hf_clip import HfClipConfig
from ..image_processing_hf_clip import HfClipImageProcessor
from ..modeling_hf_clip import HfClipModel
from ..processing_hf_clip import HfClipProcessor
from ..tokenization_hf_clip import HfClipTokenizer, check_tokenizer


@dataclass
class TrainConfig:
    """Every setting of a training run (command line: `--name value`; JSON: `{"name": value}`)."""

    output_dir: str = field(default="clip_output", metadata={"help": "Checkpoints, logs, metrics and model/."})
    # Model: from scratch (`model_config`) or from a saved folder (`model_name_or_path`).
    model_config: str | None = field(
        default=None,
        metadata={"help": "Architecture: a published name (e.g. ViT-B-32) or an HfClipConfig JSON file."},
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "A saved HfClipModel folder to fine-tune."})
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved tokenizer folder; default: the model folder, else OpenAI's BPE (from open_clip)."},
    )
    # Data.
    train_data_format: str = field(default="webdataset", metadata={"help": "webdataset | parquet | imagefolder"})
    train_data_files: list[str] = field(default_factory=list, metadata={"help": "Files or glob patterns."})
    image_column: str = field(default="jpg", metadata={"help": "Image column (webdataset: the image extension)."})
    text_column: str = field(default="txt", metadata={"help": "Caption column."})
    shuffle_buffer: int = 1000
    dataloader_num_workers: int = 0
    image_decoding: str = field(
        default="cpu",
        metadata={
            "help": "cpu: workers decode and crop (exact pixels) | device: workers check and crop-plan RGB/grayscale "
            "JPEGs, the training device decodes them (needs torchvision; within a few 8-bit levels)."
        },
    )
    # Zero-shot evaluation on a held-out labelled split.
    eval_data_format: str = "webdataset"
    eval_data_files: list[str] = field(default_factory=list)
    eval_label_column: str = "cls"
    eval_max_samples: int | None = None
    class_names: list[str] = field(default_factory=list, metadata={"help": "Class names, in label order."})
    templates: list[str] = field(
        default_factory=lambda: ["a photo of a {c}."],
        metadata={"help": "Prompt templates; the first alone is also reported."},
    )
    per_device_eval_batch_size: int = 256
    eval_steps: int = 0
    # Optimisation.
    per_device_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    accumulation_mode: str = field(default="cached", metadata={"help": "cached (full-batch negatives) | plain"})
    max_steps: int = 1000
    learning_rate: float = 5e-4
    weight_decay: float = 0.2
    adam_beta1: float = 0.9
    adam_beta2: float | None = field(default=None, metadata={"help": "Default: 0.98 (ViT) / 0.999 (ResNet)."})
    adam_epsilon: float | None = field(default=None, metadata={"help": "Default: 1e-6 (ViT) / 1e-8 (ResNet)."})
    warmup_steps: int = 100
    max_grad_norm: float = field(default=0.0, metadata={"help": "Clip the gradient norm to this; 0 disables."})
    mixed_precision: str = field(default="no", metadata={"help": "no | bf16 | fp16"})
    gradient_checkpointing: bool = False
    torch_compile: bool | None = field(
        default=None,
        metadata={
            "help": "Compile the training step (forward + loss, backward through AOTAutograd). Default: on CUDA."
        },
    )
    torch_compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode, e.g. max-autotune or reduce-overhead (CUDA graphs)."}
    )
    channels_last: bool | None = field(
        default=None, metadata={"help": "Channels-last memory format for a ResNet image tower. Default: on CUDA."}
    )
    seed: int = 0
    # Bookkeeping.
    logging_steps: int = 10
    save_steps: int = 0
    resume: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder."})
    stop_at_step: int | None = field(
        default=None, metadata={"help": "End the run after this step (after saving), as a preemption would."}
    )

    def validate(self) -> None:
        if (self.model_config is None) == (self.model_name_or_path is None):
            raise ValueError("give exactly one of model_config (from scratch) and model_name_or_path (fine-tune).")
        if self.per_device_batch_size < 2:
            raise ValueError(
                f"per_device_batch_size must be at least 2, got {self.per_device_batch_size}: "
                "with one pair there are no negatives and the contrastive loss is 0."
            )
        if self.image_decoding not in ("cpu", "device"):
            raise ValueError(f"image_decoding must be 'cpu' or 'device', got {self.image_decoding!r}.")
        if self.accumulation_mode not in ("cached", "plain"):
            raise ValueError(f"accumulation_mode must be 'cached' or 'plain', got {self.accumulation_mode!r}.")
        if self.gradient_accumulation_steps < 1 or self.max_steps < 1 or self.logging_steps < 1:
            raise ValueError("gradient_accumulation_steps, max_steps and logging_steps must be positive.")
        if self.eval_data_files and not self.class_names:
            raise ValueError("zero-shot evaluation needs class_names (in label order).")
        if not self.templates:
            raise ValueError("templates is empty.")

    def data_files(self, eval: bool = False) -> list[str]:
        patterns = self.eval_data_files if eval else self.train_data_files
        files = sorted({path for pattern in patterns for path in (glob.glob(pattern) or [pattern])})
        missing = [path for path in files if not Path(path).exists()]
        if not files or missing:
            raise FileNotFoundError(f"{'eval' if eval else 'train'} data files not found: {missing or patterns}")
        return files


def parse_config(argv: list[str]) -> TrainConfig:
    """`[config.json] [--field value ...]`: the JSON gives defaults, the command line overrides them.

    A relative `model_config` JSON path inside the file is read relative to the file, so a run config and its
    architecture can sit side by side."""
    parser = HfArgumentParser(DataClassType(TrainConfig))
    if argv and argv[0].endswith(".json"):
        config_file = Path(argv[0])
        values = json.loads(config_file.read_text())
        unknown = sorted(set(values) - {field.name for field in fields(TrainConfig)})
        if unknown:
            raise ValueError(f"{config_file} has fields TrainConfig does not know: {unknown}")
        model_config = values.get("model_config")
        if isinstance(model_config, str) and model_config.endswith(".json") and not Path(model_config).is_absolute():
            values["model_config"] = str(config_file.parent / model_config)
        parser.set_defaults(**values)
        argv = argv[1:]
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config


def build_tokenizer(config: TrainConfig) -> TokenizersBackend:
    """The saved tokenizer of `tokenizer_name_or_path` (else of the model folder), or OpenAI's BPE for a new model."""
    source = config.tokenizer_name_or_path or config.model_name_or_path
    if source is None:
        return HfClipTokenizer.from_clip_bpe()
    tokenizer = AutoTokenizer.from_pretrained(source)
    if not isinstance(tokenizer, TokenizersBackend):
        raise TypeError(f"{source} holds a {type(tokenizer).__name__}; CLIP needs a byte-level BPE tokenizer.")
    return tokenizer


def architecture(config: TrainConfig, tokenizer: TokenizersBackend) -> HfClipConfig:
    """The model's configuration; from scratch, the text vocabulary and special ids come from the tokenizer."""
    if config.model_name_or_path is not None:
        return HfClipConfig.from_pretrained(config.model_name_or_path)
    name_or_path = str(config.model_config)
    if name_or_path.endswith(".json"):
        values = json.loads(Path(name_or_path).read_text())
    else:
        values = HfClipConfig.from_architecture(name_or_path).to_dict()
    values["text_config"].update(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return HfClipConfig.from_dict(values)


def build_processor(model_config: HfClipConfig, tokenizer: TokenizersBackend) -> HfClipProcessor:
    """The tokenizer (checked against the text tower once per run, so the compiled step needs no per-batch check;
    truncating at the tower's context length) and an image processor at the model's resolution."""
    check_tokenizer(tokenizer, model_config)
    size = model_config.tower_configs()[1].image_size
    image_processor = HfClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return HfClipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(config: TrainConfig, model_config: HfClipConfig) -> HfClipModel:
    """A new model (OpenAI initialisation) or the saved one, in float32 (autocast handles mixed precision)."""
    if config.model_name_or_path is not None:
        return HfClipModel.from_pretrained(config.model_name_or_path, dtype=torch.float32)
    return HfClipModel(model_config)
