"""SigLIP: the sigmoid loss equals open_clip's, N gloo processes train exactly as one process on the global batch,
and an HfClipModel with a logit bias adds it to its logits, returns the sigmoid loss, saves and loads it, and can
gain it when a softmax checkpoint is fine-tuned; a stock CLIPModel export refuses it."""

import math

import open_clip.loss
import pytest
import torch
from distributed_harness import LOCAL_BATCH, ddp_loss_and_gradients, global_batch, gradients, make_model, run_gloo
from torch import nn

from conversion import convert_transformers
from conversion.testing_utils import randomize_, tiny_config_for, tiny_processor
from hf_clip import HfClipConfig, HfClipModel, SigLipLoss, clip_loss, sigmoid_loss
from hf_clip.testing_utils import random_text, tiny_config

SIGLIP_INIT = {"logit_scale_init_value": math.log(10), "logit_bias_init_value": -10.0}
LOGIT_BIAS = -1.0  # the tiny towers' initial bias: both signs of the logits occur, so every term has a gradient


def test_sigmoid_loss_and_gradients_equal_open_clip():
    generator = torch.Generator().manual_seed(0)
    results = []
    for implementation in ("hf_clip", "open_clip"):
        image_embeds = nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1).requires_grad_()
        text_embeds = nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1).requires_grad_()
        log_scale = torch.tensor(math.log(10.0), requires_grad=True)
        bias = torch.tensor(-2.0, requires_grad=True)
        loss_fn = SigLipLoss() if implementation == "hf_clip" else open_clip.loss.SigLipLoss()
        loss = loss_fn(image_embeds, text_embeds, log_scale.exp(), bias)
        loss.backward()
        results.append([loss.detach(), *(t.grad for t in (image_embeds, text_embeds, log_scale, bias))])
        generator.manual_seed(0)  # the same embeddings for the reference
    for ours, reference in zip(*results, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_sigmoid_loss_labels_name_the_matching_columns():
    """A rank's rows against the global columns: rows 2..3 of a square matrix with labels offset by 2 are their
    half of the square loss."""
    logits = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    top, bottom = sigmoid_loss(logits[:2]), sigmoid_loss(logits[2:], torch.tensor([2, 3]))
    torch.testing.assert_close((top + bottom) / 2, sigmoid_loss(logits), atol=1e-6, rtol=0)


def single_process_reference(world_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """open_clip's SigLipLoss on the concatenated global batch, in one process."""
    model = make_model(LOGIT_BIAS)
    images, texts = global_batch(world_size)
    loss = open_clip.loss.SigLipLoss()(*model(images, texts))
    loss.backward()
    return loss.detach(), gradients(model)


def _worker(rank: int, world_size: int) -> dict:
    results: dict = {"step": ddp_loss_and_gradients(SigLipLoss(), rank, world_size, LOGIT_BIAS)}
    images, texts = global_batch(world_size)
    try:
        SigLipLoss()(*make_model(LOGIT_BIAS)(images[: LOCAL_BATCH + rank], texts[: LOCAL_BATCH + rank]))
    except ValueError as error:
        results["uneven_error"] = str(error)
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}procs")
def distributed_results(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world_size = request.param
    return world_size, run_gloo(_worker, world_size, tmp_path_factory.mktemp(f"siglip_loss_{world_size}"))


def test_gathered_loss_equals_single_process(distributed_results):
    world_size, results = distributed_results
    reference_loss, reference_grads = single_process_reference(world_size)
    assert {"logit_scale", "logit_bias", "image.weight", "text.weight"} <= reference_grads.keys()
    for rank_results in results:
        loss, grads = rank_results["step"]
        torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=0)
        assert grads.keys() == reference_grads.keys()
        for name, grad in grads.items():
            # Each row sums a term per column, so logit_scale's gradient is about 16 here: the ranks' other
            # summation order moves it by a few float32 ulps (1.9e-6 measured).
            torch.testing.assert_close(grad, reference_grads[name], atol=5e-6, rtol=0, msg=name)


def test_uneven_local_batches_raise(distributed_results):
    _, results = distributed_results
    for rank_results in results:
        assert "SigLipLoss needs the same local batch size on every rank" in rank_results["uneven_error"]


def test_rejects_mismatched_embeddings():
    with pytest.raises(ValueError, match="matching"):
        SigLipLoss()(torch.randn(2, 4), torch.randn(3, 4), 10.0, -10.0)


def siglip_model(seed: int = 0) -> HfClipModel:
    torch.manual_seed(seed)
    return HfClipModel(tiny_config(**SIGLIP_INIT)).eval()


def model_inputs(batch_size: int = 4) -> dict[str, torch.Tensor]:
    pixel_values = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return {"pixel_values": pixel_values, **random_text(batch_size, 16, [5, 9, 3, 16][:batch_size])}


def test_model_adds_the_bias_and_returns_the_sigmoid_loss():
    model = siglip_model()
    assert model.logit_bias is not None and model.logit_bias.item() == -10.0
    assert model.logit_scale.item() == pytest.approx(math.log(10))
    with torch.no_grad():
        model.logit_bias.fill_(-3.0)  # not the initial value, so the test sees the parameter, not the config
        output = model(**model_inputs(), return_loss=True)
    scale = model.logit_scale.exp()
    expected = scale * output.text_embeds @ output.image_embeds.t() - 3.0
    torch.testing.assert_close(output.logits_per_text, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(output.logits_per_image, expected.t(), atol=1e-6, rtol=0)
    torch.testing.assert_close(output.loss, sigmoid_loss(output.logits_per_text), atol=0, rtol=0)
    reference = open_clip.loss.SigLipLoss()(output.image_embeds, output.text_embeds, scale, model.logit_bias)
    torch.testing.assert_close(output.loss, reference, atol=1e-6, rtol=0)


def test_model_without_bias_is_unchanged():
    torch.manual_seed(0)
    model = HfClipModel(tiny_config()).eval()
    assert model.logit_bias is None and "logit_bias" not in model.state_dict()
    assert model.config.logit_bias_init_value is None
    with torch.no_grad():
        output = model(**model_inputs(), return_loss=True)
    expected = model.logit_scale.exp() * output.text_embeds @ output.image_embeds.t()
    torch.testing.assert_close(output.logits_per_text, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(output.loss, clip_loss(output.logits_per_text), atol=0, rtol=0)


def test_bias_round_trips_through_save_and_load(tmp_path):
    model = siglip_model()
    with torch.no_grad():
        model.logit_bias.fill_(-7.25)  # trained away from its initial value
    model.save_pretrained(tmp_path)
    loaded = HfClipModel.from_pretrained(tmp_path)
    assert loaded.config.logit_bias_init_value == -10.0
    assert HfClipConfig.from_pretrained(tmp_path).logit_bias_init_value == -10.0
    assert loaded.logit_bias is not None and loaded.logit_bias.item() == -7.25
    saved = model.state_dict()
    assert loaded.state_dict().keys() == saved.keys()
    assert all(torch.equal(tensor, saved[name]) for name, tensor in loaded.state_dict().items())


def test_softmax_checkpoint_gains_the_bias_for_sigmoid_fine_tuning(tmp_path):
    torch.manual_seed(0)
    softmax_model = randomize_(HfClipModel(tiny_config()))
    softmax_model.save_pretrained(tmp_path)
    model = HfClipModel.from_pretrained(tmp_path, logit_bias_init_value=-10.0)
    assert model.config.logit_bias_init_value == -10.0
    assert model.logit_bias is not None and model.logit_bias.item() == -10.0
    weights = model.state_dict()
    assert weights.pop("logit_bias").item() == -10.0
    original = softmax_model.state_dict()
    assert weights.keys() == original.keys()
    assert all(torch.equal(tensor, original[name]) for name, tensor in weights.items())


def test_export_to_a_stock_clip_model_refuses_the_bias(tmp_path):
    processor = tiny_processor(image_size=32)
    config = tiny_config_for(processor)
    config.logit_bias_init_value = -10.0
    HfClipModel(config).save_pretrained(tmp_path / "siglip")
    processor.save_pretrained(tmp_path / "siglip")
    with pytest.raises(ValueError, match=r"logit_bias .*SiglipModel is a different architecture"):
        convert_transformers.main([str(tmp_path / "siglip"), str(tmp_path / "out"), "--to-transformers"])
    assert not (tmp_path / "out").exists()
