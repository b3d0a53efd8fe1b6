"""What the server keeps, in one store that every replica shares: the requests (a row
written at admission and completed at the end, so a replica killed mid-request leaves an
`incomplete` row rather than nothing), the feedback, the rate-limit buckets and the abuse
blocks. Two backends behind one small interface: SQLite (the default, a file in
--log-dir in WAL mode, shared by the replicas of one machine) and PostgreSQL (`--db
postgresql://...`, for replicas on several machines). Requests are indexed by completion
id, so checking a feedback post costs the same at 10^6 logged requests as at 10^3; bucket
and block updates are transactions that lock their row, so limits hold across replicas.

Every write is durable when its call returns: SQLite runs with synchronous=FULL (in WAL
mode the log is synced at every commit), PostgreSQL commits with synchronous_commit on. The
server never calls the store on its event loop: `OffLoop` runs each call on a small pool
of threads with a timeout, so a locked or stalled database fails the requests that need
it (503 store_unavailable) and nothing else.

Records are stored as JSON text with every non-ASCII character escaped, so any string the
API accepts (NUL bytes included, which PostgreSQL's text type refuses) round-trips
exactly. The feedback export (serving/export.py) reads it."""
from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import secrets
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from cli import UserError

SQLITE_NAME = "serve.db"
TABLES = """
CREATE TABLE IF NOT EXISTS requests (id TEXT PRIMARY KEY, created DOUBLE PRECISION NOT NULL, key TEXT NOT NULL,
    endpoint TEXT NOT NULL, status TEXT NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (seq {serial}, id TEXT NOT NULL, created DOUBLE PRECISION NOT NULL,
    key TEXT NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS buckets (name TEXT PRIMARY KEY, level DOUBLE PRECISION NOT NULL,
    at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS flags (ident TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS flags_by_ident ON flags (ident, at);
CREATE TABLE IF NOT EXISTS blocks (ident TEXT PRIMARY KEY, until DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS probes (replica TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
DEFAULT_TIMEOUT = 5.0  # seconds a store call may take before the request that needs it fails


def dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=True)


class Store:
    """The shared serving state. SQL is written once with `?` placeholders; a backend
    says how it runs a statement and a transaction. Safe to call from several threads."""

    for_update = ""  # appended to a SELECT that must lock its row inside a transaction
    errors: tuple = (sqlite3.OperationalError,)  # what the backend raises when the database is unavailable

    def __init__(self):
        self.lock = threading.Lock()

    # -- what a backend provides
    def execute(self, sql: str, params=()) -> list[tuple]:
        raise NotImplementedError

    @contextmanager
    def transaction(self):
        raise NotImplementedError
        yield

    def close(self) -> None:
        raise NotImplementedError

    # -- requests and feedback
    def begin_request(self, rid: str, key: str, endpoint: str, record: dict) -> None:
        with self.lock:
            self.execute("INSERT INTO requests (id, created, key, endpoint, status, record) VALUES (?, ?, ?, ?, ?, ?)",
                         (rid, time.time(), key, endpoint, "incomplete", dumps(record)))

    def finish_request(self, rid: str, status: str, record: dict) -> None:
        with self.lock:
            self.execute("UPDATE requests SET status = ?, record = ? WHERE id = ?", (status, dumps(record), rid))

    def has_request(self, rid: str) -> bool:
        with self.lock:
            return bool(self.execute("SELECT 1 FROM requests WHERE id = ?", (rid,)))

    def request_summary(self, rid: str) -> dict | None:
        """{"key", "endpoint", "status", "text_kept"} of a logged request (None: no such id);
        text_kept: its messages and completion are in the store (the export needs them)."""
        with self.lock:
            rows = self.execute("SELECT key, endpoint, status, record FROM requests WHERE id = ?", (rid,))
        if not rows:
            return None
        key, endpoint, status, record = rows[0]
        record = json.loads(record)
        return {"key": key, "endpoint": endpoint, "status": status,
                "text_kept": isinstance(record.get("completion"), str) and "messages" in record}

    def deployment_secret(self) -> bytes:
        """The secret that keys stored identities (limits.key_id), made by the first replica
        and shared by every replica of this store."""
        with self.lock:
            self.execute("INSERT INTO settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                         ("identity_secret", secrets.token_hex(32)))
            (value,), = self.execute("SELECT value FROM settings WHERE name = ?", ("identity_secret",))
        return value.encode()

    def probe(self, replica: str) -> None:
        """A small write, as a readiness check: it fails when the database cannot take a
        write (down, locked, read-only, disk full)."""
        with self.lock:
            self.execute("INSERT INTO probes (replica, at) VALUES (?, ?) ON CONFLICT (replica) DO UPDATE SET at = ?",
                         (replica, time.time(), time.time()))

    def request_status(self) -> dict[str, str]:
        """Every request's status (for tests and operators)."""
        with self.lock:
            return dict(self.execute("SELECT id, status FROM requests"))

    def add_feedback(self, fid: str, key: str, record: dict) -> None:
        with self.lock:
            self.execute("INSERT INTO feedback (id, created, key, record) VALUES (?, ?, ?, ?)",
                         (fid, time.time(), key, dumps(record)))

    def served_chats(self) -> dict[str, dict]:
        """The completed chat requests whose messages and completion were kept, by id."""
        with self.lock:
            rows = self.execute("SELECT record FROM requests WHERE endpoint = 'chat' AND status = 'complete'")
        records = (json.loads(r) for (r,) in rows)
        return {r["id"]: r for r in records if isinstance(r.get("completion"), str) and "messages" in r}

    def feedback_records(self) -> list[dict]:
        with self.lock:
            return [json.loads(r) for (r,) in self.execute("SELECT record FROM feedback ORDER BY seq")]

    # -- limits: token buckets and abuse blocks, one locked row each
    def take(self, name: str, amount: float, capacity: float, per_second: float, now: float) -> float:
        """Take `amount` from bucket `name` (created full): 0.0 when taken, otherwise the
        seconds until it will be there."""
        with self.lock, self.transaction():
            self.execute("INSERT INTO buckets (name, level, at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
                         (name, capacity, now))
            (level, at), = self.execute("SELECT level, at FROM buckets WHERE name = ?" + self.for_update, (name,))
            level = min(capacity, level + max(0.0, now - at) * per_second)  # clocks of replicas may differ a little
            wait = 0.0 if level >= amount else (amount - level) / per_second
            self.execute("UPDATE buckets SET level = ?, at = ? WHERE name = ?",
                         (level - amount if not wait else level, max(now, at), name))
        return wait

    def give_back(self, name: str, amount: float, capacity: float) -> None:
        with self.lock:
            self.execute("UPDATE buckets SET level = CASE WHEN level + ? > ? THEN ? ELSE level + ? END WHERE name = ?",
                         (amount, capacity, capacity, amount, name))

    def add_flag(self, ident: str, now: float, window: float, max_flags: int, block_s: float) -> bool:
        """Count a flagged request; True when this one blocks the identity."""
        with self.lock, self.transaction():
            self.execute("INSERT INTO blocks (ident, until) VALUES (?, 0) ON CONFLICT (ident) DO NOTHING", (ident,))
            self.execute("SELECT until FROM blocks WHERE ident = ?" + self.for_update, (ident,))  # serializes per ident
            self.execute("DELETE FROM flags WHERE ident = ? AND at < ?", (ident, now - window))
            self.execute("INSERT INTO flags (ident, at) VALUES (?, ?)", (ident, now))
            (count,), = self.execute("SELECT COUNT(*) FROM flags WHERE ident = ?", (ident,))
            if count < max_flags:
                return False
            self.execute("UPDATE blocks SET until = ? WHERE ident = ?", (now + block_s, ident))
            self.execute("DELETE FROM flags WHERE ident = ?", (ident,))
        return True

    def blocked_for(self, ident: str, now: float) -> float:
        with self.lock:
            rows = self.execute("SELECT until FROM blocks WHERE ident = ?", (ident,))
        return max(0.0, rows[0][0] - now) if rows else 0.0


