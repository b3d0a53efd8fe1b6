"""Tests for data.text.tokenizer: byte-level BPE training (incremental) and tiktoken encoding."""
from __future__ import annotations

import gzip
import json
import os
import random
from collections import Counter, defaultdict

import pytest
import regex

import data.text.tokenizer as tokmod
from data.text.tokenizer import GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, Tokenizer, TokenizerError
from text_samples import ADVERSARIAL, LONE_SURROGATES, random_strings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "data", "corpus", "shakespeare.jsonl.gz")

TRAIN_CHARS = 100_000
HELDOUT_CHARS = 30_000
VOCAB = 512
SPECIAL_ATTRS = ("eot_id", "pad_id", "system_id", "user_id", "assistant_id", "end_id")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def corpus_text() -> str:
    """The first TRAIN_CHARS + HELDOUT_CHARS characters of the embedded corpus."""
    need = TRAIN_CHARS + HELDOUT_CHARS
    parts, total = [], 0
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            parts.append(text)
            total += len(text)
            if total >= need:
                break
    text = "\n\n".join(parts)[:need]
    assert len(text) == need
    return text


@pytest.fixture(scope="module")
def train_docs(corpus_text) -> list[str]:
    """Training text cut into ~5 KB documents (so that workers > 1 has work to split)."""
    text = corpus_text[:TRAIN_CHARS]
    return [text[i:i + 5000] for i in range(0, len(text), 5000)]


@pytest.fixture(scope="module")
def heldout_text(corpus_text) -> str:
    return corpus_text[TRAIN_CHARS:]


@pytest.fixture(scope="module")
def tok(train_docs) -> Tokenizer:
    return Tokenizer.train(train_docs, vocab_size=VOCAB)


# ----------------------------------------------------------------------------- references

def reference_encode(tok: Tokenizer, text: str) -> list[int]:
    """Slow BPE: regex pre-split, then merge the lowest-rank adjacent pair until none is left."""
    rank = {piece: i for i, piece in enumerate(tok.token_bytes)}
    ids: list[int] = []
    for chunk in regex.findall(tokmod.GPT4_SPLIT_PATTERN, text):
        parts = [bytes([b]) for b in chunk.encode("utf-8")]
        while len(parts) > 1:
            best_rank, best_i = None, None
            for i in range(len(parts) - 1):
                r = rank.get(parts[i] + parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best_i = r, i
            if best_i is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        ids.extend(rank[p] for p in parts)
    return ids


def naive_train_merges(chunk_counts: dict, num_merges: int) -> list[tuple[int, int]]:
    """Full recount of all pair counts for every merge; max count, ties -> smallest pair."""
    words: dict[tuple[int, ...], int] = defaultdict(int)
    for chunk, count in chunk_counts.items():
        data = chunk.encode("utf-8", "surrogatepass") if isinstance(chunk, str) else bytes(chunk)
        words[tuple(data)] += count
    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges:
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for word, f in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] += f
        if not counts:
            break
        best_count = max(counts.values())
        pair = min(p for p, c in counts.items() if c == best_count)
        new_id = 256 + len(merges)
        merges.append(pair)
        new_words: dict[tuple[int, ...], int] = defaultdict(int)
        for word, f in words.items():
            out, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == pair:
                    out.append(new_id)
                    j += 2
                else:
                    out.append(word[j])
                    j += 1
            new_words[tuple(out)] += f
        words = new_words
    return merges


# ----------------------------------------------------------------------------- round trips
# (the strings: tests/text_samples.py)

def _assert_no_special_ids(tok: Tokenizer, ids: list[int]) -> None:
    first_special = tok.vocab_size - len(SPECIAL_TOKENS)
    assert all(0 <= i < first_special for i in ids), [i for i in ids if not 0 <= i < first_special]


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_roundtrip_adversarial(tok, name):
    s = ADVERSARIAL[name]
    ids = tok.encode(s)
    _assert_no_special_ids(tok, ids)
    assert tok.decode(ids) == s
    assert tok.decode_bytes(ids) == s.encode("utf-8")


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_roundtrip_adversarial_untrained(name):
    # Byte-level only (no merges): every token is a single byte.
    bare = Tokenizer([])
    s = ADVERSARIAL[name]
    ids = bare.encode(s)
    assert ids == list(s.encode("utf-8"))
    assert bare.decode(ids) == s


