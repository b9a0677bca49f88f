"""The converter command lines end to end: source files in, a checked folder out (model, processor, README.md) that
reproduces the source. Tiny models; the text towers of the OpenAI and open_clip sources keep OpenAI's 49,408-token
vocabulary because their tokenizer comes from OpenAI's BPE file, as for real checkpoints."""

import json
import tarfile

import torch
from huggingface_hub import metadata_load
from open_clip.model import CLIP
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor, CLIPModel

from conversion import convert_open_clip, convert_openai, convert_transformers
from conversion.checks import assert_parity, clip_model_outputs, parity_inputs
from conversion.convert_transformers import to_transformers_processor
from conversion.open_clip_reference import open_clip_outputs
from conversion.testing_utils import (
    TINY_OPEN_CLIP_CONFIGS,
    randomize_,
    save_hub_folder,
    tiny_config_for,
    tiny_processor,
)
from hf_clip.foreign_configs import transformers_clip_config

FULL_VOCAB_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 1}


def _full_vocab_open_clip(family: str) -> CLIP:
    torch.manual_seed(0)
    return randomize_(CLIP(**{**TINY_OPEN_CLIP_CONFIGS[family], "text_cfg": FULL_VOCAB_TEXT}))


def _assert_folder_matches(folder, source: CLIP) -> None:
    model = AutoModel.from_pretrained(folder).eval()
    inputs = parity_inputs(model.config, seed=2)
    assert_parity(open_clip_outputs(source, inputs), clip_model_outputs(model, inputs), f"{folder} vs source")
    processor = AutoProcessor.from_pretrained(folder)
    assert len(processor.tokenizer) == 49408 and processor.tokenizer.eos_token_id == 49407
    size = model.config.vision_config.image_size
    assert processor.image_processor.crop_size == {"height": size, "width": size}
    metadata = metadata_load(folder / "README.md")
    assert metadata["pipeline_tag"] == "zero-shot-image-classification" and metadata["license"] == "mit"


def test_convert_openai_cli(tmp_path, capsys):
    source = _full_vocab_open_clip("vit")
    torch.save(source.state_dict(), tmp_path / "tiny-openai.pt")
    convert_openai.main([str(tmp_path / "tiny-openai.pt"), str(tmp_path / "out"), "--repo-id", "org/tiny"])
    output = capsys.readouterr().out
    assert "dry run: would upload to org/tiny" in output and "README.md" in output
    _assert_folder_matches(tmp_path / "out", source)
    assert "maximum absolute differences (fp32)" in (tmp_path / "out" / "README.md").read_text()


def test_convert_open_clip_cli_from_a_hub_folder_archive(tmp_path):
    source = _full_vocab_open_clip("resnet")
    model_cfg = {**TINY_OPEN_CLIP_CONFIGS["resnet"], "text_cfg": FULL_VOCAB_TEXT}
    hub = save_hub_folder(source, model_cfg, tmp_path / "hub")
    with tarfile.open(tmp_path / "hub.tar.gz", "w:gz") as archive:
        for path in hub.iterdir():
            archive.add(path, arcname=path.name)
    convert_open_clip.main([str(tmp_path / "hub.tar.gz"), str(tmp_path / "out")])
    _assert_folder_matches(tmp_path / "out", source)


def test_convert_transformers_cli_round_trip(tmp_path):
    processor = tiny_processor(image_size=32)
    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    # The source: a stock CLIPModel folder of a tiny architecture that fits the processor.
    source = randomize_(CLIPModel(transformers_clip_config(tiny_config_for(processor))))
    source.save_pretrained(tmp_path / "transformers")
    to_transformers_processor(processor).save_pretrained(tmp_path / "transformers")

    convert_transformers.main([str(tmp_path / "transformers"), str(tmp_path / "hf_clip")])
    assert json.loads((tmp_path / "hf_clip" / "config.json").read_text())["model_type"] == "hf_clip"
    convert_transformers.main([str(tmp_path / "hf_clip"), str(tmp_path / "back"), "--to-transformers"])
    original = load_file(tmp_path / "transformers" / "model.safetensors")
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[key], back[key]) for key in original)
    exported_tokenizer = AutoProcessor.from_pretrained(tmp_path / "back").tokenizer
    assert (
        type(exported_tokenizer).__name__ == "CLIPTokenizer"
        and exported_tokenizer.get_vocab() == tokenizer.get_vocab()
    )
