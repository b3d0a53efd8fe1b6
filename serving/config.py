"""serve.py's options (one dataclass, docs/design.md's CLI contract) and the paths it uses."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from cli import UserError
from data.toxicity import DEFAULT_BLOCKLIST
from serving.moderation import CATEGORIES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATIC_PAGE = os.path.join(REPO, "static", "chat.html")


@dataclass
class ServeConfig:
    ckpt: str = field(default=os.path.join(REPO, "runs", "ppo"), metadata={"help": "checkpoint directory to serve"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0: every interface)"})
    port: int = 8000
    api_keys: str = field(default="", metadata={"help": "file with one API key per line (empty: an open server)"})
    log_dir: str = field(default=os.path.join(REPO, "runs", "serve"),
                         metadata={"help": "the default store (serve.db: SQLite) goes here; replicas of one "
                                           "machine share it by sharing --log-dir"})
    db: str = field(default="", metadata={"help": "the serving store: empty for LOG_DIR/serve.db, a SQLite path, or "
                                                  "postgresql://user:pass@host/db for replicas on several machines"})
    store_timeout_s: float = field(default=5.0, metadata={
        "help": "longest wait for the store (a locked or stalled database fails the request with 503 "
                "store_unavailable after this; /health never waits for it, /ready does)"})
    identity_secret_file: str = field(default="", metadata={
        "help": "secret that keys the stored identities (HMAC of keys and addresses); empty: one kept in the "
                "store, shared by its replicas. Give a file (the same on every replica) to keep it out of the "
                "database"})
    forwarded_allow_ips: str = field(default="", metadata={
        "help": "addresses whose X-Forwarded-For is trusted for the client address (comma-separated, as "
                "uvicorn's; 127.0.0.1 behind a local nginx). Empty: none, the peer's own address counts"})
    request_log: bool = field(default=True, metadata={
        "help": "keep each request's messages and completion in the store (the feedback export needs them)"})
    export_feedback: str = field(default="", metadata={
        "help": "write the store's feedback as prompt/chosen/rejected JSONL to this file and exit"})
    served_model_name: str = field(default="", metadata={"help": "model id (default: <checkpoint dir>-step<N>)"})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})
    threads: int = field(default=0, metadata={"help": "torch CPU threads for the model (0: on CPU every core but "
                                                      "one, which is left to the HTTP side; torch's default on CUDA)"})
    dtype: str = field(default="auto", metadata={"choices": ["auto", "float32", "bfloat16"],
                                                 "help": "auto: float32 on CPU, bfloat16 on CUDA"})
    quantization: str = field(default="none", metadata={
        "choices": ["none", "int8"],
        "help": "int8: weights stored as int8 with a scale per output channel (CPU; matmul inputs in bfloat16): "
                "~3x faster decoding at small batch, answers close to but not always the float32 ones"})
    max_running: int = field(default=16, metadata={"help": "rows in the running batch"})
    max_waiting: int = field(default=64, metadata={"help": "queued requests beyond the batch (then 503)"})
    max_tokens_limit: int = field(default=0, metadata={"help": "largest max_tokens a request may ask (0: the context)"})
    max_request_bytes: int = 1_000_000
    max_messages: int = 64
    max_message_chars: int = 32_000
    rate_limit_rpm: float = field(default=600.0, metadata={"help": "requests per minute per key (0: off)"})
    rate_limit_tpm: float = field(default=200_000.0, metadata={
        "help": "tokens (prompt + max_tokens, unused refunded) per minute per key (0: off)"})
    moderation: bool = field(default=True, metadata={"help": "filter input (400 content_filter) and output"})
    blocklist: str = field(default=DEFAULT_BLOCKLIST, metadata={"help": "blocklist file (data/toxicity.py's format)"})
    classifier: str = field(default="", metadata={
        "help": "optional scalar-head checkpoint whose sigmoid(score) is P(unsafe)"})
    classifier_threshold: float = 0.5
    classifier_category: str = "harassment"
    abuse_max_flags: int = field(default=5, metadata={
        "help": "flagged requests within --abuse-window-s that block a key (0: never block)"})
    abuse_window_s: float = 600.0
    abuse_block_s: float = 900.0
    access_log: bool = field(default=False, metadata={"help": "uvicorn's access log (paths only, never keys)"})

    def __post_init__(self):
        if self.export_feedback:
            return
        if not 0 < self.port < 65536 and self.port != 0:
            raise UserError(f"--port must be in 1..65535, got {self.port}")
        for name in ("max_running", "max_request_bytes", "max_messages", "max_message_chars"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.max_waiting < 0 or self.max_tokens_limit < 0 or self.rate_limit_rpm < 0 or self.rate_limit_tpm < 0:
            raise UserError("--max-waiting, --max-tokens-limit and the rate limits must be >= 0")
        if self.abuse_max_flags < 0 or self.abuse_window_s <= 0 or self.abuse_block_s < 0:
            raise UserError("need --abuse-max-flags >= 0, --abuse-window-s > 0, --abuse-block-s >= 0")
        if not self.store_timeout_s > 0:
            raise UserError(f"--store-timeout-s must be > 0, got {self.store_timeout_s}")
        if not 0 < self.classifier_threshold < 1:
            raise UserError("--classifier-threshold must be in (0, 1)")
        if self.classifier_category not in CATEGORIES:
            raise UserError(f"--classifier-category must be one of {', '.join(CATEGORIES)}")

    @property
    def ckpt_name(self) -> str:
        """The checkpoint directory's own name (a request may name the model by it)."""
        return os.path.basename(os.path.normpath(self.ckpt))
