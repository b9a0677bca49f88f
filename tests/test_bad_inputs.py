"""Bad input is one clear error naming the problem: misspelt or impossible model config fields, a missing model
folder, a training checkpoint where a model folder belongs, a cut weights file; and a flat image folder evaluates
under the default split name."""

import json
import logging

import pytest

from hf_clip import HfClipConfig, HfClipModel, train_clip_bpe
from hf_clip.data.formats import load_split
from hf_clip.saved_folders import check_model_folder
from hf_clip.testing_utils import TINY_TEXT, TINY_VIT, random_images, tiny_config
from hf_clip.training.builders import architecture
from hf_clip.training.config import parse_config
from hf_clip.wise_ft import wise_ft_folders


def test_a_misspelt_field_in_a_user_written_model_config_is_named(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"text_config": {**TINY_TEXT, "hidden_sise": 64}, "vision_config": TINY_VIT}))
    config = parse_config(["--model_config", str(path)])
    with pytest.raises(ValueError, match=r"unknown model config keys \['text_config.hidden_sise'\].*hidden_size\?"):
        architecture(config, train_clip_bpe(["a photo of a red square"] * 4, vocab_size=600, min_frequency=1))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"text_config": {**TINY_TEXT, "hidden_size": -32}},
            r"text config sizes must be positive.*'hidden_size': -32",
        ),
        ({"text_config": {**TINY_TEXT, "num_hidden_layers": 0}}, r"'num_hidden_layers': 0"),
        ({"vision_config": {**TINY_VIT, "patch_size": 0}}, r"vision config sizes must be positive.*'patch_size': 0"),
        ({"vision_config": {**TINY_VIT, "num_attention_heads": 5}}, r"multiple of num_attention_heads \(5\)"),
        ({"projection_dim": 0}, r"joint config sizes must be positive.*'projection_dim': 0"),
        ({"vision_config": {"backbone": "resnet", "layers": [1, 1, 1, 1], "width": 0}}, r"'width': 0"),
    ],
)
def test_impossible_sizes_are_refused_when_the_config_is_built(values, message):
    with pytest.raises(Exception, match=message):
        HfClipConfig.from_user_dict({"text_config": TINY_TEXT, "vision_config": TINY_VIT, **values})


def test_a_saved_folder_from_a_newer_version_loads_with_a_warning(tmp_path, caplog):
    HfClipModel(tiny_config()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["text_config"]["newer_option"] = True
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING):
        HfClipModel.from_pretrained(tmp_path)
    assert "does not use" in caplog.text and "text_config.newer_option" in caplog.text


def test_model_folder_errors_name_the_folder_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model folder .*/runs/model does not exist"):
        check_model_folder(tmp_path / "runs" / "model")  # not "Repo id must be in the form ..."
    model = tmp_path / "model"
    HfClipModel(tiny_config()).save_pretrained(model)
    checkpoint = tmp_path / "checkpoints" / "step_00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "training_state.json").write_text('{"step": 10}')
    with pytest.raises(FileNotFoundError, match=r"--fine-tuned .*step_00000010 has no config.json.*a training checkp"):
        wise_ft_folders(model, checkpoint, [0.5], tmp_path / "out")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(OSError, match=r"model.safetensors is cut short \(\d+ bytes of \d+\)"):
        check_model_folder(model)


def test_a_flat_image_folder_is_the_split_asked_for(tmp_path):
    for index, image in enumerate(random_images(3)):
        image.save(tmp_path / f"{index}.png")
    assert len(load_split("imagefolder", [str(tmp_path)], "test")) == 3
    (tmp_path / "train").mkdir()
    (tmp_path / "validation").mkdir()
    for split in ("train", "validation"):
        random_images(1)[0].save(tmp_path / split / "0.png")
    with pytest.raises(ValueError, match=r"holds the split folders \['train', 'validation'\], not 'test'"):
        load_split("imagefolder", [str(tmp_path)], "test")
