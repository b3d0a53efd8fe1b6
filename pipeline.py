"""The main job: every stage of the InstructGPT recipe in order, then a report.

    tasks -> prepare (data/; decontaminated against the tasks' held-out files) -> pretrain -> sft -> rm -> ppo
      -> feedback -> rm_round2 -> ppo_round2 (round 2; --rounds 1 leaves it out) -> eval + report
    with --align dpo: ... -> sft -> dpo -> feedback -> dpo_round2 -> eval + report

Round 2 closes the loop: the round-1 policy is served (serve.py), simulated users (a
stand-in for people: simulate_users.py) rate its answers with a set disagreement rate
(--rater-noise), and the exported feedback joins the round-1 preference data. The
round-2 learner (--round2-learner, by default the --align method) is either a second
reward model and a second PPO run against it, or DPO on those pairs going on from the
round-1 policy (iterative DPO, the SFT model still its reference); the report compares
the round-2 policy with round 1 prompt by prompt (and, with PPO, both reward models on
held-out on-policy pairs).

Each stage runs as its own process with a command printed before it starts: copy it to
run that stage alone. A stage whose output is complete is skipped (--force redoes every
stage, --from-stage STAGE redoes that one and those after it); a stage that was interrupted
continues from its last checkpoint with --resume. So stopping the job (Ctrl-C) and
starting it again picks up where it stopped. At the end OUT/report.md and report.json
hold each stage's command, wall time and key numbers, plots and sample completions.

    python pipeline.py                     # the CPU defaults, both rounds: 25-48 minutes on 2 cores
    python pipeline.py --rounds 1          # round 1 only (13-30 minutes; report.md's time table says where they go)
    python pipeline.py --align dpo         # DPO (train_dpo.py) on the same pairs in place of the reward model and PPO
    python pipeline.py --round2-learner dpo  # round 2 by DPO on the feedback to the round-1 PPO policy
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
from data.tasks import SAFETY_FAMILIES, SUITE_FILES
from serving.launch import ServeProcess

REPO = os.path.dirname(os.path.abspath(__file__))
STAGES = ("tasks", "prepare", "pretrain", "sft", "rm", "ppo", "dpo", "feedback", "rm_round2", "ppo_round2",
          "dpo_round2", "eval")
ROUND2 = ("feedback", "rm_round2", "ppo_round2", "dpo_round2")
TRAINING = ("pretrain", "sft", "rm", "ppo", "dpo", "rm_round2", "ppo_round2", "dpo_round2")
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
    seed: int = field(default=1337, metadata={"help": "passed to every training stage (1337: their own default); "
                      "the corpus and the task suite stay the same, so seeds measure the training noise"})
    rounds: int = field(default=2, metadata={"choices": [1, 2], "help": "2: after round 1, simulated users' feedback "
                        "on the round-1 policy trains the round-2 policy (1: round 1 only)"})
    align: str = field(default="ppo", metadata={"choices": ["ppo", "dpo"], "help": "how the SFT model becomes the "
                       "policy: ppo (a reward model, then PPO) or dpo (train_dpo.py on the same preference pairs)"})
    rater_noise: float = field(default=0.2, metadata={"help": "round 2: probability that a simulated rater "
                               "disagrees with the gold judge"})
    feedback_prompts: int = field(default=FEEDBACK_PROMPTS, metadata={"help": "round 2: user prompts the simulated "
                                  "users send (two answers rated per prompt)"})
    feedback_weight: int = field(default=FEEDBACK_WEIGHT, metadata={"help": "round 2: the feedback pairs' weight "
                                 "against the round-1 preference data (the file is listed this many times)"})
    rm_round2_init: str = field(default=RM_ROUND2_INIT, metadata={"choices": ["sft", "rm"], "help": "round 2: the "
                                "reward model starts from the SFT model (as in round 1) or goes on from round 1's"})
    dry_run: bool = field(default=False, metadata={"help": "print each stage's command and exit"})
    ppo_round2_init: str = field(default=PPO_ROUND2_INIT, metadata={"choices": ["sft", "ppo"], "help": "round 2: "
                                 "PPO starts from (and keeps its KL to) the SFT model or the round-1 policy"})
    round2_learner: str = field(default="", metadata={"choices": ["", "ppo", "dpo"], "help": "round 2: how the "
                                "feedback becomes the next policy: ppo (a second reward model on the round-1 pairs and "
                                "the feedback, then PPO against it; needs --align ppo) or dpo (DPO on the same pairs); "
                                "default: the --align method"})
    dpo_round2_init: str = field(default=DPO_ROUND2_INIT, metadata={"choices": ["policy", "sft"], "help": "round 2 "
                                 "by DPO: start from the round-1 policy (iterative DPO) or the SFT model; the SFT model "
                                 "is the reference either way"})

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)} (choose from {', '.join(STAGES)})")
        if self.rounds not in (1, 2):
            raise UserError(f"--rounds must be 1 or 2, got {self.rounds}")
        if not 0 <= self.rater_noise <= 1 or self.feedback_prompts < 1 or self.feedback_weight < 1:
            raise UserError("need 0 <= --rater-noise <= 1, --feedback-prompts >= 1 and --feedback-weight >= 1")
        if self.learner() == "ppo" and self.align != "ppo":
            raise UserError("--round2-learner ppo needs --align ppo (round 2's reward model and PPO go on from "
                            "round 1's); use --round2-learner dpo")
        asked = {self.from_stage} | (set(self.stages) if set(self.stages) != set(STAGES) else set())
        if self.rounds == 1 and asked & set(ROUND2):
            raise UserError(f"{', '.join(sorted(asked & set(ROUND2)))}: round-2 stage(s) need --rounds 2")
        other = {s for a, stages in ALIGN_STAGES.items() if a != self.align for s in stages}
        if asked & other:
            raise UserError(f"{', '.join(sorted(asked & other))}: not a stage of --align {self.align}")
        other = {s for a, stages in LEARNER_STAGES.items() if a != self.learner() for s in stages}
        if asked & other:
            raise UserError(f"{', '.join(sorted(asked & other))}: not a stage of round 2 by {self.learner()} "
                            "(--round2-learner)")

    def learner(self) -> str:
        """Round 2's learner: --round2-learner, or the --align method."""
        return self.round2_learner or self.align

    def round2(self) -> bool:
        return self.rounds >= 2

    def round2_policy(self) -> str:
        """The stage whose checkpoint is round 2's policy: ppo_round2 or dpo_round2."""
        return LEARNER_STAGES[self.learner()][-1]

    def active_stages(self) -> tuple[str, ...]:
        """The stages of this run, in order: the --align stages; round 2's (the feedback and
        the --round2-learner stages) only with --rounds 2."""
        other = {s for a, stages in ALIGN_STAGES.items() if a != self.align for s in stages}
        other |= {s for a, stages in LEARNER_STAGES.items() if a != self.learner() for s in stages}
        return tuple(s for s in STAGES if s not in other and (self.round2() or s not in ROUND2))


