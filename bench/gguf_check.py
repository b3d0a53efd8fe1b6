"""llama.cpp check of `python convert.py to-gguf`: the GGUF file loads in llama-server, its
chat template and tokenizer give our prompt ids, and its greedy answers are our greedy ids.

    python -m bench.gguf_check --llama-server /tmp/llamacpp/.../build/bin/llama-server
    python -m bench.gguf_check --llama-server PATH --ckpt runs/sft --outtype q8_0

Exports --ckpt (or, without one, a throwaway Llama-style model with random weights far
from init and the prepared shakespeare tokenizer: greedy decoding then has no near-ties)
to GGUF, starts llama-server on it (`--jinja`, one slot, CPU), and for each chat prompt:

1. renders it with the GGUF's chat template (POST /apply-template) and tokenizes the text
   (POST /tokenize, special tokens parsed): must equal data.text.chat.encode_prompt's ids;
2. tokenizes the prompt's plain text (special-token text stays text): must equal
   Tokenizer.encode's ids;
3. sends our prompt ids to POST /completion (temperature 0, top_k 1, cache_prompt false,
   return_tokens) and compares the token ids with model.generate(temperature=0), both
   cut at the first end-of-generation token (<|end|> or <|endoftext|>, which llama.cpp
   both treats as end of generation).

Prints one line per prompt and a summary; exit code 1 when anything differs. f32 exports
should match exactly; f16 and q8_0 change the logits slightly, so a greedy answer may part
ways at a near-tie (reported, not hidden).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import torch

from interop import gguf
from checkpoint import load_model, save_checkpoint
from distributed import Env
from serving.launch import LlamaServerProcess
from cli import UserError, entry_point, parse_config, print_config
from data.text.chat import encode_prompt
from data.text.tokenizer import Tokenizer
from model import ModelConfig, Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "prepared", "shakespeare", "tokenizer.json")
PROMPTS = [
    [{"role": "user", "content": "What light through yonder window breaks?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Reverse: ab 🙂 cd"}],
    [{"role": "user", "content": "Which number is bigger: 836 or 469?"}],
    [{"role": "user", "content": "Sort: 3, 1, 2\n\nThen say  'done'.  "}],
    [{"role": "user", "content": "To be, or not to be"}, {"role": "assistant", "content": "that is the question"},
     {"role": "user", "content": "Whether 'tis nobler in the mind to suffer?"}],
    [{"role": "user", "content": "Don't you think we'll see <b>HTML</b> & code: x+=1; y = f(x)*2"}],
]


@dataclass
class CheckConfig:
    llama_server: str = field(default="llama-server", metadata={
        "help": "the llama-server binary (a path, or a name on PATH)"})
    ckpt: str = field(default="", metadata={
        "help": "our Llama-style checkpoint (empty: a throwaway random model with the prepared shakespeare tokenizer)"})
    outtype: str = field(default="f32", metadata={"choices": list(gguf.GGUF_OUTTYPES), "help": "to-gguf --outtype"})
    max_new_tokens: int = field(default=16, metadata={"help": "greedy tokens per prompt"})
    threads: int = field(default=2, metadata={"help": "llama-server --threads"})
    timeout: float = field(default=120.0, metadata={"help": "seconds to wait for llama-server to load the model"})
    keep: str = field(default="", metadata={"help": "also keep the GGUF file here"})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be positive")
        path = shutil.which(self.llama_server)
        if path is None:
            raise UserError(f"--llama-server {self.llama_server!r} is not an executable (docs/interop.md: "
                            "building llama-server from the llama-cpp-python source distribution)")
        self.llama_server = path


def throwaway_checkpoint(root: str) -> str:
    """A Llama-style model (GQA, untied) with random weights far from init, stage sft."""
    if not os.path.isfile(TOKENIZER):
        raise UserError(f"no tokenizer at {TOKENIZER} for the throwaway model: pass --ckpt")
    tok = Tokenizer.load(TOKENIZER)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=128,
                                    max_seq_len=256, rope_theta=10000.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if p.ndim == 1 else 0.15 * noise)
    out = os.path.join(root, "ckpt")
    os.makedirs(out)
    tok.save(os.path.join(out, "tokenizer.json"))
    save_checkpoint(out, model, None, Env(0, 0, 1, torch.device("cpu")), stage="sft", step=0,
                            train_config={}, trainer_state={}, tokenizer_path=os.path.join(out, "tokenizer.json"))
    return out


def post(url: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def cut(ids: list[int], stops: set[int]) -> list[int]:
    """ids up to (not including) the first end-of-generation token."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


