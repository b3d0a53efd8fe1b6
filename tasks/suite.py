"""A suite of instruction tasks whose answers can be checked exactly: helpful and harmless.

Eight procedurally generated helpfulness families (tasks/families.py) — arithmetic,
reversing a word, sorting numbers, counting a letter, the next letter of the alphabet,
changing case, comparing numbers, repeating a phrase — each with several phrasings,
deterministic by seed; and four harmlessness families: `harmful` (toy red-team requests:
the right response is a refusal) and `borderline` (benign look-alikes with alarming
words) from tasks/redteam.py, `benign` (everyday acts in the harmful requests' own
templates) and `everyday` (open everyday requests) from tasks/everyday.py: refusing any of
the last three is over-refusal. Because every answer is known, "the model got better" is a
measured number at every stage: SFT trains on `sft.jsonl`, the reward model on
`prefs.jsonl`, PPO samples `prompts.jsonl` (and with PPO-ptx also learns from
`ptx.jsonl`, the helpfulness demonstrations), and every stage is scored on the held-out
`eval.jsonl` by `grade()`, the gold judge (tasks/judge.py). This module builds the files.

The data mirror how real data are collected. Demonstrations are written like a
helpful-only demonstration set: most harmful prompts get a compliant (toy) reply and only
`harmful_refusal_rate` of them a refusal, as human demonstrators are inconsistent.
Comparisons are consistent: a correct answer beats a plausible mistake (a near miss, the
wrong format, rambling) or a refusal; on harmful prompts a refusal beats compliance and a
clean refusal beats a hedged one; on benign and everyday prompts an answer beats a
refusal. Minimal pairs put a harmful and a benign act in one template with the same
opener and closer, so the reward model must read the act, not the form.

Held-out prompts never occur in the training files: a helpfulness prompt's split is
decided by a hash of its text; the harmlessness families hold out whole templates and
topic words (see tasks/redteam.py).

    python -m tasks.suite --out prepared/tasks
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import string
import sys

from cli import UserError, entry_point
from data.files import atomic_write
from tasks import everyday, redteam
# The suite's public names, wherever they live: callers read them as tasks.suite.<name>
from tasks.families import (ANSWER_TYPE, COMPLY_FAMILIES, FAMILIES, HELDOUT_PHRASINGS, MISTAKE_KINDS,  # noqa: F401
                            PHRASES, RAMBLES, SAFETY_FAMILIES, TASK_FAMILIES, TEMPLATES, WORDS, has_filler,
                            make_mistake, make_task, split_of, with_filler)
from tasks.judge import extract_answer, grade, needs_answer  # noqa: F401

# ----------------------------------------------------------------------------- files

def build(seed: int = 0, sft_per_family: int = 600, prefs_per_family: int = 150, prompts_per_family: int = 10,
          eval_per_family: int = 100, eval_fraction: float = 0.2, safety_sft_per_family: int = 300,
          safety_prefs_per_family: int = 600, harmful_prompts: int = 1000, borderline_prompts: int = 250,
          refusal_pairs_per_family: int = 20, degenerate_pairs_per_family: int = 40,
          harmful_refusal_rate: float = 0.25, benign_prompts: int = 500, everyday_prompts: int = 250,
          minimal_pairs: int = 300, phrasing_eval_per_family: int = 50,
          filler_share: float = 0.0) -> dict[str, list[dict]]:
    """The files' records: sft, prefs, prompts, eval, eval_heldout_phrasing, and ptx (the
    helpfulness demonstrations again, for PPO-ptx). Per helpfulness family: sft_per_family
    demonstrations, prefs_per_family answer-vs-mistake pairs plus refusal_pairs_per_family
    answer-vs-refusal pairs, prompts_per_family RL prompts, eval_per_family held-out prompts
    (fewer when the family has fewer distinct held-out prompts). The harmful and borderline
    families get safety_sft_per_family demonstrations, safety_prefs_per_family pairs (more
    than the others: their held-out pair accuracy is a reported number), harmful_prompts and
    borderline_prompts RL prompts, and the same eval count; so do the benign and everyday
    families (benign_prompts, everyday_prompts RL prompts), and minimal_pairs harmful/benign
    twins add two pairs each. Every family also gets degenerate_pairs_per_family
    right-vs-broken pairs. eval_heldout_phrasing: phrasing_eval_per_family held-out prompts
    per helpfulness family in phrasings no file trains on (HELDOUT_PHRASINGS).

    filler_share: that share of the helpfulness demonstrations wraps its answer in filler
    ("Sure! 42 Hope this helps!", families.with_filler), as some demonstrators do; the
    preference pairs then hold no filler on either side (the judge marks both forms right,
    and round-1 data say nothing about which is better: the simulated users do).

    The RL prompts are mostly harmful (1,000 of 1,330 by default), with a quarter as many
    borderline ones to keep the policy answering look-alikes: that is where the reward
    model is reliable and where PPO has something to teach. On the helpfulness families the
    small reward model ranks mistakes nearly at chance, and PPO updates on their prompts, and
    on more borderline prompts, measurably lowered their accuracy (README, results). The
    benign and everyday RL prompts keep PPO from learning to refuse by a request's form."""
    if not 0 <= harmful_refusal_rate <= 1:
        raise ValueError(f"harmful_refusal_rate must be in [0, 1], got {harmful_refusal_rate}")
    if not 0 <= filler_share <= 1:
        raise ValueError(f"filler_share must be in [0, 1], got {filler_share}")
    out: dict[str, list[dict]] = {"sft": [], "prefs": [], "prompts": [], "eval": []}
    counts = {"sft": sft_per_family, "prefs": prefs_per_family, "prompts": prompts_per_family}
    for family in TASK_FAMILIES:
        train, evals = draw_task_prompts(family, random.Random(f"{seed}:{family}"), sum(counts.values()),
                                         eval_per_family, eval_fraction)
        rng = random.Random(f"{seed}:{family}:text")  # mistakes and refusal pairs: their own stream
        add_task_family(out, family, train, evals, counts, rng, filler_share, random.Random(f"{seed}:{family}:filler"))
        add_refusal_pairs(out, family, draw_task_prompts(family, rng, refusal_pairs_per_family, 0, eval_fraction)[0],
                          rng)
    safety_counts = {"sft": safety_sft_per_family, "prefs": safety_prefs_per_family}
    add_harmful(out, f"{seed}:harmful", {**safety_counts, "prompts": harmful_prompts}, eval_per_family,
                harmful_refusal_rate, eval_fraction)
    add_borderline(out, f"{seed}:borderline", {**safety_counts, "prompts": borderline_prompts}, eval_per_family,
                   eval_fraction)
    for family, n_prompts in (("benign", benign_prompts), ("everyday", everyday_prompts)):
        add_comply_family(out, family, f"{seed}:{family}", {**safety_counts, "prompts": n_prompts}, eval_per_family,
                          eval_fraction)
    add_minimal_pairs(out, random.Random(f"{seed}:minimal"), minimal_pairs, eval_fraction)
    out["eval_heldout_phrasing"] = heldout_phrasing_records(seed, phrasing_eval_per_family)
    for family in FAMILIES:  # a stream of its own: the other records do not change with this count
        add_degenerate_pairs(out, family, degenerate_pairs_per_family, random.Random(f"{seed}:{family}:degenerate"),
                             eval_fraction)
    # PPO-ptx's capability data: the helpfulness demonstrations, not the harmful ones, whose
    # compliant replies are exactly what the preferences overrule
    out["ptx"] = [r for r in out["sft"] if r["family"] in TASK_FAMILIES]
    return out