@pytest.mark.parametrize("name", list(LONE_SURROGATES))
def test_roundtrip_lone_surrogates(tok, name):
    s = LONE_SURROGATES[name]
    ids = tok.encode(s)
    _assert_no_special_ids(tok, ids)
    assert tok.decode(ids) == s


def test_roundtrip_random_strings_with_surrogates(tok):
    strings = random_strings(include_surrogates=True)
    assert any(any("\ud800" <= c <= "\udfff" for c in s) for s in strings)
    bad = [s for s in strings if tok.decode(tok.encode(s)) != s]
    assert not bad, f"{len(bad)}/{len(strings)} random strings do not round-trip, e.g. {bad[0]!r}"


def test_roundtrip_random_strings_without_surrogates(tok):
    strings = random_strings(include_surrogates=False)
    for s in strings:
        ids = tok.encode(s)
        _assert_no_special_ids(tok, ids)
        assert tok.decode(ids) == s


def test_special_token_text_is_not_a_special_token(tok):
    for text in SPECIAL_TOKENS:
        ids = tok.encode(text)
        assert tok.special_tokens[text] not in ids
        assert len(ids) > 1
        _assert_no_special_ids(tok, ids)
        assert tok.decode(ids) == text
    assert tok.eot_id not in tok.encode("<|endoftext|>")
    assert tok.user_id not in tok.encode("<|user|>")
    # Inside other text the literal stays ordinary text too.
    ids = tok.encode("x<|endoftext|>y")
    _assert_no_special_ids(tok, ids)
    assert tok.decode(ids) == "x<|endoftext|>y"
    assert tok.encode_batch(["<|endoftext|>", "<|user|>"]) == [tok.encode("<|endoftext|>"), tok.encode("<|user|>")]


def test_encode_batch_matches_encode(tok, heldout_text):
    texts = list(ADVERSARIAL.values()) + random_strings(False)[:20] + [heldout_text[:5000], heldout_text[5000:9000]]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=1) == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []


