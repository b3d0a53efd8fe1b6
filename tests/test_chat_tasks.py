"""Chat format and the verifiable task suite: encode_chat masks exactly the assistant's
tokens, every JSONL adapter yields the same conversation, bad records are skipped with
the right reason, truncation keeps what is learnable, SFT loss ignores prompt targets,
and tasks.suite builds deterministic, held-out, correctly graded tasks."""
from __future__ import annotations

import json
import os
import random
import re
import string
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import model  # noqa: E402
from data import loader  # noqa: E402
from data.text import chat  # noqa: E402
from tasks import suite as tasks  # noqa: E402
from data.text.chat import ChatExample, RecordError, encode_chat, load_chat_jsonl, prompt_messages, to_messages, truncate  # noqa: E402
from data.text.tokenizer import Tokenizer  # noqa: E402

TRAIN_TEXT = [
    "What is 2+3? The answer is 5. Compute 12 * 7 = 84, and 99 - 17 = 82.",
    "Reverse the word 'apple'. Write 'garden' backwards: nedrag. Sort these numbers: 3, 9, 1.",
    "Hello there! How are you? I am fine, thank you. Good night, and see you soon.",
    "The quick brown fox jumps over the lazy dog; the dog sleeps (quietly) in the sun.",
    "Count the letter 'a' in 'banana': 3. Which is larger, 417 or 98? 417.",
    "Once upon a time, in 1999, there were 42 rabbits, 7 turtles and 1000 candles.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(TRAIN_TEXT, vocab_size=400)


# ----------------------------------------------------------------------------- helpers

def role_id(tok, role):
    return {"system": tok.system_id, "user": tok.user_id, "assistant": tok.assistant_id}[role]


def expected_encoding(tok, messages):
    """Independent construction of the documented layout."""
    ids, mask = [tok.eot_id], [0]
    for m in messages:
        content = tok.encode(m["content"])
        a = int(m["role"] == "assistant")
        ids += [role_id(tok, m["role"])] + content + [tok.end_id]
        mask += [0] + [a] * len(content) + [a]
    return ids, mask


def check_layout(tok, messages, ids, mask):
    """Walk the ids turn by turn and check every token's mask value."""
    assert len(ids) == len(mask)
    assert ids[0] == tok.eot_id and mask[0] == 0
    assert set(mask) <= {0, 1}
    pos = 1
    for m in messages:
        content = tok.encode(m["content"])
        assert content, "test messages must have non-empty content"
        learn = 1 if m["role"] == "assistant" else 0
        assert ids[pos] == role_id(tok, m["role"]) and mask[pos] == 0, "role token is never learned"
        seg = ids[pos + 1:pos + 1 + len(content)]
        assert seg == content
        assert tok.decode(seg) == m["content"]
        assert mask[pos + 1:pos + 1 + len(content)] == [learn] * len(content)
        end = pos + 1 + len(content)
        assert ids[end] == tok.end_id and mask[end] == learn
        pos = end + 1
    assert pos == len(ids)
    n_learn = sum(len(tok.encode(m["content"])) + 1 for m in messages if m["role"] == "assistant")
    assert sum(mask) == n_learn
    # every learned token is assistant content or <|end|>: never a role token or eot
    specials_learned = {i for i, k in zip(ids, mask) if k} & {tok.eot_id, tok.user_id, tok.system_id,
                                                               tok.assistant_id, tok.pad_id}
    assert not specials_learned


U = {"role": "user", "content": "What is 2+3?"}
A = {"role": "assistant", "content": "5"}
U2 = {"role": "user", "content": "And 12 * 7?"}
A2 = {"role": "assistant", "content": "The answer is 84."}
S = {"role": "system", "content": "You are a helpful assistant."}


# ----------------------------------------------------------------------------- encode_chat

@pytest.mark.parametrize("messages", [
    [U, A],
    [U, A, U2, A2],
    [S, U, A],
    [S, U, A, U2, A2],
], ids=["single", "multi", "system", "system_multi"])
def test_encode_chat_layout_and_mask(tok, messages):
    ids, mask = encode_chat(tok, messages)
    check_layout(tok, messages, ids, mask)
    assert (ids, mask) == expected_encoding(tok, messages)


def test_encode_chat_single_turn_explicit(tok):
    ids, mask = encode_chat(tok, [U, A])
    q, a = tok.encode(U["content"]), tok.encode(A["content"])
    assert ids == [tok.eot_id, tok.user_id, *q, tok.end_id, tok.assistant_id, *a, tok.end_id]
    assert mask == [0, 0] + [0] * len(q) + [0, 0] + [1] * len(a) + [1]


def test_encode_chat_generation_prompt(tok):
    ids, mask = encode_chat(tok, [S, U], add_generation_prompt=True)
    assert ids[-1] == tok.assistant_id and mask[-1] == 0
    assert sum(mask) == 0
    base_ids, base_mask = encode_chat(tok, [S, U])
    assert ids[:-1] == base_ids and mask[:-1] == base_mask
    assert chat.encode_prompt(tok, [S, U]) == ids
    # a multi-turn prompt keeps its earlier assistant turns learned-masked but still ends in <|assistant|>
    ids2, mask2 = encode_chat(tok, [U, A, U2], add_generation_prompt=True)
    assert ids2[-1] == tok.assistant_id and mask2[-1] == 0
    assert ids2[-2] == tok.end_id and mask2[-2] == 0


ADAPTER_CASES = [
    ("alpaca_input", {"instruction": "Sort these numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
     [{"role": "user", "content": "Sort these numbers.\n\n3, 1, 2"}, {"role": "assistant", "content": "1, 2, 3"}]),
    ("alpaca_no_input", {"instruction": "Say hello.", "output": "Hello there!"},
     [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}]),
    ("alpaca_blank_input", {"instruction": "Say hello.", "input": "  ", "output": "Hello there!"},
     [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}]),
    ("prompt_str", {"prompt": "What is 2+3?", "completion": "5"}, [U, A]),
    ("prompt_list", {"prompt": [S, U], "completion": "5"}, [S, U, A]),
    ("messages", {"messages": [S, U, A, U2, A2]}, [S, U, A, U2, A2]),
    ("sharegpt", {"conversations": [{"from": "system", "value": S["content"]},
                                    {"from": "human", "value": U["content"]},
                                    {"from": "gpt", "value": A["content"]},
                                    {"from": "human", "value": U2["content"]},
                                    {"from": "gpt", "value": A2["content"]}]},
     [S, U, A, U2, A2]),
]


