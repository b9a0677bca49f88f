"""Train CLIP: `accelerate launch examples/train.py [config.json] [--field value ...]`.

A thin entry point over `hf_clip.training.loop.main` (the same as the `hf-clip-train` console script); every setting
is a field of `hf_clip.training.TrainConfig`. Pick an accelerate config in `examples/configs/` for DDP, several nodes
or FSDP.
"""

from hf_clip.training.loop import main

if __name__ == "__main__":
    main()
