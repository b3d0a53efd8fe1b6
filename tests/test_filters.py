"""Document filters of data.prepare: normalization, line filters, Gopher/FineWeb quality,
language identification, toxicity, and the switches that turn each of them off.

Every filter is shown a document it keeps and one it removes, and the removal reason is
asserted exactly, so a filter that silently stops firing (or fires on the wrong rule)
fails here. The last test runs the whole default corpus through `clean_document`.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
import string
import sys
from collections import Counter

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from data import clean, filter_pass, langid, quality  # noqa: E402
from data.toxicity import DEFAULT_BLOCKLIST, ToxicityFilter, load_blocklist  # noqa: E402

CORPUS = os.path.join(REPO, "data", "corpus", "shakespeare.jsonl.gz")

# Plain English prose: ~190 words, unique lines that end in punctuation, several stop
# words. Every filter keeps it with the default configuration.
PROSE = (
    "The old lighthouse stood at the edge of the cliff for more than a century, and its keeper "
    "climbed the narrow stairs every evening to light the lamp.\n"
    "Ships that passed the rocky coast relied on that steady beam to find their way home "
    "through fog and storm.\n"
    "When the keeper grew too old to manage the climb, his daughter took over the work and kept "
    "the light burning without fail.\n"
    "\n"
    "Visitors from the nearby village often walked up the hill to hear her stories about the sea, "
    "the wrecks she had seen, and the sailors who owed their lives to the lamp.\n"
    "She told them how a fishing boat once drifted toward the reef on a moonless night, and how "
    "the crew saw the beam just in time to turn away.\n"
    "\n"
    "Today the tower is a small museum, and children still ask to see the great glass lens that "
    "once sent light across the water.\n"
    "A volunteer winds the old clock each morning, sweeps the gallery, and answers questions "
    "about the storms that battered the coast long ago."
)

GERMAN = (
    "Der Film \u201eGone with the Wind\u201c ist einer der bekanntesten Filme der Geschichte, und er "
    "wird auch heute noch von vielen Menschen gesehen.\n"
    "Die Handlung spielt im S\u00fcden der Vereinigten Staaten w\u00e4hrend des B\u00fcrgerkriegs und "
    "erz\u00e4hlt von einer jungen Frau, die nach dem Krieg um ihr Land und ihre Familie k\u00e4mpft.\n"
    "Der Roman, auf dem der Film beruht, wurde von Margaret Mitchell geschrieben und ist bis heute "
    "ein Bestseller, den man in jeder Buchhandlung findet.\n"
    "Viele Kritiker sind der Meinung, dass der Film zu lang ist, aber die Bilder und die Musik "
    "haben das Publikum \u00fcber Generationen begeistert."
)


def default_cfg(**overrides) -> quality.QualityConfig:
    return quality.QualityConfig(**overrides)


def unique_words(count: int, length: int = 5, seed: int = 0) -> list[str]:
    """`count` distinct lowercase letter-only words of exactly `length` characters."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def lines_of(words: list[str], per_line: int) -> str:
    return "\n".join(" ".join(words[i:i + per_line]) for i in range(0, len(words), per_line))


# ============================================================================ clean.normalize

class TestNormalize:
    def test_nfc_composes_but_keeps_compatibility_characters(self):
        text = "cafe\u0301 \ufb01le \u2460 \uff21"  # e + combining acute, fi ligature, circled 1, fullwidth A
        out = clean.normalize(text, "NFC")
        assert out == "caf\u00e9 \ufb01le \u2460 \uff21"

    def test_nfkc_folds_compatibility_characters(self):
        out = clean.normalize("cafe\u0301 \ufb01le \u2460 \uff21 x\u00b2", "NFKC")
        assert out == "caf\u00e9 file 1 A x2"

    def test_no_form_leaves_unicode_alone(self):
        assert clean.normalize("cafe\u0301 \ufb01", "") == "cafe\u0301 \ufb01"

    def test_default_form_is_nfc(self):
        assert clean.normalize("cafe\u0301 \ufb01") == "caf\u00e9 \ufb01"

    def test_crlf_and_lone_cr_become_lf(self):
        assert clean.normalize("one\r\ntwo\rthree\r\nfour") == "one\ntwo\nthree\nfour"

    def test_control_and_zero_width_characters_removed(self):
        text = "\ufeffze\u200bro\u200c wi\u200ddth\x00 bell\x07 esc\x1b del\x7f \u2060joiner\u202eend"
        assert clean.normalize(text) == "zero width bell esc del joinerend"

    def test_no_c1_control_characters_survive(self):
        # The docstring promises "no control characters"; C1 controls (U+0080-U+009F,
        # category Cc, typical of mis-decoded cp1252 text) are control characters too.
        import unicodedata
        text = "price\x80 quote\x93word\x94 dash\x96 nel\x85end"
        out = clean.normalize(text)
        left = [hex(ord(c)) for c in out if unicodedata.category(c) == "Cc" and c not in "\n\t"]
        assert left == []

    @pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x0b", "\x0c"],
                             ids=["line-separator", "paragraph-separator", "vertical-tab", "form-feed"])
    def test_line_separators_do_not_glue_words(self, sep):
        # Unicode line/paragraph separators, vertical tab and form feed are line breaks
        # (str.splitlines agrees); deleting them joins the words on either side.
        out = clean.normalize("the first line" + sep + "the second line")
        assert out.split() == ["the", "first", "line", "the", "second", "line"]

    def test_tab_and_newline_are_not_control_characters(self):
        assert clean.normalize("a\tb\nc") == "a\tb\nc"

    def test_odd_spaces_become_plain_spaces(self):
        text = "a\u00a0b\u202fc\u2009d\u3000e\u2003f"
        assert clean.normalize(text, "NFC") == "a b c d e f"

    def test_trailing_spaces_stripped_but_indentation_kept(self):
        text = "first line   \n  indented\t \nlast\u00a0\u00a0"
        assert clean.normalize(text) == "first line\n  indented\nlast"

    def test_blank_line_runs_collapse_to_one_blank_line(self):
        assert clean.normalize("a\n\n\n\n\nb") == "a\n\nb"
        assert clean.normalize("a\n\n\nb\n\nc\nd") == "a\n\nb\n\nc\nd"
        # lines holding only spaces are blank too, once their spaces are stripped
        assert clean.normalize("a\n   \n\t\n \u00a0 \nb") == "a\n\nb"

    def test_clean_text_unchanged(self):
        assert clean.normalize(PROSE) == PROSE

    def test_leading_and_trailing_blank_lines_removed(self):
        assert clean.normalize("\n\n  \nbody text\n\n\n") == "body text"


