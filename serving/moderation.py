"""Moderation: the project's blocklist (data/toxicity.py) with OpenAI's categories, plus an
optional classifier (a scalar-head checkpoint read as P(unsafe))."""
from __future__ import annotations

import threading

import torch

from checkpoint import RewardScorer
from data.toxicity import ToxicityFilter

# OpenAI's moderation categories (the /v1/moderations response lists every one).
CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
              "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
              "violence/graphic")
# The categories of data/blocklist.txt's terms; a term of another list counts as harassment.
_SEXUAL = ("porn porno pornography pornhub xxx blowjob blowjobs handjob cumshot creampie gangbang dildo dildos "
           "masturbate masturbating masturbation milf hentai camgirl camgirls").split() + [
    "nude selfies", "sex cam", "sex chat", "hot singles", "escort service", "barely legal", "jerk off"]
TERM_CATEGORIES = {**{t: ("sexual",) for t in _SEXUAL},
                   "kill yourself": ("harassment/threatening", "self-harm/instructions"),
                   "go kill yourself": ("harassment/threatening", "self-harm/instructions")}


class Moderator:
    """Blocklist matches (any listed word or phrase flags the text; categories by term) plus an
    optional classifier. The blocklist part is cheap and thread-safe: the engine runs it on
    every output step."""

    def __init__(self, terms: list[str], classifier: "Classifier | None" = None):
        self.filter = ToxicityFilter(terms)
        self.classifier = classifier

    def blocklist_categories(self, text: str) -> list[str]:
        if self.filter.pattern is None:
            return []
        cats = set()
        for match in self.filter.pattern.findall(text):
            cats.update(TERM_CATEGORIES.get(" ".join(match.lower().split()), ("harassment",)))
        return sorted(cats)

    def check(self, text: str) -> dict:
        """{"flagged", "categories": [..], "scores": {category: score}} for one text."""
        cats = set(self.blocklist_categories(text))
        scores = {c: 1.0 for c in cats}
        if self.classifier is not None:
            p = self.classifier.probability(text)
            c = self.classifier.category
            scores[c] = max(scores.get(c, 0.0), p)
            if p >= self.classifier.threshold:
                cats.add(c)
        return {"flagged": bool(cats), "categories": sorted(cats), "scores": scores}


class Classifier:
    """A scalar-head checkpoint (model.ScalarHeadModel, e.g. trained by train_rm.py on
    safe/unsafe pairs) read as P(unsafe) = sigmoid(raw score) of the text as a user turn."""

    def __init__(self, ckpt: str, threshold: float, category: str, device="cpu"):
        self.scorer = RewardScorer.load(ckpt, device)
        self.threshold, self.category = threshold, category
        self.lock = threading.Lock()

    def probability(self, text: str) -> float:
        with self.lock:
            raw = self.scorer.score_conversations([[{"role": "user", "content": text}]], normalize=False)
        return float(torch.sigmoid(raw[0]))
