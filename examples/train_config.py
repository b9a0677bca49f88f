"""`TrainConfig` for `examples/train.py`, and building the model, tokenizer and processor it names."""

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from hf_clip import HfClipConfig, HfClipImageProcessor, HfClipModel, HfClipProcessor, HfClipTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_FOLDERS = (REPO_ROOT / "conversion" / "configs", REPO_ROOT / "examples" / "configs")


@dataclass
class TrainConfig:
    """Every setting of a training run (command line: `--name value`; JSON: `{"name": value}`)."""

    output_dir: str = field(default="clip_output", metadata={"help": "Checkpoints, logs, metrics and model/."})
    # Model: from scratch (`model_config`) or from a saved folder (`model_name_or_path`).
    model_config: str | None = field(
        default=None,
        metadata={"help": "Architecture: a name in conversion/configs or examples/configs, or a JSON path."},
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
    torch_compile: bool = False
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


def resolve_model_config(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return path
    for folder in CONFIG_FOLDERS:
        if (folder / f"{name_or_path}.json").is_file():
            return folder / f"{name_or_path}.json"
    known = sorted(p.stem for folder in CONFIG_FOLDERS for p in folder.glob("*.json"))
    raise FileNotFoundError(f"model_config {name_or_path!r} is neither a JSON file nor one of {known}.")


def build_tokenizer(config: TrainConfig) -> HfClipTokenizer:
    source = config.tokenizer_name_or_path or config.model_name_or_path
    if source is None:
        return HfClipTokenizer.from_clip_bpe()
    return AutoTokenizer.from_pretrained(source)


def architecture(config: TrainConfig, tokenizer: HfClipTokenizer) -> HfClipConfig:
    """The model's configuration; from scratch, the text vocabulary and special ids come from the tokenizer."""
    if config.model_name_or_path is not None:
        return HfClipConfig.from_pretrained(config.model_name_or_path)
    values = json.loads(resolve_model_config(str(config.model_config)).read_text())
    values["text_config"].update(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    return HfClipConfig.from_dict(values)


def build_processor(config: TrainConfig, model_config: HfClipConfig, tokenizer: HfClipTokenizer) -> HfClipProcessor:
    """The tokenizer (truncating at the text tower's context length) and an image processor at its resolution."""
    tokenizer.model_max_length = min(tokenizer.model_max_length, model_config.text_config.max_position_embeddings)
    size = model_config.vision_config.image_size
    image_processor = HfClipImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return HfClipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(config: TrainConfig, model_config: HfClipConfig) -> HfClipModel:
    """A new model (OpenAI initialisation) or the saved one, in float32 (autocast handles mixed precision)."""
    if config.model_name_or_path is not None:
        return HfClipModel.from_pretrained(config.model_name_or_path, dtype=torch.float32)
    return HfClipModel(model_config)


def checkpoint_to_resume(resume: str | None, output_dir: Path) -> Path | None:
    """`None`, a checkpoint folder, or `latest`: the highest step under `output_dir/checkpoints`."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = sorted((output_dir / "checkpoints").glob("step_*"))
        if not checkpoints:
            raise FileNotFoundError(f"--resume latest: no checkpoint under {output_dir / 'checkpoints'}.")
        return checkpoints[-1]
    path = Path(resume)
    if not (path / "training_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint written by train.py (no training_state.json).")
    return path