# ============================================================================ clean.filter_lines

class TestFilterLines:
    def test_defaults_keep_verse_and_speaker_tags(self):
        cfg = clean.LineFilterConfig()
        assert cfg.require_terminal_punct is False
        assert cfg.min_words_per_line == 0
        text = "HAMLET.\nTo be, or not to be, that is the question\nWhether 'tis nobler in the mind to suffer"
        assert clean.filter_lines(text, cfg) == (text, 0)

    def test_prepare_config_defaults_keep_them_off(self):
        cfg = filter_pass.PrepareConfig()
        assert cfg.require_terminal_punct is False
        assert cfg.min_words_per_line == 0
        assert cfg.drop_boilerplate is True

    def test_boilerplate_lines_removed_and_counted(self):
        text = ("A real sentence about ships and the sea.\n"
                "Please enable JavaScript to view this page.\n"
                "Another real sentence about the lighthouse keeper.\n"
                "This site uses cookies to improve your experience.\n"
                "\u00a9 2024 Example Inc. All Rights Reserved.\n"
                "Click here to subscribe.")
        out, removed = clean.filter_lines(text, clean.LineFilterConfig())
        assert removed == 4
        assert out == ("A real sentence about ships and the sea.\n"
                       "Another real sentence about the lighthouse keeper.")

    def test_boilerplate_off(self):
        text = "Please enable JavaScript to view this page.\nA sentence."
        assert clean.filter_lines(text, clean.LineFilterConfig(drop_boilerplate=False)) == (text, 0)

    def test_boilerplate_phrase_inside_long_line_is_kept(self):
        # only short lines are boilerplate; a long paragraph that mentions javascript is content
        long_line = "An essay about the history of JavaScript and the browsers that ran it. " * 6
        text = long_line.strip() + "\nPlease enable JavaScript."
        out, removed = clean.filter_lines(text, clean.LineFilterConfig())
        assert removed == 1
        assert out == long_line.strip()

    def test_removed_lines_do_not_leave_blank_runs(self):
        text = "First paragraph.\n\nPrivacy Policy\n\nSecond paragraph."
        out, removed = clean.filter_lines(text, clean.LineFilterConfig())
        assert removed == 1
        assert out == "First paragraph.\n\nSecond paragraph."

    def test_require_terminal_punct(self):
        text = ("A line that ends properly.\n"
                "A line without an ending\n"
                "A question?\n"
                "\u201cQuoted speech.\u201d\n"
                "Menu Home About")
        cfg = clean.LineFilterConfig(require_terminal_punct=True)
        out, removed = clean.filter_lines(text, cfg)
        assert removed == 2
        assert out == "A line that ends properly.\nA question?\n\u201cQuoted speech.\u201d"
        assert clean.filter_lines(text, clean.LineFilterConfig()) == (text, 0)

    def test_min_words_per_line(self):
        text = "HAMLET.\nTo be, or not to be.\nExit.\nEnter Ghost and Horatio."
        cfg = clean.LineFilterConfig(min_words_per_line=3)
        out, removed = clean.filter_lines(text, cfg)
        assert removed == 2
        assert out == "To be, or not to be.\nEnter Ghost and Horatio."

    def test_max_line_chars(self):
        text = "short line.\n" + "x" * 50
        out, removed = clean.filter_lines(text, clean.LineFilterConfig(max_line_chars=20))
        assert (out, removed) == ("short line.", 1)

    def test_all_lines_removed_gives_empty_text(self):
        out, removed = clean.filter_lines("Enable cookies\nCookie policy", clean.LineFilterConfig())
        assert (out, removed) == ("", 2)


