"""The end-to-end demo (`make demo`, `hf-clip-demo`): a small CLIP trained from scratch on Fashion-MNIST and
evaluated zero-shot. See `hf_clip.demo.fashion_mnist`."""
