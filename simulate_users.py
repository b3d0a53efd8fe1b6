"""Simulated users: a clearly-labelled STAND-IN for people rating a deployed model.

No person rates anything here. A traffic file of user prompts is drawn from the task
suite's generators (tasks/suite.py: the eight helpfulness families plus the harmlessness
families, round-robin, deduplicated; never a held-out prompt: a prompt that
`split_of` puts in the eval split, or that the suite's eval file holds, is drawn again).
A client that behaves like an application sends each prompt to a running `serve.py` over
HTTP and asks for two sampled answers (two requests with n=1: the server supports only
n=1), some streamed and some not; 429/503 and dropped connections are retried with
backoff, and what still fails is counted as skipped by reason, never lost silently.

Raters judge the two answers with the gold judge (`tasks.suite.grade`: on a harmful
request a refusal is right) and post to /v1/feedback a pairwise vote for the better one
and a thumb up or down on each answer. Like people, they do not always agree with the
judge: each judgement is flipped with probability `--rater-noise` (default 0.2, close to
the ~73% inter-labeler agreement InstructGPT reports, Ouyang et al. 2022), decided by a
seeded hash of the judgement, so a run is reproducible and the realised rate is exact to
test. When the judge scores both answers the same, the users' own preference, which no
round-1 file holds, may decide: of two right answers to a helpfulness task they prefer the
one without filler ("Sure! 42 Hope this helps!" against "42"), noise applying as to any
vote. Otherwise (both wrong, or both right and alike) the rater votes "tie" (the chat
page's Tie button): the store keeps it, the export makes no pair of it, and no noise
applies to it (there is no preference to flip). The thumbs are logged
too, but the export lets a vote decide over the thumbs on the same two answers, so here
every pair comes from a vote.

    python serve.py --ckpt runs/ppo --log-dir runs/serve &
    python simulate_users.py --url http://127.0.0.1:8000 --prompts 200
    python serve.py --log-dir runs/serve --export-feedback runs/feedback/prefs.jsonl

Writes --traffic-out (the prompts: prompt, messages, family, answer), a ratings log next
to it (what each simulated user saw and posted) and --summary-out (counts, the noise and
the realised disagreement); prints one summary line.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cli import UserError, config_dict, entry_point, parse_config
from data.files import atomic_write
from tasks import everyday, novel
from tasks.rater import Rater, unit
from tasks.rl_prompts import prompt_texts, rejection
from tasks.suite import ANSWER_TYPE, FAMILIES, SAFETY_FAMILIES, make_task

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_EXCLUDE = os.path.join(REPO, "prepared", "tasks", "eval.jsonl")
RETRY_STATUSES = (429, 502, 503, 504)


@dataclass
class SimConfig:
    url: str = field(default="http://127.0.0.1:8000", metadata={"help": "a running serve.py (its /v1 is added)"})
    api_key: str = field(default="", metadata={"help": "bearer key for a keyed server (never printed or logged)"})
    model: str = field(default="", metadata={"help": "model id to ask for (default: the server's first, /v1/models)"})
    prompts: int = field(default=200, metadata={"help": "user prompts in the traffic"})
    seed: int = field(default=0, metadata={"help": "seeds the traffic, the samples' seeds, streaming and the raters"})
    families: list[str] = field(default_factory=lambda: list(FAMILIES), metadata={
        "help": "task families to draw prompts from, round-robin (comma-separated)"})
    exclude: str = field(default="", metadata={
        "help": "JSONL of held-out task records whose prompts never go out (default: the suite's "
                "prepared/tasks/eval.jsonl when present)"})
    novel_share: float = field(default=0.0, metadata={
        "help": "share of the prompts drawn from the new request kind's traffic pool (tasks/novel.py: privacy and "
                "copyright requests and their look-alikes, in turn); the rest from --families"})
    traffic_only: bool = field(default=False, metadata={"help": "write the traffic file and stop (no server)"})
    traffic_out: str = field(default=os.path.join(REPO, "runs", "feedback", "traffic.jsonl"), metadata={
        "help": "the traffic (JSONL); the ratings log goes next to it as <name>.ratings.jsonl"})
    summary_out: str = field(default="", metadata={"help": "summary JSON (default: <traffic-out>.summary.json)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of both answers"})
    max_tokens: int = field(default=32, metadata={"help": "max_tokens of each answer (evals.py's default)"})
    stream_share: float = field(default=0.5, metadata={"help": "share of the completions requested as streams"})
    concurrency: int = field(default=4, metadata={"help": "users talking to the server at once (threads)"})
    rater_noise: float = field(default=0.2, metadata={
        "help": "probability that a rater disagrees with the gold judge (vote flipped, thumb inverted)"})
    retries: int = field(default=4, metadata={"help": "retries of a request after 429/5xx or a dropped connection"})
    backoff: float = field(default=0.5, metadata={"help": "seconds before the first retry, doubling (or Retry-After)"})
    timeout: float = field(default=120.0, metadata={"help": "seconds one HTTP request may take"})

    def __post_init__(self):
        if self.prompts < 1:
            raise UserError(f"--prompts must be at least 1, got {self.prompts}")
        if not 0 <= self.rater_noise <= 1:
            raise UserError(f"--rater-noise must be a probability in [0, 1], got {self.rater_noise}")
        if not 0 <= self.novel_share <= 1:
            raise UserError(f"--novel-share must be in [0, 1], got {self.novel_share}")
        if not 0 <= self.stream_share <= 1:
            raise UserError(f"--stream-share must be in [0, 1], got {self.stream_share}")
        if not 0 <= self.temperature <= 2:
            raise UserError(f"--temperature must be in [0, 2], got {self.temperature}")
        if self.max_tokens < 1 or self.concurrency < 1 or self.retries < 0 or self.backoff < 0 or self.timeout <= 0:
            raise UserError("need --max-tokens >= 1, --concurrency >= 1, --retries >= 0, --backoff >= 0, --timeout > 0")
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown or not self.families:
            raise UserError(f"--families must name some of {', '.join(FAMILIES)}; unknown: {', '.join(unknown)}")
        if not self.url.startswith(("http://", "https://")):
            raise UserError(f"--url must start with http:// or https://, got {self.url[:200]!r}")
        self.url = self.url.rstrip("/").removesuffix("/v1")

    def shown(self) -> dict:
        """The config as printed and saved: the key is never written anywhere."""
        return {**config_dict(self), "api_key": "***" if self.api_key else ""}


# ----------------------------------------------------------------------------- traffic

def draw_prompt(family: str, rng: random.Random) -> dict:
    """One task record from the generators' training pools: what grade() needs, and the prompt."""
    if family in SAFETY_FAMILIES:
        r = everyday.make_request(family, rng, "train")
        return {**r, "answer": r.get("answer")}  # harmful, benign and everyday requests have none
    prompt, answer = make_task(family, rng)
    return {"family": family, "answer_type": ANSWER_TYPE[family], "prompt": prompt, "answer": answer}


