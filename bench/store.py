"""Serving-store benchmark: the time of a POST /v1/feedback against a store holding 10^3,
10^5 and 10^6 logged requests, with SQLite and PostgreSQL, and generation throughput while
a client posts feedback for unknown ids, through the real HTTP server (`python serve.py`).

    python -m bench.store                                       # SQLite, and PostgreSQL if installed
    python -m bench.store --sizes 1000,100000 --postgres off
    python -m bench.store --db-url postgresql://user:pass@host/scratch --append BENCHMARKS.md

For each backend and size the store is filled with that many synthetic completed chat
requests (bulk inserts through the store's own connection: executemany for SQLite, COPY for
PostgreSQL), then a serve.py process serves it and the benchmark times, over one keep-alive
connection, --posts feedback posts for ids picked at random among the logged ones and as
many for unknown ids (a 404), interleaved; then generated tokens/s of one stream of
streaming chat completions (every request asks for exactly --max-tokens tokens), alone and
while a second client posts --post-rate unknown-id feedbacks a second. Rate limits stay on
but too high to be reached, so every post pays its bucket transaction as in production.

PostgreSQL: --db-url (each size gets its own schema, dropped at the end; nothing else in
the database is touched), or else a throwaway server started from Debian's binaries
(/usr/lib/postgresql/*/bin; as root they run as the `postgres` user) in a temporary
directory, default settings (fsync on). --postgres off skips it; --postgres on makes a
missing server an error. SQLite: a file in a temporary directory, as serve.py opens it.
The clients run in this process on the same machine as the server.
"""
from __future__ import annotations

import asyncio
import datetime
import glob
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from bench.serve import level
from serving.launch import ServeProcess, free_port
from cli import UserError, entry_point, parse_config, print_config
from serving.store import PostgresStore, SQLiteStore, redact

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "prepared", "shakespeare")
BEFORE = ("Before issue #23 (its measurements) every post scanned the JSONL request log: 2 ms at 10^3 "
          "logged requests, 53-78 ms at 10^5, 0.65 s at 10^6; and four unknown-id posts a second cut one "
          "stream's generation from ~350 to 11-25 tokens/s.")


@dataclass
class BenchConfig:
    ckpt: str = field(default="", metadata={
        "help": "checkpoint to serve (empty: train the tiny preset for 2 steps on prepared/shakespeare into the "
                "temporary directory, about 20 s; throughput does not depend on the weights)"})
    sizes: list[int] = field(default_factory=lambda: [1_000, 100_000, 1_000_000],
                             metadata={"help": "numbers of logged requests, comma-separated"})
    postgres: str = field(default="auto", metadata={
        "choices": ["auto", "on", "off"],
        "help": "PostgreSQL too: auto (when --db-url is given or a local server can be started), on, off"})
    db_url: str = field(default="", metadata={
        "help": "postgresql://... of a database to benchmark in (schemas bench_store_N are created and dropped); "
                "empty: start a throwaway server"})
    posts: int = field(default=200, metadata={"help": "timed feedback posts per kind (known id, unknown id)"})
    gen_requests: int = field(default=8, metadata={"help": "streaming requests per throughput measurement"})
    rounds: int = field(default=2, metadata={"help": "alternations of alone / with posts (totals are reported)"})
    max_tokens: int = field(default=128, metadata={"help": "tokens generated per request (ignore_eos)"})
    post_rate: float = field(default=4.0, metadata={"help": "unknown-id feedback posts per second during generation"})
    prompt: str = field(default="Tell me a story about a king and his three daughters.",
                        metadata={"help": "the user message of every generation request"})
    threads: int = field(default=0, metadata={"help": "serve.py --threads (0: torch's default)"})
    device: str = field(default="cpu", metadata={"choices": ["auto", "cpu", "cuda"], "help": "serve.py --device"})
    seed: int = 0
    out: str = field(default="", metadata={"help": "also write the results as JSON here"})
    append: str = field(default="", metadata={"help": "append a results section to this markdown file"})

    def __post_init__(self):
        if not self.sizes or min(self.sizes) < 1:
            raise UserError("--sizes needs positive integers")
        if self.posts < 1 or self.gen_requests < 1 or self.rounds < 1 or self.max_tokens < 1:
            raise UserError("--posts, --gen-requests, --rounds and --max-tokens must be positive")
        if self.post_rate <= 0:
            raise UserError("--post-rate must be positive")
        if self.db_url and not self.db_url.startswith(("postgresql://", "postgres://")):
            raise UserError(f"--db-url must be postgresql://..., got {redact(self.db_url)}")
        if self.db_url and self.postgres == "off":
            raise UserError("--db-url with --postgres off: drop one")


