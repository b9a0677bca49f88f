"""Text past 77 tokens: Long-CLIP's stretching of the text positions (hf_clip.modeling_long_text), the tokenizer and
processor following the model's context, explicit truncation (counted or refused), a fine-tuning run at 248 tokens,
and the embedding job's count of truncated captions."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor, AutoTokenizer

from hf_clip import HfClipConfig, HfClipImageProcessor, HfClipModel, HfClipProcessor, train_clip_bpe
from hf_clip.embedding.job import EmbedConfig, embed_dataset
from hf_clip.modeling_hf_clip import HfClipTextModelWithProjection
from hf_clip.modeling_long_text import stretched_positions
from hf_clip.synthetic import jpeg_bytes, write_webdataset_shard
from hf_clip.testing_utils import (
    TINY_IMAGE_SIZE,
    TINY_TEXT,
    TINY_VIT,
    random_images,
    tiny_clip_tokenizer,
    tiny_config,
    tiny_image_processor,
)
from hf_clip.tokenization_hf_clip import check_tokenizer, tokenize_captions
from hf_clip.training import TrainConfig, main
from hf_clip.training.builders import architecture
from hf_clip.training.run_folder import read_metrics

WORDS = ["red", "green", "blue", "white", "square", "circle", "photo", "small", "large", "bright", "dark", "striped"]
WORDS += ["dotted", "shiny"]


def caption(num_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), num_words))


@pytest.fixture(scope="module")
def tokenizer():
    # Each word once per caption, so the BPE keeps whole words rare and long captions long in tokens.
    return train_clip_bpe([caption(40, seed) for seed in range(20)], vocab_size=560, min_frequency=1)


def long_config(tokenizer, context: int = 77) -> HfClipConfig:
    text = {
        **TINY_TEXT,
        "max_position_embeddings": context,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return HfClipConfig(text_config=text, vision_config=dict(TINY_VIT), projection_dim=16)


def processor_for(model: HfClipModel, tokenizer) -> HfClipProcessor:
    check_tokenizer(tokenizer, model.config)  # model_max_length = the model's context
    return HfClipProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer)


def text_embedding(model: HfClipModel, processor: HfClipProcessor, text: str) -> torch.Tensor:
    inputs = processor(text=[text], return_tensors="pt")
    with torch.no_grad():
        return model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output[0]


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, truncation=False, verbose=False)["input_ids"])


def caption_of_tokens(tokenizer, tokens: int, seed: int = 0) -> str:
    """A caption of exactly `tokens` tokens (BOS and EOS included)."""
    text = caption(tokens, seed)
    while token_count(tokenizer, text) > tokens:
        text = text.rsplit(" ", 1)[0]
    while token_count(tokenizer, text) < tokens:
        text += " " + WORDS[len(text) % len(WORDS)]
    if token_count(tokenizer, text) != tokens:  # a word of two tokens overshot: end on a one-token word
        text = text.rsplit(" ", 1)[0] + " red"
    assert token_count(tokenizer, text) == tokens
    return text


# --- the stretch ------------------------------------------------------------------------------------------------


def test_stretch_factor_one_leaves_the_model_bitwise_unchanged(tokenizer):
    torch.manual_seed(0)
    model = HfClipModel(long_config(tokenizer)).eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    inputs = processor_for(model, tokenizer)(text=[caption(30, 1), caption(90, 2)], return_tensors="pt")
    with torch.no_grad():
        output_before = model.get_text_features(**inputs).pooler_output
    model.stretch_text_positions(77)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        # Bit patterns, not values: -0.0 == 0.0 would pass a value comparison.
        assert torch.equal(after[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    with torch.no_grad():
        assert torch.equal(model.get_text_features(**inputs).pooler_output, output_before)
    assert model.config.text_config.max_position_embeddings == 77


def long_clip_table(positions: torch.Tensor) -> torch.Tensor:
    """The 248-position table of Long-CLIP's release, written out as the authors state it: 20 positions copied,
    then for each later source position j < 76 four new ones (4 - r)/4 · PE[j] + r/4 · PE[j + 1], and the last four
    PE[76] + r/4 · (PE[76] - PE[75]). Exact arithmetic (float64), then compared at float32."""
    pe = positions.double()
    rows = [pe[i] for i in range(20)]
    for j in range(20, 76):
        rows += [(4 - r) / 4 * pe[j] + r / 4 * pe[j + 1] for r in range(4)]
    rows += [pe[76] + r / 4 * (pe[76] - pe[75]) for r in range(4)]
    return torch.stack(rows)


def test_stretch_to_248_keeps_20_positions_and_interpolates_as_long_clip(tokenizer):
    torch.manual_seed(0)
    model = HfClipModel(long_config(tokenizer))
    original = model.text_model.embeddings.position_embedding.weight.detach().clone()
    model.stretch_text_positions(248)
    stretched = model.text_model.embeddings.position_embedding.weight.detach()
    assert stretched.shape == (248, original.shape[1]) and stretched.dtype == original.dtype
    assert torch.equal(stretched[:20], original[:20])
    expected = long_clip_table(original)
    assert expected.shape == stretched.shape
    torch.testing.assert_close(stretched.double(), expected, rtol=0, atol=1e-7)
    # The rule moves every later position: position 21 is 3/4 · PE[20] + 1/4 · PE[21], not PE[21].
    assert not torch.equal(stretched[21], original[21])
    assert torch.equal(model.text_model.embeddings.position_ids, torch.arange(248)[None])
    assert model.text_model.embeddings.position_embedding.weight.requires_grad


def test_stretch_by_a_fractional_factor_matches_the_rule_computed_directly():
    positions = torch.randn(77, 8, generator=torch.Generator().manual_seed(0))
    new_length, kept = 100, 20
    factor = (new_length - kept) / (77 - kept)
    rows = []
    for p in range(new_length):
        if p < kept:
            rows.append(positions[p].double())
            continue
        x = kept + (p - kept) / factor
        i = min(int(np.floor(x)), 75)
        w = x - i
        rows.append((1 - w) * positions[i].double() + w * positions[i + 1].double())
    torch.testing.assert_close(
        stretched_positions(positions, new_length).double(), torch.stack(rows), rtol=0, atol=1e-6
    )
    # bfloat16 in, bfloat16 out (computed in float32).
    assert stretched_positions(positions.bfloat16(), new_length).dtype == torch.bfloat16


def test_lengths_the_rule_cannot_stretch_to_are_clear_errors(tokenizer):
    model = HfClipModel(long_config(tokenizer))
    with pytest.raises(ValueError, match="cannot stretch the text positions to 64: the model reads 77 tokens"):
        model.stretch_text_positions(64)
    with pytest.raises(TypeError, match="must be an int"):
        model.stretch_text_positions(248.0)  # type: ignore[arg-type]
    assert model.config.text_config.max_position_embeddings == 77  # nothing changed
    tiny = HfClipModel(tiny_config())  # 16 positions: fewer than Long-CLIP's 20 kept + 2
    with pytest.raises(ValueError, match=r"keeps the first 20 positions.*16 positions needs at least 22"):
        tiny.stretch_text_positions(40)
    tiny.stretch_text_positions(40, kept=4)
    assert tiny.text_model.embeddings.position_embedding.num_embeddings == 40


def test_a_200_token_caption_changes_the_embedding_where_a_77_token_cut_would_not(tokenizer):
    torch.manual_seed(0)
    model = HfClipModel(long_config(tokenizer)).eval()
    head = caption_of_tokens(tokenizer, 77)  # BOS, 75 tokens, EOS: what the 77-token cut keeps of the captions below
    long_caption = head + " " + caption_of_tokens(tokenizer, 125, seed=1)  # 75 + 123 tokens, BOS and EOS: 200
    variant = head + " " + caption_of_tokens(tokenizer, 125, seed=2)  # the same head, another tail
    assert token_count(tokenizer, long_caption) == 200
    short = caption_of_tokens(tokenizer, 15)

    at_77 = processor_for(model, tokenizer)
    cut = text_embedding(model, at_77, head)
    # At 77 tokens everything after the head is cut: all three embed identically.
    assert torch.equal(text_embedding(model, at_77, long_caption), cut)
    assert torch.equal(text_embedding(model, at_77, variant), cut)
    short_before = text_embedding(model, at_77, short)

    model.stretch_text_positions(248)
    at_248 = processor_for(model, tokenizer)
    assert at_248.tokenizer.model_max_length == 248
    assert at_248(text=[long_caption], return_tensors="pt")["input_ids"].shape[-1] == 200
    full = text_embedding(model, at_248, long_caption)
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(full, text_embedding(model, at_248, head), dim=0) < 0.999
    assert cosine(full, text_embedding(model, at_248, variant), dim=0) < 0.999
    # A caption within the 20 kept positions sees the same positions: its embedding is unchanged, bit for bit.
    assert torch.equal(text_embedding(model, at_248, short), short_before)


def test_stretched_folder_round_trips_through_the_auto_classes(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = HfClipModel(long_config(tokenizer)).eval()
    model.stretch_text_positions(248)
    processor = processor_for(model, tokenizer)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["max_position_embeddings"] == 248

    assert AutoConfig.from_pretrained(tmp_path).text_config.max_position_embeddings == 248
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, HfClipModel)
    assert loaded_processor.tokenizer.model_max_length == AutoTokenizer.from_pretrained(tmp_path).model_max_length
    assert loaded_processor.tokenizer.model_max_length == 248
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(loaded.text_model.embeddings.position_ids, torch.arange(248)[None])
    text = caption_of_tokens(tokenizer, 200)
    # Loaded, the model may pick another attention backend (sdpa): equal up to summation order.
    torch.testing.assert_close(
        text_embedding(loaded, loaded_processor, text), text_embedding(model, processor, text), rtol=0, atol=1e-6
    )


def test_the_text_tower_models_stretch_and_record_their_length(tokenizer):
    text_config = long_config(tokenizer).text_config
    tower = HfClipTextModelWithProjection(text_config)
    tower.stretch_text_positions(120)
    assert tower.config.max_position_embeddings == tower.text_model.config.max_position_embeddings == 120
    ids = tokenizer([caption_of_tokens(tokenizer, 110)], return_tensors="pt", max_length=120, truncation=True)
    assert tower(**ids).text_embeds.shape == (1, 16)


# --- explicit truncation ----------------------------------------------------------------------------------------


def test_truncated_captions_are_counted_exactly_or_refused(tokenizer, caplog):
    tokenizer.model_max_length = 77
    captions = [caption_of_tokens(tokenizer, n, seed=n) for n in (10, 76, 77, 78, 200)]
    tokens, truncated = tokenize_captions(tokenizer, captions)
    assert truncated == 2  # 78 and 200; exactly 77 fits
    assert tokens["input_ids"].shape == (5, 77)
    assert (tokens["input_ids"][:, -1] == tokenizer.eos_token_id).all()  # the cut keeps EOS last
    with pytest.raises(
        ValueError, match=r"longer than the 77 tokens the model reads \(2 in all; row: tokens \{3: 78, 4: 200\}\)"
    ):
        tokenize_captions(tokenizer, captions, on_overflow="error")

    processor = HfClipProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer)
    with caplog.at_level(logging.WARNING, logger="hf_clip.processing_hf_clip"):
        processor(text=captions, return_tensors="pt")
    assert "2 of 5 captions were longer than 77 tokens and were truncated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_clip.processing_hf_clip"):
        processor(text=captions[:3], return_tensors="pt")
    assert not caplog.text  # nothing cut, nothing logged
    with pytest.raises(ValueError, match=r"\(1 in all; row: tokens \{0: 200\}\)"):
        processor(text=captions[4], on_overflow="error")
    with pytest.raises(ValueError, match="on_overflow must be one of"):
        processor(text=captions, on_overflow="ignore")  # type: ignore[arg-type]
    assert processor(text=captions[:3], on_overflow="error", return_tensors="pt")["input_ids"].shape == (3, 77)


# --- training and embedding at the new length -------------------------------------------------------------------


def write_shard(path: Path, captions: list[str]) -> None:
    images = random_images(len(captions), seed=3, size=(40, 36))
    write_webdataset_shard(
        path,
        (
            (f"s{i:03d}", {"jpg": jpeg_bytes(image), "txt": text.encode()})
            for i, (image, text) in enumerate(zip(images, captions, strict=True))
        ),
    )


def test_fine_tuning_at_248_tokens_trains_the_stretched_positions_and_saves(tokenizer, tmp_path):
    torch.manual_seed(0)
    start = tmp_path / "start"
    HfClipModel(long_config(tokenizer)).save_pretrained(start)
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(start)
    image_size = {"shortest_edge": TINY_IMAGE_SIZE}
    HfClipImageProcessor(
        size=image_size, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    ).save_pretrained(start)
    lengths = [30, 150, 200, 300, 60, 248, 249, 120, 90, 400, 210, 40]  # tokens; 3 exceed 248
    write_shard(tmp_path / "train.tar", [caption_of_tokens(tokenizer, n, seed=i) for i, n in enumerate(lengths)])

    with pytest.raises(ValueError, match="cannot stretch the text positions to 64: the model reads 77 tokens"):
        architecture(TrainConfig(model_name_or_path=str(start), text_context_length=64), tokenizer)
    assert (
        architecture(
            TrainConfig(model_config="ViT-B-32", text_context_length=248), tokenizer
        ).text_config.max_position_embeddings
        == 248
    )

    output = tmp_path / "run"
    main([
        "--model_name_or_path", str(start), "--text_context_length", "248", "--output_dir", str(output),
        "--train_data_files", str(tmp_path / "train.tar"), "--shuffle_buffer", "0",
        "--per_device_batch_size", "4", "--max_steps", "3", "--warmup_steps", "0", "--learning_rate", "1e-3",
        "--logging_steps", "1", "--log_with", "none",
    ])  # fmt: skip
    records = read_metrics(output)
    # Unshuffled, one process: step k has trained the first 4k captions; the count is cumulative.
    assert (
        [record["truncated_captions"] for record in records]
        == [sum(n > 248 for n in lengths[: 4 * step]) for step in (1, 2, 3)]
        == [1, 2, 3]
    )

    tuned = AutoModel.from_pretrained(output / "model")
    assert tuned.config.text_config.max_position_embeddings == 248
    assert AutoProcessor.from_pretrained(output / "model").tokenizer.model_max_length == 248
    initial = HfClipModel.from_pretrained(start)
    initial.stretch_text_positions(248)
    trained_table = tuned.text_model.embeddings.position_embedding.weight
    initial_table = initial.text_model.embeddings.position_embedding.weight
    # Positions past 77 received gradient: the captions reached them.
    assert not torch.equal(trained_table[77:200], initial_table[77:200])


def test_embedding_job_counts_truncated_captions_and_follows_the_model_context(tmp_path):
    tokenizer = tiny_clip_tokenizer()  # one token per character, 16-token context
    torch.manual_seed(0)
    model = HfClipModel(tiny_config())
    image_size = {"shortest_edge": TINY_IMAGE_SIZE}
    image_processor = HfClipImageProcessor(
        size=image_size, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    )
    # 4, 16 (fits exactly), 17 and 30 tokens with BOS and EOS.
    captions = ["ab", "abcdefghijklmn", "abcdefghijklmno", "abcdefghijklmnopqrstuvwxyzab"]
    write_shard(tmp_path / "data.tar", captions)

    def embed(folder: Path, output: str) -> dict:
        config = EmbedConfig(
            model=str(folder), data_format="webdataset", data_files=[str(tmp_path / "data.tar")],
            output_dir=str(tmp_path / output), embed=["image", "text"], text_column="txt", num_workers=0,
        )  # fmt: skip
        return embed_dataset(config)

    for folder, context in (("context16", None), ("context40", 40)):
        if context is not None:
            model.stretch_text_positions(context, kept=4)
        model.save_pretrained(tmp_path / folder)
        tokenizer.save_pretrained(tmp_path / folder)  # saved at 16: the job follows the model instead
        image_processor.save_pretrained(tmp_path / folder)
    assert embed(tmp_path / "context16", "out16")["truncated_captions"] == 2
    summary = embed(tmp_path / "context40", "out40")
    assert summary["truncated_captions"] == 0
    # The 30-token caption is embedded whole at 40 tokens.
    from hf_clip.embedding.layout import load_embeddings

    embeddings, _ = load_embeddings(tmp_path / "out40", "text")
    stretched = AutoModel.from_pretrained(tmp_path / "context40").eval()
    ids = tokenizer([captions[3]], return_tensors="pt", truncation=False)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(stretched.get_text_features(**ids).pooler_output, dim=-1)
    np.testing.assert_allclose(embeddings[3], expected[0].numpy(), atol=1e-3)  # float16 output
