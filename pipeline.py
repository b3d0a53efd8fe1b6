"""The main job: every stage of the InstructGPT recipe in order, then a report.

    prepare (data/) -> tasks -> pretrain -> sft -> rm -> ppo -> eval + report

Each stage runs as its own process with a command printed before it starts: copy it to
run that stage alone. A stage whose output is complete is skipped (--force redoes every
stage, --from-stage STAGE redoes that one and those after it); a stage that was interrupted
continues from its last checkpoint with --resume. So stopping the job (Ctrl-C) and
starting it again picks up where it stopped. At the end OUT/report.md and report.json
hold each stage's command, wall time and key numbers, plots and sample completions.

    python pipeline.py                     # the CPU defaults: 10-13 minutes on 2 cores
    python pipeline.py --preset mini       # seconds per stage: a smoke test of the whole chain
    python pipeline.py --preset gpu        # a larger model for one GPU
    NPROC=8 python pipeline.py --preset gpu  # each training stage under torchrun on 8 GPUs
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

from cli import UserError, entry_point, parse_config
from data.files import atomic_write, write_json

REPO = os.path.dirname(os.path.abspath(__file__))
STAGES = ("prepare", "tasks", "pretrain", "sft", "rm", "ppo", "eval")
TRAINING = ("pretrain", "sft", "rm", "ppo")

# Extra options per stage and preset. "cpu" is each script's own defaults (the README's numbers).
PRESETS = {
    "cpu": {},
    "mini": {
        "prepare": ["--vocab-size", "512", "--workers", "1"],
        "tasks": ["--sft-per-family", "16", "--prefs-per-family", "8", "--prompts-per-family", "4",
                  "--eval-per-family", "2", "--safety-sft-per-family", "16", "--safety-prefs-per-family", "8",
                  "--refusal-pairs-per-family", "2", "--degenerate-pairs-per-family", "2",
                  "--harmful-prompts", "4", "--borderline-prompts", "4"],
        "pretrain": ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--n-kv-head", "1", "--seq-len", "96",
                     "--batch-size", "4", "--max-steps", "6", "--eval-every", "6", "--eval-windows", "4",
                     "--sample-tokens", "4", "--warmup-steps", "2"],
        "sft": ["--max-steps", "4", "--batch-size", "8", "--eval-every", "4", "--save-every", "4",
                "--eval-max-new-tokens", "4", "--warmup-steps", "1"],
        "rm": ["--max-steps", "3", "--batch-size", "8", "--eval-every", "3", "--save-every", "3", "--warmup-steps", "1"],
        "ppo": ["--max-steps", "2", "--batch-size", "4", "--minibatch-size", "8", "--max-new-tokens", "6",
                "--eval-every", "2", "--save-every", "2", "--eval-max-new-tokens", "4", "--log-every", "1"],
    },
    # one GPU (bf16): a GPT-2-small-sized model; the task stages keep their CPU settings,
    # which take seconds there. Not measured yet: see BENCHMARKS.md.
    "gpu": {
        "pretrain": ["--preset", "gpt2-124m", "--seq-len", "512", "--batch-size", "32", "--max-steps", "3000",
                     "--lr", "6e-4", "--warmup-steps", "100", "--eval-every", "500", "--save-every", "500"],
        "sft": ["--lr", "1e-4"],
        "rm": ["--lr", "5e-5"],
        "ppo": ["--lr", "5e-6", "--batch-size", "128", "--minibatch-size", "32"],
    },
}


@dataclass
class PipelineConfig:
    out: str = field(default=os.path.join(REPO, "runs"), metadata={"help": "checkpoints go to OUT/<stage>, the report to OUT"})
    data: str = field(default=os.path.join(REPO, "prepared"), metadata={"help": "prepared data goes to DATA/shakespeare and DATA/tasks"})
    preset: str = field(default="cpu", metadata={"choices": sorted(PRESETS)})
    corpus: list[str] = field(default_factory=list, metadata={"nargs": True,
                              "help": "text files for pretraining (default: the embedded Shakespeare corpus)"})
    force: bool = field(default=False, metadata={"help": "redo every stage even if its output is complete"})
    from_stage: str = field(default="", metadata={"help": "redo this stage and every later one", "choices": ["", *STAGES]})
    stages: list[str] = field(default_factory=lambda: list(STAGES), metadata={"nargs": True,
                              "help": "run only these stages (their inputs must exist)"})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)} (choose from {', '.join(STAGES)})")


def stage_command(stage: str, cfg: PipelineConfig) -> list[str]:
    """The command that runs one stage (the eval stage is this script itself)."""
    corpus, tasks = os.path.join(cfg.data, "shakespeare"), os.path.join(cfg.data, "tasks")
    run = lambda name: os.path.join(cfg.out, name)  # noqa: E731
    nproc = int(os.environ.get("NPROC", "1"))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    device = ["--device", cfg.device]
    commands = {
        "prepare": [sys.executable, "-m", "data.prepare", "--out", corpus] + (["--input", *cfg.corpus] if cfg.corpus else []),
        "tasks": [sys.executable, "-m", "data.tasks", "--out", tasks],
        "pretrain": [*launcher, "train_pretrain.py", "--data", corpus, "--out", run("pretrain"), *device],
        "sft": [*launcher, "train_sft.py", "--init", run("pretrain"), "--data", os.path.join(tasks, "sft.jsonl"),
                "--eval-data", os.path.join(tasks, "eval.jsonl"), "--out", run("sft"), *device],
        "rm": [*launcher, "train_rm.py", "--init", run("sft"), "--data", os.path.join(tasks, "prefs.jsonl"),
               "--out", run("rm"), *device],
        "ppo": [*launcher, "train_ppo.py", "--init", run("sft"), "--reward-model", run("rm"),
                "--prompts", os.path.join(tasks, "prompts.jsonl"), "--eval-data", os.path.join(tasks, "eval.jsonl"),
                "--out", run("ppo"), *device],
        "eval": [sys.executable, "pipeline.py", "--out", cfg.out, "--data", cfg.data, "--preset", cfg.preset,
                 "--stages", "eval", *device],
    }
    return commands[stage] + PRESETS[cfg.preset].get(stage, [])


# ----------------------------------------------------------------------------- stage state

def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def checkpoint_progress(ckpt: str) -> tuple[int, int] | None:
    """(saved step, planned steps) of a training stage's output, None if nothing is saved."""
    config, train = _read_json(os.path.join(ckpt, "config.json")), _read_json(os.path.join(ckpt, "train_config.json"))
    if not config or not train or not os.path.exists(os.path.join(ckpt, "state", "trainer.json")):
        return None
    return int(config.get("step", 0)), int(train.get("max_steps", 0))


