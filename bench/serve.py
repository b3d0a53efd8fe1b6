"""Serving benchmark: generated tokens per second at several numbers of concurrent streams,
against one stream at a time, and time to first token (p50/p95), through the real HTTP
server (a `python serve.py` process) with streaming requests — and, given a llama-server
binary, the same client against llama.cpp serving the same checkpoint (exported with
`convert.py to-gguf`), side by side.

    python -m bench.serve --ckpt /tmp/bench_ckpt                  # 1, 4, 8, 16 streams
    python -m bench.serve --ckpt runs/ppo --concurrency 1,8 --max-tokens 64
    python -m bench.serve --ckpt /tmp/bench_ckpt --concurrency 1,8,16 --repeats 3 \
        --llama-server PATH/llama-server --gguf-outtype f32 --quantization none

With --repeats N every level runs N times and the table shows medians (tokens/s, TTFT).

Every request asks for exactly --max-tokens tokens (`ignore_eos`), so an untrained model
measures the same work as a trained one. The client runs in this process on the same
machine: on a small CPU it competes with the server for cores, as a co-located load
balancer or application would.
"""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field

from serving.launch import LlamaServerProcess, ServeProcess
from cli import UserError, entry_point, parse_config, print_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class BenchConfig:
    ckpt: str = field(default=os.path.join(REPO, "runs", "pretrain"), metadata={"help": "checkpoint to serve"})
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 8, 16],
                                   metadata={"help": "numbers of concurrent streams, comma-separated"})
    requests_per_stream: int = field(default=2, metadata={"help": "requests each concurrent stream sends in turn"})
    sequential_requests: int = field(default=8, metadata={"help": "requests of the one-at-a-time baseline"})
    max_tokens: int = field(default=128, metadata={"help": "tokens generated per request (ignore_eos)"})
    prompt: str = field(default="Tell me a story about a king and his three daughters.",
                        metadata={"help": "the user message of every request"})
    max_running: int = field(default=16, metadata={"help": "serve.py --max-running"})
    threads: int = field(default=0, metadata={"help": "serve.py --threads (0: its default, every core but one)"})
    device: str = field(default="cpu", metadata={"choices": ["auto", "cpu", "cuda"], "help": "serve.py --device"})
    quantization: str = field(default="none", metadata={"choices": ["none", "int8"],
                                                        "help": "serve.py --quantization"})
    repeats: int = field(default=1, metadata={"help": "runs of every level; the table shows medians"})
    llama_server: str = field(default="", metadata={
        "help": "also benchmark this llama-server binary on the checkpoint's GGUF (docs/interop.md builds it)"})
    gguf_outtype: str = field(default="f32", metadata={"choices": ["f32", "f16", "q8_0"],
                                                       "help": "convert.py to-gguf --outtype for llama-server"})
    llama_threads: int = field(default=2, metadata={"help": "llama-server --threads"})
    out: str = field(default="", metadata={"help": "also write the results as JSON here"})

    def __post_init__(self):
        if not self.concurrency or min(self.concurrency) < 1:
            raise UserError("--concurrency needs positive integers")
        if min(self.requests_per_stream, self.sequential_requests, self.max_tokens, self.repeats) < 1:
            raise UserError("--requests-per-stream, --sequential-requests, --max-tokens and --repeats must be positive")
        if self.llama_server and not (shutil.which(self.llama_server) or os.access(self.llama_server, os.X_OK)):
            raise UserError(f"--llama-server {self.llama_server!r} is not an executable")


async def one_stream(client, url: str, body: dict) -> tuple[float, int, float]:
    """(seconds to the first content chunk, completion tokens, total seconds) of one request."""
    start = time.perf_counter()
    first, usage, chunks = None, None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
    # the usage block when the server sends one; else one token per content chunk
    tokens = usage if usage is not None else chunks
    return first if first is not None else float("nan"), tokens, time.perf_counter() - start


async def level(url: str, body: dict, streams: int, per_stream: int) -> dict:
    """`streams` workers, each sending `per_stream` requests back to back."""
    import httpx
    results = []
    # a new connection per request: llama-server closes a connection after a stream, and a
    # client that reused it would stall; the same for every server keeps the comparison fair
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            for _ in range(per_stream):
                results.append(await one_stream(client, url, body))
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(streams)))
        wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"streams": streams, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p95": ttft[min(len(ttft) - 1, round(0.95 * (len(ttft) - 1)))]}


