"""Data pipeline: shipped corpus/tokenizer, jsonl -> Megatron indexed dataset -> GPTDataset.

CPU only, no network (the tokenizer is loaded from the repo with HF offline mode on).
"""

import gzip
import json
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy  # noqa: E402
import pytest  # noqa: E402

from linear_moe.data import (  # noqa: E402
    default_corpus_path,
    default_tokenizer_path,
    ensure_default_dataset,
    preprocess_jsonl,
)
from linear_moe.data import default_corpus as dc  # noqa: E402

EOS = "<|endoftext|>"
DOCS = [
    "def f(x):\n    return x ** 2  # squares\n",
    "Unicode: héllo “quotes” — 日本語 ✓ 🐍",
    "",  # empty text: stored as just [eod]
    "The \"assert\" statement\n**********************\n\nAssert statements are convenient.",
]


def _megatron_args(tokenizer_model):
    # The fields megatron.core.tokenizers.utils.build_tokenizer reads for HuggingFaceTokenizer,
    # as `pretrain` would pass them for
    # --tokenizer-type HuggingFaceTokenizer --tokenizer-model <dir>.
    return SimpleNamespace(
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=tokenizer_model,
        chat_template=None,
        vocab_file=None,
        merge_file=None,
        special_tokens=None,
        tokenizer_hf_no_use_fast=False,
        trust_remote_code=False,
        tokenizer_hf_no_include_special_tokens=False,
        metadata_path=None,
        pad_vocab_size=True,
        make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=1,
        rank=0,
    )


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_tokenizer_path(), local_files_only=True)


@pytest.fixture(scope="module")
def megatron_tokenizer():
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    return build_tokenizer(_megatron_args(default_tokenizer_path()))


@pytest.fixture(scope="module")
def default_prefix(tmp_path_factory):
    return ensure_default_dataset(str(tmp_path_factory.mktemp("default_data")))


def _write_jsonl(path, docs, key="text"):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": i, key: text}, ensure_ascii=False) + "\n")
            if i == 0:
                f.write("\n")  # blank lines are ignored
    return str(path)