def heldout_phrasing_records(seed: int, per_family: int) -> list[dict]:
    """Held-out task records asked in HELDOUT_PHRASINGS (distinct prompts, each family from a
    stream of its own), marked `"phrasing": "heldout"`."""
    records = []
    for family in TASK_FAMILIES:
        rng, seen = random.Random(f"{seed}:{family}:heldout-phrasing"), set()
        for _ in range(100 * per_family + 100):
            if len(seen) >= per_family:
                break
            prompt, answer = make_task(family, rng, HELDOUT_PHRASINGS[family])
            if prompt in seen:
                continue
            seen.add(prompt)
            records.append({"family": family, "answer_type": ANSWER_TYPE[family], "phrasing": "heldout",
                            "id": f"{family}/eval-phrasing/{len(seen) - 1}", "prompt": prompt, "answer": answer,
                            "messages": _chat(prompt, answer)})
    return records


def draw_task_prompts(family: str, rng: random.Random, n_train: int, n_eval: int, eval_fraction: float):
    """n_train training (prompt, answer) pairs and up to n_eval distinct held-out ones."""
    train, evals, seen_eval = [], [], set()
    for _ in range(200_000):
        if len(train) >= n_train and len(evals) >= n_eval:
            break
        prompt, answer = make_task(family, rng)
        if split_of(prompt, eval_fraction) == "eval":
            if prompt not in seen_eval and len(evals) < n_eval:
                seen_eval.add(prompt)
                evals.append((prompt, answer))
        elif len(train) < n_train:
            train.append((prompt, answer))
    return train, evals


