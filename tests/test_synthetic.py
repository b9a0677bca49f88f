"""hf_clip.synthetic: token batches shaped like tokenizer output, and photo-like JPEGs."""

import io

import PIL.Image
import pytest
import torch

from hf_clip.synthetic import photo_jpegs, random_captions

BOS, EOS = 49406, 49407


def test_captions_are_bos_tokens_eos_then_zero_padding():
    input_ids, attention_mask = random_captions(64, 77, BOS, EOS, min_length=6, max_length=30)
    assert input_ids.shape == attention_mask.shape == (64, 77)
    lengths = attention_mask.sum(dim=1)
    assert int(lengths.min()) >= 6 and int(lengths.max()) <= 30
    positions = torch.arange(77)[None]
    assert torch.equal(attention_mask.bool(), positions < lengths[:, None])  # right padding, no holes
    assert (input_ids[:, 0] == BOS).all()
    assert torch.equal(input_ids[torch.arange(64), lengths - 1], torch.full((64,), EOS))
    assert (input_ids[~attention_mask.bool()] == 0).all()
    inner = input_ids[(positions > 0) & (positions < lengths[:, None] - 1)]
    assert int(inner.min()) >= 1 and int(inner.max()) < BOS  # below both special ids: any pooling rule agrees


def test_explicit_and_longest_lengths_and_bad_lengths():
    _, mask = random_captions(3, 10, BOS, EOS, lengths=[2, 10, 5])
    assert mask.sum(dim=1).tolist() == [2, 10, 5]
    _, mask = random_captions(8, 16, BOS, EOS, max_length=12, include_longest=True)
    assert int(mask[0].sum()) == 12
    generator = torch.Generator().manual_seed(1)
    first = random_captions(4, 16, BOS, EOS, generator=generator)
    again = random_captions(4, 16, BOS, EOS, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    with pytest.raises(ValueError, match="BOS and EOS"):
        random_captions(2, 16, BOS, EOS, min_length=1)
    with pytest.raises(ValueError, match="lengths must be"):
        random_captions(2, 16, BOS, EOS, lengths=[3, 17])


def test_photo_jpegs_decode_at_web_and_shard_sizes():
    sets = photo_jpegs(3, seed=0)
    web, shards = sets.values()
    assert len(web) == len(shards) == 3
    for web_jpeg, shard_jpeg in zip(web, shards, strict=True):
        big, small = PIL.Image.open(io.BytesIO(web_jpeg)), PIL.Image.open(io.BytesIO(shard_jpeg))
        assert big.format == small.format == "JPEG" and 375 <= max(big.size) <= 1024
        assert min(small.size) == 256
    assert photo_jpegs(1, seed=0) == photo_jpegs(1, seed=0)
