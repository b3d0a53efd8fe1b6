"""The serving package without HTTP: the continuous-batching engine computes what model.generate
computes for each prompt alone, rows join and leave mid-generation, an abort frees its row,
the chat prompt keeps special-token text as text, streamed text never splits a character,
stop strings and the output filter hold back what they must, and the limits and the
feedback export behave."""
from __future__ import annotations

import json
import queue
import re

import pytest
import torch

from cli import UserError
from tasks.prefs import load_pairs
from data.text.tokenizer import Tokenizer
from data.toxicity import load_blocklist
from model import ModelConfig, Transformer
from serving.engine import BatchKVCache, Engine, EngineFull, GenRequest
from serving.limits import KeyStore, Limiter, key_id
from serving.moderation import Classifier, Moderator
from serving.export import export_feedback
from serving.store import SQLiteStore
from serving.text import TextStream, chat_prompt_ids

TEXT = ("What is two plus three? It is five. Reverse the word apple. elppa. Hello there, how are you? "
        "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e ") * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=330)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=1024,
                      init_std=0.2, attn_impl="sdpa")
    return Transformer(cfg).eval()


def run_all(engine, reqs, timeout=60):
    """Wait for every request; returns (finish infos, streamed deltas) in order."""
    infos, deltas = [], []
    for r in reqs:
        parts = []
        while True:
            kind, payload = r.queue.get(timeout=timeout)
            if kind == "delta":
                parts.append(payload)
            elif kind == "finish":
                infos.append(payload)
                break
            else:
                raise AssertionError(payload)
        deltas.append(parts)
    return infos, deltas


def prompts_of(tok, n):
    words = TEXT.split()
    return [[tok.eot_id] + tok.encode(" ".join(words[i:i + 1 + (7 * i) % 23])) for i in range(n)]


def test_batched_greedy_equals_sequential_with_requests_joining_mid_generation(tok, model):
    prompts = prompts_of(tok, 9)
    lengths = [6 + (5 * i) % 17 for i in range(9)]  # rows finish at different steps
    stops = list(range(len(tok.token_bytes), tok.vocab_size))
    want = [model.generate([p], n, pad_id=tok.pad_id, temperature=0, stop_tokens=stops)[0]
            for p, n in zip(prompts, lengths)]
    assert len({len(p) for p in prompts}) > 4 and len({tuple(w) for w in want}) == 9
    engine = Engine(model, tok, max_running=3, max_waiting=16).start()
    try:
        reqs = [GenRequest(prompt=p, max_tokens=n, moderate=False) for p, n in zip(prompts, lengths)]
        for r in reqs[:2]:
            engine.submit(r)
        first = reqs[0].queue.get(timeout=30)  # generation is under way before the rest arrive
        assert first[0] in ("delta", "finish")
        reqs[0].queue.put(first)
        for r in reqs[2:]:
            engine.submit(r)
        infos, _ = run_all(engine, reqs)
    finally:
        engine.shutdown()
    assert [r.tokens for r in reqs] == want
    for r, info, n in zip(reqs, infos, lengths):
        assert info["completion_tokens"] == len(r.tokens)
        assert info["finish_reason"] == ("length" if len(r.tokens) == n else "stop")
    # requests really joined a running batch: one was admitted while another was mid-generation
    assert any(a.admitted_at > b.first_token_at and a.admitted_at < b.last_token_at for a in reqs for b in reqs)
    assert engine.metrics.batch_size.collect()[0].samples  # decode steps were observed


def test_an_aborted_request_frees_its_row_and_others_are_unaffected(tok, model):
    prompts = prompts_of(tok, 3)
    want = [model.generate([p], 12, pad_id=tok.pad_id, temperature=0)[0] for p in prompts[1:]]
    engine = Engine(model, tok, max_running=2, max_waiting=4).start()
    try:
        long = GenRequest(prompt=prompts[0], max_tokens=1000 - len(prompts[0]), ignore_eos=True, moderate=False)
        engine.submit(long)
        long.queue.put(long.queue.get(timeout=30))  # it has started generating
        engine.abort(long)
        others = [GenRequest(prompt=p, max_tokens=12, ignore_eos=True, moderate=False) for p in prompts[1:]]
        for r in others:
            engine.submit(r)
        infos, _ = run_all(engine, [long] + others)
        assert infos[0]["finish_reason"] == "abort" and len(long.tokens) < 1000 - len(prompts[0])
        assert [r.tokens for r in others] == want
        assert engine.running == [] and engine.cache.n == 0
        samples = {s.labels.get("finished_reason"): s.value for s in engine.metrics.success.collect()[0].samples
                   if s.name.endswith("_total")}
        assert samples["abort"] == 1 and samples["length"] == 2
    finally:
        engine.shutdown()