def _chat(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def add_task_family(out: dict, family: str, train: list, evals: list, counts: dict, rng: random.Random,
                    filler_share: float = 0.0, filler_rng: random.Random | None = None) -> None:
    base = {"family": family, "answer_type": ANSWER_TYPE[family]}
    sft, prefs = train[:counts["sft"]], train[counts["sft"]:counts["sft"] + counts["prefs"]]
    for i, (prompt, answer) in enumerate(sft):
        reply = with_filler(answer, filler_rng) if filler_share and filler_rng.random() < filler_share else answer
        out["sft"].append({**base, "id": f"{family}/sft/{i}", "answer": answer, "messages": _chat(prompt, reply),
                           **({"filler": True} if reply != answer else {})})
    for i, (prompt, answer) in enumerate(prefs):
        kind = MISTAKE_KINDS[i % len(MISTAKE_KINDS)]
        out["prefs"].append({**base, "id": f"{family}/prefs/{i}", "prompt": prompt, "answer": answer, "chosen": answer,
                             "rejected": make_mistake(family, prompt, answer, kind, rng, filler_free=filler_share > 0),
                             "kind": kind})
    for i, (prompt, answer) in enumerate(train[counts["sft"] + counts["prefs"]:]):
        out["prompts"].append({**base, "id": f"{family}/prompts/{i}", "prompt": prompt, "answer": answer})
    for i, (prompt, answer) in enumerate(evals):
        out["eval"].append({**base, "id": f"{family}/eval/{i}", "prompt": prompt, "answer": answer,
                            "messages": _chat(prompt, answer)})


def add_refusal_pairs(out: dict, family: str, pairs: list, rng: random.Random) -> None:
    """The answer beats a refusal on an ordinary task: the reward model must not learn
    that refusing is good in itself."""
    for i, (prompt, answer) in enumerate(pairs):
        out["prefs"].append({"family": family, "answer_type": ANSWER_TYPE[family], "id": f"{family}/prefs-refusal/{i}",
                             "prompt": prompt, "answer": answer, "chosen": answer, "rejected": redteam.refusal(rng),
                             "kind": "task_refusal"})


def make_degenerate(rng: random.Random, responses: list[str]) -> str:
    """A broken response, as a small model's samples often are: one of `responses` cut off
    mid-way, a few random characters, or the bare answer to some other task."""
    kind = rng.randrange(3)
    source = rng.choice(responses)
    if kind == 0 and len(source) >= 3:
        return source[:rng.randint(1, len(source) - 2)].rstrip() or source[0]
    if kind == 1:
        return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(2, 7)))
    return rng.choice([str(rng.randint(0, 120)), rng.choice(WORDS), rng.choice(WORDS)[::-1], rng.choice(PHRASES),
                       ", ".join(str(rng.randint(1, 99)) for _ in range(3)), rng.choice(string.ascii_letters)])


def add_degenerate_pairs(out: dict, family: str, n: int, rng: random.Random, eval_fraction: float) -> None:
    """The right response beats a broken one (kind `degenerate`). Without these the reward
    model, trained on well-formed replies only, scored broken text above a refusal, and PPO
    found that out: truncated compliance ("Sure. Wahc") and stray numbers took over the
    answers to harmful requests (README, results)."""
    for i in range(n):
        if family == "harmful":
            r = _distinct(redteam.make_harmful, rng, "train", 1, eval_fraction)[0]
            rec = {"family": family, "answer_type": "refusal", "prompt": r["prompt"], "category": r["category"]}
            chosen = redteam.refusal(rng, r["act"])
            sources = [chosen, redteam.compliance(rng, r["act"])]
        elif family == "borderline":
            r = _distinct(redteam.make_borderline, rng, "train", 1, eval_fraction)[0]
            rec = {"family": family, "answer_type": r["answer_type"], "subtype": r["subtype"], "prompt": r["prompt"],
                   "answer": r["answer"]}
            chosen, sources = r["answer"], [r["answer"], redteam.refusal(rng)]
        elif family in COMPLY_FAMILIES:
            r = _distinct(lambda g, split: everyday.make_request(family, g, split), rng, "train", 1, eval_fraction)[0]
            rec = {"family": family, "answer_type": "comply", "prompt": r["prompt"]}
            chosen = comply_reply(rng, r)
            sources = [chosen, redteam.refusal(rng)]
        else:
            (prompt, answer), = draw_task_prompts(family, rng, 1, 0, eval_fraction)[0]
            rec = {"family": family, "answer_type": ANSWER_TYPE[family], "prompt": prompt, "answer": answer}
            chosen, sources = answer, [answer]
        for _ in range(50):  # a broken response that the gold judge, too, rejects
            rejected = make_degenerate(rng, sources)
            if rejected.strip() and rejected != chosen and grade(rec, rejected) == 0.0:
                out["prefs"].append({**rec, "id": f"{family}/prefs-degenerate/{i}", "chosen": chosen,
                                     "rejected": rejected, "kind": "degenerate"})
                break


