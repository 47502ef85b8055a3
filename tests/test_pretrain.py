"""End to end through megatron.training.pretrain on the CPU, on the embedded corpus.

- every registered mixer trains inside the tiny Qwen2-MoE preset with a falling loss;
- a run killed (SIGKILL) after its iteration-15 checkpoint resumes from it, and its
  iterations 16..30 have the losses of an uninterrupted 30-iteration run.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from linear_moe.models import PRESETS
from linear_moe.registry import registered_mixers

ROOT = Path(__file__).resolve().parents[1]
ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?lm loss: ([0-9.E+-]+)")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from linear_moe.data import ensure_default_dataset

    return ensure_default_dataset(tmp_path_factory.mktemp("data"))


def _command(dataset, checkpoint_dir, la_module="gla", train_iters=30, extra=(),
             base_model="qwen2_moe"):
    from linear_moe.data import default_tokenizer_path

    return [
        sys.executable, str(ROOT / "pretrain_linear_moe.py"),
        "--base-model", base_model, "--model-size", "tiny", "--la-module", la_module, "--layer-type-list", "LLLN",
        "--seq-length", "128", "--max-position-embeddings", "128",
        "--micro-batch-size", "4", "--global-batch-size", "8",
        "--train-iters", str(train_iters), "--lr", "2e-3", "--min-lr", "1e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "5",
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0",
        "--data-path", str(dataset), "--split", "98,2,0", "--num-workers", "0",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
        str(default_tokenizer_path()),
        *(["--save", str(checkpoint_dir), "--load", str(checkpoint_dir)] if checkpoint_dir
          else []),
        "--ckpt-format", "torch_dist", *extra,
    ]


def _env():
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)  # single process, no torchrun
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _losses(log: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in ITERATION.finditer(log)}


def _run(cmd) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("la_module", sorted(registered_mixers()))
def test_mixer_trains_in_tiny_preset(la_module, dataset, tmp_path):
    # The final checkpoint save is each mixer's only dist-checkpointing (sharded_state_dict) test.
    losses = _losses(_run(_command(dataset, tmp_path / "ckpt", la_module, train_iters=20,
                                   extra=["--save-interval", "1000"])))
    assert sorted(losses) == list(range(1, 21))
    first, last = losses[1], sum(losses[i] for i in range(16, 21)) / 5
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("base_model", sorted(PRESETS))
def test_each_base_model_trains_a_hybrid(base_model, dataset, tmp_path):
    # No checkpoint (~8 s a run on 2 cores): each base's checkpoints are the launcher tests'.
    losses = _losses(_run(_command(dataset, None, "gated_deltanet", train_iters=20,
                                   base_model=base_model)))
    assert sorted(losses) == list(range(1, 21))
    first, last = losses[1], sum(losses[i] for i in range(16, 21)) / 5
    assert last < first - 0.5, f"{base_model}: loss did not fall: {first:.3f} -> {last:.3f}"


@pytest.mark.slow
def test_device_dispatch_trains_like_megatron_dispatch(dataset, tmp_path):
    """--moe-device-dispatch through megatron's training loop: the qwen2_moe tiny preset (its
    all-to-all dispatcher) and the device dispatch give the same losses (fp32)."""
    reference = _losses(_run(_command(dataset, None, "gla", train_iters=10)))
    device = _losses(_run(_command(dataset, None, "gla", train_iters=10,
                                   extra=["--moe-device-dispatch"])))
    assert sorted(device) == list(range(1, 11))
    assert all(abs(device[i] - reference[i]) < 1e-3 for i in reference), (reference, device)


@pytest.mark.slow
def test_killed_run_resumes_with_identical_losses(dataset, tmp_path):
    reference = _losses(_run(_command(dataset, tmp_path / "uninterrupted",
                                      extra=["--save-interval", "15"])))
    assert sorted(reference) == list(range(1, 31))
    assert sum(reference[i] for i in range(26, 31)) / 5 < reference[1] - 1.0

    # First attempt: killed as soon as the iteration-15 checkpoint is on disk.
    ckpt = tmp_path / "resumed"
    cmd = _command(dataset, ckpt, extra=["--save-interval", "15"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(), start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "successfully saved checkpoint from iteration" in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-50:])
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "15"
    first_attempt = _losses("".join(seen))
    assert max(first_attempt) == 15

    # Second attempt: the same command resumes at iteration 16.
    resumed = _losses(_run(cmd))
    assert sorted(resumed) == list(range(16, 31))
    # megatron.training logs a process's first iteration without resetting its loss
    # accumulator, so the second logged value (17 here, 2 in the reference run) is the mean of
    # two iterations; the trained values themselves are identical.
    expected = dict(reference)
    expected[17] = (reference[16] + reference[17]) / 2
    for it in range(16, 31):
        assert resumed[it] == pytest.approx(expected[it], rel=2e-6), (it, resumed, reference)


@pytest.mark.slow
def test_distributed_optimizer_run_resumes(dataset, tmp_path):
    """megatron_patch.distrib_optim_resume: without it, loading a distributed-optimizer
    checkpoint with torch's Adam (no Apex/TE) raises; the resumed run must train on."""
    ckpt = tmp_path / "ckpt"
    cmd = _command(dataset, ckpt, train_iters=8,
                   extra=["--save-interval", "4", "--use-distributed-optimizer"])
    assert sorted(_losses(_run(cmd))) == list(range(1, 9))
    (ckpt / "latest_checkpointed_iteration.txt").write_text("4")
    resumed = _run(cmd)
    assert "loading distributed checkpoint" in resumed
    assert sorted(_losses(resumed)) == [5, 6, 7, 8]


def test_torch_compile_works_with_cpu_support_enabled():
    """megatron_patch.cpu_support fakes torch.cuda's queries for the whole process; inductor
    then reads the fake device properties for its cache key (gcnArchName on a CPU wheel), and a
    torch.compile'd function (ours on CUDA, megatron-core's fusions) must still compile and run.
    In a process of its own: enabling it is for the life of the process."""
    code = ("import torch; from megatron_patch import cpu_support\n"
            "assert cpu_support.enable()\n"
            "x = torch.randn(16)\n"
            "y = torch.compile(lambda t: torch.nn.functional.softplus(t) * 2)(x)\n"
            "assert torch.allclose(y, torch.nn.functional.softplus(x) * 2)\n"
            "print('compiled ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0 and "compiled ok" in proc.stdout, proc.stderr[-3000:]
