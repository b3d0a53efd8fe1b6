"""The named types requests travel as between the server's rooms: what the caller asked for
(`Prompt`, `SamplingParams`, both from protocol.py's parsing) and what the engine reports
back per token (`TokenLogprob`). A leaf: imports nothing of ours."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple


class TokenLogprob(NamedTuple):
    """One token's log-prob under the model (None for a prompt's first token, which nothing
    predicts) and the k likeliest alternatives at its position, (id, log-prob), likeliest first."""
    token: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class SamplingParams:
    """A request's sampling options, as protocol.parse_sampling checked them."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None  # None: no nucleus cut
    top_k: int | None = None  # None: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: each token's log-prob and the k likeliest alternatives
    echo: bool = False  # completions: the prompt comes back first (scored, with logprobs)

    def logged(self) -> dict:
        """As the request log keeps them (JSON: the stop strings as a list)."""
        return {k: v for k, v in asdict(self).items() if k != "stop"} | {"stop": list(self.stop)}


@dataclass
class Prompt:
    """One prompt as the model reads it, with what the server does around it."""
    ids: list[int]
    logged: dict  # what the request log keeps of it: {"messages": [...]} or {"prompt": ...}
    user_texts: list[str]  # what the input filter reads
    echo_text: str = ""  # completions with echo: the text the choice starts with
    echo_skip: int = 0  # prompt tokens not echoed (a string prompt's document-start token)
