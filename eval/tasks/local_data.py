"""The local tasks' documents: the .jsonl files beside this module, as a datasets split
(lm-eval's ``custom_dataset``), so the tasks need no download and no working directory."""

import functools
import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _split(name: str, **unused) -> dict:
    with open(os.path.join(HERE, f"{name}.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()]
    return {"test": datasets.Dataset.from_list(docs)}


# what the tasks' YAML names (custom_dataset: !function local_data.<name>)
python_mc = functools.partial(_split, "python_mc")
python_text = functools.partial(_split, "python_text")
python_gen = functools.partial(_split, "python_gen")