def _cli_main():
    """``main`` of toolkits/data/preprocess_data.py (a script, not an installed module)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "_preprocess_data_cli", os.path.join(root, "toolkits", "data", "preprocess_data.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _is_one_line(msg):
    return "\n" not in msg and len(msg) < 400


# --- shipped files & tokenizer --------------------------------------------------------------


def test_shipped_files():
    corpus = default_corpus_path()
    assert os.path.getsize(corpus) < 1_000_000
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    assert 300 <= len(docs) <= 5000
    assert all(isinstance(d["text"], str) and d["text"].strip() for d in docs)
    here = os.path.dirname(corpus)
    assert os.path.isfile(os.path.join(here, "LICENSE.md"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert os.path.isfile(os.path.join(default_tokenizer_path(), name)), name


def test_tokenizer_offline_hf(hf_tokenizer):
    assert len(hf_tokenizer) == 4096
    assert hf_tokenizer.eos_token == EOS and hf_tokenizer.pad_token == EOS
    assert hf_tokenizer.eos_token_id == hf_tokenizer.pad_token_id == 0
    assert hf_tokenizer.convert_tokens_to_ids(EOS) == 0
    # No BOS/EOS is added on encode.
    assert hf_tokenizer("abc").input_ids == hf_tokenizer("abc", add_special_tokens=False).input_ids
    assert EOS not in hf_tokenizer.convert_ids_to_tokens(hf_tokenizer("abc").input_ids)


def test_tokenizer_offline_megatron(megatron_tokenizer, hf_tokenizer):
    tok = megatron_tokenizer
    assert tok.vocab_size == 4096
    assert tok.eod == 0 == hf_tokenizer.eos_token_id
    assert tok.pad == 0
    for text in DOCS[:2] + [DOCS[3], "  leading spaces\n\n\ttabs and\r\nCRLF  "]:
        ids = tok.tokenize(text)
        assert ids == hf_tokenizer(text).input_ids
        assert max(ids) < 4096
        assert tok.detokenize(ids) == text
    assert tok.tokenize(EOS) == [tok.eod]


def test_megatron_tokenizer_from_pretrained(hf_tokenizer):
    from megatron.core.tokenizers import MegatronTokenizer

    tok = MegatronTokenizer.from_pretrained(
        tokenizer_path=default_tokenizer_path(), metadata_path={"library": "huggingface"}
    )
    assert tok.eod == hf_tokenizer.eos_token_id == 0
    assert tok.detokenize(tok.tokenize(DOCS[1])) == DOCS[1]


# --- preprocessing ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_preprocess_roundtrip(tmp_path, hf_tokenizer, suffix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = _write_jsonl(tmp_path / f"docs{suffix}", DOCS)
    prefix = preprocess_jsonl([src], str(tmp_path / "out" / "small"), default_tokenizer_path())
    assert prefix == str(tmp_path / "out" / "small_text_document")
    assert IndexedDataset.exists(prefix)
    assert sorted(os.listdir(tmp_path / "out")) == [
        "small_text_document.bin",
        "small_text_document.idx",
    ]
    ds = IndexedDataset(prefix)
    assert len(ds) == len(DOCS)
    assert ds.index.dtype == numpy.uint16
    eod = hf_tokenizer.eos_token_id
    for i, text in enumerate(DOCS):
        assert ds[i].tolist() == hf_tokenizer(text).input_ids + [eod]
    assert ds.document_indices.tolist() == list(range(len(DOCS) + 1))


def test_preprocess_cli_no_eod_and_json_key(tmp_path, hf_tokenizer, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    main = _cli_main()
    a = _write_jsonl(tmp_path / "a.jsonl", DOCS[:2], key="content")
    b = _write_jsonl(tmp_path / "b.jsonl.gz", DOCS[2:], key="content")
    rc = main(["--input", a, b, "--output-prefix", str(tmp_path / "cli"),
               "--json-key", "content", "--no-append-eod"])
    assert rc == 0
    prefix = str(tmp_path / "cli_content_document")
    assert capsys.readouterr().out == prefix + "\n"
    ds = IndexedDataset(prefix)
    expected = [hf_tokenizer(t).input_ids for t in DOCS if t]  # empty doc skipped w/o eod
    assert [ds[i].tolist() for i in range(len(ds))] == expected


def test_missing_files_errors(tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(FileNotFoundError) as e:
        preprocess_jsonl([str(tmp_path / "nope.jsonl")], str(out / "x"))
    assert _is_one_line(str(e.value)) and "pass an existing .jsonl" in str(e.value)

    src = _write_jsonl(tmp_path / "docs.jsonl", DOCS)
    with pytest.raises(FileNotFoundError) as e:
        preprocess_jsonl(src, str(out / "x"), tokenizer_path=str(tmp_path / "no_tok"))
    msg = str(e.value)
    assert _is_one_line(msg) and "train_tokenizer.py" in msg and default_tokenizer_path() in msg
    assert not out.exists()  # raised before any work

    main = _cli_main()
    assert main(["--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(out / "x")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "nope.jsonl" in err[0]


# --- default dataset --------------------------------------------------------------------


def test_ensure_default_dataset_idempotent(default_prefix, hf_tokenizer, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out_dir = os.path.dirname(default_prefix)
    assert default_prefix == os.path.join(out_dir, "pydoc_topics_text_document")
    files = sorted(os.listdir(out_dir))
    assert files == [
        "pydoc_topics_text_document.bin",
        "pydoc_topics_text_document.idx",
        "pydoc_topics_text_document.manifest.json",
    ]  # no temp leftovers
    mtimes = {f: os.stat(os.path.join(out_dir, f)).st_mtime_ns for f in files}

    assert ensure_default_dataset(out_dir) == default_prefix
    assert {f: os.stat(os.path.join(out_dir, f)).st_mtime_ns for f in files} == mtimes

    with gzip.open(default_corpus_path(), "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    ds = IndexedDataset(default_prefix)
    assert len(ds) == len(texts)
    for i in (0, len(texts) // 2, len(texts) - 1):
        assert ds[i].tolist() == hf_tokenizer(texts[i]).input_ids + [0]

    # CLI: stdout carries only the prefix.
    capsys.readouterr()
    assert dc.main(["--output-dir", out_dir]) == 0
    assert capsys.readouterr().out == default_prefix + "\n"


def test_ensure_default_dataset_rebuilds_incomplete(tmp_path):
    prefix = ensure_default_dataset(str(tmp_path))
    size = os.path.getsize(prefix + ".bin")
    os.remove(prefix + ".manifest.json")  # as if killed before the manifest was written
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(10)
    assert ensure_default_dataset(str(tmp_path)) == prefix
    assert os.path.getsize(prefix + ".bin") == size


# --- Megatron GPTDataset over the default dataset -----------------------------------------


def test_gpt_dataset_over_default(default_prefix, megatron_tokenizer, tmp_path):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    seq = 64
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=seq,
        blend=([default_prefix], None),
        split="98,2,0",
        path_to_cache=str(tmp_path / "cache"),
        tokenizer=megatron_tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, [16, 4, None], lambda: True, config
    ).build()
    assert test is None
    assert len(train) >= 16 and len(valid) >= 4  # a single-dataset blend exposes full epochs
    for ds in (train, valid):
        for i in (0, len(ds) - 1):
            sample = ds[i]
            tokens, labels = sample["tokens"], sample["labels"]
            assert tokens.shape == labels.shape == (seq,)
            assert int(tokens.max()) < megatron_tokenizer.vocab_size
            assert tokens[1:].tolist() == labels[:-1].tolist()
            assert float(sample["loss_mask"].sum()) == seq
