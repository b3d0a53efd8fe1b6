"""The documentation's links resolve, and the README stays a front page.

Every relative link in README.md, BENCHMARKS.md and docs/*.md must name a file or folder
of the repository, and its #anchor a heading of the target (GitHub's slugs); every page of
docs/ must be reachable from the README. The checker itself is tested on a tiny broken
tree, so a checker that finds nothing cannot pass unnoticed.
"""
import os
import re
import unicodedata
import urllib.parse

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 300

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
# [text](dest "title") and ![alt](dest); text may hold one level of brackets
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
HTML_ANCHOR = re.compile(r"""<a\s[^>]*\b(?:name|id)\s*=\s*["']([^"']+)["']""", re.I)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (github-slugger): the rendered text lowercased,
    everything but letters, digits, marks, spaces, '-' and '_' dropped, spaces -> '-'."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML renders as nothing
    text = text.strip().lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links and headings in code are not links)."""
    lines, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                and not line.strip()[len(m.group(1)):].strip():
            fence = None
        elif fence is None:
            lines.append(line)
    return lines


def anchors(path: str) -> set[str]:
    """Every #anchor a markdown file offers: heading slugs (repeats get -1, -2, ...) and
    explicit <a name/id> anchors."""
    with open(path, encoding="utf-8") as f:
        lines = prose_lines(f.read())
    found, seen = set(), {}
    headings = []
    for i, line in enumerate(lines):
        m = ATX.match(line)
        if m:
            headings.append(m.group(2))
        elif i > 0 and re.fullmatch(r" {0,3}(=+|-+)[ \t]*", line) and lines[i - 1].strip() \
                and not lines[i - 1].lstrip().startswith(("|", "-", "*", "#", ">")):
            headings.append(lines[i - 1].strip())  # a setext heading
        found.update(HTML_ANCHOR.findall(line))
    for heading in headings:
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found


def links(path: str) -> list[str]:
    """The link destinations of a markdown file, outside code blocks and code spans."""
    with open(path, encoding="utf-8") as f:
        prose = "\n".join(prose_lines(f.read()))
    prose = INLINE_CODE.sub("", prose)
    found = [m.group(1) for m in INLINE_LINK.finditer(prose)]
    found += [m.group(1) for m in REF_DEF.finditer(prose)]
    found += HTML_LINK.findall(prose)
    return [d[1:-1] if d.startswith("<") and d.endswith(">") else d for d in found]


def broken_links(path: str, root: str) -> list[str]:
    """The relative links of `path` that do not resolve inside `root`, each with why."""
    problems = []
    root = os.path.realpath(root)
    for dest in links(path):
        if SCHEME.match(dest) or dest.startswith("//"):
            continue  # a web address: not checked offline
        target, _, anchor = dest.partition("#")
        target = urllib.parse.unquote(target)
        if target.startswith("/"):
            resolved = os.path.join(root, target.lstrip("/"))
        elif target:
            resolved = os.path.join(os.path.dirname(path), target)
        else:
            resolved = path
        resolved = os.path.realpath(resolved)
        if os.path.commonpath([root, resolved]) != root:
            problems.append(f"{dest}: outside the repository")
        elif not os.path.exists(resolved):
            problems.append(f"{dest}: no such file")
        elif anchor:
            if not resolved.endswith(".md") or os.path.isdir(resolved):
                problems.append(f"{dest}: an anchor into a file that is not markdown")
            elif urllib.parse.unquote(anchor).lower() not in anchors(resolved):
                problems.append(f"{dest}: no heading with that anchor")
    return problems


def doc_files(root: str = ROOT) -> list[str]:
    files = [os.path.join(root, "README.md"), os.path.join(root, "BENCHMARKS.md")]
    docs = os.path.join(root, "docs")
    if os.path.isdir(docs):
        files += sorted(os.path.join(docs, n) for n in os.listdir(docs) if n.endswith(".md"))
    return files


# ---------------------------------------------------------------------------- the repo's docs

@pytest.mark.parametrize("path", doc_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(path):
    assert os.path.exists(path), f"{os.path.relpath(path, ROOT)} is missing"
    assert broken_links(path, ROOT) == []


def test_readme_is_a_front_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_every_docs_page_is_linked_from_the_readme():
    pages = [p for p in doc_files() if os.sep + "docs" + os.sep in p]
    assert pages, "docs/ holds no pages"
    readme = os.path.join(ROOT, "README.md")
    linked = {os.path.realpath(os.path.join(ROOT, urllib.parse.unquote(d.partition("#")[0])))
              for d in links(readme) if not SCHEME.match(d)}
    orphans = [os.path.relpath(p, ROOT) for p in pages if os.path.realpath(p) not in linked]
    assert orphans == [], f"docs pages not linked from README.md: {orphans}"


# ---------------------------------------------------------------------------- the checker itself

def test_github_slugs():
    assert github_slug("Stage 1: pretraining (`python train_pretrain.py`)") == \
        "stage-1-pretraining-python-train_pretrainpy"
    assert github_slug("Kernels — 2026-11-23") == "kernels--2026-11-23"
    assert github_slug("GPU: not measured (open)") == "gpu-not-measured-open"
    assert github_slug("What [the link](x.md) says, **bold**") == "what-the-link-says-bold"


def test_the_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "docs" / "page.md").write_text(
        "# A page\n\n## Same\n\n## Same\n\n<a id=\"custom\"></a>\n\ntext\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("\n".join([
        "# Front",
        "## Two words",
        "[ok file](code.py) [ok dir](docs/) [ok page](docs/page.md) [ok anchor](docs/page.md#same-1)",
        "[ok self](#two-words) [ok html](docs/page.md#custom) [web](https://example.com/missing.md)",
        "| table | [ok in a table](docs/page.md#a-page) |",
        "`[in code](missing-in-code.md)`",
        "```",
        "[in a fence](missing-in-fence.md)",
        "```",
        "[missing file](nope.py) [missing anchor](docs/page.md#same-2) [bad self](#one-word)",
        "[escape](../outside.md) [anchor into code](code.py#L1)",
        "[ref]: docs/gone.md",
    ]) + "\n", encoding="utf-8")
    problems = broken_links(str(tmp_path / "README.md"), str(tmp_path))
    assert [p.split(":")[0] for p in problems] == [
        "nope.py", "docs/page.md#same-2", "#one-word", "../outside.md", "code.py#L1", "docs/gone.md"]
    assert broken_links(str(tmp_path / "docs" / "page.md"), str(tmp_path)) == []


def test_the_main_jobs_commands_in_the_docs_are_the_ones_it_runs():
    """docs/pipeline.md lists the default job's commands; they are pipeline.py's own
    (`--dry-run`), so an option added to a stage cannot leave the page behind."""
    import pipeline
    with open(os.path.join(ROOT, "docs", "pipeline.md"), encoding="utf-8") as f:
        text = f.read()
    listed = [line for line in text.splitlines() if line.startswith("=== stage ")]
    assert listed == pipeline.planned_commands(pipeline.PipelineConfig())


REPO_PATH = re.compile(r"(?<![\w/.-])((?:docs|data|tests|serving|bench|deploy|fused_kernels|examples|static|\.ci)/"
                       r"[\w./-]*\w\.(?:md|py|json|jsonl|gz|txt|html|conf|yaml|yml|sh|css|js))")


def test_paths_named_in_the_code_exist():
    """A file of the repo named in a .py file (a docstring pointing at docs/design.md, a
    data file) exists: a moved or renamed page cannot leave the code pointing at nothing.
    This file's own checker tests use made-up names and are left out."""
    import glob
    missing = []
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, ROOT)
        if rel.split(os.sep)[0] in ("runs", "prepared") or rel == os.path.join("tests", "test_docs.py"):
            continue
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                missing += [f"{rel}:{number}: {name}" for name in REPO_PATH.findall(line)
                            if not os.path.exists(os.path.join(ROOT, name))]
    assert not missing, missing


