"""Our top-level import names must not shadow anything installed beside us.

Python puts the current directory first on sys.path when it runs from the repository root
(`python -c ...`, `python -m ...`, every script here), so a module `foo.py` or a folder
`foo/` of ours wins over an installed package that is also imported as `foo`. That is
how our old `kernels/` folder broke transformers, which imports Hugging Face's `kernels`
package (`ImportError: cannot import name ... from 'kernels'`). These tests compare our
top-level names with every installed distribution's and with the standard library's, so
the next clash fails here rather than in a user's environment.
"""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def our_top_level_names(root: Path) -> dict[str, str]:
    """Import name -> what defines it: top-level modules, regular packages, and folders
    of Python files importable as namespace packages (`python -m bench.x` style).
    tests/ is left out: pytest puts it on sys.path itself and nothing imports `tests`."""
    names = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith((".", "_")):
            continue
        if path.is_file() and path.suffix == ".py":
            names[path.stem] = path.name
        elif path.is_dir() and path.name != "tests" and any(path.glob("*.py")):
            names[path.name] = path.name + "/"
    return names


def clashes(ours: dict[str, str], installed: dict[str, list[str]], stdlib: frozenset) -> list[str]:
    """One line per name of ours that an installed distribution or the stdlib also uses."""
    found = []
    for name, where in sorted(ours.items()):
        if name in installed:
            found.append(f"{where} shadows the import name {name!r} of {', '.join(sorted(set(installed[name])))}")
        if name in stdlib:
            found.append(f"{where} shadows the standard library's {name!r}")
    return found


def test_no_top_level_name_shadows_an_installed_distribution():
    ours = our_top_level_names(ROOT)
    assert {"model", "data", "fused_kernels", "serve"} <= set(ours)  # the scan sees the repo
    installed = importlib.metadata.packages_distributions()
    found = clashes(ours, installed, frozenset(sys.stdlib_module_names))
    assert not found, "rename these (see fused_kernels/__init__.py for why):\n" + "\n".join(found)


def test_the_check_catches_a_clash(tmp_path):
    """The scan and the comparison find a clash when there is one: a fake repo with a
    `pytest.py`, a `kernels/` package and a `json/` folder of scripts."""
    (tmp_path / "pytest.py").write_text("")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "tool.py").write_text("")
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "page.html").write_text("")
    ours = our_top_level_names(tmp_path)
    assert ours == {"pytest": "pytest.py", "kernels": "kernels/", "json": "json/"}
    found = clashes(ours, {"pytest": ["pytest"], "kernels": ["kernels"]}, frozenset({"json"}))
    assert found == ["json/ shadows the standard library's 'json'",
                     "kernels/ shadows the import name 'kernels' of kernels",
                     "pytest.py shadows the import name 'pytest' of pytest"]
    real = clashes(ours, importlib.metadata.packages_distributions(), frozenset(sys.stdlib_module_names))
    assert any("'pytest' of pytest" in line for line in real)


def test_transformers_imports_from_the_repo_root():
    """What a user runs: `python -c "import transformers; from transformers import
    AutoModelForCausalLM"` in the repository root, as a fresh process."""
    pytest.importorskip("transformers")
    code = ("import importlib.util, transformers; from transformers import AutoModelForCausalLM; "
            "spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else '')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(ROOT) not in result.stdout  # `kernels` is Hugging Face's, not a folder of ours
