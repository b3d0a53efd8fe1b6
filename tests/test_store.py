"""serving/store.py: the state every serve.py replica shares, on both backends (SQLite, and
PostgreSQL through tests/pg_server.py's throwaway server). Each test opens Store objects
the way replicas do: separate connections to one database. Text the API accepts (NUL bytes,
emoji, right-to-left scripts, combining marks, noncharacters, 100 kB strings) round-trips
exactly; a database URL's password is never printed."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest

from cli import UserError
from serving import protocol
from serving.export import export_feedback
from serving.store import PostgresStore, SQLiteStore, open_store, redact

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ODD = ["nul\x00byte\x00", "emoji 😀 family 👩\u200d👩\u200d👧 flag 🇫🇷", "rtl שלום עולם \u200fمرحبا بالعالم\u200e",
       "combining e\u0301 a\u0327\u0308 \u0915\u094d\u0937", "noncharacters \uffff \ufffe \U0010ffff \ufdd0",
       "controls \x01\x1f\x7f\x80\x9f \u2028\u2029 \r\n\t", 'quotes " \' \\ \\u0000 %s ? $1 ;--',
       "\ufeffBOM and \u00a0nbsp"]
BIG = "".join(ODD) * (100_000 // len("".join(ODD)) + 1)  # over 100 kB of all of them


def cid(i) -> str:
    return f"chatcmpl-{i:032x}" if isinstance(i, int) else "chatcmpl-" + i


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path):
    """A fresh database: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return str(tmp_path / "serve.db")
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def stores(db, tmp_path):
    """open(): another Store on the same database, as another replica would hold; all closed at the end."""
    opened = []

    def open_one():
        opened.append(open_store(db, str(tmp_path)))
        return opened[-1]
    yield open_one
    for s in opened:
        s.close()


def served(store, i, messages, completion, status="complete", endpoint="chat"):
    """A request as the server writes it: a row at admission, completed at the end."""
    record = {"id": cid(i), "endpoint": endpoint, "messages": messages, "key": "sha256:k"}
    store.begin_request(cid(i), "sha256:k", endpoint, record)
    if status != "incomplete":
        store.finish_request(cid(i), status, {**record, "completion": completion, "finish_reason": "stop"})


# ----------------------------------------------------------------------------- the contract

def test_backend_is_the_one_named(db, stores):
    assert isinstance(stores(), PostgresStore if db.startswith("postgresql://") else SQLiteStore)


def test_requests_are_rows_from_admission_to_their_end(stores):
    a, b = stores(), stores()  # two replicas
    msgs = [{"role": "user", "content": "hi"}]
    a.begin_request(cid(1), "sha256:k", "chat", {"id": cid(1), "messages": msgs})
    assert b.has_request(cid(1)) and b.request_status() == {cid(1): "incomplete"}
    assert b.served_chats() == {}  # not finished: nothing to export yet
    a.finish_request(cid(1), "complete", {"id": cid(1), "messages": msgs, "completion": "hello"})
    served(b, 2, msgs, None, status="aborted")
    served(b, 3, msgs, None, status="error")
    served(b, 4, msgs, "text", endpoint="completions")
    served(a, 5, msgs, None, status="incomplete")
    assert a.request_status() == {cid(1): "complete", cid(2): "aborted", cid(3): "error", cid(4): "complete",
                                  cid(5): "incomplete"}
    assert list(b.served_chats()) == [cid(1)] and b.served_chats()[cid(1)]["completion"] == "hello"
    assert not a.has_request(cid(6)) and not a.has_request("")


def test_feedback_is_kept_in_order(stores):
    a, b = stores(), stores()
    for i in range(6):
        (a if i % 2 else b).add_feedback(f"fb-{i}", "sha256:k", {"feedback_id": f"fb-{i}", "n": i})
    assert [r["n"] for r in a.feedback_records()] == list(range(6)) == [r["n"] for r in b.feedback_records()]


