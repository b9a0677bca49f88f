"""The training loop behind `accelerate launch examples/train.py [config.json] [--field value ...]` (also the
`hf-clip-train` console script and `python -m hf_clip.training`).

One `TrainConfig` dataclass holds every setting; give it as a JSON file (e.g. `hf_clip/demo/fashion_mnist.json`),
on the command line, or both (command-line values override the file). The same loop runs on one CPU, one GPU,
several GPUs (DDP), several nodes, or under FSDP: pick an accelerate config (`examples/configs/accelerate_*.yaml`).

The recipe is the paper's: random square crop of the resized image as the only augmentation, AdamW with decoupled
weight decay on matrices only and β2/ε per image-tower family, cosine schedule with linear warmup, `logit_scale`
clamped to ln(100) after every optimizer step, and the contrastive loss over the global batch of all ranks
(`hf_clip.ClipLoss`, autograd all-gather). Gradient accumulation keeps the negatives of the whole accumulated
batch by default (`accumulation_mode="cached"`; see `hf_clip/training/steps.py` for how it differs from `"plain"`).
Fine-tuning options change parts of it on request: the sigmoid loss (`hf_clip.SigLipLoss`), locked towers and
layer-wise learning-rate decay (`hf_clip/training/finetuning.py`), constant or warmup–stable–decay schedules, patch
dropout, and several weighted data sources (`train_sources`).

Outputs in `output_dir`: `checkpoints/step_XXXXXXXX/` (`save_state` + the data position of every rank), `logs/`
(the `log_with` trackers; tensorboard by default), `metrics.jsonl` (the logged scalars), and `model/` (model +
processor, loadable with `AutoModel`, `AutoProcessor` and `pipeline("zero-shot-image-classification")`).

Resume (`--resume latest` or a checkpoint path) is exact: every rank replays its data stream up to the stored
position (the stream depends only on seed, epoch and rank), so a resumed run equals an uninterrupted one bitwise on
the same hardware. Replaying decodes the skipped part of the epoch again; it costs input time, not training time.
"""

import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ..data.batches import device_batch
from ..data.device_jpegs import DeviceJpegs
from ..data.fast_preprocessing import FastClipImagePreprocessor
from ..data.formats import DataSpec
from ..data.streams import ClipBatches, labelled_batches, random_crop, skip_metrics
from ..modeling_hf_clip import HfClipModel
from ..processing_hf_clip import HfClipProcessor
from .builders import architecture, build_model, build_processor, build_tokenizer
from .config import TrainConfig, parse_config
from .evaluation import zero_shot_accuracy
from .finetuning import layer_decay_scales, lock_logit_parameters, lock_tower
from .launcher import end_with_launcher
from .objective import ClipObjective, ObjectiveOutput
from .run_folder import prepare_output_dir, run_fingerprint
from .state import (
    DataCursor,
    checkpoint_to_resume,
    drop_metrics_after,
    load_checkpoint,
    log_record,
    save_checkpoint,
    save_final,
)
from .steps import (
    ClipEmbedder,
    base_learning_rate,
    build_optimizer,
    build_scheduler,
    cached_accumulation_backward,
    clamp_logit_scale_,
)

if TYPE_CHECKING:  # importing it needs torchvision, which only `image_decoding="device"` requires
    from ..data.device_decoding import DeviceImagePreprocessor

logger = logging.getLogger(__name__)


def train_batches(
    config: TrainConfig, processor: HfClipProcessor, accelerator: Accelerator
) -> tuple[ClipBatches, torch.utils.data.DataLoader, "DeviceImagePreprocessor | None"]:
    """This rank's batches, and with `image_decoding="device"` the decoder `device_batch` needs for them.

    The workers preprocess with `FastClipImagePreprocessor` (the processor's pixels bit for bit, same random draws).
    The DataLoader is not given to `accelerator.prepare`: `ClipBatches` already splits the stream across ranks
    (`split_dataset_by_node`) and batches are moved to the device in the loop."""
    device_decoder = None
    if config.image_decoding == "device":
        from ..data.device_decoding import DeviceImagePreprocessor  # needs torchvision: imported for this mode only

        device_decoder = DeviceImagePreprocessor(processor.image_processor, accelerator.device)
    batches = ClipBatches(
        config.resolved_train_specs(),
        image_transform=functools.partial(random_crop, FastClipImagePreprocessor(processor.image_processor)),
        tokenizer=processor.tokenizer,
        batch_size=config.per_device_batch_size,
        seed=config.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        shuffle_buffer=config.shuffle_buffer,
        device_jpegs=DeviceJpegs(processor.image_processor) if device_decoder is not None else None,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=config.dataloader_num_workers)
    return batches, loader, device_decoder


