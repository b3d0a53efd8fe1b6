"""Data governance: where every document came from, whether it may be used, whether it
overlaps the evaluations, and how much of each domain the model sees.

- **Sources** (`--sources FILE.json`): each input named with its `domain` (web, books,
  code, ...), `license` (an SPDX id), `consent` (public-domain, licensed,
  opt-out-honoured, unknown), optional `url` and `notes`, and a target `share` of the
  training text or a `weight` (repetitions). A JSONL/parquet record's own `license`,
  `consent`, `url`, `domain` or `source` field wins over its file's. The datasheet idea
  (Gebru et al. 2018) and the Pile's and Dolma's source tables: every token traceable.
- **Policy**, checked before any other filter: opted-out documents (by id, URL, or a
  URL's domain), licences not on `--allow-licenses`, and, under `--require-consent`,
  documents whose consent is missing or unknown are removed with their reason.
- **Decontamination** as GPT-3 (Brown et al. 2020, appendix C): a document sharing any
  word n-gram (13 by default; case and punctuation normalized) with an evaluation prompt
  or answer is removed, or only flagged, with the n-gram that matched.
- **Mixture** as the Pile and Dolma: after filtering and deduplication, whole training
  documents are down-sampled to the sources' domain shares (by UTF-8 bytes, the text's
  size before the tokenizer exists), or repeated by their weights, deterministically by
  seed; the repetitions are counted.
- **Representation probe** as the GPT-3 and Pile papers: counts of a small fixed set of
  gendered words per source, a measurement for the data card, not a filter.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional
from urllib.parse import urlparse

from cli import UserError
from data.files import atomic_write
from data.sources import RECORD_FIELDS, list_files

# SPDX identifiers (spdx.org/licenses) of the licences data and code most often carry,
# plus the SPDX forms for "not stated" (NOASSERTION, NONE) and for a licence of one's own
# (LicenseRef-...). Anything else is rejected as a likely typo.
SPDX_IDS = frozenset("""
0BSD AFL-3.0 AGPL-3.0-only AGPL-3.0-or-later Apache-1.1 Apache-2.0 APSL-2.0 Artistic-2.0 BSD-1-Clause
BSD-2-Clause BSD-3-Clause BSD-3-Clause-Clear BSD-4-Clause BSL-1.0 CC-BY-1.0 CC-BY-2.0 CC-BY-2.5 CC-BY-3.0
CC-BY-4.0 CC-BY-NC-2.0 CC-BY-NC-3.0 CC-BY-NC-4.0 CC-BY-NC-ND-3.0 CC-BY-NC-ND-4.0 CC-BY-NC-SA-2.0 CC-BY-NC-SA-3.0
CC-BY-NC-SA-4.0 CC-BY-ND-3.0 CC-BY-ND-4.0 CC-BY-SA-2.0 CC-BY-SA-2.5 CC-BY-SA-3.0 CC-BY-SA-4.0 CC-PDDC CC0-1.0
CDDL-1.0 CDLA-Permissive-1.0 CDLA-Permissive-2.0 CDLA-Sharing-1.0 ECL-2.0 EPL-1.0 EPL-2.0 EUPL-1.2 GFDL-1.3-only
GFDL-1.3-or-later GPL-2.0-only GPL-2.0-or-later GPL-3.0-only GPL-3.0-or-later ISC LGPL-2.1-only
LGPL-2.1-or-later LGPL-3.0-only LGPL-3.0-or-later LPPL-1.3c MIT MIT-0 MPL-1.1 MPL-2.0 MS-PL NCSA ODbL-1.0
ODC-By-1.0 OFL-1.1 OpenSSL PDDL-1.0 PostgreSQL PSF-2.0 Python-2.0 Ruby Unicode-DFS-2016 Unlicense UPL-1.0
W3C WTFPL X11 Zlib ZPL-2.1 NOASSERTION NONE
""".split())
CONSENT = ("public-domain", "licensed", "opt-out-honoured", "unknown")
SOURCE_FIELDS = {"path", "name", "domain", "license", "consent", "url", "notes", "share", "weight"}

# The representation probe's words (the GPT-3 and Pile papers' gender co-occurrence
# studies use such lists): a measurement of who the text talks about, nothing more.
GROUP_TERMS = {
    "female": "she her hers herself woman women girl girls mother mothers daughter daughters sister sisters "
              "wife wives queen queens lady ladies aunt niece grandmother",
    "male": "he him his himself man men boy boys father fathers son sons brother brothers husband husbands "
            "king kings lord lords uncle nephew grandfather",
}
_GROUP_OF = {w: g for g, words in GROUP_TERMS.items() for w in words.split()}
_WORD = re.compile(r"[a-z0-9]+")


class GovernanceError(UserError):
    """A sources file, opt-out list or evaluation file that cannot be used as given."""


def is_spdx(license_id: str) -> bool:
    return license_id in SPDX_IDS or bool(re.fullmatch(r"LicenseRef-[A-Za-z0-9.\-]+", license_id))


# ----------------------------------------------------------------------------- sources

@dataclass
class Source:
    """One entry of a sources file."""
    path: str
    name: str = ""
    domain: str = "unknown"
    license: Optional[str] = None
    consent: Optional[str] = None
    url: Optional[str] = None
    notes: str = ""
    share: Optional[float] = None
    weight: Optional[float] = None

    def defaults(self) -> dict:
        """The metadata every document of this source carries unless it says otherwise."""
        return {"source": self.name or self.path, "domain": self.domain, "license": self.license,
                "consent": self.consent, "url": self.url}


def check_metadata(where: str, license_id, consent) -> None:
    if license_id is not None and (not isinstance(license_id, str) or not is_spdx(license_id)):
        raise GovernanceError(f"{where}: license {license_id!r} is not an SPDX id (e.g. MIT, CC-BY-4.0, "
                              f"CC0-1.0, or LicenseRef-<name> for a licence of your own)")
    if consent is not None and consent not in CONSENT:
        raise GovernanceError(f"{where}: consent {consent!r} is not one of {', '.join(CONSENT)}")


def _parse_sources_text(path: str, text: str):
    if not path.lower().endswith((".yaml", ".yml")):
        try:
            return json.loads(text)
        except ValueError as e:
            raise GovernanceError(f"sources file {path} is not JSON: {e}") from None
    try:
        import yaml
    except ImportError:
        raise GovernanceError("a YAML sources file needs PyYAML (pip install pyyaml), or write it as JSON") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GovernanceError(f"sources file {path} is not YAML: {str(e).splitlines()[0]}") from None


def load_sources(path: str) -> list[Source]:
    """The entries of a sources file: a JSON (or, with PyYAML, .yaml) list of objects (or
    {"sources": [...]}). Raises
    GovernanceError for an unknown field, a missing path, a licence id that is not SPDX,
    an unknown consent status, or shares and weights that cannot be met."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise GovernanceError(f"cannot read sources file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise GovernanceError(f"sources file {path} is not UTF-8 text") from None
    obj = _parse_sources_text(path, text)
    entries = obj.get("sources") if isinstance(obj, dict) else obj
    if not isinstance(entries, list) or not entries:
        raise GovernanceError(f"sources file {path}: expected a non-empty list of sources (or {{\"sources\": [...]}})")
    sources = []
    base = os.path.dirname(os.path.abspath(path))
    for i, entry in enumerate(entries):
        where = f"sources file {path}, entry {i + 1}"
        if not isinstance(entry, dict):
            raise GovernanceError(f"{where}: not an object")
        unknown = set(entry) - SOURCE_FIELDS
        if unknown:
            raise GovernanceError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(SOURCE_FIELDS)}")
        if not isinstance(entry.get("path"), str) or not entry["path"]:
            raise GovernanceError(f"{where}: needs a \"path\"")
        for key in ("name", "domain", "url", "notes"):
            if entry.get(key) is not None and (not isinstance(entry[key], str) or not entry[key].strip()):
                raise GovernanceError(f"{where}: {key} must be a non-empty string, got {entry[key]!r}")
        for key in ("share", "weight"):
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise GovernanceError(f"{where}: {key} must be a number >= 0, got {value!r}")
        check_metadata(where, entry.get("license"), entry.get("consent"))
        src = Source(**{k: v for k, v in entry.items() if k != "path"},
                     path=entry["path"] if os.path.isabs(entry["path"]) else os.path.join(base, entry["path"]))
        src.name = src.name or entry["path"]
        sources.append(src)
    check_mixture(sources, path)
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise GovernanceError(f"sources file {path}: two entries share a name (give each a distinct \"name\")")
    return sources


