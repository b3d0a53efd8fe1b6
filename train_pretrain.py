"""Stage 1: causal language-model pretraining (next-token prediction) on prepared shards.

The recipe of GPT-2/nanoGPT and Llama: sample windows of seq_len tokens from the data
mixture, predict every next token with cross-entropy, AdamW with warmup and cosine (or
warmup-stable-decay) learning rate, gradient accumulation up to a global batch given in
tokens, gradient clipping. Evaluation reports validation loss and bits per byte (loss in
bits divided by the UTF-8 bytes the tokens stand for: comparable across tokenizers), and
prints a sample.

    python train_pretrain.py                       # tiny preset on the embedded corpus, CPU, minutes
    python train_pretrain.py --preset gpt2-124m --data prepared/web --global-batch-tokens 524288
    torchrun --standalone --nproc_per_node=8 train_pretrain.py --preset 350m ...
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from checkpoint import load_model
from cli import UserError, entry_point, print_config
from data.loader import MixtureLoader, TokenSource, default_data_ready, eval_windows, has_split, parse_mixture
from data.text.tokenizer import Tokenizer
from distributed import Env, autocast, barrier, print0, seed_everything
from model import PRESETS, ModelConfig, Transformer
from trainer import TrainConfig, Trainer, run_main

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(REPO, "prepared", "shakespeare")


@dataclass
class PretrainConfig(TrainConfig):
    out: str = field(default=os.path.join(REPO, "runs", "pretrain"), metadata={"help": "checkpoint directory"})
    data: str = field(default=DEFAULT_DATA, metadata={"help": "prepared dir, or a mixture name=DIR:weight,name2=DIR2:weight"})
    preset: str = field(default="tiny", metadata={"choices": sorted(PRESETS)})
    n_layer: int = field(default=0, metadata={"help": "override the preset (0 = keep)"})
    d_model: int = 0
    n_head: int = 0
    n_kv_head: int = 0
    seq_len: int = field(default=0, metadata={"help": "0 = the preset's max_seq_len"})
    attn_impl: str = field(default="auto", metadata={"choices": ["auto", "sdpa", "eager", "triton"]})
    ce_impl: str = field(default="auto", metadata={"choices": ["auto", "torch"], "help": "the loss: auto (the fused "
                         "kernel: Triton on CUDA) or torch (plain PyTorch logits and cross-entropy)"})
    tie_embeddings: bool = False
    dropout: float = 0.0
    batch_size: int = 4
    global_batch_tokens: int = field(default=0, metadata={"help": "tokens per optimizer step over all ranks (0 = one forward per rank)"})
    max_steps: int = 500
    lr: float = 2e-3
    warmup_steps: int = 20
    eval_windows: int = field(default=64, metadata={"help": "validation sequences per source"})
    sample_tokens: int = 64

    def __post_init__(self):
        super().__post_init__()
        for name in ("n_layer", "d_model", "n_head", "n_kv_head", "seq_len", "global_batch_tokens", "eval_windows",
                     "sample_tokens"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")


def build_model_config(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    sizes = dict(PRESETS[cfg.preset])
    for name in ("n_layer", "d_model", "n_head", "n_kv_head"):
        if getattr(cfg, name):
            sizes[name] = getattr(cfg, name)
    if cfg.n_head and not cfg.n_kv_head:
        sizes["n_kv_head"] = min(sizes["n_kv_head"], cfg.n_head) if cfg.n_head % sizes["n_kv_head"] == 0 else cfg.n_head
    if cfg.seq_len:
        sizes["max_seq_len"] = cfg.seq_len
    return ModelConfig(vocab_size=vocab_size, attn_impl=cfg.attn_impl, ce_impl=cfg.ce_impl, tie_embeddings=cfg.tie_embeddings,
                       dropout=cfg.dropout, **sizes)


def token_byte_lengths(tok: Tokenizer, device) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (special tokens: 0), for bits per byte."""
    lengths = [len(b) for b in tok.token_bytes] + [0] * (tok.vocab_size - len(tok.token_bytes))
    return torch.tensor(lengths, dtype=torch.float64, device=device)


