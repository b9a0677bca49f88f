"""Embeddings at scale: a resumable, multi-process embedding job writing clip-retrieval's folder layout, a faiss
index over that folder, and text or image search against it.

- `hf_clip.embedding.job`: `EmbedConfig` and `embed_dataset` (console script `hf-clip-embed`; under `accelerate
  launch` each process embeds its own parts);
- `hf_clip.embedding.layout`: the output folder (`img_emb/img_emb_N.npy`, `text_emb/text_emb_N.npy`,
  `metadata/metadata_N.parquet`), written part by part and read back in order;
- `hf_clip.embedding.index`: `EmbeddingIndex`, an exact (flat) or approximate (IVF, HNSW) faiss index with its
  recall@10 against the exact one (console script `hf-clip-index`);
- `hf_clip.embedding.search`: `ClipSearcher`, a text or image query against a saved index (`hf-clip-search`);
- `hf_clip.embedding.backends`: `load_encoder`, the model behind the job and search: `torch`, `torch-int8`, `onnx`
  or `onnx-int8` (`--backend`).

Nothing is imported here, so the job does not need faiss and the index does not need `datasets`: import the module
you use.
"""
