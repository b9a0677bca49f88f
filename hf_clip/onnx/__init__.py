"""ONNX export of the two towers and an onnxruntime embedder (the `onnx` extra: onnx, onnxscript, onnxruntime).

- `hf_clip.onnx.export`: `export_onnx` writes `vision_model.onnx` (pixel_values → image_embeds) and
  `text_model.onnx` (input_ids, attention_mask → text_embeds), each with a dynamic batch (and, for text, sequence)
  dimension, beside the model's processor files; console script `hf-clip-export-onnx`;
- `hf_clip.onnx.runtime`: `OnnxClipEmbedder` embeds images and texts from such a folder with onnxruntime and the
  saved processors, without torch models;
- `hf_clip.onnx.quantize`: `quantize_onnx` writes int8 towers (onnxruntime dynamic, or static calibrated on your
  images) in the same layout, console script `hf-clip-quantize`; `quantize_torch` is torch's dynamic int8 Linear;
- `hf_clip.onnx.folders`: what such folders hold (file names, `quantization.json`), readable without onnx.

Nothing is imported here and `import hf_clip` does not import this package, so onnx stays optional.
"""
