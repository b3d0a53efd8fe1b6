"""The main job's stages as command lines, so that each one can be run (and rerun) alone:
their order (STAGES), the options per preset (PRESETS, the evaluation cadence, round 2's
defaults), and each stage's command (`stage_command`; the feedback stage's server,
simulated users and export: `feedback_commands`), each from the main job's options
(`cfg`, a pipeline.PipelineConfig). pipeline.py runs them; `python pipeline.py --dry-run`
prints them (`planned_commands`).
"""
from __future__ import annotations

import os
import shlex
import sys

REPO = os.path.dirname(os.path.abspath(__file__))


STAGES = ("tasks", "prepare", "pretrain", "sft", "rm", "ppo", "dpo", "feedback", "rm_round2", "ppo_round2",
          "dpo_round2", "control_round2", "eval")


ROUND2 = ("feedback", "rm_round2", "ppo_round2", "dpo_round2", "control_round2")


TRAINING = ("pretrain", "sft", "rm", "ppo", "dpo", "rm_round2", "ppo_round2", "dpo_round2", "control_round2")


ALIGN_STAGES = {"ppo": ("rm", "ppo"), "dpo": ("dpo",)}  # --align: what turns the SFT model into the policy


LEARNER_STAGES = {"ppo": ("rm_round2", "ppo_round2"), "dpo": ("dpo_round2",)}  # --round2-learner: feedback -> policy


# a round-2 stage takes its round-1 stage's preset options
ROUND1_OF = {"rm_round2": "rm", "ppo_round2": "ppo", "dpo_round2": "dpo"}


# Round 2's defaults, chosen by measurement (docs/results.md, "Round 2: the loop closed")
FEEDBACK_PROMPTS = 3000


FEEDBACK_WEIGHT = 3


RM_ROUND2_INIT = "sft"


PPO_ROUND2_INIT = "ppo"


DPO_ROUND2_INIT = "policy"


# The main job's evaluation cadence: the report evaluates every stage itself, so the
# stages evaluate only what the report reads from them: SFT's held-out loss curve (its
# gold evaluation at the last step only: five of them took 81 s of its 517 s, the step-0
# one, of a pretrained model that never stops, 17 s alone), the reward model's held-out
# pairs at its start, middle and end (every 100 steps took 53 s of its 380 s each round),
# and PPO's greedy curve. BENCHMARKS.md, "The main job", has the time table.
EVAL_CADENCE = {"sft": ["--gold-eval", "last"], "rm": ["--eval-every", "300"]}


# Extra options per stage and preset. "cpu" is each script's own defaults (the README's
# numbers) with the main job's evaluation cadence.
PRESETS = {
    "cpu": EVAL_CADENCE,
    "mini": {
        "prepare": ["--vocab-size", "512", "--workers", "1"],
        "tasks": ["--sft-per-family", "16", "--prefs-per-family", "8", "--prompts-per-family", "4",
                  "--eval-per-family", "2", "--safety-sft-per-family", "16", "--safety-prefs-per-family", "8",
                  "--refusal-pairs-per-family", "2", "--degenerate-pairs-per-family", "2",
                  "--harmful-prompts", "4", "--borderline-prompts", "4", "--benign-prompts", "4",
                  "--everyday-prompts", "4", "--minimal-pairs", "2", "--phrasing-eval-per-family", "2"],
        "pretrain": ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--n-kv-head", "1", "--seq-len", "96",
                     "--batch-size", "4", "--max-steps", "6", "--eval-every", "6", "--eval-windows", "4",
                     "--sample-tokens", "4", "--warmup-steps", "2"],
        "sft": ["--max-steps", "4", "--batch-size", "8", "--eval-every", "4", "--save-every", "4",
                "--eval-max-new-tokens", "4", "--warmup-steps", "1"],
        "rm": ["--max-steps", "3", "--batch-size", "8", "--eval-every", "3", "--save-every", "3", "--warmup-steps", "1"],
        "dpo": ["--max-steps", "2", "--batch-size", "4", "--eval-every", "2", "--save-every", "2",
                "--eval-max-new-tokens", "4", "--kl-prompts", "4", "--warmup-steps", "1"],
        "ppo": ["--max-steps", "2", "--batch-size", "4", "--minibatch-size", "8", "--max-new-tokens", "6",
                "--eval-every", "2", "--save-every", "2", "--eval-max-new-tokens", "4", "--log-every", "1"],
        "feedback": ["--prompts", "12", "--max-tokens", "6"],
    },
    # one GPU (bf16): a GPT-2-small-sized model; the task stages keep their CPU settings,
    # which take seconds there. Not measured yet: see BENCHMARKS.md.
    "gpu": {
        "pretrain": ["--preset", "gpt2-124m", "--seq-len", "512", "--batch-size", "32", "--max-steps", "3000",
                     "--lr", "6e-4", "--warmup-steps", "100", "--eval-every", "500", "--save-every", "500"],
        "sft": ["--lr", "1e-4", *EVAL_CADENCE["sft"]],
        "rm": ["--lr", "5e-5"],
        "ppo": ["--lr", "5e-6", "--batch-size", "128", "--minibatch-size", "32"],
    },
}


