"""Tokenize .jsonl / .jsonl.gz corpora into a Megatron indexed dataset.

Follows Megatron-LM's ``tools/preprocess_data.py`` conventions:

* one document per JSON line, text under ``json_key`` (default ``"text"``);
* ids are ``tokenizer(text).input_ids`` (exactly what Megatron's
  ``HuggingFaceTokenizer.tokenize`` returns), plus the EOD id (the tokenizer's
  ``eos_token_id``) when ``append_eod``; each document is stored as one sequence;
* output files ``<output_prefix>_<json_key>_document.bin/.idx``, written with
  ``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` using
  ``DType.optimal_dtype(len(tokenizer))`` (uint16 below 65500 tokens, else int32);
  pass ``<output_prefix>_<json_key>_document`` to ``--data-path``.

Unlike Megatron's tool, documents whose encoding is empty (blank text, and no
EOD requested) are skipped instead of being stored as zero-length documents.

The two files are written under temporary names and renamed into place at the
end, so an interrupted run never leaves a half-written dataset at the prefix.
"""

import gzip
import json
import os
import sys
import uuid
from typing import Iterable, Iterator, List, Optional, Sequence, Union

__all__ = ["preprocess_jsonl", "dataset_prefix"]

_BATCH_DOCS = 256


def _shipped_tokenizer_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_tokenizer")


def dataset_prefix(output_prefix: str, json_key: str = "text") -> str:
    """The Megatron data prefix ``<output_prefix>_<json_key>_document``."""
    return f"{output_prefix}_{json_key}_document"


def _check_inputs(input_paths: Sequence[str], tokenizer_path: str) -> None:
    if not input_paths:
        raise ValueError("no input files given; pass one or more .jsonl/.jsonl.gz files")
    for path in input_paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"input file {path!r} not found; pass an existing .jsonl or .jsonl.gz file "
                f"(one JSON object per line)"
            )
    if not os.path.isdir(tokenizer_path) or not (
        os.path.isfile(os.path.join(tokenizer_path, "tokenizer.json"))
        or os.path.isfile(os.path.join(tokenizer_path, "tokenizer_config.json"))
    ):
        raise FileNotFoundError(
            f"tokenizer directory {tokenizer_path!r} not found (no tokenizer.json / "
            f"tokenizer_config.json); pass a local HF tokenizer directory, e.g. the shipped "
            f"{_shipped_tokenizer_path()!r}, or train one with toolkits/data/train_tokenizer.py"
        )


def _load_tokenizer(tokenizer_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)


def _iter_texts(paths: Sequence[str], json_key: str) -> Iterator[str]:
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                obj = json.loads(line)
                try:
                    text = obj[json_key]
                except (KeyError, TypeError):
                    raise KeyError(
                        f"{path}:{lineno} has no key {json_key!r}; pass the right --json-key"
                    ) from None
                yield text


def _batches(it: Iterable[str], size: int) -> Iterator[List[str]]:
    batch: List[str] = []
    for x in it:
        batch.append(x)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- worker side (workers > 1) ------------------------------------------------
_WORKER_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER_TOKENIZER = _load_tokenizer(tokenizer_path)


def _encode_batch_worker(texts: List[str]) -> List[List[int]]:
    return _WORKER_TOKENIZER(texts)["input_ids"]


def _run(
    input_paths: Sequence[str],
    output_prefix: str,
    tokenizer_path: str,
    json_key: str,
    append_eod: bool,
    workers: int,
) -> dict:
    """Does the work; returns stats including the final ``prefix``."""
    _check_inputs(input_paths, tokenizer_path)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    import numpy
    from megatron.core.datasets.indexed_dataset import (
        DType,
        IndexedDatasetBuilder,
        get_bin_path,
        get_idx_path,
    )

    tokenizer = _load_tokenizer(tokenizer_path)
    eod = tokenizer.eos_token_id
    if append_eod and eod is None:
        raise ValueError(
            f"tokenizer {tokenizer_path!r} has no eos_token to use as EOD; "
            f"set eos_token in its tokenizer_config.json or pass append_eod=False"
        )
    dtype = DType.optimal_dtype(len(tokenizer))

    prefix = dataset_prefix(output_prefix, json_key)
    out_dir = os.path.dirname(os.path.abspath(prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = f"{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_bin, tmp_idx = get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)

    stats = {"documents": 0, "skipped_empty": 0, "tokens": 0, "characters": 0}
    batches = _batches(_iter_texts(input_paths, json_key), _BATCH_DOCS)

    def _count(batch):
        stats["characters"] += sum(len(t) for t in batch)
        return batch

    pool = None
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        if workers == 1:
            encoded = (tokenizer(_count(b))["input_ids"] for b in batches)
        else:
            import multiprocessing

            pool = multiprocessing.get_context("spawn").Pool(
                workers, initializer=_init_worker, initargs=(tokenizer_path,)
            )
            encoded = pool.imap(_encode_batch_worker, (_count(b) for b in batches), chunksize=1)
        for ids_batch in encoded:
            for ids in ids_batch:
                ids = list(ids)
                if append_eod:
                    ids.append(eod)
                if not ids:
                    stats["skipped_empty"] += 1
                    continue
                builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
                stats["documents"] += 1
                stats["tokens"] += len(ids)
        builder.finalize(tmp_idx)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        if stats["documents"] == 0:
            raise ValueError(f"no non-empty documents found in {list(input_paths)}")
        # Publish: drop any old .idx first so that a kill between the renames leaves
        # no (new .bin, old .idx) pair that IndexedDataset.exists() would accept.
        final_bin, final_idx = get_bin_path(prefix), get_idx_path(prefix)
        if os.path.exists(final_idx):
            os.remove(final_idx)
        os.replace(tmp_bin, final_bin)
        os.replace(tmp_idx, final_idx)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)

    stats.update(prefix=prefix, dtype=numpy.dtype(dtype).name, vocab_size=len(tokenizer),
                 eod=eod if append_eod else None)
    return stats


def preprocess_jsonl(
    input_paths: Union[str, Sequence[str]],
    output_prefix: str,
    tokenizer_path: Optional[str] = None,
    json_key: str = "text",
    append_eod: bool = True,
    workers: int = 1,
) -> str:
    """Tokenize .jsonl/.jsonl.gz files into a Megatron indexed dataset.

    Args:
        input_paths: one path or a list of paths (.jsonl or .jsonl.gz), read in order.
        output_prefix: output prefix; files are ``<output_prefix>_<json_key>_document.bin/.idx``.
        tokenizer_path: local HF tokenizer directory (default: the shipped tokenizer).
        json_key: key holding each document's text.
        append_eod: append the tokenizer's EOS id (Megatron's EOD) to every document.
        workers: tokenizer processes (1 = in-process batch encoding).

    Returns:
        The data prefix ``<output_prefix>_<json_key>_document`` (for ``--data-path``).

    Raises:
        FileNotFoundError: (before any work) an input file or the tokenizer is missing.
    """
    if isinstance(input_paths, (str, os.PathLike)):
        input_paths = [input_paths]
    input_paths = [os.fspath(p) for p in input_paths]
    tokenizer_path = os.fspath(tokenizer_path) if tokenizer_path else _shipped_tokenizer_path()
    stats = _run(input_paths, os.fspath(output_prefix), tokenizer_path, json_key, append_eod,
                 workers)
    print(
        f"[linear_moe.data] wrote {stats['documents']} documents, {stats['tokens']} tokens "
        f"({stats['dtype']}) to {stats['prefix']}.bin/.idx",
        file=sys.stderr,
    )
    return stats["prefix"]
