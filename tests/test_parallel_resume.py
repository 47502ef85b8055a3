"""A single-rank run's checkpoint resumed under another parallel layout (two gloo ranks through
megatron.training) trains on to the single-rank run's losses: pipeline parallelism (PP=2, and
interleaved with two virtual stages a rank), context parallelism (CP=2) and expert parallelism
(EP=2). The checkpoint is resharded at load by dist checkpointing (torch_dist), so this tests
each layout's training step and the resharding of every parameter (per-layer mixers, experts).
The other way round, the final checkpoints of the PP=2 and EP=2 runs loaded into one process
(what evaluation and HF export do) give the single-rank model's logits.

Why resume rather than train from scratch side by side: megatron-core seeds each pipeline
stage and each expert-parallel rank differently, so the same --seed gives different initial
weights under PP / EP. Megatron's non-distributed optimizer state does not reshard across EP
(its param groups split into dense + expert optimizers), so the EP run loads the weights alone
(--no-load-optim) and is compared with the single-rank run resumed the same way.
"""

import shutil
import subprocess
import sys

import pytest

from test_eval import _free_port
from test_pretrain import _command, _env, _losses, _run

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("parallel_resume")]
SAVED, LAST = 3, 6
MIXER = "gated_deltanet"  # short convs, a gated recurrence, MoE (the tiny qwen2_moe preset)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-rank run's losses, saving at SAVED, and a copier of that checkpoint."""
    from linear_moe.data import ensure_default_dataset

    root = tmp_path_factory.mktemp("parallel_resume")
    data = ensure_default_dataset(root / "data")
    saved = root / "single"
    losses = _losses(_run(_command(data, saved, la_module=MIXER, train_iters=LAST,
                                   extra=("--save-interval", str(SAVED)))))
    assert sorted(losses) == list(range(1, LAST + 1)), losses

    def checkpoint_at_saved(name):
        copy = root / name
        shutil.copytree(saved, copy)
        shutil.rmtree(copy / f"iter_{LAST:07d}")
        (copy / "latest_checkpointed_iteration.txt").write_text(str(SAVED))
        return copy

    return data, losses, checkpoint_at_saved, saved, {}


_LOGITS = """
import json, sys, torch
from linear_moe.inference import CausalLM
rows = []
for path in sys.argv[1:]:
    lm = CausalLM.from_checkpoint(path, device="cpu")
    tokens = torch.arange(48).remainder(lm.vocab_size).view(2, 24)
    rows.append(lm.logits(tokens)[..., :lm.vocab_size].tolist())
print(json.dumps(rows))
"""


def _single_process_logits(*checkpoints):
    """The logits of runs' final checkpoints, each loaded into one CPU process (one process
    for all: linear_moe.inference, which evaluation and HF export use), whatever layout saved
    them."""
    import json

    import torch

    for checkpoint in checkpoints:
        assert (checkpoint / "latest_checkpointed_iteration.txt").read_text().strip() == str(LAST)
    proc = subprocess.run([sys.executable, "-c", _LOGITS, *map(str, checkpoints)],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.tensor(rows) for rows in json.loads(proc.stdout.strip().splitlines()[-1])]


def _resume(reference, name, ranks, *flags):
    """The losses of the resumed run (once per name: the tests share the runs)."""
    data, _, checkpoint_at_saved, _, runs = reference
    if name not in runs:
        runs[name] = _run_resumed(data, checkpoint_at_saved(name), ranks, flags)
    return runs[name]


def _run_resumed(data, checkpoint, ranks, flags):
    cmd = _command(data, checkpoint, la_module=MIXER, train_iters=LAST,
                   extra=("--save-interval", "1000", *flags))
    if ranks == 1:
        return _losses(_run(cmd))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           str(ranks), "--master-port", str(_free_port()), *cmd[1:]],
                          capture_output=True, text=True, timeout=600,
                          env={**_env(), "CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _losses(proc.stdout)


def _assert_same(resumed, expected, expected_resumed=False):
    assert sorted(resumed) == list(range(SAVED + 1, LAST + 1)), resumed
    expected = dict(expected)
    if not expected_resumed:
        # megatron.training logs a process's second iteration as the mean of its first two
        # (see test_pretrain.test_killed_run_resumes_with_identical_losses)
        expected[SAVED + 2] = (expected[SAVED + 1] + expected[SAVED + 2]) / 2
    for it in resumed:
        assert resumed[it] == pytest.approx(expected[it], rel=1e-5), (it, resumed, expected)


PP2 = ("--pipeline-model-parallel-size", "2")


@pytest.mark.parametrize("flags", [
    PP2,
    ("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"),
    ("--context-parallel-size", "2"),
], ids=["pp2", "pp2_vpp2", "cp2"])
def test_layout_resumes_the_single_rank_run(reference, flags):
    _assert_same(_resume(reference, _name(flags), 2, *flags), reference[1])


def _name(flags):
    return "_".join(flags).strip("-")


def test_pp2_checkpoint_loads_into_one_process(reference):
    """The other way round: the final checkpoint a PP=2 run saved, put back together in one
    process, gives the single-rank run's final model's logits."""
    single = reference[3]
    _resume(reference, _name(PP2), 2, *PP2)
    pp2, expected = _single_process_logits(single.parent / _name(PP2), single)
    assert (pp2 - expected).abs().max() <= 1e-4 * expected.abs().max()


FRESH_OPTIMIZER = ("--no-load-optim", "--no-load-rng")
# gloo has no all_to_all_single with split sizes
EP2 = ("--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather")


def test_ep2_resumes_the_single_rank_weights(reference):
    single = _resume(reference, "single_weights", 1, *FRESH_OPTIMIZER)
    ep2 = _resume(reference, "ep2_weights", 2, *FRESH_OPTIMIZER, *EP2)
    _assert_same(ep2, single, expected_resumed=True)


def test_ep2_checkpoint_loads_into_one_process(reference):
    """The experts an EP=2 run saved, one half a rank, put back together in one process."""
    _resume(reference, "single_weights", 1, *FRESH_OPTIMIZER)
    _resume(reference, "ep2_weights", 2, *FRESH_OPTIMIZER, *EP2)
    root = reference[3].parent
    ep2, expected = _single_process_logits(root / "ep2_weights", root / "single_weights")
    assert (ep2 - expected).abs().max() <= 1e-4 * expected.abs().max()
