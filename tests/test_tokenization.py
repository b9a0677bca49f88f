"""HfClipTokenizer against OpenAI's tokenizer as open_clip ships it (a required reference: no skip when missing)."""

import json
import pickle
import unicodedata

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from text_corpus import SPECIAL_LITERALS, build_corpus

from hf_clip import HfClipConfig, HfClipTokenizer, train_clip_bpe
from hf_clip import tokenization_hf_clip as tokenization

BOS, EOS = 49406, 49407
CONTEXT = 77


@pytest.fixture(scope="module")
def tokenizer() -> HfClipTokenizer:
    return HfClipTokenizer.from_clip_bpe()


@pytest.fixture(scope="module")
def reference() -> SimpleTokenizer:
    return SimpleTokenizer()


def reference_lengths(reference_ids: torch.Tensor) -> torch.Tensor:
    """Tokens up to and including EOS in open_clip's zero-padded rows (id 0 is also a real token, `!`)."""
    positions = torch.arange(reference_ids.shape[1])
    return torch.where(reference_ids == EOS, positions, -1).amax(dim=1) + 1


def test_vocabulary_is_openai_s(tokenizer, reference):
    assert len(tokenizer) == tokenizer.vocab_size == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, EOS)
    assert tokenizer.model_max_length == CONTEXT
    ours = tokenizer.get_vocab()
    # open_clip names the special tokens <start_of_text> / <end_of_text>; every other token has OpenAI's id.
    expected = {token: index for token, index in reference.encoder.items() if index < BOS}
    assert {token: index for token, index in ours.items() if index < BOS} == expected
    assert ours["<|startoftext|>"] == BOS and ours["<|endoftext|>"] == EOS


