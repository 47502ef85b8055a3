"""Probe (GPU): RoPE on retention's q and k (64K tokens, 16 heads of 128, bf16) fwd+bwd through
fla's own rotary_embedding (zero-filled outputs, a clone of the gradient) against our launch
of the same Triton kernel (linear_moe.layers.rotary._FlaRotary: new outputs, no clone), side by
side in one run, equal results checked bit for bit.

    python scripts/probes/rotary_passes.py [--tokens 65536] [--seq 2048]
"""

import argparse
import json

import torch

from event_timing import event_time_ms  # (this folder: scripts/probes)


def main():
    from fla.modules.rotary import rotary_embedding

    from linear_moe.layers.rotary import _cos_sin, apply_rotary

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    shape = (args.tokens // args.seq, args.seq, 16, 128)
    q, k = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    dy = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    cos, sin = _cos_sin(args.seq, 128, 10000.0, q.device, q.dtype)
    ways = {"fla_rotary_embedding": lambda t: rotary_embedding(t, cos, sin),
            "ours": lambda t: apply_rotary(t, 10000.0, fused=True)}

    def step(rotate):
        for t in (q, k):
            t.grad = None
            rotate(t).backward(dy)

    results = {}
    for name, rotate in ways.items():
        step(rotate)
        results[name] = [q.grad.clone(), rotate(q).detach()]
    equal = all(torch.equal(a, b) for a, b in zip(*results.values()))
    row = {"shape": shape, "equal_bitwise": equal, "device": torch.cuda.get_device_name()}
    for name, rotate in ways.items():
        row[f"{name}_ms"] = event_time_ms(lambda: step(rotate), 5, args.iters)
    row["ours_over_fla"] = row["ours_ms"] / row["fla_rotary_embedding_ms"]
    print("ROW " + json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