@pytest.mark.parametrize("rec,expected", [(r, e) for _, r, e in ADAPTER_CASES], ids=[n for n, _, _ in ADAPTER_CASES])
def test_adapters_to_messages_and_mask(tok, rec, expected):
    messages = to_messages(rec)
    assert messages == expected
    ids, mask = encode_chat(tok, messages)
    check_layout(tok, expected, ids, mask)


# ----------------------------------------------------------------------------- loss mask in training

def test_prompt_targets_do_not_count_in_sft_loss(tok):
    torch.manual_seed(0)
    cfg = model.ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_kv_head=1, d_model=32,
                            max_seq_len=128)
    net = model.Transformer(cfg).eval()
    messages = [S, U, A, U2, A2]
    ids, mask = encode_chat(tok, messages)
    assert len(ids) <= 128
    x, y = loader.collate([ChatExample(ids, mask, {})], tok.pad_id)
    assert x.shape == y.shape == (1, len(ids) - 1)
    assert x[0].tolist() == ids[:-1]
    for j in range(len(ids) - 1):
        if mask[j + 1] == 1:
            assert y[0, j].item() == ids[j + 1]
        else:
            assert y[0, j].item() == -100
    learn = torch.tensor(mask[1:]) == 1
    assert 0 < learn.sum() < len(ids) - 1

    with torch.no_grad():
        loss = net(x, y)
        logits = net(x)
        per_tok = F.cross_entropy(logits[0].float(), torch.tensor(ids[1:]), reduction="none")
        expected = per_tok[learn].mean()
        full = per_tok.mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert abs(loss.item() - full.item()) > 1e-4, "the masked loss must differ from the unmasked one"

    # Changing a prompt token's id changes only a target that collate already ignores:
    # the targets are identical, so the loss on those targets is identical.
    k = next(i for i in range(2, len(ids)) if mask[i] == 0 and ids[i] not in
             (tok.eot_id, tok.user_id, tok.system_id, tok.assistant_id, tok.end_id))
    ids_changed = list(ids)
    ids_changed[k] = (ids[k] + 1) % 256
    _, y_changed = loader.collate([ChatExample(ids_changed, mask, {})], tok.pad_id)
    assert torch.equal(y_changed, y)
    with torch.no_grad():
        assert torch.equal(net(x, y_changed), loss)

    # ... and the mask is what excludes it: counting that prompt target would change the loss.
    j = k - 1
    y2 = y.clone()
    y2[0, j] = ids[k]
    with torch.no_grad():
        loss2 = net(x, y2)
    assert abs(loss2.item() - loss.item()) > 1e-6


