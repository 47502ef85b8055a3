"""Which training steps a CUDA graph can capture, checked on the CPU: a step must not read
device data on the host nor produce data-dependent shapes (linear_moe.cuda_graph.find_host_syncs).
The registry's cuda_graph flags and validate_args' refusal of MoE under --cuda-graph-impl
(without --moe-device-dispatch) rest on this; the GPU capture itself is tests/gpu/test_cuda_graph_gpu.py."""

import pytest
import torch

from linear_moe.registry import registered_mixers

SEQ, BATCH, VOCAB = 32, 2, 128


@pytest.fixture(scope="module", autouse=True)
def single_process():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import setup_single_process

    setup_single_process()


def _host_syncs(mixer, base_model="llama3", extra=()):
    from linear_moe.cuda_graph import find_host_syncs
    from linear_moe.model_provider import build_standalone

    argv = ["--base-model", base_model, "--model-size", "tiny", "--layer-type-list", "LN",
            "--la-module", mixer, "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(VOCAB - 1), "--mock-data", "--seq-length", str(SEQ),
            "--max-position-embeddings", str(SEQ), "--micro-batch-size", str(BATCH),
            "--train-iters", "1", *extra]
    model, _, _ = build_standalone(argv)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    step = lambda: model(tokens, positions, None, labels=tokens).float().mean().backward()
    step()  # first-call set-up (caches, lazy buffers) is not what a replay runs
    return find_host_syncs(step)


@pytest.mark.parametrize("mixer", sorted(registered_mixers()))
def test_cuda_graph_flag_matches_the_step(mixer):
    syncs = _host_syncs(mixer)
    if registered_mixers()[mixer].cuda_graph:
        assert not syncs, f"'{mixer}' is registered cuda_graph=True but its step syncs: {syncs}"
    else:
        assert syncs, f"'{mixer}' is registered cuda_graph=False but its step has no host sync"


def test_moe_step_syncs_unless_dispatched_on_the_device():
    """megatron-core's dispatcher reads the expert counts on the host (so --cuda-graph-impl
    refuses MoE without --moe-device-dispatch); the device dispatch does not."""
    syncs = _host_syncs("gla", "qwen2_moe")
    assert any("token_dispatcher" in where or "moe_utils" in where for _, where in syncs), syncs
    assert not _host_syncs("gla", "qwen2_moe", ["--moe-device-dispatch"])
