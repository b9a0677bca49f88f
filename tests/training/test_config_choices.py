"""`Literal` fields of the run config are checked in one place, for JSON run configs too (their values reach the
dataclass without argparse's `choices`)."""

import json

import pytest

from hf_clip.training import TrainConfig
from hf_clip.training.config import parse_config


@pytest.mark.parametrize(
    ("field", "value"),
    [("image_decoding", "gpu"), ("accumulation_mode", "mean"), ("lr_scheduler", "linear"), ("mixed_precision", "fp8")],
)
def test_a_choice_outside_its_literal_is_named_from_json_and_from_python(tmp_path, field, value):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model_config": "ViT-B-32", field: value}))
    with pytest.raises(ValueError, match=f"{field} must be one of .*got '{value}'"):
        parse_config([str(path)]).validate()
    with pytest.raises(ValueError, match=f"{field} must be one of"):
        TrainConfig(model_config="ViT-B-32", **{field: value}).validate()
    with pytest.raises(SystemExit):  # the command line refuses it through argparse's choices
        parse_config(["--model_config", "ViT-B-32", f"--{field}", value])


def test_the_data_formats_come_from_the_format_table():
    with pytest.raises(ValueError, match=r"train_data_format must be one of \['webdataset', 'parquet', 'imagefolder'"):
        TrainConfig(model_config="ViT-B-32", train_data_format="tsv").validate()
