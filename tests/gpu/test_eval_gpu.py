"""Evaluation on CUDA: a tiny 'LLLN' Qwen2-MoE run trained in bf16 on the GPU (fla kernels) and
saved by megatron.training, loaded by linear_moe.inference on the GPU (bf16, fla) and on the CPU
(fp32, the reference ops) from the same checkpoint: the continuation log-probabilities agree to
bf16 accuracy, and lm-eval runs the offline tasks on the GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_pretrain import _command, _env, _run

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

_SCORE = """
import json, sys, torch
from linear_moe.inference import CausalLM
lm = CausalLM.from_checkpoint(sys.argv[1], device=sys.argv[2])
texts = [("The assert statement", " is a convenient way to insert debugging assertions"),
         ("A", " function definition defines a user-defined function object"),
         ("Names refer to objects.", " Names are introduced by name binding operations.")]
pairs = [(lm.encode(c), lm.encode(x)) for c, x in texts]
print(json.dumps({"dtype": str(next(lm.model.parameters()).dtype),
                  "scores": [s for s, _ in lm.continuation_logprobs(pairs, 3)]}))
"""


@pytest.fixture(scope="module")
def gpu_checkpoint(tmp_path_factory):
    from linear_moe.data import ensure_default_dataset

    root = tmp_path_factory.mktemp("eval_gpu")
    save = root / "checkpoints"
    _run(_command(ensure_default_dataset(root / "data"), save, train_iters=20,
                  extra=("--save-interval", "20", "--bf16")))
    return save


def _scores(save, device):
    proc = subprocess.run([sys.executable, "-c", _SCORE, str(save), device], capture_output=True,
                          text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gpu_and_cpu_score_one_checkpoint_alike(gpu_checkpoint):
    gpu, cpu = _scores(gpu_checkpoint, "cuda"), _scores(gpu_checkpoint, "cpu")
    assert gpu["dtype"] == "torch.bfloat16" and cpu["dtype"] == "torch.float32"
    for a, b in zip(gpu["scores"], cpu["scores"]):
        assert math.isfinite(a) and abs(a - b) <= 0.03 * abs(b) + 0.1, (gpu, cpu)


def test_lm_eval_on_the_gpu(gpu_checkpoint, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval" / "run_lm_eval.py"), "--load", str(gpu_checkpoint),
         "--tasks", "linear_moe_tiny_mc,linear_moe_tiny_ppl,linear_moe_tiny_gen",
         "--output", str(out)],
        capture_output=True, text=True, env={**_env(), "HF_HUB_OFFLINE": "1",
                                             "HF_DATASETS_OFFLINE": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert 1.0 < results["linear_moe_tiny_ppl"]["byte_perplexity,none"] < 256.0