@torch.no_grad()
def evaluate(model, val_sources, byte_lengths, cfg, env, dtype) -> dict:
    """Mean validation loss and bits per byte, per source and pooled over all of them."""
    model.eval()
    results = {}
    total_nats = total_bytes = total_tokens = 0.0
    for name, source in val_sources:
        windows = eval_windows(source, cfg.eval_windows, env.rank, env.world_size)
        nats = torch.zeros((), dtype=torch.float64, device=env.device)
        nbytes = torch.zeros((), dtype=torch.float64, device=env.device)
        ntok = torch.zeros((), dtype=torch.float64, device=env.device)
        for i in range(0, len(windows), cfg.batch_size):
            batch = torch.from_numpy(np.stack(windows[i:i + cfg.batch_size])).to(env.device)
            x, y = batch[:, :-1], batch[:, 1:]
            with autocast(env, dtype):
                per_token = model(x, y, reduction="none").double()
            bytes_of = byte_lengths[y]
            # special tokens stand for no bytes: count neither their loss nor their length
            nats += (per_token * (bytes_of > 0)).sum()
            nbytes += bytes_of.sum()
            ntok += (bytes_of > 0).sum()
        stats = torch.stack([nats, nbytes, ntok])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        nats, nbytes, ntok = stats.tolist()
        results[name] = {"val_loss": nats / max(ntok, 1), "val_bpb": nats / math.log(2) / max(nbytes, 1)}
        total_nats, total_bytes, total_tokens = total_nats + nats, total_bytes + nbytes, total_tokens + ntok
    model.train()
    results["all"] = {"val_loss": total_nats / max(total_tokens, 1), "val_bpb": total_nats / math.log(2) / max(total_bytes, 1)}
    return results


def unigram_baseline(train_sources, val_sources, vocab_size: int, num_windows: int, num_special: int,
                     max_tokens: int = 10_000_000) -> float:
    """Validation loss of the best context-free model: token frequencies of the training
    data (add-one smoothed). A language model must beat this to have learned anything
    beyond which tokens are common."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for source in train_sources:
        seen = 0
        for arr in source.arrays:
            part = np.asarray(arr[: max(0, max_tokens - seen)])
            counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
            seen += len(part)
    logp = np.log(counts / counts.sum())
    # the same targets evaluate() scores: the validation windows, special tokens left out
    val = np.concatenate([np.stack(eval_windows(s, num_windows, 0, 1))[:, 1:].ravel() for _, s in val_sources])
    val = val[val < vocab_size - num_special]
    return float(-logp[val].mean())


def sample_text(model, tok: Tokenizer, cfg: PretrainConfig, env, dtype, prompt: str = "") -> str:
    """A continuation of <|endoftext|> + prompt at temperature 0.8 (same seed every time)."""
    model.eval()
    gen = torch.Generator(device=env.device).manual_seed(cfg.seed)
    with autocast(env, dtype):
        out = model.generate([[tok.eot_id] + tok.encode(prompt)], cfg.sample_tokens, pad_id=tok.pad_id,
                             temperature=0.8, top_k=50, stop_tokens=[tok.eot_id], generator=gen)[0]
    model.train()
    return prompt + tok.decode_reply(out)


@entry_point
def main(argv=None) -> None:
    run_main(PretrainConfig, train, argv, description=__doc__.split("\n")[0])


def load_sources(cfg: PretrainConfig, env: Env) -> tuple[list, Tokenizer, str]:
    """The --data mixture's sources, its tokenizer and the tokenizer's path; the embedded
    corpus is prepared on first use."""
    sources = parse_mixture(cfg.data)
    if cfg.data == DEFAULT_DATA and not default_data_ready(DEFAULT_DATA):
        if env.is_main:
            print(f"{DEFAULT_DATA} is missing: running data.prepare on the embedded corpus first")
            from data.prepare import PrepareConfig, print_summary
            from data.prepare import run as prepare
            print_summary(prepare(PrepareConfig(out=DEFAULT_DATA)))
        barrier()
    for name, path, _ in sources:
        if not os.path.isdir(path):
            raise UserError(f"--data {name}: {path} does not exist (make it with python -m data.prepare --out {path})")
    tokenizer_path = os.path.join(sources[0][1], "tokenizer.json")
    return sources, Tokenizer.load(tokenizer_path), tokenizer_path


def build_model(cfg: PretrainConfig, tok: Tokenizer) -> Transformer:
    """A new model of the configured size (the same weights on every rank), or --init's."""
    if cfg.init:
        model, _ = load_model(cfg.init, attn_impl=cfg.attn_impl, ce_impl=cfg.ce_impl)
        if model.cfg.vocab_size != tok.vocab_size:
            raise UserError(f"--init {cfg.init} has vocab {model.cfg.vocab_size}, the data's tokenizer {tok.vocab_size}")
    else:
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        model = Transformer(build_model_config(cfg, tok.vocab_size))
    return model