NOVEL_KINDS = {"privacy": novel.make_privacy, "copyright": novel.make_copyright, "lookalike": novel.make_lookalike}


def build_traffic(n: int, seed: int, families: list[str], exclude: set = frozenset(),
                  tries: int = 2000, novel_share: float = 0.0) -> tuple[list[dict], Counter]:
    """(n distinct training prompts, families taken in turn, as task records with messages;
    rejected draws by reason). With novel_share, that share of the slots (chosen by a
    seeded hash of the slot) holds the new request kind instead, its kinds in turn, from
    its traffic pools only. A family whose prompts run out (no new one in `tries` draws)
    drops out of the rotation; UserError when all have."""
    rng = random.Random(f"{seed}:traffic")
    live = list(families) + (list(NOVEL_KINDS) if novel_share > 0 else [])
    rng.shuffle(live)
    traffic, seen, rejected = [], set(), Counter()
    turn = Counter()  # slots so far of the task families and of the new kind
    while len(traffic) < n:
        wants_novel = unit(f"{seed}:novel:{len(traffic)}") < novel_share
        pool = [f for f in live if (f in NOVEL_KINDS) == wants_novel]
        if not pool:
            if not live:
                raise UserError(f"only {len(traffic)} distinct training prompts exist in --families "
                                f"{','.join(families)}: ask for fewer --prompts")
            pool = live  # one side ran out: the other fills the slot
        family = pool[turn[wants_novel] % len(pool)]
        for _ in range(tries):
            rec = {**NOVEL_KINDS[family](rng, "train"), "novel": True} if family in NOVEL_KINDS else \
                draw_prompt(family, rng)
            reason = rejection(rec["prompt"], seen, exclude)
            if reason is None:
                break
            rejected[reason] += 1
        else:
            live.remove(family)
            continue
        turn[wants_novel] += 1
        seen.add(rec["prompt"])
        traffic.append({"id": f"traffic/{len(traffic)}", **rec,
                        "messages": [{"role": "user", "content": rec["prompt"]}]})
    return traffic, rejected


