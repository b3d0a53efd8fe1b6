"""Held-out evaluation on the task suite, shared by SFT, PPO and the pipeline report:
greedy answers to chat prompts, graded exactly, overall and per task family."""
from __future__ import annotations

import math
import os
from collections import Counter

import torch

from cli import UserError
from data.chat import RecordError, encode_prompt, iter_jsonl
from data.tasks import ensure_written, grade


def task_files(given: list[str], default_name: str, eval_given: str | None, tasks_dir: str) -> tuple[list[str], str | None]:
    """A stage's data files and held-out file: those given, or the task suite's (written to
    tasks_dir on first use by rank 0 while the others wait). eval_given=None: no eval file."""
    distributed = torch.distributed.is_initialized()
    if not given or eval_given == "":
        if not distributed or torch.distributed.get_rank() == 0:
            ensure_written(tasks_dir)
        if distributed:
            torch.distributed.barrier()
    files = given or [os.path.join(tasks_dir, default_name)]
    eval_file = None if eval_given is None else eval_given or os.path.join(tasks_dir, "eval.jsonl")
    for path in files + ([eval_file] if eval_file else []):
        if not os.path.isfile(path):
            raise UserError(f"data file {path} does not exist")
    return files, eval_file


def load_task_records(path: str) -> list[dict]:
    """The gradable records ({"prompt": str, "answer", "family"}) of a JSONL file; other
    lines (no answer, malformed) are passed over: they cannot be graded."""
    def gradable(rec):
        if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and "answer" in rec and "family" in rec):
            raise RecordError("not_gradable")
        return rec
    return [rec for rec, _ in iter_jsonl([path], gradable, Counter())]


@torch.no_grad()
def chat_responses(model, tok, conversations: list[list[dict]], max_new_tokens: int = 32, batch_size: int = 64,
                   temperature: float = 0.0, generator=None) -> list[str]:
    """The model's reply to each conversation (its last turn is the user's), stopping at <|end|>."""
    was_training = model.training
    model.eval()
    replies = []
    for i in range(0, len(conversations), batch_size):
        prompts = [encode_prompt(tok, conv) for conv in conversations[i:i + batch_size]]
        room = model.cfg.max_seq_len - max(len(p) for p in prompts)
        outs = model.generate(prompts, max(1, min(max_new_tokens, room)), pad_id=tok.pad_id, temperature=temperature,
                              stop_tokens=[tok.end_id], generator=generator)
        replies += [tok.decode([t for t in out if t != tok.end_id and t < len(tok.token_bytes)]) for out in outs]
    model.train(was_training)
    return replies


def task_accuracy(model, tok, records: list[dict], rank: int = 0, world: int = 1, max_new_tokens: int = 32,
                  batch_size: int = 64) -> dict:
    """Greedy accuracy on task records ({"prompt", "answer", "family", ...}).

    Under torch.distributed each rank answers a slice, padded so every rank runs the same
    number of generate() calls (a sharded forward is a collective), and the counts are summed.
    Returns {"accuracy": float, "per_family": {family: accuracy}, "samples": [(prompt, reply, score)]}.
    """
    n = len(records)
    per_rank = -(-n // world)
    mine = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    padded = mine + [mine[-1] if mine else 0] * (per_rank - len(mine))
    conversations = [[{"role": "user", "content": records[i]["prompt"]}] for i in padded]
    replies = chat_responses(model, tok, conversations, max_new_tokens, batch_size)
    families = sorted({r["family"] for r in records})
    counts = torch.zeros(len(families), 2, dtype=torch.float64)  # (correct, total) per family
    samples = []
    for i, reply in zip(mine, replies):
        score = grade(records[i], reply)
        counts[families.index(records[i]["family"])] += torch.tensor([score, 1.0], dtype=torch.float64)
        samples.append((records[i]["prompt"], reply, score))
    if torch.distributed.is_initialized():
        device = next(model.parameters()).device
        counts = counts.to(device)
        torch.distributed.all_reduce(counts)
        counts = counts.cpu()
    per_family = {f: float(c / t) if t else 0.0 for f, (c, t) in zip(families, counts.tolist())}
    total = counts.sum(0)
    return {"accuracy": float(total[0] / max(total[1], 1)), "per_family": per_family, "samples": samples}


def format_accuracy(result: dict) -> str:
    return f"{100 * result['accuracy']:.1f}% (" + ", ".join(
        f"{f} {100 * a:.0f}" for f, a in result["per_family"].items()) + ")"


def paired_change(before: list[tuple], after: list[tuple]) -> dict:
    """How a second model's answers differ from a first's on the same records, prompt by
    prompt (two `task_accuracy(...)["samples"]` lists in the same order).

    Accuracy moves by (fixed - broken) / n; whether that is more than chance is McNemar's
    exact test: under "no change", each prompt that flips is fixed or broken with
    probability 1/2, so p = P(a split at least this lopsided) under Binomial(flips, 1/2).
    This is far tighter than comparing two accuracies, because the prompts both models
    answer alike carry no noise.
    """
    if [s[0] for s in before] != [s[0] for s in after]:
        raise ValueError("paired_change needs both answer lists on the same prompts in the same order")
    fixed = sum(1 for b, a in zip(before, after) if not b[2] and a[2])
    broken = sum(1 for b, a in zip(before, after) if b[2] and not a[2])
    flips, low = fixed + broken, min(fixed, broken)
    tail = sum(math.comb(flips, k) for k in range(low + 1)) / 2 ** flips if flips else 1.0
    return {"n": len(before), "fixed": fixed, "broken": broken, "p_value": min(1.0, 2 * tail)}