class TestLoremIpsum:
    @pytest.mark.parametrize("text", ["Lorem ipsum dolor sit amet.", "Some text then LOREM IPSUM here.",
                                      "intro\nlorem ipsum dolor"])
    def test_detected(self, text):
        assert clean.is_lorem_ipsum(text) is True

    @pytest.mark.parametrize("text", [PROSE, "Lorem and ipsum are Latin words.", "ipsum lorem"])
    def test_not_detected(self, text):
        assert clean.is_lorem_ipsum(text) is False


# ============================================================================ Gopher quality

class TestGopherQuality:
    def test_prose_passes(self):
        assert quality.gopher_quality(PROSE, default_cfg()) is None

    def test_too_few_words(self):
        text = "The cat sat on the mat and it was happy with the world."
        assert quality.gopher_quality(text, default_cfg()) == "gopher_too_few_words"
        assert quality.gopher_quality(text, default_cfg(min_words=5)) is None

    def test_exactly_min_words_passes(self):
        words = PROSE.split()[:50]
        assert quality.gopher_quality(" ".join(words), default_cfg()) is None
        assert quality.gopher_quality(" ".join(words[:49]), default_cfg()) == "gopher_too_few_words"

    def test_too_many_words(self):
        sentence = "The old keeper climbed the stairs to light the lamp. "  # 10 words
        text = sentence * 20_001
        assert len(text.split()) == 200_010
        assert quality.gopher_quality(text, default_cfg()) == "gopher_too_many_words"
        assert quality.gopher_quality(sentence * 19_999, default_cfg()) is None
        assert quality.gopher_quality(PROSE, default_cfg(max_words=100)) == "gopher_too_many_words"

    def test_mean_word_length_too_short(self):
        text = " ".join(["I am to go in it as we do so, and so be it."] * 6)  # mean < 2 letters
        assert len(text.split()) >= 50
        assert quality.gopher_quality(text, default_cfg()) == "gopher_mean_word_length"

    def test_mean_word_length_too_long(self):
        text = ("The internationalization of telecommunications infrastructure and "
                "interoperability considerations with counterrevolutionary "
                "misunderstandings characterize incomprehensibilities. ") * 6
        assert quality.gopher_quality(text, default_cfg()) == "gopher_mean_word_length"

    def test_punctuation_is_not_counted_in_word_length(self):
        # "a." stripped of its period is one letter: mean length uses stripped words
        text = " ".join(["a. b, c! to; of: and?"] * 12)
        assert quality.gopher_quality(text, default_cfg()) == "gopher_mean_word_length"

    def test_symbol_ratio_hash(self):
        tags = " ".join(f"#tag{i}" for i in range(30))
        text = PROSE + "\n" + tags
        assert quality.gopher_quality(text, default_cfg()) == "gopher_symbol_ratio"
        # a few hashtags are fine
        assert quality.gopher_quality(PROSE + "\n#news #sea", default_cfg()) is None

    def test_symbol_ratio_ellipsis(self):
        text = PROSE + "\n" + "Wait... " * 30 + "and then the light was gone."
        assert text.count("...") / len(text.split()) > 0.1
        assert quality.gopher_quality(text, default_cfg()) == "gopher_symbol_ratio"
        text = PROSE + "\n" + "Wait\u2026 " * 30 + "and then the light was gone."
        assert quality.gopher_quality(text, default_cfg()) == "gopher_symbol_ratio"
        # a few are fine
        text = PROSE + "\n" + "Wait... " * 5 + "and then the light was gone."
        assert quality.gopher_quality(text, default_cfg()) is None

    def test_bullet_lines(self):
        items = [line for line in PROSE.split("\n") if line]
        text = "\n".join("- " + line for line in items)
        assert quality.gopher_quality(text, default_cfg()) == "gopher_bullet_lines"
        text = "\n".join("\u2022 " + line for line in items)
        assert quality.gopher_quality(text, default_cfg()) == "gopher_bullet_lines"
        # a list inside prose (under 90% of lines) is fine
        text = PROSE + "\n" + "\n".join(f"* item number {i} of the list" for i in range(3))
        assert quality.gopher_quality(text, default_cfg()) is None

    def test_ellipsis_lines(self):
        items = [line for line in PROSE.split("\n") if line]
        text = "\n".join(line[:-1] + "..." if i % 2 == 0 else line for i, line in enumerate(items))
        n_lines = len(items)
        assert sum(line.endswith("...") for line in text.split("\n")) / n_lines > 0.3
        assert quality.gopher_quality(text, default_cfg()) == "gopher_ellipsis_lines"
        # one truncated line of seven is under the 30% limit
        text = "\n".join(line[:-1] + "\u2026" if i == 0 else line for i, line in enumerate(items))
        assert quality.gopher_quality(text, default_cfg()) is None

    def test_alpha_words(self):
        numbers = " ".join(str(1000 + 37 * i) for i in range(60))
        text = PROSE + "\n" + numbers + "."
        assert quality.gopher_quality(text, default_cfg()) == "gopher_alpha_words"
        # a handful of numbers is fine
        assert quality.gopher_quality(PROSE + "\nIn 1848, 1852 and 1911.", default_cfg()) is None

    def test_stop_words(self):
        text = ("Quiet harbour towns wake early. Fishermen mend nets, gulls circle above, "
                "bakers open shops before sunrise. Tourists arrive later, wandering narrow "
                "streets, buying postcards, tasting fresh bread, photographing boats. Evening "
                "brings music from small taverns while lanterns glow along wet cobblestones. "
                "Children chase each other near fountains; old men play chess under plane "
                "trees; dogs doze beside doorways until night falls again over quiet roofs.")
        assert len(text.split()) >= 50
        assert quality.gopher_quality(text, default_cfg()) == "gopher_stop_words"
        # two stop words are enough ("the" and "with")
        text2 = text.replace("Tourists arrive", "The tourists arrive with cameras")
        assert quality.gopher_quality(text2, default_cfg()) is None

    def test_stop_words_counted_case_and_punctuation_insensitive(self):
        base = " ".join(unique_words(60, seed=3))
        assert quality.gopher_quality(base, default_cfg()) == "gopher_stop_words"
        assert quality.gopher_quality(base + " THE, (with)", default_cfg()) is None


