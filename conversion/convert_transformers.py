"""transformers `CLIPModel` ↔ hf_clip.

    python -m conversion.convert_transformers SRC OUT [--push --repo-id ORG/NAME]          # CLIPModel folder → hf_clip
    python -m conversion.convert_transformers SRC OUT --to-transformers                     # hf_clip ViT → CLIPModel

hf_clip's ViT and text towers use transformers' CLIP names, so both directions keep every tensor as it is: only
configs and processors are translated. The export writes a stock `CLIPModel` + `CLIPProcessor` folder that loads
without hf_clip. Either direction runs source and result on the same random inputs (fp32 atol=1e-5) before writing,
and checks the written folder in a fresh process (for the export: one where hf_clip cannot be imported).
"""

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from hf_clip import HfClipConfig, HfClipModel, HfClipProcessor
from hf_clip.foreign_configs import (
    TRANSFORMERS_JOINT_FIELDS,
    TRANSFORMERS_TEXT_FIELDS,
    TRANSFORMERS_VISION_FIELDS,
    transformers_clip_config,
)
from hf_clip.tokenization_hf_clip import check_tokenizer

from .checks import assert_parity, clip_model_outputs, load_strict, parity_inputs
from .key_mappings import StateDict
from .processor_from_source import clip_image_processor, tokenizer_from_folder

# transformers' original CLIP configs say eos_token_id=2, which its CLIP text model reads as "pool at the highest id".
LEGACY_EOS_TOKEN_ID = 2
# Buffers older transformers checkpoints stored; the models rebuild them.
POSITION_ID_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def hf_clip_config_from_transformers(config: CLIPConfig) -> HfClipConfig:
    """The `HfClipConfig` of a transformers `CLIPConfig` (ViT image tower)."""
    text = {name: getattr(config.text_config, name) for name in TRANSFORMERS_TEXT_FIELDS}
    if text["eos_token_id"] == LEGACY_EOS_TOKEN_ID:
        # Legacy configs pool at the highest id, which is <|endoftext|>, the last vocabulary entry.
        text.update(eos_token_id=text["vocab_size"] - 1, bos_token_id=text["vocab_size"] - 2)
    vision = {name: getattr(config.vision_config, name) for name in TRANSFORMERS_VISION_FIELDS}
    joint = {name: getattr(config, name) for name in TRANSFORMERS_JOINT_FIELDS}
    return HfClipConfig(text_config=text, vision_config={"backbone": "vit", **vision}, **joint)


def convert_transformers_state_dict(state_dict: StateDict, config: HfClipConfig) -> StateDict:
    """transformers `CLIPModel` state dict → hf_clip: the same names; stale position-id buffers dropped."""
    if config.tower_configs()[1].backbone != "vit":
        raise ValueError("a transformers CLIPModel state dict always holds a ViT image tower.")
    return {key: value for key, value in state_dict.items() if key not in POSITION_ID_BUFFERS}


def transformers_export_config(config: HfClipConfig) -> CLIPConfig:
    """The `CLIPConfig` an hf_clip model exports to. Raises `ValueError` for what a stock `CLIPModel` cannot hold: a
    ResNet image tower, or a SigLIP model's logit bias."""
    if config.logit_bias_init_value is not None:
        raise ValueError(
            "this model has a logit_bias (a SigLIP model, trained with the sigmoid loss), which transformers' "
            "CLIPModel does not have; transformers' SiglipModel is a different architecture. Publish it in hf_clip "
            "format (optionally with remote code) instead."
        )
    return transformers_clip_config(config)


def convert_hf_clip_state_dict_to_transformers(state_dict: StateDict, config: HfClipConfig) -> StateDict:
    """hf_clip ViT state dict → transformers `CLIPModel`: the same names, so the same dict (copied)."""
    transformers_export_config(config)  # raises for a ResNet or a logit bias
    return dict(state_dict)


def from_transformers(model: CLIPModel) -> tuple[HfClipModel, dict[str, float]]:
    """An hf_clip model with `model`'s weights, checked to give its outputs on random inputs."""
    config = hf_clip_config_from_transformers(model.config)
    converted = HfClipModel(config).eval()
    load_strict(converted, convert_transformers_state_dict(model.state_dict(), config), "hf_clip model")
    inputs = parity_inputs(config)
    differences = assert_parity(
        clip_model_outputs(model.eval(), inputs), clip_model_outputs(converted, inputs), "transformers → hf_clip"
    )
    return converted, differences