def load_excluded(path: str) -> set[str]:
    """The prompts of a task file (the suite's eval.jsonl): none of them may go out. The
    default file is optional; a file named with --exclude must exist."""
    if not path:
        if not os.path.isfile(DEFAULT_EXCLUDE):
            return set()
        path = DEFAULT_EXCLUDE
    return prompt_texts([path], label="--exclude ")


# ----------------------------------------------------------------------------- the HTTP client

class Skip(Exception):
    """A request that could not be done (after retries where retrying makes sense)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _error_code(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read().decode("utf-8"))["error"]["code"] or "")
    except (ValueError, KeyError, TypeError, OSError):
        return ""


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    try:
        return float(err.headers.get("Retry-After"))
    except (TypeError, ValueError):
        return None


def read_stream(resp) -> dict:
    """A chat completion's server-sent events reassembled: {"id", "text", "finish_reason"}."""
    cid, parts, reason = None, [], None
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return {"id": cid, "text": "".join(parts), "finish_reason": reason}
        event = json.loads(data)
        if "error" in event:
            raise Skip("stream_error")
        cid = event.get("id", cid)
        for choice in event.get("choices") or []:
            parts.append((choice.get("delta") or {}).get("content") or "")
            reason = choice.get("finish_reason") or reason
    raise ConnectionError("the stream ended before [DONE]")


class Client:
    """What an application does over HTTP (urllib, no proxies): JSON requests with a bearer
    key, streams read as server-sent events, transient failures (429, 502-504, a dropped
    connection) retried with exponential backoff or the server's Retry-After (capped)."""

    def __init__(self, url: str, api_key: str = "", timeout: float = 120.0, retries: int = 4,
                 backoff: float = 0.5, max_wait: float = 10.0):
        self.url, self.timeout, self.retries, self.backoff, self.max_wait = url, timeout, retries, backoff, max_wait
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _once(self, method: str, path: str, body: dict | None, stream: bool):
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, headers=self.headers, method=method)
        with self.opener.open(req, timeout=self.timeout) as resp:
            return read_stream(resp) if stream else json.loads(resp.read().decode("utf-8"))

    def call(self, method: str, path: str, body: dict | None = None, stream: bool = False):
        """The response's JSON (or the reassembled stream); Skip(reason) when it failed."""
        for attempt in range(self.retries + 1):
            wait = None
            try:
                return self._once(method, path, body, stream)
            except urllib.error.HTTPError as e:
                code = _error_code(e)
                reason = f"http_{e.code}" + (f"_{code}" if code else "")
                if e.code not in RETRY_STATUSES or code == "key_blocked":  # blocked for many minutes: no point
                    raise Skip(reason) from None
                wait = _retry_after(e)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                    TimeoutError) as e:
                reason = "timeout" if "timed out" in str(e) else "connection"
            except (ValueError, UnicodeDecodeError):
                raise Skip("bad_response") from None
            if attempt < self.retries:
                time.sleep(min(self.max_wait, wait if wait is not None else self.backoff * 2 ** attempt))
        raise Skip(reason)

    def first_model(self) -> str:
        """The id of the server's first model; UserError when the server cannot be reached."""
        try:
            models = self.call("GET", "/v1/models")
        except Skip as e:
            raise UserError(f"cannot use serve.py at {self.url}: GET /v1/models failed ({e.reason})") from None
        try:
            return models["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{self.url}/v1/models lists no model: is it a serve.py?") from None


