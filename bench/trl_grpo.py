"""A peer, side by side: TRL's GRPOTrainer and our train_ppo.py on the same SFT model, the
same RL prompts, the same reward and the same number of steps, both judged on the held-out
helpfulness prompts.

1. Prompts: fresh helpfulness instances (tasks/rl_prompts.py: never an SFT demonstration,
   never held out), optionally only the frontier, where the SFT model's samples disagree.
2. Reward: the gold judge (tasks.suite.grade), 1 for a right answer and 0 otherwise.
3. TRL: the SFT model exported with convert.py's `export_hf`, trained by GRPOTrainer
   (group-normalized advantages, KL to the start, TRL's defaults otherwise), imported back.
4. Ours: `train_ppo.py --reward task --advantage rloo` with the same prompts per step,
   samples per prompt, learning rate, KL coefficient, temperature and steps.
5. Both, and the SFT model, answer the held-out helpfulness prompts greedily (evals.py's
   judge); each RL run against SFT prompt by prompt (fixed, broken, McNemar p).

TRL is a benchmark-only dependency: `pip install trl` (measured with trl 1.16.0). Nothing
outside bench/ imports it.

    python -m bench.trl_grpo --init runs/sft --steps 30 --out runs/bench_trl_grpo
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

from cli import UserError, config_dict, entry_point, parse_config, print_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, "prepared", "tasks")


@dataclass
class PeerConfig:
    init: str = field(default=os.path.join(REPO, "runs", "sft"), metadata={"help": "the SFT checkpoint both start from"})
    sft_data: str = field(default=os.path.join(TASKS, "sft.jsonl"), metadata={
        "help": "SFT demonstrations: their prompts are never RL prompts"})
    eval_data: str = field(default=os.path.join(TASKS, "eval.jsonl"), metadata={
        "help": "held-out task records: never RL prompts; their helpfulness prompts judge both runs"})
    out: str = field(default=os.path.join(REPO, "runs", "bench_trl_grpo"), metadata={"help": "output directory"})
    prompts_per_family: int = field(default=100, metadata={"help": "fresh RL prompts drawn per helpfulness family"})
    frontier: bool = field(default=False, metadata={
        "help": "keep only the prompts where the SFT model's samples disagree (estimated with --samples-per-prompt)"})
    steps: int = field(default=30, metadata={"help": "RL steps of each run (one batch of prompts per step)"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per step"})
    samples_per_prompt: int = field(default=8, metadata={"help": "answers sampled per prompt (the group)"})
    lr: float = field(default=3e-5, metadata={"help": "learning rate of both"})
    kl_coef: float = field(default=0.1, metadata={"help": "KL penalty coefficient (TRL's beta)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    max_new_tokens: int = field(default=32, metadata={"help": "answer length limit"})
    seed: int = field(default=1337, metadata={"help": "seeds the prompts, both runs and the pass-rate estimate"})
    skip_trl: bool = field(default=False, metadata={"help": "run only ours"})
    skip_ours: bool = field(default=False, metadata={"help": "run only TRL"})

    def __post_init__(self):
        if min(self.steps, self.prompts_per_step, self.prompts_per_family) < 1 or self.samples_per_prompt < 2:
            raise UserError("--steps, --prompts-per-step and --prompts-per-family must be at least 1 and "
                            "--samples-per-prompt at least 2 (a group needs two answers)")
        if not self.lr > 0 or self.kl_coef < 0 or not 0 < self.temperature <= 2:
            raise UserError("--lr must be > 0, --kl-coef >= 0 and --temperature in (0, 2]")
        for path in (self.init, self.sft_data, self.eval_data):
            if not os.path.exists(path):
                raise UserError(f"{path} does not exist (run python pipeline.py --stages prepare tasks pretrain sft)")


# ----------------------------------------------------------------------------- 1. prompts

def rl_prompts(cfg: PeerConfig) -> tuple[list[dict], int]:
    """(fresh helpfulness prompts, or with --frontier those the SFT model sometimes gets
    right; how many fresh ones were drawn)."""
    from evals import estimate_pass_rates
    from tasks.rl_prompts import fresh_task_prompts, frontier, prompt_texts
    from tasks.suite import TASK_FAMILIES
    records = fresh_task_prompts(list(TASK_FAMILIES), cfg.prompts_per_family, cfg.seed,
                                 prompt_texts([cfg.sft_data, cfg.eval_data]))
    fresh = len(records)
    if cfg.frontier:
        from checkpoint import load_for_inference
        model, tok, _ = load_for_inference(cfg.init, device="cpu")
        rates = estimate_pass_rates(model, tok, records, cfg.samples_per_prompt, cfg.temperature, cfg.seed,
                                    cfg.max_new_tokens)
        records = frontier(records, rates)
    if not records:
        raise UserError("no fresh helpfulness prompts left outside the SFT and held-out files")
    return records, fresh


# ----------------------------------------------------------------------------- 3. TRL

def run_trl(cfg: PeerConfig, records: list[dict]) -> str:
    """GRPOTrainer on the exported SFT model; returns our checkpoint of its result."""
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise UserError(f"the TRL side needs `pip install trl` ({e}); or pass --skip-trl") from e
    from interop.hf import export_hf, import_hf
    from tasks.suite import grade

    hf_start, hf_end = os.path.join(cfg.out, "hf_sft"), os.path.join(cfg.out, "hf_trl_grpo")
    export_hf(cfg.init, hf_start)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "family": r["family"],
                                  "answer_type": r["answer_type"], "answer": r["answer"]} for r in records])

    def gold_reward(prompts, completions, family, answer_type, answer, **_):
        return [grade({"family": f, "answer_type": t, "answer": a}, c[0]["content"])
                for c, f, t, a in zip(completions, family, answer_type, answer)]

    args = GRPOConfig(
        output_dir=os.path.join(cfg.out, "trl_runs"), max_steps=cfg.steps, learning_rate=cfg.lr, beta=cfg.kl_coef,
        num_generations=cfg.samples_per_prompt, per_device_train_batch_size=cfg.prompts_per_step * cfg.samples_per_prompt,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed, use_cpu=True,
        bf16=False, logging_steps=5, save_strategy="no", report_to="none", lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(hf_start)
    trainer = GRPOTrainer(model=model, reward_funcs=gold_reward, args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(hf_start))
    trainer.train()
    trainer.save_model(hf_end)
    ours = os.path.join(cfg.out, "trl_grpo")
    import_hf(hf_end, ours)
    return ours


# ----------------------------------------------------------------------------- 4. ours

def run_ours(cfg: PeerConfig, records: list[dict]) -> str:
    """train_ppo.py with the grader as reward on the same prompts; returns its checkpoint."""
    prompts = os.path.join(cfg.out, "rl_prompts.jsonl")
    with open(prompts, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    out = os.path.join(cfg.out, "ours")
    cmd = [sys.executable, "train_ppo.py", "--init", cfg.init, "--out", out, "--prompts", prompts,
           "--reward", "task", "--advantage", "rloo", "--samples-per-prompt", str(cfg.samples_per_prompt),
           "--batch-size", str(cfg.prompts_per_step), "--max-steps", str(cfg.steps), "--lr", str(cfg.lr),
           "--kl-coef", str(cfg.kl_coef), "--temperature", str(cfg.temperature),
           "--max-new-tokens", str(cfg.max_new_tokens), "--seed", str(cfg.seed), "--eval-every", str(cfg.steps),
           "--save-every", str(cfg.steps), "--device", "cpu",
           # one update on the whole rollout per step, as GRPOTrainer's defaults do (num_iterations 1)
           "--ppo-epochs", "1", "--minibatch-size", str(cfg.prompts_per_step * cfg.samples_per_prompt)]
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO)
    if done.returncode != 0:
        raise UserError(f"train_ppo.py failed (exit status {done.returncode}); its error is printed above")
    return out


# ----------------------------------------------------------------------------- 5. judged

def judge(ckpts: dict[str, str], eval_data: str) -> dict:
    """Greedy held-out helpfulness of each checkpoint, and each against "sft" prompt by prompt."""
    from checkpoint import load_for_inference
    from tasks.suite import TASK_FAMILIES
    from evals import load_task_records, paired_change, task_accuracy
    records = [r for r in load_task_records(eval_data) if r["family"] in TASK_FAMILIES]
    results = {}
    for name, ckpt in ckpts.items():
        model, tok, _ = load_for_inference(ckpt, device="cpu")
        results[name] = task_accuracy(model, tok, records)
    return {name: {"helpfulness": r["task_accuracy"], "per_family": r["per_family"],
                   **({"vs_sft": paired_change(results["sft"]["samples"], r["samples"])} if name != "sft" else {})}
            for name, r in results.items()}


def table(judged: dict, seconds: dict) -> str:
    lines = ["| | held-out helpfulness | fixed / broken vs SFT (McNemar p) | wall time |", "|---|---|---|---|"]
    for name, r in judged.items():
        change = r.get("vs_sft")
        versus = f"{change['fixed']} / {change['broken']} (p {change['p_value']:.3g})" if change else "-"
        lines.append(f"| {name} | {100 * r['helpfulness']:.1f}% | {versus} | "
                     f"{f'{seconds[name]:.0f} s' if name in seconds else '-'} |")
    return "\n".join(lines)


@entry_point
def main(argv=None) -> dict:
    cfg = parse_config(PeerConfig, argv, description=__doc__.split("\n\n")[0])
    print_config(cfg, "trl_grpo")
    os.makedirs(cfg.out, exist_ok=True)
    records, fresh = rl_prompts(cfg)
    print(f"{fresh} fresh RL prompts" + (f", {len(records)} on the SFT model's frontier" if cfg.frontier else ""),
          flush=True)
    ckpts, seconds = {"sft": cfg.init}, {}
    for name, run, skip in (("trl_grpo", run_trl, cfg.skip_trl), ("ours_rloo", run_ours, cfg.skip_ours)):
        if not skip:
            start = time.time()
            ckpts[name] = run(cfg, records)
            seconds[name] = time.time() - start
    judged = judge(ckpts, cfg.eval_data)
    result = {"config": config_dict(cfg), "fresh_prompts": fresh, "rl_prompts": len(records), "seconds": seconds,
              "results": judged}
    with open(os.path.join(cfg.out, "peer.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(table(judged, seconds))
    return result


if __name__ == "__main__":
    main()
