"""trim_to_longest and pack_text: shapes, input checks, and exactness of the trimmed, mask-free text path for loss and
gradients (the packed path's exactness is in tests/test_packed_text.py)."""

import pytest
import torch

from hf_clip import HfClipModel
from hf_clip.data.text_batching import PackedText, pack_text, trim_to_longest
from hf_clip.testing_utils import random_text, tiny_config

LENGTHS = [5, 9, 3, 7]


def test_trim_keeps_the_longest_caption_and_every_token():
    text = random_text(4, 16, LENGTHS)
    input_ids, attention_mask = trim_to_longest(text["input_ids"], text["attention_mask"])
    assert input_ids.shape == attention_mask.shape == (4, 9)
    assert torch.equal(input_ids, text["input_ids"][:, :9])
    assert torch.equal(attention_mask.sum(dim=1), torch.tensor(LENGTHS))
    # The cut columns held nothing but padding.
    assert not text["attention_mask"][:, 9:].any()


def test_trim_rounds_up_to_a_multiple_and_caps_at_the_context():
    text = random_text(4, 16, LENGTHS)
    assert trim_to_longest(text["input_ids"], text["attention_mask"], pad_to_multiple_of=4)[0].shape[1] == 12
    assert trim_to_longest(text["input_ids"], text["attention_mask"], pad_to_multiple_of=10)[0].shape[1] == 10
    assert trim_to_longest(text["input_ids"], text["attention_mask"], pad_to_multiple_of=17)[0].shape[1] == 16


def test_trim_rejects_left_padding_mismatched_shapes_and_empty_batches():
    text = random_text(4, 16, LENGTHS)
    with pytest.raises(ValueError, match="right-padded"):
        trim_to_longest(text["input_ids"], text["attention_mask"].flip(1))
    with pytest.raises(ValueError, match="one shape"):
        trim_to_longest(text["input_ids"], text["attention_mask"][:, :8])
    with pytest.raises(ValueError, match="empty"):
        trim_to_longest(text["input_ids"], torch.zeros_like(text["attention_mask"]))
    with pytest.raises(ValueError, match="positive"):
        trim_to_longest(text["input_ids"], text["attention_mask"], pad_to_multiple_of=0)


def test_pack_keeps_every_real_token_and_no_padding():
    text = random_text(4, 16, LENGTHS)
    packed = pack_text(text["input_ids"], text["attention_mask"])
    assert isinstance(packed, PackedText)
    assert packed.input_ids.shape == packed.position_ids.shape == (1, sum(LENGTHS))
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, 5, 14, 17, 24]
    for row, length in enumerate(LENGTHS):
        start = int(packed.cu_seqlens[row])
        assert torch.equal(packed.input_ids[0, start : start + length], text["input_ids"][row, :length])
        assert packed.position_ids[0, start : start + length].tolist() == list(range(length))
    moved = packed.to("meta")
    assert all(tensor.is_meta for tensor in moved) and moved.input_ids.shape == packed.input_ids.shape


def test_pack_rejects_left_padding_empty_rows_and_mismatched_shapes():
    text = random_text(4, 16, LENGTHS)
    with pytest.raises(ValueError, match="pack_text needs right-padded"):
        pack_text(text["input_ids"], text["attention_mask"].flip(1))
    empty = text["attention_mask"].clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"rows \[2\] are empty"):
        pack_text(text["input_ids"], empty)
    with pytest.raises(ValueError, match="one shape"):
        pack_text(text["input_ids"], text["attention_mask"][:, :8])


def _loss_and_grads(model: HfClipModel, pixel_values, input_ids, attention_mask):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, return_loss=True).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# float64, so that summation order (the only legitimate difference) stays far below the tolerance and any leak of
# padding into the pooled embeddings fails. Eager attention computes its softmax in float32 (as transformers' does),
# which bounds its agreement at float32 rounding (1e-6 relative to values up to ~15).
TOLERANCE = {"sdpa": {"rtol": 0.0, "atol": 1e-10}, "eager": {"rtol": 1e-6, "atol": 1e-5}}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_trimmed_mask_free_step_matches_the_padded_masked_step(attn_implementation):
    torch.manual_seed(0)
    config = tiny_config()
    config._attn_implementation = attn_implementation
    model = HfClipModel(config).double()
    text = random_text(4, 16, LENGTHS)
    pixel_values = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    reference_loss, reference_grads = _loss_and_grads(model, pixel_values, text["input_ids"], text["attention_mask"])
    input_ids, _ = trim_to_longest(text["input_ids"], text["attention_mask"])
    loss, grads = _loss_and_grads(model, pixel_values, input_ids, None)
    tolerance = TOLERANCE[attn_implementation]
    torch.testing.assert_close(loss, reference_loss, **tolerance)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], **tolerance, msg=name)


def test_text_tower_calls_sdpa_without_a_mask_tensor(monkeypatch):
    """Unpadded (or trimmed) text reaches sdpa as attn_mask=None with is_causal=True; the image tower is not causal."""
    calls: list[tuple[int, bool, bool]] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, is_causal=False, **kwargs):
        calls.append((query.shape[-2], attn_mask is None, is_causal))
        return original(query, key, value, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    config = tiny_config()
    config._attn_implementation = "sdpa"
    model = HfClipModel(config).eval()
    text = random_text(4, 16, LENGTHS)
    pixel_values = torch.randn(4, 3, 32, 32)
    text_len, image_len = 9, (32 // 8) ** 2 + 1
    with torch.no_grad():
        model(pixel_values=pixel_values, **random_text(4, text_len))  # an all-ones mask is dropped by the tower
        model(pixel_values=pixel_values, input_ids=trim_to_longest(**text)[0])  # trimmed, mask left out
    layers = config.text_config.num_hidden_layers
    assert calls.count((text_len, True, True)) == 2 * layers
    assert calls.count((image_len, True, False)) == 2 * layers
    assert len(calls) == 4 * layers

    calls.clear()
    with torch.no_grad():
        model(pixel_values=pixel_values, **text)  # padded rows: the mask must reach sdpa
    assert calls.count((16, False, False)) == layers
