"""Data governance in `python -m data.prepare` (data/governance.py): sources with licence and
consent, the opt-out / licence / consent filters, the mixture by domain, decontamination
against evaluation files, the representation probe, and DATA_CARD.md agreeing with
report.json."""
import json
import re

import pytest

from data import governance
from prepare_helpers import assert_one_error_line, decoded_documents, prose, read_json, run_main, write_jsonl

BASE = ["--workers", 1, "--vocab-size", 300, "--val-fraction", 0, "--decontaminate", "none"]


def removed_by_id(out) -> dict:
    with open(out / "removed.jsonl", encoding="utf-8") as f:
        return {e["id"]: e for e in map(json.loads, f)}


def write_sources(path, entries):
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- licence, consent, opt-out

@pytest.fixture(scope="module")
def governed(tmp_path_factory):
    """Two sources: `web` (file default: CC-BY-4.0, consent unknown) whose records override
    their licence, consent or URL, and `books` (MIT, public domain); an opt-out list naming
    a document id, a URL and a domain."""
    d = tmp_path_factory.mktemp("governed")
    web = [{"id": "w-ok", "text": prose(1, 90), "consent": "licensed"},
           {"id": "w-unknown-consent", "text": prose(2, 90)},
           {"id": "w-gpl", "text": prose(3, 90), "license": "GPL-3.0-only", "consent": "licensed"},
           {"id": "w-opted-id", "text": prose(4, 90), "license": "GPL-3.0-only"},  # opt-out wins over the licence
           {"id": "w-opted-url", "text": prose(5, 90), "consent": "licensed", "url": "https://blog.example.net/post/1"},
           {"id": "w-opted-domain", "text": prose(6, 90), "consent": "licensed", "url": "http://www.shop.example.org/a"},
           {"id": "w-other-domain", "text": prose(7, 90), "consent": "licensed", "url": "http://example.com/x"}]
    books = [{"id": f"b-{i}", "text": prose(20 + i, 90)} for i in range(3)]
    write_jsonl(d / "web.jsonl", web)
    write_jsonl(d / "books.jsonl", books)
    sources = write_sources(d / "sources.json", [
        {"path": "web.jsonl", "name": "web", "domain": "web", "license": "CC-BY-4.0", "consent": "unknown",
         "url": "https://example.com"},
        {"path": "books.jsonl", "name": "books", "domain": "books", "license": "MIT", "consent": "public-domain",
         "notes": "out of copyright"}])
    (d / "opt_out.txt").write_text("# ids, URLs, domains\nw-opted-id\nhttps://blog.example.net/post/1\n"
                                   "shop.example.org\n\n", encoding="utf-8")
    return d, sources


def test_opted_out_unlicensed_and_unconsented_documents_are_removed_with_their_reason(governed, tmp_path):
    d, sources = governed
    out = tmp_path / "o"
    run_main(["--sources", sources, "--out", out, *BASE, "--allow-licenses", "CC-BY-4.0,MIT",
              "--require-consent", "--opt-out", d / "opt_out.txt"])
    removed = removed_by_id(out)
    assert {k: v["reason"] for k, v in removed.items()} == {
        "w-unknown-consent": "no_consent", "w-gpl": "license_not_allowed", "w-opted-id": "opted_out",
        "w-opted-url": "opted_out", "w-opted-domain": "opted_out"}
    assert removed["w-opted-domain"]["detail"] == "domain shop.example.org"
    assert removed["w-gpl"]["detail"] == "GPL-3.0-only"
    kept = set(decoded_documents(out, "train"))
    assert len(kept) == 5  # w-ok, w-other-domain, b-0..2
    report = read_json(out / "report.json")
    web = report["composition"]["by_source"]["web"]
    assert web["documents_read"] == 7 and web["documents_kept"] == 2
    assert web["removed"] == {"license_not_allowed": 1, "no_consent": 1, "opted_out": 3}
    assert report["composition"]["by_domain"]["books"]["documents_kept"] == 3
    assert [s["license"] for s in report["sources"]] == ["CC-BY-4.0", "MIT"]


