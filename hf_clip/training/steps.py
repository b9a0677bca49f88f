"""Model-side pieces of a training step: the embedding wrapper, the paper's optimizer, and the two accumulation modes.

Accumulation over m micro-batches, two ways:

- `plain` (the training loop back-propagates each micro-batch's loss divided by m in turn, under
  `accelerator.no_sync` but for the last): each micro-batch is its own contrastive problem; a sample's negatives
  are the other samples of its micro-batch (on all ranks). Gradients are averaged over micro-batches. Cheap, but
  the loss is that of batch `per_device_batch_size × world_size`, not of the accumulated batch.
- `cached` (`cached_accumulation_backward`): the loss of the whole accumulated batch, every sample against all
  `per_device_batch_size × world_size × m` others. Pass 1 embeds every micro-batch without gradients; pass 2
  re-embeds each micro-batch with gradients and back-propagates the full-batch loss with the other micro-batches'
  embeddings as constants. Training-mode forwards draw random numbers (patch dropout's kept patches, attention
  dropout), so pass 2 replays each micro-batch from the random state its pass-1 forward started from: both passes
  embed the same patches, and the summed gradients equal those of one batch m times larger under the same draws,
  at the cost of one extra forward pass and m loss evaluations.
"""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_wsd_schedule

from ..loss import ContrastiveInputs
from ..modeling_hf_clip import LOGIT_SCALE_MAX, HfClipModel
from .finetuning import ParameterScale
from .objective import ClipObjective


class ClipEmbedder(nn.Module):
    """`HfClipModel` behind one forward that returns what the losses take, by name (`ContrastiveInputs`).

    Training goes through this forward only, so DDP's gradient hooks and FSDP's parameter gathering see every use of
    the weights (including `logit_scale`). Pass images, text or both; the missing side comes back as `None`.

    Text comes in one of two layouts:

    - packed, when `cu_seqlens` is given: `input_ids`, `position_ids` and `cu_seqlens` of
      `hf_clip.data.text_batching.pack_text` (what `hf_clip.data.batches.device_text` sends), embedded by
      `HfClipModel.get_packed_text_features`. The work follows the sum of caption lengths, and no value is read
      back from the device except once per run: the first packed batch is checked (ids in the vocabulary, an EOS
      in every caption; a compiled forward skips the check, as it skips the padded path's);
    - padded: `input_ids` (batch, seq_len) and optionally `attention_mask`, through `get_text_features` and its
      input checks on every call (zero-shot evaluation, callers with padded batches). The training steps pass no
      attention mask here: captions are padded after their EOS, and the causal text tower pools at the EOS, so the
      mask cannot change the loss; without it sdpa runs its `is_causal` kernel on an unmaterialised mask.

    `tests/test_packed_text.py` and `tests/data/test_text_batching.py` check both against the padded, masked step.
    """

    def __init__(self, model: HfClipModel, frozen_batchnorms: Sequence[nn.BatchNorm2d] = ()):
        super().__init__()
        self.model = model
        # BatchNorm layers of locked ResNet stages (`hf_clip.training.finetuning.lock_tower`): always in eval mode,
        # so their running statistics stay those of the checkpoint.
        self.frozen_batchnorms = list(frozen_batchnorms)
        # FSDP's transformer auto-wrap policy reads this from the root module and fails on a name the model lacks:
        # the blocks of the model's own towers (each tower names its own; `post_init` gathers them).
        self._no_split_modules = sorted(model._no_split_modules or [])
        self.packed_text_checked = False

    def train(self, mode: bool = True) -> "ClipEmbedder":
        super().train(mode)
        for module in self.frozen_batchnorms:
            module.eval()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> ContrastiveInputs:
        """The normalised embeddings, the capped `logit_scale` multiplier and the model's `logit_bias` (None
        without one): the run's loss's arguments (`ClipObjective.score`)."""
        image_embeds = text_embeds = None
        # Tuple outputs: (last hidden state, pooled projected embedding).
        if pixel_values is not None:
            image_features = self.model.get_image_features(pixel_values, return_dict=False)[1]
            image_embeds = nn.functional.normalize(image_features, dim=-1)
        if input_ids is not None:
            text_features = self.text_features(input_ids, attention_mask, position_ids, cu_seqlens)
            text_embeds = nn.functional.normalize(text_features, dim=-1)
        return ContrastiveInputs(image_embeds, text_embeds, self.model.logit_multiplier(), self.model.logit_bias)

    def text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
    ) -> torch.Tensor:
        """Projected text embeddings of a packed batch (with `cu_seqlens`) or of a padded one."""
        if cu_seqlens is None:
            # Tuple output: (last hidden state, pooled projected embedding).
            padded = self.model.get_text_features(input_ids, attention_mask, position_ids, return_dict=False)
            return padded[1]
        if position_ids is None:
            raise ValueError("packed text needs `position_ids` with `cu_seqlens` (pack_text writes both).")
        # Batches come from one tokenizer, so the first shows whether it matches the model: one read-back per run.
        if not self.packed_text_checked and not torch.compiler.is_compiling():
            self.model.text_model.check_packed_input_ids(input_ids, cu_seqlens)
            self.packed_text_checked = True
        return self.model.get_packed_text_features(input_ids, position_ids, cu_seqlens)