# ----------------------------------------------------------------------------- truncate

def test_truncate_short_unchanged():
    ids, mask = [0, 1, 2, 3, 4], [0, 0, 0, 1, 1]
    assert truncate(ids, mask, 5) == (ids, mask)
    assert truncate(ids, mask, 10) == (ids, mask)
    assert truncate(ids, mask, 5, "drop") == (ids, mask)


def test_truncate_cuts_prompt_side_keeps_first_and_tail(tok):
    long_user = {"role": "user", "content": " ".join(["the quick brown fox jumps over the lazy dog"] * 10)}
    messages = [S, long_user, A2]
    ids, mask = encode_chat(tok, messages)
    tail_len = len(tok.encode(A2["content"])) + 2  # <|assistant|> content <|end|>
    max_len = tail_len + 6
    assert len(ids) > max_len
    out = truncate(ids, mask, max_len, "truncate")
    assert out is not None
    t_ids, t_mask = out
    assert len(t_ids) == len(t_mask) == max_len
    assert t_ids[0] == tok.eot_id and t_mask[0] == 0
    assert t_ids[1:] == ids[len(ids) - (max_len - 1):]
    assert t_mask[1:] == mask[len(mask) - (max_len - 1):]
    assert t_ids[-tail_len:] == [tok.assistant_id] + tok.encode(A2["content"]) + [tok.end_id]
    assert sum(t_mask) == sum(mask)  # every learned token survived


def test_truncate_drop_and_nothing_learnable():
    ids, mask = list(range(10)), [0] * 6 + [1] * 4
    assert truncate(ids, mask, 9, "drop") is None
    assert truncate(ids, mask, 9, "truncate") == ([0] + list(range(2, 10)), [0] + [0] * 4 + [1] * 4)
    # learnable tokens in the cut-away prefix only: nothing left to learn
    ids2, mask2 = list(range(10)), [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert truncate(ids2, mask2, 5, "truncate") is None
    assert truncate(ids2, mask2, 5, "drop") is None


# ----------------------------------------------------------------------------- load_chat_jsonl

def _line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode("utf-8")


LONG_USER = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)