def test_buckets_take_refill_and_give_back(stores):
    a, b = stores(), stores()
    t = 1_000_000.0
    assert [a.take("requests:k", 1, 3, 1.0, t) for _ in range(2)] + [b.take("requests:k", 1, 3, 1.0, t)] == [0] * 3
    assert b.take("requests:k", 1, 3, 1.0, t) == pytest.approx(1.0)  # empty: one more in a second
    assert a.take("requests:k", 1, 3, 1.0, t + 0.5) == pytest.approx(0.5)
    assert a.take("requests:k", 1, 3, 1.0, t + 1.0) == 0  # refilled by one
    assert a.take("requests:k", 1, 3, 1.0, t - 5) == pytest.approx(1.0)  # a replica whose clock is behind: no refill
    assert a.take("requests:other", 3, 3, 1.0, t) == 0  # buckets are per name
    b.give_back("requests:k", 10, 3)  # refunds are capped at the capacity
    assert [a.take("requests:k", 1, 3, 1.0, t + 1.0) for _ in range(4)][-1] == pytest.approx(1.0)
    assert a.take("tokens:k", 50, 100, 100 / 60, t) == 0 and a.take("tokens:k", 80, 100, 100 / 60, t) == \
        pytest.approx(30 / (100 / 60))


def test_flags_block_on_every_replica(stores):
    a, b = stores(), stores()
    t = 2_000_000.0
    assert not a.add_flag("sha256:k", t, 60, 3, 900)
    assert not b.add_flag("sha256:k", t + 100, 60, 3, 900)  # the first is out of the window now
    assert not a.add_flag("sha256:k", t + 101, 60, 3, 900)
    assert b.blocked_for("sha256:k", t + 101) == 0
    assert b.add_flag("sha256:k", t + 102, 60, 3, 900)  # the third in 60 s: blocked
    assert a.blocked_for("sha256:k", t + 102) == pytest.approx(900)
    assert b.blocked_for("sha256:k", t + 500) == pytest.approx(502)
    assert a.blocked_for("sha256:k", t + 1002) == 0 and a.blocked_for("sha256:other", t) == 0
    assert not a.add_flag("sha256:k", t + 1003, 60, 3, 900)  # the count started over with the block


def test_export_joins_votes_from_any_replica(stores, tmp_path):
    a, b = stores(), stores()
    q = [{"role": "user", "content": "Which play?"}]
    for i, (store, text) in enumerate([(a, "Hamlet"), (b, "Lear"), (a, "Othello"), (b, "Macbeth")]):
        served(store, i, q, text)
    a.add_feedback("fb-1", "k", {"type": "pairwise", "ids": [cid(0), cid(1)], "preferred": cid(1)})
    b.add_feedback("fb-2", "k", {"type": "rating", "id": cid(2), "rating": "up"})
    a.add_feedback("fb-3", "k", {"type": "rating", "id": cid(3), "rating": "down"})
    summary = export_feedback(stores(), str(tmp_path / "out" / "prefs.jsonl"))
    records = [json.loads(line) for line in open(tmp_path / "out" / "prefs.jsonl")]
    assert {(r["chosen"], r["rejected"], r["kind"]) for r in records} == {
        ("Lear", "Hamlet", "feedback_pairwise"), ("Othello", "Macbeth", "feedback_thumbs")}
    assert summary["pairs"] == 2 and all(r["prompt"] == q for r in records)


# ----------------------------------------------------------------------------- concurrency

