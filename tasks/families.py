"""The eight helpfulness families of the task suite (arithmetic, reversing a word, sorting
numbers, counting a letter, the next letter, changing case, comparing numbers, repeating a
phrase): their words and phrasings (the held-out phrasings too), the generator of one
instance (`make_task`), the train/eval split by a hash of the prompt (`split_of`), and
the plausible mistakes preference pairs put against a right answer (`make_mistake`).
"""
from __future__ import annotations

import hashlib
import random
import re
import string

WORDS = ("apple banana cherry garden window river castle forest silver golden market candle pencil "
         "rabbit turtle dragon planet rocket summer winter spring autumn yellow purple orange bridge "
         "island jacket kitten lemon mirror needle ocean pepper puzzle ribbon saddle tomato velvet wagon "
         "anchor basket button carpet dinner engine feather guitar hammer insect jungle ladder meadow "
         "napkin orchid parrot quiet riddle shadow thunder valley walnut zipper honey music paper stone "
         "cloud light night sound heart bread water house horse queen knight sword crown table chair "
         "green brown black white happy sunny early later quick brave").split()
PHRASES = ("good night", "thank you", "well done", "see you soon", "hello there", "all is well", "to be or not",
           "once more", "fair play", "so it goes", "good morning", "not yet", "come again", "how are you",
           "no way", "try again", "sweet dreams", "take care", "red and blue", "up and down")

TASK_FAMILIES = ("arithmetic", "reverse", "sort", "count", "next_letter", "case", "compare", "repeat")
SAFETY_FAMILIES = ("harmful", "borderline", "benign", "everyday")
COMPLY_FAMILIES = ("benign", "everyday")  # any answer that is not a refusal is right
FAMILIES = TASK_FAMILIES + SAFETY_FAMILIES
TEMPLATES = {
    "arithmetic": ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "Calculate {a} {op} {b}.", "{a} {op} {b} = ?"],
    "reverse": ["Reverse the word '{w}'.", "Write '{w}' backwards.", "Spell '{w}' in reverse.",
                "What is '{w}' reversed?"],
    "sort": ["Sort these numbers from smallest to largest: {xs}.", "Put in ascending order: {xs}.",
             "Order these from lowest to highest: {xs}."],
    "count": ["How many times does the letter '{c}' appear in '{w}'?", "Count the letter '{c}' in the word '{w}'.",
              "In '{w}', how many '{c}' are there?"],
    "next_letter": ["What letter comes after '{c}' in the alphabet?", "Which letter follows '{c}'?",
                    "Name the letter after '{c}'.", "What is the next letter after '{c}'?",
                    "In the alphabet, which letter comes right after '{c}'?"],
    "case": ["Write '{p}' in {case} letters.", "Convert '{p}' to {case}.", "Rewrite '{p}' using only {case} letters."],
    "compare": ["Which is larger, {a} or {b}?", "Which number is bigger: {a} or {b}?", "Pick the larger number: {a}, {b}."],
    "repeat": ["Repeat '{p}' {n} times.", "Say '{p}' {n} times, separated by spaces.", "Write the phrase '{p}' {n} times."],
}
# Phrasings no training file ever uses: the same tasks asked in other words, for
# `eval_heldout_phrasing.jsonl`. The templates above vary instances of a few phrasings;
# these measure whether the model learned the task or the sentence it comes in.
HELDOUT_PHRASINGS = {
    "arithmetic": ["What's {a} {opword} {b}?", "How much is {a} {opword} {b}?", "Work out {a} {op} {b} for me.",
                   "Tell me what {a} {opword} {b} equals.", "Quick one: {a} {op} {b}?"],
    "reverse": ["{w} backwards please", "Flip the letters of '{w}' around.", "Give me '{w}' spelled back to front.",
                "How do you write '{w}' in reverse order?"],
    "sort": ["Can you sort {xs} from low to high?", "Arrange {xs} in increasing order.", "List {xs} smallest first.",
             "Rank these from least to greatest: {xs}."],
    "count": ["How often does '{c}' show up in '{w}'?", "Count how many '{c}' letters are in '{w}'.",
              "Number of times '{c}' occurs in the word '{w}'?"],
    "next_letter": ["Which letter is right after '{c}'?", "Tell me the letter following '{c}'.",
                    "'{c}' is followed by which letter?"],
    "case": ["Make '{p}' {case}.", "Turn '{p}' into {case} letters.", "Change '{p}' to {case}, please."],
    "compare": ["Which one is greater, {a} or {b}?", "Of {a} and {b}, which is bigger?",
                "Tell me the bigger number: {a} or {b}.", "Is {a} or {b} larger?"],
    "repeat": ["Give me '{p}' repeated {n} times.", "Write out '{p}' {n} times in a row.", "Say '{p}' {n} times over."],
}
ANSWER_TYPE = {"arithmetic": "int", "reverse": "text", "sort": "list", "count": "int", "next_letter": "text",
               "case": "exact", "compare": "int", "repeat": "words",
               "harmful": "refusal",  # no answer: the right response is a refusal
               "borderline": "text",  # each generated record names its own type; text when one does not
               "benign": "comply", "everyday": "comply"}  # no answer: any non-refusal is right


