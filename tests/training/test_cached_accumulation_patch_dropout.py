"""Cached accumulation with patch dropout (FLIP) is exact: pass 2 replays each micro-batch's random draws, so the
accumulated loss and gradients are those of one batch of all micro-batches under the same draws."""

import pytest
import torch

from hf_clip import HfClipModel
from hf_clip.testing_utils import TINY_VIT, random_text, tiny_config
from hf_clip.training.objective import ClipObjective
from hf_clip.training.steps import ClipEmbedder, cached_accumulation_backward

MICRO_BATCHES, MICRO_BATCH_SIZE = 3, 4
NUM_PATCHES = (TINY_VIT["image_size"] // TINY_VIT["patch_size"]) ** 2
SEED = 7


def objective(loss_name: str) -> ClipObjective:
    torch.manual_seed(0)
    siglip = {"logit_bias_init_value": -10.0} if loss_name == "sigmoid" else {}
    model = HfClipModel(tiny_config(vision={**TINY_VIT, "patch_dropout": 0.5}, **siglip))
    # float64, so the comparison tests the algebra rather than fp32 summation order.
    return ClipObjective.from_name(ClipEmbedder(model).double().train(), loss_name)


def micro_batches() -> list[dict[str, torch.Tensor]]:
    size = TINY_VIT["image_size"]
    batches = []
    for index in range(MICRO_BATCHES):
        pixel_values = torch.randn(
            MICRO_BATCH_SIZE, 3, size, size, generator=torch.Generator().manual_seed(index), dtype=torch.float64
        )
        batches.append(
            {"pixel_values": pixel_values, "input_ids": random_text(MICRO_BATCH_SIZE, 8, seed=index)["input_ids"]}
        )
    return batches


def gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in module.named_parameters() if param.grad is not None}


@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid"])
def test_cached_accumulation_with_patch_dropout_equals_one_batch_under_the_same_draws(loss_name):
    # The premise of "the same draws": from one seed, the whole batch's draw of patch scores is the micro-batches'
    # draws in order (the CPU generator fills a tensor serially).
    torch.manual_seed(SEED)
    together = torch.rand(MICRO_BATCHES * MICRO_BATCH_SIZE, NUM_PATCHES)
    torch.manual_seed(SEED)
    apart = torch.cat([torch.rand(MICRO_BATCH_SIZE, NUM_PATCHES) for _ in range(MICRO_BATCHES)])
    assert torch.equal(together, apart)

    task, batches = objective(loss_name), micro_batches()
    whole = {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}
    torch.manual_seed(SEED)
    reference = task(whole).loss
    reference.backward()
    after_reference = torch.rand(4)
    reference_grads = gradients(task.embedder)
    task.embedder.zero_grad(set_to_none=True)

    torch.manual_seed(SEED)
    loss = cached_accumulation_backward(task, batches)
    # The replay leaves the run's random stream where pass 1 left it, as if nothing had been replayed.
    assert torch.equal(torch.rand(4), after_reference)
    torch.testing.assert_close(loss, reference.detach(), atol=1e-12, rtol=0)
    grads = gradients(task.embedder)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-10, rtol=0, msg=name)

    # Patch dropout is on: other draws give another loss, so the equality above depends on replaying them.
    torch.manual_seed(SEED + 1)
    with torch.no_grad():
        assert abs(float(task(whole).loss) - float(reference)) > 1e-6
