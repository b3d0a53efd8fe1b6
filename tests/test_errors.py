"""Library code raises, entry points exit: a user mistake ends as one `error:` line and
exit code 2, a bug keeps its traceback, and only the entry-point machinery ends a process."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import evals
import checkpoint

ROOT = Path(__file__).resolve().parents[1]

# The only functions allowed to end the process: entry points (a script's `main`, e.g. a
# check that ends with exit code 1 when it fails), the decorator every main wears, and the
# gloo teardown (distributed.exit_skipping_finalization says why it must).
ALLOWED_EXITS = {("cli.py", "entry_point"), ("distributed.py", "exit_skipping_finalization")}


def process_exits(path: Path) -> list[tuple[str, int]]:
    """(enclosing top-level function, line) of every sys.exit / os._exit / exit / die call
    and every `raise SystemExit` in a source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for top in tree.body:
        name = getattr(top, "name", "<module>")
        for node in ast.walk(top):
            if isinstance(node, ast.Call):
                f = node.func
                dotted = (f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                          else getattr(f, "id", ""))
                if dotted in ("sys.exit", "os._exit", "exit", "quit", "die", "cli.die"):
                    found.append((name, node.lineno))
            elif isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if getattr(exc, "id", "") == "SystemExit":
                    found.append((name, node.lineno))
    return found


def test_no_process_exit_outside_the_entry_point_machinery():
    sources = [p for p in ROOT.rglob("*.py") if "tests" not in p.relative_to(ROOT).parts
               and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    assert len(sources) > 20
    offenders = [f"{p.relative_to(ROOT)}:{line} in {name}" for p in sources
                 for name, line in process_exits(p)
                 if name != "main" and (str(p.relative_to(ROOT)), name) not in ALLOWED_EXITS]
    assert not offenders, "library code must raise cli.UserError instead:\n" + "\n".join(offenders)


def test_the_scan_finds_exits(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import sys, os\ndef f():\n    sys.exit(1)\ndef g():\n    if x:\n        raise SystemExit(2)\n"
                    "def h():\n    os._exit(0)\ndef k():\n    die('no')\ndef fine():\n    raise ValueError\n")
    assert process_exits(path) == [("f", 3), ("g", 6), ("h", 8), ("k", 10)]


def test_entry_point_turns_a_user_error_into_one_line_and_lets_a_bug_through(capsys):
    @cli.entry_point
    def mistaken(argv=None):
        raise checkpoint.CheckpointError("runs/nothing is not a checkpoint (no config.json)")

    with pytest.raises(SystemExit) as exit_info:
        mistaken([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: runs/nothing is not a checkpoint (no config.json)\n"

    @cli.entry_point
    def buggy(argv=None):
        return {}["missing"]

    with pytest.raises(KeyError):
        buggy([])


def test_every_error_type_of_ours_is_a_user_error():
    from interop.weights import ConvertError
    from data.text.chat import RecordError
    from data.shards import DataDirError
    from data.text.tokenizer import TokenizerError
    for error in (checkpoint.CheckpointError, TokenizerError, DataDirError, RecordError, ConvertError):
        assert issubclass(error, cli.UserError), error


def test_a_script_reports_a_bad_checkpoint_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "evals.py", "--ckpt", str(tmp_path / "missing"), "--device", "cpu"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: checkpoint directory {tmp_path / 'missing'} does not exist"]


def test_a_bug_inside_a_script_keeps_its_traceback(monkeypatch, tmp_path):
    """evals.main with a loader that fails the way a bug does: the exception reaches the
    caller instead of becoming an `error:` line."""
    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch in a kernel")

    monkeypatch.setattr(evals, "load_for_inference", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        evals.main(["--ckpt", str(tmp_path), "--device", "cpu"])
