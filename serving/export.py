"""The feedback export (`python serve.py --log-dir DIR --export-feedback FILE`): votes joined
with the chat completions they rate, from the store every replica shares, as
prompt/chosen/rejected records for the next reward model or DPO round (train_rm.py and
train_dpo.py --data). What cannot be used is a counted skip, by reason; a later vote by
the same key on the same two completions replaces the earlier one."""
from __future__ import annotations

import collections
import json
import os

from cli import UserError
from data.files import atomic_write
from serving.store import Store


class _Pairs:
    """Preference records built from served chat completions; what cannot be used is
    counted by reason in `skipped`."""

    def __init__(self, served: dict[str, dict]):
        self.served = served
        self.records: list[dict] = []
        self.seen: set[tuple[str, str]] = set()
        self.voted: set[frozenset] = set()  # completions compared side by side, ties included
        self.skipped: collections.Counter = collections.Counter()

    def usable(self, cid) -> dict | None:
        r = self.served.get(cid) if isinstance(cid, str) else None
        if r is None:
            self.skipped["unknown_or_not_chat"] += 1
        elif not r["completion"].strip():
            self.skipped["empty_completion"] += 1
        else:
            return r
        return None

    def add(self, chosen: dict, rejected: dict, kind: str) -> None:
        if chosen["messages"] != rejected["messages"]:
            self.skipped["different_prompts"] += 1
        elif chosen["completion"] == rejected["completion"]:
            self.skipped["same_text"] += 1
        elif (chosen["id"], rejected["id"]) not in self.seen:
            self.seen.add((chosen["id"], rejected["id"]))
            self.records.append({"prompt": chosen["messages"], "chosen": chosen["completion"],
                                 "rejected": rejected["completion"], "kind": kind,
                                 "source_ids": [chosen["id"], rejected["id"]]})

    def add_pairwise(self, fb: dict) -> None:
        a, b = (self.usable(i) for i in fb["ids"])
        if a is None or b is None:
            return
        self.voted.add(frozenset((a["id"], b["id"])))
        if fb.get("preferred") is None:  # a tie: no preference to learn from
            self.skipped["tie"] += 1
            return
        chosen, rejected = (a, b) if fb.get("preferred") == a["id"] else (b, a)
        self.add(chosen, rejected, "feedback_pairwise")

    def add_thumbs(self, ratings: dict[str, str]) -> None:
        """Every thumbs-up completion against every thumbs-down completion of the same messages,
        except two that a pairwise vote already compared: the rater's side-by-side verdict
        (a tie included) decides, not two thumbs each given on its own."""
        by_prompt: dict[str, dict[str, list]] = {}
        for cid, rating in ratings.items():
            r = self.usable(cid)
            if r is not None:
                key = json.dumps(r["messages"], sort_keys=True)
                by_prompt.setdefault(key, {"up": [], "down": []})[rating].append(r)
        for groups in by_prompt.values():
            if not groups["up"] or not groups["down"]:
                self.skipped["rating_without_opposite"] += len(groups["up"]) + len(groups["down"])
            for good in groups["up"]:
                for bad in groups["down"]:
                    if frozenset((good["id"], bad["id"])) in self.voted:
                        self.skipped["thumbs_of_a_voted_pair"] += 1
                    else:
                        self.add(good, bad, "feedback_thumbs")


def export_feedback(store: Store, out: str) -> dict:
    """Join the feedback with the completions it rates into train_rm.py records:
    {"prompt": messages, "chosen": str, "rejected": str, "kind": ...}.

    A pairwise vote gives one pair (both completions must answer the same messages; a tie
    gives none); a key's later vote on the same two completions replaces its earlier one. Thumbs are grouped by prompt: every thumbs-up completion against every
    thumbs-down completion of the same messages (a completion's latest rating counts), unless
    a vote compared those two (the vote decides: a tie vote with one thumb up and one down
    gives no pair). Only completed chat completions are exported; what cannot be used is
    counted by reason. The file is written whole or not at all."""
    feedback = store.feedback_records()
    if not feedback:
        raise UserError("no feedback in the serving store yet")
    pairs = _Pairs(store.served_chats())
    ratings: dict[str, str] = {}
    latest_vote = {}  # a user's later vote on the same two completions replaces the earlier one
    for i, fb in enumerate(feedback):
        if fb.get("type") == "pairwise" and isinstance(fb.get("ids"), list) and len(fb["ids"]) == 2:
            vote = (fb.get("key"), frozenset(map(str, fb["ids"])))
            if vote in latest_vote:
                pairs.skipped["replaced_by_a_later_vote"] += 1
            latest_vote[vote] = i
    for i, fb in enumerate(feedback):
        if fb.get("type") == "pairwise" and isinstance(fb.get("ids"), list) and len(fb["ids"]) == 2:
            if latest_vote[(fb.get("key"), frozenset(map(str, fb["ids"])))] == i:
                pairs.add_pairwise(fb)
        elif fb.get("type") == "rating" and fb.get("rating") in ("up", "down"):
            ratings[fb.get("id")] = fb["rating"]  # the latest rating of a completion wins
        else:
            pairs.skipped["malformed_feedback"] += 1
    pairs.add_thumbs(ratings)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write(out, "".join(json.dumps(rec, ensure_ascii=True) + "\n" for rec in pairs.records))
    return {"pairs": len(pairs.records), "by_kind": dict(collections.Counter(r["kind"] for r in pairs.records)),
            "skipped": dict(pairs.skipped)}
