"""Evaluation of a trained checkpoint (linear_moe.inference, eval/): a tiny Qwen2-MoE 'LLLN'
run trained and saved by megatron.training on the CPU, loaded back into one process.

- the loaded model holds the checkpoint's tensors (read independently, by torch's DCP reader),
  also of a checkpoint saved by two ranks under TP = 2 with sequence parallelism;
- continuation log-probabilities in a padded batch equal each one computed alone, and greedy
  generation (one token per step with the layers' states) equals an argmax loop over whole
  re-runs;
- lm-eval runs the three offline tasks of eval/tasks (multiple choice, rolling perplexity,
  generate_until) through the adapter, via eval/run_lm_eval.py;
- bad input fails before the model is built, with the fix in the message.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from test_pretrain import _command, _env, _run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("eval")
ITERATIONS = 20


def _train(root, iterations, extra=(), ranks=1):
    from linear_moe.data import ensure_default_dataset

    save = root / "checkpoints"
    cmd = _command(ensure_default_dataset(root / "data"), save, train_iters=iterations,
                   extra=("--save-interval", str(iterations), *extra))
    if ranks > 1:  # torchrun on the CPU: gloo, one process per rank
        env = {**_env(), "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-port", str(_free_port()), *cmd[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    else:
        _run(cmd)
    return save


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("eval"), ITERATIONS)


@pytest.fixture(scope="module")
def tp2_checkpoint(tmp_path_factory):
    """Saved by two ranks under TP = 2 with sequence parallelism (the layout's shards)."""
    return _train(tmp_path_factory.mktemp("eval_tp2"), 6,
                  ("--tensor-model-parallel-size", "2", "--sequence-parallel"), ranks=2)


def _loaded_against_checkpoint(rank, world_size, save):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from linear_moe.inference import checkpoint_dir, load_checkpoint

    model, _ = load_checkpoint(save)
    flat = os.path.join(save, "flat.pt")
    dcp_to_torch_save(checkpoint_dir(save), flat)
    stored = torch.load(flat, weights_only=False)
    mismatched, compared = [], 0
    for name, p in model.named_parameters():
        expert = re.search(r"local_experts\.(\d+)\.", name)
        key = re.sub(r"local_experts\.\d+\.", "experts.", name) if expert else name
        want = stored[key][int(expert.group(1))] if expert else stored[key]
        compared += 1
        if not torch.equal(p.detach(), want.to(p.dtype)):
            mismatched.append(name)
    return compared, mismatched


@pytest.mark.slow
@pytest.mark.parametrize("saved_by", ["one rank", "TP=2 with sequence parallelism"])
def test_loaded_model_holds_the_checkpoint_tensors(saved_by, request):
    """One process holds every tensor of the checkpoint, the TP shards put back together."""
    save = request.getfixturevalue("checkpoint" if saved_by == "one rank" else "tp2_checkpoint")
    compared, mismatched = run_distributed(_loaded_against_checkpoint, 1, str(save))[0]
    assert compared > 50 and not mismatched, mismatched


def _scores_and_generation(rank, world_size, save):
    from linear_moe.inference import CausalLM

    lm = CausalLM.from_checkpoint(save)
    texts = [("The assert statement", " is a convenient way to insert debugging assertions"),
             ("A", " function definition defines a user-defined function object"),
             ("Names refer to objects.", " Names")]
    pairs = [(lm.encode(c), lm.encode(x)) for c, x in texts]
    batched = lm.continuation_logprobs(pairs, batch_size=3)
    alone = []
    for context, continuation in pairs:  # unpadded, by hand
        logp = torch.log_softmax(lm.logits(torch.tensor([context + continuation])), -1)[0]
        steps = range(len(context) - 1, len(context) + len(continuation) - 1)
        alone.append(sum(logp[t, tok].item() for t, tok in zip(steps, continuation)))
    context = lm.encode("The for statement is used to")
    generated = lm.generate(context, 6)
    ids = list(context)
    for _ in range(6):
        ids.append(int(lm.logits(torch.tensor([ids]))[0, -1, :lm.vocab_size].argmax()))
    tokens = sum(len(x) for _, x in pairs)
    return batched, alone, generated, ids[len(context):], tokens, lm.model.vocab_size


@pytest.mark.slow
def test_batched_log_probs_and_greedy_generation(checkpoint):
    batched, alone, generated, by_hand, tokens, vocab = run_distributed(
        _scores_and_generation, 1, str(checkpoint))[0]
    for (score, _), ref in zip(batched, alone):
        assert math.isclose(score, ref, rel_tol=1e-5, abs_tol=1e-4)
    # trained on this subject's text: better than a uniform guess over the vocabulary
    assert -sum(alone) / tokens < math.log(vocab)
    assert generated == by_hand[:len(generated)] and len(generated) > 0


@pytest.mark.slow
def test_lm_eval_runs_the_offline_tasks(checkpoint, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "results.json"
    env = {**_env(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "run_lm_eval.py"), "--load", str(checkpoint),
         "--tasks", "linear_moe_tiny_mc,linear_moe_tiny_ppl,linear_moe_tiny_gen",
         "--batch-size", "4", "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert 0.0 <= results["linear_moe_tiny_mc"]["acc,none"] <= 1.0
    ppl = results["linear_moe_tiny_ppl"]
    assert 1.0 < ppl["byte_perplexity,none"] < 256.0  # below a uniform guess over bytes
    assert math.isclose(ppl["bits_per_byte,none"], math.log2(ppl["byte_perplexity,none"]))
    assert 0.0 <= results["linear_moe_tiny_gen"]["exact_match,none"] <= 1.0


def test_checkpoint_dir_errors_name_the_fix(tmp_path):
    from linear_moe.inference import checkpoint_dir

    with pytest.raises(FileNotFoundError, match="--save directory of a training run"):
        checkpoint_dir(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="latest_checkpointed_iteration.txt"):
        checkpoint_dir(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("latest")
    with pytest.raises(ValueError, match="--iteration"):
        checkpoint_dir(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    with pytest.raises(FileNotFoundError, match="pick an --iteration that was saved"):
        checkpoint_dir(str(tmp_path))
    (tmp_path / "release").mkdir()
    assert checkpoint_dir(str(tmp_path)) == str(tmp_path / "release")
    (tmp_path / "iter_0000007").mkdir()
    with pytest.raises(FileNotFoundError, match="pick an --iteration that was saved"):
        checkpoint_dir(str(tmp_path), iteration=8)
    assert checkpoint_dir(str(tmp_path), iteration=7) == str(tmp_path / "iter_0000007")


def test_unknown_task_fails_before_the_model_loads(tmp_path):
    pytest.importorskip("lm_eval")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "run_lm_eval.py"), "--load", str(tmp_path),
         "--tasks", "linear_moe_tiny_mc,no_such_task"],
        capture_output=True, text=True, env={**_env(), "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode != 0
    assert "unknown lm-eval task(s) no_such_task" in proc.stderr


@pytest.mark.slow
def test_cli_generate_continues_the_prompt(checkpoint):
    proc = subprocess.run(
        [sys.executable, "-m", "linear_moe.cli", "generate", "--load", str(checkpoint),
         "--prompt", "The for statement", "--max-new-tokens", "5"],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("The for statement")]
    assert len(lines) == 1, proc.stdout[-2000:]


_ROUTER_ON_A_CUDA_MACHINE = """
import types, torch
from megatron.core.transformer.moe.router import TopKRouter
from megatron_patch.cpu_support import cpu_scope
torch.cuda.is_available, torch.cuda.current_device = (lambda: True), (lambda: 0)  # a GPU machine
router = types.SimpleNamespace(weight=torch.nn.Parameter(torch.randn(4, 8)), bias=None,
                               config=types.SimpleNamespace(moe_router_dtype=None))
x = torch.randn(3, 8)
with cpu_scope(torch.device("cpu")):
    logits = TopKRouter.gating(router, x)
assert router.weight.device.type == "cpu" and logits.device.type == "cpu"
torch.testing.assert_close(logits, x @ router.weight.T)
try:
    TopKRouter.gating(router, x)  # unscoped, megatron-core moves the weight to the GPU
except (AssertionError, RuntimeError) as error:
    print("unscoped:", type(error).__name__)
"""


def test_a_cpu_model_on_a_gpu_machine_keeps_the_router_on_the_cpu():
    """megatron-core's router moves its weight to torch.cuda.current_device() at every forward
    (found by the GPU evaluation test scoring a checkpoint on the CPU); CausalLM runs a CPU model
    under cpu_scope, which keeps it there. CUDA is faked present in a process of its own."""
    proc = subprocess.run([sys.executable, "-c", _ROUTER_ON_A_CUDA_MACHINE], capture_output=True,
                          text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unscoped:" in proc.stdout, proc.stdout  # the scope is what keeps it on the CPU