def test_without_the_filters_every_governed_document_is_kept(governed, tmp_path):
    d, sources = governed
    out = tmp_path / "o"
    run_main(["--sources", sources, "--out", out, *BASE])
    assert read_json(out / "report.json")["documents"] == {"read": 10, "kept": 10, "removed": {}}


def test_a_yaml_sources_file_reads_as_the_json_one(governed, tmp_path):
    pytest.importorskip("yaml")
    d, sources = governed
    entries = json.loads(sources.read_text())
    lines = []
    for e in entries:
        lines.append(f"- path: {d / e['path']}")
        lines += [f"  {k}: {json.dumps(v)}" for k, v in e.items() if k != "path"]
    yaml_file = tmp_path / "sources.yaml"
    yaml_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    a, b = tmp_path / "json", tmp_path / "yaml"
    run_main(["--sources", sources, "--out", a, *BASE, "--require-consent"])
    run_main(["--sources", yaml_file, "--out", b, *BASE, "--require-consent"])
    ra, rb = read_json(a / "report.json"), read_json(b / "report.json")
    assert ra["composition"] == rb["composition"] and ra["documents"] == rb["documents"]
    assert ra["documents"]["removed"] == {"no_consent": 2}  # w-unknown-consent, w-opted-id
    (tmp_path / "bad.yaml").write_text("- path: [unclosed\n", encoding="utf-8")
    with pytest.raises(governance.GovernanceError, match="is not YAML"):
        governance.load_sources(str(tmp_path / "bad.yaml"))


# ----------------------------------------------------------------------------- the mixture

@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    write_jsonl(d / "books.jsonl", [{"id": f"book-{i}", "text": prose(100 + i, 60 + 20 * (i % 4))} for i in range(30)])
    write_jsonl(d / "code.jsonl", [{"id": f"code-{i}", "text": prose(200 + i, 60 + 15 * (i % 3))} for i in range(12)])
    return d


def test_shares_are_met_within_one_document(two_domains, tmp_path):
    d = two_domains
    sources = write_sources(tmp_path / "s.json", [
        {"path": str(d / "books.jsonl"), "name": "books", "domain": "books", "share": 0.9},
        {"path": str(d / "code.jsonl"), "name": "code", "domain": "code", "share": 0.1}])
    out = tmp_path / "o"
    run_main(["--sources", sources, "--out", out, *BASE])
    report = read_json(out / "report.json")
    dom = report["composition"]["by_domain"]
    largest_code_doc = max(len(prose(200 + i, 60 + 15 * (i % 3)).encode()) for i in range(12))
    # books are the scarce domain for these shares: kept whole; code cut to a ninth of them
    assert dom["books"]["documents_kept"] == 30
    assert 0 <= dom["code"]["bytes_kept"] - dom["books"]["bytes_kept"] / 9 < largest_code_doc
    assert 0 < dom["code"]["documents_kept"] < 12
    assert report["documents"]["removed"]["mixture_downsampled"] == 12 - dom["code"]["documents_kept"]
    # deterministic by seed: the same run gives the same documents; another seed others
    again = tmp_path / "again"
    run_main(["--sources", sources, "--out", again, *BASE])
    assert removed_by_id(again) == removed_by_id(out)
    other = tmp_path / "other"
    run_main(["--sources", sources, "--out", other, *BASE, "--seed", 99])
    assert set(removed_by_id(other)) != set(removed_by_id(out))


