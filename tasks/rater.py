"""The simulated rater, a stand-in for a person judging answers: the gold judge's verdict
(tasks/judge.py), disagreed with at a set rate, plus the users' own preference about form
(plain answers over filler) where the judge sees no difference. simulate_users.py sends
the traffic and posts what the rater says.
"""
from __future__ import annotations

import hashlib

from tasks.families import TASK_FAMILIES, has_filler
from tasks.judge import grade


def unit(text: str) -> float:
    """A uniform number in [0, 1) from a string: seeded decisions that do not depend on the
    order in which threads get to them."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2**64


class Rater:
    """A simulated person who rates answers: the gold judge's verdict, disagreed with at
    probability `noise`. Each judgement's coin is a hash of (seed, key), so a judgement
    is reproducible whatever the order; without a key the calls are numbered in order.
    Pure: no HTTP, no state but the call counter."""

    def __init__(self, noise: float, seed: int = 0):
        if not 0 <= noise <= 1:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        self.noise, self.seed, self.calls = noise, seed, 0

    def disagrees(self, key: str) -> bool:
        return unit(f"rater:{self.seed}:{key}") < self.noise

    def _key(self, kind: str, key: str | None) -> str:
        if key is None:
            key, self.calls = f"call{self.calls}", self.calls + 1
        return f"{kind}:{key}"

    @staticmethod
    def plain_preferred(record: dict, answer_a: str, answer_b: str, grades: tuple | None = None) -> str | None:
        """The users' own preference, which no round-1 file holds: of two right answers to a
        helpfulness task, the one without filler ("Sure! ... Hope this helps!"); None when
        it does not decide. `grades`: the judge's scores of the two, when already known."""
        if record.get("family") not in TASK_FAMILIES:
            return None
        if (grades or (grade(record, answer_a), grade(record, answer_b))) != (1.0, 1.0):
            return None
        fa, fb = has_filler(answer_a), has_filler(answer_b)
        return None if fa == fb else "b" if fa else "a"

    def judge_pair(self, record: dict, answer_a: str, answer_b: str, key: str | None = None) -> tuple:
        """(the rater's vote, the verdict it stands for): the gold judge's, or on a tie the
        users' preference (plain_preferred); "a", "b", or None when neither decides (a tie,
        which no noise flips)."""
        ga, gb = grade(record, answer_a), grade(record, answer_b)
        gold = None if ga == gb else "a" if ga > gb else "b"
        if gold is None:
            gold = self.plain_preferred(record, answer_a, answer_b, (ga, gb))
        key = self._key("vote", key)
        if gold is None:
            return None, None
        return ({"a": "b", "b": "a"}[gold] if self.disagrees(key) else gold), gold

    def judge_answer(self, record: dict, answer: str, key: str | None = None) -> tuple[str, str]:
        """(the rater's thumb, the judge's): "up" for a right answer, "down" otherwise."""
        gold = "up" if grade(record, answer) == 1.0 else "down"
        if self.disagrees(self._key("thumb", key)):
            return {"up": "down", "down": "up"}[gold], gold
        return gold, gold

    def vote(self, record: dict, answer_a: str, answer_b: str, key: str | None = None) -> str | None:
        return self.judge_pair(record, answer_a, answer_b, key)[0]

    def thumb(self, record: dict, answer: str, key: str | None = None) -> str:
        return self.judge_answer(record, answer, key)[0]