def lock_parameters(config: TrainConfig, model: HfClipModel) -> list[torch.nn.BatchNorm2d]:
    """Apply the run's locks (towers except their top groups, the temperature); returns the BatchNorm layers whose
    statistics are frozen with them."""
    frozen_batchnorms = []
    if config.lock_image:
        frozen_batchnorms += lock_tower(model, "image", config.lock_image_unlocked_groups)
    if config.lock_text:
        frozen_batchnorms += lock_tower(model, "text", config.lock_text_unlocked_groups)
    if config.lock_logit_scale:
        lock_logit_parameters(model)
    return frozen_batchnorms


@dataclass
class TrainingRun:
    """Everything a run's steps use, built once by `setup_run`."""

    config: TrainConfig
    accelerator: Accelerator
    output_dir: Path
    processor: HfClipProcessor
    fingerprint: dict[str, Any]
    embedder: torch.nn.Module
    objective: ClipObjective
    step_objective: Callable[[dict[str, torch.Tensor]], ObjectiveOutput]  # compiled or not
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: ClipBatches
    loader: torch.utils.data.DataLoader
    image_decoder: "DeviceImagePreprocessor | None"
    eval_batches: list[tuple[torch.Tensor, torch.Tensor]] | None

    @property
    def model(self) -> HfClipModel:
        return self.accelerator.unwrap_model(self.embedder).model


def setup_run(config: TrainConfig) -> TrainingRun:
    """The accelerator, output folder, model, optimizer, objective and data of a validated run config."""
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=config.trackers() or None,  # checked installed: accelerate would only warn and log nothing
        project_dir=str(output_dir),
        step_scheduler_with_optimizer=False,
    )
    on_cuda = accelerator.device.type == "cuda"
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("fp16 autocast does not run on CPU (it would silently train in fp32); use bf16 or no.")
    prepare_output_dir(accelerator, config)
    set_seed(config.seed)
    logger.info("%s", accelerator.state)

    tokenizer = build_tokenizer(config)
    model_config = architecture(config, tokenizer)
    processor = build_processor(model_config, tokenizer)
    fingerprint = run_fingerprint(config, model_config, accelerator.num_processes)
    model = build_model(config, model_config).to(accelerator.device)  # before the optimizer: fused AdamW on CUDA
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    channels_last = on_cuda if config.channels_last is None else config.channels_last
    if channels_last and model.vision_model.prefers_channels_last:
        model.vision_model.to(memory_format=torch.channels_last)
    frozen_batchnorms = lock_parameters(config, model)
    scales = layer_decay_scales(model, config.layer_decay_image, config.layer_decay_text)
    optimizer = build_optimizer(
        model,
        config.learning_rate,
        config.weight_decay,
        config.adam_beta1,
        config.adam_beta2,
        config.adam_epsilon,
        scales,
    )
    scheduler = build_scheduler(
        optimizer, config.lr_scheduler, config.warmup_steps, config.max_steps, config.decay_steps()
    )
    embedder, optimizer, scheduler = accelerator.prepare(ClipEmbedder(model, frozen_batchnorms), optimizer, scheduler)
    # The dense losses unless a tile size is set (options a registered loss may not take are not passed).
    tiling = {} if config.loss_tile_size is None else {"tile_size": config.loss_tile_size}
    objective = ClipObjective.from_name(embedder, config.loss, **tiling)
    step_objective: Callable[[dict[str, torch.Tensor]], ObjectiveOutput] = objective
    if on_cuda if config.torch_compile is None else config.torch_compile:
        # Forward and loss as one graph (it compiles without graph breaks); backward through AOTAutograd. Cached
        # accumulation calls the embedder itself, so its forward is compiled too.
        step_objective = torch.compile(objective.__call__, mode=config.torch_compile_mode)
        embedder.compile(mode=config.torch_compile_mode)
    batches, loader, image_decoder = train_batches(config, processor, accelerator)
    return TrainingRun(
        config,
        accelerator,
        output_dir,
        processor,
        fingerprint,
        embedder,
        objective,
        step_objective,
        optimizer,
        scheduler,
        batches,
        loader,
        image_decoder,
        evaluation_batches(config, processor, accelerator),
    )