# ============================================================================ Gopher repetition

class TestGopherRepetition:
    def test_prose_passes(self):
        assert quality.gopher_repetition(PROSE, default_cfg()) is None

    def test_dup_paragraphs(self):
        paras = PROSE.split("\n\n")
        text = "\n\n".join(paras + paras[:2])  # 2 of 5 paragraphs repeat
        assert quality.gopher_repetition(text, default_cfg()) == "gopher_dup_paragraphs"

    def test_dup_paragraph_chars(self):
        words = unique_words(400, seed=1)
        long_para = lines_of(words[:120], 8)
        shorts = [" ".join(words[120 + 6 * i:126 + 6 * i]) for i in range(8)]
        text = "\n\n".join([long_para] + shorts + [long_para])  # 1 of 10 paragraphs repeats
        assert quality.gopher_repetition(text, default_cfg()) == "gopher_dup_paragraph_chars"

    def test_dup_lines(self):
        words = unique_words(200, seed=2)
        body = [" ".join(words[i:i + 10]) for i in range(0, 100, 10)]  # 10 unique lines
        lines = []
        for line in body:
            lines += [line, "Yes."]
        lines.append("Yes.")  # 11 x "Yes." -> 10 repeats of 21 lines > 45%
        text = "\n".join(lines)  # one paragraph
        assert quality.gopher_repetition(text, default_cfg()) == "gopher_dup_lines"
        # at the threshold (9 repeats in 20 lines = 45%, not above it) the rule does not fire
        text = "\n".join(lines[:-1])
        assert quality.gopher_repetition(text, default_cfg()) is None

    def test_dup_line_chars(self):
        words = unique_words(200, seed=4)
        long_line = " ".join(words[:40])
        others = [" ".join(words[40 + 8 * i:48 + 8 * i]) for i in range(10)]
        text = "\n".join([long_line] + others + [long_line])  # 1 of 12 lines, ~25% of chars
        assert quality.gopher_repetition(text, default_cfg()) == "gopher_dup_line_chars"

    def test_top_2gram(self):
        words = unique_words(60, seed=5)
        lines = [f"green apple {words[2 * i]} {words[2 * i + 1]}" for i in range(30)]
        text = "\n".join(lines)
        assert quality.gopher_repetition(text, default_cfg()) == "gopher_top_2gram"

    def test_top_3gram(self):
        # a repeated 3-gram of three 5-letter words: top 2-gram share = 2/3 of the 3-gram's
        words = unique_words(400, seed=6)
        lines = [f"aaaaa bbbbb ccccc {' '.join(words[10 * i:10 * i + 10])}" for i in range(30)]
        text = "\n".join(lines)
        lw = text.lower().split()
        assert quality.top_ngram_char_frac(lw, 2) <= 0.20
        assert quality.top_ngram_char_frac(lw, 3) > 0.18
        assert quality.gopher_repetition(text, default_cfg()) == "gopher_top_3gram"

    def test_top_4gram(self):
        # a repeated 4-gram of 5-letter words making up 1/5 of each line: shares 0.2 (4-gram),
        # 0.15 (3-gram), 0.1 (2-gram)
        words = unique_words(600, seed=7)
        lines = [f"aaaaa bbbbb ccccc ddddd {' '.join(words[i * 16:i * 16 + 16])}" for i in range(30)]
        text = "\n".join(lines)
        lw = text.lower().split()
        assert quality.top_ngram_char_frac(lw, 3) <= 0.18
        assert quality.top_ngram_char_frac(lw, 4) > 0.16
        assert quality.gopher_repetition(text, default_cfg()) == "gopher_top_4gram"

    @pytest.mark.parametrize("n", range(5, 11))
    def test_dup_ngram(self, n):
        # 1000 words of 5 letters, all distinct except one run of C words copied once into a
        # different context. The copy's words are exactly the duplicated characters, so
        # dup_k == C/1000 for every k <= C. C/1000 lies just above the n-gram limit and not
        # above the (n-1)-gram one (limits fall by 0.01 per n), so rule n fires first.
        cfg = default_cfg()
        limit = getattr(cfg, f"max_dup_{n}gram")
        covered = round(1000 * (limit + 0.005))
        words = unique_words(1000 - covered, seed=10 + n)
        # copy from a start that does not line up with the 9-word lines of the original
        start = 101 if (1000 - covered - 101) % 9 else 102
        out = words + words[start:start + covered]
        assert len(out) == 1000
        text = lines_of(out, 9)
        lines = text.split("\n")
        assert len(set(lines)) == len(lines)  # no line-level repetition
        lw = text.split()
        for k in range(5, 11):
            assert quality.dup_ngram_char_frac(lw, k) == pytest.approx(covered / 1000)
        assert quality.top_ngram_char_frac(lw, 2) == pytest.approx(2 * 10 / 5000)
        assert quality.gopher_repetition(text, cfg) == f"gopher_dup_{n}gram"
        # six words fewer in the copy (0.6% of the text, under the n-gram limit) and rule n
        # no longer fires (rule n+1, with a lower limit, may)
        fewer = words + words[start:start + covered - 6]
        result = quality.gopher_repetition(lines_of(fewer, 9), cfg)
        assert result != f"gopher_dup_{n}gram"

    def test_dup_ngram_in_prose(self):
        lines = PROSE.split("\n")
        text = PROSE + "\nAs the guide says: " + lines[0].lower() + " " + lines[1].lower()
        assert quality.gopher_repetition(text, default_cfg()) == "gopher_dup_5gram"

    def test_repetition_checks_lowercase(self):
        words = unique_words(1000, seed=99)
        copy = [w.upper() for w in words[:200]]
        text = lines_of(words[200:] + copy, 9) + "\n" + lines_of(words[:200], 11)
        assert quality.gopher_repetition(text, default_cfg()) == "gopher_dup_5gram"


