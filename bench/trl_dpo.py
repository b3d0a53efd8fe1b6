"""A peer check: TRL's DPOTrainer and our train_dpo.py on the same SFT model, the same pairs
in the same order, and the same optimizer settings.

1. Pairs: the first --pairs usable records of a preference file (prompt / chosen /
   rejected strings), visited in the order train_dpo.py's seeded cursor visits them; TRL
   reads them in that order (train_sampling_strategy "sequential"), so both see the same
   batch at every step.
2. Step 0: TRL's own tokenization (the exported chat template, prompt + completion, the
   completion where they diverge) and the exported Hugging Face model give each pair's
   chosen and rejected log-probabilities; ours come from train_dpo.sequence_logprobs on
   our encoding. Both, and the step-0 loss and implicit-reward margins from them, must
   agree to 1e-5 (policy = reference at step 0, so the loss is log 2 for every pair).
3. Training: --steps updates each, AdamW (betas 0.9 / 0.95, no weight decay), constant
   learning rate, no warmup, gradient clipping at 1.0, fp32 on the CPU; the per-step losses
   side by side, with the largest gap and the wall time of each.

TRL is a benchmark-only dependency: `pip install trl` (measured with trl 1.16.0). Nothing
outside bench/ imports it.

    python -m bench.trl_dpo --init runs/sft --steps 20 --out runs/bench_trl_dpo
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
class DPOPeerConfig:
    init: str = field(default=os.path.join(REPO, "runs", "sft"), metadata={"help": "the SFT checkpoint both start from"})
    data: str = field(default=os.path.join(TASKS, "prefs.jsonl"), metadata={"help": "preference pairs (prompt, "
                      "chosen and rejected as strings)"})
    eval_data: str = field(default=os.path.join(TASKS, "eval.jsonl"), metadata={
        "help": "held-out records: a few of them for train_dpo.py's own periodic evaluation"})
    out: str = field(default=os.path.join(REPO, "runs", "bench_trl_dpo"), metadata={"help": "output directory"})
    pairs: int = field(default=160, metadata={"help": "pairs used (steps * batch size are visited)"})
    steps: int = field(default=20, metadata={"help": "updates of each run"})
    batch_size: int = field(default=8, metadata={"help": "pairs per update"})
    lr: float = field(default=5e-5, metadata={"help": "learning rate of both"})
    beta: float = field(default=0.1, metadata={"help": "DPO's beta"})
    seed: int = field(default=1337, metadata={"help": "seeds the pair order and both runs"})

    def __post_init__(self):
        if min(self.pairs, self.steps, self.batch_size) < 1 or self.lr <= 0 or self.beta <= 0:
            raise UserError("--pairs, --steps and --batch-size must be at least 1; --lr and --beta above 0")
        for path in (self.init, self.data, self.eval_data):
            if not os.path.exists(path):
                raise UserError(f"{path} does not exist (run python pipeline.py --stages prepare tasks pretrain sft)")


# ----------------------------------------------------------------------------- 1. pairs

def pick_pairs(cfg: DPOPeerConfig) -> tuple[list[dict], list[int]]:
    """(the records, the order train_dpo.py visits them in over --steps)."""
    from data.text.chat import iter_jsonl
    from data.loader import EpochCursor
    from tasks.prefs import pair_messages
    from collections import Counter
    records = []
    for rec, _ in iter_jsonl([cfg.data], pair_messages, Counter()):
        if all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")) and \
                rec["chosen"] != rec["rejected"]:
            records.append({k: rec[k] for k in ("prompt", "chosen", "rejected")})
        if len(records) == cfg.pairs:
            break
    if len(records) < cfg.batch_size:
        raise UserError(f"{cfg.data}: fewer than {cfg.batch_size} string prompt/chosen/rejected records")
    cursor = EpochCursor(len(records), cfg.batch_size, cfg.seed)
    return records, [i for _ in range(cfg.steps) for i in cursor.next()]


# ----------------------------------------------------------------------------- 2. step 0

def step0(cfg: DPOPeerConfig, records: list[dict], trainer) -> dict:
    """Per-pair log-probs by TRL's tokenization and the HF model against ours."""
    import torch
    from checkpoint import load_model
    import train_dpo
    from data.text.chat import encode_chat
    from data.text.tokenizer import Tokenizer
    hf = trainer.model
    hf.eval()
    ours, _ = load_model(cfg.init, dropout=0.0)
    tok = Tokenizer.load(os.path.join(cfg.init, "tokenizer.json"))
    logp_gaps, loss_gaps, token_mismatch = [], [], 0
    with torch.no_grad():
        for row, rec in zip(trainer.train_dataset, records):
            theirs = []
            for side in ("chosen", "rejected"):
                ids = torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])
                logp = hf(ids).logits[0, :-1].double().log_softmax(-1)
                n = len(row["prompt_ids"])
                theirs.append(sum(logp[t - 1, ids[0, t]] for t in range(n, ids.shape[1])).item())
                conv = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec[side]}]
                mine_ids, their_ids = encode_chat(tok, conv)[0], ids[0].tolist()
                token_mismatch += int(mine_ids != their_ids and mine_ids[1:] != their_ids)
            sides = [train_dpo.Side(i, train_dpo.answer_only(i, tok.assistant_id)) for i in
                     (encode_chat(tok, [{"role": "user", "content": rec["prompt"]},
                                        {"role": "assistant", "content": rec[s]}])[0] for s in ("chosen", "rejected"))]
            mine = train_dpo.sequence_logprobs(ours, sides, tok.pad_id, "cpu").double().tolist()
            logp_gaps += [abs(a - b) / max(1.0, abs(b)) for a, b in zip(theirs, mine)]
            # the reference is the start: each side's log-prob against the same model's
            as_tensors = lambda v: [torch.tensor([x], dtype=torch.float64) for x in v]  # noqa: E731
            loss, rc, rr = train_dpo.dpo_loss(*as_tensors(mine + mine), cfg.beta)
            loss_t, rc_t, rr_t = train_dpo.dpo_loss(*as_tensors(theirs + theirs), cfg.beta)
            loss_gaps.append(max(abs(loss.item() - loss_t.item()), abs((rc - rr).item() - (rc_t - rr_t).item())))
    hf.train()
    return {"pairs": len(records), "max_loss_or_margin_gap": max(loss_gaps), "max_relative_logp_gap": max(logp_gaps),
            "token_sequences_differing": int(token_mismatch)}


