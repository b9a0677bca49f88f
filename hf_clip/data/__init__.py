"""The input pipeline: the bit-exact fast path of the image processor, optional GPU JPEG decoding, text batches
trimmed or packed without padding, and the streaming image–caption data of training runs.

Nothing is imported here, so `import hf_clip` pulls in neither `datasets` (streams) nor torchvision (device
decoding); import the module you need.
"""