def stage_command(stage: str, cfg) -> list[str]:
    """The command that runs one stage (the eval stage is this script itself)."""
    corpus, tasks = os.path.join(cfg.data, cfg.corpus_name()), os.path.join(cfg.data, "tasks")
    prepare_options = ((["--input", *cfg.corpus] if cfg.corpus else []) + (["--text-field", cfg.text_field]
                       if cfg.text_field else []) + (["--vocab-size", str(cfg.vocab_size)] if cfg.vocab_size else []))
    run = lambda name: os.path.join(cfg.out, name)  # noqa: E731
    nproc = int(os.environ.get("NPROC", "1"))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    device = ["--device", cfg.device]
    seed = ["--seed", str(cfg.seed)]
    commands = {
        "prepare": [sys.executable, "-m", "data.prepare", "--out", corpus, *prepare_options],
        "tasks": [sys.executable, "-m", "tasks.suite", "--out", tasks,
                  *(["--filler-share", f"{cfg.filler_share:g}"] if cfg.filler_share else [])],
        "pretrain": [*launcher, "train_pretrain.py", "--data", corpus, "--out", run("pretrain"), *device],
        "sft": [*launcher, "train_sft.py", "--init", run("pretrain"), "--data", os.path.join(tasks, "sft.jsonl"),
                "--eval-data", os.path.join(tasks, "eval.jsonl"), "--out", run("sft"), *device],
        "rm": [*launcher, "train_rm.py", "--init", run("sft"), "--data", os.path.join(tasks, "prefs.jsonl"),
               "--out", run("rm"), *device],
        "ppo": [*launcher, "train_ppo.py", "--init", run("sft"), "--reward-model", run("rm"),
                "--prompts", os.path.join(tasks, "prompts.jsonl"), "--eval-data", os.path.join(tasks, "eval.jsonl"),
                "--out", run("ppo"), *device],
        "dpo": [*launcher, "train_dpo.py", "--init", run("sft"), "--data", os.path.join(tasks, "prefs.jsonl"),
                "--eval-data", os.path.join(tasks, "eval.jsonl"), "--out", run("dpo"), *device],
        "rm_round2": [*launcher, "train_rm.py", "--init", run(cfg.rm_round2_init),
                      "--data", os.path.join(tasks, "prefs.jsonl"), *[feedback_pairs(cfg)] * cfg.feedback_weight,
                      "--out", run("rm_round2"), *device],
        "ppo_round2": [*launcher, "train_ppo.py", "--init", run(cfg.ppo_round2_init), "--reward-model", run("rm_round2"),
                       "--prompts", os.path.join(tasks, "prompts.jsonl"),
                       "--eval-data", os.path.join(tasks, "eval.jsonl"), "--out", run("ppo_round2"), *device],
        "dpo_round2": [*launcher, "train_dpo.py", "--init", run(cfg.align if cfg.dpo_round2_init == "policy" else "sft"),
                       "--ref", run("sft"), "--data", os.path.join(tasks, "prefs.jsonl"),
                       *[feedback_pairs(cfg)] * cfg.feedback_weight, "--eval-data", os.path.join(tasks, "eval.jsonl"),
                       "--out", run("dpo_round2"), *device],
        # the control: the learner's policy stage with the same start and steps, the feedback left out
        "control_round2": ([*launcher, "train_ppo.py", "--init", run(cfg.ppo_round2_init), "--reward-model", run("rm"),
                            "--prompts", os.path.join(tasks, "prompts.jsonl")] if cfg.learner() == "ppo" else
                           [*launcher, "train_dpo.py", "--init",
                            run(cfg.align if cfg.dpo_round2_init == "policy" else "sft"), "--ref", run("sft"),
                            "--data", os.path.join(tasks, "prefs.jsonl")])
        + ["--eval-data", os.path.join(tasks, "eval.jsonl"), "--out", run("control_round2"), *device],
        "eval": [sys.executable, "pipeline.py", "--out", cfg.out, "--data", cfg.data, "--preset", cfg.preset,
                 "--stages", "eval", "--rounds", str(cfg.rounds), "--align", cfg.align,
                 "--round2-learner", cfg.learner(), *(["--control"] if cfg.control else []), *seed, *device],
    }
    if stage == "feedback":
        raise ValueError("the feedback stage runs several commands: see feedback_commands")
    preset = PRESETS[cfg.preset]
    round1 = cfg.learner() if stage == "control_round2" else ROUND1_OF.get(stage, "")
    extra = preset.get(stage, preset.get(round1, []))
    return commands[stage] + (seed if stage in TRAINING else []) + extra


