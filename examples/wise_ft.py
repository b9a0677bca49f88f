"""Mix a zero-shot and a fine-tuned CLIP in weight space (WiSE-FT):
`python examples/wise_ft.py --zero-shot A --fine-tuned B --alpha 0.5 --output-dir OUT`.

A thin entry point over `hf_clip.wise_ft.main` (the same as the `hf-clip-wise-ft` console script); the options and
the output layout are described in `hf_clip/wise_ft.py`.
"""

from hf_clip.wise_ft import main

if __name__ == "__main__":
    main()
