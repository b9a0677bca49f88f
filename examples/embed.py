"""Embed an image collection: `accelerate launch examples/embed.py --model DIR --data_format imagefolder ...`.

A thin entry point over `hf_clip.embedding.job.main` (the same as the `hf-clip-embed` console script); the options
are the fields of `hf_clip.embedding.job.EmbedConfig`, and the output layout is described in
`hf_clip/embedding/layout.py`. Each process embeds its own parts; run it again to finish a killed job.
"""

from hf_clip.embedding.job import main

if __name__ == "__main__":
    main()