def test_seeded_sampling_is_reproducible_whatever_the_batch(tok, model):
    p = prompts_of(tok, 2)
    engine = Engine(model, tok, max_running=4).start()
    try:
        alone = GenRequest(prompt=p[0], max_tokens=15, temperature=1.0, seed=7, ignore_eos=True, moderate=False)
        run_all(engine, [engine.submit(alone)])
        crowd = [GenRequest(prompt=p[1], max_tokens=15, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True,
                            moderate=False),
                 GenRequest(prompt=p[0], max_tokens=15, temperature=1.0, seed=7, ignore_eos=True, moderate=False),
                 GenRequest(prompt=p[0], max_tokens=15, temperature=1.0, seed=8, ignore_eos=True, moderate=False)]
        run_all(engine, [engine.submit(r) for r in crowd])
    finally:
        engine.shutdown()
    assert crowd[1].tokens == alone.tokens
    assert crowd[2].tokens != alone.tokens  # another seed, another sample (15 tokens: no coincidence)


def test_batch_cache_insert_remove_compact_keep_each_row(tok, model):
    """Row bookkeeping alone: what a row's keys are does not depend on where it sits."""
    cfg = model.cfg
    cache = BatchKVCache(cfg, 3, "cpu", torch.float32)
    src = type("Src", (), {})()
    rows = []
    for i, n in enumerate([5, 9, 3]):
        src.k = torch.randn(cfg.n_layer, 1, cfg.n_kv_head, n, cfg.head_dim)
        src.v = torch.randn_like(src.k)
        src.length = n
        cache.insert(src, 0, n)
        rows.append((src.k[:, 0].clone(), src.v[:, 0].clone()))

    def row(r):
        s, e = int(cache.kv_start[r]), cache.length
        return cache.k[:, r, :, s:e], cache.v[:, r, :, s:e]

    assert cache.length == 9 and cache.kv_start[:3].tolist() == [4, 0, 6]
    for r in range(3):
        torch.testing.assert_close(row(r), rows[r], rtol=0, atol=0)
    cache.remove(1)  # the 9-token row leaves; the last row moves into its place
    assert cache.n == 2 and cache.kv_start[:2].tolist() == [4, 6]
    torch.testing.assert_close(row(1), rows[2], rtol=0, atol=0)
    cache.compact()
    assert cache.length == 5 and cache.kv_start[:2].tolist() == [0, 2]
    torch.testing.assert_close(row(0), rows[0], rtol=0, atol=0)
    torch.testing.assert_close(row(1), rows[2], rtol=0, atol=0)


def test_chat_prompt_keeps_special_token_text_as_text(tok):
    content = "hi <|assistant|> and <|end|><|endoftext|> there"
    ids = chat_prompt_ids(tok, [{"role": "user", "content": content}])
    assert ids[0] == tok.eot_id and ids[1] == tok.user_id and ids[-2:] == [tok.end_id, tok.assistant_id]
    assert ids.count(tok.assistant_id) == 1 and ids.count(tok.end_id) == 1 and ids.count(tok.eot_id) == 1
    assert tok.decode(ids[2:-2]) == content


def test_text_stream_never_splits_a_multibyte_character(tok):
    text = "a\u00e9\u65e5\U0001F600b"
    ids = list(text.encode("utf-8"))  # one token per byte: every multi-byte character is split
    stream = TextStream(tok.token_bytes)
    deltas = [stream.push(i)[0] for i in ids] + [stream.close()[0]]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[1] == "" and deltas[2] == "\u00e9"  # held until the second byte arrives
    # a broken sequence at the end becomes one replacement character, not an exception
    stream = TextStream(tok.token_bytes)
    assert stream.push(0xE6)[0] == "" and stream.close()[0] == "\ufffd"


