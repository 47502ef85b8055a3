#!/usr/bin/env python
"""Train the byte-level BPE tokenizer shipped with ``linear_moe``.

A GPT-2 style byte-level BPE (HF ``tokenizers``) is trained on a .jsonl(.gz)
corpus (by default the shipped ``linear_moe/data/default_corpus/corpus.jsonl.gz``)
and saved as a ``transformers.PreTrainedTokenizerFast`` directory
(tokenizer.json, tokenizer_config.json, special_tokens_map.json) that
``AutoTokenizer.from_pretrained(path)`` and Megatron's
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model <path>`` load offline.

``<|endoftext|>`` is the only special token (id 0); it is the EOS / end-of-document
token (Megatron's ``tokenizer.eod``) and the pad token.  No BOS/EOS is added when
encoding (no template post-processor), so ``tokenizer(text).input_ids`` is the
plain byte-level BPE encoding of ``text``.

Usage::

    python toolkits/data/train_tokenizer.py \
        --input linear_moe/data/default_corpus/corpus.jsonl.gz \
        --output-dir linear_moe/data/default_tokenizer --vocab-size 4096
"""

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from typing import Iterator, List

_REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_INPUT = os.path.join(
    _REPO_ROOT, "linear_moe", "data", "default_corpus", "corpus.jsonl.gz"
)
DEFAULT_OUTPUT = os.path.join(_REPO_ROOT, "linear_moe", "data", "default_tokenizer")
EOS = "<|endoftext|>"


def iter_texts(paths: List[str], json_key: str) -> Iterator[str]:
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)[json_key]


def _portable_config(directory: str) -> None:
    """Make the saved directory loadable by transformers 4.x and 5.x alike.

    transformers 5 records ``"tokenizer_class": "TokenizersBackend"`` (unknown to
    4.x) and no longer writes special_tokens_map.json; name the class by its
    4.x/5.x-compatible alias ``PreTrainedTokenizerFast`` and write the map.
    """
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg["eos_token"] = EOS
    cfg["pad_token"] = EOS
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": EOS, "pad_token": EOS}, f, indent=2, sort_keys=True)
        f.write("\n")


def train(paths: List[str], output_dir: str, vocab_size: int, json_key: str = "text",
          min_frequency: int = 2):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(paths, json_key), trainer=trainer)

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        bos_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
    )
    # Write to a temp dir next to the target, then swap in, so a killed run never
    # leaves a half-written tokenizer directory.
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    try:
        hf.save_pretrained(tmp)
        _portable_config(tmp)
        os.chmod(tmp, 0o755)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return hf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", default=[DEFAULT_INPUT], help=".jsonl(.gz) files")
    parser.add_argument("--output-dir", default=DEFAULT_OUTPUT)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--min-frequency", type=int, default=2)
    parser.add_argument("--json-key", default="text")
    args = parser.parse_args(argv)
    for p in args.input:
        if not os.path.isfile(p):
            parser.error(f"input file {p} not found; build it with "
                         f"`python toolkits/data/build_default_corpus.py` or pass --input")

    train(args.input, args.output_dir, args.vocab_size, args.json_key, args.min_frequency)

    # Report corpus statistics with the saved (reloaded) tokenizer.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(args.output_dir)
    texts = list(iter_texts(args.input, args.json_key))
    n_tokens = sum(len(ids) for ids in hf(texts)["input_ids"])
    stats = {
        "vocab_size": len(hf),
        "eos_token": hf.eos_token,
        "eos_token_id": hf.eos_token_id,
        "documents": len(texts),
        "characters": sum(len(t) for t in texts),
        "utf8_bytes": sum(len(t.encode("utf-8")) for t in texts),
        "tokens": n_tokens,
        "tokens_with_eod": n_tokens + len(texts),
    }
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