def check_mixture(sources: list[Source], where: str) -> None:
    """Shares: on every source or on none, not beside weights, summing to 1 (within 1e-6)
    with every share of a domain on one domain; otherwise the mixture cannot be met."""
    with_share = [s for s in sources if s.share is not None]
    with_weight = [s for s in sources if s.weight is not None]
    if with_share and with_weight:
        raise GovernanceError(f"{where}: give sources shares or weights, not both")
    if with_share and len(with_share) != len(sources):
        raise GovernanceError(f"{where}: shares cannot be met: {len(sources) - len(with_share)} source(s) have none "
                              f"(give every source a share, or none)")
    if with_share:
        total = sum(s.share for s in sources)
        if abs(total - 1) > 1e-6:
            raise GovernanceError(f"{where}: shares cannot be met: they sum to {total:g}, not 1")
        if any(s.share == 0 for s in sources):
            raise GovernanceError(f"{where}: a share of 0 keeps nothing of its source: leave the source out instead")


# ----------------------------------------------------------------------------- the per-document policy

def _norm_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _hosts(url: str) -> list[str]:
    """A URL's host and every parent domain: a.b.example.org -> [a.b.example.org, b.example.org, example.org]."""
    host = urlparse(url if "://" in url else "//" + url).hostname or ""
    parts = host.split(".")
    return [".".join(parts[i:]) for i in range(len(parts) - 1)] if len(parts) > 1 else ([host] if host else [])


