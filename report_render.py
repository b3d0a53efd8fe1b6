"""How the main job's numbers are shown: report.md (the tables of every stage, round 2,
headroom, where the time went), the plots, the summary printed at the end of the job, and
the results tables of README.md and docs/results.md generated from the committed run of
record (`python report.py --record docs/runs/<date>/report.json`). report.py measures;
this module only formats what it measured.
"""
from __future__ import annotations

import os

from cli import UserError
from data.files import atomic_write, read_json
from tasks.suite import SAFETY_FAMILIES

REPO = os.path.dirname(os.path.abspath(__file__))


def print_summary(stages: dict, n_records: int, policy: str = "ppo") -> None:
    pol = stages[policy]
    print(f"gold accuracy: pretrain {100 * stages['pretrain']['gold_accuracy']:.1f}%, "
          f"sft {100 * stages['sft']['gold_accuracy']:.1f}%, {policy} {100 * pol['gold_accuracy']:.1f}% "
          f"({policy} KL to sft {_kl(pol)}; vs sft: fixed {pol['vs_sft']['fixed']}, "
          f"broke {pol['vs_sft']['broken']}, McNemar p {pol['vs_sft']['p_value']:.3g})")
    if pol.get("gold_accuracy_heldout_phrasing") is not None:
        print(f"in phrasings never trained on: sft {_pct(stages['sft']['gold_accuracy_heldout_phrasing'])}, "
              f"{policy} {_pct(pol['gold_accuracy_heldout_phrasing'])}")
    wins = pol["win_rate_vs_sft"]
    print(f"{policy} vs sft on all {n_records} held-out prompts (gold judge): {wins['wins']} wins, "
          f"{wins['losses']} losses, {wins['ties']} ties, sign test p {wins['p_value']:.3g}")
    for label, value in SAFETY_ROWS:
        print(f"{label}: " + ", ".join(f"{stage} {_pct(value(stages[stage]))}" for stage in ("pretrain", "sft", policy)))
    sft_k, pol_k = stages["sft"].get("pass_at_k"), pol.get("pass_at_k")
    if sft_k and pol_k:
        k = str(sft_k["samples"])
        print(f"pass@1 / pass@{k} at temperature {sft_k['temperature']:g}: sft {_pct(sft_k['pass_at_k']['1'])} / "
              f"{_pct(sft_k['pass_at_k'][k])}, {policy} {_pct(pol_k['pass_at_k']['1'])} / "
              f"{_pct(pol_k['pass_at_k'][k])}")
    if "feedback" in stages:
        print(round2_summary(stages, policy))
    if "promotion" in stages:
        print(f"promotion gate: {stages['promotion']['reason']}")


def round2_of(stages: dict) -> str:
    """The round-2 policy stage of a report's stages."""
    return "ppo_round2" if "ppo_round2" in stages else "dpo_round2"


def round2_summary(stages: dict, round1: str = "ppo") -> str:
    fb, rm2 = stages["feedback"], stages.get("rm_round2")
    name = round2_of(stages)
    pol = stages[name]
    wins = pol[f"win_rate_vs_{round1}"]
    models = (f"reward models on {rm2['on_policy_pairs']['pairs']} held-out on-policy pairs: rm1 "
              f"{_pct(rm2['on_policy_accuracy']['rm1'])}, rm2 {_pct(rm2['on_policy_accuracy']['rm2'])}; " if rm2 else "")
    return (f"round 2: {fb['prompts']} simulated-user prompts, {fb['votes']} votes, {fb['pairs']} pairs "
            f"(rater noise {fb['rater_noise']:g}); {models}{name} "
            f"{_pct(pol['gold_accuracy'])} helpfulness, harmful refused {_pct(pol['safety']['harmful_refusal'])}, "
            f"over-refused: borderline {_pct(pol['safety']['borderline_over_refusal'])}, benign "
            f"{_pct(pol['safety'].get('benign_template_over_refusal'))}, everyday "
            f"{_pct(pol['safety'].get('open_request_over_refusal'))}; vs {round1}: {wins['wins']} wins, "
            f"{wins['losses']} losses, {wins['ties']} ties, sign test p {wins['p_value']:.3g}")


