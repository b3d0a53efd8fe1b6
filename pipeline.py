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

Each stage runs as its own process with a command printed before it starts (stages.py
builds them): copy it to run that stage alone. A stage whose output is complete is
skipped (--force redoes every stage, --from-stage STAGE redoes that one and those after
it); a stage that was interrupted continues from its last checkpoint with --resume. So stopping the job (Ctrl-C) and
starting it again picks up where it stopped. At the end OUT/report.md and report.json
hold each stage's command, wall time and key numbers, plots and sample completions.

    python pipeline.py                     # the CPU defaults, both rounds: about 50 minutes on 2 cores
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
import subprocess
import sys
import time
from dataclasses import dataclass, field

import report
import report_render
from cli import UserError, entry_point, parse_config
from data.files import atomic_write, read_json_or_none, write_json
from serving.launch import ServeProcess
from stages import (ALIGN_STAGES, DPO_ROUND2_INIT, FEEDBACK_PROMPTS, FEEDBACK_WEIGHT, LEARNER_STAGES,  # noqa: F401
                    PPO_ROUND2_INIT, PRESETS, REPO, RM_ROUND2_INIT, ROUND2, STAGES, TRAINING, feedback_commands,
                    feedback_pairs, planned_commands, shown_command, stage_command)
from tasks.suite import SUITE_FILES, build_options, suite_options


@dataclass
class PipelineConfig:
    out: str = field(default=os.path.join(REPO, "runs"), metadata={"help": "checkpoints go to OUT/<stage>, the report to OUT"})
    data: str = field(default=os.path.join(REPO, "prepared"), metadata={"help": "prepared data goes to DATA/<corpus> "
                      "(DATA/shakespeare for the embedded corpus) and DATA/tasks"})
    preset: str = field(default="cpu", metadata={"choices": sorted(PRESETS)})
    corpus: list[str] = field(default_factory=list, metadata={"nargs": True,
                              "help": "text files for pretraining (default: the embedded Shakespeare corpus)"})
    text_field: str = field(default="", metadata={"help": "--corpus: the JSONL/parquet field holding the text "
                            "(data.prepare's --text-field; default text)"})
    vocab_size: int = field(default=0, metadata={"help": "--corpus: the tokenizer's vocabulary size (data.prepare's "
                            "--vocab-size; 0: its default)"})
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
    filler_share: float = field(default=0.0, metadata={"help": "share of the helpfulness demonstrations wrapped "
                                                        "in filler ('Sure! ... Hope this helps!'), which the "
                                                        "simulated users like less than the plain answer"})
    novel_share: float = field(default=0.0, metadata={"help": "round 2: share of the simulated users' prompts "
                               "that are the new request kind (tasks/novel.py: privacy and copyright requests and "
                               "look-alikes), a kind round 1's data never contain"})
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
    control: bool = field(default=False, metadata={"help": "round 2: also a control_round2 stage, the round-2 "
                          "learner's policy training with the same steps and start but without the feedback (PPO "
                          "against the round-1 reward model; DPO on the round-1 pairs alone), so the report can tell "
                          "what the feedback did"})

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)} (choose from {', '.join(STAGES)})")
        if self.rounds not in (1, 2):
            raise UserError(f"--rounds must be 1 or 2, got {self.rounds}")
        if self.vocab_size < 0:
            raise UserError(f"--vocab-size must be >= 0, got {self.vocab_size}")
        if (self.text_field or self.vocab_size) and not self.corpus:
            raise UserError("--text-field and --vocab-size go with --corpus (the embedded corpus has its own settings)")
        if not 0 <= self.novel_share <= 1:
            raise UserError(f"--novel-share must be in [0, 1], got {self.novel_share}")
        if not 0 <= self.filler_share <= 1:
            raise UserError(f"--filler-share must be in [0, 1], got {self.filler_share}")
        if not 0 <= self.rater_noise <= 1 or self.feedback_prompts < 1 or self.feedback_weight < 1:
            raise UserError("need 0 <= --rater-noise <= 1, --feedback-prompts >= 1 and --feedback-weight >= 1")
        if self.learner() == "ppo" and self.align != "ppo":
            raise UserError("--round2-learner ppo needs --align ppo (round 2's reward model and PPO go on from "
                            "round 1's); use --round2-learner dpo")
        asked = {self.from_stage} | (set(self.stages) if set(self.stages) != set(STAGES) else set())
        if "control_round2" in asked and not self.control:
            raise UserError("control_round2 is a stage only with --control")
        if self.rounds == 1 and asked & set(ROUND2):
            raise UserError(f"{', '.join(sorted(asked & set(ROUND2)))}: round-2 stage(s) need --rounds 2")
        other = {s for a, stages in ALIGN_STAGES.items() if a != self.align for s in stages}
        if asked & other:
            raise UserError(f"{', '.join(sorted(asked & other))}: not a stage of --align {self.align}")
        other = {s for a, stages in LEARNER_STAGES.items() if a != self.learner() for s in stages}
        if asked & other:
            raise UserError(f"{', '.join(sorted(asked & other))}: not a stage of round 2 by {self.learner()} "
                            "(--round2-learner)")

    def corpus_name(self) -> str:
        """The prepared corpus's folder under --data: shakespeare for the embedded corpus,
        else the first --corpus path's name without its extensions (my_books.jsonl.gz ->
        my_books)."""
        if not self.corpus:
            return "shakespeare"
        name = os.path.basename(os.path.normpath(self.corpus[0])).split(".")[0]
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "corpus"

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
        if not self.control:
            other.add("control_round2")
        return tuple(s for s in STAGES if s not in other and (self.round2() or s not in ROUND2))


