"""Helpers for the data.prepare tests (test_prepare, test_prepare_ray, test_governance,
test_filters): synthetic English prose and other documents, and readers of a prepared
directory's outputs."""
import json
import os
import random

import numpy as np

from data.prepare import main
from data.shards import load_split, read_meta
from data.text.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "data", "corpus", "shakespeare.jsonl.gz")

# ----------------------------------------------------------------------------- synthetic English prose

ADJ = ("old quiet bright narrow distant heavy gentle broken silver patient careful hidden wooden "
       "ancient sudden curious modest crowded empty golden").split()
NOUN = ("river village teacher garden window market captain harbor letter mountain kitchen soldier "
        "farmer library bridge engine forest lantern painter doctor merchant station valley island museum").split()
VERB = "watched carried followed painted repaired visited crossed described noticed remembered opened built measured guarded studied".split()
PREP = "near across behind beyond under above beside through toward along".split()
ADV = "slowly quietly early later often rarely again carefully suddenly finally".split()
CONN = ["Later that year", "In the morning", "After the storm", "Before the winter", "For many years",
        "At the end of the day", "Without a word", "By the evening"]


def _sentence(r: random.Random) -> str:
    a, n = (lambda: r.choice(ADJ)), (lambda: r.choice(NOUN))
    k = r.randrange(4)
    if k == 0:
        return f"The {a()} {n()} {r.choice(VERB)} the {a()} {n()} {r.choice(PREP)} the {n()}."
    if k == 1:
        return f"{r.choice(CONN)}, a {a()} {n()} {r.choice(ADV)} {r.choice(VERB)} the {n()} of the {a()} {n()}."
    if k == 2:
        return (f"It was said that the {n()} and the {n()} {r.choice(VERB)} a {a()} {n()} "
                f"{r.choice(PREP)} the {a()} {n()}.")
    return f"Nobody {r.choice(VERB)} the {n()} with the {a()} {n()}, so the {n()} {r.choice(ADV)} {r.choice(VERB)} it."


def prose(seed: int, words: int = 100) -> str:
    """Varied English prose of at least `words` words, in paragraphs; already normalized."""
    r = random.Random(seed)
    sentences, n = [], 0
    while n < words:
        s = _sentence(r)
        sentences.append(s)
        n += len(s.split())
    return "\n\n".join(" ".join(sentences[i:i + 4]) for i in range(0, len(sentences), 4))


GERMAN = (
    "Der alte Lehrer wohnte viele Jahre in einem kleinen Dorf am Rande des Waldes. Jeden Morgen ging er "
    "mit seinem Hund zum Fluss und las dort in einem Buch, das er von seinem Vater bekommen hatte. Das Buch "
    "hieß „The History of the River and the Valley“ und war schon sehr alt. Die Kinder aus dem Dorf kamen oft "
    "zu ihm, weil er ihnen Geschichten über die Berge, die Händler auf dem Markt und die Soldaten an der "
    "Brücke erzählte. Im Winter war es sehr kalt, aber er saß trotzdem am Fenster und schrieb lange Briefe an "
    "seine Schwester in der Stadt. Sie antwortete nicht immer, doch er war nie traurig darüber. Am Abend "
    "kochte er eine einfache Suppe und hörte Musik im Radio, bis er müde wurde und schlafen ging. So vergingen "
    "die Jahre, und niemand im Dorf konnte sich an eine Zeit erinnern, in der er nicht dort gewesen war.")


def blocklist_words():
    path = os.path.join(REPO, "data", "blocklist.txt")
    with open(path, encoding="utf-8") as f:
        words = [l.split("#", 1)[0].strip() for l in f]
    return [w for w in words if w and " " not in w]


def toxic_doc() -> str:
    r = random.Random(7)
    bad = blocklist_words()
    words = prose(77, 120).split(" ")
    for i in range(0, len(words), 10):
        words[i] = words[i] + " " + r.choice(bad)
    return " ".join(words)


def replace_words(text: str, positions, seed: int) -> str:
    """Change a few words (at the given word positions) of a one-space-separated text."""
    r = random.Random(seed)
    parts = text.split(" ")
    for p in positions:
        parts[p] = r.choice([w for w in NOUN + ADJ if w != parts[p].strip(".,")])
    return " ".join(parts)


EMAIL_1, EMAIL_2 = "jane.doe@example.com", "support@harbor-museum.org"
PHONE_1, PHONE_2 = "+44 20 7946 0958", "(415) 555-0132"


def write_jsonl(path, objs):
    with open(path, "w", encoding="utf-8") as f:
        for o in objs:
            f.write(json.dumps(o) + "\n")


# ----------------------------------------------------------------------------- reading outputs

def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def split_tokens(out, split) -> np.ndarray:
    arrays = load_split(str(out), split)
    return np.concatenate([np.asarray(a) for a in arrays]) if arrays else np.zeros(0, dtype=np.int64)


def decoded_documents(out, split) -> list[str]:
    """The documents of a stream-layout split: every document starts with eot."""
    meta = read_meta(str(out))
    tok = Tokenizer.load(os.path.join(out, "tokenizer.json"))
    ids = split_tokens(out, split).tolist()
    if not ids:
        return []
    assert ids[0] == meta["eot_id"]
    docs, current = [], None
    for t in ids:
        if t == meta["eot_id"]:
            if current is not None:
                docs.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    docs.append(tok.decode(current))
    return docs


def run_main(argv):
    main([str(a) for a in argv])


def assert_one_error_line(err: str):
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
