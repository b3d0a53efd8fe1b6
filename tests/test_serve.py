"""serve.py over HTTP: real `python serve.py` processes on 127.0.0.1, driven by the official
`openai` client (max_retries=0, so a 429 or 5xx is seen, not retried), httpx, and headless
Chromium for the chat page."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from serve_helpers import MESSAGES, REPO, ServerProcess, make_checkpoint, metric, metrics  # noqa: E402


def greedy_text(ckpt: str, messages: list[dict], max_tokens: int) -> str:
    """What the model writes at temperature 0, computed without the server."""
    import checkpoint
    from data.text.tokenizer import Tokenizer
    from serving.text import chat_prompt_ids
    model, _ = checkpoint.load_model(ckpt)
    tok = Tokenizer.load(os.path.join(ckpt, "tokenizer.json"))
    ids = model.eval().generate([chat_prompt_ids(tok, messages)], max_tokens, pad_id=tok.pad_id, temperature=0,
                                stop_tokens=list(range(len(tok.token_bytes), tok.vocab_size)))[0]
    return tok.decode([t for t in ids if t < len(tok.token_bytes)])


# ----------------------------------------------------------------------------- servers

@pytest.fixture(scope="module")
def ckpt(data_dirs, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", os.path.join(data_dirs[0], "tokenizer.json"))


@pytest.fixture(scope="module")
def open_srv(ckpt, tmp_path_factory):
    """An open server (no keys, as vLLM's default) with generous limits."""
    root = tmp_path_factory.mktemp("open")
    srv = ServerProcess(["--ckpt", ckpt, "--log-dir", str(root / "logs"), "--max-message-chars", "2000"],
                        root / "server.log").wait_ready()
    srv.log_dir = root / "logs"
    yield srv
    srv.stop()


KEYS = ["sk-test-ok", "sk-test-rate", "sk-test-in", "sk-test-out", "sk-test-abuse"] + [f"sk-busy-{i}" for i in range(4)]


@pytest.fixture(scope="module")
def keyed_srv(ckpt, tmp_path_factory):
    """Keys, 3 requests per minute per key, a key blocked after 2 flags, two running rows and
    one waiting, and a blocklist with one more word: the first word the model writes for
    MESSAGES, so its output trips the filter."""
    root = tmp_path_factory.mktemp("keyed")
    (root / "keys.txt").write_text("# test keys\n" + "\n".join(KEYS) + "\n")
    text = greedy_text(ckpt, MESSAGES, 40)
    words = re.findall(r"\b[a-zA-Z]{3,}\b", text)
    assert words, f"the model wrote no plain word: {text!r}"
    word = words[len(words) // 2]  # from the middle: the response has text before it
    with open(os.path.join(REPO, "data", "blocklist.txt")) as f:
        (root / "blocklist.txt").write_text(f.read() + f"\n{word}\n")
    srv = ServerProcess(["--ckpt", ckpt, "--log-dir", str(root / "logs"), "--api-keys", str(root / "keys.txt"),
                         "--rate-limit-rpm", "3", "--abuse-max-flags", "2", "--blocklist", str(root / "blocklist.txt"),
                         "--max-running", "2", "--max-waiting", "1"], root / "server.log").wait_ready()
    srv.log_dir, srv.word, srv.free_text = root / "logs", word, text
    yield srv
    srv.stop()


# ----------------------------------------------------------------------------- the API with the openai client

def test_models_list_names_checkpoint_and_step(open_srv):
    models = open_srv.client().models.list().data
    assert [m.id for m in models] == ["tiny-step7"]
    assert open_srv.client().models.retrieve("tiny-step7").id == "tiny-step7"


def test_chat_streamed_equals_non_streamed_and_usage_adds_up(open_srv, ckpt):
    client = open_srv.client()
    full = client.chat.completions.create(model="tiny-step7", messages=MESSAGES, temperature=0, max_tokens=24)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.message.content == greedy_text(ckpt, MESSAGES, 24)  # what the model alone writes
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    from data.text.tokenizer import Tokenizer
    from serving.text import chat_prompt_ids
    tok = Tokenizer.load(os.path.join(ckpt, "tokenizer.json"))
    assert full.usage.prompt_tokens == len(chat_prompt_ids(tok, MESSAGES))
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="tiny-step7", messages=MESSAGES, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert len({c.id for c in chunks}) == 1


def test_completions_endpoint_streamed_equals_non_streamed(open_srv):
    client = open_srv.client()
    full = client.completions.create(model="tiny-step7", prompt="ROMEO:", temperature=0, max_tokens=16)
    assert full.object == "text_completion" and full.choices[0].text
    parts = list(client.completions.create(model="tiny-step7", prompt="ROMEO:", temperature=0, max_tokens=16,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
    assert full.usage.completion_tokens == 16 and full.choices[0].finish_reason == "length"


def test_max_tokens_gives_length_and_stop_strings_stop(open_srv):
    client = open_srv.client()
    r = client.chat.completions.create(model="tiny-step7", messages=MESSAGES, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    full = client.chat.completions.create(model="tiny-step7", messages=MESSAGES, temperature=0, max_tokens=30)
    text = full.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(model="tiny-step7", messages=MESSAGES, temperature=0, max_tokens=30,
                                         stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:text.index(stop)]


def test_sampling_with_a_seed_is_reproducible(open_srv):
    client = open_srv.client()
    kw = dict(model="tiny-step7", messages=MESSAGES, temperature=1.0, top_p=0.9, max_tokens=20)
    a, b = (client.chat.completions.create(seed=11, **kw).choices[0].message.content for _ in range(2))
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert a == b and len(others | {a}) > 1


def test_errors_map_to_openai_exception_classes(open_srv):
    client = open_srv.client()
    with pytest.raises(openai.BadRequestError) as e:  # bad JSON
        client.post("/chat/completions", cast_to=object, content=b'{"model": "tiny-step7", "messages": [',
                    options={"headers": {"Content-Type": "application/json"}})
    assert e.value.status_code == 400 and e.value.code == "invalid_json"
    assert e.value.body["type"] == "invalid_request_error" and "param" in e.value.body
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # oversize input (--max-message-chars 2000)
        client.chat.completions.create(model="tiny-step7", messages=[{"role": "user", "content": "a " * 1500}])
    assert e.value.code == "message_too_long"
    with pytest.raises(openai.BadRequestError) as e:  # longer than the context
        client.chat.completions.create(model="tiny-step7", messages=MESSAGES, max_tokens=1020)
    assert e.value.code == "context_length_exceeded"
    for bad in (dict(temperature=3), dict(top_p=0), dict(max_tokens=0), dict(n=2), dict(stop=["a"] * 5)):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny-step7", messages=MESSAGES, **bad)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-step7", messages=[{"role": "wizard", "content": "hi"}])
    for body in (b"[1, 2]", b"\xff\xfe", b"1" * 2_000_000, b'{"model": "tiny-step7", "messages": "hi"}',
                 b'{"model": "tiny-step7", "messages": [{"role": "user", "content": 5}]}',
                 b'{"model": "tiny-step7", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}'):
        r = httpx.post(open_srv.url + "/v1/chat/completions", content=body, timeout=30)
        status = 413 if len(body) > 1_000_000 else 400  # over --max-request-bytes: 413 request_too_large
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, body[:40]
    r = httpx.get(open_srv.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_moderations_endpoint_in_openai_shape(open_srv):
    result = open_srv.client().moderations.create(input=["a fine day", "send nude selfies"]).results
    assert [r.flagged for r in result] == [False, True]
    assert result[1].categories.sexual and not result[1].categories.violence
    assert result[1].category_scores.sexual == 1.0 and result[1].category_applied_input_types.sexual == ["text"]
    assert metric(metrics(open_srv.url), "serve:safety_flags_total", category="sexual", stage="moderations") == 1


def test_eight_concurrent_streams_complete_while_health_answers(open_srv):
    results, errors = {}, []

    def stream(i):
        try:
            chunks = open_srv.client().chat.completions.create(
                model="tiny-step7", messages=[{"role": "user", "content": f"Story number {i}"}], temperature=0,
                max_tokens=200, stream=True, extra_body={"ignore_eos": True})
            parts = [c.choices[0] for c in chunks if c.choices]
            results[i] = ("".join(p.delta.content or "" for p in parts), parts[-1].finish_reason)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    health, busy = [], 0
    while any(t.is_alive() for t in threads):
        r = httpx.get(open_srv.url + "/health", timeout=30)
        health.append(r.status_code)
        busy = max(busy, r.json()["running"])
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert not errors and sorted(results) == list(range(8))
    assert all(reason == "length" for _, reason in results.values())
    assert health and set(health) == {200} and busy >= 2  # answered while generations ran


def test_metrics_count_what_was_sent(open_srv):
    before = metrics(open_srv.url)
    client = open_srv.client()
    usages = []
    for i, n in enumerate((5, 9, 13)):
        r = client.chat.completions.create(model="tiny-step7", messages=[{"role": "user", "content": "hi " * (i + 1)}],
                                           temperature=0, max_tokens=n, extra_body={"ignore_eos": True})
        usages.append(r.usage)
    chunks = list(client.completions.create(model="tiny-step7", prompt="KING:", max_tokens=7, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    usages.append(chunks[-1].usage)
    after = metrics(open_srv.url)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("serve:request_success_total") == 4
    assert delta("serve:request_success_total", finished_reason="length") == 4
    assert delta("serve:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("serve:generation_tokens_total") == sum(u.completion_tokens for u in usages) == 5 + 9 + 13 + 7
    assert delta("serve:time_to_first_token_seconds_count") == 4
    assert delta("serve:e2e_request_latency_seconds_count") == 4
    assert delta("serve:inter_token_latency_seconds_count") == sum(u.completion_tokens - 1 for u in usages)
    assert metric(after, "serve:num_requests_running") == 0 and metric(after, "serve:num_requests_waiting") == 0
    assert delta("serve:iteration_batch_size_count") > 0


def test_request_log_records_each_request_without_secrets(open_srv):
    client = open_srv.client()
    r = client.chat.completions.create(model="tiny-step7", messages=[{"role": "user", "content": "log me"}],
                                       temperature=0, max_tokens=4)
    from serving.store import SQLiteStore
    store = SQLiteStore(str(open_srv.log_dir / "serve.db"))
    rec = store.served_chats()[r.id]
    assert store.request_status()[r.id] == "complete"
    assert rec["messages"] == [{"role": "user", "content": "log me"}] and rec["completion"] == \
        r.choices[0].message.content
    assert rec["model"] == "tiny-step7" and rec["key"].startswith("hmac:") and rec["finish_reason"] == "length"
    assert rec["usage"]["completion_tokens"] == 4 and rec["timings"]["e2e_s"] >= rec["timings"]["ttft_s"] > 0


def test_client_disconnect_aborts_its_row(open_srv):
    before = metrics(open_srv.url)
    body = {"model": "tiny-step7", "messages": MESSAGES, "max_tokens": 1000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", open_srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # the connection is closed after one chunk of a 1000-token generation
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = metrics(open_srv.url)
        aborted = metric(now, "serve:request_success_total", finished_reason="abort") - \
            metric(before, "serve:request_success_total", finished_reason="abort")
        if aborted == 1 and metric(now, "serve:num_requests_running") == 0:
            break
        time.sleep(0.1)
    assert aborted == 1 and metric(now, "serve:num_requests_running") == 0
    generated = metric(now, "serve:generation_tokens_total") - metric(before, "serve:generation_tokens_total")
    assert generated < 1000


# ----------------------------------------------------------------------------- keys, limits, safety

def test_wrong_or_missing_key_is_401_and_open_endpoints_stay_open(keyed_srv):
    for key in ("sk-wrong", "sk-test-o", KEYS[0] + "x"):
        with pytest.raises(openai.AuthenticationError) as e:
            keyed_srv.client(key).models.list()
        assert e.value.code == "invalid_api_key"
    r = httpx.get(keyed_srv.url + "/v1/models")
    assert r.status_code == 401
    assert httpx.get(keyed_srv.url + "/health").status_code == 200
    assert httpx.get(keyed_srv.url + "/metrics").status_code == 200
    assert [m.id for m in keyed_srv.client(KEYS[0]).models.list().data] == ["tiny-step7"]


def test_429_with_retry_after_once_the_bucket_is_empty(keyed_srv):
    client = keyed_srv.client("sk-test-rate")
    for _ in range(3):  # the burst: 3 requests per minute
        client.models.list()
    with pytest.raises(openai.RateLimitError) as e:
        client.models.list()
    assert e.value.code == "rate_limit_exceeded" and int(e.value.response.headers["retry-after"]) >= 1
    assert metric(metrics(keyed_srv.url), "serve:rate_limited_requests_total", reason="requests") == 1


def test_flagged_input_is_rejected_with_content_filter(keyed_srv):
    with pytest.raises(openai.BadRequestError) as e:
        keyed_srv.client("sk-test-in").chat.completions.create(
            model="tiny-step7", messages=[{"role": "user", "content": "you are a fucking idiot"}])
    assert e.value.code == "content_filter" and "harassment" in e.value.message
    assert metric(metrics(keyed_srv.url), "serve:safety_flags_total", category="harassment", stage="input") == 1


def test_flagged_output_stops_with_content_filter(keyed_srv):
    client = keyed_srv.client("sk-test-out")
    r = client.chat.completions.create(model="tiny-step7", messages=MESSAGES, temperature=0, max_tokens=40)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "content_filter"
    assert text and keyed_srv.free_text.startswith(text) and not re.search(rf"\b{keyed_srv.word}\b", text)
    assert re.search(rf"\b{keyed_srv.word}\b", keyed_srv.free_text[len(text):])
    chunks = list(client.chat.completions.create(model="tiny-step7", messages=MESSAGES, temperature=0,
                                                 max_tokens=40, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    snap = metrics(keyed_srv.url)
    assert metric(snap, "serve:safety_flags_total", stage="output") == 2
    assert metric(snap, "serve:request_success_total", finished_reason="content_filter") == 2


def test_a_key_that_keeps_tripping_the_filter_is_blocked(keyed_srv):
    client = keyed_srv.client("sk-test-abuse")
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny-step7", messages=[{"role": "user", "content": "shit"}])
    with pytest.raises(openai.RateLimitError) as e:  # blocked now, even for a clean request
        client.chat.completions.create(model="tiny-step7", messages=MESSAGES, max_tokens=2)
    assert e.value.code == "key_blocked" and int(e.value.response.headers["retry-after"]) > 60
    assert metric(metrics(keyed_srv.url), "serve:rate_limited_requests_total", reason="blocked") == 1


def test_503_when_running_and_waiting_are_full(keyed_srv):
    """Two rows and one waiting place: a fourth concurrent request is refused at once."""
    body = {"model": "tiny-step7", "messages": MESSAGES, "max_tokens": 1000, "stream": True, "ignore_eos": True}
    streams = []
    try:
        for key in KEYS[-4:-1]:
            s = httpx.stream("POST", keyed_srv.url + "/v1/chat/completions", json=body, timeout=60,
                             headers={"Authorization": f"Bearer {key}"})
            r = s.__enter__()
            streams.append(s)
            assert r.status_code == 200
        with pytest.raises(openai.InternalServerError) as e:
            keyed_srv.client(KEYS[-1]).chat.completions.create(model="tiny-step7", messages=MESSAGES, max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "server_overloaded"
    finally:
        for s in streams:
            s.__exit__(None, None, None)


def test_keys_never_appear_in_logs(keyed_srv):
    keyed_srv.client(KEYS[0]).models.list()  # at least one key's bucket is in the store
    logs = keyed_srv.output().encode() + b"".join(p.read_bytes() for p in keyed_srv.log_dir.iterdir())  # serve.db*
    assert b"hmac:" in logs  # keyed hashes of the identities are there
    assert not any(k.encode() in logs for k in KEYS)


# ----------------------------------------------------------------------------- feedback -> reward model

def test_feedback_becomes_preference_pairs_that_train_rm_trains_on(open_srv, ckpt, tmp_path):
    client = open_srv.client()
    prompt = [{"role": "user", "content": "Which play is the best?"}]
    answers = [client.chat.completions.create(model="tiny-step7", messages=prompt, temperature=1.0, seed=s,
                                              max_tokens=12) for s in (1, 2, 3, 4)]
    assert len({a.choices[0].message.content for a in answers}) == 4
    post = lambda body: httpx.post(open_srv.url + "/v1/feedback", json=body, timeout=30)  # noqa: E731
    ids = [a.id for a in answers]
    assert post({"ids": [ids[0], ids[1]], "preferred": ids[1]}).status_code == 200
    assert post({"id": ids[2], "rating": "up", "comment": "nice"}).status_code == 200
    assert post({"id": ids[3], "rating": "down"}).status_code == 200
    assert post({"id": ids[0], "rating": "down"}).status_code == 200
    bad = [post({"id": ids[0], "rating": "meh"}), post({"id": "chatcmpl-" + "0" * 32, "rating": "up"}),
           post({"ids": [ids[0], ids[0]], "preferred": ids[0]}), post({"ids": [ids[0], ids[1]], "preferred": "x"})]
    assert [r.status_code for r in bad] == [400, 404, 400, 400]
    snap = metrics(open_srv.url)
    assert metric(snap, "serve:feedback_total", rating="pairwise") == 1
    assert metric(snap, "serve:feedback_total", rating="down") == 2

    out = tmp_path / "feedback_prefs.jsonl"
    done = subprocess.run([sys.executable, "serve.py", "--log-dir", str(open_srv.log_dir), "--export-feedback",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in open(out)]
    text = {a.id: a.choices[0].message.content for a in answers}
    got = {(r["chosen"], r["rejected"], r["kind"]) for r in records}
    assert got == {(text[ids[1]], text[ids[0]], "feedback_pairwise"),
                   (text[ids[2]], text[ids[3]], "feedback_thumbs"), (text[ids[2]], text[ids[0]], "feedback_thumbs")}
    assert all(r["prompt"] == prompt for r in records)

    import train_rm
    rm = tmp_path / "rm"
    train_rm.main(["--init", ckpt, "--data", str(out), "--out", str(rm), "--max-steps", "3", "--batch-size", "2",
                   "--eval-every", "3", "--val-fraction", "0", "--device", "cpu", "--dtype", "float32"])
    rows = [json.loads(line) for line in open(rm / "metrics.jsonl")]
    assert max(r["step"] for r in rows) == 3 and os.path.exists(rm / "model.safetensors")


def test_export_without_feedback_and_a_missing_checkpoint_are_one_error_line(tmp_path, capsys):
    import serve
    for argv, start in ((["--log-dir", str(tmp_path), "--export-feedback", str(tmp_path / "out.jsonl")],
                         "error: no feedback"),
                        (["--ckpt", str(tmp_path / "nope"), "--log-dir", str(tmp_path / "logs")], "error: checkpoint")):
        with pytest.raises(SystemExit) as e:
            serve.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith(start) and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------- the chat page in a browser

def test_chat_page_streams_a_reply_and_records_a_thumbs_up(open_srv, tmp_path):
    from serve_helpers import chromium  # the compare flow: tests/test_chat_page.py
    browser = chromium(tmp_path / "profile")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    before = metric(metrics(open_srv.url), "serve:feedback_total", rating="up")
    try:
        browser.get(open_srv.url + "/")
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "model").text == "tiny-step7")
        for field, value in (("temperature", "0"), ("max_tokens", "20")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "input").send_keys("Which play is the best?")
        browser.find_element(By.ID, "send").click()
        done = WebDriverWait(browser, 60).until(
            lambda b: b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"))[0]
        reply = done.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent")
        expected = open_srv.client().chat.completions.create(
            model="tiny-step7", messages=[{"role": "user", "content": "Which play is the best?"}], temperature=0,
            max_tokens=20)
        assert reply and reply == expected.choices[0].message.content  # the streamed reply, rendered whole
        thumbs = done.find_elements(By.CSS_SELECTOR, ".meta button")
        assert [b.text for b in thumbs] == ["\u2713 Good", "\u2717 Bad"]  # text labels, symbols beside them
        done.find_element(By.CSS_SELECTOR, ".thumb-up").click()
        WebDriverWait(browser, 30).until(lambda b: "recorded up" in done.text)
    finally:
        browser.quit()
    assert metric(metrics(open_srv.url), "serve:feedback_total", rating="up") == before + 1