def load_opt_out(path: str) -> frozenset:
    """One document id, URL or domain a line ('#' comments and blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            return frozenset(line.strip() for line in f if line.strip() and not line.lstrip().startswith("#"))
    except OSError as e:
        raise GovernanceError(f"cannot read --opt-out {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise GovernanceError(f"--opt-out {path} is not UTF-8 text") from None


def _eval_strings(obj) -> Iterable[str]:
    """The evaluation text of one record: prompt, answer, text, chat messages' contents."""
    if isinstance(obj, str):
        yield obj
        return
    if not isinstance(obj, dict):
        return
    for key in ("prompt", "answer", "text", "question", "completion"):
        if isinstance(obj.get(key), str):
            yield obj[key]
    for message in obj.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            yield message["content"]


class Decontaminator:
    """The word n-grams of a set of evaluation texts; `match(text)` is the first n-gram of
    a document found among them, or None."""

    def __init__(self, texts: Iterable[str], n: int = 13):
        if n < 1:
            raise GovernanceError(f"--decontam-ngram must be positive, got {n}")
        self.n, self.grams, self.items, self.too_short = n, set(), 0, 0
        for text in texts:
            words = _norm_words(text)
            self.items += 1
            if len(words) < n:
                self.too_short += 1  # no n-gram to match: counted in the card
            for i in range(len(words) - n + 1):
                self.grams.add(" ".join(words[i:i + n]))
        self.first_words = {g.split(" ", 1)[0] for g in self.grams}

    @classmethod
    def from_files(cls, paths: list[str], n: int = 13) -> "Decontaminator":
        texts = []
        for path in paths:
            try:
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        if not line.strip():
                            continue
                        try:
                            texts.extend(_eval_strings(json.loads(line)))
                        except ValueError:
                            texts.append(line)  # a plain-text line is one evaluation item
            except OSError as e:
                raise GovernanceError(f"cannot read --decontaminate {path}: {e.strerror or e}") from None
            except UnicodeDecodeError:
                raise GovernanceError(f"--decontaminate {path} is not UTF-8 text") from None
        return cls(texts, n)

    def match(self, text: str) -> Optional[str]:
        if not self.grams:
            return None
        words = _norm_words(text)
        for i in range(len(words) - self.n + 1):
            if words[i] in self.first_words:
                gram = " ".join(words[i:i + self.n])
                if gram in self.grams:
                    return gram
        return None


