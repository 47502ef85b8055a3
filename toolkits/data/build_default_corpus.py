#!/usr/bin/env python
"""Build the small default training corpus shipped with ``linear_moe``.

The text is the Python reference documentation that CPython itself ships as
``pydoc_data.topics.topics`` (the pages ``help("topic")`` shows), released under
the PSF License Agreement (PSF-2.0).  No network access is needed: the text is
read from the interpreter that runs this script.

Each topic is split at blank lines into paragraphs, and consecutive paragraphs
of one topic are grouped greedily into documents of at least ``--target-chars``
characters (a section heading is never left at the end of a document, a new
section starts a new document once the current one is half full, and a short
tail is merged into the previous document of the same topic).  Topics are
processed in sorted order, so the output is deterministic for a given Python
version; the gzip header carries no timestamp, so the file is byte-reproducible.

Usage (the shipped file was built with CPython 3.11.7)::

    python toolkits/data/build_default_corpus.py \
        --output linear_moe/data/default_corpus/corpus.jsonl.gz
"""

import argparse
import gzip
import io
import json
import os
import re
import sys
from typing import Dict, Iterator, List

_REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUTPUT = os.path.join(
    _REPO_ROOT, "linear_moe", "data", "default_corpus", "corpus.jsonl.gz"
)
EXPECTED_PYTHON = "3.11.7"

_UNDERLINE = re.compile(r"^([*=\-~^\"'`#+])\1{2,}$")


def _is_heading(paragraph: str) -> bool:
    lines = paragraph.split("\n")
    return len(lines) == 2 and bool(_UNDERLINE.match(lines[1].strip()))


def _paragraphs(text: str) -> List[str]:
    paras = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
    return [p.rstrip() for p in paras if p.strip()]


def split_topic(text: str, target_chars: int) -> List[str]:
    """Split one topic into documents of a few paragraphs each."""
    docs: List[List[str]] = []
    cur: List[str] = []
    cur_len = 0
    for para in _paragraphs(text):
        if _is_heading(para) and cur_len >= target_chars // 2:
            docs.append(cur)
            cur, cur_len = [], 0
        cur.append(para)
        cur_len += len(para)
        if cur_len >= target_chars and not _is_heading(para):
            docs.append(cur)
            cur, cur_len = [], 0
    if cur:
        if docs and cur_len < target_chars // 4:
            docs[-1].extend(cur)
        else:
            docs.append(cur)
    return ["\n\n".join(d) for d in docs]


def iter_documents(topics: Dict[str, str], target_chars: int) -> Iterator[dict]:
    for topic in sorted(topics):
        for i, text in enumerate(split_topic(topics[topic], target_chars)):
            yield {"id": f"pydoc_topics/{topic}/{i}", "text": text}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="output .jsonl.gz path")
    parser.add_argument(
        "--target-chars",
        type=int,
        default=800,
        help="minimum characters per document before a new one is started",
    )
    args = parser.parse_args(argv)

    from pydoc_data.topics import topics

    version = "%d.%d.%d" % sys.version_info[:3]
    if version != EXPECTED_PYTHON:
        print(
            f"warning: running on Python {version}; the shipped corpus was built from the "
            f"Python {EXPECTED_PYTHON} pydoc_data topics, so the output will differ",
            file=sys.stderr,
        )

    docs = list(iter_documents(topics, args.target_chars))
    buf = io.BytesIO()
    # filename="" and mtime=0: no name/timestamp in the gzip header -> reproducible bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for doc in docs:
            gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, args.output)

    stats = {
        "source": f"pydoc_data.topics (Python {version})",
        "topics": len(topics),
        "documents": len(docs),
        "characters": sum(len(d["text"]) for d in docs),
        "gzip_bytes": len(buf.getvalue()),
    }
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
