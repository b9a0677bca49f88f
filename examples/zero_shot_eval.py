"""Evaluate a CLIP model: `accelerate launch examples/zero_shot_eval.py --model DIR --data_format imagefolder ...`.

A thin entry point over `hf_clip.evaluation.runner.main` (the same as the `hf-clip-eval` console script); the
options are the fields of `hf_clip.evaluation.EvalConfig`, and the output format is described in
`hf_clip/evaluation/runner.py`.
"""

from hf_clip.evaluation.runner import main

if __name__ == "__main__":
    main()
