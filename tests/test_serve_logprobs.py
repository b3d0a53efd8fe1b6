"""Log-probs over HTTP (issue #25): chat `logprobs`/`top_logprobs`, completions `logprobs`,
`echo`, `max_tokens: 0`, token-id and batched prompts, against a real serve.py process and
the official `openai` client. Every reported log-prob is checked against a direct forward
pass of the same checkpoint (log_softmax of `model(ids)` in float32)."""
from __future__ import annotations

import os

import pytest

from serve_helpers import ServerProcess, make_checkpoint

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "tiny-step7"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]
TOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(data_dirs, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("logprobs") / "tiny", os.path.join(data_dirs[0], "tokenizer.json"))


@pytest.fixture(scope="module")
def srv(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("lp")
    server = ServerProcess(["--ckpt", ckpt, "--log-dir", str(root / "logs")], root / "server.log").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def direct(ckpt):
    """(tokenizer, logprobs(ids) -> (T, V) float32 log_softmax of a direct forward pass)."""
    import torch

    import checkpoint
    from data.text.tokenizer import Tokenizer
    model, _ = checkpoint.load_model(ckpt)
    model.eval()
    tok = Tokenizer.load(os.path.join(ckpt, "tokenizer.json"))

    def logprobs(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).float().log_softmax(-1)[0]
    return tok, logprobs


def greedy_ids(ckpt, prompt: list[int], n: int) -> list[int]:
    import checkpoint
    from data.text.tokenizer import Tokenizer
    model, _ = checkpoint.load_model(ckpt)
    tok = Tokenizer.load(os.path.join(ckpt, "tokenizer.json"))
    out = model.eval().generate([prompt], n, pad_id=tok.pad_id, temperature=0,
                                stop_tokens=list(range(len(tok.token_bytes), tok.vocab_size)))[0]
    return list(prompt) + list(out)  # generate returns the new tokens (a stop token included)


def max_diff(ids: list[int], reported: list, first: int, lp) -> float:
    """Largest |reported[i] - log p(ids[first + i] | ids[:first + i])| under the direct pass."""
    table = lp(ids)
    worst = 0.0
    for i, value in enumerate(reported):
        pos = first + i
        worst = max(worst, abs(value - float(table[pos - 1, ids[pos]])))
    return worst


def check_completion_logprobs(lp: dict, text: str, k: int) -> None:
    """The OpenAI shape: parallel lists, offsets into the text, the token in its own top dict."""
    n = len(lp["tokens"])
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    for tok, value, top, off in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"]):
        if value is None:
            assert top is None
            continue
        assert tok in top and top[tok] == value and k <= len(top) <= k + 1
        if not tok.startswith("bytes:") and not tok.startswith("<|"):
            assert text[off:off + len(tok)] == tok


def test_echo_scores_a_string_prompt_with_max_tokens_zero(srv, direct):
    tok, lp = direct
    prompt = "ROMEO: But soft, what light"
    r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 0,
                                                       "echo": True, "logprobs": 2}, timeout=60).json()
    choice = r["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 0
    ids = [tok.eot_id] + tok.encode(prompt)  # scored after the document-start token, which is not echoed
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == prompt and len(logprobs["tokens"]) == len(ids) - 1
    check_completion_logprobs(logprobs, choice["text"], 2)
    assert max_diff(ids, logprobs["token_logprobs"], 1, lp) < TOL


@pytest.mark.parametrize("stream", [False, True])
def test_token_id_prompt_echo_and_generated_tokens_match_a_direct_forward(srv, direct, ckpt, stream):
    tok, lp = direct
    prompt = tok.encode("JULIET: O Romeo, Romeo!")
    client = srv.client()
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True, logprobs=3)
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].text for c in chunks)
        merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for c in chunks:
            if c.choices[0].logprobs is not None:
                for key in merged:
                    merged[key] += getattr(c.choices[0].logprobs, key)
        logprobs = merged
    else:
        full = client.completions.create(**kwargs)
        text, logprobs = full.choices[0].text, full.choices[0].logprobs.model_dump()
    ids = greedy_ids(ckpt, prompt, 8)
    assert text.startswith(tok.decode(prompt))
    assert len(logprobs["tokens"]) == len(ids) and logprobs["token_logprobs"][0] is None
    check_completion_logprobs(logprobs, text, 3)
    diff = max_diff(ids, logprobs["token_logprobs"][1:], 1, lp)
    print(f"max |logprob - direct| (completions, stream={stream}): {diff:.2e}")
    assert diff < TOL
    for top in logprobs["top_logprobs"][len(prompt):]:  # greedy: every generated token is its position's best
        assert max(top.values()) == top[logprobs["tokens"][logprobs["top_logprobs"].index(top)]]