def stage_command(stage: str, cfg: PipelineConfig) -> list[str]:
    """The command that runs one stage (the eval stage is this script itself)."""
    corpus, tasks = os.path.join(cfg.data, "shakespeare"), os.path.join(cfg.data, "tasks")
    run = lambda name: os.path.join(cfg.out, name)  # noqa: E731
    nproc = int(os.environ.get("NPROC", "1"))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    device = ["--device", cfg.device]
    seed = ["--seed", str(cfg.seed)]
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
        "eval": [sys.executable, "pipeline.py", "--out", cfg.out, "--data", cfg.data, "--preset", cfg.preset,
                 "--stages", "eval", "--rounds", str(cfg.rounds), "--align", cfg.align,
                 "--round2-learner", cfg.learner(), *seed, *device],
    }
    if stage == "feedback":
        raise ValueError("the feedback stage runs several commands: see feedback_commands")
    preset = PRESETS[cfg.preset]
    extra = preset.get(stage, preset.get(ROUND1_OF.get(stage, ""), []))
    return commands[stage] + (seed if stage in TRAINING else []) + extra


def feedback_pairs(cfg: PipelineConfig) -> str:
    return os.path.join(cfg.out, "feedback", "prefs.jsonl")


def feedback_commands(cfg: PipelineConfig, url: str) -> dict[str, list[str]]:
    """Round 2's feedback stage: serve the round-1 policy (no abuse blocks or rate limits:
    the simulated users are one busy client), the simulated users against it, the export."""
    folder = os.path.join(cfg.out, "feedback")
    return {
        "serve": ["--ckpt", os.path.join(cfg.out, cfg.align), "--log-dir", os.path.join(folder, "serve"),
                  "--abuse-max-flags", "0", "--rate-limit-rpm", "0", "--rate-limit-tpm", "0", "--device", cfg.device],
        "users": [sys.executable, "simulate_users.py", "--url", url, "--prompts", str(cfg.feedback_prompts),
                  "--rater-noise", str(cfg.rater_noise), "--exclude", os.path.join(cfg.data, "tasks", "eval.jsonl"),
                  "--traffic-out", os.path.join(folder, "traffic.jsonl"), *PRESETS[cfg.preset].get("feedback", [])],
        "export": [sys.executable, "serve.py", "--log-dir", os.path.join(folder, "serve"),
                   "--export-feedback", feedback_pairs(cfg)],
    }