def stage_done(stage: str, cfg: PipelineConfig) -> bool:
    if stage == "prepare":
        return os.path.exists(os.path.join(cfg.data, "shakespeare", "report.json"))
    if stage == "tasks":
        return all(os.path.exists(os.path.join(cfg.data, "tasks", f"{n}.jsonl"))
                   for n in ("sft", "prefs", "prompts", "eval", "ptx"))
    if stage == "eval":
        return os.path.exists(os.path.join(cfg.out, "report.json")) and \
            (_read_json(os.path.join(cfg.out, "report.json")) or {}).get("complete", False)
    progress = checkpoint_progress(os.path.join(cfg.out, stage))
    return progress is not None and progress[0] >= progress[1] > 0


# ----------------------------------------------------------------------------- running

def run_stage(stage: str, cfg: PipelineConfig, state: dict) -> None:
    command = stage_command(stage, cfg)
    progress = checkpoint_progress(os.path.join(cfg.out, stage)) if stage in TRAINING else None
    if progress and 0 < progress[0] < progress[1]:
        command.append("--resume")  # interrupted earlier: continue from its last checkpoint
    shown = " ".join("python" if c == sys.executable else shlex.quote(
        os.path.relpath(c, REPO) if os.path.isabs(c) and c.startswith(REPO + os.sep) else c) for c in command)
    print(f"\n=== stage {stage}: {shown}", flush=True)
    os.makedirs(os.path.join(cfg.out, "logs"), exist_ok=True)
    start = time.time()
    if stage == "eval":
        state["stages"]["eval"] = {"command": shown, "seconds": 0.0}
        evaluate_and_report(cfg, state, start)
        code = 0
    else:
        with open(os.path.join(cfg.out, "logs", f"{stage}.log"), "a", encoding="utf-8") as log:
            proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1)
            try:
                for line in proc.stdout:
                    sys.stdout.write(line)
                    log.write(line)
            except KeyboardInterrupt:  # the stage got the signal too: let it save its checkpoint
                proc.wait()
                raise
            code = proc.wait()
    seconds = time.time() - start
    entry = state["stages"].setdefault(stage, {"seconds": 0.0})
    entry["command"] = shown
    if stage != "eval":  # an interrupted stage's time adds up
        entry["seconds"] = round(entry.get("seconds", 0.0) + seconds, 1)
    save_state(cfg, state)
    if code != 0:
        raise UserError(f"stage {stage} failed (exit {code}); see {os.path.join(cfg.out, 'logs', stage + '.log')}")
    if not stage_done(stage, cfg):
        raise UserError(f"stage {stage} stopped before finishing; run the same command again to resume it")
    print(f"=== stage {stage} done in {seconds:.0f} s", flush=True)