# ----------------------------------------------------------------------------- 3. training

def run_trl(cfg: DPOPeerConfig, records: list[dict], order: list[int]) -> dict:
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer
    except ImportError as e:
        raise UserError(f"the TRL side needs `pip install trl` ({e})") from e
    from interop.hf import export_hf
    from checkpoint import read_checkpoint_config
    hf_dir = os.path.join(cfg.out, "hf_sft")
    export_hf(cfg.init, hf_dir)
    visited = [records[i] for i in order]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in visited])
    ctx = read_checkpoint_config(cfg.init)["model"]["max_seq_len"]
    args = DPOConfig(
        output_dir=os.path.join(cfg.out, "trl_runs"), max_steps=cfg.steps, learning_rate=cfg.lr, beta=cfg.beta,
        loss_type=["sigmoid"], per_device_train_batch_size=cfg.batch_size, max_length=ctx,
        truncation_mode="keep_end", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, seed=cfg.seed, use_cpu=True,
        bf16=False, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        train_sampling_strategy="sequential", dataloader_drop_last=True)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(hf_dir), args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(hf_dir))
    check = step0(cfg, visited[:cfg.pairs], trainer)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "seconds": seconds, "step0": check}


def run_ours(cfg: DPOPeerConfig, records: list[dict]) -> dict:
    pairs_file, eval_file = os.path.join(cfg.out, "pairs.jsonl"), os.path.join(cfg.out, "eval_small.jsonl")
    with open(pairs_file, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with open(cfg.eval_data) as src, open(eval_file, "w") as f:
        f.writelines(line for _, line in zip(range(8), src))
    out = os.path.join(cfg.out, "ours")
    cmd = [sys.executable, "train_dpo.py", "--init", cfg.init, "--data", pairs_file, "--eval-data", eval_file,
           "--out", out, "--val-fraction", "0", "--batch-size", str(cfg.batch_size), "--max-steps", str(cfg.steps),
           "--lr", str(cfg.lr), "--beta", str(cfg.beta), "--schedule", "constant", "--warmup-steps", "0",
           "--weight-decay", "0", "--grad-clip", "1.0", "--log-every", "1", "--eval-every", str(cfg.steps),
           "--save-every", str(cfg.steps), "--kl-prompts", "0", "--sft-coef", "0", "--seed", str(cfg.seed),
           "--device", "cpu",
           "--dtype", "float32"]
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    done = subprocess.run(cmd, cwd=REPO)
    if done.returncode != 0:
        raise UserError(f"train_dpo.py failed (exit status {done.returncode}); its error is printed above")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    return {"losses": losses, "seconds": time.time() - start}


@entry_point
def main(argv=None) -> dict:
    cfg = parse_config(DPOPeerConfig, argv, description=__doc__.split("\n\n")[0])
    print_config(cfg, "trl_dpo")
    os.makedirs(cfg.out, exist_ok=True)
    records, order = pick_pairs(cfg)
    trl = run_trl(cfg, records, order)
    ours = run_ours(cfg, records)
    gaps = [abs(a - b) for a, b in zip(trl["losses"], ours["losses"])]
    result = {"config": config_dict(cfg), "step0": trl["step0"], "trl": trl, "ours": ours,
              "max_loss_gap": max(gaps) if gaps else None}
    with open(os.path.join(cfg.out, "peer.json"), "w") as f:
        json.dump(result, f, indent=1)
    s0 = trl["step0"]
    print(f"step 0 on {s0['pairs']} pairs: token sequences that differ {s0['token_sequences_differing']}; largest "
          f"gap in per-pair loss or implicit-reward margin {s0['max_loss_or_margin_gap']:.1e}; largest relative gap "
          f"in a sequence log-prob {s0['max_relative_logp_gap']:.1e}")
    print("| step | TRL loss | ours | gap |\n|---|---|---|---|")
    for i, (a, b) in enumerate(zip(trl["losses"], ours["losses"]), 1):
        print(f"| {i} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |")
    print(f"wall time: TRL {trl['seconds']:.1f} s, ours {ours['seconds']:.1f} s (ours includes start-up and its "
          f"step-0 evaluation of 8 records); largest loss gap {result['max_loss_gap']:.2e}")
    return result


if __name__ == "__main__":
    main()
