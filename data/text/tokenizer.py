"""Byte-level BPE tokenizer: trained here, encoded and decoded by tiktoken.

Training follows the GPT-2/GPT-4 recipe (Radford et al. 2019; OpenAI cl100k): text is
first split by a regex into chunks (words, numbers of up to 3 digits, punctuation runs,
whitespace) so merges never cross chunk boundaries, then the most frequent adjacent pair
of tokens is merged repeatedly. The algorithm is incremental: pair counts are kept over
the *unique* chunks (weighted by frequency), an index maps each pair to the chunks that
contain it, and a merge only revisits those chunks; a lazy max-heap finds the next pair.
A full recount per merge would cost O(corpus) each time; this costs O(affected chunks).

Encoding uses `tiktoken.Encoding` built from our merge ranks (Rust, multithreaded), so
the training code stays readable Python and encoding stays fast.
"""
from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from multiprocessing import get_context
from typing import Iterable

import regex
import tiktoken

from cli import UserError
from data.files import atomic_write
from data.parallel import bounded_imap

# The GPT-4 (cl100k) split: contractions, letter runs with one optional leading
# non-letter, digits in groups of at most three, punctuation runs, newlines, spaces.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# Reserved now so that every later stage shares one vocabulary layout.
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
_SPECIAL_ATTRS = ("eot_id", "pad_id", "system_id", "user_id", "assistant_id", "end_id")