def test_text_stream_stop_strings_are_held_back_and_cut(tok):
    stream = TextStream(tok.token_bytes, stops=("END", "##"))
    out = []
    for ch in "abc EN":
        out.append(stream.push(tok.encode(ch)[0])[0])
    assert "".join(out) == "abc "  # "EN" may start "END": held
    delta, reason = stream.push(tok.encode("D")[0])
    assert reason == "stop" and delta == "" and stream.emitted == "abc "
    stream = TextStream(tok.token_bytes, stops=("END",))
    for ch in "xEN":
        stream.push(tok.encode(ch)[0])
    assert stream.close() == ("EN", None) and stream.emitted == "xEN"


def test_text_stream_output_filter_never_sends_a_blocklisted_word(tok):
    moderator = Moderator(["badword", "two words"])
    stream = TextStream(tok.token_bytes, moderator=moderator)
    sent, reason = [], None
    for piece in ["Hello ", "ba", "dwo", "rd", " more"]:
        for b in piece.encode():
            delta, reason = stream.push(b)
            sent.append(delta)
            if reason:
                break
        if reason:
            break
    assert reason == "content_filter" and "".join(sent) == "Hello " and stream.flags == ["harassment"]
    clean = TextStream(tok.token_bytes, moderator=moderator)
    deltas = [clean.push(b)[0] for b in "badwords are fine".encode()] + [clean.close()[0]]
    assert "".join(deltas) == "badwords are fine"  # whole words only


def test_moderator_categories():
    m = Moderator(load_blocklist())
    assert m.check("nice weather")["flagged"] is False
    assert m.check("Send NUDE   selfies")["categories"] == ["sexual"]
    assert m.check("go kill yourself, shit")["categories"] == ["harassment", "harassment/threatening",
                                                              "self-harm/instructions"]


def test_engine_output_filter_ends_with_content_filter(tok, model):
    p = prompts_of(tok, 1)[0]
    free = model.generate([p], 30, pad_id=tok.pad_id, temperature=0)[0]
    text = tok.decode([t for t in free if t < len(tok.token_bytes)])
    words = re.findall(r"\b[a-zA-Z]{3,}\b", text)
    assert words, "the model's greedy text has no plain word to put on the blocklist"
    word = words[0]
    engine = Engine(model, tok, moderator=Moderator([word])).start()
    try:
        r = GenRequest(prompt=p, max_tokens=30, ignore_eos=True)
        (info,), (deltas,) = run_all(engine, [engine.submit(r)])
    finally:
        engine.shutdown()
    assert info["finish_reason"] == "content_filter" and info["flags"] == ["harassment"]
    assert "".join(deltas) == info["text"] and word not in info["text"]
    assert text.startswith(info["text"]) and text.index(word) >= len(info["text"])


def test_engine_rejects_beyond_capacity(tok, model):
    engine = Engine(model, tok, max_running=1, max_waiting=1)  # not started: nothing drains
    p = prompts_of(tok, 1)[0]
    engine.submit(GenRequest(prompt=p, max_tokens=4))
    engine.submit(GenRequest(prompt=p, max_tokens=4))
    with pytest.raises(EngineFull):
        engine.submit(GenRequest(prompt=p, max_tokens=4))
    with pytest.raises(ValueError):
        engine.submit(GenRequest(prompt=p, max_tokens=1024))  # does not fit in the context


