"""Search a saved index with a text or an image.

    hf-clip-search --index_folder index/ --text "a dog on a beach" --k 5
    hf-clip-search --index_folder index/ --image query.jpg

The query is embedded by the model and backend that made the index's embeddings (recorded in the index; `--model`
and `--backend` override them) with its own tokenizer or image processor, exactly as the embedding job embeds, and
the index returns the `k` best rows with their cosine similarity: a text finds images in an image index, an image
finds similar images.
"""

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import HfArgumentParser
from transformers.hf_argparser import DataClassType

from .backends import BACKENDS, ClipEncoder, load_encoder
from .encoders import ImageInput
from .index import EmbeddingIndex


class ClipSearcher:
    """An `EmbeddingIndex` and the encoder (model and backend) whose embedding space it holds."""

    def __init__(self, index: EmbeddingIndex, encoder: ClipEncoder):
        self.index = index
        self.encoder = encoder

    @classmethod
    def from_pretrained(
        cls,
        index_folder: str,
        model: str | None = None,
        modality: str = "image",
        device: torch.device | str = "cpu",
        backend: str | None = None,
    ) -> "ClipSearcher":
        """Loads the index and the model (and backend) named, else the ones recorded in the index."""
        index = EmbeddingIndex.load(index_folder, modality)
        model_path = model or index.info.get("model")
        if not model_path:
            raise ValueError(f"{index_folder} does not record its model; pass one.")
        return cls(index, load_encoder(model_path, backend or index.info.get("backend") or "torch", device))

    def embed_query(self, text: str | None = None, image: ImageInput | None = None) -> np.ndarray:
        """(1, dim) normalised float32 embedding of exactly one of `text` and `image`."""
        if (text is None) == (image is None):
            raise ValueError("pass exactly one of `text` and `image`.")
        if text is not None:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"the text query must be a non-empty string, got {text!r}.")
            return self.encoder.embed_texts([text])
        assert image is not None
        name = str(image) if isinstance(image, str) else "query image"
        preprocess = self.encoder.preprocess
        if preprocess is None:
            raise ValueError("this model folder has no image processor: it cannot embed an image query.")
        return self.encoder.embed_pixel_values(preprocess(image, name=name)[None])

    def search(self, text: str | None = None, image: ImageInput | None = None, k: int = 10) -> list[dict[str, Any]]:
        """The `k` best rows for a text or an image query, best first: their metadata and `score` (cosine)."""
        return self.index.search(self.embed_query(text, image), k)[0]


def search(
    index_folder: str,
    text: str | None = None,
    image: ImageInput | None = None,
    k: int = 10,
    model: str | None = None,
    modality: str = "image",
    backend: str | None = None,
) -> list[dict[str, Any]]:
    """One query against a saved index (loads the index and model: keep a `ClipSearcher` for many queries)."""
    return ClipSearcher.from_pretrained(index_folder, model, modality, backend=backend).search(text, image, k)


@dataclass
class SearchCommand:
    index_folder: str = field(metadata={"help": "Output folder of hf-clip-index."})
    text: str | None = field(default=None, metadata={"help": "A text query."})
    image: str | None = field(default=None, metadata={"help": "An image file as the query."})
    k: int = 10
    model: str | None = field(default=None, metadata={"help": "Default: the model recorded in the index."})
    modality: str = field(default="image", metadata={"help": "Which saved index to search: image | text."})
    backend: str | None = field(
        default=None, metadata={"help": f"{' | '.join(BACKENDS)}; default: the one that made the embeddings."}
    )


def main(argv: list[str] | None = None) -> None:
    (command,) = HfArgumentParser(DataClassType(SearchCommand)).parse_args_into_dataclasses(args=argv)
    hits = search(
        command.index_folder, command.text, command.image, command.k, command.model, command.modality, command.backend
    )
    print(json.dumps(hits, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
