"""Converters between our checkpoints and other tools' formats, as one CLI over interop/:

Hugging Face interop: our checkpoints <-> Hugging Face model directories.

    python convert.py to-hf --ckpt runs/ppo --out hf/ppo        # then transformers, or `vllm serve hf/ppo`
    python convert.py from-hf --hf ~/models/SmolLM --out runs/smol  # then `python train_sft.py --init runs/smol`
    python convert.py to-gguf --ckpt runs/ppo --out ppo.gguf      # then `llama-server -m ppo.gguf` (--outtype f16, q8_0)

`to-hf` and `from-hf` are interop/hf.py (the weight tables they share: interop/weights.py),
`to-gguf` is interop/gguf.py; each module's docstring says how the mapping works.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from cli import UserError, entry_point, parse_config, print_config
from interop.gguf import GGUF_OUTTYPES, export_gguf
from interop.hf import export_hf, import_hf
from interop.weights import DTYPES

REPO = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- CLI

@dataclass
class ToHFConfig:
    ckpt: str = field(default=os.path.join(REPO, "runs", "ppo"), metadata={"help": "our checkpoint directory"})
    out: str = field(default="", metadata={"help": "Hugging Face directory to write (required)"})
    dtype: str = field(default="float32", metadata={"choices": list(DTYPES), "help": "weight dtype of the export"})

    def __post_init__(self):
        if not self.out:
            raise UserError("--out is required (the Hugging Face directory to write)")


@dataclass
class FromHFConfig:
    hf: str = field(default="", metadata={"help": "local Hugging Face model directory (required; "
                                                  "nothing is downloaded)"})
    out: str = field(default="", metadata={"help": "our checkpoint directory to write (required)"})
    max_seq_len: int = field(default=0, metadata={"help": "cap the context (0: the model's max_position_embeddings)"})

    def __post_init__(self):
        if not self.hf or not self.out:
            raise UserError("--hf and --out are required")
        if self.max_seq_len < 0:
            raise UserError("--max-seq-len must be >= 0")


@dataclass
class ToGGUFConfig:
    ckpt: str = field(default=os.path.join(REPO, "runs", "ppo"), metadata={"help": "our checkpoint directory"})
    out: str = field(default="", metadata={"help": "GGUF file to write (required), e.g. model.gguf"})
    outtype: str = field(default="f32", metadata={"choices": list(GGUF_OUTTYPES),
                                                  "help": "weight type of the matrices (norms stay f32)"})

    def __post_init__(self):
        if not self.out:
            raise UserError("--out is required (the GGUF file to write)")


COMMANDS = {"to-hf": (ToHFConfig, "our checkpoint -> Hugging Face directory (transformers, vLLM)"),
            "to-gguf": (ToGGUFConfig, "our Llama-style checkpoint -> one GGUF file (llama.cpp)"),
            "from-hf": (FromHFConfig, "local Hugging Face directory (Llama, Mistral, Qwen2, GPT-2) -> our checkpoint")}


@entry_point
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: python convert.py {to-hf,to-gguf,from-hf} [options]   (python convert.py to-hf --help)\n" + \
        "\n".join(f"  {name:8s} {text}" for name, (_, text) in COMMANDS.items())
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return
    if not argv:
        raise UserError("no command: use to-hf, to-gguf or from-hf (python convert.py --help)")
    if argv[0] not in COMMANDS:
        raise UserError(f"unknown command {argv[0]!r}: use to-hf, to-gguf or from-hf")
    config_class, text = COMMANDS[argv[0]]
    cfg = parse_config(config_class, argv[1:], description=text)
    print_config(cfg, f"convert {argv[0]} config")
    try:
        if argv[0] == "to-hf":
            lines = export_hf(cfg.ckpt, cfg.out, cfg.dtype)
        elif argv[0] == "to-gguf":
            lines = export_gguf(cfg.ckpt, cfg.out, cfg.outtype)
        else:
            lines = import_hf(cfg.hf, cfg.out, cfg.max_seq_len, train_config={"command": "from-hf", **vars(cfg)})
    except (OSError, ValueError) as e:  # a file that cannot be read or written, a value a library refused
        raise UserError(str(e)) from None
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