def test_a_list_of_prompts_gets_one_choice_each(srv, direct):
    tok, lp = direct
    prompts = [tok.encode("To be, or not"), "Now is the winter", [tok.eot_id] + tok.encode("Friends, Romans")]
    r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": prompts, "max_tokens": 1,
                                                       "temperature": 0, "echo": True, "logprobs": 1},
                   timeout=60).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    for p, choice in zip(prompts, r["choices"]):
        ids = p if isinstance(p, list) else [tok.eot_id] + tok.encode(p)
        skip = 0 if isinstance(p, list) else 1
        values = choice["logprobs"]["token_logprobs"]
        assert len(values) == len(ids) - skip + 1  # lm-eval's [ctxlen:-1] drops the one generated token
        assert max_diff(ids, values[1 - skip:-1], 1, lp) < TOL
    assert r["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_and_top_logprobs(srv, direct, ckpt, stream):
    tok, lp = direct
    from serving.text import chat_prompt_ids
    prompt = chat_prompt_ids(tok, MESSAGES)
    client = srv.client()
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    if stream:
        content = [e for c in client.chat.completions.create(stream=True, **kwargs)
                   if c.choices and c.choices[0].logprobs is not None for e in c.choices[0].logprobs.content]
    else:
        content = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    ids = greedy_ids(ckpt, prompt, 10)
    generated = ids[len(prompt):]
    assert len(content) == len(generated)
    for entry, t in zip(content, generated):
        assert bytes(entry.bytes) == tok.id_to_piece(t)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token  # greedy
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    diff = max_diff(ids, [e.logprob for e in content], len(prompt), lp)
    print(f"max |logprob - direct| (chat, stream={stream}): {diff:.2e}")
    assert diff < TOL


def test_sampled_tokens_report_the_models_distribution_not_the_tempered_one(srv, direct):
    tok, lp = direct
    from serving.text import chat_prompt_ids
    prompt = chat_prompt_ids(tok, MESSAGES)
    r = srv.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=1.5,
                                             top_p=0.9, seed=3, logprobs=True, top_logprobs=0)
    content = r.choices[0].logprobs.content
    assert content and all(e.top_logprobs == [] for e in content)
    by_bytes = {b: i for i, b in enumerate(tok.token_bytes)} | {k.encode(): v for k, v in tok.special_tokens.items()}
    ids = prompt + [by_bytes[bytes(e.bytes)] for e in content]  # a token's bytes name it exactly
    assert max_diff(ids, [e.logprob for e in content], len(prompt), lp) < TOL


@pytest.mark.parametrize("body, param", [
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "best_of": 2}, "best_of"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": ["a", "b"], "stream": True}, "stream"),
    ({"prompt": [1, -1]}, "prompt"),
    ({"prompt": [1, 10 ** 9]}, "prompt"),
    ({"prompt": [[1], 2]}, "prompt"),
    ({"prompt": []}, "prompt"),
])
def test_bad_logprob_requests_are_clean_400s(srv, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(srv.url + path, json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_no_logprobs_means_null_logprobs(srv):
    r = srv.client().completions.create(model=MODEL, prompt="ROMEO:", max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None
    r = srv.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None


def test_tokenizer_routes_for_lm_evals_remote_tokenizer(srv, direct):
    tok, _ = direct
    info = httpx.get(srv.url + "/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == "<|endoftext|>"
    ids = httpx.post(srv.url + "/tokenize", json={"prompt": "To be", "add_special_tokens": False}, timeout=10).json()
    assert ids["tokens"] == tok.encode("To be") and ids["count"] == len(ids["tokens"])
    with_bos = httpx.post(srv.url + "/tokenize", json={"prompt": "To be"}, timeout=10).json()["tokens"]
    assert with_bos == [tok.eot_id] + ids["tokens"]
    assert httpx.post(srv.url + "/detokenize", json={"tokens": ids["tokens"]}, timeout=10).json() == {"prompt": "To be"}
    assert httpx.post(srv.url + "/detokenize", json={"tokens": [-1]}, timeout=10).status_code == 400


def test_streamed_echo_with_max_tokens_zero_sends_the_prompt_then_stops(srv, direct):
    tok, lp = direct
    prompt = tok.encode("Friends, Romans, countrymen")
    chunks = list(srv.client().completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                                  stream=True))
    assert "".join(c.choices[0].text for c in chunks) == tok.decode(prompt)
    assert chunks[-1].choices[0].finish_reason == "length"
    values = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert len(values) == len(prompt) and values[0] is None
    assert max_diff(prompt, values[1:], 1, lp) < TOL


def test_a_filtered_response_reports_no_logprobs_for_the_text_it_withheld(ckpt, direct, tmp_path):
    """The output filter stops before a blocklisted word: no token of it shows in logprobs."""
    import re
    tok, _ = direct
    prompt = tok.encode("ROMEO:")
    text = tok.decode([t for t in greedy_ids(ckpt, prompt, 40)[len(prompt):] if t < len(tok.token_bytes)])
    words = re.findall(r"\b[a-zA-Z]{3,}\b", text)
    if not words:
        pytest.skip(f"the model wrote no plain word: {text!r}")
    word = words[len(words) // 2]
    (tmp_path / "blocklist.txt").write_text(word + "\n")
    server = ServerProcess(["--ckpt", ckpt, "--log-dir", str(tmp_path / "logs"), "--blocklist",
                            str(tmp_path / "blocklist.txt")], tmp_path / "server.log").wait_ready()
    try:
        for stream in (False, True):
            kwargs = dict(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, logprobs=2)
            if stream:
                chunks = list(server.client().completions.create(stream=True, **kwargs))
                sent = "".join(c.choices[0].text for c in chunks)
                tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
                reason = chunks[-1].choices[0].finish_reason
            else:
                r = server.client().completions.create(**kwargs)
                sent, tokens, reason = r.choices[0].text, r.choices[0].logprobs.tokens, r.choices[0].finish_reason
            assert reason == "content_filter" and word not in sent
            shown = b"".join(bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
                             for t in tokens).decode("utf-8", "replace")
            assert sent.startswith(shown) and word not in shown, repr((tokens, sent, shown, word))
    finally:
        server.stop()
