"""Stage 0 of the pipeline: raw text -> clean, deduplicated, tokenized shards.

Modules: sources (readers), clean (normalization, line filters), quality (Gopher/FineWeb
document filters), langid, toxicity, pii, dedup (exact + MinHash/LSH), tokenizer
(byte-level BPE), shards (writer/reader), prepare (the CLI that runs them in order).
"""