def _mixed_file(path):
    valid = [
        {"instruction": "Sort these numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
        {"instruction": "Say hello.", "output": "Hello there!"},
        {"prompt": "What is 2+3?", "completion": "5", "family": "arithmetic", "answer": "5", "id": "a/1",
         "answer_type": "int", "other": "not kept"},
        {"prompt": [S, U], "completion": "5"},
        {"messages": [U, A, U2, A2]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello!"}]},
    ]
    lines = [
        _line(valid[0]),
        b"{this is not json\n",                                                           # invalid_json
        _line(valid[1]),
        b"[1, 2, 3]\n",                                                                   # invalid_json (not an object)
        b"\n",                                                                            # blank: ignored
        _line({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}),  # missing_field
        _line({"instruction": "Say hi."}),                                                # missing_field (no output)
        _line(valid[2]),
        _line({"messages": [{"role": "narrator", "content": "x"}, A]}),                   # unknown_role
        _line({"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}),  # unknown_role
        _line({"messages": [U, {"role": "assistant", "content": "   "}]}),                # empty_content
        _line({"messages": [S, U]}),                                                      # no_assistant_turn
        b'{"prompt": "caf\xe9 \xff", "completion": "ok"}\n',                              # invalid_utf8
        _line(valid[3]),
        _line({"messages": [{"role": "user", "content": LONG_USER}, A]}),                 # too long: truncatable
        _line({"messages": [U, A, {"role": "user", "content": LONG_USER},                 # too long: assistant at the
                            {"role": "assistant", "content": "ok"},                       # start, tail is prompt only
                            {"role": "user", "content": LONG_USER}]}),
        _line(valid[4]),
        _line(valid[5]),
    ]
    path.write_bytes(b"".join(lines))
    return valid


def test_load_chat_jsonl_skips_and_counts(tok, tmp_path):
    path = tmp_path / "mixed.jsonl"
    valid = _mixed_file(path)
    max_len = 64
    assert len(encode_chat(tok, [{"role": "user", "content": LONG_USER}, A])[0]) > max_len
    for rec in valid:
        assert len(encode_chat(tok, to_messages(rec))[0]) <= max_len

    examples, skipped, truncated = load_chat_jsonl([str(path)], tok, max_len, truncation="drop")
    assert skipped == Counter({"invalid_json": 2, "missing_field": 2, "unknown_role": 2, "empty_content": 1,
                               "no_assistant_turn": 1, "invalid_utf8": 1, "too_long": 2})
    assert truncated == 0
    assert len(examples) == len(valid)
    for ex, rec in zip(examples, valid):  # in file order, including those after bad lines
        assert (ex.ids, ex.mask) == encode_chat(tok, to_messages(rec))
    assert examples[2].meta == {"family": "arithmetic", "answer": "5", "id": "a/1", "answer_type": "int"}
    assert examples[0].meta == {}

    examples, skipped, truncated = load_chat_jsonl([str(path)], tok, max_len, truncation="truncate")
    assert skipped == Counter({"invalid_json": 2, "missing_field": 2, "unknown_role": 2, "empty_content": 1,
                               "no_assistant_turn": 1, "invalid_utf8": 1, "too_long": 1})
    assert truncated == 1
    assert len(examples) == len(valid) + 1
    cut = examples[4]
    assert len(cut.ids) == max_len and cut.ids[0] == tok.eot_id
    assert cut.ids[-(len(tok.encode("5")) + 2):] == [tok.assistant_id] + tok.encode("5") + [tok.end_id]
    assert sum(cut.mask) == len(tok.encode("5")) + 1
    assert all(len(e.ids) <= max_len for e in examples)


def test_load_chat_jsonl_deeply_nested_json_is_skipped(tok, tmp_path):
    # An unclosed (or very deeply nested) JSON array is a bad line like any other: it must be
    # counted as invalid_json, not crash the whole load with RecursionError.
    path = tmp_path / "nested.jsonl"
    path.write_bytes(_line({"prompt": "What is 2+3?", "completion": "5"}) + b"[" * 100_000 + b"\n"
                     + _line({"prompt": "And 12 * 7?", "completion": "84"}))
    examples, skipped, truncated = load_chat_jsonl([str(path)], tok, 64)
    assert skipped == Counter({"invalid_json": 1})
    assert len(examples) == 2 and truncated == 0


def test_load_chat_jsonl_missing_file(tok, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_chat_jsonl([str(tmp_path / "nope.jsonl")], tok, 64)


# ----------------------------------------------------------------------------- prompt_messages

def test_prompt_messages_forms():
    assert prompt_messages({"prompt": "What is 2+3?"}) == [U]
    assert prompt_messages({"prompt": [S, U]}) == [S, U]
    assert prompt_messages({"messages": [U, A]}) == [U]
    assert prompt_messages({"messages": [S, U, A, U2, A2]}) == [S, U, A, U2]
    assert prompt_messages({"messages": [S, U]}) == [S, U]


@pytest.mark.parametrize("rec,reason", [
    ({"prompt": ""}, "empty_content"),
    ({"prompt": "   "}, "empty_content"),
    ({"prompt": 5}, "missing_field"),
    ({"prompt": []}, "missing_field"),
    ({"prompt": [{"role": "user"}]}, "missing_field"),
    ({"prompt": [{"role": "wizard", "content": "hi"}]}, "unknown_role"),
    ({"prompt": [{"role": "user", "content": " "}]}, "empty_content"),
    ({"messages": [{"role": "assistant", "content": "only an answer"}]}, "missing_field"),
    ({"other": 1}, "missing_field"),
    ([U], "invalid_json"),
])
def test_prompt_messages_errors(rec, reason):
    with pytest.raises(RecordError) as e:
        prompt_messages(rec)
    assert e.value.reason == reason


# ----------------------------------------------------------------------------- tasks: build

SMALL = dict(sft_per_family=12, prefs_per_family=9, prompts_per_family=6, eval_per_family=5, safety_sft_per_family=8,
             safety_prefs_per_family=7, harmful_prompts=4, borderline_prompts=3, refusal_pairs_per_family=3,
             degenerate_pairs_per_family=2, benign_prompts=5, everyday_prompts=2, minimal_pairs=3)


@pytest.fixture(scope="module")
def built():
    return tasks.build(seed=0, **SMALL)


def test_build_deterministic(built):
    assert tasks.build(seed=0, **SMALL) == built
    other = tasks.build(seed=1, **SMALL)
    assert other != built
    assert [r["messages"] for r in other["sft"]] != [r["messages"] for r in built["sft"]]


def test_build_counts_families_and_heldout(built):
    counts = {"sft": SMALL["sft_per_family"],
              "prefs": SMALL["prefs_per_family"] + SMALL["refusal_pairs_per_family"] + SMALL["degenerate_pairs_per_family"],
              "prompts": SMALL["prompts_per_family"], "eval": SMALL["eval_per_family"]}
    safety_counts = {**counts, "sft": SMALL["safety_sft_per_family"], "prompts": SMALL["harmful_prompts"],
                     "prefs": SMALL["safety_prefs_per_family"] + SMALL["degenerate_pairs_per_family"]}
    assert built["ptx"] == [r for r in built["sft"] if r["family"] in tasks.TASK_FAMILIES]
    for name, records in built.items():
        if name in ("ptx", "eval_heldout_phrasing"):  # the latter: test_heldout_phrasings_*
            continue
        fam = Counter(r["family"] for r in records)
        assert set(fam) == set(tasks.FAMILIES), name
        for family, n in fam.items():
            want = (safety_counts if family in tasks.SAFETY_FAMILIES else counts)[name]
            if name == "prompts" and family != "harmful" and family in tasks.SAFETY_FAMILIES:
                want = SMALL[f"{family}_prompts"]
            if name == "prefs" and family in ("harmful", "benign"):  # and one side of each minimal pair
                want += SMALL["minimal_pairs"]
            assert n == want, (name, fam)
        assert all(r["answer_type"] == tasks.ANSWER_TYPE[r["family"]] for r in records if r["family"] != "borderline")
        assert len({r["id"] for r in records}) == len(records)

    def prompt_of(r):
        return r["messages"][0]["content"] if "messages" in r else r["prompt"]

    eval_prompts = {prompt_of(r) for r in built["eval"]}
    assert len(eval_prompts) == len(built["eval"])  # held-out prompts are distinct
    train_prompts = {prompt_of(r) for name in ("sft", "prefs", "prompts") for r in built[name]}
    assert not eval_prompts & train_prompts
    # every family splits by a hash of the prompt (harmful and borderline also by template and word)
    assert all(tasks.split_of(p) == "eval" for p in eval_prompts)
    assert all(tasks.split_of(p) == "train" for p in train_prompts)


def test_build_heldout_disjoint_larger_seed():
    out = tasks.build(seed=3, sft_per_family=60, prefs_per_family=30, prompts_per_family=30, eval_per_family=20)
    eval_prompts = {r["prompt"] for r in out["eval"]}
    train_prompts = ({r["messages"][0]["content"] for r in out["sft"]} | {r["prompt"] for r in out["prefs"]}
                     | {r["prompt"] for r in out["prompts"]})
    assert eval_prompts and not eval_prompts & train_prompts
    assert {r["family"] for r in out["eval"]} == set(tasks.FAMILIES)


def test_build_answers_grade(built):
    for r in built["sft"]:
        assert r["messages"][0]["role"] == "user" and r["messages"][1]["role"] == "assistant"
        if r["family"] == "harmful":  # demonstrators comply or refuse; the gold judge tells which
            assert "answer" not in r and tasks.grade(r, r["messages"][1]["content"]) == float(r["refused"]), r
            continue
        if not tasks.needs_answer(r):  # benign and everyday: an answer of the demonstrator's own
            assert "answer" not in r and tasks.grade(r, r["messages"][1]["content"]) == 1.0, r
            continue
        assert r["messages"][1]["content"] == r["answer"]
        assert tasks.grade(r, r["messages"][1]["content"]) == 1.0, r
    for r in built["eval"]:
        assert r["messages"][0]["content"] == r["prompt"]
        assert tasks.grade(r, r["messages"][1]["content"]) == 1.0, r  # the held-out messages are gold
        if tasks.needs_answer(r):
            assert r["messages"][1]["content"] == r["answer"] and tasks.grade(r, r["answer"]) == 1.0, r
    for r in built["prefs"]:  # comparisons are consistent: the gold judge agrees with every pair
        if tasks.needs_answer(r):
            assert r["chosen"] == r["answer"]
        assert tasks.grade(r, r["chosen"]) == 1.0, r
        assert tasks.grade(r, r["rejected"]) == 0.0, r
        assert r["rejected"] != r["chosen"]
    for r in built["prompts"]:
        if tasks.needs_answer(r):
            assert tasks.grade(r, r["answer"]) == 1.0, r


def test_prefs_rejected_always_wrong_many_seeds():
    for seed in range(4):
        out = tasks.build(seed=seed, sft_per_family=0, prefs_per_family=30, prompts_per_family=0, eval_per_family=1)
        for r in out["prefs"]:
            assert tasks.grade(r, r["chosen"]) == 1.0, r
            assert tasks.grade(r, r["rejected"]) == 0.0, r


def test_prefs_kinds_cycle(built):
    for family in tasks.TASK_FAMILIES:
        kinds = [r["kind"] for r in built["prefs"] if r["family"] == family and r["kind"] in tasks.MISTAKE_KINDS]
        assert kinds == [tasks.MISTAKE_KINDS[i % 3] for i in range(len(kinds))]
        assert set(kinds) == {"near_miss", "wrong_format", "rambling"}
    for r in built["prefs"]:
        if r["kind"] == "rambling":
            assert r["rejected"] in tasks.RAMBLES


# ----------------------------------------------------------------------------- tasks: make_task

def _quoted(prompt):
    return re.findall(r"'([^']*)'", prompt)


def independent_answer(family, prompt):
    if family == "arithmetic":
        m = re.search(r"(\d+) ([+\-*]|plus|minus|times) (\d+)", prompt)
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        op = {"plus": "+", "minus": "-", "times": "*"}.get(op, op)
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    if family == "reverse":
        (w,) = _quoted(prompt) or [prompt.split()[0]]  # "garden backwards please"
        return "".join(reversed(w))
    if family == "sort":
        nums = [int(n) for n in re.findall(r"\d+", prompt)]
        assert 3 <= len(nums) <= 5 and len(set(nums)) == len(nums)
        return ", ".join(str(n) for n in sorted(nums))
    if family == "count":
        q = _quoted(prompt)
        assert len(q) == 2
        c = next(s for s in q if len(s) == 1)
        w = next(s for s in q if s != c or q.count(s) == 2)
        return str(sum(1 for ch in w if ch == c))
    if family == "next_letter":
        (c,) = _quoted(prompt)
        letters = string.ascii_lowercase if c.islower() else string.ascii_uppercase
        return letters[letters.index(c) + 1]
    if family == "case":
        (p,) = _quoted(prompt)
        if "uppercase" in prompt:
            return p.upper()
        assert "lowercase" in prompt
        return p.lower()
    if family == "compare":
        a, b = (int(n) for n in re.findall(r"\d+", prompt))
        assert a != b
        return str(a if a > b else b)
    if family == "repeat":
        m = re.search(r"'([^']+)' (?:repeated )?(\d+) times", prompt)
        return " ".join([m.group(1)] * int(m.group(2)))
    raise AssertionError(family)


@pytest.mark.parametrize("family", tasks.TASK_FAMILIES)
def test_make_task_answers_correct(family):
    rng = random.Random(f"test:{family}")
    prompts = set()
    for _ in range(300):
        prompt, answer = tasks.make_task(family, rng)
        prompts.add(prompt)
        assert answer == independent_answer(family, prompt), (prompt, answer)
        assert tasks.grade({"family": family, "answer": answer}, answer) == 1.0
    assert len(prompts) > 20  # really random


def test_heldout_phrasings_are_never_trained_on_and_their_answers_are_right(built):
    phrasing = built["eval_heldout_phrasing"]
    assert Counter(r["family"] for r in phrasing) == {f: 50 for f in tasks.TASK_FAMILIES}  # the default count
    for family in tasks.TASK_FAMILIES:
        assert not set(tasks.HELDOUT_PHRASINGS[family]) & set(tasks.TEMPLATES[family])
    # no training prompt is in a held-out phrasing: the phrasing's fixed words never occur in training text
    train_prompts = [r["messages"][0]["content"] if "messages" in r else r["prompt"]
                     for name in ("sft", "prefs", "prompts", "ptx") for r in built[name]]
    for family, templates in tasks.HELDOUT_PHRASINGS.items():
        for template in templates:
            pattern = re.compile(".+".join(re.escape(part) for part in re.split(r"\{\w+\}", template)) + "$")
            assert not any(pattern.match(p) for p in train_prompts), template
    for r in phrasing:
        assert r["phrasing"] == "heldout" and r["messages"][0]["content"] == r["prompt"]
        assert r["answer"] == independent_answer(r["family"], r["prompt"]), r["prompt"]
        assert tasks.grade(r, r["answer"]) == 1.0
    assert len({r["prompt"] for r in phrasing}) == len(phrasing)
    assert not {r["prompt"] for r in phrasing} & {r["prompt"] for r in built["eval"]}


def test_make_task_deterministic_and_unknown():
    a = [tasks.make_task(f, random.Random(5)) for f in tasks.TASK_FAMILIES]
    b = [tasks.make_task(f, random.Random(5)) for f in tasks.TASK_FAMILIES]
    assert a == b
    with pytest.raises((ValueError, KeyError)):
        tasks.make_task("poetry", random.Random(0))


# ----------------------------------------------------------------------------- grade

def R(family, answer):
    return {"family": family, "answer": answer}


@pytest.mark.parametrize("response", ["42", "42.", "The answer is 42.", "Answer: 42", "**42**", "'42'", " 42 \n",
                                      "the answer is 42", "Answer: **42**", "**The answer is 42.**", "42\nBecause 6 * 7 = 42."])
def test_grade_int_accepts(response):
    assert tasks.grade(R("arithmetic", "42"), response) == 1.0
    assert tasks.grade(R("compare", "42"), response) == 1.0
    assert tasks.grade(R("count", "42"), response) == 1.0


@pytest.mark.parametrize("response", ["43", "4", "-42", "42 because 6 times 7 is 42",
                                      "Let me think. 6 times 7, so that gives 42.",
                                      "I think the result might be 42 or so", "", "forty-two", "42 or 43"])
def test_grade_int_rejects(response):
    assert tasks.grade(R("arithmetic", "42"), response) == 0.0


def test_grade_negative_int():
    assert tasks.grade(R("arithmetic", "-5"), "-5") == 1.0
    assert tasks.grade(R("arithmetic", "-5"), "The answer is -5.") == 1.0
    assert tasks.grade(R("arithmetic", "-5"), "5") == 0.0


@pytest.mark.parametrize("response", ["2, 5, 9", "2 5 9", "[2, 5, 9]", "2,5,9", "(2, 5, 9)", "The answer is 2, 5, 9.",
                                      "**2, 5, 9**"])
def test_grade_list_accepts(response):
    assert tasks.grade(R("sort", "2, 5, 9"), response) == 1.0


@pytest.mark.parametrize("response", ["9, 5, 2", "2, 9, 5", "2, 5", "2, 5, 9, 11", "2, 5, 9 are sorted",
                                      "Sorted: 2, 5, 9 (smallest first)", "25, 9"])
def test_grade_list_rejects(response):
    assert tasks.grade(R("sort", "2, 5, 9"), response) == 0.0


@pytest.mark.parametrize("response", ["h", "H", "The letter h.", "'h'", "The letter is H", "Answer: h"])
def test_grade_letter_accepts(response):
    assert tasks.grade(R("next_letter", "h"), response) == 1.0


@pytest.mark.parametrize("response", ["i", "g", "h is the letter after g", "The letter comes after g: h"])
def test_grade_letter_rejects(response):
    assert tasks.grade(R("next_letter", "h"), response) == 0.0


def test_grade_reverse_text():
    assert tasks.grade(R("reverse", "elppa"), "elppa") == 1.0
    assert tasks.grade(R("reverse", "elppa"), "The word is 'elppa'.") == 1.0
    assert tasks.grade(R("reverse", "elppa"), "ELPPA") == 1.0
    assert tasks.grade(R("reverse", "elppa"), "epppa") == 0.0
    assert tasks.grade(R("reverse", "elppa"), "apple") == 0.0


def test_grade_case_is_exact():
    assert tasks.grade(R("case", "HELLO"), "HELLO") == 1.0
    assert tasks.grade(R("case", "HELLO"), "'HELLO'.") == 1.0
    assert tasks.grade(R("case", "HELLO"), "Hello") == 0.0
    assert tasks.grade(R("case", "HELLO"), "hello") == 0.0
    assert tasks.grade(R("case", "green apple"), "green apple") == 1.0
    assert tasks.grade(R("case", "green apple"), "Green Apple") == 0.0


def test_grade_repeat_ignores_punctuation_and_case():
    rec = R("repeat", "good night good night")
    for ok in ["good night good night", "Good night, good night!", "GOOD NIGHT GOOD NIGHT", "good night. good night."]:
        assert tasks.grade(rec, ok) == 1.0, ok
    for bad in ["good night", "good night good night good night", "good morning good night",
                "Sure: good night good night"]:
        assert tasks.grade(rec, bad) == 0.0, bad


def test_grade_answer_type_override():
    # answer_type in the record takes precedence over the family default
    assert tasks.grade({"family": "case", "answer": "HELLO", "answer_type": "text"}, "hello") == 1.0
    assert tasks.grade({"family": "case", "answer": "HELLO"}, "hello") == 0.0


# ----------------------------------------------------------------------------- CLI

def test_tasks_main_writes_files(tmp_path, capsys):
    out = tmp_path / "tasks"
    tasks.main(["--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    files = {name: [json.loads(l) for l in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
             for name in tasks.SUITE_FILES}
    assert not list(out.glob("*.tmp")) and len(list(out.glob("*.jsonl"))) == len(tasks.SUITE_FILES) == 6
    required = {"sft": {"messages", "family", "answer"}, "eval_heldout_phrasing": {"prompt", "answer", "family"},
                "prefs": {"prompt", "chosen", "rejected", "kind", "family"},
                "prompts": {"prompt", "family", "answer"},
                "eval": {"prompt", "answer", "family", "messages"},
                "ptx": {"messages", "family", "answer"}}
    for name, records in files.items():
        assert records, name
        for r in records:
            need = required[name] - ({"answer"} if not tasks.needs_answer(r) else set())  # a refusal needs no answer
            assert need <= set(r), (name, r)
            assert r["family"] in tasks.FAMILIES
        assert {r["family"] for r in records} == set(tasks.TASK_FAMILIES if name in ("ptx", "eval_heldout_phrasing")
                                                     else tasks.FAMILIES)
    assert len(files["sft"]) == 600 * len(tasks.TASK_FAMILIES) + 300 * 4
    assert len(files["prefs"]) == ((150 + 20) * len(tasks.TASK_FAMILIES) + 600 * 4 + 40 * len(tasks.FAMILIES)
                                   + 2 * 300)  # minimal pairs: two records each
    assert len(files["prompts"]) == 10 * len(tasks.TASK_FAMILIES) + 1000 + 250 + 500 + 250
    # PPO-ptx's data: the helpfulness demonstrations of sft.jsonl, never a harmful compliance
    assert files["ptx"] == [r for r in files["sft"] if r["family"] in tasks.TASK_FAMILIES]
    # at least 100 held-out prompts per family, where the family has that many distinct ones
    eval_counts = Counter(r["family"] for r in files["eval"])
    assert all(eval_counts[f] == 100 for f in tasks.FAMILIES if f not in ("next_letter", "repeat", "reverse"))
    assert min(eval_counts.values()) >= 40
    for r in files["sft"]:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
    assert {r["kind"] for r in files["prefs"]} == set(tasks.MISTAKE_KINDS) | {
        "task_refusal", "harmful", "hedged", "borderline", "degenerate", "benign", "everyday", "minimal_pair"}
    # the files are what build() returns for the default seed
    assert files == tasks.build(seed=0)
    # and each is readable by the chat loader (sft and eval) / prompt_messages (prompts, eval)
    assert all(prompt_messages(r) for r in files["prompts"][:20] + files["eval"][:20])
    assert all(to_messages(r) for r in files["sft"][:20])


def test_tasks_main_small_counts_and_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["--sft-per-family", "3", "--prefs-per-family", "3", "--prompts-per-family", "2",
            "--eval-per-family", "2"]
    tasks.main(["--out", str(a), "--seed", "7", *argv])
    tasks.main(["--out", str(b), "--seed", "7", *argv])
    for name in ("sft", "prefs", "prompts", "eval", "ptx"):
        assert (a / f"{name}.jsonl").read_bytes() == (b / f"{name}.jsonl").read_bytes()
    assert len((a / "sft.jsonl").read_text().splitlines()) == 3 * len(tasks.TASK_FAMILIES) + 300 * 4


def test_grade_answer_is_colon_and_thousands():
    rec = {"answer": "42", "family": "arithmetic"}
    assert tasks.grade(rec, "The answer is: 42") == 1.0
    assert tasks.grade(rec, "4,2") == 0.0
    assert tasks.grade({"answer": "1042", "family": "arithmetic"}, "1,042") == 1.0


def test_load_chat_jsonl_reads_a_record_after_a_bom(tok, tmp_path):
    path = tmp_path / "bom.jsonl"
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rec).encode() + b"\n")
    examples, skipped, _ = load_chat_jsonl([str(path)], tok, 64)
    assert len(examples) == 1 and not skipped
