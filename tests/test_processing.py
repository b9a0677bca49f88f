"""HfClipProcessor, Auto-class reloading in a fresh process, and the zero-shot pipeline on a saved tiny model."""

import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoProcessor, pipeline

from hf_clip import HfClipConfig, HfClipImageProcessor, HfClipModel, HfClipProcessor, HfClipTokenizer, train_clip_bpe
from hf_clip.testing_utils import TINY_TEXT, TINY_VIT

EOS = 49407
CAPTIONS = ["a photo of a cat", "Fish &amp; Chips “served” hot", "", "dog " * 120]
LABELS = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def noise_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor() -> HfClipProcessor:
    return HfClipProcessor(image_processor=HfClipImageProcessor(), tokenizer=HfClipTokenizer.from_clip_bpe())


def test_processor_outputs(processor):
    images = [noise_image(300, 240), noise_image(224, 231, seed=1), noise_image(64, 500, seed=2), noise_image(9, 9)]
    batch = processor(text=CAPTIONS, images=images, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values"}
    # Defaults: padded to the longest caption, truncated to 77 with EOS kept last.
    assert batch["input_ids"].shape == (4, 77) and batch["pixel_values"].shape == (4, 3, 224, 224)
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths.tolist()[2:] == [2, 77]
    assert (batch["input_ids"][torch.arange(4), lengths - 1] == EOS).all()
    assert torch.equal(
        batch["input_ids"],
        processor.tokenizer(CAPTIONS, padding=True, truncation=True, return_tensors="pt")["input_ids"],
    )
    assert torch.equal(batch["pixel_values"], processor.image_processor(images, return_tensors="pt")["pixel_values"])
    short = processor(text=CAPTIONS[:2], return_tensors="pt")
    assert short["input_ids"].shape[1] < 77 and "pixel_values" not in short
    assert processor(text=CAPTIONS[:1], padding="max_length", return_tensors="pt")["input_ids"].shape == (1, 77)


@pytest.mark.parametrize(
    ("inputs", "empty"),
    [
        ({"text": []}, "text"),
        ({"images": []}, "images"),
        ({"text": [], "images": [noise_image(8, 8)]}, "text"),
        ({"text": ["a photo"], "images": []}, "images"),
    ],
)
def test_empty_lists_are_a_clear_error(processor, inputs, empty):
    with pytest.raises(ValueError, match=f"empty list of {empty}"):
        processor(**inputs, return_tensors="pt")


def test_reload_in_fresh_process_through_auto_classes(processor, tmp_path):
    """Save, then load with AutoProcessor, AutoTokenizer and AutoImageProcessor in a new interpreter: same outputs."""
    processor.save_pretrained(tmp_path / "saved")
    image = noise_image(263, 301)
    image.save(tmp_path / "image.png")
    expected = processor(text=CAPTIONS, images=image, return_tensors="pt")
    torch.save(dict(expected), tmp_path / "expected.pt")
    script = textwrap.dedent(
        """
        import sys
        import torch
        import hf_clip  # registers the Auto classes
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

        folder = sys.argv[1]
        captions = sys.argv[2:]
        expected = torch.load(folder + "/expected.pt")
        processor = AutoProcessor.from_pretrained(folder + "/saved")
        tokenizer = AutoTokenizer.from_pretrained(folder + "/saved")
        image_processor = AutoImageProcessor.from_pretrained(folder + "/saved")
        assert type(processor).__name__ == "HfClipProcessor", type(processor)
        assert type(tokenizer).__name__ == "HfClipTokenizer", type(tokenizer)
        assert type(image_processor).__name__ == "HfClipImageProcessor" and image_processor.backend == "pil"
        assert tokenizer.model_max_length == 77 and processor.tokenizer.model_max_length == 77
        assert len(tokenizer) == 49408

        image = folder + "/image.png"
        outputs = processor(text=captions, images=image, return_tensors="pt")
        for key in ("input_ids", "attention_mask", "pixel_values"):
            assert torch.equal(outputs[key], expected[key]), key
        tokens = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        assert torch.equal(tokens["input_ids"], expected["input_ids"])
        assert torch.equal(image_processor(image, return_tensors="pt")["pixel_values"], expected["pixel_values"])
        print("ok")
        """
    )
    command = [sys.executable, "-c", script, str(tmp_path), *CAPTIONS]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_zero_shot_pipeline_scores_are_softmax_of_logits(tmp_path):
    # A from-scratch setup end to end: a BPE trained on label captions sizes the tiny model's text tower.
    tokenizer = train_clip_bpe([f"a photo of a {label}." for label in LABELS] * 5, vocab_size=600)
    image_processor = HfClipImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    text_config = {
        **TINY_TEXT,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": tokenizer.model_max_length,
    }
    torch.manual_seed(0)
    model = HfClipModel(HfClipConfig(text_config=text_config, vision_config=dict(TINY_VIT), projection_dim=16)).eval()
    model.save_pretrained(tmp_path)
    HfClipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path)

    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path))
    image = noise_image(45, 37)
    results = classifier(image, candidate_labels=LABELS)

    scores = [result["score"] for result in results]
    assert sorted(result["label"] for result in results) == sorted(LABELS)
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0, abs=1e-6)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    inputs = reloaded(text=[f"This is a photo of {label}." for label in LABELS], images=image, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.softmax(dim=-1)[0]
    assert len(set(scores)) > 1, "random weights should still separate the labels"
    for result in results:
        assert result["score"] == pytest.approx(expected[LABELS.index(result["label"])].item(), abs=1e-6)
