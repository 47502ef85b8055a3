"""Supervised finetuning data: jsonl conversations -> Megatron-style samples whose loss mask
covers only the response tokens.

Each jsonl line is either ``{"prompt": str, "response": str}`` or
``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``; assistant turns
(and the end-of-document token closing the conversation) are trained on, everything else is
context only. Samples are padded (one conversation per sample) or packed (several per sample,
each starting where the previous one ended).
"""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import torch

ROLE_PREFIX = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}


def _open(path):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(
        path, encoding="utf-8")


def read_conversations(path: str) -> list[list[tuple[str, str]]]:
    """[(role, text), ...] per line; raises with the line number on a malformed line."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"SFT data file {path} not found; fix --sft-data-path")
    conversations = []
    with _open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "messages" in record:
                turns = [(m["role"], m["content"]) for m in record["messages"]]
            elif "prompt" in record and "response" in record:
                turns = [("user", record["prompt"]), ("assistant", record["response"])]
            else:
                raise ValueError(f"{path}:{number}: expected 'prompt'/'response' or 'messages'")
            bad = {r for r, _ in turns} - set(ROLE_PREFIX)
            if bad:
                raise ValueError(f"{path}:{number}: unknown role(s) {sorted(bad)}; use "
                                 f"{', '.join(ROLE_PREFIX)}")
            conversations.append(turns)
    if not conversations:
        raise ValueError(f"SFT data file {path} has no conversations")
    return conversations


def encode_conversation(turns, tokenize, eod: int) -> tuple[list[int], list[int]]:
    """Token ids and a same-length 0/1 'train on this token' mask."""
    ids, train = [], []
    for role, text in turns:
        prefix = tokenize(ROLE_PREFIX[role])
        body = tokenize(text + "\n")
        ids += prefix + body
        train += [0] * len(prefix) + [int(role == "assistant")] * len(body)
    return ids + [eod], train + [1]


class SFTDataset(torch.utils.data.Dataset):
    """``num_samples`` samples of ``seq_length`` tokens, cycling over the conversations in a
    seeded order per epoch, like Megatron's GPTDataset returns them (tokens, labels, loss_mask,
    position_ids)."""

    def __init__(self, path: str, tokenizer, seq_length: int, num_samples: int, seed: int = 1234,
                 packing: bool = False):
        self.seq_length = seq_length
        self.pad = tokenizer.eod
        encoded = [encode_conversation(c, tokenizer.tokenize, tokenizer.eod)
                   for c in read_conversations(path)]
        self.base = self._pack(encoded) if packing else [self._fit(*e) for e in encoded]
        rng = np.random.default_rng(seed)
        epochs = -(-max(num_samples, 1) // len(self.base))
        self.order = np.concatenate([rng.permutation(len(self.base)) for _ in range(epochs)])
        self.num_samples = max(num_samples, 1)

    def _fit(self, ids, train):
        """Truncate/pad one token stream to seq_length + 1 (inputs and shifted labels)."""
        n = self.seq_length + 1
        ids, train = ids[:n], train[:n]
        pad = n - len(ids)
        return ids + [self.pad] * pad, train + [0] * pad

    def _pack(self, encoded):
        samples, ids, train = [], [], []
        for e_ids, e_train in encoded:
            if ids and len(ids) + len(e_ids) > self.seq_length + 1:
                samples.append(self._fit(ids, train))
                ids, train = [], []
            ids, train = ids + e_ids, train + e_train
        samples.append(self._fit(ids, train))
        return samples

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index):
        ids, train = self.base[self.order[index % len(self.order)]]
        ids = torch.tensor(ids, dtype=torch.long)
        return {
            "tokens": ids[:-1],
            "labels": ids[1:],
            # A label is trained on when the token it predicts is a response token.
            "loss_mask": torch.tensor(train[1:], dtype=torch.float),
            "position_ids": torch.arange(self.seq_length, dtype=torch.long),
        }


def write_default_sft(output_dir: str) -> str:
    """A small SFT set built offline from the embedded corpus: "Explain <topic>." -> the
    topic's first section. Returns the jsonl path (rebuilt only when missing)."""
    from linear_moe.data.default_corpus import default_corpus_path

    path = os.path.join(output_dir, "pydoc_topics_sft.jsonl")
    if os.path.exists(path):
        return path
    os.makedirs(output_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with gzip.open(default_corpus_path(), "rt", encoding="utf-8") as src, \
            open(tmp, "w", encoding="utf-8") as dst:
        for line in src:
            doc = json.loads(line)
            _, topic, part = doc["id"].rsplit("/", 2)
            if part != "0":
                continue
            answer = doc["text"].split("\n\n", 2)
            response = "\n\n".join(answer[:2])[:1200]
            dst.write(json.dumps({"prompt": f"Explain the Python topic '{topic}'.",
                                  "response": response}) + "\n")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="write the default SFT jsonl; prints its path")
    parser.add_argument("--output-dir", required=True)
    print(write_default_sft(parser.parse_args().output_dir))
