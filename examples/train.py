"""Train CLIP with Accelerate: `accelerate launch examples/train.py [config.json] [--field value ...]`.

One `TrainConfig` dataclass holds every setting; give it as a JSON file (see `examples/configs/`), on the command
line, or both (command-line values override the file). The same script runs on one CPU, one GPU, several GPUs
(DDP), several nodes, or under FSDP: pick an accelerate config (`examples/configs/accelerate_*.yaml`).

The recipe is the paper's: random square crop of the resized image as the only augmentation, AdamW with decoupled
weight decay on matrices only and β2/ε per image-tower family, cosine schedule with linear warmup, `logit_scale`
clamped to ln(100) after every optimizer step, and the contrastive loss over the global batch of all ranks
(`hf_clip.ClipLoss`, autograd all-gather). Gradient accumulation keeps the negatives of the whole accumulated
batch by default (`accumulation_mode="cached"`; see `training_steps.py` for how it differs from `"plain"`).

Outputs in `output_dir`: `checkpoints/step_XXXXXXXX/` (`save_state` + the data position of every rank), `logs/`
(tensorboard), `metrics.jsonl` (the logged scalars), and `model/` (model + processor, loadable with `AutoModel`,
`AutoProcessor` and `pipeline("zero-shot-image-classification")`).

Resume (`--resume latest` or a checkpoint path) is exact: every rank replays its data stream up to the stored
position (the stream depends only on seed, epoch and rank), so a resumed run equals an uninterrupted one bitwise on
the same hardware. Replaying decodes the skipped part of the epoch again; it costs input time, not training time.
"""

import contextlib
import functools
import json
import logging
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import TorchDynamoPlugin, is_tensorboard_available, set_seed
from tqdm.auto import tqdm
from transformers import HfArgumentParser, get_cosine_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_config import (
    TrainConfig,
    architecture,
    build_model,
    build_processor,
    build_tokenizer,
    checkpoint_to_resume,
)
from training_data import SKIP_REASONS, ClipBatches, DataSpec, labelled_batches, load_stream, random_crop
from training_eval import zero_shot_accuracy
from training_steps import (
    ClipEmbedder,
    build_optimizer,
    cached_accumulation_backward,
    clamp_logit_scale_,
    plain_loss,
)

from hf_clip import ClipLoss

logger = logging.getLogger("train")


def parse_config(argv: list[str]) -> TrainConfig:
    """`[config.json] [--field value ...]`: the JSON gives defaults, the command line overrides them."""
    parser = HfArgumentParser(TrainConfig)
    if argv and argv[0].endswith(".json"):
        values = json.loads(Path(argv[0]).read_text())
        unknown = sorted(set(values) - {field.name for field in fields(TrainConfig)})
        if unknown:
            raise ValueError(f"{argv[0]} has fields TrainConfig does not know: {unknown}")
        parser.set_defaults(**values)
        argv = argv[1:]
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config


def train_batches(
    config: TrainConfig, processor, accelerator: Accelerator
) -> tuple[ClipBatches, torch.utils.data.DataLoader]:
    """This rank's batches. The DataLoader is not given to `accelerator.prepare`: `ClipBatches` already splits the
    stream across ranks (`split_dataset_by_node`) and batches are moved to the device in the loop."""
    spec = DataSpec(config.train_data_format, config.data_files(), config.image_column, config.text_column)
    batches = ClipBatches(
        load_stream(spec),
        spec,
        image_transform=functools.partial(random_crop, processor.image_processor),
        tokenizer=processor.tokenizer,
        batch_size=config.per_device_batch_size,
        seed=config.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        shuffle_buffer=config.shuffle_buffer,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=config.dataloader_num_workers)
    return batches, loader


