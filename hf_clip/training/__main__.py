"""`python -m hf_clip.training [config.json] [--field value ...]`: the training loop in one process."""

from .loop import main

main()