def hammer(db: str, log_dir: str, name: str, tries: int, threads: int) -> int:
    """`threads` threads, each with its own Store, taking from one bucket: how many were given."""
    given = []
    start = threading.Barrier(threads)

    def one():
        store = open_store(db, log_dir)
        start.wait()
        given.append(sum(store.take(name, 1, 25, 1e-9, time.time()) == 0 for _ in range(tries)))
        store.close()
    workers = [threading.Thread(target=one) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(given)


def test_two_processes_hammering_one_bucket_never_get_more_than_its_capacity(db, stores, tmp_path):
    stores()  # the tables exist before the processes race
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        given = pool.starmap(hammer, [(db, str(tmp_path), "requests:shared", 30, 2)] * 2)
    assert sum(given) == 25, given  # 120 tries for 25 tokens that never refill: exactly 25, none twice
    assert stores().take("requests:shared", 1, 25, 1e-9, time.time()) > 0


def test_two_processes_flagging_one_key_block_it_once(db, stores, tmp_path):
    stores()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        blocked = pool.starmap(flag_many, [(db, str(tmp_path), 10)] * 2)
    assert sum(blocked) == 4  # 20 flags, 5 per block: 4 blocks, whichever process flagged
    assert stores().blocked_for("sha256:abuser", time.time()) > 800


def flag_many(db: str, log_dir: str, n: int) -> int:
    store = open_store(db, log_dir)
    try:
        return sum(store.add_flag("sha256:abuser", time.time(), 600, 5, 900) for _ in range(n))
    finally:
        store.close()


# ----------------------------------------------------------------------------- text

def test_odd_text_round_trips_exactly(stores, tmp_path):
    a, b = stores(), stores()
    prompts = [[{"role": "system", "content": s}, {"role": "user", "content": s + "?"}] for s in ODD + [BIG]]
    for i, msgs in enumerate(prompts):
        served(a if i % 2 else b, 2 * i, msgs, "first " + ODD[i % len(ODD)])
        served(b if i % 2 else a, 2 * i + 1, msgs, BIG if i == len(ODD) else "second \x00" + ODD[-i])
        a.add_feedback(f"fb-{i}", "k", {"type": "pairwise", "ids": [cid(2 * i), cid(2 * i + 1)],
                                        "preferred": cid(2 * i + 1), "comment": msgs[0]["content"]})
    chats = b.served_chats()
    for i, msgs in enumerate(prompts):
        assert chats[cid(2 * i)]["messages"] == msgs and chats[cid(2 * i)]["completion"] == "first " + ODD[i % len(ODD)]
    assert chats[cid(2 * len(ODD) + 1)]["completion"] == BIG and len(BIG.encode()) > 100_000
    assert [f["comment"] for f in b.feedback_records()] == ODD + [BIG]
    summary = export_feedback(b, str(tmp_path / "prefs.jsonl"))
    records = [json.loads(line) for line in open(tmp_path / "prefs.jsonl", encoding="utf-8")]
    assert summary["pairs"] == len(prompts) and [r["prompt"] for r in records] == prompts
    assert [r["chosen"] for r in records] == [chats[cid(2 * i + 1)]["completion"] for i in range(len(prompts))]
    assert [r["rejected"] for r in records] == [chats[cid(2 * i)]["completion"] for i in range(len(prompts))]


def test_lone_surrogates_are_refused_at_the_door():
    for raw in (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', b'{"comment": "\\udfff"}',
                b'{"x": ["ok", {"\\ud83d": 1}]}'):
        with pytest.raises(protocol.ApiError) as e:
            protocol.parse_json_body(raw)
        assert e.value.status == 400 and e.value.code == "invalid_unicode"
    assert protocol.parse_json_body(b'{"c": "\\ud83d\\ude00 \\u0000"}') == {"c": "😀 \x00"}  # a pair is a character


# ----------------------------------------------------------------------------- URLs and errors

def test_redact_hides_every_password_form():
    assert redact("postgresql://serve:hunter2@db.internal:5432/serve") == \
        "postgresql://serve:***@db.internal:5432/serve"
    assert redact("postgres://u:p@ss:w@rd@h/db") == "postgres://u:***@h/db"  # an unescaped '@' hides more, not less
    assert redact("postgresql://h/db?sslmode=require&password=hunter2") == \
        "postgresql://h/db?sslmode=require&password=***"
    for clear in ("postgresql://u@h/db", "postgresql://h:5432/db", "runs/serve/serve.db", ""):
        assert redact(clear) == clear


def test_unknown_scheme_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(UserError) as e:
        open_store("mysql://root:hunter2@db/serve", str(tmp_path))
    assert "mysql://root:***@db/serve" in str(e.value) and "hunter2" not in str(e.value)
    import serve
    with pytest.raises(SystemExit) as e:
        serve.main(["--db", "redis://:hunter2@cache:6379/0", "--export-feedback", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: --db must be") and len(err.splitlines()) == 1, err
    assert "hunter2" not in err


def test_export_never_creates_a_store(tmp_path):
    with pytest.raises(UserError, match="no feedback"):
        open_store("", str(tmp_path / "logs"), create=False)
    assert not os.path.exists(tmp_path / "logs")


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "serve.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_db_password_is_never_printed(postgres, tmp_path):
    """serve.py prints its config at start: the URL's password is masked there, and in the
    error when the database cannot be reached."""
    url = postgres.url("serve_secret_db", password="hunter2-secret")
    done = run_serve("--db", url, "--ckpt", str(tmp_path / "no-checkpoint"), "--log-dir", str(tmp_path))
    assert done.returncode == 2 and "serve config" in done.stdout, done.stdout + done.stderr
    config = json.loads(done.stdout.split("serve config: ", 1)[1].splitlines()[0])
    assert config["db"] == url.replace("hunter2-secret", "***")
    unreachable = "postgresql://serve_test:hunter2-secret@127.0.0.1:1/serve"
    failed = run_serve("--db", unreachable, "--export-feedback", str(tmp_path / "out.jsonl"))
    err = failed.stderr.strip()
    assert failed.returncode == 2
    assert err.startswith("error: cannot open the serving store postgresql://serve_test:***@127.0.0.1:1/serve: ")
    assert len(err.splitlines()) == 1, err
    assert "hunter2" not in done.stdout + done.stderr + failed.stdout + failed.stderr


def test_postgres_reconnects_after_losing_its_connection(postgres):
    import psycopg
    url = postgres.new_database()
    store = open_store(url, "")
    served(store, 1, [{"role": "user", "content": "x"}], "y")
    with psycopg.connect(url, autocommit=True) as admin:  # what a server restart does to every session
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND pid <> pg_backend_pid()")
    failures = 0
    for _ in range(3):
        try:
            assert store.has_request(cid(1))
        except psycopg.OperationalError:  # the one statement that found the connection gone
            failures += 1
    assert failures <= 1 and store.has_request(cid(1))
    store.close()


def test_a_replica_answers_503_while_postgres_is_down_then_reconnects(postgres, data_dirs, tmp_path):
    """A server of its own (stopped and started here), so the session's stays up."""
    import httpx

    import pg_server
    from serve_helpers import ServerProcess, make_checkpoint
    ckpt = make_checkpoint(tmp_path / "tiny", os.path.join(data_dirs[0], "tokenizer.json"))
    pg = pg_server.PostgresServer().start()
    srv = None
    try:
        srv = ServerProcess(["--ckpt", ckpt, "--db", pg.new_database(), "--log-dir", str(tmp_path / "logs"),
                             "--threads", "1"], tmp_path / "server.log").wait_ready()
        body = {"model": "tiny-step7", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        ask = lambda: httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)  # noqa: E731
        assert ask().status_code == 200
        assert httpx.get(srv.url + "/ready", timeout=30).status_code == 200
        pg.stop_server()
        r = ask()
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        assert int(r.headers["retry-after"]) >= 1
        # readiness follows the store (a load balancer stops routing here); liveness does not
        assert httpx.get(srv.url + "/ready", timeout=30).status_code == 503
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
        pg.start_server()
        assert [ask().status_code for _ in range(2)] == [200, 200]  # reconnected
        assert httpx.get(srv.url + "/ready", timeout=30).status_code == 200
    finally:
        try:
            if srv is not None:
                srv.stop()
        finally:
            pg.stop()