def save_state(cfg: PipelineConfig, state: dict) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    write_json(os.path.join(cfg.out, "pipeline.json"), state)


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(PipelineConfig, argv, description=__doc__.split("\n")[0])
    state = _read_json(os.path.join(cfg.out, "pipeline.json")) or {}
    if state.get("preset") not in (None, cfg.preset) and not cfg.force:
        raise UserError(f"{cfg.out} holds a --preset {state['preset']} run; use another --out or add --force")
    state = {"preset": cfg.preset, "stages": state.get("stages", {})}
    redo = set(STAGES) if cfg.force else set(STAGES[STAGES.index(cfg.from_stage):]) if cfg.from_stage else set()
    t0 = time.time()
    try:
        for stage in STAGES:
            if stage not in cfg.stages:
                continue
            if stage in redo:
                state["stages"].pop(stage, None)
            elif stage_done(stage, cfg) and stage != "eval":
                print(f"=== stage {stage}: already complete, skipped (--from-stage {stage} redoes it)", flush=True)
                continue
            if stage in redo and stage in TRAINING:
                import shutil
                shutil.rmtree(os.path.join(cfg.out, stage), ignore_errors=True)
            run_stage(stage, cfg, state)
    except KeyboardInterrupt:
        save_state(cfg, state)
        raise UserError("interrupted; run the same command again to continue from the last finished stage") from None
    print(f"\npipeline finished in {time.time() - t0:.0f} s; report: {os.path.join(cfg.out, 'report.md')}")


# ----------------------------------------------------------------------------- evaluation and report

SAMPLE_FAMILIES = ("arithmetic", "compare", "case", "reverse", "harmful", "borderline")


