"""What the server keeps: the request log (requests.jsonl) and the feedback log
(feedback.jsonl) under --log-dir, as JSON lines that replicas sharing the directory can
append to together; and the feedback export, which joins the two into
prompt/chosen/rejected records for the next reward model (train_rm.py --data)."""
from __future__ import annotations

import collections
import json
import os
import threading

import runtime
from cli import UserError

REQUESTS, FEEDBACK = "requests.jsonl", "feedback.jsonl"


class JsonlLog:
    """Append-only JSON lines. Each record is one os.write on an O_APPEND descriptor, so
    replicas sharing a --log-dir interleave whole lines."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
        with self.lock:
            os.write(self.fd, line)

    def has_id(self, record_id: str) -> bool:
        """Whether a record with this "id" is in the log (written by any replica)."""
        needle = json.dumps(record_id).encode()
        with open(self.path, "rb") as f:
            return any(needle in line and json.loads(line).get("id") == record_id for line in f)

    def close(self) -> None:
        os.close(self.fd)


def read_jsonl(path: str) -> list[dict]:
    """Every JSON object in a log; a broken line (a crash mid-write) is skipped."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw.decode("utf-8", "surrogatepass"))
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


# ----------------------------------------------------------------------------- the feedback export

class _Pairs:
    """Preference records built from served chat completions; what cannot be used is
    counted by reason in `skipped`."""

    def __init__(self, served: dict[str, dict]):
        self.served = served
        self.records: list[dict] = []
        self.seen: set[tuple[str, str]] = set()
        self.skipped: collections.Counter = collections.Counter()

    def usable(self, cid) -> dict | None:
        r = self.served.get(cid)
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
        if a is not None and b is not None:
            chosen, rejected = (a, b) if fb.get("preferred") == a["id"] else (b, a)
            self.add(chosen, rejected, "feedback_pairwise")

    def add_thumbs(self, ratings: dict[str, str]) -> None:
        """Every thumbs-up completion against every thumbs-down completion of the same messages."""
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
                    self.add(good, bad, "feedback_thumbs")


def export_feedback(log_dir: str, out: str) -> dict:
    """Join feedback.jsonl with requests.jsonl into train_rm.py records:
    {"prompt": messages, "chosen": str, "rejected": str, "kind": ...}.

    A pairwise vote gives one pair (both completions must answer the same messages). Thumbs
    are grouped by prompt: every thumbs-up completion against every thumbs-down completion of
    the same messages (a completion's latest rating counts). Only chat completions are
    exported; what cannot be used is counted by reason."""
    requests_path, feedback_path = os.path.join(log_dir, REQUESTS), os.path.join(log_dir, FEEDBACK)
    if not os.path.exists(feedback_path):
        raise UserError(f"no feedback in {log_dir} (no {FEEDBACK})")
    pairs = _Pairs({r["id"]: r for r in read_jsonl(requests_path) if isinstance(r.get("id"), str)
                    and r.get("endpoint") == "chat" and isinstance(r.get("completion"), str)})
    ratings: dict[str, str] = {}
    for fb in read_jsonl(feedback_path):
        if fb.get("type") == "pairwise" and isinstance(fb.get("ids"), list) and len(fb["ids"]) == 2:
            pairs.add_pairwise(fb)
        elif fb.get("type") == "rating" and fb.get("rating") in ("up", "down"):
            ratings[fb.get("id")] = fb["rating"]  # the latest rating of a completion wins
    pairs.add_thumbs(ratings)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    runtime.atomic_write(out, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in pairs.records))
    return {"pairs": len(pairs.records), "by_kind": dict(collections.Counter(r["kind"] for r in pairs.records)),
            "skipped": dict(pairs.skipped)}