@dataclass
class Policy:
    """What pass 1 checks per document beyond quality: the sources' metadata by input
    file, the governance filters, decontamination and the representation probe. Built once
    by the driver and handed to every worker (it pickles)."""
    source_of_file: dict = field(default_factory=dict)  # input path -> Source
    allow_licenses: Optional[frozenset] = None
    require_consent: bool = False
    opt_out: frozenset = frozenset()
    decontaminator: Optional[Decontaminator] = None
    flag_only: bool = False
    probe: bool = True

    def metadata(self, path: str, record_meta: Optional[dict]) -> dict:
        """A document's source, domain, license, consent and url: its record's, else its file's."""
        src = self.source_of_file.get(path)
        meta = src.defaults() if src else {"source": path, "domain": "unknown", "license": None, "consent": None,
                                           "url": None}
        for key, value in (record_meta or {}).items():
            if value is not None:
                meta[key] = value
        return meta

    def refusal(self, doc_id: str, meta: dict) -> Optional[tuple[str, str]]:
        """(reason, detail) when the document may not be used; the opt-out first."""
        if self.opt_out:
            if doc_id in self.opt_out:
                return "opted_out", f"id {doc_id}"
            url = meta.get("url")
            if isinstance(url, str) and url:
                if url in self.opt_out:
                    return "opted_out", f"url {url}"
                for host in _hosts(url):
                    if host in self.opt_out:
                        return "opted_out", f"domain {host}"
        if self.allow_licenses is not None and meta.get("license") not in self.allow_licenses:
            return "license_not_allowed", str(meta.get("license"))
        if self.require_consent and meta.get("consent") in (None, "unknown"):
            return "no_consent", str(meta.get("consent"))
        return None

    def contamination(self, text: str) -> Optional[str]:
        return self.decontaminator.match(text) if self.decontaminator else None


def build_policy(files: list[str], sources: list[Source], allow_licenses: list[str], require_consent: bool,
                 opt_out: str, decontaminate: list[str], ngram: int, flag_only: bool, probe: bool) -> Policy:
    """The Policy for one run (raises GovernanceError for unusable files or ids)."""
    source_of_file = {}
    for src in sources:
        try:
            for path in list_files([src.path]):
                source_of_file.setdefault(path, src)
        except FileNotFoundError:
            raise GovernanceError(f"source {src.name!r}: path not found: {src.path}") from None
    allowed = None
    if allow_licenses:
        bad = [x for x in allow_licenses if not is_spdx(x)]
        if bad:
            raise GovernanceError(f"--allow-licenses: {', '.join(bad)} not SPDX id(s) (e.g. MIT, CC-BY-4.0, CC0-1.0)")
        allowed = frozenset(allow_licenses)
    return Policy(source_of_file=source_of_file, allow_licenses=allowed, require_consent=require_consent,
                  opt_out=load_opt_out(opt_out) if opt_out else frozenset(),
                  decontaminator=Decontaminator.from_files(decontaminate, ngram) if decontaminate else None,
                  flag_only=flag_only, probe=probe)


def group_counts(text: str) -> Counter:
    """The representation probe on one document: occurrences of each group's words."""
    counts: Counter = Counter()
    for word in _WORD.findall(text.lower()):
        group = _GROUP_OF.get(word)
        if group:
            counts[group] += 1
    return counts


# ----------------------------------------------------------------------------- the mixture