_SURROGATE = regex.compile(r"[\ud800-\udfff]")
_SURROGATE_RUNS = regex.compile(r"([\ud800-\udfff]+)")


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be used (missing, malformed, inconsistent)."""


# ----------------------------------------------------------------------------- training

def _count_chunks_of(args) -> Counter:
    text, pattern = args
    return Counter(regex.findall(pattern, text))


def count_chunks(texts: Iterable[str], pattern: str = GPT4_SPLIT_PATTERN, workers: int = 1) -> Counter:
    """Frequency of every pre-tokenized chunk over a stream of documents."""
    counts: Counter = Counter()
    if workers <= 1:
        compiled = regex.compile(pattern)
        for text in texts:
            counts.update(compiled.findall(text))
        return counts
    # spawn, not fork: a forked child of a process that already runs threads (torch, tiktoken)
    # can inherit a held lock and hang
    with get_context("spawn").Pool(workers) as pool:
        for part in bounded_imap(pool, _count_chunks_of, ((t, pattern) for t in texts), block=8 * workers):
            counts.update(part)
    return counts


_DIGIT = regex.compile(rb"([0-9])")


def train_merges(chunk_counts: dict, num_merges: int, verbose: bool = False,
                 digits_alone: bool = True) -> list[tuple[int, int]]:
    """Learn `num_merges` BPE merges from {chunk (str or bytes): count}.

    Returns the merges in order; merge k creates token id 256 + k. Ties between equally
    frequent pairs go to the smallest (left, right) ids, so training is deterministic.
    digits_alone: no merge ever joins an ASCII digit to anything, so every digit stays its
    own token on any corpus ("836" is 8, 3, 6), as Llama's tokenizer splits digits: the
    model sees the same place-value pieces in every number, and a corpus full of numbers
    spends no vocabulary on frequent ones. (The split pattern alone would allow "836".)
    """
    words: list[list[int]] = []
    freqs: list[int] = []
    for chunk, count in chunk_counts.items():
        data = chunk.encode("utf-8", "surrogatepass") if isinstance(chunk, str) else chunk
        for part in _DIGIT.split(data) if digits_alone else [data]:
            if len(part) >= 2:  # single bytes (every digit, here) never take part in a pair
                words.append(list(part))
                freqs.append(count)

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> chunks that (may) hold it
    for i, word in enumerate(words):
        f = freqs[i]
        for pair in zip(word, word[1:]):
            pair_counts[pair] += f
            where[pair].add(i)
    # Max-heap via negated counts. Entries go stale when a count changes; every change
    # pushes a fresh entry, so an entry is valid iff it matches the current count.
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue
        left, right = pair
        new_id = 256 + len(merges)
        merges.append(pair)
        delta: dict[tuple[int, int], int] = defaultdict(int)
        for i in where.pop(pair):
            word = words[i]
            merged: list[int] = []
            j, n = 0, len(word)
            while j < n:
                if j + 1 < n and word[j] == left and word[j + 1] == right:
                    merged.append(new_id)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            if len(merged) == n:  # stale index entry: this chunk no longer holds the pair
                continue
            f = freqs[i]
            for p in zip(word, word[1:]):
                delta[p] -= f
            for p in zip(merged, merged[1:]):
                delta[p] += f
                where[p].add(i)
            words[i] = merged
        for p, d in delta.items():
            if d:
                c = pair_counts[p] + d
                pair_counts[p] = c
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:
                    del pair_counts[p]
        pair_counts.pop(pair, None)
        if verbose and len(merges) % 1000 == 0:
            print(f"  bpe: {len(merges)}/{num_merges} merges")
    return merges


# ----------------------------------------------------------------------------- tokenizer

class Tokenizer:
    """Byte-level BPE with the special tokens of every pipeline stage.

    Ids 0..255 are the raw bytes, 256.. the merges in order, then the special tokens.
    `encode` treats special-token text in the input as ordinary text (a document that
    contains the literal string "<|endoftext|>" cannot inject a separator); use the id
    attributes (`eot_id`, `pad_id`, `user_id`, ...) to place special tokens.
    """

    def __init__(self, merges: list[tuple[int, int]], pattern: str = GPT4_SPLIT_PATTERN):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self.token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
        for k, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + k and 0 <= b < 256 + k):
                raise TokenizerError(f"merge {k} refers to a token that does not exist yet: {(a, b)}")
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        ranks = {}
        for i, piece in enumerate(self.token_bytes):
            if piece in ranks:
                raise TokenizerError(f"merges produce the byte string {piece!r} twice")
            ranks[piece] = i
        first_special = len(self.token_bytes)
        self.special_tokens = {tok: first_special + k for k, tok in enumerate(SPECIAL_TOKENS)}
        for attr, tok in zip(_SPECIAL_ATTRS, SPECIAL_TOKENS):
            setattr(self, attr, self.special_tokens[tok])
        self.vocab_size = first_special + len(SPECIAL_TOKENS)
        self._enc = tiktoken.Encoding(name="ours", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)

    # -- training / persistence
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = GPT4_SPLIT_PATTERN,
              workers: int = 1, verbose: bool = False, digits_alone: bool = True) -> "Tokenizer":
        num_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        if num_merges < 0:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
        counts = count_chunks(texts, pattern, workers)
        merges = train_merges(counts, num_merges, verbose=verbose, digits_alone=digits_alone)
        return cls(merges, pattern)

    def save(self, path: str) -> None:
        state = {"type": "byte_level_bpe", "version": 1, "pattern": self.pattern,
                 "vocab_size": self.vocab_size, "special_tokens": self.special_tokens,
                 "merges": [list(m) for m in self.merges]}
        atomic_write(path, json.dumps(state))

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer {path}: {e.strerror}") from None
        except ValueError as e:
            raise TokenizerError(f"tokenizer {path} is not valid JSON: {e}") from None
        if not isinstance(state, dict) or state.get("type") != "byte_level_bpe" or "merges" not in state:
            raise TokenizerError(f"{path} is not a tokenizer file written by data.text.tokenizer")
        merges = state["merges"]
        if not isinstance(merges, list) or not all(
                isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m) for m in merges):
            raise TokenizerError(f"{path}: 'merges' must be a list of [left_id, right_id] integer pairs")
        pattern = state.get("pattern", GPT4_SPLIT_PATTERN)
        if not isinstance(pattern, str):
            raise TokenizerError(f"{path}: 'pattern' must be a string")
        tok = cls([tuple(m) for m in merges], pattern)
        if state.get("special_tokens", tok.special_tokens) != tok.special_tokens:
            raise TokenizerError(f"{path}: special tokens differ from this version's layout")
        return tok

    # -- encoding / decoding
    def encode(self, text: str) -> list[int]:
        # tiktoken would silently turn a lone surrogate into U+FFFD; keep it exact instead.
        if not text.isascii() and _SURROGATE.search(text):
            return self._encode_with_surrogates(text)
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        if any(not t.isascii() and _SURROGATE.search(t) for t in texts):
            return [self.encode(t) for t in texts]
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def _encode_with_surrogates(self, text: str) -> list[int]:
        # A lone surrogate has no UTF-8 form; store its 3 "surrogatepass" bytes as byte
        # tokens so decode() can restore the exact string.
        ids: list[int] = []
        for part in _SURROGATE_RUNS.split(text):
            if not part:
                continue
            if "\ud800" <= part[0] <= "\udfff":
                ids.extend(part.encode("utf-8", "surrogatepass"))
            else:
                ids.extend(self._enc.encode_ordinary(part))
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = [int(i) for i in ids]
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, ValueError):
            bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        data = self.decode_bytes(ids)
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:  # a cut in the middle of a character (e.g. while streaming)
            return data.decode("utf-8", "replace")

    def decode_reply(self, ids: Iterable[int]) -> str:
        """The text of generated ids, as every stage reads it (evaluation, PPO's reward,
        samples, serving's logs): special tokens (the stop token, role markers, padding)
        are markup, not text, and are dropped wherever they are."""
        return self.decode([i for i in ids if i < len(self.token_bytes)])

    def id_to_piece(self, i: int) -> bytes:
        return self.decode_bytes([i])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)})"
