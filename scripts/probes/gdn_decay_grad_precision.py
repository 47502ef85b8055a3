"""Probe (CPU): how much of a gated_deltanet model's A_log / dt_bias gradient error in bf16 can
come from keeping the chunked algorithm's intermediates in bf16, as fla's kernels do, rather
than a wrong dg.

Session 27: on the H200 the whole-model GPU test (tests/gpu/test_mixer_layers_gpu.py, hd64)
measured fla's A_log / dt_bias gradients 2.2-2.6e-2 from the fp32 reference over three weight
draws while the bf16 reference model (fp32 math inside the op) ranged 4e-3 to 2e-2. This runs
the test's model on the CPU three ways against fp32: the bf16 reference (the test's floor), and
the bf16 reference with the chunk intermediates (w, u, the attention block, the decayed q / k,
the state after each chunk) rounded to bf16 both ways (a cast's backward rounds the gradient
through it too). An emulated error near fla's measured one, across draws, says the kernels'
bf16 storage explains it; an error near the floor says it does not.

    python scripts/probes/gdn_decay_grad_precision.py --seeds 0 1 2 [--head-dim 64]
"""

import argparse
import contextlib
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
from test_mixer_layers_gpu import (  # noqa: E402  the test's model and measures
    BATCH, SEQ, VOCAB, _in_bf16, _model, _rel, _run)


@contextlib.contextmanager
def bf16_intermediates():
    """The reference op's chunk intermediates rounded to bf16 (fla keeps these in bf16)."""
    import importlib

    gdr = importlib.import_module("linear_moe.ops.gated_delta_rule")  # the module, not the op
    r = lambda x: x.to(torch.bfloat16).to(x.dtype)
    original = gdr.delta_chunk_scan

    def scan(u_base, w, q_state, attn, k_state, chunk_decay, S, T):
        outs = []
        u_base, w, q_state, attn, k_state = map(r, (u_base, w, q_state, attn, k_state))
        for n in range(u_base.shape[2]):
            u = r(u_base[:, :, n] - w[:, :, n] @ S)
            outs.append(q_state[:, :, n] @ S + attn[:, :, n] @ u)
            S = r(chunk_decay[:, :, n] * S + k_state[:, :, n].transpose(-1, -2) @ u)
        return gdr.from_chunks(torch.stack(outs, 2), T), S

    gdr.delta_chunk_scan = scan
    try:
        yield
    finally:
        gdr.delta_chunk_scan = original


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    from megatron.core import tensor_parallel

    from linear_moe.inference import init_single_process

    init_single_process()
    for seed in args.seeds:
        tensor_parallel.model_parallel_cuda_manual_seed(1)
        torch.manual_seed(seed)
        ref = _model("gated_deltanet", args.head_dim, "reference", torch.float32, "cpu")
        bf16 = _in_bf16(ref.state_dict())
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
        labels = torch.randint(0, VOCAB, (BATCH, SEQ))
        _run(ref, tokens, labels)
        grads = {}
        for way in ("floor", "bf16_intermediates"):
            model = _model("gated_deltanet", args.head_dim, "reference", torch.bfloat16, "cpu")
            model.load_state_dict(bf16)
            with bf16_intermediates() if way == "bf16_intermediates" else contextlib.nullcontext():
                _run(model, tokens, labels)
            grads[way] = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            if name.endswith(("A_log", "dt_bias")):
                print(json.dumps({"seed": seed, "head_dim": args.head_dim, "tensor": name,
                                  **{w: round(_rel(g[name].grad, p.grad), 5)
                                     for w, g in grads.items()}}), flush=True)


if __name__ == "__main__":
    main()