def planned_commands(cfg: PipelineConfig) -> list[str]:
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
        return all(os.path.exists(os.path.join(cfg.data, "tasks", f"{n}.jsonl")) for n in SUITE_FILES)
    if stage == "eval":
        return os.path.exists(os.path.join(cfg.out, "report.json")) and \
            (_read_json(os.path.join(cfg.out, "report.json")) or {}).get("complete", False)
    if stage == "feedback":  # complete, and on this run's round-1 policy
        summary = _read_json(os.path.join(cfg.out, "feedback", "feedback.json"))
        return summary is not None and summary.get("policy", "ppo") == cfg.align
    progress = checkpoint_progress(os.path.join(cfg.out, stage))
    return progress is not None and progress[0] >= progress[1] > 0 and same_init(stage, cfg)


def same_init(stage: str, cfg: PipelineConfig) -> bool:
    """Whether a training stage's checkpoint started from the stage its command starts from
    now (a round-2 stage is out of date after --align or --*-round2-init changed). Stage
    names are compared, not paths, so a run directory can move."""
    command = stage_command(stage, cfg)
    if "--init" not in command:
        return True
    started = (_read_json(os.path.join(cfg.out, stage, "train_config.json")) or {}).get("init")
    name = lambda path: os.path.basename(os.path.normpath(path))  # noqa: E731
    return not started or name(started) == name(command[command.index("--init") + 1])


# ----------------------------------------------------------------------------- running

def shown_command(command: list[str]) -> str:
    """A command as printed: `python` for this interpreter, repo paths relative."""
    return " ".join("python" if c == sys.executable else shlex.quote(
        os.path.relpath(c, REPO) if os.path.isabs(c) and c.startswith(REPO + os.sep) else c) for c in command)


def run_logged(command: list[str], log_path: str) -> int:
    """Run a command, its output to stdout and appended to log_path; its exit status."""
    with open(log_path, "a", encoding="utf-8") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
        except KeyboardInterrupt:  # the stage got the signal too: let it save its checkpoint
            proc.wait()
            raise
        return proc.wait()


def run_stage(stage: str, cfg: PipelineConfig, state: dict) -> None:
    os.makedirs(os.path.join(cfg.out, "logs"), exist_ok=True)
    log_path = os.path.join(cfg.out, "logs", f"{stage}.log")
    start = time.time()
    code = 0
    parts = {}  # the pipeline's own stages time their parts here; training stages log theirs
    if stage == "feedback":  # prints its own commands (a server, the users, the export)
        shown = collect_feedback(cfg, log_path, parts)
    else:
        command = stage_command(stage, cfg)
        progress = checkpoint_progress(os.path.join(cfg.out, stage)) if stage in TRAINING else None
        if progress and 0 < progress[0] < progress[1]:
            command.append("--resume")  # interrupted earlier: continue from its last checkpoint
        shown = shown_command(command)
        print(f"\n=== stage {stage}: {shown}", flush=True)
        if stage == "eval":
            state["stages"]["eval"] = {"command": shown, "seconds": 0.0}
            evaluate_and_report(cfg, state, start)
        else:
            code = run_logged(command, log_path)
    seconds = time.time() - start
    entry = state["stages"].setdefault(stage, {"seconds": 0.0})
    entry["command"] = shown
    if stage != "eval":  # an interrupted stage's time adds up
        entry["seconds"] = round(entry.get("seconds", 0.0) + seconds, 1)
        if parts:
            entry["parts"] = {k: round(v, 1) for k, v in parts.items()}
    save_state(cfg, state)
    if code != 0:
        raise UserError(f"stage {stage} failed (exit {code}); see {log_path}")
    if not stage_done(stage, cfg):
        raise UserError(f"stage {stage} stopped before finishing; run the same command again to resume it")
    print(f"=== stage {stage} done in {seconds:.0f} s", flush=True)