def to_transformers(model: HfClipModel) -> tuple[CLIPModel, dict[str, float]]:
    """A stock transformers `CLIPModel` with `model`'s weights, checked to give its outputs on random inputs."""
    exported = CLIPModel(transformers_export_config(model.config)).eval()
    load_strict(exported, convert_hf_clip_state_dict_to_transformers(model.state_dict(), model.config), "CLIPModel")
    inputs = parity_inputs(model.config)
    differences = assert_parity(
        clip_model_outputs(model.eval(), inputs), clip_model_outputs(exported, inputs), "hf_clip → transformers"
    )
    return exported, differences


def _merges(tokenizer: Any) -> list[tuple[str, str]]:
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    pairs = [merge if isinstance(merge, list) else merge.split(" ") for merge in merges]
    return [(left, right) for left, right in pairs]


def to_transformers_processor(processor: Any) -> CLIPProcessor:
    """A stock `CLIPProcessor` with the same vocabulary, merges and image settings as an `HfClipProcessor`.

    transformers' CLIPTokenizer cleans text differently from OpenAI (HTML entities, ftfy repairs), and its
    CLIPImageProcessor floors the centre-crop offset (hf_clip rounds it, as OpenAI does).
    """
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    # transformers annotates `merges` as list[str], but its tokenizers BPE backend only accepts (left, right) pairs.
    clip_tokenizer = CLIPTokenizer(vocab=tokenizer.get_vocab(), merges=_merges(tokenizer))  # type: ignore[arg-type]
    clip_tokenizer.model_max_length = tokenizer.model_max_length
    if len(clip_tokenizer) != len(tokenizer):
        raise ValueError(f"the exported tokenizer has {len(clip_tokenizer)} tokens, the source {len(tokenizer)}.")
    clip_image_processor = CLIPImageProcessor(
        size=dict(image_processor.size),
        crop_size=dict(image_processor.crop_size),
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
        resample=image_processor.resample,
    )
    return CLIPProcessor(image_processor=clip_image_processor, tokenizer=clip_tokenizer)


def export_to_transformers(model: HfClipModel, processor: Any, folder: str | Path) -> dict[str, Any]:
    """Write `model` + `processor` as a stock transformers CLIP folder, verified where hf_clip is not importable."""
    from .load_check import check_folder_loads

    exported, differences = to_transformers(model)
    clip_processor = to_transformers_processor(processor)
    exported.save_pretrained(folder)
    clip_processor.save_pretrained(folder)
    # The clean process must reproduce the hf_clip model itself, not only the in-memory CLIPModel.
    report = check_folder_loads(folder, model, mode="transformers", processor=clip_processor)
    report["export_differences"] = differences
    return report


def load_transformers_folder(folder: str | Path) -> tuple[CLIPModel, HfClipProcessor]:
    """A transformers CLIP folder's model (safetensors, or a .bin read with weights_only) and hf_clip processor."""
    folder = Path(folder)
    model = CLIPModel.from_pretrained(folder, dtype=torch.float32)
    config = hf_clip_config_from_transformers(model.config)
    # Reads preprocessor_config.json or processor_config.json (transformers 5.x); JSON only, no code.
    source_image_processor = CLIPImageProcessor.from_pretrained(folder)
    image_processor = clip_image_processor(
        config.tower_configs()[1].image_size,
        mean=source_image_processor.image_mean,
        std=source_image_processor.image_std,
        resample=source_image_processor.resample,
    )
    tokenizer = check_tokenizer(tokenizer_from_folder(folder), config)
    return model, HfClipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> None:
    from .push_to_hub import add_publish_arguments, publish_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "source", type=Path, help="a transformers CLIPModel folder (or an hf_clip one with --to-transformers)"
    )
    add_publish_arguments(parser)
    parser.add_argument("--to-transformers", action="store_true", help="export an hf_clip ViT folder to CLIPModel")
    args = parser.parse_args(argv)

    if args.to_transformers:
        from transformers import AutoProcessor

        if args.push or args.remote_code:
            raise SystemExit(
                "--to-transformers writes a stock CLIPModel folder; --push and --remote-code do not apply."
            )

        model = HfClipModel.from_pretrained(args.source, dtype=torch.float32)
        report = export_to_transformers(model, AutoProcessor.from_pretrained(args.source), args.output_dir)
        print("max |hf_clip - CLIPModel|: " + json.dumps(report["export_differences"]))
        print(f"loads without hf_clip as: {report['classes']}")
        return
    source_model, processor = load_transformers_folder(args.source)
    model, differences = from_transformers(source_model)
    print("max |CLIPModel - hf_clip|: " + json.dumps(differences))
    publish_from_args(
        model, processor, args, source=f"transformers CLIPModel folder {args.source.name}", parity=differences
    )


if __name__ == "__main__":
    main()