def parameter_groups(
    model: HfClipModel, weight_decay: float, scales: dict[int, ParameterScale] | None = None
) -> list[dict[str, Any]]:
    """The trainable parameters in optimizer groups: per layer group (`scales`, from
    `hf_clip.training.finetuning.layer_decay_scales`; one group at factor 1 without it), matrices and embeddings
    with weight decay, gains, biases and the temperature (every parameter with < 2 dims) without. Each group's `lr`
    is the base rate times its `lr_scale`; frozen parameters (`requires_grad=False`) are left out."""
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for param in model.parameters():
        if not param.requires_grad:
            continue
        scale = scales[id(param)] if scales is not None else ParameterScale("all", 1.0)
        decay = param.ndim >= 2
        group = groups.setdefault(
            (scale.group, decay),
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale.scale,
                "name": f"{scale.group}/{'decay' if decay else 'no_decay'}",
            },
        )
        group["params"].append(param)
    if not groups:
        raise ValueError("every parameter is frozen: unlock a tower, some of its layer groups or the temperature.")
    return list(groups.values())


def build_optimizer(
    model: HfClipModel,
    learning_rate: float,
    weight_decay: float,
    beta1: float = 0.9,
    beta2: float | None = None,
    epsilon: float | None = None,
    scales: dict[int, ParameterScale] | None = None,
) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over the trainable parameters, with the paper's β2 / ε for the model's image
    tower (its `adam_defaults`) unless overridden, and per-group learning rates `learning_rate * lr_scale`
    (layer-wise decay).

    On CUDA the fused kernel updates every parameter in a few launches (the model must be on its device already);
    the update itself is the same AdamW.
    """
    default_beta2, default_epsilon = model.vision_model.adam_defaults
    groups = parameter_groups(model, weight_decay, scales)
    for group in groups:
        group["lr"] = learning_rate * group["lr_scale"]
    return torch.optim.AdamW(
        groups,
        lr=learning_rate,
        betas=(beta1, beta2 if beta2 is not None else default_beta2),
        eps=epsilon if epsilon is not None else default_epsilon,
        fused=model.device.type == "cuda",
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, max_steps: int, decay_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then `cosine` (to 0 at `max_steps`), `constant`, or `wsd` (warmup–stable–decay: constant
    until the last `decay_steps`, then a cosine decay to 0). The factor applies to every group's own rate, so
    layer-wise decay is kept."""
    if name == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, max_steps)
    if name == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup_steps)
    if name == "wsd":
        return get_wsd_schedule(optimizer, warmup_steps, decay_steps, num_training_steps=max_steps)
    raise ValueError(f"unknown lr_scheduler {name!r}: cosine, constant or wsd.")


def base_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The scheduled rate before layer-wise scaling (what `learning_rate` names), for logs."""
    group = optimizer.param_groups[0]
    return group["lr"] / group["lr_scale"]


@torch.no_grad()
def clamp_logit_scale_(model: HfClipModel) -> None:
    """Clamp the learned log-temperature to ln(100) in place (the paper, after every optimizer step)."""
    model.logit_scale.clamp_(max=LOGIT_SCALE_MAX)


def random_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The default generators' states, of the CPU and of `device`'s accelerator (None on CPU): read on the host,
    no device synchronisation."""
    if device.type == "cpu":
        return torch.get_rng_state(), None
    return torch.get_rng_state(), torch.get_device_module(device.type).get_rng_state(device)


@contextlib.contextmanager
def replayed_draws(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> Iterator[None]:
    """Inside, random numbers are drawn from `state` (`random_state`'s) again; after, every generator continues
    from where it was, so the run's random stream is the one without the replay."""
    cpu_state, device_state = state
    with torch.random.fork_rng(devices=[] if device_state is None else [device], device_type=device.type):
        torch.set_rng_state(cpu_state)
        if device_state is not None:
            torch.get_device_module(device.type).set_rng_state(device_state, device)
        yield


def cached_accumulation_backward(
    objective: ClipObjective,
    micro_batches: Sequence[dict[str, torch.Tensor]],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Accumulate into `.grad` the gradients of the loss of all `micro_batches` together; returns that loss.

    `backward` is `accelerator.backward` under accelerate (the loss is not divided by the number of micro-batches:
    each pass-2 backward contributes a disjoint part of the one full-batch gradient). `no_sync` (e.g.
    `lambda: accelerator.no_sync(model)`) skips DDP's gradient all-reduce on all but the last micro-batch.
    """
    device = micro_batches[0]["pixel_values"].device
    states, cached = [], []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(random_state(device))
            cached.append(objective.embed(batch))
    cached_images, cached_texts = zip(*(both_sides(inputs) for inputs in cached), strict=True)
    loss = torch.zeros(())
    for index, batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        context = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with context:
            with replayed_draws(states[index], device):
                inputs = objective.embed(batch)
            image_rows, text_rows = both_sides(inputs)
            # This micro-batch's rows with gradients, every other one's as the constants of pass 1.
            inputs.image_embeds = torch.cat([*cached_images[:index], image_rows, *cached_images[index + 1 :]])
            inputs.text_embeds = torch.cat([*cached_texts[:index], text_rows, *cached_texts[index + 1 :]])
            # The temperature's (and bias's) gradient must be counted once, not once per micro-batch: on the last
            # one, whose backward is the one DDP synchronises (every parameter must take part in it).
            if not last:
                inputs.logit_scale = detached(inputs.logit_scale)
                inputs.logit_bias = detached(inputs.logit_bias)
            loss = objective.score(inputs)
            backward(loss)
    return loss.detach()


def detached(value: Any) -> Any:
    """A tensor detached from the graph; None and numbers as they are."""
    return value.detach() if isinstance(value, torch.Tensor) else value


def both_sides(inputs: ContrastiveInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """`(image_embeds, text_embeds)` of a training batch, which always has images and text."""
    return cast(torch.Tensor, inputs.image_embeds), cast(torch.Tensor, inputs.text_embeds)