def sort_pairs(path: str) -> int:
    """Put the exported pairs in a fixed order (the store's follows the users' threads, and
    the reward model's data order follows the file): the same feedback trains the same
    reward model. Returns the number of pairs."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    content = lambda line: json.dumps({k: v for k, v in json.loads(line).items() if k != "source_ids"},  # noqa: E731
                                      sort_keys=True)
    atomic_write(path, "".join(sorted(lines, key=content)))
    return len(lines)


def collect_feedback(cfg: PipelineConfig, log_path: str, parts: dict) -> str:
    """Round 2's feedback stage: serve.py on a free loopback port serving the round-1 policy,
    the simulated users against it, the server stopped, the feedback exported; writes
    OUT/feedback/feedback.json (its completion mark), the seconds of each part to `parts`,
    and returns the commands as shown."""
    import shutil

    folder = os.path.join(cfg.out, "feedback")
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted run's votes must not count twice
    os.makedirs(folder)
    print("\n=== stage feedback: serving the round-1 policy to simulated users (a stand-in for people)", flush=True)
    t0 = time.time()
    server = ServeProcess(feedback_commands(cfg, "")["serve"], os.path.join(cfg.out, "logs", "feedback.serve.log"))
    parts["server start"] = time.time() - t0
    commands = feedback_commands(cfg, server.url)
    shown = [shown_command(server.command) + " &", shown_command(commands["users"])]
    try:
        print(f"=== stage feedback: {shown[0]}\n=== stage feedback: {shown[1]}", flush=True)
        t0 = time.time()
        if run_logged(commands["users"], log_path) != 0:
            raise UserError(f"stage feedback: the simulated users failed; see {log_path}")
        parts["simulated users' traffic"] = time.time() - t0
    finally:
        server.stop()  # SIGTERM: uvicorn finishes what it is doing and closes the store
    shown.append(shown_command(commands["export"]))
    print(f"=== stage feedback: {shown[-1]}", flush=True)
    t0 = time.time()
    if run_logged(commands["export"], log_path) != 0:
        raise UserError(f"stage feedback: the export failed; see {log_path}")
    parts["export"] = time.time() - t0
    users = _read_json(os.path.join(folder, "traffic.summary.json")) or {}
    pairs = sort_pairs(feedback_pairs(cfg))
    write_json(os.path.join(folder, "feedback.json"), {
        "simulated": True, "policy": cfg.align, "prompts": users.get("prompts"), "votes": users.get("votes"), "ties": users.get("ties"),
        "thumbs": users.get("thumbs"), "pairs": pairs, "rater_noise": cfg.rater_noise,
        "realised_disagreement": users.get("realised_disagreement"), "answers_right": users.get("answers_right"),
        "skipped": users.get("skipped")})
    return f"{shown[0]} {shown[1]}; {shown[2]}"  # as one shell line


def save_state(cfg: PipelineConfig, state: dict) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    write_json(os.path.join(cfg.out, "pipeline.json"), state)


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(PipelineConfig, argv, description=__doc__.split("\n")[0])
    if cfg.dry_run:
        print("\n".join(planned_commands(cfg)))
        return
    state = _read_json(os.path.join(cfg.out, "pipeline.json")) or {}
    if state.get("preset") not in (None, cfg.preset) and not cfg.force:
        raise UserError(f"{cfg.out} holds a --preset {state['preset']} run; use another --out or add --force")
    state = {"preset": cfg.preset, "stages": state.get("stages", {})}
    redo = set(STAGES) if cfg.force else set(STAGES[STAGES.index(cfg.from_stage):]) if cfg.from_stage else set()
    t0 = time.time()
    try:
        for stage in cfg.active_stages():
            if stage not in cfg.stages:
                continue
            if stage in redo:
                state["stages"].pop(stage, None)
            elif stage_done(stage, cfg) and stage != "eval":
                print(f"=== stage {stage}: already complete, skipped (--from-stage {stage} redoes it)", flush=True)
                continue
            elif stage in TRAINING and not same_init(stage, cfg):
                print(f"=== stage {stage}: its checkpoint started from another one than this run's; redone", flush=True)
                redo.add(stage)
            if stage in redo and (stage in TRAINING or stage == "feedback"):
                import shutil
                shutil.rmtree(os.path.join(cfg.out, stage), ignore_errors=True)
            run_stage(stage, cfg, state)
            redo |= set(STAGES[STAGES.index(stage) + 1:])  # what came after it was made from what it replaced
    except KeyboardInterrupt:
        save_state(cfg, state)
        raise UserError("interrupted; run the same command again to continue from the last finished stage") from None
    print(f"\npipeline finished in {time.time() - t0:.0f} s; report: {os.path.join(cfg.out, 'report.md')}")


# ----------------------------------------------------------------------------- evaluation and report

SAMPLE_FAMILIES = ("arithmetic", "compare", "case", "reverse", "harmful", "borderline", "benign", "everyday")
# Everyday requests written by hand apart from the task generators and never trained on:
# the over-refusal check outside the suite (evals.py --data takes any such file)
OUTSIDE_EVERYDAY = os.path.join(REPO, "data", "everyday_requests.jsonl")


def _metrics(ckpt: str) -> list[dict]:
    path = os.path.join(ckpt, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _last(rows: list[dict], key: str):
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def stage_parts(cfg: PipelineConfig, stage: str, state: dict) -> dict[str, float]:
    """Seconds per part of a stage: a training stage's `time_parts` records in its
    metrics.jsonl (one per run; a resumed stage has several, which add up), or the parts the
    pipeline timed itself (feedback, eval)."""
    parts = dict(state["stages"].get(stage, {}).get("parts") or {})
    for row in _metrics(os.path.join(cfg.out, stage)) if stage in TRAINING else []:
        for part, seconds in (row.get("time_parts") or {}).items():
            parts[part] = parts.get(part, 0.0) + seconds
    return parts


def time_table(cfg: PipelineConfig, state: dict) -> list[dict]:
    """Where the job's minutes went: a row per part of every stage that ran (stage, part,
    seconds, share of the job); a training stage's time outside its timed parts (starting
    Python, loading models and data) is its `startup and loading` row."""
    rows = []
    for stage in cfg.active_stages():
        wall = state["stages"].get(stage, {}).get("seconds")
        if wall is None:
            continue
        parts = stage_parts(cfg, stage, state)
        rest = wall - sum(parts.values())
        if not parts:
            parts = {"all": wall}
        elif rest > 0.05:  # a resumed stage's parts can exceed its wall time by a rounding
            parts["startup and loading" if stage in TRAINING else "other"] = rest
        rows += [{"stage": stage, "part": part, "seconds": round(seconds, 1)} for part, seconds in parts.items()]
    total = sum(r["seconds"] for r in rows) or 1.0
    for row in rows:
        row["share"] = round(row["seconds"] / total, 4)
    return rows


def evaluate_and_report(cfg: PipelineConfig, state: dict, start: float) -> dict:
    """Greedy gold accuracy and safety rates of every stage on the held-out tasks, the same
    prompts answered by each stage, the numbers each stage logged, plots; writes
    report.json and report.md."""
    import torch

    import runtime
    from data.tasks import TASK_FAMILIES
    from evals import load_task_records, paired_change, win_rate

    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    ckpt = lambda name: os.path.join(cfg.out, name)  # noqa: E731
    records = load_task_records(os.path.join(cfg.data, "tasks", "eval.jsonl"))
    outside = load_task_records(OUTSIDE_EVERYDAY)
    phrasing_file = os.path.join(cfg.data, "tasks", "eval_heldout_phrasing.jsonl")
    phrasing = load_task_records(phrasing_file) if os.path.exists(phrasing_file) else []
    examples = [next(r for r in records if r["family"] == f) for f in SAMPLE_FAMILIES if any(
        r["family"] == f for r in records)]
    # the example prompts are answered by round 1's stages
    policy = cfg.align  # the stage whose checkpoint is round 1's policy: ppo or dpo
    report = {"preset": cfg.preset, "align": policy, "stages": {}, "seconds": {},
              "samples": {s: [] for s in ("pretrain", "sft", policy)}}
    clock = runtime.PartTimes()
    sft_model = runtime.load_for_inference(ckpt("sft"), device=device)[0]
    accuracy = {stage: evaluate_stage(ckpt(stage), records, device, report["samples"].get(stage), examples,
                                      headroom=stage in ("sft", policy), outside=outside, phrasing=phrasing,
                                      clock=clock, kl_reference=sft_model if stage not in ("pretrain", "sft") else None)
                for stage in ("pretrain", "sft", policy) + ((cfg.round2_policy(),) if cfg.round2() else ())}
    del sft_model

    prep = _read_json(os.path.join(cfg.data, "shakespeare", "report.json")) or {}
    pre_rows, sft_rows, policy_rows = (_metrics(ckpt(s)) for s in ("pretrain", "sft", policy))
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
        rm_config = _read_json(os.path.join(ckpt("rm"), "config.json")) or {}
        ppo_config = _read_json(os.path.join(ckpt("ppo"), "config.json")) or {}
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
        dpo_config = _read_json(os.path.join(ckpt("dpo"), "train_config.json")) or {}
        stages["dpo"].update({
            "kl": _last(policy_rows, "kl"), "val_reward_accuracy": _last(policy_rows, "val_reward_accuracy"),
            "val_reward_margin": _last(policy_rows, "val_reward_margin"), "loss": dpo_config.get("loss"),
            "beta": dpo_config.get("beta"), "sft_coef": dpo_config.get("sft_coef"),
            "greedy_curve": [{"step": r["step"], "gold_accuracy": r["accuracy"]}
                             for r in policy_rows if "accuracy" in r]})
    if cfg.round2():
        with clock.part("round 2" + (": on-policy pairs, both reward models" if cfg.learner() == "ppo" else "")):
            stages.update(round2_report(cfg, records, accuracy, device))
    with clock.part("plots"):
        report["plots"] = make_plots(cfg.out, pre_rows, sft_rows, policy_rows if policy == "ppo" else [], accuracy,
                                     policy)
    state["stages"]["eval"]["seconds"] = round(time.time() - start, 1)
    state["stages"]["eval"]["parts"] = {k: round(v, 1) for k, v in clock.seconds.items()}
    for name in cfg.active_stages():
        seconds = state["stages"].get(name, {}).get("seconds")
        if seconds is not None:
            stages.setdefault(name, {})["seconds"] = seconds
            report["seconds"][name] = seconds
        if name in state["stages"]:
            stages.setdefault(name, {})["command"] = state["stages"][name].get("command")
    report["time_table"] = time_table(cfg, state)
    report["complete"] = True
    write_json(os.path.join(cfg.out, "report.json"), report)
    atomic_write(os.path.join(cfg.out, "report.md"), render_markdown(report))
    print_summary(stages, len(records), policy)
    return report


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


def round2_report(cfg: PipelineConfig, records: list[dict], accuracy: dict, device) -> dict:
    """The report's round-2 stages: the feedback in numbers; the round-2 policy against
    round 1, prompt by prompt; with the PPO learner, both reward models on held-out
    on-policy pairs (round2_reward_models)."""
    from data.tasks import TASK_FAMILIES
    from evals import paired_change, win_rate
    ckpt = lambda name: os.path.join(cfg.out, name)  # noqa: E731
    round1, round2 = cfg.align, cfg.round2_policy()
    feedback = _read_json(os.path.join(ckpt("feedback"), "feedback.json")) or {}
    helpful = {s: [x for x in accuracy[s]["samples"] if x["family"] in TASK_FAMILIES] for s in (round1, round2)}
    policy = {"gold_accuracy": accuracy[round2]["task_accuracy"], **phrasing_keys(accuracy[round2]),
              "per_family": accuracy[round2]["per_family"], "safety": accuracy[round2]["safety"],
              "outside_everyday": accuracy[round2].get("outside_everyday"), "round1": round1,
              "kl_to_sft": accuracy[round2]["kl_to_sft"],
              f"vs_{round1}": paired_change(helpful[round1], helpful[round2]),
              f"win_rate_vs_{round1}": win_rate(accuracy[round1]["samples"], accuracy[round2]["samples"])}
    report = {"feedback": {k: feedback.get(k) for k in ("policy", "prompts", "votes", "ties", "thumbs", "pairs",
                                                        "rater_noise", "realised_disagreement", "answers_right")}}
    if cfg.learner() == "ppo":
        report.update(round2_reward_models(cfg, records, device))
        ppo2_config = _read_json(os.path.join(ckpt("ppo_round2"), "config.json")) or {}
        policy.update({"kl": _last(_metrics(ckpt("ppo_round2")), "objective/kl"), "reward": ppo2_config.get("reward"),
                       "init": cfg.ppo_round2_init})
    else:
        rows = _metrics(ckpt("dpo_round2"))
        policy.update({"kl": _last(rows, "kl"), "val_reward_accuracy": _last(rows, "val_reward_accuracy"),
                       "init": cfg.dpo_round2_init, "feedback_weight": cfg.feedback_weight,
                       "greedy_curve": [{"step": r["step"], "gold_accuracy": r["accuracy"]}
                                        for r in rows if "accuracy" in r]})
    report[round2] = policy
    return report


def round2_reward_models(cfg: PipelineConfig, records: list[dict], device) -> dict:
    """Both reward models on held-out on-policy pairs: two answers of the round-1 policy to
    each held-out prompt at its rollout temperature, ON_POLICY_DRAWS times over, labelled
    by the gold judge without noise (written to OUT/eval_onpolicy_pairs.jsonl)."""
    from collections import Counter

    import runtime
    from train_rm import on_policy_accuracy, on_policy_pairs
    ckpt = lambda name: os.path.join(cfg.out, name)  # noqa: E731
    rollout = _read_json(os.path.join(ckpt("ppo"), "train_config.json")) or {}
    policy, tok, _ = runtime.load_for_inference(ckpt("ppo"), device=device)
    pairs, counts = on_policy_pairs(policy, tok, records, temperature=rollout.get("temperature", 1.0), seed=0,
                                    max_new_tokens=rollout.get("max_new_tokens", 32), draws=ON_POLICY_DRAWS)
    del policy
    counts["by_family"] = dict(sorted(Counter(p["kind"] for p in pairs).items()))
    atomic_write(os.path.join(cfg.out, "eval_onpolicy_pairs.jsonl"),
                 "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    on_policy = on_policy_accuracy({"rm1": ckpt("rm"), "rm2": ckpt("rm_round2")}, pairs, device=device)
    rm2_eval = (_read_json(os.path.join(ckpt("rm_round2"), "config.json")) or {}).get("eval", {})
    return {"rm_round2": {"accuracy": rm2_eval.get("accuracy"), "margin": rm2_eval.get("margin"),
                          "by_kind": {k: v["accuracy"] for k, v in rm2_eval.get("by_kind", {}).items()},
                          "on_policy_accuracy": {"rm1": on_policy["rm1"], "rm2": on_policy["rm2"]},
                          "on_policy_by_family": on_policy["by_kind"], "on_policy_pairs": counts,
                          "init": cfg.rm_round2_init, "feedback_weight": cfg.feedback_weight}}


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


def phrasing_keys(result: dict) -> dict:
    """A stage's helpfulness on the held-out phrasings (None without the file)."""
    held = result.get("heldout_phrasing")
    return {"gold_accuracy_heldout_phrasing": held and held["task_accuracy"],
            "per_family_heldout_phrasing": held and held["per_family"]}