# ----------------------------------------------------------------------------- stage state

def checkpoint_progress(ckpt: str) -> tuple[int, int] | None:
    """(saved step, planned steps) of a training stage's output, None if nothing is saved."""
    config, train = read_json_or_none(os.path.join(ckpt, "config.json")), read_json_or_none(os.path.join(ckpt, "train_config.json"))
    if not config or not train or not os.path.exists(os.path.join(ckpt, "state", "trainer.json")):
        return None
    return int(config.get("step", 0)), int(train.get("max_steps", 0))


def stage_done(stage: str, cfg: PipelineConfig) -> bool:
    if stage == "prepare":
        return os.path.exists(os.path.join(cfg.data, cfg.corpus_name(), "report.json"))
    if stage == "tasks":  # written, with the options this run's command gives (preset sizes, filler share)
        tasks = os.path.join(cfg.data, "tasks")
        return all(os.path.exists(os.path.join(tasks, f"{n}.jsonl")) for n in SUITE_FILES) and \
            suite_options(tasks) == build_options(stage_command("tasks", cfg)[3:])[1]
    if stage == "eval":
        return os.path.exists(os.path.join(cfg.out, "report.json")) and \
            (read_json_or_none(os.path.join(cfg.out, "report.json")) or {}).get("complete", False)
    if stage == "feedback":  # complete, and on this run's round-1 policy
        summary = read_json_or_none(os.path.join(cfg.out, "feedback", "feedback.json"))
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
    started = (read_json_or_none(os.path.join(cfg.out, stage, "train_config.json")) or {}).get("init")
    name = lambda path: os.path.basename(os.path.normpath(path))  # noqa: E731
    return not started or name(started) == name(command[command.index("--init") + 1])


# ----------------------------------------------------------------------------- running


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
    users = read_json_or_none(os.path.join(folder, "traffic.summary.json")) or {}
    pairs = sort_pairs(feedback_pairs(cfg))
    write_json(os.path.join(folder, "feedback.json"), {
        "simulated": True, "policy": cfg.align, "prompts": users.get("prompts"), "novel": users.get("novel"),
        "votes": users.get("votes"), "preference_votes": users.get("preference_votes"), "ties": users.get("ties"),
        "thumbs": users.get("thumbs"), "pairs": pairs,
        "rater_noise": cfg.rater_noise,
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
    state = read_json_or_none(os.path.join(cfg.out, "pipeline.json")) or {}
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


# ----------------------------------------------------------------------------- the report's timing

def stage_parts(cfg: PipelineConfig, stage: str, state: dict) -> dict[str, float]:
    """Seconds per part of a stage: a training stage's `time_parts` records in its
    metrics.jsonl (one per run; a resumed stage has several, which add up), or the parts the
    pipeline timed itself (feedback, eval)."""
    parts = dict(state["stages"].get(stage, {}).get("parts") or {})
    for row in report.metrics_of(os.path.join(cfg.out, stage)) if stage in TRAINING else []:
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
    """The eval stage: report.py evaluates every stage; the run's wall times, commands and
    time table join it; report.json and report.md are written."""
    import progress

    clock = progress.PartTimes()
    result = report.evaluate(cfg, clock)
    state["stages"]["eval"]["seconds"] = round(time.time() - start, 1)
    state["stages"]["eval"]["parts"] = {k: round(v, 1) for k, v in clock.seconds.items()}
    stages = result["stages"]
    for name in cfg.active_stages():
        seconds = state["stages"].get(name, {}).get("seconds")
        if seconds is not None:
            stages.setdefault(name, {})["seconds"] = seconds
            result["seconds"][name] = seconds
        if name in state["stages"]:
            stages.setdefault(name, {})["command"] = state["stages"][name].get("command")
    result["stages_run"] = list(cfg.active_stages())
    result["time_table"] = time_table(cfg, state)
    result["complete"] = True
    ship(cfg.out, stages["promotion"]["shipped"])
    report.write(cfg.out, result)
    report_render.print_summary(stages, result["records"], cfg.align)
    return result


def ship(out: str, stage: str) -> None:
    """Point OUT/shipped at the checkpoint the promotion gate chose (a relative symlink,
    replaced atomically): what `serve.py --ckpt OUT/shipped` and the exports read."""
    link, tmp = os.path.join(out, "shipped"), os.path.join(out, f".shipped.tmp{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(stage, tmp)
    os.replace(tmp, link)


if __name__ == "__main__":
    main()
