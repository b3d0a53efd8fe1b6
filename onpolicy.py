"""The reward models compared where it matters: on the round-1 policy's own answers.
`on_policy_pairs` samples two answers per held-out prompt and lets the gold judge label
the pair (ties dropped); `on_policy_accuracy` scores every reward model on the same
pairs. report.py's round-2 section calls it (torch is imported only when it does).
"""
from __future__ import annotations

import torch

from checkpoint import RewardScorer
from evals import chat_responses
from tasks.suite import grade


@torch.no_grad()
def on_policy_pairs(model, tok, records: list[dict], temperature: float = 1.0, seed: int = 0,
                    max_new_tokens: int = 32, batch_size: int = 64, draws: int = 1) -> tuple[list[dict], dict]:
    """Two sampled answers of a policy to each gradable record (evals.load_task_records),
    labelled by the gold judge without noise, `draws` times over (draw d samples with seed
    `seed + d`, so a larger `draws` keeps the smaller one's pairs). Returns (the pairs where
    the judge prefers one, as train_rm.py records with `kind` = the task family; counts:
    prompts, draws, pairs, ties). Reproducible for the same seed and batch size."""
    pairs, ties = [], 0
    for d in range(draws):
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed + d)
        replies = chat_responses(model, tok, [r["conversation"] for r in records for _ in range(2)], max_new_tokens,
                                 batch_size, temperature, generator)
        for i, rec in enumerate(records):
            a, b = replies[2 * i], replies[2 * i + 1]
            ga, gb = grade(rec, a), grade(rec, b)
            if ga == gb:
                ties += 1
                continue
            chosen, rejected = (a, b) if ga > gb else (b, a)
            pairs.append({"id": f"{rec.get('id', i)}/on_policy/{d}", "prompt": rec["conversation"],
                          "chosen": chosen, "rejected": rejected, "kind": rec["family"]})
    return pairs, {"prompts": len(records), "draws": draws, "pairs": len(pairs), "ties": ties}


@torch.no_grad()
def pair_accuracy(scorer, pairs: list[dict], batch_size: int = 64) -> dict:
    """A reward model's accuracy on train_rm.py records ({"prompt", "chosen", "rejected",
    "kind"}): the share where it scores the chosen answer strictly higher, overall and by
    kind. `scorer` is a RewardScorer (anything with its `score`)."""
    right: dict[str, list[int]] = {}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        prompts = [p["prompt"] for p in chunk]
        scores = scorer.score(prompts + prompts, [p["chosen"] for p in chunk] + [p["rejected"] for p in chunk],
                              normalize=False)
        for p, c, r in zip(chunk, scores[:len(chunk)].tolist(), scores[len(chunk):].tolist()):
            right.setdefault(p.get("kind", "pair"), []).append(int(c > r))
    n = sum(len(v) for v in right.values())
    return {"accuracy": sum(sum(v) for v in right.values()) / n if n else None, "pairs": n,
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(right.items())}}


def on_policy_accuracy(reward_models: dict[str, str], pairs: list[dict], device="cpu") -> dict:
    """{name: accuracy} of each reward-model checkpoint ({name: directory}) on the same
    pairs (from `on_policy_pairs`), plus {"by_kind": {name: {kind: accuracy}}}."""
    result: dict = {"by_kind": {}}
    for name, ckpt in reward_models.items():
        scorer = RewardScorer.load(ckpt, device=device)
        scored = pair_accuracy(scorer, pairs)
        result[name], result["by_kind"][name] = scored["accuracy"], scored["by_kind"]
        del scorer
    return result
