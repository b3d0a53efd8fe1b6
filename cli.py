"""Command-line plumbing shared by every script: one dataclass -> argparse options.

docs/design.md's CLI contract: every option is `--name value` with dashes, built from one
dataclass per script, `--help` shows each default, `--config FILE.json` loads overrides,
and the resolved config is printed at start (and saved by the script next to its output).
Booleans get `--flag` / `--no-flag`.

Errors: library code raises `UserError` (or a subclass: every module's own error type for
bad input derives from it) and never exits; each script's `main` is wrapped in
`entry_point`, the one place that turns a UserError into one `error: ...` line and exit
code 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import types
import typing


class UserError(Exception):
    """A mistake in the user's input (bad option, path, file or checkpoint): reported as
    one line by `entry_point`, never as a traceback."""


def entry_point(main):
    """Decorate a script's `main(argv=None)`: a UserError ends the process with one
    `error: ...` line on stderr and exit code 2; any other exception is a bug and keeps
    its traceback."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return run


def _field_type(cls, field: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints[field.name]


def _parse_list(item_type):
    def parse(text: str):
        return [item_type(x) for x in text.split(",") if x != ""]
    return parse


def build_parser(cls, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="JSON file of option overrides")
    own = {n for n, t in cls.__dict__.get("__annotations__", {}).items() if "ClassVar" not in str(t)}
    # the script's own options first, then those it inherits from shared configs
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)
    for field in fields:
        name = "--" + field.name.replace("_", "-")
        ftype = _field_type(cls, field)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        # argparse %-formats help strings: escape user-visible percent signs
        help_text = (field.metadata.get("help") or getattr(cls, "help_texts", {}).get(field.name, "")).replace("%", "%%")
        default = str(default).replace("%", "%%")
        origin = typing.get_origin(ftype)
        args = typing.get_args(ftype)
        if origin in (typing.Union, types.UnionType) and type(None) in args:  # Optional[X] / X | None
            ftype = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(ftype), typing.get_args(ftype)
        if ftype is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {default})")
        elif origin is list:
            nargs = "+" if field.metadata.get("nargs") else None
            parse = args[0] if nargs else _parse_list(args[0])
            parser.add_argument(name, type=parse, nargs=nargs, default=None,
                                help=f"{help_text} (default: {default})")
        else:
            kwargs = {}
            if "choices" in field.metadata:
                kwargs["choices"] = field.metadata["choices"]
            parser.add_argument(name, type=ftype, default=None,
                                help=f"{help_text} (default: {default})", **kwargs)
    return parser


def parse_config(cls, argv=None, description: str = ""):
    """Defaults <- --config JSON <- command-line flags; returns a validated instance.
    Raises UserError for a bad --config file or value (argparse itself exits on bad
    flags, with its usage line, as every command-line tool does)."""
    parser = build_parser(cls, description)
    ns = parser.parse_args(argv)
    values = {}
    if ns.config:
        try:
            with open(ns.config, encoding="utf-8") as f:
                overrides = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read --config {ns.config}: {e}") from None
        if not isinstance(overrides, dict):
            raise UserError(f"--config {ns.config} must hold a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key, value in overrides.items():
            key = key.replace("-", "_")
            if key not in known:
                raise UserError(f"--config {ns.config}: unknown option {key!r}")
            is_list = typing.get_origin(hints[key]) is list
            if is_list and isinstance(value, str):
                value = [value]  # "input": "a.jsonl" means one path, not its characters
            elif is_list and not isinstance(value, list):
                raise UserError(f"--config {ns.config}: {key!r} must be a list")
            values[key] = value
    for field in dataclasses.fields(cls):
        value = getattr(ns, field.name)
        if value is not None:
            values[field.name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None


def config_dict(config) -> dict:
    return dataclasses.asdict(config)


def print_config(config, title: str = "config") -> None:
    print(f"{title}: " + json.dumps(config_dict(config), sort_keys=False))


# ----------------------------------------------------------------------------- option tables for the docs

OPTIONS_BEGIN, OPTIONS_END = "<!-- options table: generated from", "<!-- end of options table -->"


def options_table(cls) -> str:
    """A script's own options (not the ones every stage shares) as a markdown table of
    option, default and help: what a docs page shows, generated so it cannot drift."""
    import os
    repo = os.path.dirname(os.path.abspath(__file__))
    own = [n for n, t in cls.__dict__.get("__annotations__", {}).items() if "ClassVar" not in str(t)]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    lines = ["| option | default | what it does |", "|---|---|---|"]
    for name in own:
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, str) and default.startswith(repo + os.sep):
            default = os.path.relpath(default, repo)  # the repo's own paths, as a reader's checkout has them
        shown = "(none)" if default in ("", [], None) else f"`{default}`"
        help_text = _help_of(cls, name).replace("|", "\\|")
        choices = f.metadata.get("choices")
        if choices:
            help_text += (" " if help_text else "") + "(" + " / ".join(str(c) or '""' for c in choices) + ")"
        lines.append(f"| `--{name.replace('_', '-')}` | {shown} | {help_text} |")
    return "\n".join(lines) + "\n"


def _help_of(cls, name: str) -> str:
    """An option's help: its field's, or the nearest base class's (a stage that only
    changes a shared option's default keeps its meaning), or the help_texts table."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("help"):
            return f.metadata["help"]
    return getattr(cls, "help_texts", {}).get(name, "")


def options_block(spec: str) -> str:
    """The generated block for `module.ConfigClass` (e.g. train_sft.SFTConfig)."""
    import importlib
    module, _, name = spec.rpartition(".")
    return f"{OPTIONS_BEGIN} {spec} -->\n{options_table(getattr(importlib.import_module(module), name))}{OPTIONS_END}"


def update_options_tables(path: str) -> bool:
    """Regenerate every options block of a markdown page in place; True if it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    out, pos = [], 0
    while (start := text.find(OPTIONS_BEGIN, pos)) >= 0:
        end = text.find(OPTIONS_END, start)
        if end < 0:
            raise UserError(f"{path}: an options table without its end marker")
        spec = text[start + len(OPTIONS_BEGIN):text.find("-->", start)].strip()
        out += [text[pos:start], options_block(spec)]
        pos = end + len(OPTIONS_END)
    new = "".join(out) + text[pos:]
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text
