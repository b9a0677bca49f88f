"""WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"): mix a zero-shot CLIP and its
fine-tuned copy in weight space, θ = (1 - α)·θ_zero_shot + α·θ_fine_tuned.

    hf-clip-wise-ft --zero-shot out/vit-b32 --fine-tuned out/vit-b32-ft --alpha 0.5 --output-dir out/wise-0.5
    hf-clip-wise-ft --zero-shot out/vit-b32 --fine-tuned out/vit-b32-ft --alpha 0.25 0.5 0.75 --output-dir out/wise

One α writes OUTPUT_DIR; several write OUTPUT_DIR/alpha_0.25, OUTPUT_DIR/alpha_0.50, ... from one load of each
checkpoint. Each folder holds the mixed model and the fine-tuned folder's processor (the zero-shot folder's when the
fine-tuned one has none), so it loads with `AutoModel`, `AutoProcessor` and
`pipeline("zero-shot-image-classification")`. The paper's fixed choice is α = 0.5; α = 0 gives the zero-shot model
and α = 1 the fine-tuned one, bit for bit.
"""

import argparse
import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, PreTrainedConfig

from .modeling_hf_clip import HfClipModel
from .saved_folders import check_model_folder

# Config fields that record where and how a checkpoint was saved or loaded, or how it was trained (patch dropout
# acts in training mode only), not what it computes.
BOOKKEEPING_FIELDS = frozenset(
    {"_name_or_path", "_commit_hash", "transformers_version", "dtype", "torch_dtype", "architectures", "patch_dropout"}
)
# A folder holds a processor when it has one of these (transformers 5 writes the first, earlier releases the second).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:  # also rejects NaN
        raise ValueError(f"alpha must lie in [0, 1] (0: the zero-shot weights, 1: the fine-tuned ones), got {alpha}.")


def state_dict_difference(zero_shot: Mapping[str, torch.Tensor], fine_tuned: Mapping[str, torch.Tensor]) -> str | None:
    """The first key, shape or dtype in which the two state dicts differ, described; None when they match."""
    for name in zero_shot:
        if name not in fine_tuned:
            return f"key {name!r} is in the zero-shot state dict but not in the fine-tuned one"
    for name in fine_tuned:
        if name not in zero_shot:
            return f"key {name!r} is in the fine-tuned state dict but not in the zero-shot one"
    for name, tensor in zero_shot.items():
        other = fine_tuned[name]
        if tensor.shape != other.shape:
            return f"{name!r} has shape {tuple(tensor.shape)} (zero-shot) vs {tuple(other.shape)} (fine-tuned)"
        if tensor.dtype != other.dtype:
            return f"{name!r} has dtype {tensor.dtype} (zero-shot) vs {other.dtype} (fine-tuned)"
    return None


