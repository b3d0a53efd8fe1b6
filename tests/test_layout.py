"""The house's layout (docs/design.md, "Rooms"): every import of the repo's own modules,
lazy ones inside functions included, points down the layers, there is no circle, and the
inference side (serving, sampling, evaluation, conversion) never loads the trainer, even
through another module. Read from the source with `ast`, as an import-graph tool would."""
from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = ("tests", "bench", "runs", "prepared", "examples", "deploy", "docs", "static", ".git")

# Lowest first. A module may import its own layer's modules and those below, never above.
LAYERS = [
    r"cli|data\.files|data\.parallel",  # leaves: options, atomic files, worker pools
    r"data\.text(\..*)?|fused_kernels(\..*)?",  # text as the models see it; the kernels
    r"model|tasks(\..*)?|data(\.(?!text|files|parallel)\w+)?",  # the model; the task suite; curation
    r"distributed|checkpoint|progress",  # processes and devices; the checkpoint format; progress lines
    r"trainer|evals|serving(\..*)?|interop(\..*)?",  # training; evaluation; serving; conversion
    r"train_\w+|sample|serve|convert|simulate_users|report\w*|stages|promotion|onpolicy",  # the scripts
    r"pipeline",  # the main job
]
INFERENCE = ("serve", "sample", "evals", "convert", "serving", "interop")


def modules() -> dict[str, str]:
    """{module name: path} of every Python module of the repo outside tests and benchmarks."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = os.path.relpath(dirpath, ROOT)
        dirnames[:] = [d for d in dirnames if (rel, d) != (".", d) or d not in SKIP]
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        for f in filenames:
            if f.endswith(".py"):
                name = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(dirpath, f)
    return found


def imports(path: str, name: str, known: set[str]) -> set[str]:
    """The repo modules `path` imports (`import a.b`, `from a import b`, relative or not)."""
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".")[:-node.level] if not path.endswith("__init__.py") else \
                    name.split(".")[:len(name.split(".")) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layer_of(name: str) -> int:
    for i, pattern in enumerate(LAYERS):
        if re.fullmatch(pattern, name):
            return i
    raise AssertionError(f"{name} is in no layer of tests/test_layout.py: add it where it belongs")


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def test_every_import_points_down_the_layers():
    g = graph()
    upward = [(a, b) for a, targets in g.items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, upward


def test_there_is_no_circle():
    g, state, circles = graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(g[node]):
            if state.get(nxt) == "open":
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not circles, circles


def test_inference_never_loads_the_trainer():
    g = graph()

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in g[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    inference = [m for m in g if m.split(".")[0] in INFERENCE]
    assert {"serve", "sample", "evals", "convert", "serving.app", "interop.hf"} <= set(inference)
    loads = {m: sorted(reach(m) & {"trainer", "progress"} | {x for x in reach(m) if x.startswith("train_")})
             for m in inference}
    assert not {m: v for m, v in loads.items() if v}, loads


def test_the_checker_sees_an_upward_import_and_a_circle(tmp_path):
    """The checks above can fail: a module of a lower layer importing a higher one, and two
    modules importing each other, are found."""
    (tmp_path / "low.py").write_text("def f():\n    from high import g\n")
    (tmp_path / "high.py").write_text("import low\n")
    known = {"low", "high"}
    assert imports(str(tmp_path / "low.py"), "low", known) == {"high"}
    assert imports(str(tmp_path / "high.py"), "high", known) == {"low"}
    assert layer_of("cli") < layer_of("pipeline")
