"""The tiled losses (`ClipLoss(tile_size=...)`, `SigLipLoss(tile_size=...)`) equal the dense ones: value and
gradients w.r.t. both feature sets, the temperature and the bias, for batches that are not multiples of the tile, in
float64 and float32, on one process and across 2 and 4 gloo processes; and the compiled training step stays one
graph."""

import pytest
import torch
from distributed_harness import ddp_loss_and_gradients, global_batch, gradients, make_model, run_gloo
from torch import nn

from hf_clip import ClipLoss, HfClipModel, SigLipLoss, clip_loss, sigmoid_loss
from hf_clip.data.batches import device_text
from hf_clip.testing_utils import TINY_VIT, random_text, tiny_config
from hf_clip.tiled_loss import tiled_clip_loss, tiled_sigmoid_loss
from hf_clip.training import TrainConfig
from hf_clip.training.objective import ClipObjective
from hf_clip.training.steps import ClipEmbedder

BATCH, DIM, BIAS = 37, 16, -2.0
# Relative to each tensor's largest entry: rounding only (float64), fp32 tolerance (float32).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def features(dtype: torch.dtype) -> list[torch.Tensor]:
    """Normalised images and texts, a temperature and a bias, all requiring gradients."""
    generator = torch.Generator().manual_seed(0)
    images, texts = (
        nn.functional.normalize(torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64), dim=-1)
        for _ in range(2)
    )
    # Make the pairs similar, as after some training, so the diagonal matters.
    texts = nn.functional.normalize(texts + images, dim=-1)
    scale, bias = torch.tensor(20.0, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
    return [tensor.to(dtype).requires_grad_() for tensor in (images, texts, scale, bias)]


def value_and_gradients(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [loss.detach(), *(grad for grad in grads if grad is not None)]


def relative_errors(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> list[float]:
    """Each output's largest error relative to its largest entry."""
    assert len(actual) == len(expected)
    return [
        ((got.double() - want.double()).abs().max() / want.abs().max()).item()
        for got, want in zip(actual, expected, strict=True)
    ]


def assert_relative_close(actual: list[torch.Tensor], expected: list[torch.Tensor], tolerance: float) -> None:
    for index, error in enumerate(relative_errors(actual, expected)):
        assert error <= tolerance, f"output {index}: relative error {error:.2e} > {tolerance:.0e}"


def assert_as_exact_as_dense(dense_loss, tiled_loss, num_inputs: int) -> None:
    """float64: tiled equals dense to rounding. float32: each output within 1e-5 of the float64 value (relative), or,
    where the dense float32 loss itself misses that (the temperature's gradient of well-matched pairs is a small
    difference of large sums), within 4× the dense float32 error."""
    exact = features(torch.float64)[:num_inputs]
    truth = value_and_gradients(dense_loss(*exact), exact)
    assert_relative_close(value_and_gradients(tiled_loss(*exact), exact), truth, TOLERANCE[torch.float64])
    inputs = features(torch.float32)[:num_inputs]
    dense_errors = relative_errors(value_and_gradients(dense_loss(*inputs), inputs), truth)
    tiled_errors = relative_errors(value_and_gradients(tiled_loss(*inputs), inputs), truth)
    for index, (tiled, dense) in enumerate(zip(tiled_errors, dense_errors, strict=True)):
        bound = max(TOLERANCE[torch.float32], 4 * dense)
        assert tiled <= bound, f"output {index}: relative error {tiled:.2e} > {bound:.1e} (dense: {dense:.1e})"


@pytest.mark.parametrize("tile", [1, 5, 16, 64], ids=lambda tile: f"tile{tile}")
def test_tiled_contrastive_loss_equals_dense(tile):
    assert_as_exact_as_dense(
        lambda images, texts, scale: clip_loss(scale * texts @ images.T),
        lambda images, texts, scale: tiled_clip_loss(texts, images, scale, tile),
        num_inputs=3,
    )


@pytest.mark.parametrize("tile", [1, 5, 16, 64], ids=lambda tile: f"tile{tile}")
def test_tiled_sigmoid_loss_equals_dense(tile):
    assert_as_exact_as_dense(
        lambda images, texts, scale, bias: sigmoid_loss(scale * images @ texts.T + bias),
        lambda images, texts, scale, bias: tiled_sigmoid_loss(images, texts, scale, bias, tile),
        num_inputs=4,
    )


@pytest.mark.parametrize("offset", [0, 10, 29])
def test_rows_against_wider_columns_follow_the_offset_labels(offset):
    """A rank's rows against the global columns, row i matching column offset + i, as the dense losses label them
    (the contrastive loss's image→text direction then needs every text: `ClipLoss` covers it across ranks)."""
    images, texts, scale, bias = inputs = features(torch.float64)
    rows = slice(offset, offset + 8)
    labels = torch.arange(8) + offset
    dense = value_and_gradients(sigmoid_loss(scale * images[rows] @ texts.T + bias, labels), inputs)
    tiled = value_and_gradients(tiled_sigmoid_loss(images[rows], texts, scale, bias, 3, offset), inputs)
    assert_relative_close(tiled, dense, TOLERANCE[torch.float64])


@pytest.mark.parametrize("local_loss", [True, False])
def test_tiled_classes_equal_dense_classes(local_loss):
    images, texts, scale, bias = inputs = features(torch.float32)
    dense = value_and_gradients(ClipLoss(local_loss)(images, texts, scale), inputs[:3])
    tiled = value_and_gradients(ClipLoss(local_loss, tile_size=6)(images, texts, scale), inputs[:3])
    assert_relative_close(tiled, dense, TOLERANCE[torch.float32])
    dense = value_and_gradients(SigLipLoss()(images, texts, scale, bias), inputs)
    tiled = value_and_gradients(SigLipLoss(tile_size=6)(images, texts, scale, bias), inputs)
    assert_relative_close(tiled, dense, TOLERANCE[torch.float32])


def test_tiled_losses_without_gradients_and_with_float_scale():
    images, texts = (tensor.detach() for tensor in features(torch.float64)[:2])
    with torch.no_grad():
        torch.testing.assert_close(
            tiled_sigmoid_loss(images, texts, 20.0, BIAS, 4), sigmoid_loss(20.0 * images @ texts.T + BIAS)
        )
        torch.testing.assert_close(tiled_clip_loss(texts, images, 20.0, 4), clip_loss(20.0 * texts @ images.T))


@pytest.mark.parametrize("tile_size", [0, -3, 2.5, True])
def test_bad_tile_sizes_raise(tile_size):
    with pytest.raises(ValueError, match="tile_size must be a positive integer"):
        ClipLoss(tile_size=tile_size)
    with pytest.raises(ValueError, match="tile_size must be a positive integer"):
        SigLipLoss(tile_size=tile_size)


def test_tiled_loss_refuses_the_detached_gather():
    with pytest.raises(ValueError, match="gather_with_grad=True"):
        ClipLoss(gather_with_grad=False, tile_size=8)


# Across ranks: LOCAL_BATCH (3) rows per rank, tile 2 (not a multiple of either the local or the global batch).
def _reference(loss_fn: nn.Module, world_size: int, logit_bias: float | None) -> tuple[torch.Tensor, dict]:
    model = make_model(logit_bias)
    loss = loss_fn(*model(*global_batch(world_size)))
    loss.backward()
    return loss.detach(), gradients(model)


CASES = {
    "clip_local": (lambda: ClipLoss(tile_size=2), None),
    "clip_global": (lambda: ClipLoss(local_loss=False, tile_size=2), None),
    "siglip": (lambda: SigLipLoss(tile_size=2), BIAS),
}


def _worker(rank: int, world_size: int) -> dict:
    return {
        name: ddp_loss_and_gradients(make_loss(), rank, world_size, logit_bias)
        for name, (make_loss, logit_bias) in CASES.items()
    }


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}procs")
def distributed_results(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world_size = request.param
    return world_size, run_gloo(_worker, world_size, tmp_path_factory.mktemp(f"tiled_loss_{world_size}"))


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_equals_the_dense_global_batch(distributed_results, case):
    """Each rank's (DDP-averaged) loss and gradients equal the dense loss on the whole batch in one process."""
    world_size, results = distributed_results
    dense = ClipLoss() if case.startswith("clip") else SigLipLoss()
    reference_loss, reference_grads = _reference(dense, world_size, CASES[case][1])
    for rank_results in results:
        loss, grads = rank_results[case]
        torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=1e-5)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_compiled_step_with_tiled_loss_is_one_graph(loss):
    """The tiled kernels are custom ops: dynamo keeps one graph instead of unrolling the blocks."""
    config = tiny_config(TINY_VIT)
    if loss == "sigmoid":
        config.logit_bias_init_value = BIAS
    model = HfClipModel._from_config(config, attn_implementation="sdpa").train()
    loss_fn = ClipLoss(tile_size=3) if loss == "softmax" else SigLipLoss(tile_size=3)
    objective = ClipObjective(ClipEmbedder(model), loss_fn)
    size = config.vision_config.image_size
    batch = {"pixel_values": torch.randn(8, 3, size, size), **device_text(random_text(8, 16), torch.device("cpu"))}

    def step_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return objective(batch).loss

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step_loss)(batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(step_loss, fullgraph=True, backend="aot_eager")(batch)
    torch.testing.assert_close(compiled, step_loss(batch), atol=1e-5, rtol=0)


def test_run_config_rejects_a_bad_loss_tile_size():
    with pytest.raises(ValueError, match="loss_tile_size must be positive"):
        TrainConfig(model_config="x", loss_tile_size=0).validate()