def evaluation_batches(
    config: TrainConfig, processor: HfClipProcessor, accelerator: Accelerator
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """This rank's share of the zero-shot evaluation split (skips logged), or `None` without one."""
    if not config.eval_data_files:
        return None
    eval_spec = DataSpec(
        config.eval_data_format, config.eval_files(), config.image_column, label_column=config.eval_label_column
    )
    eval_batches, eval_skipped = labelled_batches(
        eval_spec,
        processor.image_processor,
        config.per_device_eval_batch_size,
        accelerator.process_index,
        accelerator.num_processes,
        config.eval_max_samples,
    )
    if eval_skipped:
        logger.warning("rank %d: evaluation samples skipped: %s", accelerator.process_index, dict(eval_skipped))
    return eval_batches


def train_step(run: TrainingRun, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """One optimizer step over `micro_batches` (cached or plain accumulation); returns the step's loss, on the
    device (nothing is read back)."""
    config, accelerator = run.config, run.accelerator
    if config.accumulation_mode == "cached" and len(micro_batches) > 1:
        loss = cached_accumulation_backward(
            run.objective, micro_batches, accelerator.backward, lambda: accelerator.no_sync(run.embedder)
        )
    else:
        loss = torch.zeros((), device=accelerator.device)
        for index, batch in enumerate(micro_batches):
            # Plain accumulation: each micro-batch is its own contrastive problem; gradients are averaged.
            last = index == len(micro_batches) - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(run.embedder):
                micro_loss = run.step_objective(batch).loss / len(micro_batches)
                accelerator.backward(micro_loss)
            loss += micro_loss.detach()
    if config.max_grad_norm > 0:
        accelerator.clip_grad_norm_(run.embedder.parameters(), config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    clamp_logit_scale_(run.model)
    return loss


@dataclass
class LogWindow:
    """The steps since the last logged record: their count, summed loss (on the device) and wall-clock start."""

    device: torch.device
    steps: int = 0
    loss: torch.Tensor | None = None
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor) -> None:
        self.steps += 1
        self.loss = loss if self.loss is None else self.loss + loss


def log_and_evaluate(
    run: TrainingRun, step: int, window: LogWindow, cursor: DataCursor, train_seconds: float, evaluate: bool
) -> dict[str, Any]:
    """The metrics record of `window` (losses averaged over ranks, skips summed), with zero-shot accuracy when
    `evaluate`; written to the trackers and metrics.jsonl."""
    config, accelerator = run.config, run.accelerator
    samples_per_step = config.per_device_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    assert window.loss is not None  # a window holds at least one step
    skipped = accelerator.reduce(cursor.skipped.to(accelerator.device), "sum")
    record = {
        "loss": accelerator.reduce(window.loss / window.steps, "mean").item(),
        "learning_rate": base_learning_rate(run.optimizer),
        "logit_scale": run.model.logit_multiplier().detach().item(),
        "samples_per_second": window.steps * samples_per_step / (time.perf_counter() - window.start),
        "train_seconds": train_seconds,
        **skip_metrics(skipped, run.batches.sources),
        "truncated_captions": accelerator.reduce(cursor.truncated_captions.to(accelerator.device), "sum").item(),
    }
    if evaluate and run.eval_batches is not None:
        run.embedder.eval()
        for name, templates in (
            ("zero_shot_top1", config.templates[:1]),
            ("zero_shot_top1_ensemble", config.templates),
        ):
            tokenizer = run.processor.tokenizer
            record[name] = zero_shot_accuracy(
                accelerator, run.embedder, tokenizer, config.class_names, templates, run.eval_batches
            )
        run.embedder.train()
    log_record(accelerator, run.output_dir, step, record)
    return record


def main(argv: list[str] | None = None) -> None:
    end_with_launcher()
    config = parse_config(sys.argv[1:] if argv is None else argv)
    config.validate()
    run = setup_run(config)
    accelerator = run.accelerator

    step, cursor = 0, DataCursor(num_sources=len(run.batches.sources))
    resume_from = checkpoint_to_resume(config.resume, run.output_dir)
    if resume_from is not None:
        step, cursor = load_checkpoint(accelerator, resume_from, len(run.batches.sources), run.fingerprint)
        logger.info("resumed from %s at step %d", resume_from, step)
    drop_metrics_after(accelerator, run.output_dir, step)
    accelerator.init_trackers(
        "logs", config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(config).items()}
    )
    stream = cursor.stream(run.batches, run.loader, accelerator.process_index)
    progress = tqdm(total=config.max_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    window = LogWindow(accelerator.device)
    run.embedder.train()
    train_seconds = 0.0  # time in training steps only (no evaluation, logging or checkpointing)
    while step < config.max_steps:
        step_start = time.perf_counter()
        micro_batches = [
            device_batch(next(stream), accelerator.device, run.image_decoder)
            for _ in range(config.gradient_accumulation_steps)
        ]
        window.add(train_step(run, micro_batches))
        step += 1
        train_seconds += time.perf_counter() - step_start
        progress.update(1)

        last_step = step == config.max_steps
        evaluate = run.eval_batches is not None and (
            last_step or (config.eval_steps > 0 and step % config.eval_steps == 0)
        )
        if evaluate or last_step or step % config.logging_steps == 0:
            record = log_and_evaluate(run, step, window, cursor, train_seconds, evaluate)
            progress.set_postfix(loss=f"{record['loss']:.3f}", skipped=record["skipped_samples"])
            window = LogWindow(accelerator.device)
        if config.save_steps > 0 and step % config.save_steps == 0:
            save_checkpoint(accelerator, run.output_dir, step, cursor, run.fingerprint, config.save_total_limit)
        if config.stop_at_step is not None and step >= config.stop_at_step:
            logger.info("stopping at step %d (stop_at_step); continue with --resume latest", step)
            accelerator.end_training()
            return
    progress.close()
    save_final(accelerator, run.embedder, run.processor, run.output_dir / "model")
    accelerator.end_training()


if __name__ == "__main__":
    main()