def _order(seed: int, doc_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}:mix:{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


def mixture_copies(docs: list[tuple[int, str, str, str, int]], sources: list[Source], seed: int) -> dict[int, int]:
    """How many times each training document is written: {index: copies} for every
    document given as (index, id, source name, domain, UTF-8 bytes). Shares: each domain
    keeps whole documents, in a seeded order, until its bytes reach its share of the
    largest total that every domain can supply without repeating (one domain is kept whole,
    the others are cut to match, each within one document of its target); a document of a
    domain no source names gets no share. Weights: every document of a source is written
    floor(w) times, and a seeded round((w - floor(w)) x n) of them once more. Neither:
    every document once."""
    copies = {d[0]: 1 for d in docs}
    if any(s.share is not None for s in sources):
        domain_share: Counter = Counter()
        for s in sources:
            domain_share[s.domain] += s.share
        domain_bytes: Counter = Counter()
        for *_, domain, size in docs:
            domain_bytes[domain] += size
        present = [d for d in domain_share if domain_bytes[d] > 0]
        total = min((domain_bytes[d] / domain_share[d] for d in present), default=0.0)
        kept: Counter = Counter()
        for index, doc_id, _, domain, size in sorted(docs, key=lambda d: _order(seed, d[1])):
            if domain not in domain_share or kept[domain] >= domain_share[domain] * total - 1e-9:
                copies[index] = 0
            else:
                kept[domain] += size
    elif any(s.weight is not None for s in sources):
        weight_of = {s.name: s.weight for s in sources if s.weight is not None}
        members: dict[str, list] = {}
        for d in sorted(docs, key=lambda d: _order(seed, d[1])):
            members.setdefault(d[2], []).append(d[0])
        for name, indices in members.items():
            weight = weight_of.get(name, 1.0)
            extra = round((weight - math.floor(weight)) * len(indices))
            for rank, index in enumerate(indices):
                copies[index] = math.floor(weight) + (rank < extra)
    return copies


# ----------------------------------------------------------------------------- the data card

def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value).replace("|", "/")


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def write_data_card(path: str, report: dict) -> None:
    """DATA_CARD.md from prepare's report (every number in it is one of report.json's)."""
    comp = report["composition"]
    lines = ["# Data card", "",
             "Written by `python -m data.prepare` beside the shards; every number below is in `report.json`.", ""]
    lines += ["## Sources", ""]
    if report["sources"]:
        lines += _table(["source", "domain", "license", "consent", "url", "share", "weight", "notes"],
                        [[s["name"], s["domain"], s["license"], s["consent"], s["url"], s["share"], s["weight"],
                          s["notes"]] for s in report["sources"]])
    else:
        lines += ["No sources file (`--sources`): every input file is its own source, domain `unknown`, "
                  "licence and consent not stated."]
    lines += ["", "## Composition", "",
              "Documents and UTF-8 bytes read and kept (after every filter, deduplication and the mixture); "
              "repeats are the mixture's extra copies; tokens are the training split's, repeats included.", ""]
    header = ["documents read", "bytes read", "documents kept", "bytes kept", "repeats", "train tokens",
              "share of train tokens"]
    keys = ["documents_read", "bytes_in", "documents_kept", "bytes_kept", "repeats", "train_tokens",
            "train_token_share"]
    lines += _table(["source", "domain"] + header,
                    [[name, e["domain"]] + [e[k] for k in keys] for name, e in comp["by_source"].items()])
    lines += [""] + _table(["domain"] + header, [[d] + [e[k] for k in keys] for d, e in comp["by_domain"].items()])
    lines += ["", "## Removals by reason", ""]
    docs = report["documents"]
    lines += _table(["reason", "documents"], [[r, n] for r, n in docs["removed"].items()] +
                    [["(kept)", docs["kept"]], ["(read)", docs["read"]]])
    by_source = [[name, r, n] for name, e in comp["by_source"].items() for r, n in e["removed"].items()]
    if by_source:
        lines += [""] + _table(["source", "reason", "documents"], by_source)
    c = report["contamination"]
    lines += ["", "## Contamination", ""]
    if c["files"]:
        lines += [f"Word {c['ngram']}-grams (lower-cased, punctuation removed) of {c['evaluation_items']:,} evaluation "
                  f"items from {', '.join(f'`{os.path.basename(f)}`' for f in c['files'])}; "
                  f"{c['items_shorter_than_ngram']:,} of them are shorter than {c['ngram']} words and cannot match.",
                  "", f"- documents removed: {c['removed']:,}",
                  f"- documents kept but flagged (`--flag-only`): {c['flagged']:,}"]
        lines += [f"  - `{x['id']}` ({x['source']}): \"{x['ngram']}\"" for x in c["flagged_examples"]]
    else:
        lines += ["Not checked: no evaluation files (`--decontaminate`)."]
    lines += ["", "## Representation probe", ""]
    if report["representation"]:
        lines += ["Occurrences of gendered words in the kept documents (a measurement, not a filter); the words:"]
        lines += [f"- {g}: {words}" for g, words in GROUP_TERMS.items()]
        lines += [""] + _table(["source"] + list(GROUP_TERMS) + ["female / male"],
                               [[name] + [e[g] for g in GROUP_TERMS] + [e["female_to_male"]]
                                for name, e in report["representation"].items()])
    else:
        lines += ["Off (`--no-representation-probe`)."]
    lines += ["", "## Tokenizer and shards", ""]
    if "tokens" in report:
        lines += [f"- vocabulary: {report['vocab_size']:,} tokens ({report['dtype']})",
                  f"- bytes per token: {report['bytes_per_token']}",
                  f"- tokens: train {report['tokens']['train']:,}, validation {report['tokens']['val']:,} "
                  f"({report['split_documents']['train']:,} / {report['split_documents']['val']:,} documents)"]
    atomic_write(path, "\n".join(lines) + "\n")
