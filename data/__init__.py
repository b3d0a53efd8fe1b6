"""Stage 0 of the pipeline (raw text -> clean, deduplicated, tokenized shards) and the
data every later stage reads.

Modules: sources (readers), clean (normalization, line filters), quality (Gopher/FineWeb
document filters), langid, toxicity, pii, dedup (exact + MinHash/LSH), tokenizer
(byte-level BPE), hf_tokenizer (ours <-> Hugging Face tokenizer.json), shards
(writer/reader), prepare (the CLI that runs them in order), parallel (worker pools),
files (atomic writes); loader (pretraining mixtures, SFT/PPO-ptx length buckets, epochs
of indices), chat (template and format adapters), tasks, redteam and prefs (the task
suite, the refusal judge, preference pairs).
"""
