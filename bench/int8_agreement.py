"""What `serve.py --quantization int8` does to answers: a trained checkpoint's greedy answers
on held-out task prompts from the serving engine in float32 and with int8 weights — how many
are identical, and how the gold judge scores each set (fixed / broken, McNemar p).

    python -m bench.int8_agreement --ckpt runs/ppo --prompts 400
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch

import evals
from checkpoint import load_for_inference
from cli import UserError, entry_point, parse_config, print_config
from tasks.suite import grade
from serving.engine import Engine, GenRequest
from serving.text import chat_prompt_ids


@dataclass
class AgreementConfig:
    ckpt: str = field(default="runs/ppo", metadata={"help": "a trained checkpoint"})
    data: str = field(default=os.path.join(evals.TASKS_DIR, "eval.jsonl"), metadata={"help": "held-out task records"})
    prompts: int = field(default=400, metadata={"help": "records drawn (seeded) from --data"})
    max_tokens: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.prompts < 1 or self.max_tokens < 1:
            raise UserError("--prompts and --max-tokens must be positive")
        if not os.path.isfile(self.data):
            raise UserError(f"--data {self.data} does not exist")


def greedy_answers(ckpt: str, records: list[dict], quantization: str, max_tokens: int) -> list[str]:
    model, tok, _ = load_for_inference(ckpt)
    engine = Engine(model, tok, max_running=16, max_waiting=len(records), quantization=quantization).start()
    try:
        reqs = [engine.submit(GenRequest(prompt=chat_prompt_ids(tok, r["conversation"]), max_tokens=max_tokens,
                                         moderate=False)) for r in records]
        return [engine.wait(r)["text"] for r in reqs]
    finally:
        engine.shutdown()


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(AgreementConfig, argv, description=__doc__.split("\n")[0])
    print_config(cfg, "bench config")
    torch.set_num_threads(1)
    records = evals.load_task_records(cfg.data)
    random.Random(cfg.seed).shuffle(records)
    records = records[:cfg.prompts]
    f32, int8 = (greedy_answers(cfg.ckpt, records, q, cfg.max_tokens) for q in ("none", "int8"))
    right = [(grade(r, a), grade(r, b)) for r, a, b in zip(records, f32, int8)]
    fixed, broken = sum(1 for a, b in right if b > a), sum(1 for a, b in right if a > b)
    print(f"{cfg.ckpt}: {len(records)} held-out prompts; identical greedy answers "
          f"{sum(a == b for a, b in zip(f32, int8))}/{len(records)}; judged right: float32 "
          f"{sum(a for a, _ in right):.0f}, int8 {sum(b for _, b in right):.0f} (int8 fixed {fixed}, broke {broken}, "
          f"p {evals.sign_test_p(fixed, broken):.2f})")


if __name__ == "__main__":
    main()
