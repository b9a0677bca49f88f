"""open_clip checkpoints → hf_clip.

    python -m conversion.convert_open_clip SRC OUT [--model-name ViT-B-32-quickgelu | --model-config cfg.json
        | --activation quick_gelu|gelu] [--push --repo-id ORG/NAME]

SRC is a training checkpoint (`epoch_N.pt`: `{"state_dict": {...}}`, keys possibly prefixed `module.` by DDP or
`_orig_mod.` by torch.compile), a Hub-style folder (`open_clip_config.json` + `open_clip_model.safetensors`), or a
tar/zip archive of such a folder. The architecture is read from the weights and cross-checked against the source's
open_clip config when it has one; the activation is not in the weights, so a bare training checkpoint needs
`--model-name`, `--model-config` or `--activation`. open_clip itself is the reference the converted model must match
at fp32 atol=1e-5 before anything is written.
"""

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from hf_clip import HfClipConfig, HfClipModel

from .architectures import architecture_of
from .convert_openai import convert_and_verify, convert_openai_state_dict, infer_openai_config
from .key_mappings import StateDict
from .open_clip_reference import hf_clip_config_from_open_clip
from .safe_loading import extract_archive, is_archive, load_torch_file

HUB_CONFIG_NAME = "open_clip_config.json"
HUB_WEIGHTS_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Wrappers open_clip's training adds to parameter names: DistributedDataParallel, then torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(checkpoint: dict[str, Any]) -> StateDict:
    """The model weights of an open_clip training checkpoint (or a bare state dict), wrapper prefixes removed."""
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, dict) or not state_dict:
        raise ValueError("the checkpoint holds no state dict (expected {'state_dict': {...}} or a flat dict).")
    unwrapped = {}
    for key, value in state_dict.items():
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        unwrapped[key] = value
    return unwrapped


def convert_open_clip_state_dict(state_dict: StateDict, config: HfClipConfig) -> StateDict:
    """Rename an open_clip state dict (OpenAI layout, wrappers allowed) to hf_clip's names, in fp32."""
    return convert_openai_state_dict(unwrap_state_dict(state_dict), config)


def config_for(state_dict: StateDict, model_cfg: dict[str, Any] | None, activation: str | None) -> HfClipConfig:
    """The architecture read from the weights, cross-checked against the source's open_clip config if it has one."""
    if model_cfg is not None:
        declared = hf_clip_config_from_open_clip(model_cfg)
        inferred = infer_openai_config(state_dict, hidden_act=declared.tower_configs()[0].hidden_act)
        if architecture_of(inferred) != architecture_of(declared):
            raise ValueError(
                "the open_clip config does not describe these weights:\n"
                f"  config:  {architecture_of(declared)}\n  weights: {architecture_of(inferred)}"
            )
        return declared
    if activation is None:
        raise ValueError(
            "a bare training checkpoint does not say whether the model uses QuickGELU or GELU (the weights are the "
            "same shape either way): pass --model-name (e.g. ViT-B-32-quickgelu), --model-config or --activation."
        )
    return infer_openai_config(state_dict, hidden_act=activation)


def load_open_clip_source(source: Path, allow_torchscript: bool = False) -> tuple[StateDict, dict[str, Any] | None]:
    """(state dict, open_clip config or None) from a training checkpoint or a Hub-style folder."""
    if source.is_dir():
        config_path = source / HUB_CONFIG_NAME
        weights = [source / name for name in HUB_WEIGHTS_NAMES if (source / name).is_file()]
        if not config_path.is_file() or not weights:
            raise FileNotFoundError(
                f"{source} is not an open_clip Hub folder ({HUB_CONFIG_NAME} + {HUB_WEIGHTS_NAMES[0]})."
            )
        hub_config = json.loads(config_path.read_text(encoding="utf-8"))
        return unwrap_state_dict(load_torch_file(weights[0])), hub_config
    return unwrap_state_dict(load_torch_file(source, allow_torchscript=allow_torchscript)), None


def convert_open_clip(
    state_dict: StateDict, model_cfg: dict[str, Any] | None = None, activation: str | None = None
) -> tuple[HfClipModel, dict[str, float]]:
    """Convert and verify against open_clip (built from the source's own config when it has one)."""
    config = config_for(state_dict, model_cfg, activation)
    return convert_and_verify(state_dict, config, model_cfg)


def main(argv: list[str] | None = None) -> None:
    from .processor_from_source import open_clip_processor
    from .push_to_hub import add_publish_arguments, publish_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="epoch_N.pt, an open_clip Hub folder, or a tar/zip archive of one")
    add_publish_arguments(parser)
    source_config = parser.add_mutually_exclusive_group()
    source_config.add_argument("--model-name", help="open_clip model config name, e.g. ViT-B-32-quickgelu")
    source_config.add_argument("--model-config", type=Path, help="JSON file with an open_clip model config")
    source_config.add_argument("--activation", choices=("quick_gelu", "gelu"), help="when no config is known")
    parser.add_argument("--bpe", type=Path, help="bpe_simple_vocab_16e6.txt.gz when the source has no vocab.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="open_clip_source_") as unpacked:
        source = extract_archive(args.source, unpacked) if is_archive(args.source) else args.source
        state_dict, hub_config = load_open_clip_source(source)
        model_cfg, preprocess_cfg = None, None
        if hub_config is not None:
            model_cfg, preprocess_cfg = hub_config["model_cfg"], hub_config.get("preprocess_cfg")
        elif args.model_name:
            import open_clip

            model_cfg = open_clip.get_model_config(args.model_name)
            if model_cfg is None:
                raise SystemExit(f"open_clip has no model config named {args.model_name!r}.")
        elif args.model_config:
            model_cfg = json.loads(args.model_config.read_text(encoding="utf-8"))
        model, differences = convert_open_clip(state_dict, model_cfg, args.activation)
        print("max |open_clip - hf_clip|: " + json.dumps(differences))
        processor = open_clip_processor(
            model.config, preprocess_cfg, folder=source if source.is_dir() else None, bpe_path=args.bpe
        )
    publish_from_args(model, processor, args, source=f"open_clip checkpoint {args.source.name}", parity=differences)


if __name__ == "__main__":
    main()