def test_encode_batch_matches_encode_with_surrogates(tok):
    texts = ["plain text", *LONE_SURROGATES.values(), "more plain text"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


# ----------------------------------------------------------------------------- training

def test_trained_vocab_layout(tok):
    assert tok.vocab_size == VOCAB
    assert len(tok.merges) == VOCAB - 256 - len(SPECIAL_TOKENS)
    assert tok.vocab_size == 256 + len(tok.merges) + 6
    assert len(tok.token_bytes) == 256 + len(tok.merges)
    assert len(set(tok.token_bytes)) == len(tok.token_bytes)
    for k, (a, b) in enumerate(tok.merges):
        assert a < 256 + k and b < 256 + k
        assert tok.token_bytes[256 + k] == tok.token_bytes[a] + tok.token_bytes[b]


def test_special_token_ids(tok):
    ids = [getattr(tok, attr) for attr in SPECIAL_ATTRS]
    assert len(set(ids)) == 6
    assert ids == list(range(tok.vocab_size - 6, tok.vocab_size))
    for attr, text in zip(SPECIAL_ATTRS, SPECIAL_TOKENS):
        i = getattr(tok, attr)
        assert tok.special_tokens[text] == i
        assert tok.decode([i]) == text
        assert tok.id_to_piece(i) == text.encode()
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert tok.decode([tok.pad_id]) == "<|pad|>"
    assert tok.decode([tok.system_id]) == "<|system|>"
    assert tok.decode([tok.user_id]) == "<|user|>"
    assert tok.decode([tok.assistant_id]) == "<|assistant|>"
    assert tok.decode([tok.end_id]) == "<|end|>"
    assert tok.decode(tok.encode("hi") + [tok.eot_id] + tok.encode("there")) == "hi<|endoftext|>there"


def test_special_token_ids_untrained():
    bare = Tokenizer([])
    assert bare.vocab_size == 262
    assert [getattr(bare, a) for a in SPECIAL_ATTRS] == list(range(256, 262))


def test_train_rejects_too_small_vocab():
    with pytest.raises(ValueError):
        Tokenizer.train(["abc"], vocab_size=261)
    assert Tokenizer.train(["abc"], vocab_size=262).merges == []


def test_training_is_deterministic(train_docs, tok):
    again = Tokenizer.train(train_docs, vocab_size=VOCAB)
    assert again.merges == tok.merges
    assert again.token_bytes == tok.token_bytes


def test_training_with_workers_matches_single_process(train_docs, tok):
    parallel = Tokenizer.train(train_docs, vocab_size=VOCAB, workers=2)
    assert parallel.merges == tok.merges


def test_count_chunks_workers_agree(train_docs):
    one = tokmod.count_chunks(train_docs[:6])
    two = tokmod.count_chunks(train_docs[:6], workers=2)
    assert one == two
    expected = Counter()
    for d in train_docs[:6]:
        expected.update(regex.findall(GPT4_SPLIT_PATTERN, d))
    assert one == expected


def test_train_merges_independent_of_dict_order(train_docs):
    counts = tokmod.count_chunks(train_docs[:4])
    items = list(counts.items())
    random.Random(7).shuffle(items)
    assert tokmod.train_merges(dict(items), 150) == tokmod.train_merges(counts, 150)


def test_train_merges_matches_naive_reference_on_text(corpus_text):
    counts = tokmod.count_chunks([corpus_text[:12_000]])
    num = 200
    fast = tokmod.train_merges(counts, num)
    assert len(fast) == num
    assert fast == naive_train_merges(counts, num)


def test_train_merges_matches_naive_reference_on_tricky_counts():
    # Repeated letters (overlapping pairs), alternating pairs, equal counts (ties), bytes keys,
    # single bytes (never paired), and training until no pair is left.
    counts = {
        "aaaaaaa": 3, "aaa": 5, "abababab": 2, "baba": 4, "ab": 1, "ba": 1,
        " aaab": 5, "zzzz": 5, "zz": 5, "q": 100, "xyxyxy": 3, "yxyx": 3,
        b"\xff\xfe\xff\xfe": 2, "éé": 2, "日本日本": 1, "\ud800x": 2,
    }
    naive = naive_train_merges(counts, 10_000)
    fast = tokmod.train_merges(counts, 10_000)
    assert fast == naive
    assert 0 < len(fast) < 10_000  # exhausted: every chunk became one token
    for n in (1, 2, 5, 10, len(naive)):
        assert tokmod.train_merges(counts, n) == naive[:n]


def test_train_merges_tie_break_smallest_pair():
    # Every pair occurs once: the first merge must be the smallest (left, right) tuple.
    merges = tokmod.train_merges({"dc": 1, "ba": 1, "bc": 1}, 1)
    assert merges == [(ord("b"), ord("a"))]
    # Higher count beats smaller id.
    merges = tokmod.train_merges({"ab": 1, "yz": 2}, 1)
    assert merges == [(ord("y"), ord("z"))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_merges_matches_naive_reference_random(seed):
    rng = random.Random(seed)
    alphabet = "aab bc"  # few symbols: many ties and overlapping repeats
    counts = Counter()
    for _ in range(300):
        counts["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))] += rng.randint(1, 4)
    assert tokmod.train_merges(counts, 60) == naive_train_merges(counts, 60)


# ----------------------------------------------------------------------------- encoding agreement

MIXED_SAMPLE = (
    "Numbers: 1 12 123 1234 12345 3.14159 -42 1,000,000 0x1F 2024-01-01T12:34:56Z\n"
    "Code: for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } // done\n"
    "    if x != None and y >= 3:\n        return {'k': [1, 2]}\r\n"
    "Unicode: café naïve Ångström Straße Ελληνικά русский текст 日本語 中文 한국어 "
    "مرحبا שלום 👍🏽 👨\u200d👩\u200d👧 e\u0301\n"
    "Contractions: I'm, you're, we'll, they've, she'd, IT'S, DON'T.\n"
    "Spaces:   three   spaces\t\ttabs\n\n\n  \n end   \n"
    "Punctuation!!! ??? ... --- *** ((( ))) \"quoted\" 'single' «guillemets» — dash\n"
)


def test_encode_agrees_with_reference_on_shakespeare(tok, heldout_text):
    sample = heldout_text[:8000]
    assert tok.encode(sample) == reference_encode(tok, sample)


def test_encode_agrees_with_reference_on_training_text(tok, train_docs):
    sample = train_docs[3]
    assert tok.encode(sample) == reference_encode(tok, sample)


def test_encode_agrees_with_reference_on_mixed_text(tok):
    assert tok.encode(MIXED_SAMPLE) == reference_encode(tok, MIXED_SAMPLE)
    for line in MIXED_SAMPLE.splitlines(keepends=True):
        assert tok.encode(line) == reference_encode(tok, line), line


def test_encode_agrees_with_reference_on_adversarial(tok):
    for name, s in ADVERSARIAL.items():
        s = s[:1000]  # the reference is quadratic per chunk; long runs are cut
        assert tok.encode(s) == reference_encode(tok, s), name


def test_merges_are_used(tok):
    # A trained tokenizer must actually merge frequent English words.
    ids = tok.encode(" the")
    assert len(ids) == 1
    assert tok.decode(ids) == " the"


def test_compression_on_heldout_english(tok, heldout_text):
    ids = tok.encode(heldout_text)
    ratio = len(heldout_text.encode("utf-8")) / len(ids)
    assert ratio > 2.0, ratio
    # And the merges really help: the bare byte tokenizer is at exactly 1 byte/token.
    assert len(Tokenizer([]).encode(heldout_text)) == len(heldout_text.encode("utf-8"))


# ----------------------------------------------------------------------------- persistence

def test_save_load_roundtrip(tok, tmp_path, heldout_text):
    path = tmp_path / "tok.json"
    tok.save(str(path))
    loaded = Tokenizer.load(str(path))
    assert loaded.merges == tok.merges
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.token_bytes == tok.token_bytes
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.pattern == tok.pattern
    for attr in SPECIAL_ATTRS:
        assert getattr(loaded, attr) == getattr(tok, attr)
    samples = [heldout_text[:5000], MIXED_SAMPLE, *ADVERSARIAL.values()]
    for s in samples:
        assert loaded.encode(s) == tok.encode(s)
    # Saving leaves no temporary file behind, and the file is the documented JSON.
    assert os.listdir(tmp_path) == ["tok.json"]
    state = json.loads(path.read_text(encoding="utf-8"))
    assert state["type"] == "byte_level_bpe"
    assert state["vocab_size"] == tok.vocab_size
    assert [tuple(m) for m in state["merges"]] == tok.merges


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        Tokenizer.load(str(missing))


def test_load_directory(tmp_path):
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        Tokenizer.load(str(tmp_path))


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00garbage", b'{"type": "byte_level_bpe", '])
def test_load_invalid_json(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.load(str(path))


@pytest.mark.parametrize("state", [
    {"foo": 1},
    [1, 2, 3],
    "a string",
    42,
    None,
    {"type": "wordpiece", "merges": []},
    {"type": "byte_level_bpe"},
])
def test_load_json_that_is_not_a_tokenizer(tmp_path, state):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(TokenizerError, match="not a tokenizer file"):
        Tokenizer.load(str(path))


def test_load_inconsistent_tokenizer(tmp_path):
    # Refers to a token that does not exist yet.
    path = tmp_path / "bad_merges.json"
    path.write_text(json.dumps({"type": "byte_level_bpe", "merges": [[300, 1]]}), encoding="utf-8")
    with pytest.raises(TokenizerError, match="does not exist yet"):
        Tokenizer.load(str(path))
    # Two merges producing the same byte string.
    path.write_text(json.dumps({"type": "byte_level_bpe", "merges": [[97, 97], [97, 97]]}), encoding="utf-8")
    with pytest.raises(TokenizerError, match="twice"):
        Tokenizer.load(str(path))
    # Special tokens of another layout.
    path.write_text(json.dumps({"type": "byte_level_bpe", "merges": [],
                                "special_tokens": {"<|endoftext|>": 0}}), encoding="utf-8")
    with pytest.raises(TokenizerError, match="special tokens"):
        Tokenizer.load(str(path))


@pytest.mark.parametrize("merges", [[[1]], [[1, 2, 3]], "ab", 5, [None], [["a", "b"]]])
def test_load_malformed_merges(tmp_path, merges):
    # A file that claims to be a tokenizer but whose merges are not [int, int] pairs is
    # malformed: it must raise TokenizerError, not an unrelated exception type.
    path = tmp_path / "malformed.json"
    path.write_text(json.dumps({"type": "byte_level_bpe", "merges": merges}), encoding="utf-8")
    with pytest.raises(TokenizerError):
        Tokenizer.load(str(path))


# ----------------------------------------------------------------------------- decoding errors

def test_decode_out_of_vocabulary_raises_value_error(tok):
    for bad in ([tok.vocab_size], [tok.vocab_size + 1], [10**6], [1, 2, tok.vocab_size + 100]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode(bad)
        with pytest.raises(ValueError):
            tok.decode_bytes(bad)
    with pytest.raises(ValueError):
        tok.id_to_piece(tok.vocab_size)
    # The last valid id still decodes.
    assert tok.decode([tok.vocab_size - 1]) == SPECIAL_TOKENS[-1]


def test_decode_negative_id_raises_value_error(tok):
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_decode_partial_utf8_does_not_raise(tok):
    ids = tok.encode("日本")
    data = tok.decode_bytes(ids)
    cut = [b for b in data[:2]]  # raw byte ids: the first two bytes of a 3-byte character
    assert tok.decode(cut) == "\ufffd"


# ----------------------------------------------------------------------------- digits stay single tokens

def _number_corpus(n: int = 400) -> list[str]:
    """Documents dense in numbers (years, prices, counts, ids), where plain BPE merges digits."""
    rng = random.Random(7)
    docs = []
    for _ in range(n):
        year, price, count = rng.choice([1999, 2000, 2024, 1066]), rng.randint(1, 999), rng.randint(10, 99999)
        docs.append(f"In {year} the 836 ships sold {count} barrels at ${price}.{rng.randint(10, 99)} each; "
                    f"order #{rng.randint(100, 999)}-{rng.randint(1000, 9999)} of 1999, page 12.")
    return docs


def test_digits_are_single_tokens_on_a_corpus_full_of_numbers():
    docs = _number_corpus()
    tok = Tokenizer.train(docs, vocab_size=600)
    assert all(not any(48 <= b <= 57 for b in tok.token_bytes[i]) or len(tok.token_bytes[i]) == 1
               for i in range(len(tok.token_bytes))), "a merged token holds a digit"
    text = "In 2024, 1,836 of 31415926 ships cost $12.50 (x2) - not 007.\n" + docs[3]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert sum(len(tok.token_bytes[i]) == 1 and chr(tok.token_bytes[i][0]).isdigit() for i in ids) == \
        sum(c.isdigit() for c in text)


def test_digits_alone_matches_naive_reference_on_split_chunks():
    counts = Counter(regex.findall(GPT4_SPLIT_PATTERN, " ".join(_number_corpus(60))))
    split = Counter()
    for chunk, n in counts.items():  # the rule by hand: every digit cut out of its chunk
        for part in regex.split(r"([0-9])", chunk):
            split[part] += n
    assert tokmod.train_merges(counts, 80) == naive_train_merges(split, 80)


def test_tokenizers_with_digit_merges_still_load_and_encode_as_before(tmp_path):
    """A tokenizer trained without the rule (before it existed, or by choice) keeps its merges."""
    docs = _number_corpus()
    old = Tokenizer.train(docs, vocab_size=600, digits_alone=False)
    assert any(len(b) > 1 and all(48 <= c <= 57 for c in b) for b in old.token_bytes)  # e.g. "836"
    path = tmp_path / "old.json"
    old.save(str(path))
    loaded = Tokenizer.load(str(path))
    text = "In 1999 the 836 ships sold 12345 barrels."
    assert loaded.encode(text) == old.encode(text)
    assert len(loaded.encode("836")) == 1 and loaded.decode(loaded.encode(text)) == text
