"""Stage 4: serve a checkpoint behind an OpenAI-compatible API, with continuous batching,
Prometheus metrics, content filtering, abuse limits, a chat page and a feedback loop.

    python serve.py --ckpt runs/ppo                         # http://127.0.0.1:8000, open (no keys)
    python serve.py --ckpt runs/ppo --api-keys keys.txt     # bearer keys, one per line
    python serve.py --log-dir runs/serve --export-feedback prefs.jsonl   # users' votes -> train_rm.py --data

This file is the entry point: parse the options, load the checkpoint, run uvicorn (or
export the feedback and exit). The server itself is the `serving` package:
  serving/app.py         the HTTP API (FastAPI): Server, and the routes over it;
  serving/protocol.py    OpenAI's shapes for errors, requests, responses and stream chunks,
                         so the official `openai` client works unchanged;
  serving/engine.py      one thread owns the model; requests join and leave the running batch
                         at every decode step (continuous batching, Yu et al. 2022 "Orca");
  serving/text.py        chat prompts with special tokens placed as ids; incremental UTF-8
                         decoding, stop strings, and the output filter's hold-back;
  serving/moderation.py  the project's blocklist (data/toxicity.py) with OpenAI's categories,
                         plus an optional classifier (a scalar-head checkpoint);
  serving/limits.py      API keys, token buckets, the abuse tracker;
  serving/metrics.py     vLLM's metric names under the `serve:` prefix;
  serving/store.py       what every replica shares (requests, feedback, rate-limit buckets,
                         abuse blocks) in SQLite or PostgreSQL, and the feedback export: votes
                         joined with the requests into prompt/chosen/rejected records;
  serving/config.py      ServeConfig: every option of `python serve.py --help`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import torch

import checkpoint
import distributed
from cli import UserError, entry_point, parse_config, print_config
from data.toxicity import load_blocklist
from serving.config import ServeConfig
from serving.export import export_feedback
from serving.limits import KeyStore, load_identity_secret
from serving.moderation import Classifier, Moderator
from serving.store import open_store, redact

if TYPE_CHECKING:
    from serving.app import Server


def load_moderator(cfg: ServeConfig, device: torch.device) -> Moderator | None:
    """The blocklist and the optional classifier (None with --no-moderation)."""
    if not cfg.moderation:
        return None
    try:
        terms = load_blocklist(cfg.blocklist)
    except OSError as e:
        raise UserError(f"cannot read --blocklist {cfg.blocklist}: {e.strerror}") from None
    classifier = None
    if cfg.classifier:
        try:
            classifier = Classifier(cfg.classifier, cfg.classifier_threshold, cfg.classifier_category, device)
        except UserError as e:
            raise UserError(f"--classifier: {e}") from None
    return Moderator(terms, classifier)


def load_server(cfg: ServeConfig) -> Server:
    """Checkpoint, tokenizer, moderation and keys -> a serving.app.Server (raises UserError)."""
    from serving.app import Server
    device = distributed.resolve_device(cfg.device)
    if cfg.threads or device.type == "cpu":
        # the model's threads leave a core to the event loop and the clients (bench.decode/serve:
        # on 2 cores, 1 thread streams ~1.9x the tokens of 2 at one request at a time)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(cfg.threads or max(1, cores - 1))
    if cfg.quantization == "int8" and device.type != "cpu":
        raise UserError("--quantization int8 uses PyTorch's CPU int8 kernel: serve it with --device cpu")
    model, tok, config = checkpoint.load_for_inference(cfg.ckpt, device=device,
                                                    dtype=distributed.compute_dtype(cfg.dtype, device))
    name = cfg.served_model_name or f"{cfg.ckpt_name}-step{config.get('step', 0)}"
    moderator = load_moderator(cfg, device)
    keys = KeyStore.load(cfg.api_keys) if cfg.api_keys else None
    store = open_store(cfg.db, cfg.log_dir, timeout=cfg.store_timeout_s)
    try:
        secret = load_identity_secret(cfg.identity_secret_file) if cfg.identity_secret_file else \
            store.deployment_secret()
    except store.errors as e:
        raise UserError(f"the serving store cannot be read: {e}") from None
    return Server(cfg, model, tok, name, moderator, keys, store, secret)


def run_export(cfg: ServeConfig) -> None:
    """--export-feedback: the votes in the store (--db, or --log-dir's) as train_rm.py records."""
    store = open_store(cfg.db, cfg.log_dir, create=False)
    try:
        summary = export_feedback(store, cfg.export_feedback)
    except OSError as e:
        raise UserError(f"cannot write {cfg.export_feedback}: {e.strerror}") from None
    finally:
        store.close()

    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"
    print(f"exported {summary['pairs']} preference pairs to {cfg.export_feedback} ({counts(summary['by_kind'])}); "
          f"skipped {sum(summary['skipped'].values())} ({counts(summary['skipped'])})")
    print(f"train on them: python train_rm.py --init <sft checkpoint> --data {cfg.export_feedback}")


def run_server(cfg: ServeConfig) -> None:
    """Load, then serve until interrupted."""
    import uvicorn

    from serving.app import create_app
    server = load_server(cfg)
    app = create_app(server)
    print(f"serving {server.model_id} ({sum(p.numel() for p in server.engine.model.parameters()) / 1e6:.2f}M "
          f"parameters, context {server.context}) on http://{cfg.host}:{cfg.port} "
          f"({'API keys required' if server.gate.keys else 'open: no API keys'})", flush=True)
    # X-Forwarded-For is believed only from --forwarded-allow-ips: uvicorn's default trusts
    # 127.0.0.1, so any local client could pick its own rate-limit identity
    proxy = {"proxy_headers": bool(cfg.forwarded_allow_ips), "forwarded_allow_ips": cfg.forwarded_allow_ips or None}
    try:  # access lines are uvicorn's info level; keep-alive connections idle past 5 s are closed
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info" if cfg.access_log else "warning",
                    access_log=cfg.access_log, timeout_keep_alive=5, timeout_graceful_shutdown=5, **proxy)
    except OSError as e:
        raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}") from None


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(ServeConfig, argv, description=__doc__.split("\n")[0])
    if cfg.export_feedback:
        run_export(cfg)
        return
    print_config(dataclasses.replace(cfg, db=redact(cfg.db)), "serve config")  # never a password in clear
    run_server(cfg)


if __name__ == "__main__":
    main()