def test_weights_repeat_whole_documents_and_count_the_repeats(two_domains, tmp_path):
    d = two_domains
    sources = write_sources(tmp_path / "s.json", [
        {"path": str(d / "books.jsonl"), "name": "books", "domain": "books", "weight": 0.5},
        {"path": str(d / "code.jsonl"), "name": "code", "domain": "code", "weight": 2.5}])
    out = tmp_path / "o"
    run_main(["--sources", sources, "--out", out, *BASE])
    report = read_json(out / "report.json")
    books, code = report["composition"]["by_source"]["books"], report["composition"]["by_source"]["code"]
    assert books["documents_kept"] == 15 and books["repeats"] == 0
    assert code["documents_kept"] == 12 and code["repeats"] == 12 + 6  # every one twice more, half thrice
    docs = decoded_documents(out, "train")
    assert len(docs) == 15 + 12 * 2 + 6
    counts = {t: docs.count(t) for t in set(docs)}
    code_texts = {prose(200 + i, 60 + 15 * (i % 3)) for i in range(12)}
    assert sorted(counts[t] for t in code_texts) == [2] * 6 + [3] * 6
    assert books["train_tokens"] + code["train_tokens"] == report["tokens"]["train"]


# ----------------------------------------------------------------------------- decontamination

EVAL_PROMPT = ("Explain why the old lighthouse keeper painted the narrow wooden door bright blue every spring "
               "before the fishing boats returned to the harbor")


def test_a_shared_13_gram_is_removed_and_12_shared_words_are_kept(tmp_path):
    words = EVAL_PROMPT.split()
    thirteen = " ".join(words[3:16]).upper().replace(" ", ",  ")  # case and punctuation do not hide it
    twelve = " ".join(words[3:15])
    docs = [{"id": "planted", "text": prose(1, 60) + " " + thirteen + ". " + prose(2, 40)},
            {"id": "near-miss", "text": prose(3, 60) + " " + twelve + " and then nothing. " + prose(4, 40)},
            {"id": "clean", "text": prose(5, 90)}]
    write_jsonl(tmp_path / "docs.jsonl", docs)
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": EVAL_PROMPT, "answer": "blue"}, {"prompt": "too short"}])
    out = tmp_path / "o"
    base = [a for a in BASE if a not in ("--decontaminate", "none")]
    run_main(["--input", tmp_path / "docs.jsonl", "--out", out, *base, "--decontaminate", tmp_path / "eval.jsonl"])
    removed = removed_by_id(out)
    assert list(removed) == ["planted"] and removed["planted"]["reason"] == "contaminated"
    assert removed["planted"]["detail"] == " ".join(words[3:16]).lower()
    c = read_json(out / "report.json")["contamination"]
    assert (c["removed"], c["flagged"], c["evaluation_items"], c["items_shorter_than_ngram"]) == (1, 0, 3, 2)
    flagged = tmp_path / "flagged"
    run_main(["--input", tmp_path / "docs.jsonl", "--out", flagged, *base, "--decontaminate",
              tmp_path / "eval.jsonl", "--flag-only"])
    c = read_json(flagged / "report.json")["contamination"]
    assert (c["removed"], c["flagged"]) == (0, 1) and c["flagged_examples"][0]["id"] == "planted"
    assert "planted" in (flagged / "DATA_CARD.md").read_text()


def test_the_default_checks_the_suites_held_out_files_beside_the_output(tmp_path):
    (tmp_path / "tasks").mkdir()
    write_jsonl(tmp_path / "tasks" / "eval.jsonl", [{"prompt": EVAL_PROMPT}])
    write_jsonl(tmp_path / "docs.jsonl", [{"id": "copy", "text": prose(1, 60) + " " + EVAL_PROMPT + "."},
                                          {"id": "clean", "text": prose(5, 90)}])
    base = [a for a in BASE if a not in ("--decontaminate", "none")]
    run_main(["--input", tmp_path / "docs.jsonl", "--out", tmp_path / "corpus", *base])
    assert list(removed_by_id(tmp_path / "corpus")) == ["copy"]


# ----------------------------------------------------------------------------- the card and the probe