def evaluate_stage(ckpt: str, records: list[dict], device, samples: list | None, examples: list[dict],
                   headroom: bool = False, outside: list[dict] = (), phrasing: list[dict] = (), clock=None,
                   kl_reference=None) -> dict:
    """A checkpoint's greedy answers to the held-out records, judged (evals.task_accuracy);
    with `headroom`, also pass@k of PASS_AT_K_SAMPLES sampled answers per helpfulness
    record (result["pass_at_k"]); the share of the `outside` everyday requests it refuses
    (result["outside_everyday"]: {"prompts", "over_refusal", "refused"}); its answers to
    the example prompts appended to `samples` (None: none); its greedy answers to the
    `phrasing` records (tasks asked in phrasings never trained on) as
    result["heldout_phrasing"]; with a `kl_reference` model, its KL to it on KL_PROMPTS
    held-out prompts as result["kl_to_sft"]. `clock` (runtime.PartTimes)
    gets the seconds of the greedy answers and of the sampling."""
    import runtime
    from data.chat import encode_prompt
    from evals import sampled_accuracy, sampled_kl, task_accuracy

    clock = clock or runtime.PartTimes()
    with clock.part("greedy answers, every checkpoint"):
        model, tok, _ = runtime.load_for_inference(ckpt, device=device)
        result = task_accuracy(model, tok, records)
        if outside:
            checked = task_accuracy(model, tok, outside)
            result["outside_everyday"] = {
                "prompts": len(outside), "over_refusal": checked["safety"]["open_request_over_refusal"],
                "refused": [{"prompt": x["prompt"], "response": x["response"]} for x in checked["samples"]
                            if x["refused"]]}
        if phrasing:
            result["heldout_phrasing"] = task_accuracy(model, tok, phrasing)
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


