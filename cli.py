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