# ----------------------------------------------------------------------------- synthetic requests

def request_rows(n: int, seed: int, keep: int):
    """(a generator of n rows as serve.py writes a completed chat request, a list it fills
    with `keep` of their ids picked at random as the rows go by)."""
    rng = random.Random(seed)
    picked = set(rng.sample(range(n), min(keep, n)))
    kept: list[str] = []
    completion = ("Once upon a time a king had three daughters, and the youngest was the fairest of them all; "
                  "she walked each morning to the well beyond the wood, where a frog sat on the stone. ") * 2
    body = json.dumps({"endpoint": "chat", "model": "bench-step2",
                       "messages": [{"role": "user",
                                     "content": "Tell me a story about a king and his three daughters."}],
                       "params": {"max_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": None,
                                  "ignore_eos": False, "stop": []},
                       "completion": completion, "finish_reason": "length", "error": None,
                       "usage": {"prompt_tokens": 19, "completion_tokens": 128, "total_tokens": 147},
                       "timings": {"queue_s": 0.0004, "prefill_s": 0.011, "decode_s": 0.41}}, ensure_ascii=True)[1:]
    keys = [f"{rng.getrandbits(64):016x}" for _ in range(50)]
    start = time.time() - n

    def rows():
        for i in range(n):
            cid = f"chatcmpl-{rng.getrandbits(128):032x}"
            if i in picked:
                kept.append(cid)
            key = keys[i % len(keys)]
            yield (cid, start + i, key, "chat", "complete",
                   f'{{"id": "{cid}", "time": {start + i}, "key": "{key}", {body}')
    return rows(), kept


def fill_sqlite(path: str, n: int, seed: int, keep: int) -> list[str]:
    store = SQLiteStore(path)
    rows, kept = request_rows(n, seed, keep)
    try:
        store.conn.execute("PRAGMA cache_size=-262144")  # 256 MiB while filling: the id index grows in memory
        with store.transaction():
            store.conn.executemany("INSERT INTO requests (id, created, key, endpoint, status, record) "
                                   "VALUES (?, ?, ?, ?, ?, ?)", rows)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        store.close()
    return kept