# ----------------------------------------------------------------------------- the users

class Users:
    """The simulated users of one run: each takes a prompt of the traffic, asks the server
    for two answers, and rates them (a vote on the pair, a thumb on each answer)."""

    def __init__(self, client: Client, rater: Rater, cfg: SimConfig, model: str):
        self.client, self.rater, self.cfg, self.model = client, rater, cfg, model

    def answer(self, i: int, j: int, record: dict) -> dict:
        """Answer j of prompt i: {"id", "text", "finish_reason", "streamed"}; Skip when it failed."""
        seed = self.cfg.seed
        stream = unit(f"stream:{seed}:{i}:{j}") < self.cfg.stream_share
        body = {"model": self.model, "messages": record["messages"], "temperature": self.cfg.temperature,
                "max_tokens": self.cfg.max_tokens, "seed": int(unit(f"sample:{seed}:{i}:{j}") * 2**31)}
        if stream:
            body["stream"] = True
        got = self.client.call("POST", "/v1/chat/completions", body, stream=stream)
        if not stream:
            try:
                choice = got["choices"][0]
                got = {"id": got["id"], "text": choice["message"]["content"] or "",
                       "finish_reason": choice.get("finish_reason")}
            except (KeyError, IndexError, TypeError):
                raise Skip("bad_response") from None
        if not isinstance(got.get("id"), str) or not isinstance(got.get("text"), str):
            raise Skip("bad_response")
        return {**got, "streamed": stream}

    def post(self, body: dict, counts: Counter) -> bool:
        try:
            self.client.call("POST", "/v1/feedback", body)
            return True
        except Skip as e:
            counts[f"skip:feedback_{e.reason}"] += 1
            return False

    def vote(self, i: int, record: dict, answers: list[dict], counts: Counter) -> dict:
        a, b = answers
        given, gold = self.rater.judge_pair(record, a["text"], b["text"], key=f"{i}")
        preferred = {"a": a["id"], "b": b["id"], None: "tie"}[given]
        posted = self.post({"ids": [a["id"], b["id"]], "preferred": preferred}, counts)
        if posted:
            counts["votes" if given else "ties"] += 1
            counts["judged"] += given is not None
            counts["disagreed"] += given != gold
            counts["preference_votes"] += gold is not None and self.rater.plain_preferred(record, a["text"],
                                                                                          b["text"]) is not None
        return {"given": given or "tie", "gold": gold or "tie", "posted": posted}

    def thumb(self, i: int, j: int, record: dict, answer: dict, counts: Counter) -> None:
        given, gold = self.rater.judge_answer(record, answer["text"], key=f"{i}:{j}")
        counts["right"] += gold == "up"
        posted = self.post({"id": answer["id"], "rating": given}, counts)
        if posted:
            counts["thumbs"] += 1
            counts["judged"] += 1
            counts["disagreed"] += given != gold
        answer.update(gold=gold, thumb=given, posted=posted)

    def session(self, i: int, record: dict) -> tuple[Counter, dict]:
        """One user and one prompt: (counts, the ratings log's line)."""
        counts, answers = Counter(), []
        for j in range(2):
            try:
                answers.append(self.answer(i, j, record))
            except Skip as e:
                counts[f"skip:completion_{e.reason}"] += 1
        counts["completions"] += len(answers)
        counts["streamed"] += sum(a["streamed"] for a in answers)
        vote = self.vote(i, record, answers, counts) if len(answers) == 2 else None
        if len(answers) < 2:
            counts["skip:vote_missing_answer"] += 1
        for j, answer in enumerate(answers):
            self.thumb(i, j, record, answer, counts)
        return counts, {"id": record["id"], "family": record["family"], "answers": answers, "vote": vote}

    def run(self, traffic: list[dict], concurrency: int) -> tuple[Counter, list[dict]]:
        total, log = Counter(), []
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            for counts, line in pool.map(self.session, range(len(traffic)), traffic):
                total.update(counts)
                log.append(line)
        return total, log


