"""PPO step time per rollout token against the group size k (--samples-per-prompt).

The rollout batch stays at --rollouts responses per step (rollouts/k prompts, k samples
each), so what changes with k is only how many prompts share a prompt pass: generation
per token should get cheaper as k grows (one KV-cache fill per group), and training should
not change. Runs train_ppo.py for a few steps per k (every group kept, so the training work
does not depend on how many groups happen to be equal) and reads its metrics.jsonl;
"rollout" is TRL's time/generation: sampling, scoring and the reference log-probs.

    python -m bench.ppo --init runs/sft --reward-model runs/rm --ks 2,4,8,16
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from cli import UserError, entry_point, parse_config, print_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class BenchConfig:
    init: str = field(default=os.path.join(REPO, "runs", "sft"), metadata={"help": "SFT checkpoint"})
    reward_model: str = field(default=os.path.join(REPO, "runs", "rm"), metadata={"help": "reward model"})
    prompts: str = field(default=os.path.join(REPO, "prepared", "tasks", "prompts.jsonl"),
                         metadata={"help": "PPO prompts (train_ppo.py --prompts)"})
    ks: list[int] = field(default_factory=lambda: [2, 4, 8, 16], metadata={"help": "group sizes to time"})
    rollouts: int = field(default=64, metadata={"help": "responses per step (each k must divide it)"})
    steps: int = field(default=6, metadata={"help": "steps per k; the first is not timed"})
    device: str = field(default="cpu", metadata={"help": "train_ppo.py --device"})


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(BenchConfig, argv, description=__doc__.split("\n")[0])
    print_config(cfg, "bench config")
    if any(k < 2 or cfg.rollouts % k for k in cfg.ks) or cfg.steps < 2:
        raise UserError("each k must be >= 2 and divide --rollouts; --steps must be >= 2")
    print(f"{'k':>3} {'prompts':>7} {'rollout ms/token':>17} {'train ms/token':>15} {'step ms/token':>14} {'resp len':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        held_out = os.path.join(tmp, "one.jsonl")  # evaluation is not what is timed: one record
        with open(held_out, "w") as f:
            f.write(json.dumps({"family": "arithmetic", "prompt": "What is 2 + 3?", "answer": "5"}) + "\n")
        for k in cfg.ks:
            out = os.path.join(tmp, f"k{k}")
            command = [sys.executable, "train_ppo.py", "--init", cfg.init, "--reward-model", cfg.reward_model,
                       "--prompts", cfg.prompts, "--eval-data", held_out, "--out", out, "--device", cfg.device,
                       "--samples-per-prompt", str(k), "--batch-size", str(cfg.rollouts // k),
                       "--minibatch-size", "16", "--max-steps", str(cfg.steps), "--log-every", "1",
                       "--no-drop-equal-groups",  # dropping would make the training work depend on luck
                       "--eval-every", str(10 * cfg.steps), "--save-every", str(10 * cfg.steps)]
            proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                raise UserError(f"k={k}: train_ppo.py failed: {proc.stderr.strip().splitlines()[-1:]}")
            with open(os.path.join(out, "metrics.jsonl")) as f:
                rows = [r for r in map(json.loads, f) if "time/generation" in r][1:]
            tokens = [cfg.rollouts * r["tokens/response_len"] for r in rows]
            gen = statistics.mean(1000 * r["time/generation"] / t for r, t in zip(rows, tokens))
            train = statistics.mean(1000 * r["time/training"] / t for r, t in zip(rows, tokens))
            length = statistics.mean(r["tokens/response_len"] for r in rows)
            print(f"{k:>3} {cfg.rollouts // k:>7} {gen:>17.2f} {train:>15.2f} {gen + train:>14.2f} {length:>9.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
