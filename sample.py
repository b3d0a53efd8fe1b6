"""Generate text from any checkpoint directory (pretrain, SFT, RM trunk, PPO).

    python sample.py --ckpt runs/pretrain --prompt "ROMEO." --num-samples 3
    python sample.py --ckpt runs/sft --chat --prompt "What is 7 + 5?" --temperature 0
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from checkpoint import load_for_inference
from cli import UserError, entry_point, parse_config
from data.text.chat import encode_prompt
from distributed import resolve_device

REPO = os.path.dirname(os.path.abspath(__file__))


@dataclass
class SampleConfig:
    ckpt: str = field(default=os.path.join(REPO, "runs", "pretrain"), metadata={"help": "checkpoint directory"})
    prompt: str = field(default="", metadata={"help": "text to continue (a document start is added before it)"})
    chat: bool = field(default=False, metadata={"help": "wrap --prompt as a user turn of the chat template; stop at <|end|>"})
    system: str = field(default="", metadata={"help": "with --chat: a system message"})
    num_samples: int = 3
    max_new_tokens: int = 200
    temperature: float = field(default=0.8, metadata={"help": "0 = greedy"})
    top_k: int = field(default=50, metadata={"help": "0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1.0 = off)"})
    seed: int = 1337
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})

    def __post_init__(self):
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise UserError("--num-samples and --max-new-tokens must be positive")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(SampleConfig, argv, description=__doc__.split("\n")[0])
    device = resolve_device(cfg.device)
    model, tok, config = load_for_inference(cfg.ckpt, device=device)
    if cfg.chat:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
            [{"role": "user", "content": cfg.prompt}]
        prompt_ids, stop, shown_prompt = encode_prompt(tok, messages), [tok.end_id], ""
    else:
        prompt_ids, stop, shown_prompt = [tok.eot_id] + tok.encode(cfg.prompt), [tok.eot_id], cfg.prompt
    if len(prompt_ids) >= model.cfg.max_seq_len:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens; this model's context is {model.cfg.max_seq_len}")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    outputs = model.generate([prompt_ids] * cfg.num_samples, cfg.max_new_tokens, pad_id=tok.pad_id,
                             temperature=cfg.temperature, top_k=cfg.top_k or None,
                             top_p=cfg.top_p if cfg.top_p < 1 else None, stop_tokens=stop,
                             generator=generator)
    print(f"# {cfg.ckpt} (stage {config.get('stage', '?')}, step {config.get('step', '?')})")
    for i, ids in enumerate(outputs):
        text = tok.decode_reply(ids)
        if cfg.chat:
            print(f"--- sample {i + 1}\nuser: {cfg.prompt}\nassistant: {text}")
        else:
            print(f"--- sample {i + 1}\n{shown_prompt}{text}")


if __name__ == "__main__":
    main()
