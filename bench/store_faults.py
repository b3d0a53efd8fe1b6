"""Serving when the store misbehaves: p50/p99 of a generation request, a feedback post and
/health with the store healthy, slow (every statement 50 ms late) and down, on SQLite and
PostgreSQL, through the real HTTP server (`python serve.py`, one process per condition).

    python -m bench.store_faults                       # SQLite, and PostgreSQL if installed
    python -m bench.store_faults --postgres off --append BENCHMARKS.md

Conditions. healthy: as served. slow: the server process runs with every store statement
delayed by --delay-ms before it executes (a wrapper installed by `serve_with_delay` in
the server's own process: the server code is unchanged). down: SQLite's write
lock held by another connection (BEGIN IMMEDIATE, as an operator's `sqlite3 serve.db` in a
transaction would), PostgreSQL's server stopped (pg_ctl stop -m fast). The server runs with
--store-timeout-s (default 1 s here, 5 s in serve.py), so what needs the store fails with
503 store_unavailable after at most that long, and /health never waits for it.

Each request is timed as the client sees it, one at a time on a keep-alive connection:
--requests non-streamed chat completions of --max-tokens tokens, as many feedback posts
(a rating on a completion served before the fault) and /health probes. Codes are counted.
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

from bench.store import ThrowawayPostgres, loadavg, machine, make_checkpoint, pct, pg_binaries
from cli import UserError, entry_point, parse_config, print_config
from serving.launch import ServeProcess

CONDITIONS = ("healthy", "slow", "down")


@dataclass
class FaultConfig:
    ckpt: str = field(default="", metadata={"help": "checkpoint to serve (empty: a 2-step tiny model, ~20 s)"})
    postgres: str = field(default="auto", metadata={"choices": ["auto", "on", "off"],
                                                    "help": "PostgreSQL too (auto: when a local server starts)"})
    requests: int = field(default=40, metadata={"help": "timed requests of each kind per condition"})
    max_tokens: int = field(default=16, metadata={"help": "tokens per generation request"})
    delay_ms: float = field(default=50.0, metadata={"help": "slow: the delay before every store statement"})
    store_timeout_s: float = field(default=1.0, metadata={"help": "serve.py --store-timeout-s"})
    threads: int = field(default=1, metadata={"help": "serve.py --threads"})
    append: str = field(default="", metadata={"help": "append a results section to this markdown file"})

    def __post_init__(self):
        if self.requests < 1 or self.max_tokens < 1 or self.delay_ms < 0 or not self.store_timeout_s > 0:
            raise UserError("need --requests, --max-tokens >= 1, --delay-ms >= 0 and --store-timeout-s > 0")


def serve_with_delay(delay_s: float, argv: list[str]) -> None:
    """serve.py in this process, each store statement `delay_s` late (the slow condition)."""
    import serve
    from serving import store

    for cls in (store.SQLiteStore, store.PostgresStore):
        original = cls.execute

        def slow_execute(self, sql, params=(), _original=original):
            time.sleep(delay_s)
            return _original(self, sql, params)
        cls.execute = slow_execute
    serve.main(argv)


def timed(client, method: str, url: str, **kwargs) -> tuple[float, int]:
    start = time.perf_counter()
    try:
        code = client.request(method, url, **kwargs).status_code
    except Exception:  # noqa: BLE001 - a timeout or a reset is an outcome to count, not a crash
        code = 0
    return time.perf_counter() - start, code


def measure(cfg: FaultConfig, url: str, model: str, cid: str) -> dict:
    """p50/p99 (ms) and status codes of each kind of request, one at a time."""
    import httpx
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": cfg.max_tokens, "ignore_eos": True}
    kinds = {"generation": ("POST", url + "/v1/chat/completions", {"json": body}),
             "feedback": ("POST", url + "/v1/feedback", {"json": {"id": cid, "rating": "up"}}),
             "health": ("GET", url + "/health", {})}
    out = {}
    with httpx.Client(timeout=60) as client:
        for name, (method, target, kwargs) in kinds.items():
            timed(client, method, target, **kwargs)  # one untimed, to warm the connection
            runs = [timed(client, method, target, **kwargs) for _ in range(cfg.requests)]
            times = [t for t, _ in runs]
            codes: dict[int, int] = {}
            for _, c in runs:
                codes[c] = codes.get(c, 0) + 1
            out[name] = {"p50_ms": 1000 * pct(times, 0.5), "p99_ms": 1000 * pct(times, 0.99), "codes": codes}
    return out


def run_condition(cfg: FaultConfig, ckpt: str, backend: str, condition: str, root: str, pg_bindir: str | None) -> dict:
    """One server on a fresh store, one completion served while healthy, the fault, the timings."""
    import httpx
    pg = ThrowawayPostgres(pg_bindir) if backend == "postgresql" else None
    log_dir = os.path.join(root, f"{backend}-{condition}")
    args = ["--ckpt", ckpt, "--log-dir", log_dir, "--store-timeout-s", str(cfg.store_timeout_s),
            "--threads", str(cfg.threads), "--rate-limit-rpm", "1000000", "--rate-limit-tpm", "100000000",
            "--device", "cpu"]
    lock = None
    try:
        if pg:
            args += ["--db", pg.start()]
        command = None  # serve.py as it is
        if condition == "slow":
            command = [sys.executable, "-c", "import sys; from bench.store_faults import serve_with_delay; "
                       f"serve_with_delay({cfg.delay_ms / 1000!r}, sys.argv[1:])"]
        server = ServeProcess(args, os.path.join(root, f"{backend}-{condition}.log"), command=command)
        try:
            model = httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"]
            first = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
                "model": model, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 4})
            cid = first.json()["id"]
            if condition == "down" and pg:
                pg.run(os.path.join(pg.bindir, "pg_ctl"), "-D", pg.data, "-m", "fast", "-w", "stop")
            elif condition == "down":
                import sqlite3
                lock = sqlite3.connect(os.path.join(log_dir, "serve.db"), isolation_level=None, timeout=30)
                lock.execute("BEGIN IMMEDIATE")
            result = measure(cfg, server.url, model, cid)
        finally:
            server.stop()
    finally:
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
        if pg:
            pg.stop()
    return {"backend": backend, "condition": condition, **result}


def table(rows: list[dict]) -> list[str]:
    def cell(r, kind):
        m = r[kind]
        codes = ", ".join(f"{n}x {c or 'no answer'}" for c, n in sorted(m["codes"].items()))
        return f"{m['p50_ms']:.1f} / {m['p99_ms']:.1f} ({codes})"
    lines = ["| store | condition | generation p50 / p99 (ms) | feedback p50 / p99 (ms) | /health p50 / p99 (ms) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['condition']} | {cell(r, 'generation')} | {cell(r, 'feedback')} | "
                     f"{cell(r, 'health')} |")
    return lines


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(FaultConfig, argv, description=" ".join(__doc__.split("\n\n")[0].split()))
    print_config(cfg, "bench config")
    backends = ["sqlite"]
    bindir = pg_binaries() if cfg.postgres != "off" else None
    if bindir:
        backends.append("postgresql")
    elif cfg.postgres == "on":
        raise UserError("--postgres on: no PostgreSQL binaries (initdb, pg_ctl) found")
    load_start = loadavg()
    with tempfile.TemporaryDirectory(prefix="bench_store_faults_") as root:
        ckpt = cfg.ckpt or make_checkpoint(root)
        rows = []
        for backend in backends:
            for condition in CONDITIONS:
                print(f"{backend}, {condition} ...", flush=True)
                rows.append(run_condition(cfg, ckpt, backend, condition, root, bindir))
                print("\n".join(table(rows[-1:])[2:]), flush=True)
    text = "\n".join([
        f"\n## Serving with the store healthy, slow and down (`python -m bench.store_faults`) — "
        f"{datetime.date.today().isoformat()}\n",
        f"Machine: {machine()}; load average {load_start} at the start, {loadavg()} at the end. "
        f"Command: `python -m bench.store_faults {' '.join(sys.argv[1:] if argv is None else argv)}`.\n",
        f"Each cell: {cfg.requests} requests one at a time on a keep-alive connection (p50 / p99 of the round "
        f"trip, then the status codes). Generation: a non-streamed chat completion of {cfg.max_tokens} tokens. "
        f"Feedback: a rating of a completion served before the fault. slow: every store statement "
        f"{cfg.delay_ms:g} ms late; down: SQLite's write lock held by another connection, PostgreSQL stopped. "
        f"--store-timeout-s {cfg.store_timeout_s:g}, --threads {cfg.threads}.\n",
        *table(rows), ""])
    print(text)
    if cfg.append:
        with open(cfg.append, "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
