"""Benchmarks for stage 0, side by side with the reference libraries.

    pip install tokenizers datasketch     # only for this script
    python -m bench.data [--append BENCHMARKS.md]

1. BPE training to vocab 8192 on the embedded corpus: our incremental trainer vs
   HF `tokenizers` (Rust) with the same split pattern and byte-level alphabet; wall
   time and compression (UTF-8 bytes per token) of each on the same text.
2. MinHash + LSH: documents/second of ours vs `datasketch` with the same shingles (word
   5-grams of simplified text), 112 permutations, 14 bands x 8 rows, and the recall of
   each on planted near-duplicates (Jaccard >= 0.85) plus false merges among unrelated
   documents.
3. The whole default `python -m data.prepare`, timed as a subprocess.
"""
from __future__ import annotations

import datetime
import gzip
import json
import os
import platform
import random
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from cli import UserError, entry_point, parse_config, print_config
from data.dedup import MinHasher, NearDedup, jaccard, shingle_hashes, simplify_words
from data.filter_pass import DEFAULT_CORPUS
from data.text.tokenizer import GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class BenchConfig:
    vocab_size: int = field(default=8192, metadata={"help": "BPE vocabulary size of both trainers"})
    workers: int = field(default=os.cpu_count() or 1, metadata={"help": "worker processes of our BPE trainer"})
    repeats: int = field(default=3, metadata={"help": "BPE trainings of each (best of)"})
    docs: int = field(default=4000, metadata={"help": "unrelated documents for the MinHash benchmark"})
    planted: int = field(default=1000, metadata={"help": "planted near-duplicates"})
    words: int = field(default=400, metadata={"help": "words per document"})
    append: str = field(default="", metadata={"help": "append a results section to this markdown file"})