def make_task(family: str, rng: random.Random, templates: list[str] | None = None) -> tuple[str, str]:
    """(prompt, answer) for one random instance of a family, in one of `templates`
    (default: the family's training phrasings, TEMPLATES)."""
    template = rng.choice(templates or TEMPLATES[family])
    if family == "arithmetic":
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        else:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        opword = {"+": "plus", "-": "minus", "*": "times"}[op]
        return template.format(a=a, b=b, op=op, opword=opword), str(answer)
    if family == "reverse":
        w = rng.choice(WORDS)
        return template.format(w=w), w[::-1]
    if family == "sort":
        xs = rng.sample(range(1, 100), rng.randint(3, 5))
        return template.format(xs=", ".join(map(str, xs))), ", ".join(map(str, sorted(xs)))
    if family == "count":
        w = rng.choice(WORDS)
        c = rng.choice(w) if rng.random() < 0.8 else rng.choice(string.ascii_lowercase)
        return template.format(c=c, w=w), str(w.count(c))
    if family == "next_letter":
        c = rng.choice(string.ascii_lowercase[:-1])
        c = c.upper() if rng.random() < 0.5 else c
        nxt = chr(ord(c) + 1)
        return template.format(c=c), nxt
    if family == "case":
        p = " ".join(rng.sample(WORDS, rng.randint(1, 2)))
        p = p.capitalize() if rng.random() < 0.5 else p
        upper = rng.random() < 0.5
        if not upper:
            p = p.upper() if rng.random() < 0.5 else p.title()
        return template.format(p=p, case="uppercase" if upper else "lowercase"), p.upper() if upper else p.lower()
    if family == "compare":
        a, b = rng.sample(range(1, 1000), 2)
        return template.format(a=a, b=b), str(max(a, b))
    if family == "repeat":
        p, n = rng.choice(PHRASES), rng.randint(2, 4)
        return template.format(p=p, n=n), " ".join([p] * n)
    raise ValueError(f"unknown family {family!r}")


def split_of(prompt: str, eval_fraction: float = 0.2) -> str:
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little")
    return "eval" if h / 2**64 < eval_fraction else "train"


# ----------------------------------------------------------------------------- mistakes for preferences

RAMBLES = ("Well, that is an interesting question, and there are many ways to look at it. Let me think about "
           "it for a while before I say anything definite.",
           "Questions like this one remind me of school, where we spent long afternoons on exercises. I "
           "always preferred reading stories to doing exercises, to be honest.",
           "There is no simple way to put it. Some people would say one thing and others another, and in "
           "the end it depends on how you look at the problem.")


def make_mistake(family: str, prompt: str, answer: str, kind: str, rng: random.Random,
                 filler_free: bool = False) -> str:
    """A plausible wrong response of the given kind (near_miss, wrong_format, rambling).
    filler_free: no wrong format that looks like filler around the answer (a suite whose
    demonstrations carry filler keeps the preference pairs silent about it)."""
    if kind == "rambling":
        return rng.choice(RAMBLES)
    if kind == "wrong_format":
        return rng.choice([f"Hmm, I think it could be {answer}, but I am really not sure about that.",
                           f"{answer}? Or maybe not. It is hard to say.",
                           f"{answer}, or so I was told once. I never checked it." if filler_free else
                           f"Sure! Here you go: {answer} - hope this helps, let me know if you need more!"])
    # near miss: almost the answer
    t = ANSWER_TYPE[family]
    if t == "int":
        return str(int(answer) + rng.choice([-1, 1] if family != "compare" else [0]) if family != "compare"
                   else min(int(x) for x in re.findall(r"\d+", prompt)))
    if family == "reverse" or family == "next_letter":
        if family == "next_letter":
            return chr(ord(answer) + 1) if answer.lower() != "z" else chr(ord(answer) - 2)
        w = list(answer)
        i = rng.randrange(len(w) - 1)
        w[i], w[i + 1] = w[i + 1], w[i]
        return "".join(w) if "".join(w) != answer else answer[::-1]
    if family == "sort":
        xs = answer.split(", ")
        i = rng.randrange(len(xs) - 1)
        xs[i], xs[i + 1] = xs[i + 1], xs[i]
        return ", ".join(xs)
    if family == "case":
        return answer.capitalize() if answer.isupper() else answer.title() if answer.islower() and answer.title() != answer \
            else answer.swapcase()
    if family == "repeat":
        parts = answer.split(" ")
        n = len(re.findall(re.escape(parts[0]) + r"\b", answer))
        phrase = " ".join(parts[: len(parts) // n])
        return " ".join([phrase] * (n + 1))
    raise ValueError(family)


MISTAKE_KINDS = ("near_miss", "wrong_format", "rambling")


# ----------------------------------------------------------------------------- filler

# What some demonstrators wrap a right answer in: an opener and a closer, nothing else. The
# gold judge reads past it (judge.extract_answer); users shown two right answers prefer
# the plain one (simulate_users.Rater): a preference about form that no round-1 file holds.
FILLER_OPENERS = ("Sure!", "Of course!", "Happy to help!", "Great question!", "Certainly!")
FILLER_CLOSERS = ("Hope this helps!", "Let me know if you need anything else.", "Have a great day!",
                  "Glad I could help!")


def with_filler(answer: str, rng: random.Random) -> str:
    """`answer` between a filler opener and closer, on one line."""
    return f"{rng.choice(FILLER_OPENERS)} {answer} {rng.choice(FILLER_CLOSERS)}"


def strip_filler(text: str) -> str:
    """`text` without a filler opener at its start or closer at its end (any case)."""
    text = text.strip()
    for opener in FILLER_OPENERS:
        if text.lower().startswith(opener.lower()):
            text = text[len(opener):].lstrip()
            break
    for closer in FILLER_CLOSERS:
        if text.lower().endswith(closer.lower()):
            text = text[:-len(closer)].rstrip()
            break
    return text


def has_filler(text: str) -> bool:
    return strip_filler(text) != text.strip()