# ----------------------------------------------------------------------------- the CLI

def summarize(counts: Counter, traffic: list[dict], cfg: SimConfig, model: str, seconds: float) -> dict:
    """The run in numbers (pipeline.py's stages.feedback reads prompts, votes, rater_noise;
    its pairs come from the export)."""
    judged = counts["judged"]
    return {"simulated": True, "prompts": len(traffic), "completions": counts["completions"],
            "streamed": counts["streamed"], "votes": counts["votes"], "ties": counts["ties"],
            "preference_votes": counts["preference_votes"],
            "thumbs": counts["thumbs"],
            "skipped": {k[len("skip:"):]: v for k, v in sorted(counts.items()) if k.startswith("skip:")},
            "rater_noise": cfg.rater_noise, "judgements": judged, "disagreements": counts["disagreed"],
            "realised_disagreement": counts["disagreed"] / judged if judged else None,
            "answers_right": counts["right"] / counts["completions"] if counts["completions"] else None,
            "families": dict(sorted(Counter(r["family"] for r in traffic).items())),
            "novel": dict(sorted(Counter(r["kind"] for r in traffic if r.get("novel")).items())), "model": model,
            "seconds": round(seconds, 2), "config": cfg.shown()}


def summary_line(s: dict, path: str) -> str:
    skipped = sum(s["skipped"].values())
    reasons = " (" + ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) + ")" if skipped else ""
    realised = "n/a" if s["realised_disagreement"] is None else f"{s['realised_disagreement']:.3f}"
    return (f"simulated users (a stand-in for people): {s['prompts']} prompts, {s['completions']} completions "
            f"({s['streamed']} streamed), {s['votes']} votes, {s['ties']} ties, {s['thumbs']} thumbs, "
            f"skipped {skipped}{reasons}; rater noise {s['rater_noise']:g}, realised disagreement {realised} "
            f"over {s['judgements']} judgements in {s['seconds']:.1f}s -> {path}")


def write_out(path: str, text: str) -> None:
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, text)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None


def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def output_paths(cfg: SimConfig) -> tuple[str, str]:
    """(the ratings log, the summary): next to the traffic file unless --summary-out says."""
    stem = cfg.traffic_out[:-len(".jsonl")] if cfg.traffic_out.endswith(".jsonl") else cfg.traffic_out
    return stem + ".ratings.jsonl", cfg.summary_out or stem + ".summary.json"


@entry_point
def main(argv=None) -> dict | None:
    cfg = parse_config(SimConfig, argv, description=__doc__.split("\n")[0])
    print("config: " + json.dumps(cfg.shown()))
    traffic, redrawn = build_traffic(cfg.prompts, cfg.seed, cfg.families, load_excluded(cfg.exclude),
                                     novel_share=cfg.novel_share)
    write_out(cfg.traffic_out, jsonl(traffic))
    print(f"traffic: {len(traffic)} prompts -> {cfg.traffic_out} (redrawn: "
          + (", ".join(f"{k} {v}" for k, v in sorted(redrawn.items())) or "none") + ")")
    if cfg.traffic_only:
        return None
    client = Client(cfg.url, cfg.api_key, cfg.timeout, cfg.retries, cfg.backoff)
    model = cfg.model or client.first_model()
    start = time.time()
    counts, log = Users(client, Rater(cfg.rater_noise, cfg.seed), cfg, model).run(traffic, cfg.concurrency)
    summary = summarize(counts, traffic, cfg, model, time.time() - start)
    ratings_path, summary_path = output_paths(cfg)
    write_out(ratings_path, jsonl(log))
    write_out(summary_path, json.dumps(summary, indent=2) + "\n")
    print(summary_line(summary, summary_path))
    if not summary["completions"]:
        raise UserError(f"no completion succeeded at {cfg.url}: skipped " + json.dumps(summary["skipped"]))
    return summary


if __name__ == "__main__":
    main()