def log_eval(model, val_sources, byte_lengths, baseline: float, tok, trainer, cfg: PretrainConfig, env) -> None:
    """Validation loss and bits per byte (pooled and per source), and a sample."""
    with trainer.timed("evaluation"):
        results = evaluate(model, val_sources, byte_lengths, cfg, env, trainer.dtype)
        pooled = results["all"]
        per_source = {n: r for n, r in results.items() if n != "all" and len(results) > 2}
        print0(f"eval step {trainer.step}: val loss {pooled['val_loss']:.4f} (unigram baseline {baseline:.4f}), "
                       f"val bpb {pooled['val_bpb']:.4f}"
                       + "".join(f" | {n} {r['val_loss']:.4f}" for n, r in per_source.items()))
        record = {"step": trainer.step, **pooled, "unigram_val_loss": baseline}
        for name, r in per_source.items():
            record.update({f"{name}/val_loss": r["val_loss"], f"{name}/val_bpb": r["val_bpb"]})
        trainer.log(record)
        if cfg.sample_tokens:
            text = sample_text(model, tok, cfg, env, trainer.dtype)
            print0("sample: " + text.replace("\n", "\n        ")[:600])


def train(cfg: PretrainConfig, env: Env) -> None:
    if env.is_main:
        print_config(cfg, "pretrain config")
    sources, tok, tokenizer_path = load_sources(cfg, env)
    model = build_model(cfg, tok)
    model_cfg = model.cfg
    seq_len = model_cfg.max_seq_len
    world_rows = cfg.batch_size * env.world_size
    global_tokens = cfg.global_batch_tokens or world_rows * seq_len
    if global_tokens % (world_rows * seq_len):
        raise UserError(f"--global-batch-tokens {global_tokens} must be a multiple of batch_size x seq_len x world "
                        f"= {cfg.batch_size} x {seq_len} x {env.world_size} = {world_rows * seq_len}")
    accum = global_tokens // (world_rows * seq_len)
    flops_per_token = model.flops_per_token(seq_len)
    seed_everything(cfg.seed, env.rank)
    loader = MixtureLoader(sources, seq_len, global_tokens // seq_len, env.rank, env.world_size, cfg.seed)
    trainer = Trainer(cfg, env, model, stage="pretrain", tokenizer_path=tokenizer_path,
                              data_state=loader.state_dict)
    model = trainer.model  # sharded / compiled
    val_sources = [(name, TokenSource(path, "val", seq_len)) for name, path, _ in sources if has_split(path, "val")]
    byte_lengths = token_byte_lengths(tok, env.device)
    baseline = (unigram_baseline(loader.sources, val_sources, tok.vocab_size, cfg.eval_windows,
                                 tok.vocab_size - len(tok.token_bytes)) if val_sources else float("nan"))
    if cfg.resume:
        loader.load_state_dict(trainer.resume()["data"])
    trainer.start(flops_per_token)
    print0(f"model: {model_cfg.n_layer} layers, d_model {model_cfg.d_model}, {model_cfg.n_head} heads "
                   f"({model_cfg.n_kv_head} kv), seq {seq_len}, vocab {model_cfg.vocab_size}: "
                   f"{trainer.n_params / 1e6:.2f}M parameters; {global_tokens:,} tokens per step ({accum} accumulation "
                   f"x {env.world_size} ranks x {cfg.batch_size} x {seq_len}); {trainer.dtype}; device {env.device}")

    with trainer:
        while trainer.step < cfg.max_steps:
            trainer.set_lr()
            x_all, y_all = loader.next_batch()
            loss_sum = torch.zeros((), device=env.device)
            for micro in range(accum):
                rows = slice(micro * cfg.batch_size, (micro + 1) * cfg.batch_size)
                x = torch.from_numpy(x_all[rows]).to(env.device, non_blocking=True)
                y = torch.from_numpy(y_all[rows]).to(env.device, non_blocking=True)
                with trainer.autocast():
                    loss = model(x, y)  # mean next-token cross-entropy
                trainer.backward(loss, micro=micro, accum=accum)
                loss_sum += loss.detach()
            if not trainer.optimizer_step(loss_sum / accum, tokens=global_tokens,
                                          extra={"tokens": (trainer.step + 1) * global_tokens}):
                continue
            if val_sources and trainer.due(cfg.eval_every):
                log_eval(model, val_sources, byte_lengths, baseline, tok, trainer, cfg, env)
            trainer.maybe_save()
            if trainer.stop_requested():
                break


if __name__ == "__main__":
    main()
