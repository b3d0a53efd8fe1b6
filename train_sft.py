"""Stage 2: supervised fine-tuning (SFT) on instruction/response conversations.

InstructGPT's first step (Ouyang et al. 2022): take the pretrained model and continue
next-token training on demonstrations, but count the loss only on the assistant's
tokens (and the <|end|> that closes each reply), so the model learns to answer and to
stop rather than to imitate the user. Conversations are right-padded into batches of
similar length (bucketing wastes little on padding). Every --eval-every steps: held-out
loss on the assistant tokens and task accuracy by greedy generation, per task family.

    python train_sft.py                               # from runs/pretrain on the task suite
    python train_sft.py --init runs/pretrain --data my_chats.jsonl alpaca.jsonl --out runs/sft
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch

from checkpoint import load_model, read_checkpoint_config
from cli import UserError, entry_point, print_config
from data.loader import BucketLoader, collate
from data.text.chat import load_chat_jsonl
from data.text.tokenizer import Tokenizer
from distributed import Env, all_reduce_sum, print0, seed_everything, sharded_batches
from evals import accuracy_metrics, format_accuracy, format_samples, load_task_records, task_accuracy, task_files
from trainer import TrainConfig, Trainer, run_main

REPO = os.path.dirname(os.path.abspath(__file__))


@dataclass
class SFTConfig(TrainConfig):
    out: str = field(default=os.path.join(REPO, "runs", "sft"), metadata={"help": "checkpoint directory"})
    init: str = field(default=os.path.join(REPO, "runs", "pretrain"), metadata={"help": "pretrained checkpoint"})
    data: list[str] = field(default_factory=list, metadata={"nargs": True,
                            "help": "JSONL files: messages, Alpaca, prompt/completion or ShareGPT (default: the task suite)"})
    eval_data: str = field(default="", metadata={"help": "held-out task records with answers (default: the suite's eval.jsonl)"})
    val_fraction: float = field(default=0.05, metadata={"help": "held-out share of --data for the loss, when no eval records have messages"})
    truncation: str = field(default="truncate", metadata={"choices": ["truncate", "drop"],
                            "help": "too-long conversations: cut from the prompt side, or drop"})
    max_steps: int = field(default=1800, metadata={"help": "optimizer steps: 1,800 x 32 rows is about 10 passes "
                                                      "over the task suite's 6,000 demonstrations"})
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    eval_every: int = 450
    save_every: int = 900
    eval_max_new_tokens: int = 32
    gold_eval: str = field(default="all", metadata={"choices": ["all", "last"], "help": "the gold evaluation "
                           "(greedy answers to the held-out tasks) at every eval, step 0 included, or at the last "
                           "step only; the held-out loss is measured at every eval either way"})
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.gold_eval not in ("all", "last"):
            raise UserError(f"--gold-eval must be all or last, got {self.gold_eval!r}")


@torch.no_grad()
def heldout_loss(model, examples, pad_id: int, trainer, env, batch_size: int) -> float:
    """Mean loss per assistant token over held-out conversations (ranks split the work)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for chunk, real in sharded_batches(examples, batch_size, env.rank, env.world_size):
        x, y = collate(chunk, pad_id)
        with trainer.autocast():
            nll = model(x.to(env.device), y.to(env.device), reduction="none").double()
        total += float(real) * torch.stack([nll.sum(), (y != -100).sum().to(env.device).double()])
    all_reduce_sum(total)
    model.train()
    return float(total[0] / total[1].clamp(min=1))


@entry_point
def main(argv=None) -> None:
    run_main(SFTConfig, train, argv, description=__doc__.split("\n")[0])


def train(cfg: SFTConfig, env: Env) -> None:
    if env.is_main:
        print_config(cfg, "sft config")
    data_files, eval_file = task_files(cfg.data, "sft.jsonl", cfg.eval_data)

    # ---- model and tokenizer from the pretrained checkpoint
    init_config = read_checkpoint_config(cfg.init)
    model, _ = load_model(cfg.init, dropout=cfg.dropout)
    tokenizer_path = os.path.join(cfg.init, "tokenizer.json")
    tok = Tokenizer.load(tokenizer_path)
    max_len = model.cfg.max_seq_len

    examples, skipped, truncated = load_chat_jsonl(data_files, tok, max_len, cfg.truncation)
    print0(f"sft data: {len(examples)} conversations from {len(data_files)} file(s); "
                   f"skipped {sum(skipped.values())} ({', '.join(f'{k} {v}' for k, v in sorted(skipped.items())) or 'none'}); "
                   f"truncated {truncated}")
    if not examples:
        raise UserError(f"no usable records in {' '.join(data_files)}")
    eval_records = load_task_records(eval_file)
    eval_examples, _, _ = load_chat_jsonl([eval_file], tok, max_len, "drop")
    if not eval_examples:  # no held-out conversations: hold out a slice of the training data
        rng = random.Random(cfg.seed)
        rng.shuffle(examples)
        n_val = max(1, int(len(examples) * cfg.val_fraction))
        eval_examples, examples = examples[:n_val], examples[n_val:]

    seed_everything(cfg.seed, env.rank)
    rows = cfg.batch_size * env.world_size
    loader = BucketLoader(examples, rows, env.rank, env.world_size, cfg.seed)
    trainer = Trainer(cfg, env, model, stage="sft", tokenizer_path=tokenizer_path,
                              data_state=loader.state_dict, extra_config={"init": cfg.init,
                                                                          "base_stage": init_config.get("stage")})
    model = trainer.model
    if cfg.resume:
        loader.load_state_dict(trainer.resume()["data"])
    trainer.start()

    def evaluate() -> None:
        with trainer.timed("evaluation"):
            loss = heldout_loss(model, eval_examples, tok.pad_id, trainer, env, cfg.batch_size)
            record = {"step": trainer.step, "heldout_loss": loss}
            line = f"eval step {trainer.step}: held-out loss {loss:.4f}"
            if eval_records and (cfg.gold_eval == "all" or trainer.step == cfg.max_steps):
                result = task_accuracy(model, tok, eval_records, env.rank, env.world_size, cfg.eval_max_new_tokens)
                record.update(accuracy_metrics(result))
                line += f", task accuracy {format_accuracy(result)}"
                line += format_samples(result["samples"], 3)
            print0(line)
            trainer.log(record)

    if trainer.step == 0:
        evaluate()  # the starting point: what pretraining alone gives
    with trainer:
        while trainer.step < cfg.max_steps:
            trainer.set_lr()
            x, y = loader.next_batch(tok.pad_id)
            x, y = x.to(env.device), y.to(env.device)
            with trainer.autocast():
                loss = model(x, y)  # mean cross-entropy over assistant tokens only
            trainer.backward(loss)
            if not trainer.optimizer_step(loss, tokens=int((y != -100).sum()) * env.world_size):
                continue
            if trainer.due(cfg.eval_every):
                evaluate()
            trainer.maybe_save()
            if trainer.stop_requested():
                break


if __name__ == "__main__":
    main()
