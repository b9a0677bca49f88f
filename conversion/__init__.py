"""Checkpoint conversion into hf_clip: key tables, per-source converters checked against their source, publishing."""