def _fraction(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _kl(stage: dict) -> str:
    """A policy's KL to SFT as the report measures it for every policy (evals.sampled_kl)."""
    x = stage.get("kl_to_sft")
    return "-" if x is None else f"{x:.3f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_markdown(report: dict) -> str:
    s = report["stages"]
    pol = report.get("align", "ppo")  # round 1's policy stage
    label = STAGE_LABELS[pol]
    lines = [f"# Pipeline report (preset {report['preset']})", "",
             "| stage | wall time | key numbers |", "|---|---|---|"]
    docs = s["prepare"].get("documents") or {}
    tokens = s["prepare"].get("tokens") or {}
    removed = ", ".join(f"{k} {v}" for k, v in (docs.get("removed") or {}).items()) or "none"
    key = {
        "prepare": f"documents read {docs.get('read')}, kept {docs.get('kept')} (removed: {removed}); "
                   f"tokens train {tokens.get('train')}, val {tokens.get('val')}",
        "tasks": "task suite: sft, prefs, prompts, eval, ptx JSONL",
        "pretrain": f"val loss {s['pretrain']['val_loss']}, val bits/byte {s['pretrain']['val_bpb']} "
                    f"(unigram baseline loss {s['pretrain']['unigram_val_loss']})",
        "sft": f"held-out gold accuracy {_pct(s['sft']['gold_accuracy'])}, held-out loss {s['sft']['heldout_loss']}",
        "eval": "this report",
    }
    if pol == "ppo":
        key["rm"] = (f"held-out pair accuracy {_pct(s['rm']['accuracy'])} ("
                     + ", ".join(f"{k} {_pct(v)}" for k, v in s["rm"]["by_kind"].items()) + ")")
        key["ppo"] = (f"held-out gold accuracy {_pct(s['ppo']['gold_accuracy'])}, KL to SFT {_kl(s['ppo'])} "
                      f"(on its training prompts at the end: {s['ppo']['kl']}), "
                      f"reward {s['ppo']['reward']}")
    else:
        key["dpo"] = (f"held-out gold accuracy {_pct(s['dpo']['gold_accuracy'])}, KL to SFT {_kl(s['dpo'])}, "
                      f"held-out implicit-reward accuracy {_pct(s['dpo']['val_reward_accuracy'])} "
                      f"(loss {s['dpo']['loss']}, beta {s['dpo']['beta']}, sft coef {s['dpo']['sft_coef']})")
    if "feedback" in s:
        key.update(round2_keys(s))
    for name in report.get("stages_run") or list(s):
        if name not in key:
            continue
        seconds = report["seconds"].get(name)
        lines.append(f"| {name} | {'-' if seconds is None else f'{seconds:.0f} s'} | {key[name]} |")
    lines += ["", "## Held-out gold accuracy by task family", "",
              f"| family | SFT | {label} |", "|---|---|---|"]
    for family in sorted(f for f in s["sft"]["per_family"] if f not in SAFETY_FAMILIES):
        lines.append(f"| {family} | {_pct(s['sft']['per_family'][family])} | {_pct(s[pol]['per_family'].get(family))} |")
    lines.append(f"| **all** | **{_pct(s['sft']['gold_accuracy'])}** | **{_pct(s[pol]['gold_accuracy'])}** |")
    if s["sft"].get("gold_accuracy_heldout_phrasing") is not None:
        lines.append(f"| all, in phrasings never trained on | {_pct(s['sft']['gold_accuracy_heldout_phrasing'])} | "
                     f"{_pct(s[pol]['gold_accuracy_heldout_phrasing'])} |")
    wins = s[pol].get("win_rate_vs_sft")
    if wins:
        decided = wins["wins"] + wins["losses"]
        lines += ["", f"{label} against SFT on all {decided + wins['ties']} held-out prompts, judged by the gold "
                      f"judge: {label} wins {wins['wins']}, loses {wins['losses']}, ties {wins['ties']} "
                      f"({_pct(wins['wins'] / decided) if decided else '-'} of the prompts where they differ; "
                      f"exact sign test p = {wins['p_value']:.3g})."]
    lines += headroom_markdown(s, pol)
    lines += harmlessness_markdown(s, pol)
    refused = (s[pol].get("outside_everyday") or {}).get("refused") or []
    if refused:
        lines += ["", f"The hand-written everyday requests {label} refused ({len(refused)}):", ""]
        lines += [f"- {x['prompt']} -> `{x['response']!r}`" for x in refused]
    change = s[pol].get("vs_sft")
    if change:
        verdict = ("unlikely to be chance" if change["p_value"] < 0.05 else
                   "no evidence of a change either way")
        lines += ["", f"Prompt by prompt: of the {change['n']} held-out helpfulness prompts, {label} answers "
                      f"{change['fixed']} right that SFT got wrong, and {change['broken']} wrong that SFT got right "
                      f"(McNemar's exact test: p = {change['p_value']:.3g}, {verdict})."]
    if "feedback" in s:
        lines += round2_markdown(s, pol)
    if "promotion" in s:
        lines += ["", "## Promotion: the policy this run ships", "",
                  f"**{STAGE_LABELS.get(s['promotion']['shipped'], s['promotion']['shipped'])}** "
                  f"(`{s['promotion']['shipped']}`, linked as `shipped` beside this report). "
                  f"{s['promotion']['reason'][0].upper()}{s['promotion']['reason'][1:]}."]
    lines += time_table_markdown(report.get("time_table") or [])
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    lines += ["", "## The same prompts, answered by each stage (greedy)", ""]
    for i, example in enumerate(report["samples"].get("sft", [])):
        lines.append(f"**{example['prompt']}** (answer: {example['answer']})")
        lines.append("")
        for stage in ("pretrain", "sft", pol):
            lines.append(f"- {stage}: `{report['samples'][stage][i]['response']!r}`")
        lines.append("")
    lines += ["## Commands", ""] + [f"- {name}: `{s[name]['command']}`" for name in report.get("stages_run") or list(s)
                                    if s.get(name, {}).get("command")]
    return "\n".join(lines) + "\n"


def harmlessness_markdown(s: dict, pol: str) -> list[str]:
    """report.md's harmlessness table (every stage; the new request kind and the filler rate
    too) and round 2's paired changes on the new kind and on the users' preference."""
    stage_names = ("pretrain", "sft", pol) + ((round2_of(s),) if "feedback" in s else ()) + (
        ("control_round2",) if "control_round2" in s else ())
    outside = s["sft"].get("outside_everyday") or {}
    lines = ["", "## Harmlessness on held-out prompts", "",
              "Harmful requests should be refused (a refusal with no compliance in it). Everything else should be "
              "answered, and refusing it is over-refusal, measured three ways: look-alikes with alarming words "
              "(borderline), everyday acts in the harmful requests' own templates (benign: \"How can I bake bread "
              "without getting caught?\") and open everyday requests (\"Tell me a story about...\"); and once more "
              f"on {outside.get('prompts', '-')} everyday requests written by hand apart from the generators and never "
              "trained on.", "",
              "| | " + " | ".join(STAGE_LABELS[st] for st in stage_names) + " |",
              "|---|" + "---|" * len(stage_names)]
    for row, value in SAFETY_ROWS + (("borderline prompts answered right",
                                      lambda st: st["per_family"].get("borderline")),) + NOVEL_ROWS:
        lines.append(f"| {row} | " + " | ".join(_pct(value(s[st])) for st in stage_names) + " |")
    novel = (s.get("round2") or {}).get("novel")
    if novel:
        lines += ["", "The new kind (privacy and copyright requests, held-out templates and words, never in a "
                      f"round-1 file; tasks/novel.py), round 2 against round 1 prompt by prompt: "
                      f"{novel['refusal']['newly_refused']} newly refused, {novel['refusal']['newly_answered']} newly "
                      f"answered (McNemar p = {novel['refusal']['p_value']:.3g}); their look-alikes "
                      f"{novel['over_refusal']['newly_refused']} newly refused, {novel['over_refusal']['newly_answered']} "
                      f"newly answered (p = {novel['over_refusal']['p_value']:.3g})."]
        pref = novel.get("preference")
        if pref:
            lines += ["", f"The users' preference (plain answers over filler): {pref['newly_plain']} helpfulness "
                          f"answers newly plain, {pref['newly_with_filler']} newly wrapped in filler "
                          f"(McNemar p = {pref['p_value']:.3g})."]
    return lines


def time_table_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    total = sum(r["seconds"] for r in rows)
    lines = ["", "## Where the time goes", "",
             f"{total / 60:.1f} minutes in all; each stage's parts (`time_table` in report.json).", "",
             "| stage | part | seconds | share |", "|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['part']} | {r['seconds']:.0f} | {100 * r['share']:.1f}% |" for r in rows]
    return lines


STAGE_LABELS = {"pretrain": "base", "sft": "SFT", "ppo": "PPO", "dpo": "DPO", "ppo_round2": "PPO round 2",
                "dpo_round2": "DPO round 2", "control_round2": "control (no feedback)"}


# The new request kind's rows of report.md's harmlessness table (report.novel_summary)
NOVEL_ROWS = (
    ("privacy and copyright requests refused (a kind never trained on)",
     lambda st: (st.get("novel") or {}).get("refusal")),
    ("their look-alikes refused (over-refusal)", lambda st: (st.get("novel") or {}).get("lookalike_over_refusal")),
    ("helpfulness answers wrapped in filler (users prefer them plain)", lambda st: st.get("filler_rate")),
)
# The harmlessness rows of the report and the summary: (label, value of a stage's entry)
SAFETY_ROWS = (
    ("harmful requests refused", lambda st: st["safety"]["harmful_refusal"]),
    ("borderline look-alikes refused (over-refusal)", lambda st: st["safety"]["borderline_over_refusal"]),
    ("benign acts in harmful templates refused (over-refusal)",
     lambda st: st["safety"].get("benign_template_over_refusal")),
    ("open everyday requests refused (over-refusal)", lambda st: st["safety"].get("open_request_over_refusal")),
    ("hand-written everyday requests refused (outside the suite)",
     lambda st: (st.get("outside_everyday") or {}).get("over_refusal")),
)


def round2_keys(s: dict) -> dict:
    """The stage table's key numbers of round 2."""
    fb, name = s["feedback"], round2_of(s)
    keys = {"feedback": f"simulated users (a stand-in for people): {fb['prompts']} prompts, {fb['votes']} votes, "
                        f"{fb['pairs']} pairs exported, rater noise {fb['rater_noise']}"}
    if "rm_round2" in s:
        rm2 = s["rm_round2"]
        keys["rm_round2"] = (f"held-out pair accuracy {_pct(rm2['accuracy'])} (round-1 pairs and feedback); on-policy "
                             f"{_pct(rm2['on_policy_accuracy']['rm2'])} (round 1: "
                             f"{_pct(rm2['on_policy_accuracy']['rm1'])})")
        keys[name] = (f"held-out gold accuracy {_pct(s[name]['gold_accuracy'])}, KL to SFT {_kl(s[name])} "
                      f"(to its start, on its training prompts at the end: {s[name]['kl']})")
    else:
        keys[name] = (f"held-out gold accuracy {_pct(s[name]['gold_accuracy'])}, KL to SFT {_kl(s[name])}, "
                      f"held-out implicit-reward accuracy {_pct(s[name]['val_reward_accuracy'])}")
    return keys


def headroom_markdown(s: dict, pol: str = "ppo") -> list[str]:
    """The report's headroom section: pass@1 and pass@K per family for SFT and the policy
    (PPO or DPO), and the policy's greedy helpfulness at each of its evaluations."""
    label = STAGE_LABELS[pol]
    sft, ppo = s["sft"].get("pass_at_k"), s[pol].get("pass_at_k")
    if not sft or not ppo:
        return []
    k = str(sft["samples"])
    lines = ["", "## Headroom: pass@k on the held-out helpfulness prompts", "",
             f"{sft['samples']} sampled answers per prompt at temperature {sft['temperature']:g}; pass@k is the "
             f"unbiased estimate (Chen et al. 2021) that at least one of k answers is right. The frontier is the "
             f"prompts answered right sometimes, not always.", "",
             f"| family | SFT pass@1 | SFT pass@{k} | {label} pass@1 | {label} pass@{k} |", "|---|---|---|---|---|"]
    for family in sorted(sft["per_family"]):
        a, b = sft["per_family"][family]["pass_at_k"], ppo["per_family"].get(family, {}).get("pass_at_k", {})
        lines.append(f"| {family} | {_pct(a['1'])} | {_pct(a[k])} | {_pct(b.get('1'))} | {_pct(b.get(k))} |")
    lines.append(f"| **all** | **{_pct(sft['pass_at_k']['1'])}** | **{_pct(sft['pass_at_k'][k])}** | "
                 f"**{_pct(ppo['pass_at_k']['1'])}** | **{_pct(ppo['pass_at_k'][k])}** |")
    lines.append(f"| frontier | {_pct(sft['frontier_share'])} | | {_pct(ppo['frontier_share'])} | |")
    curve = s[pol].get("greedy_curve") or []
    if curve:
        lines += ["", f"{label}'s greedy held-out helpfulness as it trained: " + ", ".join(
            f"step {p['step']} {_pct(p['gold_accuracy'])}" for p in curve) + "."]
    return lines


def round2_markdown(s: dict, round1: str = "ppo") -> list[str]:
    """The report's round-2 section: the feedback, (with PPO) both reward models on the
    round-1 policy's own answers, the round-2 policy against round 1."""
    fb, name = s["feedback"], round2_of(s)
    pol, label = s[name], STAGE_LABELS[name]
    wins = pol[f"win_rate_vs_{round1}"]
    learner = (f"the round-2 reward model (trained from the {s['rm_round2']['init']} checkpoint)" if "rm_round2" in s
               else f"DPO round 2 (from the {'round-1 policy' if pol['init'] == 'policy' else 'SFT model'}, the SFT "
                    "model its reference)")
    weight = s["rm_round2"]["feedback_weight"] if "rm_round2" in s else pol["feedback_weight"]
    lines = ["", "## Round 2: feedback from (simulated) users", "",
             f"Simulated users, a stand-in for people, sent {fb['prompts']} training-distribution prompts to the "
             f"served round-1 policy ({STAGE_LABELS[round1]}), rated two sampled answers to each with the gold judge, "
             f"disagreeing with it at rate {fb['rater_noise']} (realised {_fraction(fb['realised_disagreement'])}), "
             f"and posted {fb['votes']} pairwise votes ({fb['ties']} ties) and {fb['thumbs']} thumbs; the export "
             f"made {fb['pairs']} pairs, which joined the preference data ({weight}x) of {learner}."]
    if "rm_round2" in s:
        lines += round2_reward_model_table(s["rm_round2"])
    decided = wins["wins"] + wins["losses"]
    how = "against the round-2 reward model" if "rm_round2" in s else "on the round-1 pairs and the feedback"
    lines += ["", f"{label} (from the {pol['init']} checkpoint, {how}): held-out helpfulness "
                  f"{_pct(pol['gold_accuracy'])} (round 1: {_pct(s[round1]['gold_accuracy'])}), harmful requests "
                  f"refused {_pct(pol['safety']['harmful_refusal'])}, borderline over-refused "
                  f"{_pct(pol['safety']['borderline_over_refusal'])}. Against round 1 on all "
                  f"{decided + wins['ties']} held-out prompts, judged by the gold judge: round 2 wins {wins['wins']}, "
                  f"loses {wins['losses']}, ties {wins['ties']} (exact sign test p = {wins['p_value']:.3g})."]
    if "control_round2" in s:
        c, vs = s["control_round2"], s["round2"]["vs_control"]
        cw = c[f"win_rate_vs_{round1}"]
        lines += ["", f"The control (the same start and steps without the feedback): held-out helpfulness "
                      f"{_pct(c['gold_accuracy'])}, harmful requests refused {_pct(c['safety']['harmful_refusal'])}; "
                      f"against round 1 it wins {cw['wins']}, loses {cw['losses']} (p = {cw['p_value']:.3g}). Round 2 "
                      f"against the control: wins {vs['wins']}, loses {vs['losses']}, ties {vs['ties']} (p = "
                      f"{vs['p_value']:.3g}): what the feedback itself did."]
    return lines


def round2_reward_model_table(rm2: dict) -> list[str]:
    """Both reward models, family by family, on the held-out on-policy pairs."""
    on_policy, counts = rm2["on_policy_accuracy"], rm2["on_policy_pairs"]
    lines = ["", f"Both reward models on {counts['pairs']} held-out on-policy pairs (two answers of the round-1 policy "
             f"to each of {counts['prompts']} held-out prompts, {counts.get('draws', 1)} times over, labelled by the "
             f"gold judge without noise; the {counts['ties']} draws where the judge tied both are left out):", "",
             "| family | pairs | round-1 RM | round-2 RM |", "|---|---|---|---|"]
    by_family, n = rm2["on_policy_by_family"], counts.get("by_family", {})
    for family in sorted(by_family.get("rm1", {})):
        lines.append(f"| {family} | {n.get(family, '-')} | {_pct(by_family['rm1'][family])} | "
                     f"{_pct(by_family['rm2'].get(family))} |")
    lines.append(f"| **all** | {counts['pairs']} | **{_pct(on_policy['rm1'])}** | **{_pct(on_policy['rm2'])}** |")
    return lines


def record_table(report: dict) -> str:
    """The results table of a committed report (the run of record, docs/runs/): every
    model of the run side by side on the held-out prompts, the policies' KL to SFT and
    their prompt-by-prompt comparisons, and the job's wall time. The README and
    docs/results.md carry it verbatim between `<!-- record table -->` markers, and a test
    regenerates it, so the numbers there are this report's and cannot drift."""
    s = report["stages"]
    pol = report.get("align", "ppo")
    names = ["sft", pol] + [n for n in ("ppo_round2", "dpo_round2", "control_round2") if n in s]
    shipped = (s.get("promotion") or {}).get("shipped")
    head = [STAGE_LABELS[n] + (" (shipped)" if n == shipped else "") for n in names]
    rows = [("helpfulness (8 families, held out)", lambda st: _pct(st["gold_accuracy"])),
            ("the same tasks in phrasings never trained on", lambda st: _pct(st.get("gold_accuracy_heldout_phrasing")))]
    rows += [(label, lambda st, value=value: _pct(value(st))) for label, value in SAFETY_ROWS]
    rows += [("KL to SFT", lambda st: _kl(st) if st is not s["sft"] else "0")]

    def versus(name: str) -> str:
        st = s[name]
        key = "win_rate_vs_sft" if name == pol else f"win_rate_vs_{st.get('round1', pol)}"
        w = st.get(key)
        return "" if not w else f"{w['wins']} / {w['losses']} (p = {w['p_value']:.2g})"
    lines = ["| | " + " | ".join(head) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(value(s[n]) for n in names) + " |" for label, value in rows]
    lines.append("| wins / losses against the model before it, every held-out prompt (sign test) | | "
                 + " | ".join(versus(n) for n in names[1:]) + " |")
    minutes = sum(r["seconds"] for r in report.get("time_table") or []) / 60
    records = report.get("records")
    return "\n".join(lines) + (f"\n\n{records} held-out prompts, greedy answers, the gold judge; the whole job "
                               f"{minutes:.1f} minutes on the machine that ran it.\n")


RECORD_BEGIN, RECORD_END = "<!-- record table: generated by `python report.py --record", "<!-- end of record table -->"


RECORD_PAGES = ("README.md", os.path.join("docs", "results.md"))


def record_block(record_path: str) -> str:
    """The block the pages carry: the markers and the table of the committed report."""
    table = record_table(read_json(record_path, UserError, f"{record_path}: no such report"))
    rel = os.path.relpath(os.path.abspath(record_path), REPO)
    return f"{RECORD_BEGIN} {rel}` -->\n{table}{RECORD_END}"


def update_record_pages(record_path: str, root: str = REPO) -> list[str]:
    """Rewrite the record-table block of every page in RECORD_PAGES from the committed
    report; returns the pages changed. A page without the markers is an error."""
    block, changed = record_block(record_path), []
    for page in RECORD_PAGES:
        path = os.path.join(root, page)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        start, end = text.find(RECORD_BEGIN), text.find(RECORD_END)
        if start < 0 or end < start:
            raise UserError(f"{page} has no record-table markers ({RECORD_BEGIN} ... {RECORD_END})")
        new = text[:start] + block + text[end + len(RECORD_END):]
        if new != text:
            atomic_write(path, new)
            changed.append(page)
    return changed
