"""Prompts for RL on the helpfulness families: fresh instances, and the frontier among them.

RL that generalizes should practise on instances the model was never shown an answer to
and that no evaluation holds: `fresh_task_prompts` draws new instances from the task
generators (data/tasks.py) and keeps a prompt only when it hashes to the training split
(`split_of`), is not among the excluded prompts (the SFT demonstrations' and the held-out
file's, read with `prompt_texts`) and was not drawn before.

A prompt teaches a group-baseline method (RLOO, GRPO) something only when the policy's
samples disagree on it: if it always or never answers right, every advantage is zero.
`estimate_pass_rates` samples the policy k times per prompt and grades the answers;
`frontier` keeps the prompts whose estimated pass rate is strictly between 0 and 1 (all of
them when none is, so a run never starves). DAPO's dynamic sampling (Yu et al. 2025) filters
groups the same way after the fact; choosing prompts first spends no rollouts on them.
"""
from __future__ import annotations

import random
from collections import Counter

import torch

from data.chat import RecordError, iter_jsonl, prompt_messages
from data.tasks import ANSWER_TYPE, TASK_FAMILIES, grade, make_task, split_of


def prompt_texts(paths: list[str]) -> set[str]:
    """The user prompt (the last user turn) of every record of task JSONL files: the SFT
    demonstrations' or the held-out file's, to keep RL prompts away from. Records without a
    conversation are passed over."""
    def last_user_turn(rec):
        turns = [m for m in prompt_messages(rec) if m["role"] == "user"]
        if not turns:
            raise RecordError("missing_field", "no user turn")
        return turns[-1]["content"]
    return {text for _, text in iter_jsonl(paths, last_user_turn, Counter())}


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
            if split_of(prompt) == "train" and prompt not in exclude and prompt not in seen:
                seen.add(prompt)
                records.append({"id": f"{family}/rl/{len(seen) - 1}", "family": family,
                                "answer_type": ANSWER_TYPE[family], "prompt": prompt, "answer": answer})
    return records


@torch.no_grad()
def estimate_pass_rates(model, tok, records: list[dict], samples: int, temperature: float = 1.0, seed: int = 0,
                        max_new_tokens: int = 32, batch_size: int = 64) -> list[float]:
    """The share of `samples` sampled answers the gold judge accepts, per record."""
    from evals import chat_responses  # evals imports the model stack; keep this module light
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    convs = [[{"role": "user", "content": r["prompt"]}] for r in records for _ in range(samples)]
    replies = chat_responses(model, tok, convs, max_new_tokens, batch_size, temperature, generator)
    return [sum(grade(r, a) for a in replies[i * samples:(i + 1) * samples]) / samples for i, r in enumerate(records)]


def frontier(records: list[dict], pass_rates: list[float]) -> list[dict]:
    """The records whose pass rate is strictly between 0 and 1, or all of them when none is."""
    if len(records) != len(pass_rates):
        raise ValueError(f"{len(records)} records but {len(pass_rates)} pass rates")
    kept = [r for r, p in zip(records, pass_rates) if 0 < p < 1]
    return kept or list(records)
