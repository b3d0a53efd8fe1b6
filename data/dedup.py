"""Deduplication: exact (hash of normalized text) and near-duplicate (MinHash + LSH).

Near-duplicates follow Broder (1997) and the recipe used for GPT-3, The Pile, Gopher and
FineWeb: a document becomes the set of its word 5-grams ("shingles") over simplified
text; MinHash summarizes that set by the minimum of K random hash functions, and two
signatures agree in each position with probability equal to the sets' Jaccard
similarity. LSH banding (Leskovec et al., Mining of Massive Datasets ch. 3) cuts the
signature into B bands of R rows; documents that agree on every row of some band become
candidates. With B=14, R=8 a pair of Jaccard s is caught with probability
1 - (1 - s^8)^14: 0.93 at s=0.85, 0.05 at s=0.5. Candidates are merged with union-find
and the first-seen member of each cluster survives.

Everything per document is vectorized with numpy: all n-gram hashes come from one
prefix-sum polynomial hash over the bytes, and all K hash functions are one
(n_shingles x K) multiply-add-shift followed by a column minimum.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

import numpy as np

_MASK32 = np.uint64(0xFFFFFFFF)
_WORD = re.compile(r"[^\W_]+")
_DIGITS = re.compile(r"\d")


def simplify_words(text: str) -> list[str]:
    """Words of the text lowercased, accents stripped, digits folded to 0, no punctuation."""
    text = text.lower()
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    if _DIGITS.search(text):
        text = _DIGITS.sub("0", text)
    return _WORD.findall(text)


def exact_hash(text: str) -> bytes:
    """Key for exact deduplication: the same text up to whitespace gives the same key."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8", "surrogatepass"), digest_size=16).digest()


_HASH_BASE = np.uint64(0x100000001B3)  # odd, so it has an inverse modulo 2^64
_HASH_BASE_INV = np.uint64(pow(0x100000001B3, -1, 1 << 64))
_POWERS: dict[str, np.ndarray] = {"fwd": np.ones(1, np.uint64), "inv": np.ones(1, np.uint64)}
_POWERS_CACHE_MAX = 1 << 22


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE^k and BASE^-k (mod 2^64) for k < n; cached up to 4M entries."""
    if len(_POWERS["fwd"]) < n:
        m = n if n > _POWERS_CACHE_MAX else max(n, min(_POWERS_CACHE_MAX, 2 * len(_POWERS["fwd"])))
        with np.errstate(over="ignore"):
            fwd = np.cumprod(np.concatenate([[np.uint64(1)], np.full(m - 1, _HASH_BASE)]), dtype=np.uint64)
            inv = np.cumprod(np.concatenate([[np.uint64(1)], np.full(m - 1, _HASH_BASE_INV)]), dtype=np.uint64)
        if m > _POWERS_CACHE_MAX:
            return fwd, inv
        _POWERS["fwd"], _POWERS["inv"] = fwd, inv
    return _POWERS["fwd"], _POWERS["inv"]


def shingle_hashes(text: str, ngram: int = 5) -> np.ndarray:
    """Unique 32-bit hashes of the word n-grams of the simplified text (uint64 array).

    The n-gram "w1 w2 w3 w4 w5" is hashed as its bytes, by a polynomial hash computed
    for all n-grams at once from prefix sums: with P[k] = sum_{j<k} x_j B^-j, the span
    [s, e) hashes to (P[e] - P[s]) B^(e-1) = sum_j x_j B^(e-1-j), which does not depend
    on where the span sits. No Python loop over words or n-grams.
    """
    words = simplify_words(text)
    if not words:
        return np.zeros(0, dtype=np.uint64)
    data = np.frombuffer(" ".join(words).encode("utf-8", "surrogatepass"), dtype=np.uint8)
    size = len(data)
    fwd, inv = _powers(size)
    is_space = data == 32
    starts = np.flatnonzero(~is_space & np.concatenate([[True], is_space[:-1]]))
    ends = np.flatnonzero(~is_space & np.concatenate([is_space[1:], [True]])) + 1
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the hash
        prefix = np.concatenate([[np.uint64(0)], np.cumsum((data.astype(np.uint64) + np.uint64(1)) * inv[:size],
                                                           dtype=np.uint64)])
        k = min(ngram, len(starts))  # a short document is one shingle of all its words
        span_start = starts[: len(starts) - k + 1]
        span_end = ends[k - 1:]
        h = (prefix[span_end] - prefix[span_start]) * fwd[span_end - 1]
    h = (h ^ (h >> np.uint64(32))) & _MASK32
    return np.unique(h)


class MinHasher:
    """K hash functions h(x) = ((a x + b) mod 2^64) >> 32 for 32-bit x, a odd.

    Dietzfelbinger's multiply-add-shift family: 2-independent like the textbook
    (a x + b) mod p, but a 64-bit multiply that wraps and a shift replace the modulo,
    which is the slowest numpy operation in the inner loop.
    """

    def __init__(self, num_perm: int = 112, ngram: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2)
        self.num_perm = num_perm
        self.ngram = ngram

    def signature_of_hashes(self, shingles: np.ndarray, block: int = 8192) -> np.ndarray:
        sig = np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint64)
        for start in range(0, len(shingles), block):  # bounded temporary (block x K)
            x = shingles[start:start + block, None]
            with np.errstate(over="ignore"):
                values = (x * self.a + self.b) >> np.uint64(32)
            np.minimum(sig, values.min(axis=0), out=sig)
        return sig.astype(np.uint32)

    def signature(self, text: str) -> np.ndarray:
        return self.signature_of_hashes(shingle_hashes(text, self.ngram))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


class UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:  # the smaller index (seen first) stays the root: it is the survivor
            if rx < ry:
                self.parent[ry] = rx
            else:
                self.parent[rx] = ry

    def non_roots(self) -> dict[int, int]:
        """{member: root} for every member that is not its cluster's root (its smallest)."""
        out = {}
        for x in list(self.parent):
            root = self.find(x)
            if root != x:
                out[x] = root
        return out


