"""OpenAI CLIP checkpoints → hf_clip.

    python -m conversion.convert_openai ViT-B-32.pt OUT [--bpe bpe_simple_vocab_16e6.txt.gz] [--allow-torchscript]
        [--push --repo-id ORG/NAME]

The source is an OpenAI-layout state dict (`torch.save(model.state_dict())`, a `.safetensors` file, or OpenAI's
original TorchScript archive behind `--allow-torchscript`). The architecture is read from the weights the way
OpenAI's `clip.model.build_model` does, named after the published architecture it equals
(`HfClipConfig.from_architecture`), and the converted model must reproduce open_clip's outputs for the source weights
at fp32 atol=1e-5 before anything is written.
"""

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from hf_clip import HfClipConfig, HfClipModel
from hf_clip.foreign_configs import open_clip_model_cfg

from .checks import assert_parity, clip_model_outputs, load_strict, parity_inputs
from .key_mappings import OPENAI_METADATA_KEYS, StateDict, openai_to_hf_clip
from .open_clip_reference import build_open_clip_model, open_clip_outputs

# Every attention head in OpenAI's transformers is 64 wide; OpenAI's loader derives head counts from it.
HEAD_WIDTH = 64


def _count_blocks(state_dict: StateDict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({match.group(1) for key in state_dict if (match := regex.match(key))})


def _grid_side(num_positions: int, what: str) -> int:
    side = math.isqrt(num_positions - 1)
    if side * side + 1 != num_positions:
        raise ValueError(f"{what} has {num_positions} positions, not a square grid plus one class position.")
    return side


def infer_openai_config(state_dict: StateDict, hidden_act: str = "quick_gelu") -> HfClipConfig:
    """The architecture of an OpenAI-layout state dict, read as OpenAI's `build_model` reads it.

    ViT iff `visual.proj` exists; ResNet stage depths from the `visual.layer{i}.{j}` names; heads = width / 64
    (ResNet attention pool: width * 32 / 64); resolution from the positional-embedding size. The activation is not in
    the weights: OpenAI trained every model with QuickGELU; open_clip's non-`-quickgelu` models use GELU.
    """
    for key in ("text_projection", "token_embedding.weight", "positional_embedding", "ln_final.weight"):
        if key not in state_dict:
            raise ValueError(f"not an OpenAI-layout CLIP state dict: {key!r} is missing.")
    text_width = state_dict["ln_final.weight"].shape[0]
    vocab_size = state_dict["token_embedding.weight"].shape[0]
    embed_dim = state_dict["text_projection"].shape[1]
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": text_width,
        "intermediate_size": state_dict["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": _count_blocks(state_dict, r"transformer\.resblocks\.(\d+)\."),
        "num_attention_heads": text_width // HEAD_WIDTH,
        "max_position_embeddings": state_dict["positional_embedding"].shape[0],
        "projection_dim": embed_dim,
        "hidden_act": hidden_act,
        # OpenAI's vocabulary ends in <|startoftext|>, <|endoftext|>; the text tower pools at the highest id.
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": 0,
    }
    vision_config: dict[str, Any]
    if "visual.proj" in state_dict:
        vision_width, _, patch_size, _ = state_dict["visual.conv1.weight"].shape
        grid = _grid_side(state_dict["visual.positional_embedding"].shape[0], "visual.positional_embedding")
        vision_config = {
            "backbone": "vit",
            "hidden_size": vision_width,
            "intermediate_size": state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": _count_blocks(state_dict, r"visual\.transformer\.resblocks\.(\d+)\."),
            "num_attention_heads": vision_width // HEAD_WIDTH,
            "image_size": patch_size * grid,
            "patch_size": patch_size,
            "projection_dim": embed_dim,
            "hidden_act": hidden_act,
        }
    else:
        if "visual.attnpool.positional_embedding" not in state_dict:
            raise ValueError("the state dict has neither `visual.proj` (ViT) nor `visual.attnpool` (ResNet).")
        width = state_dict["visual.layer1.0.conv1.weight"].shape[0]
        grid = _grid_side(state_dict["visual.attnpool.positional_embedding"].shape[0], "visual.attnpool")
        vision_config = {
            "backbone": "resnet",
            "layers": [_count_blocks(state_dict, rf"visual\.layer{stage}\.(\d+)\.") for stage in range(1, 5)],
            "width": width,
            "num_attention_heads": width * 32 // HEAD_WIDTH,
            "image_size": grid * 32,
            "projection_dim": embed_dim,
        }
    return HfClipConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim)


def convert_openai_state_dict(state_dict: StateDict, config: HfClipConfig) -> StateDict:
    """Rename an OpenAI-layout state dict to hf_clip's names, in fp32 (OpenAI's archives are partly fp16).

    OpenAI's metadata entries (`input_resolution`, `context_length`, `vocab_size`) are dropped; every other entry
    must be consumed by the key tables for `config`, or a `ValueError` names the leftovers.
    """
    weights = {key: value for key, value in state_dict.items() if key not in OPENAI_METADATA_KEYS}
    return {key: value.float() for key, value in openai_to_hf_clip(weights, config).items()}


def convert_and_verify(
    state_dict: StateDict, config: HfClipConfig, model_cfg: dict[str, Any] | None = None
) -> tuple[HfClipModel, dict[str, float]]:
    """Convert an OpenAI-layout state dict, load it strictly and check it against open_clip on random inputs.

    `model_cfg` is the source's own open_clip config when it has one; by default it is derived from `config`.
    Returns the fp32 model in eval mode and the max |differences| of image features, text features and logits.
    """
    model = HfClipModel(config).eval()
    load_strict(model, convert_openai_state_dict(state_dict, config), "hf_clip model")
    weights = {key: value for key, value in state_dict.items() if key not in OPENAI_METADATA_KEYS}
    reference = build_open_clip_model(model_cfg or open_clip_model_cfg(config), weights)
    inputs = parity_inputs(config)
    differences = assert_parity(
        open_clip_outputs(reference, inputs), clip_model_outputs(model, inputs), "OpenAI → hf_clip"
    )
    return model, differences


def main(argv: list[str] | None = None) -> None:
    from .architectures import published_architecture
    from .processor_from_source import openai_processor
    from .push_to_hub import add_publish_arguments, publish_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="OpenAI state dict (.pt/.bin/.safetensors) or TorchScript archive")
    add_publish_arguments(parser)
    parser.add_argument("--bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz (default: the copy open_clip ships)")
    parser.add_argument("--allow-torchscript", action="store_true", help="load OpenAI's TorchScript .pt archives")
    args = parser.parse_args(argv)

    from .safe_loading import load_torch_file

    state_dict = load_torch_file(args.source, allow_torchscript=args.allow_torchscript)
    config = infer_openai_config(state_dict)
    print(f"architecture: {published_architecture(config) or 'custom (equal to no published architecture)'}")
    model, differences = convert_and_verify(state_dict, config)
    print("max |open_clip - hf_clip|: " + json.dumps(differences))
    processor = openai_processor(config, bpe_path=args.bpe)
    publish_from_args(model, processor, args, source=f"OpenAI checkpoint {args.source.name}", parity=differences)


if __name__ == "__main__":
    main()