# ---------------------------------------------------------------------- n-gram helpers vs reference

def ref_top_candidates(words: list[str], n: int) -> set[float]:
    """All values the top-n-gram share may take (ties between most frequent n-grams)."""
    if len(words) < n:
        return {0.0}
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    best = max(grams.values())
    if best <= 1:
        return {0.0}
    total = max(1, sum(len(w) for w in words))
    return {best * sum(len(w) for w in g) / total for g, c in grams.items() if c == best}


def ref_dup(words: list[str], n: int) -> float:
    """Characters of words covered by an n-gram occurrence that repeats an earlier one."""
    if len(words) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i in range(len(words) - n + 1):
        g = tuple(words[i:i + n])
        if g in seen:
            for j in range(i, i + n):
                covered[j] = True
        else:
            seen.add(g)
    total = sum(len(w) for w in words)
    return sum(len(w) for w, c in zip(words, covered) if c) / max(1, total)


def random_word_lists():
    rng = random.Random(2024)
    cases = []
    for size in (0, 1, 2, 3, 5, 9, 10, 11, 17, 40, 120, 400):
        for vocab_size in (2, 4, 12, 60):
            vocab = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 9)))
                     for _ in range(vocab_size)]
            words = [rng.choice(vocab) for _ in range(size)]
            cases.append(words)
    # long runs copied verbatim, as in spam
    base = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8))) for _ in range(80)]
    cases.append(base + base[10:50] + base[:7] + base[60:80])
    cases.append(["la"] * 30)
    return cases


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 10])
def test_top_ngram_char_frac_matches_reference(n):
    for words in random_word_lists():
        got = quality.top_ngram_char_frac(words, n)
        candidates = ref_top_candidates(words, n)
        assert any(got == pytest.approx(c, abs=1e-12) for c in candidates), (words, n, got, candidates)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
def test_dup_ngram_char_frac_matches_reference(n):
    for words in random_word_lists():
        got = quality.dup_ngram_char_frac(words, n)
        assert got == pytest.approx(ref_dup(words, n), abs=1e-12), (words, n)


def test_ngram_helpers_known_values():
    words = "a bb a bb a bb c".split()  # chars: 1+2+1+2+1+2+1 = 10
    assert quality.top_ngram_char_frac(words, 2) == pytest.approx(3 * 3 / 10)  # "a bb" x3
    # "a bb a" and "bb a bb" both occur twice: either may be reported
    assert quality.top_ngram_char_frac(words, 3) in (pytest.approx(2 * 4 / 10), pytest.approx(2 * 5 / 10))
    # exact: 2-grams at 0..5: (a,bb),(bb,a),(a,bb)*,(bb,a)*,(a,bb)*,(bb,c) -> words 2..5 covered
    assert quality.dup_ngram_char_frac(words, 2) == pytest.approx((1 + 2 + 1 + 2) / 10)
    assert quality.dup_ngram_char_frac(words, 8) == 0.0
    assert quality.top_ngram_char_frac(words, 8) == 0.0
    assert quality.top_ngram_char_frac("x y z w".split(), 2) == 0.0  # nothing repeats
    assert quality.dup_ngram_char_frac([], 5) == 0.0
    assert quality.top_ngram_char_frac([], 2) == 0.0


