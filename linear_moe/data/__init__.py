"""Data pipeline: shipped default corpus + tokenizer, jsonl -> Megatron indexed dataset.

Exports are resolved lazily so that ``import linear_moe.data`` stays cheap and
``python -m linear_moe.data.default_corpus`` runs without a double-import warning.
"""

_EXPORTS = {
    "default_corpus_path": "default_corpus",
    "default_tokenizer_path": "default_corpus",
    "default_dataset_prefix": "default_corpus",
    "ensure_default_dataset": "default_corpus",
    "DEFAULT_DATASET_NAME": "default_corpus",
    "preprocess_jsonl": "preprocess",
    "dataset_prefix": "preprocess",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
