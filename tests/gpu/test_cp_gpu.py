"""Context parallelism on two GPUs (NCCL, fla's kernels in bf16): a CP=2 training run of the
hybrid models gives the losses of the same run on one GPU, to bf16 accuracy (the CPU suite's
tests/test_cp_parity.py proves the math in fp32 to 1e-5)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from test_eval import _free_port
from test_pretrain import _command, _env, _losses, _run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]


# "fla": fla's own CP inside its kernels (--la-cp-kernel fla); "ours": the state passing
@pytest.mark.parametrize("la_module,cp_kernel", [("gla", "ours"), ("gated_deltanet", "ours"),
                                                 ("gated_deltanet", "fla"), ("rwkv7", "fla")])
def test_cp2_on_two_gpus_gives_the_one_gpu_losses(la_module, cp_kernel, tmp_path):
    from linear_moe.data import ensure_default_dataset

    cmd = _command(ensure_default_dataset(tmp_path / "data"), None, la_module=la_module,
                   train_iters=10, extra=("--bf16", "--seq-length", "1024",
                                          "--max-position-embeddings", "1024"))
    single = _losses(_run(cmd))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           "2", "--master-port", str(_free_port()), *cmd[1:],
                           "--context-parallel-size", "2", "--la-cp-kernel", cp_kernel],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    split = _losses(proc.stdout)
    assert sorted(split) == sorted(single) == list(range(1, 11)), (single, split)
    for iteration, loss in single.items():
        assert split[iteration] == pytest.approx(loss, rel=2e-2), (iteration, single, split)