def feedback_pairs(cfg) -> str:
    return os.path.join(cfg.out, "feedback", "prefs.jsonl")


def feedback_commands(cfg, url: str) -> dict[str, list[str]]:
    """Round 2's feedback stage: serve the round-1 policy (no abuse blocks or rate limits:
    the simulated users are one busy client), the simulated users against it, the export."""
    folder = os.path.join(cfg.out, "feedback")
    return {
        "serve": ["--ckpt", os.path.join(cfg.out, cfg.align), "--log-dir", os.path.join(folder, "serve"),
                  "--abuse-max-flags", "0", "--rate-limit-rpm", "0", "--rate-limit-tpm", "0", "--device", cfg.device],
        "users": [sys.executable, "simulate_users.py", "--url", url, "--prompts", str(cfg.feedback_prompts),
                  "--rater-noise", str(cfg.rater_noise), "--exclude", os.path.join(cfg.data, "tasks", "eval.jsonl"),
                  "--traffic-out", os.path.join(folder, "traffic.jsonl"),
                  *(["--novel-share", f"{cfg.novel_share:g}"] if cfg.novel_share else []),
                  *PRESETS[cfg.preset].get("feedback", [])],
        "export": [sys.executable, "serve.py", "--log-dir", os.path.join(folder, "serve"),
                   "--export-feedback", feedback_pairs(cfg)],
    }


def planned_commands(cfg) -> list[str]:
    """Every stage's command as the job prints it (`=== stage NAME: COMMAND`), the server's
    port as PORT: what --dry-run shows and docs/pipeline.md lists."""
    lines = []
    for stage in cfg.active_stages():
        if stage == "feedback":
            commands = feedback_commands(cfg, "http://127.0.0.1:PORT")
            server = [sys.executable, os.path.join(REPO, "serve.py"), "--host", "127.0.0.1", "--port", "PORT",
                      *commands["serve"]]
            lines += [f"=== stage feedback: {shown_command(server)} &",
                      f"=== stage feedback: {shown_command(commands['users'])}",
                      f"=== stage feedback: {shown_command(commands['export'])}"]
        else:
            lines.append(f"=== stage {stage}: {shown_command(stage_command(stage, cfg))}")
    return lines


def shown_command(command: list[str]) -> str:
    """A command as printed: `python` for this interpreter, repo paths relative."""
    return " ".join("python" if c == sys.executable else shlex.quote(
        os.path.relpath(c, REPO) if os.path.isabs(c) and c.startswith(REPO + os.sep) else c) for c in command)
