"""End-to-end demo on real data: `python examples/demo.py --output-dir demo_output` (what `make demo` runs).

A thin entry point over `hf_clip.demo.fashion_mnist.main` (the same as the `hf-clip-demo` console script): a small
CLIP trained from scratch on Fashion-MNIST captions with a new BPE vocabulary, then evaluated zero-shot on the
10,000 official test images.
"""

from hf_clip.demo.fashion_mnist import main

if __name__ == "__main__":
    main()