def test_the_results_tables_are_the_run_of_records():
    """README.md and docs/results.md carry the results table of the committed run of
    record (docs/runs/<date>/report.json) as report_render.record_table renders it: a number
    edited by hand, or a new record without `python report.py --record ...`, fails here."""
    import glob

    import report_render
    records = sorted(glob.glob(os.path.join(ROOT, "docs", "runs", "*", "report.json")))
    assert records, "no run of record under docs/runs/"
    block = report_render.record_block(records[-1])  # the newest
    for page in report_render.RECORD_PAGES:
        with open(os.path.join(ROOT, page), encoding="utf-8") as f:
            text = f.read()
        assert block in text, f"{page}: its record table is not {os.path.relpath(records[-1], ROOT)}'s; run " \
                              f"python report.py --record {os.path.relpath(records[-1], ROOT)}"


def test_the_record_tables_are_rewritten_in_place(tmp_path):
    import json

    import report_render
    from cli import UserError
    stage = {"gold_accuracy": 0.5, "gold_accuracy_heldout_phrasing": 0.25, "kl_to_sft": 1.5, "round1": "ppo",
             "safety": {"harmful_refusal": 0.9, "borderline_over_refusal": 0.0, "benign_template_over_refusal": 0.05,
                        "open_request_over_refusal": 0.0}, "outside_everyday": {"over_refusal": 0.1},
             "win_rate_vs_sft": {"wins": 7, "losses": 2, "ties": 1, "p_value": 0.18},
             "win_rate_vs_ppo": {"wins": 1, "losses": 5, "ties": 4, "p_value": 0.22}}
    record = {"align": "ppo", "records": 10, "time_table": [{"seconds": 600.0}, {"seconds": 300.0}],
              "stages": {"sft": {**stage, "kl_to_sft": None}, "ppo": stage, "ppo_round2": stage,
                         "promotion": {"shipped": "ppo"}}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(record))
    (tmp_path / "docs").mkdir()
    for page in report_render.RECORD_PAGES:
        (tmp_path / page).write_text(f"# Page\n\n{report_render.RECORD_BEGIN} x` -->\nold numbers\n{report_render.RECORD_END}\n\nafter\n")
    assert report_render.update_record_pages(str(path), str(tmp_path)) == list(report_render.RECORD_PAGES)
    text = (tmp_path / "README.md").read_text()
    assert "old numbers" not in text and text.endswith("\n\nafter\n") and "| | SFT | PPO (shipped) | PPO round 2 |" in text
    assert "| helpfulness (8 families, held out) | 50.0% | 50.0% | 50.0% |" in text
    assert "| 7 / 2 (p = 0.18) | 1 / 5 (p = 0.22) |" in text and "the whole job 15.0 minutes" in text
    assert report_render.update_record_pages(str(path), str(tmp_path)) == []  # already current
    (tmp_path / "README.md").write_text("no markers")
    with pytest.raises(UserError, match="no record-table markers"):
        report_render.update_record_pages(str(path), str(tmp_path))


def test_the_options_tables_are_the_scripts_own():
    """A docs page's options table (between `<!-- options table: generated from
    module.Config -->` markers) is what cli.options_table renders from the script's config
    dataclass: an option added, removed or re-described in the code changes the page, by
    `python -c "import cli; cli.update_options_tables('docs/PAGE.md')"`."""
    import cli
    pages = [p for p in doc_files() if cli.OPTIONS_BEGIN in open(p, encoding="utf-8").read()]
    assert len(pages) >= 2
    for page in pages:
        text = open(page, encoding="utf-8").read()
        pos = 0
        while (start := text.find(cli.OPTIONS_BEGIN, pos)) >= 0:
            spec = text[start + len(cli.OPTIONS_BEGIN):text.find("-->", start)].strip()
            block = cli.options_block(spec)
            assert text[start:start + len(block)] == block, f"{os.path.relpath(page, ROOT)}: the {spec} table is stale"
            pos = start + len(block)