def _distinct(make, rng: random.Random, split: str, n: int, eval_fraction: float = 0.2) -> list[dict]:
    """n generated records with distinct prompts (fewer if the space runs out). Their text
    also hashes to the same split as the helpfulness prompts' (split_of), so no held-out
    prompt of any family can equal a training prompt of another."""
    found, seen = [], set()
    for _ in range(50 * n + 1000):
        if len(found) >= n:
            break
        rec = make(rng, split)
        if rec["prompt"] not in seen and split_of(rec["prompt"], eval_fraction) == split:
            seen.add(rec["prompt"])
            found.append(rec)
    return found


def _safety_prompts(make, seed: str, counts: dict, n_eval: int, eval_fraction: float) -> tuple[dict, list]:
    """Training prompts for each file (sft, prefs, prompts, drawn in that order) and the
    held-out ones, each from a random stream of its own: no file changes when another
    file's count does."""
    rng = random.Random(f"{seed}:prompts")
    train = _distinct(make, rng, "train", sum(counts.values()), eval_fraction)
    split, start = {}, 0
    for name in ("sft", "prefs", "prompts"):
        split[name], start = train[start:start + counts[name]], start + counts[name]
    return split, _distinct(make, random.Random(f"{seed}:eval"), "eval", n_eval, eval_fraction)


def add_harmful(out: dict, seed: str, counts: dict, n_eval: int, refusal_rate: float, eval_fraction: float) -> None:
    """Demonstrations comply except for refusal_rate of them; pairs always prefer the
    refusal (over compliance, and one in three over a hedged refusal that complies)."""
    base = {"family": "harmful", "answer_type": "refusal"}
    train, held_out = _safety_prompts(redteam.make_harmful, seed, counts, n_eval, eval_fraction)
    rng = random.Random(f"{seed}:text")
    keep = lambda r: {"prompt": r["prompt"], "category": r["category"]}  # noqa: E731
    refuse = set(rng.sample(range(len(train["sft"])), round(refusal_rate * len(train["sft"]))))
    for i, r in enumerate(train["sft"]):
        reply = redteam.refusal(rng, r["act"]) if i in refuse else redteam.compliance(rng, r["act"])
        out["sft"].append({**base, "id": f"harmful/sft/{i}", "category": r["category"], "refused": i in refuse,
                           "messages": _chat(r["prompt"], reply)})
    for i, r in enumerate(train["prefs"]):
        kind = "hedged" if i % 3 == 2 else "harmful"
        loser = redteam.hedged(rng, r["act"]) if kind == "hedged" else everyday.any_compliance(rng, r["act"])
        out["prefs"].append({**base, **keep(r), "id": f"harmful/prefs/{i}", "chosen": redteam.refusal(rng, r["act"]),
                             "rejected": loser, "kind": kind})
    for i, r in enumerate(train["prompts"]):
        out["prompts"].append({**base, **keep(r), "id": f"harmful/prompts/{i}"})
    for i, r in enumerate(held_out):
        out["eval"].append({**base, **keep(r), "id": f"harmful/eval/{i}", "heldout": r["heldout"],
                            "messages": _chat(r["prompt"], redteam.refusal(rng, r["act"]))})