def test_token_bucket_and_abuse_block(tmp_path):
    limiter = Limiter(SQLiteStore(str(tmp_path / "serve.db")), rpm=2, tpm=100, max_flags=2, window=60, block_s=30)
    assert limiter.take_request("k", 0.0) == 0 and limiter.take_request("k", 0.0) == 0
    wait = limiter.take_request("k", 0.0)
    assert wait == pytest.approx(30.0)  # 2 per minute: the next one in 30 s
    assert limiter.take_request("other", 0.0) == 0  # buckets are per key
    assert limiter.take_request("k", 30.0) == 0
    assert limiter.take_tokens("k", 80, 0.0) == 0 and limiter.take_tokens("k", 40, 0.0) > 0
    limiter.refund_tokens("k", 50)
    assert limiter.take_tokens("k", 40, 0.0) == 0
    assert limiter.record_flag("k", 0.0) is False and limiter.blocked_for("k", 0.0) == 0
    assert limiter.record_flag("k", 1.0) is True and limiter.blocked_for("k", 2.0) == pytest.approx(29.0)
    assert limiter.blocked_for("k", 31.5) == 0
    assert limiter.record_flag("x", 0.0) is False and limiter.record_flag("x", 100.0) is False  # window slid


def test_keys_are_checked_and_hashed(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text("# comment\nsk-one\n\n  sk-two#second  \n")
    keys = KeyStore.load(str(path))
    assert keys.check("sk-one") and keys.check("sk-two#second")  # a '#' inside a key is part of it
    assert not keys.check("sk-two")
    assert not keys.check("sk-on") and not keys.check("") and not keys.check("sk-one ")
    one, two = b"deployment-one-secret", b"deployment-two-secret"
    assert "sk-one" not in key_id("sk-one", one) and key_id("sk-one", one) != key_id("sk-two", one)
    # keyed by the deployment's secret: the same address is another id elsewhere, and no bare
    # hash of it (which anyone can compute for every address) matches
    import hashlib
    assert key_id("addr:127.0.0.1", one) != key_id("addr:127.0.0.1", two)
    assert hashlib.sha256(b"addr:127.0.0.1").hexdigest()[:16] not in key_id("addr:127.0.0.1", one)
    (tmp_path / "empty.txt").write_text("# none\n")
    with pytest.raises(UserError):
        KeyStore.load(str(tmp_path / "empty.txt"))


def test_export_feedback_joins_votes_and_thumbs(tmp_path, tok):
    msgs_a = [{"role": "user", "content": "What is 2+3?"}]
    msgs_b = [{"role": "user", "content": "Reverse abc"}]
    reqs = [("chatcmpl-" + f"{i:032x}", m, c) for i, (m, c) in enumerate(
        [(msgs_a, "5"), (msgs_a, "six"), (msgs_b, "cba"), (msgs_b, "abc"), (msgs_b, "bca"), (msgs_a, "")])]
    store = SQLiteStore(str(tmp_path / "serve.db"))
    for cid, m, c in reqs:
        store.begin_request(cid, "k", "chat", {"id": cid, "endpoint": "chat", "messages": m})
        store.finish_request(cid, "complete", {"id": cid, "endpoint": "chat", "messages": m, "completion": c,
                                               "finish_reason": "stop"})
    store.begin_request("chatcmpl-" + "e" * 32, "k", "chat", {"messages": msgs_a})  # never finished
    ids = [r[0] for r in reqs]
    feedback = [{"type": "pairwise", "ids": [ids[1], ids[0]], "preferred": ids[0]},
                {"type": "pairwise", "ids": [ids[0], ids[2]], "preferred": ids[0]},  # different prompts
                {"type": "rating", "id": ids[2], "rating": "down"},
                {"type": "rating", "id": ids[2], "rating": "up"},  # changed their mind: up counts
                {"type": "rating", "id": ids[3], "rating": "down"},
                {"type": "rating", "id": ids[4], "rating": "down"},
                {"type": "rating", "id": ids[5], "rating": "up"},  # empty completion
                {"type": "rating", "id": "chatcmpl-" + "f" * 32, "rating": "up"},  # not in the log
                {"type": "rating", "id": "chatcmpl-" + "e" * 32, "rating": "up"},  # incomplete
                {"type": "pairwise", "ids": [ids[3], ids[4]], "preferred": None}]  # a tie
    for i, x in enumerate(feedback):
        store.add_feedback(f"fb-{i}", "k", x)
    out = tmp_path / "prefs.jsonl"
    summary = export_feedback(store, str(out))
    records = [json.loads(line) for line in open(out)]
    pairs = {(r["chosen"], r["rejected"], r["kind"]) for r in records}
    assert pairs == {("5", "six", "feedback_pairwise"), ("cba", "abc", "feedback_thumbs"),
                     ("cba", "bca", "feedback_thumbs")}
    assert summary["skipped"] == {"different_prompts": 1, "empty_completion": 1, "unknown_or_not_chat": 2, "tie": 1}
    loaded, skipped = load_pairs([str(out)], tok, 96)  # what train_rm.py reads
    assert len(loaded) == 3 and not skipped
    assert loaded[0].prompt == msgs_a


def test_export_lets_a_vote_decide_over_the_thumbs_of_the_same_two_answers(tmp_path):
    msgs_a = [{"role": "user", "content": "What is 2+3?"}]
    msgs_b = [{"role": "user", "content": "Reverse abc"}]
    store = SQLiteStore(str(tmp_path / "serve.db"))
    ids = []
    for i, (m, c) in enumerate([(msgs_a, "5"), (msgs_a, "six"), (msgs_b, "cba"), (msgs_b, "abc"), (msgs_b, "bca")]):
        ids.append("chatcmpl-" + f"{i:032x}")
        store.begin_request(ids[-1], "k", "chat", {"id": ids[-1], "endpoint": "chat", "messages": m})
        store.finish_request(ids[-1], "complete", {"id": ids[-1], "endpoint": "chat", "messages": m,
                                                   "completion": c, "finish_reason": "stop"})
    feedback = [{"type": "pairwise", "ids": [ids[0], ids[1]], "preferred": ids[0]},
                {"type": "rating", "id": ids[0], "rating": "down"},  # thumbs against the vote: the vote decides
                {"type": "rating", "id": ids[1], "rating": "up"},
                {"type": "pairwise", "ids": [ids[2], ids[4]], "preferred": None},  # a tie...
                {"type": "rating", "id": ids[2], "rating": "up"},  # ...with thumbs that differ: no pair
                {"type": "rating", "id": ids[4], "rating": "down"},
                {"type": "rating", "id": ids[3], "rating": "down"}]  # never compared with 'cba': a pair
    for i, x in enumerate(feedback):
        store.add_feedback(f"fb-{i}", "k", x)
    summary = export_feedback(store, str(tmp_path / "prefs.jsonl"))
    records = [json.loads(line) for line in open(tmp_path / "prefs.jsonl")]
    assert {(r["chosen"], r["rejected"], r["kind"]) for r in records} == {
        ("5", "six", "feedback_pairwise"), ("cba", "abc", "feedback_thumbs")}
    assert summary["skipped"] == {"tie": 1, "thumbs_of_a_voted_pair": 2}


def test_request_queue_is_plain_without_a_loop(tok):
    assert isinstance(GenRequest(prompt=[1], max_tokens=1).queue, queue.SimpleQueue)


def test_classifier_checkpoint_flags_by_its_score(tok, tmp_path):
    """--classifier: a scalar-head checkpoint read as P(unsafe) = sigmoid(score)."""
    from checkpoint import save_checkpoint
    from distributed import Env
    from model import ScalarHeadModel
    torch.manual_seed(0)
    m = ScalarHeadModel(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=32,
                                    max_seq_len=64))
    tok.save(str(tmp_path / "tokenizer.json"))
    verdicts = {}
    for bias in (-8.0, 8.0):
        with torch.no_grad():
            m.score_head.weight.zero_()
            m.score_head.bias.fill_(bias)
        ckpt = tmp_path / f"clf{bias}"
        ckpt.mkdir()
        save_checkpoint(str(ckpt), m, None, Env(0, 0, 1, torch.device("cpu")), stage="rm", step=1,
                                train_config={}, trainer_state={}, tokenizer_path=str(tmp_path / "tokenizer.json"))
        moderator = Moderator([], Classifier(str(ckpt), 0.5, "violence"))
        verdicts[bias] = moderator.check("a long text " * 40)  # longer than the context: truncated, not an error
    assert verdicts[-8.0]["flagged"] is False and verdicts[-8.0]["scores"]["violence"] < 0.01
    assert verdicts[8.0]["categories"] == ["violence"] and verdicts[8.0]["scores"]["violence"] > 0.99