# ============================================================================ FineWeb quality

class TestFinewebQuality:
    def test_prose_passes(self):
        assert quality.fineweb_quality(PROSE, default_cfg()) is None

    def test_line_punct(self):
        text = "\n".join(line.rstrip(".,") for line in PROSE.split("\n"))
        assert quality.fineweb_quality(text, default_cfg()) == "fineweb_line_punct"

    def test_line_punct_threshold(self):
        # 1 line of 8 ends in punctuation (12.5% >= 12%): passes; 1 of 9 (11.1%) fails
        long = [f"navigation item number {i} with a long enough label" for i in range(9)]
        ok = "\n".join(long[:7] + ["This line ends with a period."])
        assert quality.fineweb_quality(ok, default_cfg()) is None
        bad = "\n".join(long[:8] + ["This line ends with a period."])
        assert quality.fineweb_quality(bad, default_cfg()) == "fineweb_line_punct"

    def test_short_lines(self):
        text = "\n".join(f"Item {i} is ready to ship." for i in range(20))
        assert all(len(line) <= 30 for line in text.split("\n"))
        assert quality.fineweb_quality(text, default_cfg()) == "fineweb_short_lines"

    def test_dup_line_chars(self):
        lines = [line for line in PROSE.split("\n") if line]
        text = "\n".join(lines + lines[:2])
        assert quality.fineweb_quality(text, default_cfg()) == "fineweb_dup_line_chars"

    def test_newline_ratio(self):
        sentences = ["The lighthouse keeper climbed nightly.",
                     "Distant ships answered with horns.",
                     "Morning brought seabirds and rain.",
                     "Visitors admired the enormous lens.",
                     "Nobody remembers when it closed.",
                     "Children whisper stories about ghosts.",
                     "Fishermen still point toward it.",
                     "Gulls nest beneath its gallery."]
        assert all(len(s) > 30 and len(s.split()) == 5 for s in sentences)
        text = "\n\n".join(sentences)  # 14 newlines for 40 words: ratio 0.35
        assert quality.fineweb_quality(text, default_cfg()) == "fineweb_newline_ratio"
        assert quality.fineweb_quality("\n".join(sentences), default_cfg()) is None

    def test_empty(self):
        assert quality.fineweb_quality("\n \n", default_cfg()) == "fineweb_empty"


# ============================================================================ langid

LANG_SAMPLES = {
    "en": "The children went to the market with their mother, and they bought bread and fish for the evening meal.",
    "de": "Die Kinder sind mit ihrer Mutter auf den Markt gegangen, und sie haben dort Brot und Fisch f\u00fcr das Abendessen gekauft.",
    "fr": "Les enfants sont all\u00e9s au march\u00e9 avec leur m\u00e8re, et ils ont achet\u00e9 du pain et du poisson pour le d\u00eener.",
    "es": "Los ni\u00f1os fueron al mercado con su madre y compraron pan y pescado para la cena, porque no hab\u00eda nada en la casa.",
    "ru": "\u0414\u0435\u0442\u0438 \u043f\u043e\u0448\u043b\u0438 \u043d\u0430 \u0440\u044b\u043d\u043e\u043a \u0441 \u043c\u0430\u043c\u043e\u0439, \u0438 \u043e\u043d\u0430 \u043a\u0443\u043f\u0438\u043b\u0430 \u0438\u043c \u0445\u043b\u0435\u0431 \u0438 \u0440\u044b\u0431\u0443, \u043d\u043e \u043e\u043d\u0438 \u0432\u0441\u0435 \u0440\u0430\u0432\u043d\u043e \u0431\u044b\u043b\u0438 \u0433\u043e\u043b\u043e\u0434\u043d\u044b.",
    "zh": "\u5b69\u5b50\u4eec\u548c\u5988\u5988\u4e00\u8d77\u53bb\u5e02\u573a\uff0c\u4e70\u4e86\u9762\u5305\u548c\u9c7c\u4f5c\u4e3a\u665a\u996d\u3002",
    "ja": "\u5b50\u4f9b\u305f\u3061\u306f\u6bcd\u89aa\u3068\u4e00\u7dd2\u306b\u5e02\u5834\u3078\u884c\u304d\u3001\u5915\u98df\u306e\u305f\u3081\u306b\u30d1\u30f3\u3068\u9b5a\u3092\u8cb7\u3044\u307e\u3057\u305f\u3002",
}


class TestLangid:
    @pytest.mark.parametrize("lang", sorted(LANG_SAMPLES))
    def test_labels(self, lang):
        got, score = langid.identify(LANG_SAMPLES[lang])
        assert got == lang
        assert 0.0 < score <= 1.0

    @pytest.mark.parametrize("lang", ["en", "de", "fr", "ru", "zh", "ja"])
    def test_clear_text_scores_high(self, lang):
        assert langid.identify(LANG_SAMPLES[lang])[1] >= 0.5

    def test_prose_and_german_doc(self):
        assert langid.identify(PROSE)[0] == "en"
        assert langid.identify(PROSE)[1] >= 0.8
        assert langid.identify(GERMAN)[0] == "de"

    @pytest.mark.parametrize("text", ["", "1234 5678 90", "--- *** ###", "xkq zvbr plmt wrrt gnnx ppqz"])
    def test_no_evidence_scores_zero(self, text):
        assert langid.identify(text)[1] == 0.0

    def test_sparse_function_words_score_low(self):
        gibberish = " ".join(unique_words(40, seed=11)) + " the and"
        lang, score = langid.identify(gibberish)
        assert score < 0.5

    def test_english_with_foreign_quote_stays_english(self):
        text = PROSE + "\nThe motto over the door read: Der Weg ist das Ziel."
        assert langid.identify(text)[0] == "en"