class SQLiteStore(Store):
    """A file in WAL mode: readers never wait for the writer; writers (the replicas of one
    machine) take turns, each transaction BEGIN IMMEDIATE, waiting at most `timeout`
    seconds for the lock. synchronous=FULL: a commit returns once the log is on disk. The
    file and its -wal/-shm companions are the owner's only (0600): they hold every prompt."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT):
        super().__init__()
        self.path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if not os.path.exists(path):  # created private, before SQLite opens it
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            self.conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.executescript(TABLES.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT"))
            for companion in (path, path + "-wal", path + "-shm"):  # SQLite copies the file's mode to these
                if os.path.exists(companion):
                    os.chmod(companion, 0o600)
        except (OSError, sqlite3.Error) as e:
            raise UserError(f"cannot open the serving store {path}: {e}") from None

    def execute(self, sql: str, params=()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    @contextmanager
    def transaction(self):
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


class PostgresStore(Store):
    """A PostgreSQL database through psycopg 3 (pip install "psycopg[binary]"). One
    connection per replica; a connection that broke (the server restarted, the network
    dropped it) is replaced by the next statement, so one request fails, not all later ones.
    Each statement may run `timeout` seconds (statement_timeout); commits are synchronous."""

    for_update = " FOR UPDATE"
    SCHEMA_LOCK = 7_402_318_551  # an advisory lock: replicas starting together create the tables in turn

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT):
        super().__init__()
        self.timeout = timeout
        try:
            import psycopg
        except ImportError:
            raise UserError('--db postgresql://... needs psycopg 3: pip install "psycopg[binary]"') from None
        self.psycopg, self.url, self.errors = psycopg, url, (psycopg.OperationalError,)
        try:
            self.conn = self.connect()
        except psycopg.Error as e:
            raise UserError(f"cannot open the serving store {redact(url)}: {str(e).strip().splitlines()[0]}") from None

    def connect(self):
        """A connection, with the tables created if missing (CREATE TABLE IF NOT EXISTS
        alone races: two sessions may both insert the same catalog row)."""
        conn = self.psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, round(self.timeout)))
        conn.execute("SELECT set_config('statement_timeout', %s, false), set_config('synchronous_commit', 'on', false)",
                     (str(max(1, int(self.timeout * 1000))),))
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.SCHEMA_LOCK,))
            for statement in filter(str.strip, TABLES.format(serial="BIGSERIAL PRIMARY KEY").split(";")):
                conn.execute(statement)
        return conn

    def execute(self, sql: str, params=()) -> list[tuple]:
        if self.conn.broken or self.conn.closed:
            self.conn = self.connect()
        cur = self.conn.execute(sql.replace("?", "%s"), params)
        return cur.fetchall() if cur.description else []

    @contextmanager
    def transaction(self):
        if self.conn.broken or self.conn.closed:
            self.conn = self.connect()
        with self.conn.transaction():
            yield

    def close(self) -> None:
        self.conn.close()


def redact(url: str) -> str:
    """A database URL without its password (user:PASSWORD@ or ?password=...), for messages
    and logs. Errs toward hiding: everything from the user's ':' to the last '@' goes."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    at = rest.rfind("@")
    if at >= 0 and ":" in rest[:at]:
        rest = rest[:at].split(":", 1)[0] + ":***" + rest[at:]
    return scheme + sep + re.sub(r"(?i)(password=)[^&]*", r"\1***", rest)


