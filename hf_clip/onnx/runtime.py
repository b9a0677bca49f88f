"""Embed images and texts with onnxruntime from a folder written by `hf_clip.onnx.export`.

    embedder = OnnxClipEmbedder("out/vit-b32-onnx")
    image_embeds = embedder.embed_images(["cat.jpg", "dog.jpg"])          # (2, dim) float32, L2-normalised
    text_embeds = embedder.embed_texts(["a photo of a cat", "a photo of a dog"])
    scores = image_embeds @ text_embeds.T

Images go through the folder's own image processor (hf_clip's bit-exact fast path when it is hf_clip's) and texts
through its tokenizer, so the embeddings equal the PyTorch model's. An int8 folder written by `hf-clip-quantize`
loads the same way; `quantization` then holds its `quantization.json` (None for fp32).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from ..embedding.encoders import ImageInput, ImagePreprocessor
from .folders import TEXT_FILE, VISION_FILE, quantization


class OnnxClipEmbedder:
    """The two exported towers as onnxruntime sessions, with the tokenizer and image processor saved beside them."""

    def __init__(
        self,
        folder: str | Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        session_options: onnxruntime.SessionOptions | None = None,
    ):
        self.directory = Path(folder)
        if not any((self.directory / name).is_file() for name in (VISION_FILE, TEXT_FILE)):
            raise FileNotFoundError(
                f"{self.directory} holds neither {VISION_FILE} nor {TEXT_FILE}: not an ONNX folder (make one with "
                "hf-clip-export-onnx, or an int8 one with hf-clip-quantize)."
            )

        def session(name: str) -> onnxruntime.InferenceSession | None:
            path = self.directory / name
            return (
                onnxruntime.InferenceSession(str(path), session_options, providers=list(providers))
                if path.is_file()
                else None
            )

        # A folder exported with one tower serves that modality only.
        self.vision_session = session(VISION_FILE)
        self.text_session = session(TEXT_FILE)
        self.quantization = quantization(self.directory)
        self.embedding_dim = int(AutoConfig.from_pretrained(self.directory).projection_dim)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.directory)
        self.preprocess = ImagePreprocessor(AutoImageProcessor.from_pretrained(self.directory))

    def _session(self, session: onnxruntime.InferenceSession | None, name: str) -> onnxruntime.InferenceSession:
        if session is None:
            raise FileNotFoundError(f"{self.directory} has no {name}: it was exported without that tower.")
        return session

    def embed_pixel_values(self, pixel_values: np.ndarray | torch.Tensor) -> np.ndarray:
        """(batch, dim) normalised embeddings of preprocessed float32 `(batch, 3, size, size)` pixels."""
        pixels = pixel_values.numpy() if isinstance(pixel_values, torch.Tensor) else pixel_values
        session = self._session(self.vision_session, VISION_FILE)
        (embeds,) = session.run(None, {"pixel_values": np.ascontiguousarray(pixels, dtype=np.float32)})
        return embeds

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(batch, dim) normalised embeddings of PIL images, encoded bytes or image files."""
        if isinstance(images, (str, bytes)) or not images:
            raise ValueError("pass a non-empty list of images.")
        return self.embed_pixel_values(torch.stack([self.preprocess(image) for image in images]))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(batch, dim) normalised embeddings of texts (padded to the longest, truncated to the context)."""
        if isinstance(texts, str) or not texts:
            raise ValueError("pass a non-empty list of texts.")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="np")
        inputs = {name: np.asarray(tokens[name], dtype=np.int64) for name in ("input_ids", "attention_mask")}
        (embeds,) = self._session(self.text_session, TEXT_FILE).run(None, inputs)
        return embeds
