"""Stage 0 of the pipeline (raw text -> clean, deduplicated, tokenized shards), in three rooms.

Curation, here: sources (readers), clean (normalization, line filters), quality
(Gopher/FineWeb document filters), langid, toxicity, pii, dedup (exact + MinHash/LSH),
governance (opt-outs, licences, decontamination, the data card), filter_pass (pass 1,
shared by both engines), prepare (the CLI: `python -m data.prepare`), ray_engine, shards
(writer/reader) and loader (pretraining mixtures, SFT/PPO-ptx length buckets, epochs of
indices). Text, in data/text/: the tokenizer, the chat template, Hugging Face tokenizer
files. The shared leaves files (atomic writes, JSON) and parallel (worker pools) import
nothing of ours but cli. The task suite is its own package, tasks/.
"""