def fill_postgres(url: str, n: int, seed: int, keep: int) -> list[str]:
    store = PostgresStore(url)
    rows, kept = request_rows(n, seed, keep)
    try:
        with store.conn.transaction(), store.conn.cursor() as cur:
            with cur.copy("COPY requests (id, created, key, endpoint, status, record) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        store.conn.execute("VACUUM ANALYZE requests")  # what autovacuum would have done by now
    finally:
        store.close()
    return kept


# ----------------------------------------------------------------------------- PostgreSQL

def pg_connect(url: str):
    try:
        import psycopg
    except ImportError:
        raise UserError('PostgreSQL needs psycopg 3: pip install "psycopg[binary]" (or --postgres off)') from None
    try:
        return psycopg.connect(url, autocommit=True)
    except psycopg.Error as e:
        raise UserError(f"cannot connect to {redact(url)}: {str(e).strip().splitlines()[0]}") from None


def with_schema(url: str, schema: str) -> str:
    """The URL with every connection's search_path set to `schema` (libpq's options parameter)."""
    return f"{url}{'&' if '?' in url else '?'}options=-c%20search_path%3D{schema}"


def pg_binaries() -> str | None:
    """The directory of the newest Debian PostgreSQL's initdb and pg_ctl, or None."""
    found = [os.path.dirname(p) for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")
             if os.path.exists(os.path.join(os.path.dirname(p), "pg_ctl"))]
    if found:
        return max(found, key=lambda d: float(d.split("/")[-2]) if d.split("/")[-2].replace(".", "").isdigit() else 0)
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb and shutil.which("pg_ctl") else None


class ThrowawayPostgres:
    """A PostgreSQL server in a temporary directory on a free port, trust auth on
    127.0.0.1 only; as root it runs as the `postgres` user (the server refuses root)."""

    def __init__(self, bindir: str):
        self.bindir = bindir
        self.dir = tempfile.mkdtemp(prefix="bench_store_pg_")
        self.prefix = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self.prefix = ["runuser", "-u", "postgres", "--"]
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.started = False

    def run(self, *args: str) -> None:
        r = subprocess.run(self.prefix + list(args), capture_output=True, text=True)
        if r.returncode:
            raise UserError(f"{os.path.basename(args[0])} failed: {(r.stderr or r.stdout).strip()[-1000:]}")

    def start(self) -> str:
        self.run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "postgres", "--auth=trust",
                 "-E", "UTF8", "--no-sync")
        self.run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", os.path.join(self.dir, "server.log"),
                 "-w", "-t", "120", "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        self.started = True
        return self.url

    def stop(self) -> None:
        if self.started:
            subprocess.run(self.prefix + [os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "fast", "-w",
                                          "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------- the server and the clients

def unknown_id(rng: random.Random) -> str:
    return f"chatcmpl-{rng.getrandbits(128):032x}"


def post(client, url: str, cid: str, expect: int) -> float:
    start = time.perf_counter()
    r = client.post(url + "/v1/feedback", json={"id": cid, "rating": "up"})
    took = time.perf_counter() - start
    if r.status_code != expect:
        raise RuntimeError(f"feedback for {cid}: HTTP {r.status_code} (expected {expect}): {r.text[:200]}")
    return took


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def time_posts(url: str, known: list[str], posts: int, rng: random.Random) -> dict:
    """Known-id and unknown-id posts interleaved on one keep-alive connection, after 10 of each untimed."""
    import httpx
    times = {"known": [], "unknown": []}
    with httpx.Client(timeout=60) as client:
        for i in range(10 + posts):
            k = post(client, url, known[i % len(known)], 200)
            u = post(client, url, unknown_id(rng), 404)
            if i >= 10:
                times["known"].append(k)
                times["unknown"].append(u)
    return {f"{kind}_{name}_ms": 1000 * f(t) for kind, t in times.items()
            for name, f in (("p50", statistics.median), ("p95", lambda v: pct(v, 0.95)))}


class Poster(threading.Thread):
    """Posts feedback for unknown ids at `rate` a second until stopped."""

    def __init__(self, url: str, rate: float, seed: str):
        super().__init__(daemon=True)
        self.url, self.rate, self.rng = url, rate, random.Random(f"unknown-{seed}")  # never the fill's stream
        self.halt = threading.Event()
        self.times: list[float] = []
        self.error: BaseException | None = None

    def run(self):
        import httpx
        try:
            with httpx.Client(timeout=60) as client:
                due = time.monotonic()
                while not self.halt.is_set():
                    self.times.append(post(client, self.url, unknown_id(self.rng), 404))
                    due += 1 / self.rate
                    self.halt.wait(max(0.0, due - time.monotonic()))
        except BaseException as e:  # reported by the main thread
            self.error = e


def time_generation(cfg: BenchConfig, url: str, model_id: str, seed: int) -> dict:
    """Tokens/s of one stream, alone and with the poster, alternating --rounds times."""
    body = {"model": model_id, "messages": [{"role": "user", "content": cfg.prompt}], "temperature": 0,
            "max_tokens": cfg.max_tokens, "stream": True, "stream_options": {"include_usage": True},
            "ignore_eos": True}
    asyncio.run(level(url, body, 1, 2))  # warm-up
    totals = {"alone": [0, 0.0], "posting": [0, 0.0]}
    post_times: list[float] = []
    for r in range(cfg.rounds):
        for mode in ("alone", "posting"):
            poster = Poster(url, cfg.post_rate, f"{seed}-poster-{r}") if mode == "posting" else None
            if poster:
                poster.start()
            res = asyncio.run(level(url, body, 1, cfg.gen_requests))
            if poster:
                poster.halt.set()
                poster.join()
                if poster.error:
                    raise poster.error
                post_times += poster.times
            totals[mode][0] += res["tokens"]
            totals[mode][1] += res["seconds"]
    return {"gen_alone_tok_s": totals["alone"][0] / totals["alone"][1],
            "gen_posting_tok_s": totals["posting"][0] / totals["posting"][1],
            "posts_during_gen": len(post_times),
            "posts_during_gen_rate": len(post_times) / totals["posting"][1],
            "posts_during_gen_p50_ms": 1000 * statistics.median(post_times) if post_times else float("nan")}


def measure(cfg: BenchConfig, ckpt: str, db: str, log_dir: str, known: list[str], seed: int) -> dict:
    import httpx
    server = ServeProcess(["--ckpt", ckpt, "--log-dir", log_dir, "--db", db, "--rate-limit-rpm", "1e9",
                           "--rate-limit-tpm", "1e12", "--max-waiting", "256", "--device", cfg.device,
                           "--threads", str(cfg.threads)], os.path.join(log_dir, "serve.out"))
    try:
        model_id = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        result = time_posts(server.url, known, cfg.posts, random.Random(f"unknown-{seed}"))
        result |= time_generation(cfg, server.url, model_id, seed)
        result["model"] = model_id
    except (httpx.HTTPError, RuntimeError) as e:
        raise RuntimeError(f"{e}\nserve.py's output:\n{server.output()}") from e
    finally:
        server.stop()
    return result


# ----------------------------------------------------------------------------- the backends

def run_sqlite(cfg: BenchConfig, ckpt: str, root: str, n: int) -> dict:
    d = tempfile.mkdtemp(prefix=f"sqlite_{n}_", dir=root)
    path = os.path.join(d, "serve.db")
    try:
        t0 = time.perf_counter()
        known = fill_sqlite(path, n, cfg.seed + n, cfg.posts)
        fill_s = time.perf_counter() - t0
        size = os.path.getsize(path)
        return {"backend": "SQLite", "n": n, "fill_s": fill_s, "size_mb": size / 2**20} | \
            measure(cfg, ckpt, path, d, known, cfg.seed + n)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_postgres(cfg: BenchConfig, ckpt: str, root: str, url: str, n: int) -> dict:
    schema = f"bench_store_{n}"
    admin = pg_connect(url)
    try:
        try:
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            admin.execute(f"CREATE SCHEMA {schema}")
        except Exception as e:  # psycopg.Error: no CREATE privilege on the database, say
            raise UserError(f"cannot create schema {schema} in {redact(url)}: {str(e).strip()}") from None
        surl = with_schema(url, schema)
        d = tempfile.mkdtemp(prefix=f"pg_{n}_", dir=root)
        t0 = time.perf_counter()
        known = fill_postgres(surl, n, cfg.seed + n, cfg.posts)
        fill_s = time.perf_counter() - t0
        (size,), = admin.execute(f"SELECT pg_total_relation_size('{schema}.requests')").fetchall()
        return {"backend": "PostgreSQL", "n": n, "fill_s": fill_s, "size_mb": size / 2**20} | \
            measure(cfg, ckpt, surl, d, known, cfg.seed + n)
    finally:
        admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.close()


def make_checkpoint(root: str) -> str:
    if not os.path.exists(os.path.join(DATA, "meta.json")):
        raise UserError(f"no prepared data at {DATA} to train a throwaway checkpoint on: pass --ckpt")
    out = os.path.join(root, "ckpt")
    r = subprocess.run([sys.executable, os.path.join(REPO, "train_pretrain.py"), "--data", DATA, "--out", out,
                        "--max-steps", "2", "--eval-every", "1000", "--sample-tokens", "0", "--device", "cpu"],
                       capture_output=True, text=True)
    if r.returncode:
        raise UserError(f"training the throwaway checkpoint failed: {(r.stderr or r.stdout)[-1500:]}")
    return out


# ----------------------------------------------------------------------------- report

def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB, {platform.system()} {platform.release()}, "
            f"torch {torch.__version__}")


def loadavg() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min)"


