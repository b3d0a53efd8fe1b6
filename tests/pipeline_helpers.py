"""Helpers for the tests that run the main job in miniature (tests/test_pipeline.py,
tests/test_round2.py): its options, and a run whose printed output is returned."""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mini_args(root) -> list[str]:
    """pipeline.py options for a miniature main job under `root`: the mini preset on three
    of the embedded corpus's works."""
    with gzip.open(os.path.join(REPO, "data", "corpus", "shakespeare.jsonl.gz"), "rt", encoding="utf-8") as f:
        works = [json.loads(line) for _, line in zip(range(3), f)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(w) + "\n" for w in works))
    return ["--preset", "mini", "--out", str(root / "runs"), "--data", str(root / "prepared"),
            "--corpus", str(corpus), "--device", "cpu"]


def run_pipeline(args: list[str]) -> str:
    """pipeline.main(args); what it printed."""
    import pipeline
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pipeline.main(args)
    return out.getvalue()