def open_store(db: str, log_dir: str, create: bool = True, timeout: float = DEFAULT_TIMEOUT) -> Store:
    """--db: empty for the SQLite file LOG_DIR/serve.db, a path or sqlite:///path for
    another SQLite file, postgresql://... (or postgres://) for PostgreSQL. With
    create=False (the export) a SQLite file that does not exist is an error, not a new file."""
    if db.startswith(("postgresql://", "postgres://")):
        return PostgresStore(db, timeout)
    if db.startswith("sqlite:///"):
        db = db[len("sqlite:///") - 1:] if db.startswith("sqlite:////") else db[len("sqlite:///"):]
    elif "://" in db:
        raise UserError(f"--db must be a SQLite path, sqlite:///PATH or postgresql://..., got {redact(db)}")
    path = db or os.path.join(log_dir, SQLITE_NAME)
    if not create and not os.path.exists(path):
        raise UserError(f"no feedback: there is no serving store at {path} (--db, or --log-dir's {SQLITE_NAME})")
    return SQLiteStore(path, timeout)


# ----------------------------------------------------------------------------- calls from the event loop

class StoreUnavailable(Exception):
    """A store call failed or did not finish in time: the request that needed it gets 503."""


class OffLoop:
    """Store calls off the event loop. `await db(fn, *args)` runs fn on one of `workers`
    threads and waits at most `timeout` seconds; a database error or the timeout raise
    StoreUnavailable. A call that timed out may still finish later on its thread (a backend
    call cannot be interrupted); the request has failed by then, and the database's own
    timeouts (SQLite's busy timeout, PostgreSQL's statement_timeout, both `timeout`) free
    the thread. At most `max_pending` calls wait at once: past that, calls fail at once
    rather than queue behind a stalled database.

    `later(fn, *args)` is for a write that must happen although no request waits for it (a
    request's final row after the client left, or after its first attempt failed): it is
    retried on a thread of its own, every `retry_every` seconds up to `retry_for` seconds."""

    def __init__(self, store: Store, timeout: float = DEFAULT_TIMEOUT, workers: int = 4, max_pending: int = 256,
                 retry_every: float = 1.0, retry_for: float = 120.0):
        self.store, self.timeout, self.max_pending = store, timeout, max_pending
        self.retry_every, self.retry_for = retry_every, retry_for
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="store")
        self.pending = 0
        self.count_lock = threading.Lock()
        self.retries: queue.SimpleQueue = queue.SimpleQueue()
        self.retry_thread: threading.Thread | None = None

    def _settled(self, _future) -> None:
        with self.count_lock:
            self.pending -= 1

    async def __call__(self, fn, *args):
        with self.count_lock:
            if self.pending >= self.max_pending:
                raise StoreUnavailable(f"{self.pending} store calls are already waiting")
            self.pending += 1
        future = self.pool.submit(fn, *args)
        future.add_done_callback(self._settled)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout)
        except asyncio.TimeoutError:
            raise StoreUnavailable(f"no answer within {self.timeout:g} s") from None
        except self.store.errors as e:
            raise StoreUnavailable(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None

    def later(self, fn, *args) -> None:
        """Run fn(*args) on the retry thread until it succeeds or retry_for seconds pass."""
        with self.count_lock:
            if self.retry_thread is None:
                self.retry_thread = threading.Thread(target=self._retry_loop, name="store-retry", daemon=True)
                self.retry_thread.start()
        self.retries.put((fn, args, time.monotonic() + self.retry_for))

    def _retry_loop(self) -> None:
        while True:
            item = self.retries.get()
            if item is None:
                return
            fn, args, give_up = item
            while True:
                try:
                    fn(*args)
                    break
                except self.store.errors:
                    if time.monotonic() >= give_up:
                        break
                    time.sleep(self.retry_every)

    def close(self, wait: float = 10.0) -> None:
        """Stop taking calls; give the writes still to retry up to `wait` seconds."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.retry_thread is not None:
            self.retries.put(None)
            self.retry_thread.join(wait)
