"""The default corpus and tokenizer shipped with ``linear_moe`` (no download needed).

* ``default_corpus_path()``: ``default_corpus/corpus.jsonl.gz`` - the Python 3.11.7
  reference documentation topics (``pydoc_data.topics``), PSF License Agreement,
  see ``default_corpus/README.md``.
* ``default_tokenizer_path()``: ``default_tokenizer/`` - byte-level BPE, vocab 4096,
  ``<|endoftext|>`` (id 0) = EOS/EOD/pad.  Megatron args:
  ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model <default_tokenizer_path()>``.
* ``ensure_default_dataset(output_dir)``: tokenizes the shipped corpus into a Megatron
  indexed dataset under ``output_dir`` once and returns its data prefix.

CLI (stdout carries only the prefix, everything else goes to stderr)::

    DATASET_PATH=$(python -m linear_moe.data.default_corpus --output-dir /tmp/lm_data)
"""

import argparse
import contextlib
import hashlib
import json
import os
import sys
import uuid

__all__ = [
    "DEFAULT_DATASET_NAME",
    "default_corpus_path",
    "default_tokenizer_path",
    "default_dataset_prefix",
    "ensure_default_dataset",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATASET_NAME = "pydoc_topics"
# Bump when the preprocessing output for the same corpus/tokenizer would change.
_FORMAT_VERSION = 1


def default_corpus_path() -> str:
    """Path of the shipped corpus (.jsonl.gz, one {"id", "text"} object per line)."""
    return os.path.join(_HERE, "default_corpus", "corpus.jsonl.gz")


def default_tokenizer_path() -> str:
    """Directory of the shipped HF tokenizer (``--tokenizer-model`` for Megatron)."""
    return os.path.join(_HERE, "default_tokenizer")


def default_dataset_prefix(output_dir: str) -> str:
    """The data prefix ``ensure_default_dataset(output_dir)`` builds/returns."""
    from .preprocess import dataset_prefix

    return dataset_prefix(os.path.join(os.path.abspath(output_dir), DEFAULT_DATASET_NAME))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fingerprint(corpus: str, tokenizer_dir: str) -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "corpus_sha256": _sha256(corpus),
        "tokenizer_sha256": _sha256(os.path.join(tokenizer_dir, "tokenizer.json")),
    }


def _manifest_path(prefix: str) -> str:
    return prefix + ".manifest.json"


def _is_built(prefix: str, fingerprint: dict) -> bool:
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        return False
    try:
        with open(_manifest_path(prefix), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return all(manifest.get(k) == v for k, v in fingerprint.items())


def ensure_default_dataset(output_dir: str, workers: int = 1) -> str:
    """Build the default indexed dataset in ``output_dir`` unless already there.

    Idempotent: a dataset is reused when its ``.bin``/``.idx`` exist and its
    ``<prefix>.manifest.json`` matches the shipped corpus and tokenizer (sha256), so
    a changed corpus/tokenizer triggers a rebuild.  Atomic: the files are written
    under temporary names and renamed into place, and the manifest is written last,
    so a killed run never leaves a dataset that would be reused half-written.

    Returns the data prefix (``<output_dir>/pydoc_topics_text_document``) to pass
    to Megatron's ``--data-path``.  A status line goes to stderr.
    """
    corpus, tokenizer_dir = default_corpus_path(), default_tokenizer_path()
    for path, what in ((corpus, "corpus"), (os.path.join(tokenizer_dir, "tokenizer.json"),
                                           "tokenizer")):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"shipped default {what} {path!r} is missing; reinstall linear_moe with its "
                f"package data (linear_moe/data/default_corpus/*, default_tokenizer/*)"
            )
    prefix = default_dataset_prefix(output_dir)
    fingerprint = _fingerprint(corpus, tokenizer_dir)
    if _is_built(prefix, fingerprint):
        print(f"[linear_moe.data] default dataset already built: {prefix}", file=sys.stderr)
        return prefix

    from .preprocess import _run

    stats = _run([corpus], prefix[: -len("_text_document")], tokenizer_dir, "text", True, workers)
    assert stats["prefix"] == prefix, (stats["prefix"], prefix)
    manifest = dict(fingerprint)
    manifest.update(
        source="CPython pydoc_data.topics (Python 3.11.7 documentation), PSF-2.0",
        documents=stats["documents"],
        tokens=stats["tokens"],
        characters=stats["characters"],
        dtype=stats["dtype"],
        vocab_size=stats["vocab_size"],
        eod=stats["eod"],
    )
    tmp = f"{_manifest_path(prefix)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, _manifest_path(prefix))
    print(
        f"[linear_moe.data] built default dataset ({stats['documents']} documents, "
        f"{stats['tokens']} tokens): {prefix}",
        file=sys.stderr,
    )
    return prefix


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Build (once) the default indexed dataset from the shipped corpus and "
        "print its Megatron data prefix on stdout."
    )
    parser.add_argument("--output-dir", required=True, help="directory for the .bin/.idx files")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        # Keep stdout clean for `DATASET_PATH=$(python -m linear_moe.data.default_corpus ...)`.
        with contextlib.redirect_stdout(sys.stderr):
            prefix = ensure_default_dataset(args.output_dir, workers=args.workers)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