def _metrics(ckpt: str) -> list[dict]:
    path = os.path.join(ckpt, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _last(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def evaluate_and_report(cfg: PipelineConfig, state: dict, start: float) -> dict:
    """Greedy gold accuracy and safety rates of every stage on the held-out tasks, the same
    prompts answered by each stage, the numbers each stage logged, plots; writes
    report.json and report.md."""
    import torch

    import runtime
    from data.chat import encode_prompt
    from data.tasks import TASK_FAMILIES
    from evals import load_task_records, paired_change, task_accuracy, win_rate

    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    ckpt = lambda name: os.path.join(cfg.out, name)  # noqa: E731
    records = load_task_records(os.path.join(cfg.data, "tasks", "eval.jsonl"))
    examples = [next(r for r in records if r["family"] == f) for f in SAMPLE_FAMILIES if any(
        r["family"] == f for r in records)]
    report = {"preset": cfg.preset, "stages": {}, "seconds": {}, "samples": {}}
    accuracy = {}
    for stage in ("pretrain", "sft", "ppo"):
        model, tok, _ = runtime.load_for_inference(ckpt(stage), device=device)
        accuracy[stage] = task_accuracy(model, tok, records)
        outs = model.generate([encode_prompt(tok, [{"role": "user", "content": r["prompt"]}]) for r in examples], 24,
                              tok.pad_id, temperature=0.0, stop_tokens=[tok.end_id])
        report["samples"][stage] = [{"prompt": r["prompt"], "answer": r.get("answer", "(a refusal)"),
                                     "response": tok.decode([t for t in o if t < len(tok.token_bytes)])}
                                    for r, o in zip(examples, outs)]
        del model

    prep = _read_json(os.path.join(cfg.data, "shakespeare", "report.json")) or {}
    pre_rows, sft_rows, rm_rows, ppo_rows = (_metrics(ckpt(s)) for s in ("pretrain", "sft", "rm", "ppo"))
    rm_config = _read_json(os.path.join(ckpt("rm"), "config.json")) or {}
    ppo_config = _read_json(os.path.join(ckpt("ppo"), "config.json")) or {}
    stages = report["stages"]
    stages["prepare"] = {"documents": prep.get("documents"), "tokens": prep.get("tokens"),
                         "bytes_per_token": prep.get("bytes_per_token"), "pii_replaced": prep.get("pii")}
    stages["pretrain"] = {"val_loss": _last(pre_rows, "val_loss"), "val_bpb": _last(pre_rows, "val_bpb"),
                          "unigram_val_loss": _last(pre_rows, "unigram_val_loss"),
                          "gold_accuracy": accuracy["pretrain"]["task_accuracy"],
                          "per_family": accuracy["pretrain"]["per_family"], "safety": accuracy["pretrain"]["safety"]}
    stages["sft"] = {"gold_accuracy": accuracy["sft"]["task_accuracy"], "per_family": accuracy["sft"]["per_family"],
                     "safety": accuracy["sft"]["safety"], "heldout_loss": _last(sft_rows, "heldout_loss")}
    rm_eval = rm_config.get("eval", {})
    stages["rm"] = {"accuracy": rm_eval.get("accuracy"), "margin": rm_eval.get("margin"),
                    "by_kind": {k: v["accuracy"] for k, v in rm_eval.get("by_kind", {}).items()}}
    helpful = {stage: [x for x in accuracy[stage]["samples"] if x["family"] in TASK_FAMILIES] for stage in accuracy}
    stages["ppo"] = {"gold_accuracy": accuracy["ppo"]["task_accuracy"], "per_family": accuracy["ppo"]["per_family"],
                     "safety": accuracy["ppo"]["safety"],
                     "kl": _last(ppo_rows, "objective/kl"), "score": _last(ppo_rows, "objective/scores"),
                     "reward": ppo_config.get("reward"),
                     "rm_score_start": ppo_config.get("eval_start", {}).get("rm_score"),
                     "rm_score_end": ppo_config.get("eval", {}).get("rm_score"),
                     "vs_sft": paired_change(helpful["sft"], helpful["ppo"]),
                     "win_rate_vs_sft": win_rate(accuracy["sft"]["samples"], accuracy["ppo"]["samples"]),
                     "advantage": ppo_config.get("advantage"), "samples_per_prompt": ppo_config.get("samples_per_prompt")}
    state["stages"]["eval"]["seconds"] = round(time.time() - start, 1)
    for name in STAGES:
        seconds = state["stages"].get(name, {}).get("seconds")
        if seconds is not None:
            stages.setdefault(name, {})["seconds"] = seconds
            report["seconds"][name] = seconds
        if name in state["stages"]:
            stages.setdefault(name, {})["command"] = state["stages"][name].get("command")
    report["plots"] = make_plots(cfg.out, pre_rows, sft_rows, ppo_rows, accuracy)
    report["complete"] = True
    write_json(os.path.join(cfg.out, "report.json"), report)
    atomic_write(os.path.join(cfg.out, "report.md"), render_markdown(report))
    print(f"gold accuracy: pretrain {100 * stages['pretrain']['gold_accuracy']:.1f}%, "
          f"sft {100 * stages['sft']['gold_accuracy']:.1f}%, ppo {100 * stages['ppo']['gold_accuracy']:.1f}% "
          f"(ppo KL {stages['ppo']['kl']}; vs sft: fixed {stages['ppo']['vs_sft']['fixed']}, "
          f"broke {stages['ppo']['vs_sft']['broken']}, McNemar p {stages['ppo']['vs_sft']['p_value']:.3g})")
    wins = stages["ppo"]["win_rate_vs_sft"]
    print(f"ppo vs sft on all {len(records)} held-out prompts (gold judge): {wins['wins']} wins, {wins['losses']} losses, "
          f"{wins['ties']} ties, sign test p {wins['p_value']:.3g}")
    print("harmful requests refused: " + ", ".join(f"{stage} {_pct(stages[stage]['safety']['harmful_refusal'])}"
                                                   for stage in ("pretrain", "sft", "ppo"))
          + "; borderline over-refused: " + ", ".join(
              f"{stage} {_pct(stages[stage]['safety']['borderline_over_refusal'])}" for stage in ("pretrain", "sft", "ppo")))
    return report


def make_plots(out: str, pre_rows, sft_rows, ppo_rows, accuracy) -> list[str]:
    """PNG plots next to the report (matplotlib, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(rows, key):
        pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(*series(pre_rows, "loss"), label="train")
    axes[0].plot(*series(pre_rows, "val_loss"), "o-", label="val")
    axes[0].set(title="pretraining loss", xlabel="step")
    axes[1].plot(*series(sft_rows, "loss"), label="train")
    axes[1].plot(*series(sft_rows, "heldout_loss"), "o-", label="held-out")
    axes[1].set(title="SFT loss (assistant tokens)", xlabel="step")
    for ax in axes:
        ax.legend()
    files.append("loss_curves.png")
    fig.tight_layout()
    fig.savefig(os.path.join(out, files[-1]), dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(*series(ppo_rows, "objective/scores"), label="score")
    axes[0].plot(*series(ppo_rows, "objective/rlhf_reward"), label="score - beta * KL")
    axes[0].set(title="PPO reward per response", xlabel="step")
    axes[0].legend()
    axes[1].plot(*series(ppo_rows, "objective/kl"))
    axes[1].set(title="PPO KL to the SFT model", xlabel="step")
    files.append("ppo_curves.png")
    fig.tight_layout()
    fig.savefig(os.path.join(out, files[-1]), dpi=100)
    plt.close(fig)

    # Gao et al.'s picture: what the reward model sees against what the gold judge sees, as
    # the policy moves away from the SFT model
    evals = [r for r in ppo_rows if "eval/kl" in r]
    if evals:
        fig, gold = plt.subplots(figsize=(10, 3.6))
        kl = [r["eval/kl"] for r in evals]
        for key, label in (("eval/accuracy", "task accuracy"), ("eval/safety/harmful_refusal", "harmful refused"),
                           ("eval/safety/borderline_over_refusal", "borderline over-refused")):
            if all(key in r for r in evals):
                gold.plot(kl, [100 * r[key] for r in evals], "o-", label=f"{label} (gold, %)")
        gold.set(xlabel="KL to the SFT model (nats per response)", ylabel="gold judge (%)", ylim=(-2, 102),
                 title="PPO evaluations: gold metrics and the reward model's score against KL")
        rm_axis = gold.twinx()
        rm_axis.plot(kl, [r["eval/rm_score"] for r in evals], "k--", marker="s", label="reward-model score")
        rm_axis.set(ylabel="mean reward-model score")
        lines = gold.get_legend_handles_labels()
        more = rm_axis.get_legend_handles_labels()
        gold.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
        files.append("ppo_gold_vs_kl.png")
        fig.tight_layout()
        fig.savefig(os.path.join(out, files[-1]), dpi=100)
        plt.close(fig)

    families = sorted(accuracy["sft"]["per_family"])
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.27
    for i, stage in enumerate(("pretrain", "sft", "ppo")):
        ax.bar([j + (i - 1) * width for j in range(len(families))],
               [100 * accuracy[stage]["per_family"].get(f, 0.0) for f in families], width, label=stage)
    ax.set_xticks(range(len(families)), families)
    ax.set(title="held-out gold accuracy by stage (%)", ylim=(0, 100))
    ax.legend()
    files.append("accuracy_by_stage.png")
    fig.tight_layout()
    fig.savefig(os.path.join(out, files[-1]), dpi=100)
    plt.close(fig)
    return files


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_markdown(report: dict) -> str:
    s = report["stages"]
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
        "rm": f"held-out pair accuracy {_pct(s['rm']['accuracy'])} ("
              + ", ".join(f"{k} {_pct(v)}" for k, v in s["rm"]["by_kind"].items()) + ")",
        "ppo": f"held-out gold accuracy {_pct(s['ppo']['gold_accuracy'])}, final KL {s['ppo']['kl']}, "
               f"reward {s['ppo']['reward']}",
        "eval": "this report",
    }
    for name in STAGES:
        seconds = report["seconds"].get(name)
        lines.append(f"| {name} | {'-' if seconds is None else f'{seconds:.0f} s'} | {key[name]} |")
    lines += ["", "## Held-out gold accuracy by task family", "",
              "| family | SFT | PPO |", "|---|---|---|"]
    for family in sorted(f for f in s["sft"]["per_family"] if f not in ("harmful", "borderline")):
        lines.append(f"| {family} | {_pct(s['sft']['per_family'][family])} | {_pct(s['ppo']['per_family'].get(family))} |")
    lines.append(f"| **all** | **{_pct(s['sft']['gold_accuracy'])}** | **{_pct(s['ppo']['gold_accuracy'])}** |")
    wins = s["ppo"].get("win_rate_vs_sft")
    if wins:
        decided = wins["wins"] + wins["losses"]
        lines += ["", f"PPO against SFT on all {decided + wins['ties']} held-out prompts, judged by the gold judge: "
                      f"PPO wins {wins['wins']}, loses {wins['losses']}, ties {wins['ties']} "
                      f"({_pct(wins['wins'] / decided) if decided else '-'} of the prompts where they differ; "
                      f"exact sign test p = {wins['p_value']:.3g})."]
    lines += ["", "## Harmlessness on held-out prompts", "",
              "Harmful requests should be refused (a refusal with no compliance in it); benign look-alikes with "
              "alarming words (borderline) should be answered, and refusing them is over-refusal.", "",
              "| | base | SFT | PPO |", "|---|---|---|---|"]
    stage_names = ("pretrain", "sft", "ppo")
    rows = (("harmful requests refused", lambda st: s[st]["safety"]["harmful_refusal"]),
            ("borderline prompts refused (over-refusal)", lambda st: s[st]["safety"]["borderline_over_refusal"]),
            ("borderline prompts answered right", lambda st: s[st]["per_family"].get("borderline")))
    for label, value in rows:
        lines.append(f"| {label} | " + " | ".join(_pct(value(st)) for st in stage_names) + " |")
    change = s["ppo"].get("vs_sft")
    if change:
        verdict = ("unlikely to be chance" if change["p_value"] < 0.05 else
                   "no evidence of a change either way")
        lines += ["", f"Prompt by prompt: of the {change['n']} held-out helpfulness prompts, PPO answers "
                      f"{change['fixed']} right that SFT got wrong, and {change['broken']} wrong that SFT got right "
                      f"(McNemar's exact test: p = {change['p_value']:.3g}, {verdict})."]
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    lines += ["", "## The same prompts, answered by each stage (greedy)", ""]
    for i, example in enumerate(report["samples"].get("sft", [])):
        lines.append(f"**{example['prompt']}** (answer: {example['answer']})")
        lines.append("")
        for stage in ("pretrain", "sft", "ppo"):
            lines.append(f"- {stage}: `{report['samples'][stage][i]['response']!r}`")
        lines.append("")
    lines += ["## Commands", ""] + [f"- {name}: `{s[name]['command']}`" for name in STAGES
                                    if s.get(name, {}).get("command")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
