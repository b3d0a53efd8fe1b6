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

import runtime
from cli import UserError, print_config
from data.chat import load_chat_jsonl
from data.tokenizer import Tokenizer
from evals import accuracy_metrics, format_accuracy, format_samples, load_task_records, task_accuracy, task_files

REPO = os.path.dirname(os.path.abspath(__file__))
TASKS_DIR = os.path.join(REPO, "prepared", "tasks")


@dataclass
class SFTConfig(runtime.TrainConfig):
    out: str = field(default=os.path.join(REPO, "runs", "sft"), metadata={"help": "checkpoint directory"})
    init: str = field(default=os.path.join(REPO, "runs", "pretrain"), metadata={"help": "pretrained checkpoint"})
    data: list[str] = field(default_factory=list, metadata={"nargs": True,
                            "help": "JSONL files: messages, Alpaca, prompt/completion or ShareGPT (default: the task suite)"})
    eval_data: str = field(default="", metadata={"help": "held-out task records with answers (default: the suite's eval.jsonl)"})
    val_fraction: float = field(default=0.05, metadata={"help": "held-out share of --data for the loss, when no eval records have messages"})
    truncation: str = field(default="truncate", metadata={"choices": ["truncate", "drop"],
                            "help": "too-long conversations: cut from the prompt side, or drop"})
    max_steps: int = field(default=1400, metadata={"help": "1,400 x 32 rows: about 8 passes over the suite's 5,400 "
                                                      "demonstrations, as 1,200 were over its 4,800 before the safety families"})
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    eval_every: int = 350
    save_every: int = 350
    eval_max_new_tokens: int = 32
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


def batches_for_epoch(lengths: list[int], rows: int, epoch: int, seed: int) -> list[list[int]]:
    """Shuffle, then sort within pools of 50 batches by length, cut into batches, shuffle
    the batches: similar lengths share a batch, and the order stays random."""
    order = list(range(len(lengths)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    out = []
    pool = 50 * rows
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        out += [chunk[i:i + rows] for i in range(0, len(chunk) - rows + 1, rows)]
    random.Random(f"{seed}:{epoch}:batches").shuffle(out)
    return out


class BucketLoader:
    """Global batches of `rows` examples; each rank takes its slice. State: (epoch, position)."""

    def __init__(self, examples, rows: int, rank: int, world: int, seed: int):
        if len(examples) < rows:
            raise UserError(f"{len(examples)} training examples are fewer than one global batch of {rows}")
        self.examples, self.rows, self.rank, self.world, self.seed = examples, rows, rank, world, seed
        self.lengths = [len(e.ids) for e in examples]
        self.epoch, self.position = 0, 0
        self._batches = batches_for_epoch(self.lengths, rows, 0, seed)

    def next_batch(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = batches_for_epoch(self.lengths, self.rows, self.epoch, self.seed)
        batch = self._batches[self.position]
        self.position += 1
        per_rank = self.rows // self.world
        return collate([self.examples[i] for i in batch[self.rank * per_rank:(self.rank + 1) * per_rank]], pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = batches_for_epoch(self.lengths, self.rows, self.epoch, self.seed)


def collate(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and targets; a target is -100 (ignored) unless the mask is 1."""
    width = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        ids, mask = torch.tensor(e.ids), torch.tensor(e.mask)
        n = len(e.ids) - 1
        x[row, :n] = ids[:-1]
        y[row, :n] = torch.where(mask[1:] == 1, ids[1:], torch.tensor(-100))
    return x, y


@torch.no_grad()
def heldout_loss(model, examples, pad_id: int, trainer, env, batch_size: int) -> float:
    """Mean loss per assistant token over held-out conversations (ranks split the work)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    per_rank = -(-len(examples) // env.world_size)
    mine = examples[env.rank * per_rank:(env.rank + 1) * per_rank]
    for i in range(0, per_rank, batch_size):  # same number of forwards on every rank
        chunk = mine[i:i + batch_size] or examples[:1]
        weight = 1.0 if mine[i:i + batch_size] else 0.0
        x, y = collate(chunk, pad_id)
        with trainer.autocast():
            nll = model(x.to(env.device), y.to(env.device), reduction="none").double()
        total += weight * torch.stack([nll.sum(), (y != -100).sum().to(env.device).double()])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    model.train()
    return float(total[0] / total[1].clamp(min=1))


def main(argv=None) -> None:
    runtime.run_main(SFTConfig, train, argv, description=__doc__.split("\n")[0])


def train(cfg: SFTConfig, env: runtime.Env) -> None:
    if env.is_main:
        print_config(cfg, "sft config")
    data_files, eval_file = task_files(cfg.data, "sft.jsonl", cfg.eval_data, TASKS_DIR)

    # ---- model and tokenizer from the pretrained checkpoint
    init_config = runtime.read_checkpoint_config(cfg.init)
    model, _ = runtime.load_model(cfg.init, dropout=cfg.dropout)
    tokenizer_path = os.path.join(cfg.init, "tokenizer.json")
    tok = Tokenizer.load(tokenizer_path)
    max_len = model.cfg.max_seq_len

    examples, skipped, truncated = load_chat_jsonl(data_files, tok, max_len, cfg.truncation)
    runtime.print0(f"sft data: {len(examples)} conversations from {len(data_files)} file(s); "
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

    runtime.seed_everything(cfg.seed, env.rank)
    rows = cfg.batch_size * env.world_size
    loader = BucketLoader(examples, rows, env.rank, env.world_size, cfg.seed)
    trainer = runtime.Trainer(cfg, env, model, stage="sft", tokenizer_path=tokenizer_path,
                              data_state=loader.state_dict, extra_config={"init": cfg.init,
                                                                          "base_stage": init_config.get("stage")})
    model = trainer.model
    if cfg.resume:
        loader.load_state_dict(trainer.resume()["data"])
    trainer.start()

    def evaluate() -> None:
        loss = heldout_loss(model, eval_examples, tok.pad_id, trainer, env, cfg.batch_size)
        record = {"step": trainer.step, "heldout_loss": loss}
        line = f"eval step {trainer.step}: held-out loss {loss:.4f}"
        if eval_records:
            result = task_accuracy(model, tok, eval_records, env.rank, env.world_size, cfg.eval_max_new_tokens)
            record.update(accuracy_metrics(result))
            line += f", task accuracy {format_accuracy(result)}"
            line += format_samples(result["samples"], 3)
        runtime.print0(line)
        trainer.log(record)
        trainer.pause_clock()

    if trainer.step == 0:
        evaluate()  # the starting point: what pretraining alone gives
    with trainer:
        while trainer.step < cfg.max_steps:
            trainer.set_lr()
            x, y = loader.next_batch(tok.pad_id)
            x, y = x.to(env.device), y.to(env.device)
            with trainer.autocast():
                loss = model(x, y)  # mean cross-entropy over assistant tokens only
            trainer.backward(loss, 0, 1)
            if not trainer.optimizer_step(loss, tokens=int((y != -100).sum()) * env.world_size):
                continue
            if trainer.due(cfg.eval_every):
                evaluate()
            trainer.maybe_save()
            if trainer.stop_requested():
                break


if __name__ == "__main__":
    main()