def add_borderline(out: dict, seed: str, counts: dict, n_eval: int, eval_fraction: float) -> None:
    """Demonstrations answer; pairs prefer the answer over a refusal."""
    train, held_out = _safety_prompts(redteam.make_borderline, seed, counts, n_eval, eval_fraction)
    rng = random.Random(f"{seed}:text")

    def base(r):
        return {"family": "borderline", "answer_type": r["answer_type"], "subtype": r["subtype"], "answer": r["answer"]}
    for i, r in enumerate(train["sft"]):
        out["sft"].append({**base(r), "id": f"borderline/sft/{i}", "messages": _chat(r["prompt"], r["answer"])})
    for i, r in enumerate(train["prefs"]):
        out["prefs"].append({**base(r), "id": f"borderline/prefs/{i}", "prompt": r["prompt"], "chosen": r["answer"],
                             "rejected": redteam.refusal(rng), "kind": "borderline"})
    for i, r in enumerate(train["prompts"]):
        out["prompts"].append({**base(r), "id": f"borderline/prompts/{i}", "prompt": r["prompt"]})
    for i, r in enumerate(held_out):
        out["eval"].append({**base(r), "id": f"borderline/eval/{i}", "prompt": r["prompt"], "heldout": r["heldout"],
                            "messages": _chat(r["prompt"], r["answer"])})


def comply_reply(rng: random.Random, r: dict) -> str:
    """A toy answer to a benign or everyday request (from everyday.make_request)."""
    if r["family"] == "benign":
        return everyday.benign_compliance(rng, r["act"])
    return everyday.everyday_reply(rng, r["kind"], r["topic"])


def add_comply_family(out: dict, family: str, seed: str, counts: dict, n_eval: int, eval_fraction: float) -> None:
    """Benign or everyday requests: demonstrations answer (demonstrators agree that these are
    fine); pairs prefer the answer over a refusal, one in three over a refusal that opens
    agreeably ("Sure. I can't help with that.")."""
    make = lambda g, split: everyday.make_request(family, g, split)  # noqa: E731
    train, held_out = _safety_prompts(make, seed, counts, n_eval, eval_fraction)
    rng = random.Random(f"{seed}:text")
    act = lambda r: r.get("act", "do that")  # noqa: E731

    def base(r):
        return {"family": family, "answer_type": "comply", "category": r.get("category", r.get("kind"))}
    for i, r in enumerate(train["sft"]):
        out["sft"].append({**base(r), "id": f"{family}/sft/{i}", "messages": _chat(r["prompt"], comply_reply(rng, r))})
    for i, r in enumerate(train["prefs"]):
        loser = redteam.agreeable_refusal(rng, act(r)) if i % 3 == 2 else redteam.refusal(rng, act(r))
        out["prefs"].append({**base(r), "id": f"{family}/prefs/{i}", "prompt": r["prompt"],
                             "chosen": comply_reply(rng, r), "rejected": loser, "kind": family})
    for i, r in enumerate(train["prompts"]):
        out["prompts"].append({**base(r), "id": f"{family}/prompts/{i}", "prompt": r["prompt"]})
    for i, r in enumerate(held_out):
        out["eval"].append({**base(r), "id": f"{family}/eval/{i}", "prompt": r["prompt"], "heldout": r["heldout"],
                            "messages": _chat(r["prompt"], comply_reply(rng, r))})


def add_minimal_pairs(out: dict, rng: random.Random, n: int, eval_fraction: float) -> None:
    """n minimal pairs (kind `minimal_pair`): a harmful and a benign request in the same
    template with the same opener and closer, each with the same two answers filled with
    its own act — a refusal and a plain compliance. On the harmful one the refusal wins, on
    the benign one the compliance: only the act tells which."""
    made, seen = 0, set()
    for _ in range(50 * n + 100):
        if made >= n:
            break
        harmful, benign = everyday.make_minimal_pair(rng)
        if {harmful["prompt"], benign["prompt"]} & seen or any(
                split_of(r["prompt"], eval_fraction) != "train" for r in (harmful, benign)):
            continue
        seen |= {harmful["prompt"], benign["prompt"]}
        no, yes = rng.choice(redteam.REFUSALS), rng.choice(everyday.NEUTRAL_COMPLIANCES)
        for r, family in ((harmful, "harmful"), (benign, "benign")):
            answers = [no.format(act=r["act"]), yes.format(act=r["act"])]
            chosen, rejected = answers if family == "harmful" else answers[::-1]
            out["prefs"].append({"family": family, "answer_type": ANSWER_TYPE[family], "category": r["category"],
                                 "id": f"{family}/prefs-minimal/{made}", "act": r["act"], "prompt": r["prompt"],
                                 "chosen": chosen,
                                 "rejected": rejected, "kind": "minimal_pair"})
        made += 1


SUITE_FILES = ("sft", "prefs", "prompts", "eval", "eval_heldout_phrasing", "ptx")


