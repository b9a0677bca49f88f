"""ClipLoss: N gloo processes give exactly the single-process loss and gradients on the concatenated batch."""

import pytest
import torch
import torch.distributed as dist
from distributed_harness import (
    EMBED_DIM,
    LOCAL_BATCH,
    ddp_loss_and_gradients,
    global_batch,
    gradients,
    local_rows,
    make_model,
    run_gloo,
)
from torch import nn

from hf_clip import ClipLoss, clip_loss


def single_process_reference(world_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = make_model()
    images, texts = global_batch(world_size)
    image_embeds, text_embeds, scale = model(images, texts)
    loss = clip_loss(scale * text_embeds @ image_embeds.t())
    loss.backward()
    return loss.detach(), gradients(model)


VARIANTS = {
    "local": {"local_loss": True, "gather_with_grad": True},
    "global": {"local_loss": False, "gather_with_grad": True},
    "detached": {"local_loss": True, "gather_with_grad": False},
}


def _worker(rank: int, world_size: int) -> dict:
    results: dict = {
        name: ddp_loss_and_gradients(ClipLoss(**kwargs), rank, world_size) for name, kwargs in VARIANTS.items()
    }
    images, texts = global_batch(world_size)
    model = make_model()
    try:
        ClipLoss()(*model(images[: LOCAL_BATCH + rank], texts[: LOCAL_BATCH + rank]))
    except ValueError as error:
        results["uneven_error"] = str(error)
    rows = local_rows(rank)
    results.update(_batch_size_checks(images[rows], texts[rows]))
    return results


def _batch_size_checks(images: torch.Tensor, texts: torch.Tensor) -> dict:
    """How often one ClipLoss compares the ranks' batch sizes over three steps, and the error when they change."""
    loss_fn, towers, size_checks = ClipLoss(), make_model(), []
    all_gather = dist.all_gather  # the size check's collective (the features go through the autograd all-gather)

    def counted_all_gather(*args, **kwargs):
        size_checks.append(1)
        return all_gather(*args, **kwargs)

    dist.all_gather = counted_all_gather
    try:
        with torch.no_grad():
            for _ in range(3):
                loss_fn(*towers(images, texts))
    finally:
        dist.all_gather = all_gather
    results = {"size_checks": len(size_checks)}
    try:  # every rank's batch shrinks: each raises on its own, with no collective left waiting
        loss_fn(*towers(images[:-1], texts[:-1]))
    except ValueError as error:
        results["changed_error"] = str(error)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}procs")
def distributed_results(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world_size = request.param
    return world_size, run_gloo(_worker, world_size, tmp_path_factory.mktemp(f"clip_loss_{world_size}"))


@pytest.mark.parametrize("variant", ["local", "global"])
def test_gathered_loss_equals_single_process(distributed_results, variant):
    world_size, results = distributed_results
    reference_loss, reference_grads = single_process_reference(world_size)
    for rank_results in results:
        loss, grads = rank_results[variant]
        torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=0)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=0, msg=name)


def test_detached_gather_loses_the_negatives_gradient(distributed_results):
    world_size, results = distributed_results
    reference_loss, reference_grads = single_process_reference(world_size)
    loss, grads = results[0]["detached"]
    # The forward value is the same; the encoders' gradients are not (logit_scale's still is).
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(grads["logit_scale"], reference_grads["logit_scale"], atol=1e-6, rtol=0)
    for name in ("image.weight", "text.weight"):
        assert (grads[name] - reference_grads[name]).abs().max() > 1e-3, name


def test_uneven_local_batches_raise(distributed_results):
    _, results = distributed_results
    assert all("same local batch size" in rank_results["uneven_error"] for rank_results in results)


def test_batch_sizes_are_compared_once_then_checked_locally(distributed_results):
    _, results = distributed_results
    for rank_results in results:
        assert rank_results["size_checks"] == 1
        assert "were compared at 3, this call has 2" in rank_results["changed_error"]


def test_single_process_without_process_group_is_clip_loss():
    model = make_model()
    images, texts = global_batch(2)
    image_embeds, text_embeds, scale = model(images, texts)
    expected = clip_loss(scale * text_embeds @ image_embeds.t())
    for kwargs in VARIANTS.values():
        torch.testing.assert_close(ClipLoss(**kwargs)(image_embeds, text_embeds, scale), expected, atol=1e-7, rtol=0)


def test_rejects_bad_inputs():
    embeds = nn.functional.normalize(torch.randn(1, EMBED_DIM), dim=-1)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        ClipLoss()(embeds, embeds, 10.0)
    with pytest.raises(ValueError, match="matching"):
        ClipLoss()(torch.randn(2, 4), torch.randn(3, 4), 10.0)