def config_differences(
    zero_shot: Mapping[str, Any], fine_tuned: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """(field dotted through sub-configs, zero-shot value, fine-tuned value) for every differing config field,
    bookkeeping fields left out."""
    differences = []
    for name in dict.fromkeys([*zero_shot, *fine_tuned]):
        if name in BOOKKEEPING_FIELDS:
            continue
        value, other = zero_shot.get(name), fine_tuned.get(name)
        if isinstance(value, Mapping) and isinstance(other, Mapping):
            differences += config_differences(value, other, f"{prefix}{name}.")
        elif value != other:
            differences.append((f"{prefix}{name}", value, other))
    return differences


def config_difference(zero_shot: PreTrainedConfig, fine_tuned: PreTrainedConfig) -> str | None:
    """The first differing config field with both values, and the names of the others; None when the configs
    match apart from bookkeeping."""
    differences = config_differences(zero_shot.to_dict(), fine_tuned.to_dict())
    if not differences:
        return None
    (name, value, other), *rest = differences
    also = f" (also differing: {', '.join(field for field, _, _ in rest)})" if rest else ""
    return f"config field {name} is {value!r} (zero-shot) vs {other!r} (fine-tuned){also}"


def interpolate_state_dicts(
    zero_shot: Mapping[str, torch.Tensor], fine_tuned: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """`torch.lerp(zero_shot, fine_tuned, alpha)` for every floating tensor, BatchNorm running statistics included.

    Generic over the keys: any two state dicts with the same keys, shapes and dtypes mix (a ValueError names the
    first difference). `torch.lerp` is exact at the ends: α = 0 returns the zero-shot tensors and α = 1 the
    fine-tuned ones, equal value for value (finite values; a stored -0.0 comes back as +0.0 at α = 0).

    Integer and boolean tensors (BatchNorm's `num_batches_tracked`) cannot be mixed: they are copied from the nearer
    end, the zero-shot dict for α < 0.5 and the fine-tuned one for α ≥ 0.5. Every returned tensor is new memory, so
    changing it never changes the inputs.
    """
    check_alpha(alpha)
    difference = state_dict_difference(zero_shot, fine_tuned)
    if difference is not None:
        raise ValueError(f"cannot interpolate checkpoints of different architectures: {difference}.")
    nearer = zero_shot if alpha < 0.5 else fine_tuned
    return {
        name: torch.lerp(tensor, fine_tuned[name], alpha) if tensor.is_floating_point() else nearer[name].clone()
        for name, tensor in zero_shot.items()
    }


def wise_ft(zero_shot_model: HfClipModel, fine_tuned_model: HfClipModel, alpha: float) -> HfClipModel:
    """A new model, in eval mode, holding `interpolate_state_dicts` of the two models' weights and the fine-tuned
    model's config; the inputs are left untouched. The models must share the architecture: the same state-dict
    keys, shapes and dtypes and equal configs apart from bookkeeping fields (`BOOKKEEPING_FIELDS`), else a
    ValueError names the first difference (a config check catches what shapes cannot, e.g. another activation)."""
    check_alpha(alpha)
    difference = config_difference(zero_shot_model.config, fine_tuned_model.config)
    if difference is not None:
        raise ValueError(f"cannot interpolate checkpoints of different architectures: {difference}.")
    state_dict = interpolate_state_dicts(zero_shot_model.state_dict(), fine_tuned_model.state_dict(), alpha)
    # Built on the inputs' device so the non-persistent buffers the model makes itself sit beside the weights.
    with torch.device(fine_tuned_model.device):
        model = HfClipModel(copy.deepcopy(fine_tuned_model.config))
    # assign=True keeps the mixed tensors (their dtype too) instead of copying them into the fresh fp32 ones.
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def alpha_folder_name(alpha: float) -> str:
    """`alpha_0.50`; a value with more than two decimals keeps them all (`alpha_0.125`), so names never collide."""
    return f"alpha_{alpha:.2f}" if float(f"{alpha:.2f}") == alpha else f"alpha_{alpha!r}"


def processor_folder(zero_shot: Path, fine_tuned: Path) -> Path:
    for folder in (fine_tuned, zero_shot):
        if any((folder / name).is_file() for name in PROCESSOR_FILES):
            return folder
    raise ValueError(
        f"neither {fine_tuned} nor {zero_shot} holds a processor ({' or '.join(PROCESSOR_FILES)}); "
        "the output folder needs one to load with AutoProcessor and the zero-shot pipeline."
    )


def wise_ft_folders(
    zero_shot: str | Path, fine_tuned: str | Path, alphas: Sequence[float], output_dir: str | Path
) -> dict[float, Path]:
    """Load two saved folders (fp32), write one mixed model folder per α with the processor beside it, and return
    {α: folder}. One α writes `output_dir` itself; several write `output_dir/alpha_0.50` etc. Every α and the
    processor are checked before anything is loaded or written."""
    zero_shot, fine_tuned, output_dir = Path(zero_shot), Path(fine_tuned), Path(output_dir)
    if not alphas:
        raise ValueError("give at least one alpha.")
    for alpha in alphas:
        check_alpha(alpha)
    if len(set(alphas)) != len(alphas):
        raise ValueError(f"each alpha must be given once, got {list(alphas)}.")
    check_model_folder(zero_shot, "--zero-shot")
    check_model_folder(fine_tuned, "--fine-tuned")
    folders = {alpha: output_dir if len(alphas) == 1 else output_dir / alpha_folder_name(alpha) for alpha in alphas}
    processor = AutoProcessor.from_pretrained(processor_folder(zero_shot, fine_tuned))
    zero_shot_model = HfClipModel.from_pretrained(zero_shot, dtype=torch.float32)
    fine_tuned_model = HfClipModel.from_pretrained(fine_tuned, dtype=torch.float32)
    for alpha, folder in folders.items():
        wise_ft(zero_shot_model, fine_tuned_model, alpha).save_pretrained(folder)
        processor.save_pretrained(folder)
    return folders


def alpha_argument(text: str) -> float:
    alpha = float(text)
    try:
        check_alpha(alpha)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return alpha


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hf-clip-wise-ft",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--zero-shot", type=Path, required=True, help="folder of the zero-shot (pre-trained) model")
    parser.add_argument(
        "--fine-tuned", type=Path, required=True, help="folder of the same architecture after fine-tuning"
    )
    parser.add_argument(
        "--alpha",
        type=alpha_argument,
        nargs="+",
        action="extend",
        required=True,
        help="weight of the fine-tuned model in [0, 1] (0.5 in the paper); several values, or the option repeated, "
        "write one folder each",
    )
    parser.add_argument(
        "--output-dir", type=Path, required=True, help="folder to write (with several alphas: their parent)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folders = wise_ft_folders(args.zero_shot, args.fine_tuned, args.alpha, args.output_dir)
    print(json.dumps({repr(alpha): str(folder) for alpha, folder in folders.items()}, indent=2))


if __name__ == "__main__":
    main()
