"""Checkpoint conversion into hf_clip: key tables, per-source converters and the published architecture configs."""
