"""What the server keeps, in one store that every replica shares: the requests (a row
written at admission and completed at the end, so a replica killed mid-request leaves an
`incomplete` row rather than nothing), the feedback, the rate-limit buckets and the abuse
blocks. Two backends behind one small interface: SQLite (the default, a file in
--log-dir in WAL mode, shared by the replicas of one machine) and PostgreSQL (`--db
postgresql://...`, for replicas on several machines). Requests are indexed by completion
id, so checking a feedback post costs the same at 10^6 logged requests as at 10^3; bucket
and block updates are transactions that lock their row, so limits hold across replicas.

Records are stored as JSON text with every non-ASCII character escaped, so any string the
API accepts (NUL bytes included, which PostgreSQL's text type refuses) round-trips
exactly. The feedback export joins votes with the completions they rate into
prompt/chosen/rejected records for the next reward model (train_rm.py --data)."""
from __future__ import annotations

import collections
import json
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager

from cli import UserError
from data.files import atomic_write

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
"""


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
    machine) take turns, each transaction BEGIN IMMEDIATE."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.executescript(TABLES.format(serial="INTEGER PRIMARY KEY AUTOINCREMENT"))
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
    dropped it) is replaced by the next statement, so one request fails, not all later ones."""

    for_update = " FOR UPDATE"
    SCHEMA_LOCK = 7_402_318_551  # an advisory lock: replicas starting together create the tables in turn

    def __init__(self, url: str):
        super().__init__()
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
        conn = self.psycopg.connect(self.url, autocommit=True)
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


def open_store(db: str, log_dir: str, create: bool = True) -> Store:
    """--db: empty for the SQLite file LOG_DIR/serve.db, a path or sqlite:///path for
    another SQLite file, postgresql://... (or postgres://) for PostgreSQL. With
    create=False (the export) a SQLite file that does not exist is an error, not a new file."""
    if db.startswith(("postgresql://", "postgres://")):
        return PostgresStore(db)
    if db.startswith("sqlite:///"):
        db = db[len("sqlite:///") - 1:] if db.startswith("sqlite:////") else db[len("sqlite:///"):]
    elif "://" in db:
        raise UserError(f"--db must be a SQLite path, sqlite:///PATH or postgresql://..., got {redact(db)}")
    path = db or os.path.join(log_dir, SQLITE_NAME)
    if not create and not os.path.exists(path):
        raise UserError(f"no feedback: there is no serving store at {path} (--db, or --log-dir's {SQLITE_NAME})")
    return SQLiteStore(path)


# ----------------------------------------------------------------------------- the feedback export

class _Pairs:
    """Preference records built from served chat completions; what cannot be used is
    counted by reason in `skipped`."""

    def __init__(self, served: dict[str, dict]):
        self.served = served
        self.records: list[dict] = []
        self.seen: set[tuple[str, str]] = set()
        self.voted: set[frozenset] = set()  # completions compared side by side, ties included
        self.skipped: collections.Counter = collections.Counter()

    def usable(self, cid) -> dict | None:
        r = self.served.get(cid) if isinstance(cid, str) else None
        if r is None:
            self.skipped["unknown_or_not_chat"] += 1
        elif not r["completion"].strip():
            self.skipped["empty_completion"] += 1
        else:
            return r
        return None

    def add(self, chosen: dict, rejected: dict, kind: str) -> None:
        if chosen["messages"] != rejected["messages"]:
            self.skipped["different_prompts"] += 1
        elif chosen["completion"] == rejected["completion"]:
            self.skipped["same_text"] += 1
        elif (chosen["id"], rejected["id"]) not in self.seen:
            self.seen.add((chosen["id"], rejected["id"]))
            self.records.append({"prompt": chosen["messages"], "chosen": chosen["completion"],
                                 "rejected": rejected["completion"], "kind": kind,
                                 "source_ids": [chosen["id"], rejected["id"]]})

    def add_pairwise(self, fb: dict) -> None:
        a, b = (self.usable(i) for i in fb["ids"])
        if a is None or b is None:
            return
        self.voted.add(frozenset((a["id"], b["id"])))
        if fb.get("preferred") is None:  # a tie: no preference to learn from
            self.skipped["tie"] += 1
            return
        chosen, rejected = (a, b) if fb.get("preferred") == a["id"] else (b, a)
        self.add(chosen, rejected, "feedback_pairwise")

    def add_thumbs(self, ratings: dict[str, str]) -> None:
        """Every thumbs-up completion against every thumbs-down completion of the same messages,
        except two that a pairwise vote already compared: the rater's side-by-side verdict
        (a tie included) decides, not two thumbs each given on its own."""
        by_prompt: dict[str, dict[str, list]] = {}
        for cid, rating in ratings.items():
            r = self.usable(cid)
            if r is not None:
                key = json.dumps(r["messages"], sort_keys=True)
                by_prompt.setdefault(key, {"up": [], "down": []})[rating].append(r)
        for groups in by_prompt.values():
            if not groups["up"] or not groups["down"]:
                self.skipped["rating_without_opposite"] += len(groups["up"]) + len(groups["down"])
            for good in groups["up"]:
                for bad in groups["down"]:
                    if frozenset((good["id"], bad["id"])) in self.voted:
                        self.skipped["thumbs_of_a_voted_pair"] += 1
                    else:
                        self.add(good, bad, "feedback_thumbs")


def export_feedback(store: Store, out: str) -> dict:
    """Join the feedback with the completions it rates into train_rm.py records:
    {"prompt": messages, "chosen": str, "rejected": str, "kind": ...}.

    A pairwise vote gives one pair (both completions must answer the same messages; a tie
    gives none). Thumbs are grouped by prompt: every thumbs-up completion against every
    thumbs-down completion of the same messages (a completion's latest rating counts), unless
    a vote compared those two (the vote decides: a tie vote with one thumb up and one down
    gives no pair). Only completed chat completions are exported; what cannot be used is
    counted by reason. The file is written whole or not at all."""
    feedback = store.feedback_records()
    if not feedback:
        raise UserError("no feedback in the serving store yet")
    pairs = _Pairs(store.served_chats())
    ratings: dict[str, str] = {}
    for fb in feedback:
        if fb.get("type") == "pairwise" and isinstance(fb.get("ids"), list) and len(fb["ids"]) == 2:
            pairs.add_pairwise(fb)
        elif fb.get("type") == "rating" and fb.get("rating") in ("up", "down"):
            ratings[fb.get("id")] = fb["rating"]  # the latest rating of a completion wins
        else:
            pairs.skipped["malformed_feedback"] += 1
    pairs.add_thumbs(ratings)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, "".join(json.dumps(rec, ensure_ascii=True) + "\n" for rec in pairs.records))
    return {"pairs": len(pairs.records), "by_kind": dict(collections.Counter(r["kind"] for r in pairs.records)),
            "skipped": dict(pairs.skipped)}
