"""Prompts for RL on the helpfulness families: fresh instances, and the frontier among them.

RL that generalizes should practise on instances the model was never shown an answer to
and that no evaluation holds: `fresh_task_prompts` draws new instances from the task
generators (tasks/suite.py) and keeps a prompt only when it hashes to the training split
(`split_of`), is not among the excluded prompts (the SFT demonstrations' and the held-out
file's, read with `prompt_texts`) and was not drawn before (`rejection`: the same rule
simulate_users.py applies to its traffic).

A prompt teaches a group-baseline method (RLOO, GRPO) something only when the policy's
samples disagree on it: if it always or never answers right, every advantage is zero.
`evals.estimate_pass_rates` samples the policy k times per prompt and grades the answers;
`frontier` keeps the prompts whose estimated pass rate is strictly between 0 and 1 (all of
them when none is, so a run never starves). DAPO's dynamic sampling (Yu et al. 2025) filters
groups the same way after the fact; choosing prompts first spends no rollouts on them.
"""
from __future__ import annotations

import json
import random

from cli import UserError
from tasks.suite import ANSWER_TYPE, TASK_FAMILIES, make_task, split_of


def record_prompt(rec: dict) -> str | None:
    """A task record's user prompt: `prompt`, else its first user message."""
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"]
    users = [m.get("content") for m in rec.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    return users[0] if users and isinstance(users[0], str) else None


def prompt_texts(paths: list[str], label: str = "") -> set[str]:
    """The user prompts of task JSONL files (the SFT demonstrations', the held-out file's):
    prompts that must never be drawn as training prompts. A file that cannot be read, or a
    line that is not a record with a prompt, is a UserError naming `label` (the option the
    file came from) and the file; nothing is skipped silently."""
    prompts = set()
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        rec = json.loads(line)
                        prompt = record_prompt(rec) if isinstance(rec, dict) else None
                        if prompt is None:
                            raise UserError(f"{label}{path}:{n}: a record with no prompt or user message")
                        prompts.add(prompt)
        except OSError as e:
            raise UserError(f"cannot read {label}{path}: {e.strerror}") from None
        except ValueError as e:
            raise UserError(f"{label}{path} is not JSONL: {e}") from None
    return prompts


def rejection(prompt: str, seen: set, exclude: set) -> str | None:
    """Why a drawn prompt cannot be a training prompt (held out by its hash, excluded,
    drawn already), or None."""
    if split_of(prompt) == "eval":
        return "held_out_split"
    if prompt in exclude:
        return "in_exclude_file"
    if prompt in seen:
        return "duplicate"
    return None


def fresh_task_prompts(families: list[str], per_family: int, seed: int, exclude: set[str],
                       tries: int = 20_000) -> list[dict]:
    """Up to `per_family` new task records per helpfulness family ({"id", "family",
    "answer_type", "prompt", "answer"}, what train_ppo.py and the grader read): training
    split only, never an excluded prompt, no duplicates. A family whose fresh prompts run
    out within `tries` draws gives fewer."""
    unknown = [f for f in families if f not in TASK_FAMILIES]
    if unknown:
        raise ValueError(f"not helpfulness families: {', '.join(unknown)}")
    records = []
    for family in families:
        rng, seen = random.Random(f"{seed}:{family}:rl"), set()
        for _ in range(tries):
            if len(seen) >= per_family:
                break
            prompt, answer = make_task(family, rng)
            if rejection(prompt, seen, exclude) is None:
                seen.add(prompt)
                records.append({"id": f"{family}/rl/{len(seen) - 1}", "family": family,
                                "answer_type": ANSWER_TYPE[family], "prompt": prompt, "answer": answer})
    return records


def frontier(records: list[dict], pass_rates: list[float]) -> list[dict]:
    """The records whose pass rate is strictly between 0 and 1, or all of them when none is."""
    if len(records) != len(pass_rates):
        raise ValueError(f"{len(records)} records but {len(pass_rates)} pass rates")
    kept = [r for r, p in zip(records, pass_rates) if 0 < p < 1]
    return kept or list(records)
