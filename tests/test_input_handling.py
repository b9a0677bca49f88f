"""Inputs that used to crash deep in torch or give silently wrong results: clear errors or correct handling."""

import pytest
import torch

from hf_clip import ClipLoss, HfClipModel, ZeroShotClassifier, clip_loss
from hf_clip.testing_utils import TINY_TEXT, random_text, tiny_config


@pytest.fixture(scope="module")
def model() -> HfClipModel:
    torch.manual_seed(0)
    return HfClipModel(tiny_config()).eval()


def test_left_padded_text_pools_at_its_own_eos(model):
    """EOS doubles as the padding token; with the mask (and matching positions) left padding changes nothing."""
    unpadded = random_text(1, 6)["input_ids"]
    padded = torch.cat([torch.full((1, 3), TINY_TEXT["eos_token_id"]), unpadded], dim=1)
    attention_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = model.get_text_features(unpadded).pooler_output
        features = model.get_text_features(padded, attention_mask, position_ids).pooler_output
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)


def test_row_whose_only_eos_is_masked_is_rejected(model):
    text = random_text(2, 8)
    text["attention_mask"][1, -1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] contain no attended end-of-text token"):
        model.get_text_features(**text)


@pytest.mark.parametrize("bad_id", [-1, TINY_TEXT["vocab_size"]])
def test_ids_outside_the_vocabulary_are_a_clear_error(model, bad_id):
    input_ids = random_text(2, 8)["input_ids"]
    input_ids[0, 3] = bad_id
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.get_text_features(input_ids)


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32)])
def test_vit_rejects_badly_shaped_pixels(model, shape):
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, height, width\)"):
        model.get_image_features(torch.zeros(shape))


def test_clip_loss_computes_in_float32_from_half_precision_embeddings():
    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(64, 32, generator=generator), dim=-1).bfloat16()
    text = torch.nn.functional.normalize(torch.randn(64, 32, generator=generator), dim=-1).bfloat16()
    loss = ClipLoss()(image, text, 100.0)
    assert loss.dtype == torch.float32
    expected = clip_loss(100.0 * text.float() @ image.float().t())
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


def test_zero_shot_classifier_refuses_a_bare_string_of_class_names():
    with pytest.raises(TypeError, match="list of strings"):
        ZeroShotClassifier(torch.zeros(3, 4), "cat")