class DataCursor:
    """This rank's position in its data stream: epoch, batches taken in it, and skip counts so far."""

    def __init__(self, epoch: int = 0, batches_in_epoch: int = 0, skipped: list[int] | None = None):
        self.epoch = epoch
        self.batches_in_epoch = batches_in_epoch
        self.skipped = torch.tensor(skipped or [0] * len(SKIP_REASONS))

    def state(self) -> dict:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch, "skipped": self.skipped.tolist()}

    def stream(self, batches: ClipBatches, loader: torch.utils.data.DataLoader, rank: int):
        """Batches forever, epoch after epoch, starting (by replay) from the stored position."""
        trained = self.batches_in_epoch > 0
        while True:
            batches.set_epoch(self.epoch)
            iterator = iter(loader)
            for _ in range(self.batches_in_epoch):  # replay to the resume point
                next(iterator)
            for batch in iterator:
                self.batches_in_epoch += 1  # counts loader items (also skip-only records): what replay consumes
                self.skipped += batch.pop("skipped")
                if batch:
                    trained = True
                    yield batch
            if not trained:
                raise RuntimeError(
                    f"rank {rank} got no full batch from its share of the data: use more data or a smaller batch."
                )
            self.epoch, self.batches_in_epoch, trained = self.epoch + 1, 0, False