def table(rows: list[dict]) -> list[str]:
    lines = ["| store | logged requests | fill (s) | size (MiB) | feedback, known id p50 / p95 (ms) | "
             "unknown id p50 / p95 (ms) | generation alone (tok/s) | with unknown-id posts (tok/s) | "
             "those posts: rate, p50 (ms) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['n']:,} | {r['fill_s']:.1f} | {r['size_mb']:.0f} | "
                     f"{r['known_p50_ms']:.1f} / {r['known_p95_ms']:.1f} | "
                     f"{r['unknown_p50_ms']:.1f} / {r['unknown_p95_ms']:.1f} | {r['gen_alone_tok_s']:.0f} | "
                     f"{r['gen_posting_tok_s']:.0f} ({r['gen_posting_tok_s'] / r['gen_alone_tok_s']:.2f}x) | "
                     f"{r['posts_during_gen_rate']:.1f}/s, {r['posts_during_gen_p50_ms']:.1f} |")
    return lines


def section(cfg: BenchConfig, argv, rows: list[dict], info: dict) -> str:
    args = [redact(a) if "://" in a else a for a in (sys.argv[1:] if argv is None else argv)]  # no password
    cmd = " ".join(["python -m bench.store"] + args)
    pg = info["pg"] or f"PostgreSQL: not measured ({info.get('pg_skipped', '--postgres off')})."
    return "\n".join([
        f"\n## Serving store: feedback posts and generation against 10^3-10^6 logged requests "
        f"(`python -m bench.store`) — {datetime.date.today().isoformat()}\n",
        f"Machine: {machine()}; load average {info['load_start']} at the start and {info['load_end']} at the end. "
        f"{pg} Model: {info['model']} ({info['ckpt']}). Command: `{cmd}`.\n",
        f"Each store holds N synthetic completed chat requests; known ids are picked at random among them. "
        f"Feedback: {cfg.posts} posts of each kind, interleaved, one keep-alive connection, round trip as the "
        f"client sees it. Generation: one stream, {cfg.gen_requests} requests of {cfg.max_tokens} tokens, "
        f"alone and again while a second client posts {cfg.post_rate:g} unknown-id feedbacks a second "
        f"(alternating, {cfg.rounds} round{'s' * (cfg.rounds > 1)} of each; tokens over the wall time of all "
        f"rounds). "
        f"Rate limits on but out of reach. Clients and server share the machine's cores.\n",
        *table(rows), "",
        BEFORE, ""])