# ============================================================================ toxicity

@pytest.fixture(scope="module")
def blocklist() -> list[str]:
    return load_blocklist(DEFAULT_BLOCKLIST)


class TestToxicity:
    def test_default_list_loads(self, blocklist):
        assert "shit" in blocklist and "hot singles" in blocklist
        assert all(t == t.strip().lower() and t and not t.startswith("#") for t in blocklist)

    def test_load_blocklist_ignores_comments_and_blanks(self, tmp_path):
        path = tmp_path / "list.txt"
        path.write_text("# header comment\n\nBadWord\n   \n  spam  phrase  # trailing comment\n#x\nzzz\n",
                        encoding="utf-8")
        assert load_blocklist(str(path)) == ["badword", "spam  phrase", "zzz"]

    def test_dense_text_is_toxic(self, blocklist):
        f = ToxicityFilter(blocklist)
        text = "This shit is fucking awful, total bullshit, watch porn and hot singles here."
        assert f.hits(text) == 5
        assert f.is_toxic(text) is True

    def test_one_mention_in_long_text_is_not_toxic(self, blocklist):
        f = ToxicityFilter(blocklist)
        long_text = (PROSE + "\n") * 4 + "The sailor said: oh shit, the storm is back."
        assert f.hits(long_text) == 1
        assert len(long_text.split()) > 500
        assert f.is_toxic(long_text) is False
        # the same mention in a short text is over the limit
        assert f.is_toxic("The sailor said: oh shit, the storm is back.") is True

    def test_threshold_is_a_fraction_of_words(self, blocklist):
        words = " ".join(unique_words(999, seed=12))
        assert ToxicityFilter(blocklist, max_word_frac=0.002).is_toxic(words + " shit") is False  # 1/1000
        assert ToxicityFilter(blocklist, max_word_frac=0.0005).is_toxic(words + " shit") is True

    def test_clean_text_not_toxic(self, blocklist):
        f = ToxicityFilter(blocklist)
        assert f.hits(PROSE) == 0
        assert f.is_toxic(PROSE) is False

    @pytest.mark.parametrize("text", [
        "Scunthorpe United won the match at Glanford Park.",
        "Fry the shitake mushrooms in butter.",
        "We sailed from Milford Haven at dawn.",
        "The xxxl shirt was sold out.",
        "Pornographic is not listed, and porngraphy is misspelt.",
        "The hotsingles domain and sexchat handle are one word each.",
    ])
    def test_substrings_of_words_do_not_match(self, blocklist, text):
        f = ToxicityFilter(blocklist)
        assert f.hits(text) == 0
        assert f.is_toxic(text) is False

    def test_case_insensitive(self, blocklist):
        assert ToxicityFilter(blocklist).hits("SHIT Shit sHiT") == 3

    def test_phrases_match_across_whitespace(self, blocklist):
        f = ToxicityFilter(blocklist)
        assert f.hits("meet hot singles") == 1
        assert f.hits("meet hot    singles") == 1
        assert f.hits("meet hot\nsingles") == 1
        assert f.hits("meet hot\t \n singles") == 1
        assert f.hits("a hot day for singles tennis") == 0
        assert f.hits("hot") == 0 and f.hits("singles") == 0

    def test_longest_phrase_counts_once(self, blocklist):
        f = ToxicityFilter(blocklist)
        assert f.hits("go kill yourself") == 1
        assert f.hits("please do not kill yourself") == 1

    def test_custom_terms_and_empty_list(self):
        f = ToxicityFilter(["badger cull", "c++"])  # regex metacharacters are escaped
        assert f.hits("the badger  cull began") == 1
        assert f.hits("cxx and c+ are fine") == 0
        empty = ToxicityFilter([])
        assert empty.hits("anything at all") == 0
        assert empty.is_toxic("shit") is False


# ============================================================================ clean_document switches

@pytest.fixture(scope="module")
def terms() -> list[str]:
    return load_blocklist(DEFAULT_BLOCKLIST)


def run_doc(text: str, terms: list[str], **overrides):
    cfg = dataclasses.replace(filter_pass.PrepareConfig(), **overrides)
    filter_pass.init_worker(cfg, terms)
    return filter_pass.clean_document(text)


SHORT_EN = "The cat sat on the mat and it was happy with the world."
NO_PUNCT = "\n".join(line.rstrip(".,") for line in PROSE.split("\n"))
REPEATED = PROSE + "\nAs the guide says: " + " ".join(PROSE.lower().split("\n")[:2])
TOXIC = PROSE + "\nHonestly this shit is the best bullshit story ever."
LOREM = PROSE + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."
WITH_PII = PROSE + "\nWrite to the museum at keeper@lighthouse-museum.org or call +44 20 7946 0958."