class NearDedup:
    """Streaming LSH index: add signatures in order, then ask which documents to drop.

    With `verify_threshold`, candidates are confirmed by the exact Jaccard of their
    shingle sets (kept in memory for that purpose) before they are merged.
    """

    def __init__(self, bands: int = 14, rows: int = 8, verify_threshold: float | None = None,
                 max_bucket_checks: int = 32):
        self.bands, self.rows = bands, rows
        self.tables: list[dict[bytes, list[int]]] = [dict() for _ in range(bands)]
        self.uf = UnionFind()
        self.verify_threshold = verify_threshold
        self.max_bucket_checks = max_bucket_checks
        self.shingles: dict[int, np.ndarray] = {}
        self.candidate_pairs = 0
        self.rejected_pairs = 0

    def add(self, index: int, signature: np.ndarray, shingles: np.ndarray | None = None) -> None:
        if len(signature) != self.bands * self.rows:
            raise ValueError(f"signature has {len(signature)} values, LSH needs {self.bands * self.rows}")
        if self.verify_threshold is not None:
            if shingles is None:
                raise ValueError("verify_threshold needs the shingle hashes of every document")
            self.shingles[index] = shingles
        for band, table in enumerate(self.tables):
            key = signature[band * self.rows:(band + 1) * self.rows].tobytes()
            members = table.get(key)
            if members is None:
                table[key] = [index]
                continue
            if self.verify_threshold is None:
                self.candidate_pairs += 1
                self.uf.union(members[0], index)  # union is transitive: one member suffices
                continue
            for other in members[: self.max_bucket_checks]:
                if self.uf.find(other) == self.uf.find(index):
                    break
                self.candidate_pairs += 1
                if jaccard(self.shingles[other], shingles) >= self.verify_threshold:
                    self.uf.union(other, index)
                    break
                self.rejected_pairs += 1
            members.append(index)

    def duplicates(self) -> dict[int, int]:
        """{removed index: surviving index} for every non-survivor."""
        return self.uf.non_roots()


# ----------------------------------------------------------------------------- LSH grouped in parallel
# The same candidates as NearDedup.add (without verify_threshold), found by grouping
# instead of streaming, so the grouping can be cut by band key across machines: every
# document's band keys go to one of P partitions by key, each partition is grouped on its
# own, and the union-find over all candidate pairs gives NearDedup's clusters. A pair is
# (first document with the key, a later one), as NearDedup.add makes it, so the counts
# match too; the clusters and their survivors (the smallest index) do not depend on P or
# on the order in which the pairs are merged.

def band_partitions(signatures: np.ndarray, order: np.ndarray, bands: int, rows: int,
                    parts: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Split the band keys of some documents ((n, bands*rows) signatures, and `order`, the
    documents' global ranks, n int64) into `parts` partitions by key: one (band numbers,
    (m, rows) band values, ranks) per partition."""
    n = len(order)
    sig = np.asarray(signatures, dtype=np.uint32).reshape(n, bands, rows)
    band = np.broadcast_to(np.arange(bands, dtype=np.int16), (n, bands)).ravel()
    values = sig.reshape(n * bands, rows)
    ranks = np.repeat(np.asarray(order, dtype=np.int64), bands)
    part = (values[:, 0].astype(np.uint64) + band.astype(np.uint64)) % np.uint64(parts)
    by_part = np.argsort(part, kind="stable")
    cuts = np.cumsum(np.bincount(part.astype(np.int64), minlength=parts))[:-1]
    return [(band[i], values[i], ranks[i]) for i in np.split(by_part, cuts)]


def band_candidate_pairs(band: np.ndarray, values: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """(k, 2) array of candidate pairs (first rank with a band key, a later rank with the same
    key) among the given band keys: NearDedup.add's pairs, in no particular order. One band
    at a time, so the temporaries are a band's share."""
    pairs = [np.zeros((0, 2), dtype=np.int64)]
    for b in np.unique(band):
        mine = band == b
        v, r = values[mine], ranks[mine]
        order = np.lexsort((r, *v.T[::-1]))  # by band value (first row first), then rank
        v, r = v[order], r[order]
        starts = np.ones(len(r), dtype=bool)
        starts[1:] = np.any(v[1:] != v[:-1], axis=1)
        first = r[np.maximum.accumulate(np.where(starts, np.arange(len(r)), 0))]
        pairs.append(np.stack([first[~starts], r[~starts]], axis=1))
    return np.concatenate(pairs)


def clusters_from_pairs(pairs) -> dict[int, int]:
    """{removed index: surviving index}, as NearDedup.duplicates, from candidate pairs."""
    uf = UnionFind()
    for a, b in pairs:
        uf.union(int(a), int(b))
    return uf.non_roots()