def main(argv: list[str] | None = None) -> None:
    config = parse_config(sys.argv[1:] if argv is None else argv)
    config.validate()
    if not is_tensorboard_available():
        # Accelerate would only warn and log nothing.
        raise ImportError("train.py logs to tensorboard: `pip install tensorboard` (the `train` extra).")
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with="tensorboard",
        project_dir=str(output_dir),
        step_scheduler_with_optimizer=False,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if config.torch_compile else None,
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("fp16 autocast does not run on CPU (it would silently train in fp32); use bf16 or no.")
    set_seed(config.seed)
    logger.info("%s", accelerator.state)

    tokenizer = build_tokenizer(config)
    model_config = architecture(config, tokenizer)
    processor = build_processor(config, model_config, tokenizer)
    model = build_model(config, model_config)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = build_optimizer(
        model, config.learning_rate, config.weight_decay, config.adam_beta1, config.adam_beta2, config.adam_epsilon
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    embedder, optimizer, scheduler = accelerator.prepare(ClipEmbedder(model), optimizer, scheduler)
    loss_fn = ClipLoss()
    batches, loader = train_batches(config, processor, accelerator)

    step, cursor = 0, DataCursor()
    resume_from = checkpoint_to_resume(config.resume, output_dir)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        step = json.loads((resume_from / "training_state.json").read_text())["step"]
        cursor = DataCursor(
            **json.loads((resume_from / f"data_state_rank{accelerator.process_index}.json").read_text())
        )
        logger.info("resumed from %s at step %d", resume_from, step)
    eval_batches = None
    if config.eval_data_files:
        eval_spec = DataSpec(
            config.eval_data_format,
            config.data_files(eval=True),
            config.image_column,
            label_column=config.eval_label_column,
        )
        eval_batches = labelled_batches(
            eval_spec,
            processor.image_processor,
            config.per_device_eval_batch_size,
            accelerator.process_index,
            accelerator.num_processes,
            config.eval_max_samples,
        )

    accelerator.init_trackers(
        "logs", config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in asdict(config).items()}
    )
    stream = cursor.stream(batches, loader, accelerator.process_index)
    samples_per_step = config.per_device_batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    progress = tqdm(total=config.max_steps, initial=step, disable=not accelerator.is_main_process, desc="train")
    unwrapped = accelerator.unwrap_model(embedder).model
    window_start, window_steps, window_loss = time.perf_counter(), 0, torch.zeros((), device=accelerator.device)

    embedder.train()
    train_seconds = 0.0  # time in training steps only (no evaluation, logging or checkpointing)
    while step < config.max_steps:
        step_start = time.perf_counter()
        micro_batches = [
            to_device(next(stream), accelerator.device) for _ in range(config.gradient_accumulation_steps)
        ]
        if config.accumulation_mode == "cached" and len(micro_batches) > 1:
            loss = cached_accumulation_backward(
                embedder, loss_fn, micro_batches, accelerator.backward, lambda: accelerator.no_sync(embedder)
            )
        else:
            loss = torch.zeros((), device=accelerator.device)
            for index, batch in enumerate(micro_batches):
                # Plain accumulation: each micro-batch is its own contrastive problem; gradients are averaged.
                last = index == len(micro_batches) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(embedder):
                    micro_loss = plain_loss(embedder, loss_fn, batch) / len(micro_batches)
                    accelerator.backward(micro_loss)
                loss += micro_loss.detach()
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(embedder.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale_(unwrapped)
        step += 1
        train_seconds += time.perf_counter() - step_start
        progress.update(1)
        window_steps += 1
        window_loss += loss

        last_step = step == config.max_steps
        should_eval = eval_batches is not None and (
            last_step or (config.eval_steps > 0 and step % config.eval_steps == 0)
        )
        if should_eval or last_step or step % config.logging_steps == 0:
            skipped = accelerator.reduce(cursor.skipped.to(accelerator.device), "sum")
            record = {
                "loss": accelerator.reduce(window_loss / window_steps, "mean").item(),
                "learning_rate": scheduler.get_last_lr()[0],
                "logit_scale": unwrapped.logit_scale.detach().float().exp().item(),
                "samples_per_second": window_steps * samples_per_step / (time.perf_counter() - window_start),
                "train_seconds": train_seconds,
                "skipped_samples": int(skipped.sum()),
                **{f"skipped/{name}": int(n) for name, n in zip(SKIP_REASONS, skipped.tolist(), strict=True)},
            }
            if should_eval:
                embedder.eval()
                for name, templates in (
                    ("zero_shot_top1", config.templates[:1]),
                    ("zero_shot_top1_ensemble", config.templates),
                ):
                    record[name] = zero_shot_accuracy(
                        accelerator, embedder, processor.tokenizer, config.class_names, templates, eval_batches
                    )
                embedder.train()
            log_record(accelerator, output_dir, step, record)
            progress.set_postfix(loss=f"{record['loss']:.3f}", skipped=record["skipped_samples"])
            window_start, window_steps, window_loss = (
                time.perf_counter(),
                0,
                torch.zeros((), device=accelerator.device),
            )

        if config.save_steps > 0 and step % config.save_steps == 0:
            save_checkpoint(accelerator, output_dir / "checkpoints" / f"step_{step:08d}", step, cursor)
        if config.stop_at_step is not None and step >= config.stop_at_step:
            logger.info("stopping at step %d (stop_at_step); continue with --resume latest", step)
            accelerator.end_training()
            return
    progress.close()
    save_final(accelerator, embedder, processor, output_dir / "model")
    accelerator.end_training()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def log_record(accelerator: Accelerator, output_dir: Path, step: int, record: dict) -> None:
    """Scalars to tensorboard and, on the main process, one line of `metrics.jsonl`."""
    accelerator.log(record, step=step)
    if accelerator.is_main_process:
        logger.info("step %d: %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()})
        with (output_dir / "metrics.jsonl").open("a") as file:
            file.write(json.dumps({"step": step, **record}) + "\n")


def save_checkpoint(accelerator: Accelerator, path: Path, step: int, cursor: DataCursor) -> None:
    """`save_state` (model, optimizer, scheduler, RNG) plus the step and every rank's data position."""
    accelerator.save_state(str(path))
    (path / f"data_state_rank{accelerator.process_index}.json").write_text(json.dumps(cursor.state()))
    if accelerator.is_main_process:
        (path / "training_state.json").write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()


def save_final(accelerator: Accelerator, embedder: torch.nn.Module, processor, path: Path) -> None:
    """Model and processor in one folder; the full state dict is gathered first (FSDP shards it)."""
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(embedder)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(embedder).model
        prefix = "model."
        model.save_pretrained(path, state_dict={k[len(prefix) :]: v for k, v in state_dict.items()})
        processor.save_pretrained(path)
        logger.info("saved model and processor to %s", path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