class TestCleanDocumentSwitches:
    def test_prose_kept_unchanged(self, terms):
        text, reason, stats = run_doc(PROSE, terms)
        assert (text, reason) == (PROSE, "")
        assert stats["lines_removed"] == 0

    @pytest.mark.parametrize("doc, reason, switch", [
        (SHORT_EN, "gopher_too_few_words", "gopher_quality"),
        (REPEATED, "gopher_dup_5gram", "gopher_repetition"),
        (NO_PUNCT, "fineweb_line_punct", "fineweb_quality"),
        (GERMAN, "language", "langid"),
        (TOXIC, "toxicity", "toxicity"),
        (LOREM, "lorem_ipsum", "drop_lorem_ipsum"),
    ])
    def test_filter_removes_when_on_and_keeps_when_off(self, terms, doc, reason, switch):
        text, got_reason, _ = run_doc(doc, terms)
        assert text is None
        assert got_reason == reason
        text, got_reason, _ = run_doc(doc, terms, **{switch: False})
        assert got_reason == ""
        assert text == clean.normalize(doc)

    def test_language_threshold_defaults(self, terms):
        cfg = filter_pass.PrepareConfig()
        assert cfg.languages == ["en"]
        assert 0 < cfg.min_lang_score < 1
        text, reason, stats = run_doc(GERMAN, terms)
        assert (text, reason) == (None, "language")
        assert stats["language"][0] == "de"
        # German is kept when it is a wanted language
        text, reason, _ = run_doc(GERMAN, terms, languages=["de"])
        assert reason == "" and text == GERMAN
        # English kept at the default threshold, removed when the bar is above its score
        assert run_doc(PROSE, terms)[1] == ""
        score = langid.identify(PROSE)[1]
        assert score >= cfg.min_lang_score
        sparse = " ".join(unique_words(55, seed=13)) + ". The end, with thanks to all of them."
        text, reason, stats = run_doc(sparse, terms, gopher_quality=False)
        assert (text, reason) == (None, "language")
        assert stats["language"][1] < cfg.min_lang_score

    def test_pii_scrubbed_when_on_left_when_off(self, terms):
        text, reason, stats = run_doc(WITH_PII, terms)
        assert reason == ""
        assert "keeper@lighthouse-museum.org" not in text and "7946" not in text
        assert text.endswith("Write to the museum at <EMAIL> or call <PHONE>.")
        assert stats["pii"] == Counter({"email": 1, "phone": 1})
        text, reason, stats = run_doc(WITH_PII, terms, pii=False)
        assert (text, reason) == (WITH_PII, "")
        assert "pii" not in stats

    def test_pii_kinds_restrict(self, terms):
        text, reason, stats = run_doc(WITH_PII, terms, pii_kinds=["email"])
        assert text.endswith("Write to the museum at <EMAIL> or call +44 20 7946 0958.")
        assert stats["pii"] == Counter({"email": 1})

    def test_line_filters_in_pipeline(self, terms):
        doc = PROSE + "\nPlease enable JavaScript to continue.\nHAMLET."
        text, reason, stats = run_doc(doc, terms)
        assert reason == "" and stats["lines_removed"] == 1
        assert text == PROSE + "\nHAMLET."
        text, reason, stats = run_doc(doc, terms, min_words_per_line=3)
        assert stats["lines_removed"] == 2 and text == PROSE

    def test_empty_after_cleaning(self, terms):
        assert run_doc("Privacy Policy\n\u200b\nCookie policy", terms)[:2] == (None, "empty_after_cleaning")

    def test_normalization_in_pipeline(self, terms):
        doc = PROSE.replace("\n", "\r\n").replace("old lighthouse", "old\u00a0lighthouse\u200b") + "   \r\n\r\n\r\n"
        text, reason, _ = run_doc(doc, terms)
        assert (text, reason) == (PROSE, "")
        ligature = PROSE.replace("find", "\ufb01nd")
        assert run_doc(ligature, terms)[0] == ligature
        assert run_doc(ligature, terms, unicode_form="NFKC")[0] == PROSE

    def test_thresholds_are_config_driven(self, terms):
        # a filter setting in PrepareConfig reaches the check
        assert run_doc(PROSE, terms, min_words=1000)[1] == "gopher_too_few_words"
        assert run_doc(PROSE, terms, min_words=1000, gopher_quality=False)[1] == ""


# ============================================================================ default corpus survives

def test_default_corpus_survives_default_filters():
    cfg = filter_pass.PrepareConfig()
    filter_pass.init_worker(cfg, load_blocklist(cfg.blocklist))
    failures = []
    n = 0
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            n += 1
            text, reason, stats = filter_pass.clean_document(record["text"])
            if text is None:
                failures.append((record.get("id"), reason, stats.get("language")))
            else:
                assert len(text) > 0.9 * len(record["text"].strip()) - 2000, record.get("id")
    assert n >= 40
    assert failures == []