def corpus_texts() -> list[str]:
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def bench_bpe(vocab_size: int, workers: int, repeats: int) -> dict:
    from tokenizers import Regex, trainers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    texts = corpus_texts()
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)

    def ours():
        return Tokenizer.train(texts, vocab_size, workers=workers)

    def hf():
        tok = HFTokenizer(BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return tok

    times = {"ours": [], "hf": []}
    for _ in range(repeats):  # interleaved so both see the same machine state
        for name, fn in (("ours", ours), ("hf", hf)):
            t0 = time.perf_counter()
            tok = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "ours":
                our_tok = tok
            else:
                hf_tok = tok
    our_tokens = sum(map(len, our_tok.encode_batch(texts)))
    hf_tokens = sum(len(e.ids) for e in hf_tok.encode_batch(texts))
    return {"ours_s": min(times["ours"]), "hf_s": min(times["hf"]),
            "ours_bytes_per_token": total_bytes / our_tokens, "hf_bytes_per_token": total_bytes / hf_tokens,
            "ours_vocab": our_tok.vocab_size, "hf_vocab": hf_tok.get_vocab_size(), "corpus_mb": total_bytes / 1e6}


def planted_corpus(n_base: int, n_planted: int, words_per_doc: int, seed: int = 0):
    """Unrelated base documents plus near-copies of some of them (Jaccard >= 0.85)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))) for _ in range(20000)]
    base = [[rng.choice(vocab) for _ in range(words_per_doc)] for _ in range(n_base)]
    docs = [" ".join(w) for w in base]
    planted = []  # (index of copy, index of original)
    similarity = []
    while len(planted) < n_planted:
        src = rng.randrange(n_base)
        words = list(base[src])
        # 1 to ~6 scattered edits per 400 words: Jaccard from about 0.85 (the hard end) to 0.99
        for _ in range(rng.randint(1, max(1, words_per_doc // 65))):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        copy = " ".join(words)
        j = jaccard(shingle_hashes(docs[src]), shingle_hashes(copy))
        if j >= 0.85:
            planted.append((len(docs), src))
            similarity.append(j)
            docs.append(copy)
    return docs, planted, min(similarity), sum(similarity) / len(similarity)


def bench_minhash(n_base: int, n_planted: int, words_per_doc: int, bands: int = 14, rows: int = 8, ngram: int = 5) -> dict:
    from datasketch import MinHash, MinHashLSH

    docs, planted, j_min, j_mean = planted_corpus(n_base, n_planted, words_per_doc)
    num_perm = bands * rows

    t0 = time.perf_counter()
    hasher = MinHasher(num_perm, ngram, seed=1)
    index = NearDedup(bands, rows)
    for i, doc in enumerate(docs):
        index.add(i, hasher.signature(doc))
    ours_dups = index.duplicates()
    ours_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    ds_dups = set()
    for i, doc in enumerate(docs):
        words = simplify_words(doc)
        shingles = {" ".join(words[j:j + ngram]).encode() for j in range(max(1, len(words) - ngram + 1))}
        m = MinHash(num_perm=num_perm, seed=1)
        m.update_batch(list(shingles))
        if lsh.query(m):
            ds_dups.add(i)
        lsh.insert(str(i), m)
    ds_s = time.perf_counter() - t0

    copies = {c for c, _ in planted}
    return {"documents": len(docs), "words_per_doc": words_per_doc, "planted": len(planted),
            "planted_jaccard_min": j_min, "planted_jaccard_mean": j_mean,
            "ours_docs_per_s": len(docs) / ours_s, "datasketch_docs_per_s": len(docs) / ds_s,
            "ours_recall": len(copies & set(ours_dups)) / len(copies),
            "datasketch_recall": len(copies & ds_dups) / len(copies),
            "ours_false_merges": len(set(ours_dups) - copies),
            "datasketch_false_merges": len(ds_dups - copies)}


def bench_prepare() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "data.prepare", "--out", tmp], cwd=REPO,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise UserError(f"data.prepare failed (exit code {proc.returncode}); its output is above")
        with open(os.path.join(tmp, "report.json")) as f:
            report = json.load(f)
    return {"wall_s": wall, "stage_seconds": report["seconds"], "kept": report["documents"]["kept"],
            "tokens_train": report["tokens"]["train"]}


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


@entry_point
def main(argv=None) -> None:
    args = parse_config(BenchConfig, argv, description="stage-0 benchmarks vs HF tokenizers and datasketch")
    print_config(args, "bench config")
    try:
        import datasketch  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as e:
        raise UserError(f"bench.data needs tokenizers and datasketch (pip install tokenizers datasketch): "
                        f"{e}") from None

    bpe = bench_bpe(args.vocab_size, args.workers, args.repeats)
    print(f"BPE vocab {args.vocab_size} on {bpe['corpus_mb']:.1f} MB: ours {bpe['ours_s']:.2f}s, "
          f"HF tokenizers {bpe['hf_s']:.2f}s (ratio {bpe['ours_s'] / bpe['hf_s']:.2f}x); bytes/token "
          f"ours {bpe['ours_bytes_per_token']:.4f}, HF {bpe['hf_bytes_per_token']:.4f}")
    mh = bench_minhash(args.docs, args.planted, args.words)
    print(f"MinHash+LSH on {mh['documents']} docs: ours {mh['ours_docs_per_s']:.0f} docs/s, datasketch "
          f"{mh['datasketch_docs_per_s']:.0f} docs/s ({mh['ours_docs_per_s'] / mh['datasketch_docs_per_s']:.2f}x); "
          f"recall ours {mh['ours_recall']:.3f}, datasketch {mh['datasketch_recall']:.3f}; false merges "
          f"ours {mh['ours_false_merges']}, datasketch {mh['datasketch_false_merges']}")
    prep = bench_prepare()
    print(f"python -m data.prepare (default corpus): {prep['wall_s']:.1f}s wall; stages {prep['stage_seconds']}")

    if args.append:
        date = datetime.date.today().isoformat()
        cmd = "python -m bench.data " + " ".join(sys.argv[1:] if argv is None else argv)
        lines = [
            f"\n## Stage 0 (data) — {date}\n",
            f"Machine: {machine()}. Command: `{cmd.strip()}`.\n",
            "| benchmark | ours | reference | ratio |",
            "|---|---|---|---|",
            f"| BPE training, vocab {args.vocab_size}, {bpe['corpus_mb']:.1f} MB corpus (best of {args.repeats}) | "
            f"{bpe['ours_s']:.2f} s | HF tokenizers {bpe['hf_s']:.2f} s | {bpe['ours_s'] / bpe['hf_s']:.2f}x the time |",
            f"| compression, UTF-8 bytes/token on the corpus | {bpe['ours_bytes_per_token']:.4f} | HF {bpe['hf_bytes_per_token']:.4f} | "
            f"{100 * (bpe['ours_bytes_per_token'] / bpe['hf_bytes_per_token'] - 1):+.2f}% |",
            f"| MinHash+LSH (5-grams, 112 perms, 14x8), {mh['documents']} docs of {mh['words_per_doc']} words | "
            f"{mh['ours_docs_per_s']:.0f} docs/s | datasketch {mh['datasketch_docs_per_s']:.0f} docs/s | "
            f"{mh['ours_docs_per_s'] / mh['datasketch_docs_per_s']:.2f}x the speed |",
            f"| recall on {mh['planted']} planted near-duplicates (Jaccard {mh['planted_jaccard_min']:.2f}-1, "
            f"mean {mh['planted_jaccard_mean']:.2f}) | {mh['ours_recall']:.3f} | "
            f"datasketch {mh['datasketch_recall']:.3f} | |",
            f"| false merges among unrelated documents | {mh['ours_false_merges']} | datasketch {mh['datasketch_false_merges']} | |",
            f"| whole default `python -m data.prepare` | {prep['wall_s']:.1f} s wall | | |",
            "",
        ]
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended to {args.append}")


if __name__ == "__main__":
    main()
