"""`TrainConfig`, the one dataclass of a training run, and its parsing (JSON file and/or command line); the model,
tokenizer and processor it names are built in `hf_clip.training.builders`."""

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType
from transformers import HfArgumentParser
from transformers.hf_argparser import DataClassType

from ..data.formats import DataFormatName, DataSpec, resolve_files
from ..loss import LOSSES

TRACKERS = ("none", "all", *(str(tracker.value) for tracker in LoggerType if tracker != LoggerType.ALL))
SOURCE_FIELDS = {"name", "data_format", "data_files", "image_column", "text_column", "weight"}


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
    text_context_length: int | None = field(
        default=None,
        metadata={
            "help": "Tokens the text tower reads (the tokenizer truncates there). From scratch: the context; "
            "fine-tuning: a longer context, the saved position embeddings stretched by Long-CLIP's rule (never "
            "shorter). Default: the model's (77)."
        },
    )
    # Data: one source (the fields below) or several mixed by weight (`train_sources`).
    train_data_format: DataFormatName = field(
        default="webdataset", metadata={"help": "webdataset | parquet | imagefolder | arrow | csv"}
    )
    train_data_files: list[str] = field(
        default_factory=list, metadata={"help": "Files or glob patterns (imagefolder, arrow: one folder)."}
    )
    image_column: str | None = field(
        default=None,
        metadata={
            "help": "Image column (webdataset: the image extension). Default: the format's (hf_clip.data.formats)."
        },
    )
    text_column: str | None = field(default=None, metadata={"help": "Caption column. Default: the format's."})
    train_sources: str | None = field(
        default=None,
        metadata={
            "help": "Several training sources sampled by weight, as a JSON list (in a JSON run config, the list "
            'itself): [{"name": "icons", "data_format": "webdataset", "data_files": ["icons/*.tar"], '
            '"image_column": "png", "text_column": "txt", "weight": 3}, ...]; replaces the train_data_* fields.'
        },
    )
    shuffle_buffer: int = 1000
    dataloader_num_workers: int = 0
    image_decoding: Literal["cpu", "device"] = field(
        default="cpu",
        metadata={
            "help": "cpu: workers decode and crop (exact pixels) | device: workers check and crop-plan RGB/grayscale "
            "JPEGs, the training device decodes them (needs torchvision; within a few 8-bit levels)."
        },
    )
    # Zero-shot evaluation on a held-out labelled split.
    eval_data_format: DataFormatName = "webdataset"
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
    accumulation_mode: Literal["cached", "plain"] = field(
        default="cached", metadata={"help": "cached (full-batch negatives) | plain"}
    )
    max_steps: int = 1000
    loss: str = field(
        default="softmax",
        metadata={
            "help": "softmax: CLIP's contrastive loss | sigmoid: SigLIP's pairwise loss, with a learnable bias (init "
            "-10; a new model's temperature starts at ln 10) stored in the model."
        },
    )
    loss_tile_size: int | None = field(
        default=None,
        metadata={
            "help": "Compute the loss in blocks of loss_tile_size² logits (hf_clip.tiled_loss: same value and "
            "gradients, memory O(batch·dim + tile²) instead of O(batch²)), e.g. 1024. Default: the dense loss."
        },
    )
    learning_rate: float = 5e-4
    weight_decay: float = 0.2
    adam_beta1: float = 0.9
    adam_beta2: float | None = field(default=None, metadata={"help": "Default: 0.98 (ViT) / 0.999 (ResNet)."})
    adam_epsilon: float | None = field(default=None, metadata={"help": "Default: 1e-6 (ViT) / 1e-8 (ResNet)."})
    warmup_steps: int = 100
    lr_scheduler: Literal["cosine", "constant", "wsd"] = field(
        default="cosine",
        metadata={
            "help": "cosine (to 0 at max_steps) | constant | wsd (warmup, stable, then a cosine decay over the last "
            "lr_decay_steps): after warmup, constant and wsd's stable phase do not depend on the run's length."
        },
    )
    lr_decay_steps: int | None = field(
        default=None, metadata={"help": "wsd: length of the decay. Default: a tenth of max_steps."}
    )
    # Fine-tuning: locked towers (LiT), layer-wise learning-rate decay, patch dropout (FLIP).
    lock_image: bool = field(default=False, metadata={"help": "Freeze the image tower (see the unlocked groups)."})
    lock_image_unlocked_groups: int = field(
        default=0,
        metadata={
            "help": "Top layer groups of a locked image tower left trainable (ViT: embeddings, blocks, head; ResNet: "
            "stem, stages, attention pool). Frozen ResNet stages keep their BatchNorm statistics."
        },
    )
    lock_text: bool = field(default=False, metadata={"help": "Freeze the text tower (see the unlocked groups)."})
    lock_text_unlocked_groups: int = field(
        default=0,
        metadata={"help": "Top layer groups of a locked text tower left trainable (embeddings, blocks, head)."},
    )
    lock_logit_scale: bool = field(default=False, metadata={"help": "Freeze the temperature (and a SigLIP bias)."})
    layer_decay_image: float = field(
        default=1.0,
        metadata={
            "help": "Layer-wise learning-rate decay of the image tower: group k below the top "
            "trains at learning_rate * decay**k. 1 disables."
        },
    )
    layer_decay_text: float = field(default=1.0, metadata={"help": "The same for the text tower."})
    patch_dropout: float | None = field(
        default=None,
        metadata={"help": "ViT training: fraction of patch tokens dropped per image. Default: the model config's."},
    )
    max_grad_norm: float = field(default=0.0, metadata={"help": "Clip the gradient norm to this; 0 disables."})
    mixed_precision: Literal["no", "bf16", "fp16"] = field(default="no", metadata={"help": "no | bf16 | fp16"})
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
    log_with: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={
            "help": "accelerate trackers (tensorboard, wandb, mlflow, ...; 'all' for every installed one; 'none' for "
            "metrics.jsonl only)."
        },
    )
    logging_steps: int = 10
    save_steps: int = 0
    save_total_limit: int | None = field(
        default=None, metadata={"help": "Keep only the newest N complete checkpoints (at least 1). Default: all."}
    )
    resume: str | None = field(
        default=None,
        metadata={"help": "'latest' (the newest complete checkpoint; none yet: start fresh) or a checkpoint folder."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the run in a non-empty output_dir (its checkpoints, logs, metrics and model/)."},
    )
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
        check_choices(self)
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(
                f"save_total_limit must be at least 1 (or unset to keep all), got {self.save_total_limit}."
            )
        if self.overwrite_output_dir and self.resume is not None:
            raise ValueError("overwrite_output_dir replaces the run in output_dir, resume continues it: give one.")
        if self.gradient_accumulation_steps < 1 or self.max_steps < 1 or self.logging_steps < 1:
            raise ValueError("gradient_accumulation_steps, max_steps and logging_steps must be positive.")
        if self.eval_data_files and not self.class_names:
            raise ValueError("zero-shot evaluation needs class_names (in label order).")
        if not self.templates:
            raise ValueError("templates is empty.")
        if self.loss not in LOSSES:
            # Not a Literal: the registry is open (`hf_clip.loss.register_loss`).
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}.")
        if self.loss_tile_size is not None and self.loss_tile_size < 1:
            raise ValueError(f"loss_tile_size must be positive, got {self.loss_tile_size}.")
        if self.lr_scheduler == "wsd" and not 0 < self.decay_steps() <= self.max_steps - self.warmup_steps:
            raise ValueError(
                f"wsd needs 0 < lr_decay_steps ({self.decay_steps()}) <= max_steps - warmup_steps "
                f"({self.max_steps - self.warmup_steps})."
            )
        unlocked = {"image": self.lock_image_unlocked_groups, "text": self.lock_text_unlocked_groups}
        for tower, groups in unlocked.items():
            if groups < 0:
                raise ValueError(f"lock_{tower}_unlocked_groups must be >= 0, got {groups}.")
            if groups > 0 and not getattr(self, f"lock_{tower}"):
                raise ValueError(f"lock_{tower}_unlocked_groups={groups} has no effect without lock_{tower}=true.")
        for tower, decay in (("image", self.layer_decay_image), ("text", self.layer_decay_text)):
            if not 0.0 < decay <= 1.0:
                raise ValueError(f"layer_decay_{tower} must be in (0, 1], got {decay}.")
        if self.patch_dropout is not None and not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}.")
        unknown_trackers = sorted(set(self.log_with) - set(TRACKERS))
        if unknown_trackers:
            raise ValueError(f"log_with has unknown trackers {unknown_trackers}; the known ones: {TRACKERS}.")
        self.train_specs()  # parses and checks train_sources

    def decay_steps(self) -> int:
        """The wsd schedule's decay length: `lr_decay_steps`, by default the last 10 % of the run."""
        return self.lr_decay_steps if self.lr_decay_steps is not None else max(1, self.max_steps // 10)

    def trackers(self) -> list[str]:
        """accelerate's `log_with`: the named trackers, each checked to be installed ('none' gives none)."""
        if "none" in self.log_with:
            if len(self.log_with) > 1:
                raise ValueError(f"log_with: 'none' excludes the others, got {self.log_with}.")
            return []
        if "all" in self.log_with:
            return ["all"]
        available = {str(LoggerType(tracker).value) for tracker in get_available_trackers()}
        missing = [tracker for tracker in self.log_with if tracker not in available]
        if missing:
            raise ImportError(
                f"log_with names trackers that are not installed: {missing} (installed: {sorted(available)})."
            )
        return list(self.log_with)

    def train_specs(self) -> list[DataSpec]:
        """The training sources: the `train_data_*` fields as one source, or the `train_sources` list."""
        if self.train_sources is None:
            return [DataSpec(self.train_data_format, self.train_data_files, self.image_column, self.text_column)]
        try:
            sources = json.loads(self.train_sources)
        except json.JSONDecodeError as error:
            raise ValueError(f"train_sources is not valid JSON ({error}).") from error
        if not isinstance(sources, list) or not sources or not all(isinstance(source, dict) for source in sources):
            raise ValueError("train_sources must be a non-empty JSON list of objects, one per source.")
        specs = []
        for index, source in enumerate(sources):
            unknown = sorted(set(source) - SOURCE_FIELDS)
            missing = sorted({"name", "data_files"} - set(source))
            if unknown or missing:
                raise ValueError(
                    f"train_sources[{index}]: unknown fields {unknown}, missing fields {missing} "
                    f"(fields: {sorted(SOURCE_FIELDS)})."
                )
            data_files = source["data_files"]
            try:
                weight = float(source.get("weight", 1.0))
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"train_sources[{index}]: weight must be a number, got {source['weight']!r}."
                ) from error
            specs.append(
                DataSpec(
                    source.get("data_format", self.train_data_format),
                    [data_files] if isinstance(data_files, str) else list(data_files),  # one pattern or a list
                    source.get("image_column", self.image_column),
                    source.get("text_column", self.text_column),
                    name=source["name"],
                    weight=weight,
                )
            )
        return specs

    def resolved_train_specs(self) -> list[DataSpec]:
        """`train_specs` with every source's file patterns expanded (missing files are an error)."""
        specs = self.train_specs()
        for spec in specs:
            spec.data_files = resolve_files(spec.data_format, spec.data_files, f"train source {spec.name!r}")
        return specs

    def eval_files(self) -> list[str]:
        return resolve_files(self.eval_data_format, self.eval_data_files, "eval")


def check_choices(config: Any) -> None:
    """Every `Literal` field of a dataclass holds one of its choices: values from a JSON run config reach the
    dataclass without argparse's `choices` check."""
    for name, annotation in get_type_hints(type(config)).items():
        if get_origin(annotation) is Literal and getattr(config, name) not in get_args(annotation):
            raise ValueError(f"{name} must be one of {list(get_args(annotation))}, got {getattr(config, name)!r}.")


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
        if isinstance(values.get("train_sources"), list):  # the field holds JSON text, as on the command line
            values["train_sources"] = json.dumps(values["train_sources"])
        model_config = values.get("model_config")
        if isinstance(model_config, str) and model_config.endswith(".json") and not Path(model_config).is_absolute():
            values["model_config"] = str(config_file.parent / model_config)
        parser.set_defaults(**values)
        argv = argv[1:]
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config