def test_the_data_card_shows_report_jsons_numbers(governed, tmp_path):
    d, sources = governed
    out = tmp_path / "o"
    run_main(["--sources", sources, "--out", out, *BASE, "--allow-licenses", "CC-BY-4.0,MIT", "--require-consent"])
    report, card = read_json(out / "report.json"), (out / "DATA_CARD.md").read_text()
    rows = {}
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] in report["composition"]["by_source"]:
            rows[cells[0]] = cells
    assert set(rows) == {"web", "books"}
    for name, cells in rows.items():
        e = report["composition"]["by_source"][name]
        numbers = [e[k] for k in ("documents_read", "bytes_in", "documents_kept", "bytes_kept", "repeats",
                                  "train_tokens")]
        assert [int(c.replace(",", "")) for c in cells[2:8]] == numbers
        assert float(cells[8]) == e["train_token_share"]
    assert f"| no_consent | {report['documents']['removed']['no_consent']} |" in card
    for name, probe in report["representation"].items():
        assert f"| {name} | {probe['female']:,} | {probe['male']:,} | {probe['female_to_male']} |" in card
    assert f"bytes per token: {report['bytes_per_token']}" in card


def test_the_representation_probe_counts_whole_words():
    counts = governance.group_counts("She gave her brother the King's hat; the mother and father, "
                                     "his sons. Shepherd, hero and manly do not count.")
    assert counts == {"female": 3, "male": 5}  # she her mother / brother king father his sons


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("entries,message", [
    ([{"path": "x.jsonl", "licence": "MIT"}], "unknown field"),
    ([{"path": "x.jsonl", "license": "MIT License"}], "not an SPDX id"),
    ([{"path": "x.jsonl", "consent": "maybe"}], "consent 'maybe'"),
    ([{"path": "x.jsonl", "share": 0.5}, {"path": "y.jsonl", "share": 0.4}], "sum to 0.9"),
    ([{"path": "x.jsonl", "share": 1.0}, {"path": "y.jsonl"}], "have none"),
    ([{"path": "x.jsonl", "share": 1.0}, {"path": "y.jsonl", "weight": 2}], "not both"),
    ([{"path": "x.jsonl", "weight": -1}], "number >= 0"),
    ([{"path": "missing.jsonl"}], "path not found"),
    ([{"path": "x.jsonl", "domain": 5}], "domain must be a non-empty string"),
    ({"not": "a list"}, "non-empty list"),
], ids=["unknown_field", "not_spdx", "bad_consent", "shares_sum", "share_missing", "share_and_weight",
        "negative_weight", "missing_path", "domain_not_a_string", "not_a_list"])
def test_a_bad_sources_file_is_one_error_line(tmp_path, capsys, entries, message):
    write_jsonl(tmp_path / "x.jsonl", [{"text": prose(1, 90)}])
    write_jsonl(tmp_path / "y.jsonl", [{"text": prose(2, 90)}])
    sources = write_sources(tmp_path / "s.json", entries)
    with pytest.raises(SystemExit) as e:
        run_main(["--sources", sources, "--out", tmp_path / "o", *BASE])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert message in err


@pytest.mark.parametrize("argv,message", [
    (["--allow-licenses", "MIT,Apache 2"], "not SPDX"),
    (["--opt-out", "/nonexistent/opt_out.txt"], "cannot read --opt-out"),
    (["--decontaminate", "/nonexistent/eval.jsonl"], "cannot read --decontaminate"),
    (["--decontam-ngram", "0"], "--decontam-ngram must be positive"),
])
def test_bad_governance_options_are_one_error_line(tmp_path, capsys, argv, message):
    write_jsonl(tmp_path / "x.jsonl", [{"text": prose(1, 90)}])
    base = [a for a in BASE if "--decontaminate" not in argv or a not in ("--decontaminate", "none")]
    with pytest.raises(SystemExit):
        run_main(["--input", tmp_path / "x.jsonl", "--out", tmp_path / "o", *base, *argv])
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert message in err
    assert re.search(r"^error: ", err)