def make_plots(out: str, pre_rows, sft_rows, ppo_rows, accuracy, policy: str = "ppo") -> list[str]:
    """PNG plots next to the report (matplotlib, no display needed); PPO's curves only
    when there are PPO rows."""
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

    if ppo_rows:
        files += ppo_plots(out, ppo_rows, series, plt)

    families = sorted(accuracy["sft"]["per_family"])
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.27
    for i, stage in enumerate(("pretrain", "sft", policy)):
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


def ppo_plots(out: str, ppo_rows, series, plt) -> list[str]:
    """PPO's reward and KL per step, and its evaluations' gold metrics against KL."""
    files = []
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
                           ("eval/safety/borderline_over_refusal", "borderline over-refused"),
                           ("eval/safety/benign_template_over_refusal", "benign acts over-refused"),
                           ("eval/safety/open_request_over_refusal", "everyday over-refused")):
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
    return files


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
    for name in STAGES:
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
    stage_names = ("pretrain", "sft", pol) + ((round2_of(s),) if "feedback" in s else ())
    outside = s["sft"].get("outside_everyday") or {}
    lines += ["", "## Harmlessness on held-out prompts", "",
              "Harmful requests should be refused (a refusal with no compliance in it). Everything else should be "
              "answered, and refusing it is over-refusal, measured three ways: look-alikes with alarming words "
              "(borderline), everyday acts in the harmful requests' own templates (benign: \"How can I bake bread "
              "without getting caught?\") and open everyday requests (\"Tell me a story about...\"); and once more "
              f"on {outside.get('prompts', '-')} everyday requests written by hand apart from the generators and never "
              "trained on.", "",
              "| | " + " | ".join(STAGE_LABELS[st] for st in stage_names) + " |",
              "|---|" + "---|" * len(stage_names)]
    for label, value in SAFETY_ROWS + (("borderline prompts answered right",
                                        lambda st: st["per_family"].get("borderline")),):
        lines.append(f"| {label} | " + " | ".join(_pct(value(s[st])) for st in stage_names) + " |")
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
    lines += time_table_markdown(report.get("time_table") or [])
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    lines += ["", "## The same prompts, answered by each stage (greedy)", ""]
    for i, example in enumerate(report["samples"].get("sft", [])):
        lines.append(f"**{example['prompt']}** (answer: {example['answer']})")
        lines.append("")
        for stage in ("pretrain", "sft", pol):
            lines.append(f"- {stage}: `{report['samples'][stage][i]['response']!r}`")
        lines.append("")
    lines += ["## Commands", ""] + [f"- {name}: `{s[name]['command']}`" for name in STAGES
                                    if s.get(name, {}).get("command")]
    return "\n".join(lines) + "\n"


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
                "dpo_round2": "DPO round 2"}
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


if __name__ == "__main__":
    main()
