"""Supervised finetuning: the loss mask covers responses only, and a tiny finetune started from
a pretrained Megatron checkpoint lowers the loss."""

import json
import subprocess
import sys

import pytest
import torch

from linear_moe.data.sft import SFTDataset, encode_conversation, read_conversations


class CharTokenizer:
    """One id per character (id 0 = end of document): easy to read the masks in tests."""

    eod = 0

    def tokenize(self, text):
        return [ord(c) for c in text]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_mask_trains_only_on_response_tokens(tmp_path):
    path = _write(tmp_path / "a.jsonl", [{"prompt": "hi", "response": "yo"}])
    sample = SFTDataset(path, CharTokenizer(), seq_length=32, num_samples=1)[0]
    labels, mask = sample["labels"].tolist(), sample["loss_mask"].tolist()
    trained = "".join(chr(t) if t else "<eod>" for t, m in zip(labels, mask) if m)
    assert trained == "yo\n<eod>"
    # tokens/labels are the same stream shifted by one; padding is never trained on
    assert sample["tokens"][1:].tolist() == labels[:-1]
    assert sum(mask) == len("yo\n") + 1


def test_messages_train_on_every_assistant_turn(tmp_path):
    path = _write(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"}]}])
    ids, train = encode_conversation(read_conversations(path)[0], CharTokenizer().tokenize, 0)
    assert "".join(chr(i) if i else "|" for i, t in zip(ids, train) if t) == "A1\nA2\n|"


def test_masked_loss_ignores_prompt_positions(tmp_path):
    from linear_moe.pretrain import loss_func

    path = _write(tmp_path / "a.jsonl", [{"prompt": "a long prompt", "response": "ok"}])
    mask = SFTDataset(path, CharTokenizer(), seq_length=24, num_samples=1)[0]["loss_mask"]
    per_token = torch.rand(1, 24)
    loss, count, _ = loss_func(mask, per_token)
    perturbed = per_token + 100.0 * (1 - mask)  # change every untrained position
    assert loss_func(mask, perturbed)[0] == loss and count == mask.sum()


def test_packing_fills_samples(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "p", "response": "r"}] * 10)
    padded = SFTDataset(path, CharTokenizer(), seq_length=80, num_samples=10)
    packed = SFTDataset(path, CharTokenizer(), seq_length=80, num_samples=10, packing=True)
    assert len(packed.base) < len(padded.base)
    assert packed[0]["loss_mask"].sum() > padded[0]["loss_mask"].sum()


def test_bad_files_fail_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--sft-data-path"):
        read_conversations(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=":1: expected 'prompt'/'response' or 'messages'"):
        read_conversations(_write(tmp_path / "b.jsonl", [{"text": "x"}]))


@pytest.mark.slow
def test_finetune_from_pretrained_checkpoint_lowers_loss(tmp_path):
    from test_pretrain import ROOT, _command, _env, _losses, _run

    from linear_moe.data import ensure_default_dataset
    from linear_moe.data.sft import write_default_sft

    data = ensure_default_dataset(tmp_path / "data")
    pretrained = tmp_path / "pretrained"
    _run(_command(data, pretrained, train_iters=10, extra=["--save-interval", "10"]))
    sft = write_default_sft(str(tmp_path / "data"))
    cmd = _command(data, tmp_path / "sft", train_iters=20,
                   extra=["--save-interval", "1000", "--sft-data-path", sft,
                          "--pretrained-checkpoint", str(pretrained)])
    out = _run(cmd)
    assert "attempting to finetune with checkpoint" in out
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 21))  # finetuning restarts the iteration count
    assert sum(losses[i] for i in range(16, 21)) / 5 < losses[1] - 0.3
