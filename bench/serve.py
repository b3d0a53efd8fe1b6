"""Serving benchmark: generated tokens per second at several numbers of concurrent streams,
against one stream at a time, and time to first token (p50/p95), through the real HTTP
server (a `python serve.py` process) with streaming requests.

    python -m bench.serve --ckpt /tmp/bench_ckpt                  # 1, 4, 8, 16 streams
    python -m bench.serve --ckpt runs/ppo --concurrency 1,8 --max-tokens 64

Every request asks for exactly --max-tokens tokens (`ignore_eos`), so an untrained model
measures the same work as a trained one. The client runs in this process on the same
machine: on a small CPU it competes with the server for cores, as a co-located load
balancer or application would.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field

from bench.server import ServeProcess
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
    threads: int = field(default=0, metadata={"help": "serve.py --threads (0: torch's default)"})
    device: str = field(default="cpu", metadata={"choices": ["auto", "cpu", "cuda"], "help": "serve.py --device"})
    out: str = field(default="", metadata={"help": "also write the results as JSON here"})

    def __post_init__(self):
        if not self.concurrency or min(self.concurrency) < 1:
            raise UserError("--concurrency needs positive integers")
        if self.requests_per_stream < 1 or self.sequential_requests < 1 or self.max_tokens < 1:
            raise UserError("--requests-per-stream, --sequential-requests and --max-tokens must be positive")


async def one_stream(client, url: str, body: dict) -> tuple[float, int, float]:
    """(seconds to the first content chunk, completion tokens, total seconds) of one request."""
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
    return first if first is not None else float("nan"), tokens, time.perf_counter() - start


async def level(url: str, body: dict, streams: int, per_stream: int) -> dict:
    """`streams` workers, each sending `per_stream` requests back to back."""
    import httpx
    results = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams + 4)) as client:
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


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(BenchConfig, argv, description=" ".join(__doc__.split("\n\n")[0].split()))
    print_config(cfg, "bench config")
    try:
        import httpx
    except ImportError:
        raise UserError("bench.serve needs httpx (pip install -r requirements-dev.txt)") from None
    logs = tempfile.mkdtemp(prefix="bench_serve_")
    server = ServeProcess(["--ckpt", cfg.ckpt, "--log-dir", logs, "--no-request-log", "--rate-limit-rpm", "0",
                           "--rate-limit-tpm", "0", "--max-running", str(cfg.max_running), "--max-waiting", "256",
                           "--device", cfg.device, "--threads", str(cfg.threads)], os.path.join(logs, "serve.out"))
    url = server.url
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]
        body = {"model": model["id"], "messages": [{"role": "user", "content": cfg.prompt}], "temperature": 0,
                "max_tokens": cfg.max_tokens, "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": True}
        asyncio.run(level(url, body, 1, 2))  # warm-up
        baseline = asyncio.run(level(url, body, 1, cfg.sequential_requests))
        rows = [asyncio.run(level(url, body, c, cfg.requests_per_stream)) for c in cfg.concurrency]
    finally:
        server.stop()
    import torch
    print(f"\n{model['id']} ({cfg.ckpt}), context {model.get('max_model_len')}, {cfg.max_tokens} tokens per request, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"server threads {cfg.threads or torch.get_num_threads()}")
    print("| streams | requests | generated tokens/s | vs one at a time | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---|---|---|---|---|---|")
    for r in [dict(baseline, streams="1 (one at a time)")] + rows:
        print(f"| {r['streams']} | {r['requests']} | {r['tokens_per_s']:.0f} | "
              f"{r['tokens_per_s'] / baseline['tokens_per_s']:.2f}x | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} |")
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump({"config": vars(cfg), "model": model["id"], "baseline": baseline, "levels": rows}, f, indent=2)


if __name__ == "__main__":
    main()