def test_ids_match_open_clip_on_hard_corpus(tokenizer, reference):
    corpus = build_corpus()
    assert len(corpus) >= 1000
    expected = reference(corpus)  # (N, 77), OpenAI's truncation, zero padding
    lengths = reference_lengths(expected)
    assert (lengths == CONTEXT).sum() >= 50, "the corpus must exercise truncation"
    assert any(literal in text for text in corpus for literal in SPECIAL_LITERALS)

    ours = tokenizer(corpus, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")
    mask = ours["attention_mask"].bool()
    assert torch.equal(mask.sum(dim=1), lengths)
    rows_equal = ((ours["input_ids"] == expected) | ~mask).all(dim=1).tolist()
    mismatched = [text for text, equal in zip(corpus, rows_equal, strict=True) if not equal]
    assert not mismatched, f"{len(mismatched)} strings differ from open_clip, e.g. {mismatched[:3]!r}"
    # Only padding differs: ours pads with <|endoftext|>, OpenAI with 0.
    assert (ours["input_ids"][~mask] == EOS).all() and (expected[~mask] == 0).all()


def test_openai_padding_on_request_gives_identical_ids(reference):
    corpus = build_corpus(seed=3, size=300)
    openai_padded = HfClipTokenizer.from_clip_bpe(pad_token="!")
    ours = openai_padded(corpus, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(ours, reference(corpus))


def test_unpadded_ids_and_truncation_keep_eos_last(tokenizer, reference):
    caption = "a photo of " + "very " * 100 + "big cat"
    ids = tokenizer(caption, truncation=True)["input_ids"]
    assert len(ids) == CONTEXT and ids[0] == BOS and ids[-1] == EOS
    assert ids == reference([caption])[0].tolist()
    assert tokenizer.encode("a photo of a cat.") == [BOS, 320, 1125, 539, 320, 2368, 269, EOS]


def test_special_tokens_in_text_are_text(tokenizer):
    for literal in ("<|endoftext|>", "<|startoftext|>", "a <|endoftext|> b"):
        ids = tokenizer(literal)["input_ids"]
        assert ids.count(EOS) == 1 and ids.count(BOS) == 1, literal
        assert ids[-1] == EOS and len(ids) > 3


def test_text_cleaning_is_openai_s(tokenizer):
    # Each pair must tokenize identically after OpenAI's cleaning (ftfy, html.unescape twice, whitespace, lower case).
    pairs = [
        ("Fish &amp;amp; Chips", "fish & chips"),
        ("“Curly” ‘quotes’", "\"curly\" 'quotes'"),
        ("ﬁne ﬂour", "fine flour"),
        ("ＦＵＬＬ　ｗｉｄｔｈ１", "full width1"),
        ("cafÃ© naÃ¯ve", "café naïve"),
        ("  many\n\tspaces \u3000 here ", "many spaces here"),
    ]
    for raw, clean in pairs:
        assert tokenization.clean_text(raw) == clean
        assert tokenizer.encode(raw) == tokenizer.encode(clean), raw


def test_empty_and_whitespace_strings(tokenizer):
    assert tokenizer("")["input_ids"] == [BOS, EOS]
    assert tokenizer(" \n\t ")["input_ids"] == [BOS, EOS]
    assert tokenizer(["", "a"], padding=True)["attention_mask"] == [[1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("bad", [None, 3, 2.5, b"bytes", [None], ["ok", 7], {"text": "x"}])
def test_non_strings_raise_clearly(tokenizer, bad):
    with pytest.raises((TypeError, ValueError), match=r"string|text"):
        tokenizer(bad)
    if bad is not None:
        with pytest.raises((TypeError, ValueError), match=r"string|text"):
            tokenizer.encode(bad)


def test_decode(tokenizer):
    ids = tokenizer("A photo of a cat, 2 dogs & a 🐈!")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat , 2 dogs & a 🐈!"


def test_save_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == CONTEXT and config["tokenizer_class"] == "HfClipTokenizer"
    reloaded = HfClipTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == 49408 and reloaded.model_max_length == CONTEXT
    corpus = build_corpus(seed=1, size=200)
    assert reloaded(corpus, truncation=True)["input_ids"] == tokenizer(corpus, truncation=True)["input_ids"]


def test_pickled_copy_tokenizes_the_same(tokenizer):
    corpus = build_corpus(seed=2, size=50)
    assert pickle.loads(pickle.dumps(tokenizer))(corpus)["input_ids"] == tokenizer(corpus)["input_ids"]


def test_folder_without_vocabulary_raises(tmp_path):
    with pytest.raises(ValueError, match="vocabulary"):
        HfClipTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "HfClipTokenizer"}))
    with pytest.raises(ValueError, match="vocabulary"):
        HfClipTokenizer.from_pretrained(tmp_path)


def test_missing_bpe_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(tokenization, "CLIP_BPE_PACKAGES", ("no_such_package_here",))
    with pytest.raises(FileNotFoundError, match="bpe_simple_vocab_16e6"):
        HfClipTokenizer.from_clip_bpe()
    with pytest.raises((FileNotFoundError, OSError)):
        HfClipTokenizer.from_clip_bpe(tmp_path / "missing.txt.gz")


def test_train_clip_bpe_on_captions(tmp_path):
    classes = [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]
    templates = ["a photo of a {}.", "a black and white photo of the {}.", "a low resolution photo of a {}"]
    captions = [template.format(name) for template in templates for name in classes] * 10
    trained = train_clip_bpe(captions, vocab_size=600)

    size = len(trained)
    assert 514 < size <= 600
    assert (trained.bos_token, trained.eos_token) == ("<|startoftext|>", "<|endoftext|>")
    assert (trained.bos_token_id, trained.eos_token_id) == (size - 2, size - 1)
    assert trained.model_max_length == CONTEXT
    assert trained.tokenize("a photo of a sneaker.") == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "sneaker</w>",
        ".</w>",
    ]
    # Unseen text still encodes through the byte alphabet: no unknown token (which would be EOS) inside.
    ids = trained("Zebra 東京 😀 <|endoftext|>")["input_ids"]
    assert ids[0] == trained.bos_token_id and ids.count(trained.eos_token_id) == 1
    assert trained.decode(ids, skip_special_tokens=True) == "zebra 東京 😀 <| endoftext |>"

    config = HfClipConfig(
        text_config={"vocab_size": size, "bos_token_id": trained.bos_token_id, "eos_token_id": trained.eos_token_id}
    )
    assert config.text_config.eos_token_id == size - 1
    trained.save_pretrained(tmp_path)
    assert HfClipTokenizer.from_pretrained(tmp_path)(captions[:5])["input_ids"] == trained(captions[:5])["input_ids"]
    with pytest.raises(ValueError, match="vocab_size"):
        train_clip_bpe(captions, vocab_size=300)


@pytest.mark.slow
def test_every_assigned_code_point_matches_open_clip(tokenizer, reference):
    # Known differences, excluded: code points unassigned in this Python's Unicode tables (newer characters, which
    # the `regex` module and the tokenizers library's regex engine may classify differently) and U+0345, which
    # OpenAI's case-insensitive pattern drops.
    code_points = [
        code for code in range(0x20000) if unicodedata.category(chr(code)) not in ("Cn", "Cs") and code != 0x345
    ]
    texts = [f"x{chr(code)}y {chr(code)}1 {chr(code)}" for code in code_points]
    ours = tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatched = [
        hex(code) for code, text, ids in zip(code_points, texts, ours, strict=True) if reference.encode(text) != ids
    ]
    assert not mismatched, mismatched[:20]
