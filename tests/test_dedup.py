"""Tests for data.dedup: text normalization, exact hashing, MinHash and LSH near-dedup."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from data.dedup import (
    MinHasher,
    NearDedup,
    UnionFind,
    estimated_jaccard,
    exact_hash,
    jaccard,
    shingle_hashes,
    simplify_words,
)

K = 112
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_vocab(rng: random.Random, size: int = 20000) -> list[str]:
    """Random alphabetic words (no digits: simplify_words folds digits to 0)."""
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 9))))
    return sorted(words)


def set_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def edit_words(rng: random.Random, vocab: list[str], words: list[str], n_edits: int) -> list[str]:
    """A few random word substitutions, insertions and deletions."""
    out = list(words)
    for _ in range(n_edits):
        op = rng.choice(("sub", "ins", "del"))
        pos = rng.randrange(len(out))
        if op == "sub":
            out[pos] = rng.choice(vocab)
        elif op == "ins":
            out.insert(pos, rng.choice(vocab))
        else:
            del out[pos]
    return out


# ----------------------------------------------------------------------------- simplify / exact

def test_simplify_words_lowercases():
    assert simplify_words("Hello WORLD MiXeD") == ["hello", "world", "mixed"]


def test_simplify_words_folds_digits():
    assert simplify_words("In 2024 we had 37 cats, ab12cd") == ["in", "0000", "we", "had", "00", "cats", "ab00cd"]
    # Different numbers of the same length become the same word.
    assert simplify_words("call 555-1234") == simplify_words("call 867-5309")
    # Non-ASCII digits are folded too.
    assert simplify_words("٣ apples") == ["0", "apples"]


def test_simplify_words_drops_punctuation():
    assert simplify_words("Hello, world! (really?) -- yes; 'quoted' \"double\"...") == [
        "hello", "world", "really", "yes", "quoted", "double"]
    assert simplify_words("snake_case and kebab-case") == ["snake", "case", "and", "kebab", "case"]
    assert simplify_words("!!! ... ---") == []
    assert simplify_words("") == []


def test_simplify_words_strips_accents():
    assert simplify_words("Café naïve RÉSUMÉ Ångström façade") == ["cafe", "naive", "resume", "angstrom", "facade"]
    # Precomposed and decomposed forms agree.
    assert simplify_words("caf\u00e9") == simplify_words("cafe\u0301") == ["cafe"]
    # Non-Latin letters are kept (lowercased).
    assert simplify_words("Ελληνικά 日本語") == ["ελληνικα", "日本語"]


def test_exact_hash_whitespace_insensitive():
    a = "The quick brown fox\njumps over the lazy dog."
    variants = [
        "The quick  brown fox jumps over the lazy dog.",
        "  The quick brown fox\n\njumps\tover the lazy dog.  ",
        "The\r\nquick brown fox jumps over\u00a0the lazy dog.",
    ]
    for v in variants:
        assert exact_hash(v) == exact_hash(a), v
    assert exact_hash("") == exact_hash("   \n\t ")


def test_exact_hash_differs_otherwise():
    base = "The quick brown fox jumps over the lazy dog."
    others = [
        "The quick brown fox jumps over the lazy dog!",
        "the quick brown fox jumps over the lazy dog.",
        "The quick brown fox jumps over the lazy cat.",
        "Thequick brown fox jumps over the lazy dog.",
        "The quick brown fox jumps over the lazy dog. ",  # only trailing space: same
    ]
    hashes = [exact_hash(o) for o in others]
    assert hashes[0] != exact_hash(base)
    assert hashes[1] != exact_hash(base)
    assert hashes[2] != exact_hash(base)
    assert hashes[3] != exact_hash(base)
    assert hashes[4] == exact_hash(base)
    assert exact_hash("ab c") != exact_hash("a bc")
    assert len(exact_hash(base)) == 16
    assert isinstance(exact_hash("lone \ud800 surrogate"), bytes)


# ----------------------------------------------------------------------------- shingles / signatures

def test_shingle_hashes_basic():
    text = "one two three four five six seven"
    sh = shingle_hashes(text)
    assert sh.dtype == np.uint64
    assert len(sh) == 3  # 7 words -> 3 distinct 5-grams
    assert np.all(sh <= 0xFFFFFFFF)
    assert np.all(np.diff(sh.astype(np.int64)) > 0)  # unique and sorted
    # Normalization: case, punctuation and whitespace do not matter.
    assert np.array_equal(shingle_hashes("ONE, two; three... Four\nfive SIX seven!"), sh)
    # Short documents are one shingle; empty ones have none.
    assert len(shingle_hashes("just three words")) == 1
    assert len(shingle_hashes("")) == 0
    assert len(shingle_hashes("!!! ???")) == 0
    # Repeated 5-grams count once.
    assert len(shingle_hashes(" ".join(["a b c d e"] * 10))) == 5


def test_signature_independent_of_shingle_order_and_duplicates():
    rng = np.random.default_rng(0)
    sh = np.unique(rng.integers(0, 1 << 32, size=500, dtype=np.uint64))
    mh = MinHasher(num_perm=K)
    sig = mh.signature_of_hashes(sh)
    assert sig.shape == (K,)
    assert sig.dtype == np.uint32
    shuffled = sh.copy()
    rng.shuffle(shuffled)
    assert np.array_equal(mh.signature_of_hashes(shuffled), sig)
    with_dups = np.concatenate([sh, sh[:100], sh[::-1]])
    assert np.array_equal(mh.signature_of_hashes(with_dups), sig)
    # Blocking of the computation does not matter either.
    assert np.array_equal(mh.signature_of_hashes(shuffled, block=7), sig)
    # A genuinely different set gives a different signature.
    assert not np.array_equal(mh.signature_of_hashes(sh[:250]), sig)


def test_signature_of_text_ignores_formatting():
    mh = MinHasher()
    a = "The Quick brown fox jumps over the lazy dog, again and again."
    b = "the quick   brown FOX jumps over the lazy dog again and again"
    assert np.array_equal(mh.signature(a), mh.signature(b))


def test_minhasher_seed():
    rng = np.random.default_rng(1)
    sh = np.unique(rng.integers(0, 1 << 32, size=300, dtype=np.uint64))
    s1 = MinHasher(num_perm=K, seed=1).signature_of_hashes(sh)
    s1b = MinHasher(num_perm=K, seed=1).signature_of_hashes(sh)
    s2 = MinHasher(num_perm=K, seed=2).signature_of_hashes(sh)
    assert np.array_equal(s1, s1b)
    assert not np.array_equal(s1, s2)
    assert estimated_jaccard(s1, s2) < 0.2  # different hash functions: mostly different minima
    text = "a reasonably long document with enough words to have several shingles in it"
    assert np.array_equal(MinHasher(seed=5).signature(text), MinHasher(seed=5).signature(text))
    assert not np.array_equal(MinHasher(seed=5).signature(text), MinHasher(seed=6).signature(text))


def test_empty_document_signature():
    mh = MinHasher(num_perm=K)
    sig = mh.signature("")
    assert sig.shape == (K,)
    assert np.all(sig == 0xFFFFFFFF)
    assert jaccard(np.zeros(0, np.uint64), np.zeros(0, np.uint64)) == 1.0


def test_jaccard_matches_set_definition():
    a = np.array([1, 2, 3, 4], dtype=np.uint64)
    b = np.array([3, 4, 5], dtype=np.uint64)
    assert jaccard(a, b) == pytest.approx(2 / 5)
    assert jaccard(a, a) == 1.0
    assert jaccard(a, np.array([9], dtype=np.uint64)) == 0.0
    assert jaccard(a, np.zeros(0, np.uint64)) == 0.0


# ----------------------------------------------------------------------------- MinHash accuracy

def _overlap_pairs(n_pairs: int, seed: int):
    """Pairs of documents sharing a middle segment of random length (controlled overlap)."""
    rng = random.Random(seed)
    vocab = make_vocab(rng)

    def words(n):
        return [rng.choice(vocab) for _ in range(n)]

    for k in range(n_pairs):
        n = 200
        # Mix of regimes, as in real deduplication: near-copies, unrelated pairs, and
        # everything in between.
        regime = k % 3
        if regime == 0:
            shared = rng.randint(int(0.9 * n), n)
        elif regime == 1:
            shared = rng.randint(0, int(0.15 * n))
        else:
            shared = rng.randint(0, n)
        common = words(shared)
        a = words(rng.randint(0, n - shared)) + common + words(rng.randint(0, n - shared))
        b = words(rng.randint(0, n - shared)) + common + words(rng.randint(0, n - shared))
        yield " ".join(a), " ".join(b)


def _ideal_mae(j: float, k: int = K) -> float:
    """E|X/k - j| for X ~ Binomial(k, j): the error of a MinHash with independent hashes."""
    return sum(math.comb(k, x) * j**x * (1 - j) ** (k - x) * abs(x / k - j) for x in range(k + 1))


def test_minhash_estimate_close_to_exact_jaccard():
    mh = MinHasher(num_perm=K, seed=1)
    errors, signed, js, violations = [], [], [], []
    for ta, tb in _overlap_pairs(300, seed=42):
        sa, sb = shingle_hashes(ta), shingle_hashes(tb)
        j = jaccard(sa, sb)
        assert j == pytest.approx(set_jaccard(sa, sb))
        est = estimated_jaccard(mh.signature(ta), mh.signature(tb))
        err = est - j
        errors.append(abs(err))
        signed.append(err)
        js.append(j)
        bound = 4 * math.sqrt(j * (1 - j) / K) + 0.02
        if abs(err) > bound:
            violations.append((j, est))
    js = np.array(js)
    # The pairs really span the range of similarities.
    assert js.min() < 0.05 and js.max() > 0.9
    assert np.mean((js > 0.2) & (js < 0.8)) > 0.15
    assert np.mean(js > 0.85) > 0.25
    mae = float(np.mean(errors))
    assert mae < 0.03, mae
    # Sharper, independent of the mix of similarities: no worse than an ideal MinHash
    # (agreements ~ Binomial(K, J)) would be expected to do on these same pairs.
    ideal = float(np.mean([_ideal_mae(j) for j in js]))
    assert mae < 1.25 * ideal, (mae, ideal)
    assert abs(float(np.mean(signed))) < 0.01  # no systematic bias
    assert not violations, violations


def test_minhash_extremes():
    mh = MinHasher(num_perm=K)
    rng = random.Random(3)
    vocab = make_vocab(rng, 5000)
    a = " ".join(rng.choice(vocab) for _ in range(300))
    b = " ".join(rng.choice(vocab) for _ in range(300))
    assert jaccard(shingle_hashes(a), shingle_hashes(b)) == 0.0
    assert estimated_jaccard(mh.signature(a), mh.signature(b)) <= 0.02
    assert estimated_jaccard(mh.signature(a), mh.signature(a.upper() + " ")) == 1.0


# ----------------------------------------------------------------------------- NearDedup (LSH)

def test_planted_near_duplicates_removed_and_distinct_docs_kept():
    rng = random.Random(2024)
    vocab = make_vocab(rng)
    mh = MinHasher(num_perm=K, seed=1)

    base = [[rng.choice(vocab) for _ in range(300)] for _ in range(200)]
    docs: list[tuple[str, list[str]]] = [(f"base{i}", w) for i, w in enumerate(base)]
    clusters: dict[str, list[str]] = {}  # original name -> names of its planted copies

    # 50 originals with one near copy, 5 with two (60 planted copies in all).
    originals = rng.sample(range(200), 55)
    for k, i in enumerate(originals):
        copies = 1 if k < 50 else 2
        for c in range(copies):
            name = f"copy{i}_{c}"
            docs.append((name, edit_words(rng, vocab, base[i], rng.randint(1, 3))))
            clusters.setdefault(f"base{i}", []).append(name)
    assert sum(len(v) for v in clusters.values()) == 60

    # 20 moderately similar documents (share a bit less than half of a base document).
    others = [i for i in range(200) if i not in set(originals)]
    moderate = {}
    for i in rng.sample(others, 20):
        keep = rng.randint(110, 140)
        start = rng.randint(0, 300 - keep)
        words = [rng.choice(vocab) for _ in range(start)] + base[i][start:start + keep]
        words += [rng.choice(vocab) for _ in range(300 - len(words))]
        moderate[f"mod{i}"] = f"base{i}"
        docs.append((f"mod{i}", words))

    rng.shuffle(docs)
    index = {name: k for k, (name, _) in enumerate(docs)}
    texts = [" ".join(w) for _, w in docs]
    shingles = [shingle_hashes(t) for t in texts]

    # The planted similarities are what we claim.
    for orig, copies in clusters.items():
        for c in copies:
            assert jaccard(shingles[index[orig]], shingles[index[c]]) >= 0.85
    for mod, orig in moderate.items():
        assert jaccard(shingles[index[mod]], shingles[index[orig]]) <= 0.5
    sample = rng.sample(range(200), 40)
    for x in sample:
        for y in sample:
            if x < y:
                assert jaccard(shingles[index[f"base{x}"]], shingles[index[f"base{y}"]]) < 0.05

    nd = NearDedup(bands=14, rows=8)
    for k, sh in enumerate(shingles):
        nd.add(k, mh.signature_of_hashes(sh))
    dups = nd.duplicates()

    expected = {}
    for orig, copies in clusters.items():
        members = sorted(index[n] for n in [orig, *copies])
        for m in members[1:]:
            expected[m] = members[0]  # the first-seen member survives
    missing = sorted(docs[m][0] for m in expected if m not in dups)
    assert not missing, f"planted near-duplicates not removed: {missing}"
    wrong = {docs[m][0]: docs[dups[m]][0] for m in expected if dups[m] != expected[m]}
    assert not wrong, f"near-duplicates mapped to the wrong survivor: {wrong}"
    extra = sorted(docs[m][0] for m in dups if m not in expected)
    assert not extra, f"documents removed without a planted near-duplicate: {extra}"
    assert dups == expected
    # Survivors are never removed and every removed doc maps to a survivor.
    assert all(v not in dups and v < k for k, v in dups.items())
    assert nd.candidate_pairs > 0


def test_chain_of_near_copies_collapses_to_lowest_index():
    rng = random.Random(11)
    vocab = make_vocab(rng, 5000)
    a = [rng.choice(vocab) for _ in range(300)]
    b = list(a)
    for pos in (20, 40):  # edits in the first part
        b[pos] = rng.choice(vocab)
    c = list(b)
    for pos in (200, 250):  # further edits in another part
        c[pos] = rng.choice(vocab)
    unrelated = [rng.choice(vocab) for _ in range(300)]
    mh = MinHasher(num_perm=K)
    texts = [" ".join(unrelated), " ".join(c), " ".join(a), " ".join(b)]
    nd = NearDedup(bands=14, rows=8)
    for k, t in enumerate(texts):
        nd.add(k, mh.signature(t))
    # c (1), a (2), b (3) form one cluster; index 1 was seen first.
    assert nd.duplicates() == {2: 1, 3: 1}


def _sig_with_bands(band_values: list[int], bands: int = 14, rows: int = 8) -> np.ndarray:
    """A signature whose band b is `rows` copies of band_values[b]."""
    return np.repeat(np.array(band_values, dtype=np.uint32), rows)


def test_union_find_transitivity_via_hand_made_signatures():
    # A and C share no band; B shares band 0 with A and band 5 with C.
    sig_a = _sig_with_bands([1000 + b for b in range(14)])
    sig_c = _sig_with_bands([2000 + b for b in range(14)])
    sig_b = _sig_with_bands([3000 + b for b in range(14)])
    sig_b[0:8] = sig_a[0:8]
    sig_b[40:48] = sig_c[40:48]
    nd = NearDedup(bands=14, rows=8)
    nd.add(0, sig_a)
    nd.add(1, sig_c)
    assert nd.duplicates() == {}
    nd.add(2, sig_b)
    assert nd.duplicates() == {1: 0, 2: 0}
    # Same cluster, added in a different order: still the lowest index survives.
    nd = NearDedup(bands=14, rows=8)
    nd.add(5, sig_b)
    nd.add(3, sig_c)
    nd.add(4, sig_a)
    assert nd.duplicates() == {4: 3, 5: 3}


def test_union_find():
    uf = UnionFind()
    uf.union(5, 3)
    uf.union(7, 9)
    assert uf.find(5) == 3 and uf.find(3) == 3
    assert uf.find(9) == 7
    uf.union(9, 5)
    assert {uf.find(x) for x in (3, 5, 7, 9)} == {3}
    assert uf.find(42) == 42
    # A long chain still resolves to the smallest element.
    uf = UnionFind()
    for i in range(100, 0, -1):
        uf.union(i, i - 1)
    assert all(uf.find(i) == 0 for i in range(101))


def test_verify_threshold_rejects_low_jaccard_band_collision():
    sig = _sig_with_bands(list(range(14)))
    nd = NearDedup(bands=14, rows=8, verify_threshold=0.8)
    sh0 = np.arange(0, 100, dtype=np.uint64)
    sh1 = np.arange(1000, 1100, dtype=np.uint64)  # shares nothing with sh0
    nd.add(0, sig, sh0)
    other = _sig_with_bands([100 + b for b in range(14)])
    other[16:24] = sig[16:24]  # collides with doc 0 in band 2 only
    nd.add(1, other, sh1)
    assert nd.duplicates() == {}
    assert nd.rejected_pairs == 1
    assert nd.candidate_pairs == 1
    # A true near-duplicate (exact Jaccard 0.9) that collides with both is confirmed
    # against doc 0 and merged; doc 1 stays.
    sh2 = np.concatenate([np.arange(0, 95, dtype=np.uint64), np.arange(5000, 5005, dtype=np.uint64)])
    assert jaccard(sh0, sh2) == pytest.approx(95 / 105)
    nd.add(2, sig.copy(), sh2)
    assert nd.duplicates() == {2: 0}
    assert 1 not in nd.duplicates()


def test_verify_threshold_all_bands_collide_but_sets_disjoint():
    sig = _sig_with_bands([7] * 14)
    nd = NearDedup(bands=14, rows=8, verify_threshold=0.5)
    nd.add(0, sig, np.arange(0, 50, dtype=np.uint64))
    nd.add(1, sig.copy(), np.arange(50, 100, dtype=np.uint64))
    assert nd.duplicates() == {}
    assert nd.rejected_pairs >= 1
    # Without verification the same signatures are merged.
    plain = NearDedup(bands=14, rows=8)
    plain.add(0, sig)
    plain.add(1, sig.copy())
    assert plain.duplicates() == {1: 0}
    assert plain.rejected_pairs == 0


def test_verify_threshold_with_real_documents():
    rng = random.Random(5)
    vocab = make_vocab(rng, 5000)
    a = [rng.choice(vocab) for _ in range(300)]
    b = edit_words(rng, vocab, a, 2)
    c = [rng.choice(vocab) for _ in range(300)]
    mh = MinHasher(num_perm=K)
    nd = NearDedup(verify_threshold=0.8)
    for k, words in enumerate([a, c, b]):
        sh = shingle_hashes(" ".join(words))
        nd.add(k, mh.signature_of_hashes(sh), sh)
    assert nd.duplicates() == {2: 0}
    assert nd.rejected_pairs == 0


def test_verify_threshold_needs_shingles():
    nd = NearDedup(verify_threshold=0.8)
    with pytest.raises(ValueError, match="shingle"):
        nd.add(0, _sig_with_bands(list(range(14))))


@pytest.mark.parametrize("length", [0, 1, 111, 113, 224])
def test_add_rejects_wrong_signature_length(length):
    nd = NearDedup(bands=14, rows=8)
    with pytest.raises(ValueError, match="signature"):
        nd.add(0, np.zeros(length, dtype=np.uint32))
    assert nd.duplicates() == {}
    assert all(not t for t in nd.tables)


def test_add_signature_length_follows_bands_and_rows():
    nd = NearDedup(bands=4, rows=2)
    nd.add(0, np.arange(8, dtype=np.uint32))
    with pytest.raises(ValueError):
        nd.add(1, np.arange(112, dtype=np.uint32))
