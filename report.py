"""The main job's report: every stage evaluated on the same held-out prompts by the gold
judge, compared prompt by prompt, and written as report.json and report.md with plots.

What it measures, per stage: greedy helpfulness per task family (also in phrasings never
trained on), harmful refusal and three kinds of over-refusal, the hand-written everyday
requests; for SFT and the round-1 policy pass@k of sampled answers (the headroom); for
every policy its KL to the SFT model (one estimator for all), fixed and broken prompts
against SFT (McNemar's exact test) and wins and losses over all held-out prompts (the
sign test); for round 2 the feedback in numbers, the round-2 policy against round 1 and,
with the PPO learner, both reward models on held-out on-policy pairs (sampled here, labelled
by the judge). pipeline.py's eval stage calls evaluate() and write(); `cfg` is its
PipelineConfig. How the numbers are shown (report.md, plots, the record tables) is
report_render.py.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from cli import UserError, entry_point, parse_config
from data.files import atomic_write, read_json_or_none, write_json
from promotion import promotion
from report_plots import make_plots
from report_render import render_markdown, update_record_pages
from tasks.suite import TASK_FAMILIES, has_filler

REPO = os.path.dirname(os.path.abspath(__file__))


# The reward models are compared on the round-1 policy's answers to every held-out prompt,
# two at a time, drawn this many times: one draw gave 84 pairs (a standard error of ~5
# points), four give ~340 (~2.6)
ON_POLICY_DRAWS = 4


# Headroom in the report: K sampled answers per held-out helpfulness prompt at this
# temperature give pass@1 .. pass@K for SFT and PPO (evals.sampled_accuracy)
PASS_AT_K_SAMPLES = 8


PASS_AT_K_TEMPERATURE = 0.7


# Every policy's KL to the SFT model, one estimator for all (evals.sampled_kl): answers
# sampled at temperature 1 to this many held-out prompts spread over every family
KL_PROMPTS = 256


# The new request kind (tasks/novel.py: privacy, copyright, look-alikes), its held-out
# prompts only: this many of each kind, answered greedily by SFT and every policy
NOVEL_PER_KIND = {"mini": 4}


SAMPLE_FAMILIES = ("arithmetic", "compare", "case", "reverse", "harmful", "borderline", "benign", "everyday")


# Everyday requests written by hand apart from the task generators and never trained on:
# the over-refusal check outside the suite (evals.py --data takes any such file)
OUTSIDE_EVERYDAY = os.path.join(REPO, "tasks", "everyday_requests.jsonl")


def metrics_of(ckpt: str) -> list[dict]:
    """The rows of a stage's metrics.jsonl ([] without one)."""
    path = os.path.join(ckpt, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _last(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def evaluate(cfg, clock) -> dict:
    """The report of the run in cfg.out: greedy gold accuracy and safety rates of every
    stage on the held-out tasks, the same prompts answered by each stage, the numbers each
    stage logged, plots; `clock` (progress.PartTimes) gets the seconds of each part.
    report["records"] is the number of held-out prompts."""
    import torch

    import checkpoint
    from evals import load_task_records, paired_change, win_rate

    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    ckpt = lambda name: os.path.join(cfg.out, name)  # noqa: E731
    records = load_task_records(os.path.join(cfg.data, "tasks", "eval.jsonl"))
    outside = load_task_records(OUTSIDE_EVERYDAY)
    phrasing_file = os.path.join(cfg.data, "tasks", "eval_heldout_phrasing.jsonl")
    phrasing = load_task_records(phrasing_file) if os.path.exists(phrasing_file) else []
    examples = [next(r for r in records if r["family"] == f) for f in SAMPLE_FAMILIES if any(
        r["family"] == f for r in records)]
    novel = novel_records(NOVEL_PER_KIND.get(cfg.preset, 100))
    # the example prompts are answered by round 1's stages
    policy = cfg.align  # the stage whose checkpoint is round 1's policy: ppo or dpo
    report = {"preset": cfg.preset, "align": policy, "records": len(records), "stages": {}, "seconds": {},
              "samples": {s: [] for s in ("pretrain", "sft", policy)}}
    sft_model = checkpoint.load_for_inference(ckpt("sft"), device=device)[0]
    accuracy = {stage: evaluate_stage(ckpt(stage), records, device, report["samples"].get(stage), examples,
                                      headroom=stage in ("sft", policy), outside=outside, phrasing=phrasing,
                                      clock=clock, kl_reference=sft_model if stage not in ("pretrain", "sft") else None,
                                      novel=novel if stage != "pretrain" else ())
                for stage in ("pretrain", "sft", policy) + ((cfg.round2_policy(),) if cfg.round2() else ())
                + (("control_round2",) if cfg.round2() and cfg.control else ())}
    del sft_model

    prep = read_json_or_none(os.path.join(cfg.data, cfg.corpus_name(), "report.json")) or {}
    pre_rows, sft_rows, policy_rows = (metrics_of(ckpt(s)) for s in ("pretrain", "sft", policy))
    stages = report["stages"]
    stages["prepare"] = {"documents": prep.get("documents"), "tokens": prep.get("tokens"),
                         "bytes_per_token": prep.get("bytes_per_token"), "pii_replaced": prep.get("pii")}
    stages["pretrain"] = {"val_loss": _last(pre_rows, "val_loss"), "val_bpb": _last(pre_rows, "val_bpb"),
                          "unigram_val_loss": _last(pre_rows, "unigram_val_loss"),
                          "gold_accuracy": accuracy["pretrain"]["task_accuracy"],
                          **phrasing_keys(accuracy["pretrain"]),
                          "per_family": accuracy["pretrain"]["per_family"], "safety": accuracy["pretrain"]["safety"],
                          "outside_everyday": accuracy["pretrain"].get("outside_everyday")}
    stages["sft"] = {"gold_accuracy": accuracy["sft"]["task_accuracy"], **phrasing_keys(accuracy["sft"]),
                     "per_family": accuracy["sft"]["per_family"],
                     "safety": accuracy["sft"]["safety"], "outside_everyday": accuracy["sft"].get("outside_everyday"),
                     "heldout_loss": _last(sft_rows, "heldout_loss"),
                     "pass_at_k": accuracy["sft"]["pass_at_k"]}
    helpful = {stage: [x for x in accuracy[stage]["samples"] if x["family"] in TASK_FAMILIES] for stage in accuracy}
    # what every policy stage reports: gold numbers, against SFT prompt by prompt, headroom
    stages[policy] = {"gold_accuracy": accuracy[policy]["task_accuracy"], **phrasing_keys(accuracy[policy]),
                      "per_family": accuracy[policy]["per_family"],
                      "safety": accuracy[policy]["safety"], "outside_everyday": accuracy[policy].get("outside_everyday"),
                      "kl_to_sft": accuracy[policy]["kl_to_sft"],
                      "vs_sft": paired_change(helpful["sft"], helpful[policy]),
                      "win_rate_vs_sft": win_rate(accuracy["sft"]["samples"], accuracy[policy]["samples"]),
                      "pass_at_k": accuracy[policy]["pass_at_k"]}
    if phrasing:
        stages[policy]["vs_sft_heldout_phrasing"] = paired_change(
            accuracy["sft"]["heldout_phrasing"]["samples"], accuracy[policy]["heldout_phrasing"]["samples"])
    if policy == "ppo":
        rm_config = read_json_or_none(os.path.join(ckpt("rm"), "config.json")) or {}
        ppo_config = read_json_or_none(os.path.join(ckpt("ppo"), "config.json")) or {}
        rm_eval = rm_config.get("eval", {})
        stages["rm"] = {"accuracy": rm_eval.get("accuracy"), "margin": rm_eval.get("margin"),
                        "by_kind": {k: v["accuracy"] for k, v in rm_eval.get("by_kind", {}).items()}}
        stages["ppo"].update({
            "kl": _last(policy_rows, "objective/kl"), "score": _last(policy_rows, "objective/scores"),
            "reward": ppo_config.get("reward"), "rm_score_start": ppo_config.get("eval_start", {}).get("rm_score"),
            "rm_score_end": ppo_config.get("eval", {}).get("rm_score"), "advantage": ppo_config.get("advantage"),
            "samples_per_prompt": ppo_config.get("samples_per_prompt"),
            "greedy_curve": [{"step": r["step"], "gold_accuracy": r["eval/accuracy"]}
                             for r in policy_rows if "eval/accuracy" in r]})
    else:
        dpo_config = read_json_or_none(os.path.join(ckpt("dpo"), "train_config.json")) or {}
        stages["dpo"].update({
            "kl": _last(policy_rows, "kl"), "val_reward_accuracy": _last(policy_rows, "val_reward_accuracy"),
            "val_reward_margin": _last(policy_rows, "val_reward_margin"), "loss": dpo_config.get("loss"),
            "beta": dpo_config.get("beta"), "sft_coef": dpo_config.get("sft_coef"),
            "greedy_curve": [{"step": r["step"], "gold_accuracy": r["accuracy"]}
                             for r in policy_rows if "accuracy" in r]})
    if cfg.round2():
        with clock.part("round 2" + (": on-policy pairs, both reward models" if cfg.learner() == "ppo" else "")):
            stages.update(round2_report(cfg, records, accuracy, device))
        stages["promotion"] = promotion(accuracy[policy]["samples"], accuracy[cfg.round2_policy()]["samples"],
                                        policy, cfg.round2_policy())
    else:
        stages["promotion"] = {"shipped": policy, "reason": "round 1 only (--rounds 1)"}
    for stage, result in accuracy.items():  # the new request kind, where it was asked; the filler rate
        if "novel" in result and stage in stages:
            stages[stage]["novel"] = result["novel"]["summary"]
        if stage in stages:
            stages[stage]["filler_rate"] = filler_rate(result)
    if cfg.round2() and stages["round2"]["novel"]:  # round 2's entry carries the comparison too
        stages[cfg.round2_policy()]["novel"]["vs_round1"] = stages["round2"]["novel"]
    with clock.part("plots"):
        report["plots"] = make_plots(cfg.out, pre_rows, sft_rows, policy_rows if policy == "ppo" else [], accuracy,
                                     policy)
    return report


def write(out: str, report: dict) -> None:
    """report.json and report.md in `out`."""
    write_json(os.path.join(out, "report.json"), report)
    atomic_write(os.path.join(out, "report.md"), render_markdown(report))


def round2_report(cfg, records: list[dict], accuracy: dict, device) -> dict:
    """The report's round-2 stages: the feedback in numbers; the round-2 policy (and, with
    --control, the control) against round 1, prompt by prompt; with the PPO learner, both
    reward models on held-out on-policy pairs (round2_reward_models); stages.round2, the
    summary: the learner, round 2 against round 1 and against the control."""
    from evals import win_rate
    ckpt = lambda name: os.path.join(cfg.out, name)  # noqa: E731
    round1, round2 = cfg.align, cfg.round2_policy()
    feedback = read_json_or_none(os.path.join(ckpt("feedback"), "feedback.json")) or {}
    policy = policy_entry(accuracy, round2, round1)
    report = {"feedback": {k: feedback.get(k) for k in ("policy", "prompts", "novel", "votes", "preference_votes",
                                                        "ties", "thumbs",
                                                        "pairs", "rater_noise", "realised_disagreement",
                                                        "answers_right")}}
    report["round2"] = {"learner": cfg.learner(), "policy": round2, "vs_round1": policy[f"win_rate_vs_{round1}"],
                        "vs_control": None, "novel": novel_change(accuracy, round1, round2)}
    if "control_round2" in accuracy:
        control = policy_entry(accuracy, "control_round2", round1)
        rows = metrics_of(ckpt("control_round2"))
        control["kl"] = _last(rows, "objective/kl" if cfg.learner() == "ppo" else "kl")
        report["control_round2"] = control
        report["round2"]["vs_control"] = win_rate(accuracy["control_round2"]["samples"], accuracy[round2]["samples"])
    if cfg.learner() == "ppo":
        report.update(round2_reward_models(cfg, records, device))
        ppo2_config = read_json_or_none(os.path.join(ckpt("ppo_round2"), "config.json")) or {}
        policy.update({"kl": _last(metrics_of(ckpt("ppo_round2")), "objective/kl"), "reward": ppo2_config.get("reward"),
                       "init": cfg.ppo_round2_init})
    else:
        rows = metrics_of(ckpt("dpo_round2"))
        policy.update({"kl": _last(rows, "kl"), "val_reward_accuracy": _last(rows, "val_reward_accuracy"),
                       "init": cfg.dpo_round2_init, "feedback_weight": cfg.feedback_weight,
                       "greedy_curve": [{"step": r["step"], "gold_accuracy": r["accuracy"]}
                                        for r in rows if "accuracy" in r]})
    report[round2] = policy
    return report


def policy_entry(accuracy: dict, stage: str, round1: str) -> dict:
    """A round-2 policy's report entry: its gold numbers, KL to SFT, and round 1 against it
    prompt by prompt (vs_<round1>: McNemar on helpfulness; win_rate_vs_<round1>: every prompt)."""
    from evals import paired_change, win_rate
    helpful = {s: [x for x in accuracy[s]["samples"] if x["family"] in TASK_FAMILIES] for s in (round1, stage)}
    return {"gold_accuracy": accuracy[stage]["task_accuracy"], **phrasing_keys(accuracy[stage]),
            "per_family": accuracy[stage]["per_family"], "safety": accuracy[stage]["safety"],
            "outside_everyday": accuracy[stage].get("outside_everyday"), "round1": round1,
            "kl_to_sft": accuracy[stage]["kl_to_sft"],
            f"vs_{round1}": paired_change(helpful[round1], helpful[stage]),
            f"win_rate_vs_{round1}": win_rate(accuracy[round1]["samples"], accuracy[stage]["samples"])}


def round2_reward_models(cfg, records: list[dict], device) -> dict:
    """Both reward models on held-out on-policy pairs: two answers of the round-1 policy to
    each held-out prompt at its rollout temperature, ON_POLICY_DRAWS times over, labelled
    by the gold judge without noise (written to OUT/eval_onpolicy_pairs.jsonl)."""
    from collections import Counter

    import checkpoint
    from onpolicy import on_policy_accuracy, on_policy_pairs
    ckpt = lambda name: os.path.join(cfg.out, name)  # noqa: E731
    rollout = read_json_or_none(os.path.join(ckpt("ppo"), "train_config.json")) or {}
    policy, tok, _ = checkpoint.load_for_inference(ckpt("ppo"), device=device)
    pairs, counts = on_policy_pairs(policy, tok, records, temperature=rollout.get("temperature", 1.0), seed=0,
                                    max_new_tokens=rollout.get("max_new_tokens", 32), draws=ON_POLICY_DRAWS)
    del policy
    counts["by_family"] = dict(sorted(Counter(p["kind"] for p in pairs).items()))
    atomic_write(os.path.join(cfg.out, "eval_onpolicy_pairs.jsonl"),
                 "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    on_policy = on_policy_accuracy({"rm1": ckpt("rm"), "rm2": ckpt("rm_round2")}, pairs, device=device)
    rm2_eval = (read_json_or_none(os.path.join(ckpt("rm_round2"), "config.json")) or {}).get("eval", {})
    return {"rm_round2": {"accuracy": rm2_eval.get("accuracy"), "margin": rm2_eval.get("margin"),
                          "by_kind": {k: v["accuracy"] for k, v in rm2_eval.get("by_kind", {}).items()},
                          "on_policy_accuracy": {"rm1": on_policy["rm1"], "rm2": on_policy["rm2"]},
                          "on_policy_by_family": on_policy["by_kind"], "on_policy_pairs": counts,
                          "init": cfg.rm_round2_init, "feedback_weight": cfg.feedback_weight}}


def phrasing_keys(result: dict) -> dict:
    """A stage's helpfulness on the held-out phrasings (None without the file)."""
    held = result.get("heldout_phrasing")
    return {"gold_accuracy_heldout_phrasing": held and held["task_accuracy"],
            "per_family_heldout_phrasing": held and held["per_family"]}


def novel_records(per_kind: int) -> list[dict]:
    """The new request kind's held-out prompts, ready to grade: privacy and copyright
    requests are `harmful` records (a refusal is right), look-alikes `borderline` ones (the
    answer is right, a refusal wrong)."""
    from evals import gradable
    from tasks import novel
    return [gradable(r) for r in novel.make_records(per_kind, "eval", seed=0)]


def novel_summary(records: list[dict], samples: list[dict]) -> dict:
    """{"summary": the report's numbers (refusal of the requests to refuse, by kind, and
    the look-alikes' over-refusal), "samples": per prompt, for paired tests}."""
    kind = {r["id"]: r["kind"] for r in records}
    by = {k: [x for x in samples if kind[x["id"]] == k] for k in ("privacy", "copyright", "lookalike")}
    refuse = by["privacy"] + by["copyright"]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    summary = {"prompts": len(samples), "refusal": mean([x["score"] for x in refuse]),
               "refusal_by_kind": {k: mean([x["score"] for x in by[k]]) for k in ("privacy", "copyright")},
               "lookalike_over_refusal": mean([float(x["refused"]) for x in by["lookalike"]]),
               "lookalike_accuracy": mean([x["score"] for x in by["lookalike"]])}
    return {"summary": summary, "refusal_samples": refuse,
            "lookalike_samples": [{**x, "score": float(x["refused"])} for x in by["lookalike"]]}


def novel_change(accuracy: dict, round1: str, round2: str) -> dict | None:
    """stages.round2.novel: the new kind's refusal and look-alike over-refusal, and the
    users' preference (the filler rate of the helpfulness answers), for round 1, round 2 and
    the control (when it ran), with McNemar's exact p of round 2 against round 1 on the same
    prompts."""
    from evals import paired_change
    if "novel" not in accuracy.get(round2, {}):
        return None
    runs = {"round1": round1, "round2": round2, "control": "control_round2"}
    get = lambda key, name: accuracy[runs[name]]["novel"]["summary"][key] if runs[name] in accuracy else None  # noqa
    out = {}
    for name, key, samples in (("refusal", "refusal", "refusal_samples"),
                               ("over_refusal", "lookalike_over_refusal", "lookalike_samples")):
        change = paired_change(accuracy[round1]["novel"][samples], accuracy[round2]["novel"][samples])
        out[name] = {run: get(key, run) for run in runs} | {  # scores: refused (right or not), so fixed = newly refused
            "p_value": change["p_value"], "newly_refused": change["fixed"], "newly_answered": change["broken"]}
    change = paired_change(accuracy[round1]["filler_samples"], accuracy[round2]["filler_samples"])
    out["preference"] = {run: filler_rate(accuracy[runs[run]]) if runs[run] in accuracy else None for run in runs} | {
        "p_value": change["p_value"], "newly_with_filler": change["fixed"], "newly_plain": change["broken"]}
    return out


def filler_rate(result: dict) -> float | None:
    """The share of a stage's greedy helpfulness answers wrapped in filler (families.has_filler)."""
    rows = result.get("filler_samples") or []
    return sum(x["score"] for x in rows) / len(rows) if rows else None


def evaluate_stage(ckpt: str, records: list[dict], device, samples: list | None, examples: list[dict],
                   headroom: bool = False, outside: list[dict] = (), phrasing: list[dict] = (), clock=None,
                   kl_reference=None, novel: list[dict] = ()) -> dict:
    """A checkpoint's greedy answers to the held-out records, judged (evals.task_accuracy);
    with `headroom`, also pass@k of PASS_AT_K_SAMPLES sampled answers per helpfulness
    record (result["pass_at_k"]); the share of the `outside` everyday requests it refuses
    (result["outside_everyday"]: {"prompts", "over_refusal", "refused"}); its answers to
    the example prompts appended to `samples` (None: none); its greedy answers to the
    `phrasing` records (tasks asked in phrasings never trained on) as
    result["heldout_phrasing"]; with a `kl_reference` model, its KL to it on KL_PROMPTS
    held-out prompts as result["kl_to_sft"]; its greedy answers to the `novel` records (the
    new request kind) as result["novel"] (novel_summary). `clock` (progress.PartTimes)
    gets the seconds of the greedy answers and of the sampling."""
    import checkpoint
    import progress
    from data.text.chat import encode_prompt
    from evals import sampled_accuracy, sampled_kl, task_accuracy

    clock = clock or progress.PartTimes()
    with clock.part("greedy answers, every checkpoint"):
        model, tok, _ = checkpoint.load_for_inference(ckpt, device=device)
        result = task_accuracy(model, tok, records)
        if outside:
            checked = task_accuracy(model, tok, outside)
            result["outside_everyday"] = {
                "prompts": len(outside), "over_refusal": checked["safety"]["open_request_over_refusal"],
                "refused": [{"prompt": x["prompt"], "response": x["response"]} for x in checked["samples"]
                            if x["refused"]]}
        if phrasing:
            result["heldout_phrasing"] = task_accuracy(model, tok, phrasing)
        if novel:
            result["novel"] = novel_summary(novel, task_accuracy(model, tok, novel)["samples"])
        # the users' preference about form: the share of helpfulness answers wrapped in filler
        result["filler_samples"] = [{"prompt": x["prompt"], "score": float(has_filler(x["response"]))}
                                    for x in result["samples"] if x["family"] in TASK_FAMILIES]
    if kl_reference is not None:
        with clock.part("KL to SFT"):
            result["kl_to_sft"] = sampled_kl(model, kl_reference, tok, records, KL_PROMPTS, seed=0)
    if headroom:
        with clock.part(f"pass@k: {PASS_AT_K_SAMPLES} samples per prompt"):
            result["pass_at_k"] = sampled_accuracy(model, tok, records, PASS_AT_K_SAMPLES, PASS_AT_K_TEMPERATURE,
                                                   seed=0)
    if samples is not None:
        outs = model.generate([encode_prompt(tok, [{"role": "user", "content": r["prompt"]}]) for r in examples], 24,
                              tok.pad_id, temperature=0.0, stop_tokens=[tok.end_id])
        expected = {"refusal": "(a refusal)", "comply": "(any answer but a refusal)"}
        samples += [{"prompt": r["prompt"], "answer": r.get("answer", expected.get(r.get("answer_type"), "-")),
                     "response": tok.decode_reply(o)}
                    for r, o in zip(examples, outs)]
    return result


@dataclass
class RecordConfig:
    record: str = field(default="", metadata={"help": "the committed report.json of the run of record, e.g. "
                                              "docs/runs/<date>/report.json"})


@entry_point
def main(argv=None) -> None:
    """Rewrite the results tables of README.md and docs/results.md from the run of record."""
    cfg = parse_config(RecordConfig, argv, description=main.__doc__)
    if not cfg.record:
        raise UserError("--record is required (a committed report.json)")
    print("updated: " + (", ".join(update_record_pages(cfg.record)) or "nothing (already current)"))


if __name__ == "__main__":
    main()
