"""Publish a checkpoint: model + processor + model card in one folder, checked in a clean process, then uploaded.

    python -m conversion.push_to_hub FOLDER --repo-id ORG/NAME [--push] [--private]

uploads an already written folder (a dry run listing the files unless `--push`). The converters call `publish`,
which writes the folder first. `model.push_to_hub` is avoided on purpose: it replaces a custom README with a generic
one; `HfApi.upload_folder` sends exactly the folder's files, README.md included.
"""

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from transformers import PreTrainedModel

from .load_check import check_folder_loads
from .model_card import CardFacts, load_eval_results, render_model_card
from .remote_code import remote_code_registration

README_NAME = "README.md"


@dataclass
class Published:
    folder: Path
    load_reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def save_folder(
    model: PreTrainedModel, processor: Any, folder: str | Path, card: Any = None, remote_code: bool = False
) -> Path:
    """Write model (safetensors), processor and README.md into `folder`; with `remote_code`, their code too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if remote_code:
        with remote_code_registration(model, processor):
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
    else:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    if card is not None:
        card.save(folder / README_NAME)
    return folder


def folder_files(folder: str | Path) -> list[str]:
    """Paths (relative, POSIX) that `upload_folder` sends: every file except `.git` and `.cache` contents."""
    root = Path(folder)
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and not {".git", ".cache"} & set(path.relative_to(root).parts)
    )


def upload(
    folder: str | Path,
    repo_id: str,
    push: bool = False,
    private: bool = False,
    commit_message: str = "Upload hf_clip checkpoint",
) -> list[str]:
    """Upload `folder` to `repo_id` with `HfApi.upload_folder` (creating the repo), or only list it when not `push`.

    The endpoint is `HF_ENDPOINT` (huggingface_hub's constant), so uploads can target a mirror or a test server.
    """
    files = folder_files(folder)
    if not push:
        print(f"dry run: would upload to {repo_id}:\n  " + "\n  ".join(files) + "\n(pass --push to upload)")
        return files
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    print(f"uploaded {len(files)} files: {info.commit_url}")
    return files


def publish(
    model: PreTrainedModel,
    processor: Any,
    output_dir: str | Path,
    facts: CardFacts,
    *,
    repo_id: str | None = None,
    push: bool = False,
    remote_code: bool = False,
) -> Published:
    """Save model, processor and rendered card; check the folder in a clean process; then upload or list it."""
    if push and not repo_id:
        raise ValueError("--push needs --repo-id ORG/NAME.")
    output_dir = Path(output_dir)
    card = render_model_card(
        model, processor, facts, repo_id=repo_id or output_dir.resolve().name, remote_code=remote_code
    )
    save_folder(model, processor, output_dir, card, remote_code=remote_code)
    published = Published(output_dir)
    for mode in ("hf_clip", "remote_code") if remote_code else ("hf_clip",):
        published.load_reports[mode] = check_folder_loads(output_dir, model, mode=mode, processor=processor)
        print(f"clean-process load check ({mode}): {published.load_reports[mode]['classes']}")
    if repo_id:
        published.files = upload(output_dir, repo_id, push=push)
    return published


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every converter CLI shares: where to write, what the card says, and publishing."""
    parser.add_argument("output_dir", type=Path, help="folder to write the hf_clip checkpoint into")
    parser.add_argument("--push", action="store_true", help="upload the checked folder (default: list files only)")
    parser.add_argument("--repo-id", help="Hub repository ORG/NAME (needed for --push)")
    parser.add_argument("--remote-code", action="store_true", help="ship the modelling code (trust_remote_code)")
    parser.add_argument("--license", default="mit", help="license of the weights, for the model card")
    parser.add_argument("--base-model", help="Hub id of the checkpoint these weights come from, for the model card")
    parser.add_argument("--datasets", nargs="*", default=[], help="Hub ids of the training datasets, for the card")
    parser.add_argument(
        "--eval-results", type=Path, nargs="*", default=[], help="results JSON files of examples/zero_shot_eval.py"
    )


def publish_from_args(
    model: PreTrainedModel, processor: Any, args: argparse.Namespace, *, source: str, parity: Mapping[str, float]
) -> Published:
    """`publish` with the card facts and destination a converter CLI read (`add_publish_arguments`)."""
    facts = CardFacts(
        source=source,
        license=args.license,
        base_model=args.base_model,
        datasets=args.datasets,
        eval_results=load_eval_results(args.eval_results),
        parity=parity,
    )
    return publish(
        model, processor, args.output_dir, facts, repo_id=args.repo_id, push=args.push, remote_code=args.remote_code
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a folder written by a converter (model, processor, README.md)")
    parser.add_argument("--repo-id", required=True, help="Hub repository ORG/NAME")
    parser.add_argument("--push", action="store_true", help="upload (default: list what would be uploaded)")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    if not (args.folder / README_NAME).is_file():
        raise SystemExit(f"{args.folder} has no {README_NAME}: write it with a converter (it renders the card).")
    from transformers import AutoModel, AutoProcessor

    # The folder as it will be served, loaded here as the reference the clean process must reproduce.
    model = AutoModel.from_pretrained(args.folder)
    processor = AutoProcessor.from_pretrained(args.folder)
    mode = "remote_code" if any(args.folder.glob("modeling_*.py")) else "hf_clip"
    report = check_folder_loads(args.folder, model, mode=mode, processor=processor)
    print(f"clean-process load check ({mode}): {report['classes']}")
    upload(args.folder, args.repo_id, push=args.push, private=args.private)


if __name__ == "__main__":
    main()