def check_prompt(url: str, model: Transformer, tok: Tokenizer, messages: list[dict], n: int) -> dict:
    ids = encode_prompt(tok, messages)
    rendered = post(url + "/apply-template", {"messages": messages})["prompt"]
    their_prompt = post(url + "/tokenize", {"content": rendered, "add_special": False, "parse_special": True})["tokens"]
    text = "\n".join(m["content"] for m in messages)
    their_text = post(url + "/tokenize", {"content": text, "add_special": False, "parse_special": False})["tokens"]
    r = post(url + "/completion", {"prompt": ids, "n_predict": n, "temperature": 0, "top_k": 1,
                                   "cache_prompt": False, "return_tokens": True, "seed": 0})
    stops = {tok.end_id, tok.eot_id}
    ours = model.generate([ids], n, pad_id=tok.pad_id, temperature=0, stop_tokens=sorted(stops))[0]
    ours, theirs = cut(ours, stops), cut(r["tokens"], stops)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return {"prompt_ids": their_prompt == ids, "text_ids": their_text == tok.encode(text),
            "greedy": ours == theirs, "same": same, "ours": ours, "theirs": theirs, "stop_type": r.get("stop_type")}


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(CheckConfig, argv, description="llama.cpp check of convert.py to-gguf")
    print_config(cfg, "gguf_check config")
    root = tempfile.mkdtemp(prefix="gguf_check_")
    proc = None
    try:
        ckpt = cfg.ckpt or throwaway_checkpoint(root)
        gguf_path = os.path.join(root, f"model-{cfg.outtype}.gguf")
        for line in gguf.export_gguf(ckpt, gguf_path, cfg.outtype):
            print(line)
        if cfg.keep:
            shutil.copyfile(gguf_path, cfg.keep)
        model, _ = load_model(ckpt)
        model.eval()
        tok = Tokenizer.load(os.path.join(ckpt, "tokenizer.json"))
        proc = LlamaServerProcess(cfg.llama_server, gguf_path, os.path.join(root, "server.log"),
                                  model.cfg.max_seq_len, threads=cfg.threads, timeout_s=cfg.timeout)
        url = proc.url
        results = []
        for i, messages in enumerate(PROMPTS):
            with torch.no_grad():
                r = check_prompt(url, model, tok, messages, cfg.max_new_tokens)
            results.append(r)
            print(f"prompt {i}: template+tokenize {'==' if r['prompt_ids'] else '!='} encode_prompt, "
                  f"text {'==' if r['text_ids'] else '!='} encode, greedy {'==' if r['greedy'] else '!='} "
                  f"({len(r['theirs'])} tokens, llama.cpp stop: {r['stop_type']}): {r['theirs']}"
                  + ("" if r["greedy"] else f" vs ours {r['ours']} (the first {r['same']} agree)"))
    finally:
        if proc is not None:
            proc.stop()
        shutil.rmtree(root, ignore_errors=True)
    ok = {k: sum(r[k] for r in results) for k in ("prompt_ids", "text_ids", "greedy")}
    print(f"summary ({cfg.outtype}): chat template + tokenizer {ok['prompt_ids']}/{len(results)}, "
          f"plain-text tokenizer {ok['text_ids']}/{len(results)}, greedy ids {ok['greedy']}/{len(results)} "
          f"(tokens agreeing before any difference: {sum(r['same'] for r in results)}/"
          f"{sum(max(len(r['ours']), len(r['theirs'])) for r in results)})")
    if min(ok.values()) < len(results):
        sys.exit(1)


if __name__ == "__main__":
    main()
