"""Offline language identification from writing system and stop-word statistics.

No model download: the script of the letters decides the language family (Han, Kana,
Hangul, Cyrillic, Arabic, ...) and, for Latin-script text, which language's most common
function words it uses. Function words are a strong signal (Grefenstette 1995; Cavnar &
Trenkle's n-gram method works for the same reason) and they need no training data.

`identify(text)` returns (language code, confidence in [0, 1]). Confidence is the share
of letters in the language's script, times the share of stop-word evidence that points
to the winner, damped for text with too few function words to judge (lists, code,
gibberish).
"""
from __future__ import annotations

import regex

# ~40 of the most frequent function words per language, written for this project.
STOP_WORDS = {
    "en": "the of and to a in is it you that he was for on are with as i his they be at one have "
          "this from or had by not but what all were we when your can said there an which she do "
          "their if will my me thou thy thee hath doth",
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch "
          "es an werden aus er hat dass sie nach wird bei einer um am sind noch wie einem über "
          "so zum war haben nur oder aber",
    "fr": "le la les de des et un une du est en que qui dans pour pas au sur ne se ce il elle "
          "ils sont avec par plus son sa ses mais ou nous vous je tout été cette aux leur",
    "es": "el la de que y en los del se las por un para con no una su al lo como más pero sus "
          "le ya o este sí porque esta entre cuando muy sin sobre también me hasta hay donde",
    "it": "il di che e la per un in è del non una le si da sono con della al ma anche come "
          "lo dei alla gli nel ci più questo ha io tutto essere ho mi suo sua degli delle",
    "pt": "de a o que e do da em um para é com não uma os no se na por mais as dos como mas "
          "foi ao ele das tem à seu sua ou ser quando muito há nos já está eu também",
    "nl": "de het een en van in is dat op te zijn met voor niet aan er die maar om ook als "
          "dan bij nog wel uit naar heeft worden door hij ze je ik was wat al",
    "sv": "och i att det som en på är av för med till den har de inte om ett han men var "
          "jag sig från vi så kan man när år säger hon under också efter",
    "pl": "i w nie na się z do to że jest o jak po co tak za od ale czy przez jego już tylko "
          "dla być może są ten ich mnie było jej też tym",
    "ru": "и в не на я что он с как а то все она так его но да ты к у же вы за бы по только "
          "ее мне было вот от меня еще нет о из ему теперь когда",
    "uk": "і в не на що з я та як до у це він а але його ти так вона ми за від по ще же був "
          "коли їх бо вже мені й",
}
_STOP_SETS = {lang: frozenset(words.split()) for lang, words in STOP_WORDS.items()}
# word -> languages that list it; a shared word is split evenly between them
_WORD_LANGS: dict[str, tuple[str, ...]] = {}
for _lang, _words in _STOP_SETS.items():
    for _w in _words:
        _WORD_LANGS[_w] = _WORD_LANGS.get(_w, ()) + (_lang,)

# Scripts that (mostly) name one language; Latin and Cyrillic go to stop words.
_SCRIPTS = [("Latin", None), ("Cyrillic", None), ("Han", "zh"), ("Hiragana", "ja"),
            ("Katakana", "ja"), ("Hangul", "ko"), ("Arabic", "ar"), ("Hebrew", "he"),
            ("Greek", "el"), ("Devanagari", "hi"), ("Thai", "th")]
_SCRIPT_RE = {name: regex.compile(rf"\p{{Script={name}}}") for name, _ in _SCRIPTS}
_LETTER = regex.compile(r"\p{L}")
_WORD = regex.compile(r"\p{L}+")
MIN_STOP_DENSITY = 0.15  # below this share of stop words, evidence is scaled down
SAMPLE_CHARS = 20_000


def _sample(text: str) -> str:
    if len(text) <= SAMPLE_CHARS:
        return text
    third = SAMPLE_CHARS // 3  # beginning, middle and end: a preface can mislead
    mid = len(text) // 2
    return text[:third] + " " + text[mid:mid + third] + " " + text[-third:]


def identify(text: str) -> tuple[str, float]:
    sample = _sample(text)
    letters = len(_LETTER.findall(sample))
    if letters == 0:
        return "unknown", 0.0
    counts = {name: len(rx.findall(sample)) for name, rx in _SCRIPT_RE.items()}
    # Japanese mixes Han with kana; any real share of kana means Japanese.
    if counts["Hiragana"] + counts["Katakana"] > 0.1 * letters:
        return "ja", min(1.0, (counts["Hiragana"] + counts["Katakana"] + counts["Han"]) / letters)
    script = max(counts, key=counts.get)
    share = counts[script] / letters
    fixed = dict(_SCRIPTS)[script]
    if fixed is not None:
        return fixed, share
    words = [w.lower() for w in _WORD.findall(sample)]
    votes: dict[str, float] = {}
    hits = 0
    for w in words:
        langs = _WORD_LANGS.get(w)
        if langs:
            hits += 1
            for lang in langs:
                votes[lang] = votes.get(lang, 0.0) + 1.0 / len(langs)
    if not votes:
        return "unknown", 0.0
    best = max(votes, key=votes.get)
    agreement = votes[best] / hits
    density = hits / max(1, len(words))
    return best, share * agreement * min(1.0, density / MIN_STOP_DENSITY)