def start_servers(cfg: BenchConfig, logs: str):
    """(label, start()) for serve.py and, with --llama-server, llama-server on the GGUF."""
    def ours():
        return ServeProcess(["--ckpt", cfg.ckpt, "--log-dir", logs, "--no-request-log", "--rate-limit-rpm", "0",
                             "--rate-limit-tpm", "0", "--max-running", str(cfg.max_running), "--max-waiting",
                             "256", "--device", cfg.device, "--threads", str(cfg.threads),
                             "--quantization", cfg.quantization], os.path.join(logs, "serve.out"))

    def llama():
        from interop.gguf import export_gguf
        gguf = os.path.join(logs, f"model-{cfg.gguf_outtype}.gguf")
        export_gguf(cfg.ckpt, gguf, cfg.gguf_outtype)
        with open(os.path.join(cfg.ckpt, "config.json")) as f:
            context = json.load(f)["model"]["max_seq_len"]
        return LlamaServerProcess(cfg.llama_server, gguf, os.path.join(logs, "llama.out"), context,
                                  slots=max(cfg.concurrency), threads=cfg.llama_threads)
    label = f"serve.py ({cfg.quantization if cfg.quantization != 'none' else 'float32'})"
    return [(label, ours)] + ([(f"llama-server ({cfg.gguf_outtype})", llama)] if cfg.llama_server else [])


def measure(cfg: BenchConfig, server) -> tuple[dict, list[dict]]:
    """One server's median one-at-a-time run and median run per concurrency level."""
    import httpx
    model = httpx.get(server.url + "/v1/models").json()["data"][0]
    body = {"model": model["id"], "messages": [{"role": "user", "content": cfg.prompt}], "temperature": 0,
            "max_tokens": cfg.max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    asyncio.run(level(server.url, body, 1, 2))  # warm-up
    runs = [[asyncio.run(level(server.url, body, 1, cfg.sequential_requests))] +
            [asyncio.run(level(server.url, body, c, cfg.requests_per_stream)) for c in cfg.concurrency]
            for _ in range(cfg.repeats)]
    medians = [median_run([run[i] for run in runs]) for i in range(len(runs[0]))]
    return medians[0], medians[1:]


def median_run(runs: list[dict]) -> dict:
    """The medians of several runs of one level (and every run's tokens/s)."""
    out = dict(runs[0])
    for key in ("tokens_per_s", "ttft_p50", "ttft_p95", "seconds"):
        out[key] = statistics.median(r[key] for r in runs)
    out["runs_tokens_per_s"] = [round(r["tokens_per_s"], 1) for r in runs]
    return out


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(BenchConfig, argv, description=" ".join(__doc__.split("\n\n")[0].split()))
    print_config(cfg, "bench config")
    if importlib.util.find_spec("httpx") is None:
        raise UserError("bench.serve needs httpx (pip install -r requirements-dev.txt)")
    logs = tempfile.mkdtemp(prefix="bench_serve_")
    results = {}
    for label, start in start_servers(cfg, logs):
        server = start()
        try:
            results[label] = measure(cfg, server)
        finally:
            server.stop()
    import torch
    print(f"\n{cfg.ckpt}: {cfg.max_tokens} tokens per request, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, serve.py threads {cfg.threads or 'every core but one'}"
          f", medians of {cfg.repeats} run(s)")
    print("| server | streams | requests | generated tokens/s | vs one at a time | TTFT p50 (s) | TTFT p95 (s) | runs |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (baseline, rows) in results.items():
        for r in [dict(baseline, streams="1 (one at a time)")] + rows:
            print(f"| {label} | {r['streams']} | {r['requests']} | {r['tokens_per_s']:.0f} | "
                  f"{r['tokens_per_s'] / baseline['tokens_per_s']:.2f}x | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} | "
                  f"{', '.join(f'{x:.0f}' for x in r['runs_tokens_per_s'])} |")
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump({"config": vars(cfg), "results": {k: {"baseline": b, "levels": rows}
                                                        for k, (b, rows) in results.items()}}, f, indent=2)
    shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