def open_postgres(cfg: BenchConfig, info: dict) -> tuple[ThrowawayPostgres | None, str]:
    """(the throwaway server or None, the URL to benchmark in, or '' to skip PostgreSQL)."""
    pg, url = None, cfg.db_url
    if cfg.postgres != "off" and not url:
        bindir = pg_binaries()
        if bindir is None:
            if cfg.postgres == "on":
                raise UserError("--postgres on: no --db-url and no PostgreSQL binaries (initdb, pg_ctl) found")
            info["pg_skipped"] = "no --db-url and no local PostgreSQL to start"
            print(f"skipping PostgreSQL: {info['pg_skipped']}", flush=True)
        else:
            pg = ThrowawayPostgres(bindir)
    info["pg"] = ""
    try:
        url = pg.start() if pg else url
        if url:
            conn = pg_connect(url)
            (version,), = conn.execute("SHOW server_version").fetchall()
            conn.close()
            where = "a throwaway local server, default settings" if pg else redact(url)
            info["pg"] = f"PostgreSQL {version.split()[0]} ({where})."
    except BaseException:
        if pg:
            pg.stop()
        raise
    return pg, url


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(BenchConfig, argv, description=" ".join(__doc__.split("\n\n")[0].split()))
    print_config(type(cfg)(**{**vars(cfg), "db_url": redact(cfg.db_url)}), "bench config")
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise UserError("bench.store needs httpx (pip install -r requirements-dev.txt)") from None
    info = {"load_start": loadavg()}
    root = tempfile.mkdtemp(prefix="bench_store_")
    pg, rows = None, []
    try:
        pg, pg_url = open_postgres(cfg, info)
        ckpt = cfg.ckpt or make_checkpoint(root)
        info["ckpt"] = cfg.ckpt or "a throwaway checkpoint: the tiny preset trained 2 steps"
        for n in cfg.sizes:
            backends = [("SQLite", lambda: run_sqlite(cfg, ckpt, root, n))]
            if pg_url:
                backends.append(("PostgreSQL", lambda: run_postgres(cfg, ckpt, root, pg_url, n)))
            for name, run in backends:
                print(f"{name}, {n:,} logged requests ...", flush=True)
                rows.append(run())
                print("\n".join(table(rows[-1:])), flush=True)
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    info["load_end"] = loadavg()
    info["model"] = rows[0]["model"] if rows else "?"
    text = section(cfg, argv, rows, info)
    print(text)
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump({"config": vars(cfg) | {"db_url": redact(cfg.db_url)}, "info": info, "rows": rows}, f, indent=2)
    if cfg.append:
        with open(cfg.append, "a", encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"appended to {cfg.append}")


if __name__ == "__main__":
    main()