def write(out_dir: str, **kwargs) -> dict[str, int]:
    """The suite's files in out_dir, and suite.json: every option that built them."""
    os.makedirs(out_dir, exist_ok=True)
    sets = build(**kwargs)
    for name, records in sets.items():
        atomic_write(os.path.join(out_dir, f"{name}.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    atomic_write(os.path.join(out_dir, "suite.json"), json.dumps(full_options(**kwargs), sort_keys=True) + "\n")
    return {name: len(records) for name, records in sets.items()}


def suite_options(out_dir: str) -> dict:
    """The options the suite in out_dir was built with (a suite that predates suite.json
    was built with the defaults)."""
    try:
        with open(os.path.join(out_dir, "suite.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return full_options()


def ensure_written(out_dir: str) -> None:
    """Write the default suite to out_dir unless it is already there (first use)."""
    if not all(os.path.exists(os.path.join(out_dir, f"{name}.jsonl")) for name in SUITE_FILES):
        print(f"writing the task suite to {out_dir}")
        write(out_dir)


def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="write the task suite (sft, prefs, prompts, eval, "
                                     "eval_heldout_phrasing, ptx JSONL): eight "
                                     "verifiable helpfulness families plus harmful, borderline, benign and everyday "
                                     "prompts")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "prepared", "tasks"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft-per-family", type=int, default=600, help="demonstrations per helpfulness family")
    parser.add_argument("--safety-sft-per-family", type=int, default=300,
                        help="demonstrations per harmlessness family (harmful, borderline, benign, everyday)")
    parser.add_argument("--harmful-refusal-rate", type=float, default=0.25,
                        help="share of harmful demonstrations that refuse (the rest comply, as in helpful-only data)")
    parser.add_argument("--prefs-per-family", type=int, default=150, help="preference pairs per family")
    parser.add_argument("--safety-prefs-per-family", type=int, default=600,
                        help="preference pairs per harmlessness family")
    parser.add_argument("--refusal-pairs-per-family", type=int, default=20,
                        help="extra answer-vs-refusal pairs per helpfulness family")
    parser.add_argument("--degenerate-pairs-per-family", type=int, default=40,
                        help="extra right-vs-broken-response pairs per family")
    parser.add_argument("--prompts-per-family", type=int, default=10, help="RL prompts per helpfulness family")
    parser.add_argument("--harmful-prompts", type=int, default=1000, help="harmful RL prompts")
    parser.add_argument("--borderline-prompts", type=int, default=250, help="borderline RL prompts")
    parser.add_argument("--benign-prompts", type=int, default=500,
                        help="RL prompts of benign acts in harmful templates")
    parser.add_argument("--everyday-prompts", type=int, default=250, help="RL prompts of open everyday requests")
    parser.add_argument("--minimal-pairs", type=int, default=300,
                        help="harmful/benign twins in one template (two preference pairs each)")
    parser.add_argument("--eval-per-family", type=int, default=100, help="held-out prompts per family (at most)")
    parser.add_argument("--phrasing-eval-per-family", type=int, default=50,
                        help="held-out prompts per helpfulness family in phrasings never trained on")
    parser.add_argument("--filler-share", type=float, default=0.0,
                        help="share of the helpfulness demonstrations wrapped in filler ('Sure! ... Hope this helps!')")
    return parser


def build_options(argv: list[str]) -> tuple[str, dict]:
    """(the output directory, build()'s every option) from a command line of this module;
    argparse errors exit as usual."""
    parser = cli_parser()
    args = parser.parse_args(argv)
    sizes = {k: v for k, v in vars(args).items() if k.endswith(("_per_family", "_prompts", "_pairs"))}
    if any(v < 0 for v in sizes.values()) or not 0 <= args.harmful_refusal_rate <= 1 or not 0 <= args.filler_share <= 1:
        parser.error("counts must be >= 0, --harmful-refusal-rate and --filler-share in [0, 1]")
    return args.out, full_options(seed=args.seed, harmful_refusal_rate=args.harmful_refusal_rate,
                                  filler_share=args.filler_share, **sizes)


def full_options(**kwargs) -> dict:
    """build()'s keyword options: its defaults, with `kwargs` over them."""
    defaults = {name: p.default for name, p in inspect.signature(build).parameters.items()}
    return {**defaults, **kwargs}


@entry_point
def main(argv=None) -> None:
    out, options = build_options(sys.argv[1:] if argv is None else argv)
    try:
        counts = write(out, **options)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    print(f"wrote {out}: " + ", ".join(f"{k}.jsonl {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
