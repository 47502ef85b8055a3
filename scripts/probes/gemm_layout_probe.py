"""Which formulation of a mixer's projection GEMMs gets cuBLAS's fast kernel (GPU).

Why: session 25's profiles of the GLA layer (H100, T = 2048, B = 32, hidden 2048; benchmarks/
NOTES.md) showed the batch-first norms remove the mixer's [s, b] <-> [b, s] copies (0.36 ms a
step) and that the same GEMMs then run 0.33 ms slower: with a row-major [tokens, hidden] output
cuBLAS picks 192x192 tiles (nvjet ..._192x192_..._coopB_NNN / TNN, e.g. 605 us for the
input-gradient accumulation), where on the seq-first layout's strided batched views it picked
256x128 (..._coopA_NNT, 552 us). This times each candidate formulation of the same products at
the layer bench's shapes and names the kernel cuBLAS ran, so the layout code can use the fastest.

    python scripts/probes/gemm_layout_probe.py [--out rows.jsonl]

Every variant's result is checked equal to the 2-D addmm's (the reference formulation).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from event_timing import event_time_ms  # (this folder: scripts/probes)

B, S, H = 32, 2048, 2048  # the layer bench's batch, sequence and hidden size
WIDTHS = (2048, 1024)  # GLA's v / gate and q / k projection widths (expand_k 0.5)
SPLIT_K = 2048  # the widest slice of the split-K variants


def split_k(k: int, width: int) -> list[tuple[int, int]]:
    """(start, stop) slices of a reduction over k, at most ``width`` wide: as many as needed,
    of near-equal widths in multiples of 64 (no thin remainder slice paying a full pass over
    the output for little compute). Session 29 timed these input-gradient formulations: slower
    than one GEMM at 3072 and 4096 (benchmarks/NOTES.md), so the layout code does not split."""
    count = math.ceil(k / width)  # the fewest slices of at most width
    step = min(width, math.ceil(k / count / 64) * 64)
    return [(start, min(start + step, k)) for start in range(0, k, step)]


def _kernels(fn):
    """Names of the CUDA kernels one call of fn launches."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})


def _with_blas(library, fn):
    def run():
        previous = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library(library)
        try:
            return fn()
        finally:
            torch.backends.cuda.preferred_blas_library(previous)
    return run


def input_grad_variants(n, beta, dev="cuda"):
    """out [B, S, H] (+)= a [B, S, n] @ w [n, H]: the in-projections' input gradient
    (matmul_into); beta 1 is the accumulation into the first GEMM's result."""
    dt = torch.bfloat16
    a = torch.randn(B, S, n, device=dev, dtype=dt)
    w = torch.randn(n, H, device=dev, dtype=dt) / n ** 0.5
    base = torch.randn(B, S, H, device=dev, dtype=dt)
    out = base.clone()
    a_sf = a.transpose(0, 1).contiguous().transpose(0, 1)  # [b, s] view of [s, b] memory
    out_sf = base.transpose(0, 1).contiguous().transpose(0, 1)

    def reset():
        out.copy_(base)
        out_sf.copy_(base)

    variants = {
        "addmm_2d": lambda: out.view(-1, H).addmm_(a.view(-1, n), w, beta=beta),
        "baddbmm_3d": lambda: out.baddbmm_(a, w.expand(B, -1, -1), beta=beta),
        "addmm_2d_halves": lambda: [o.addmm_(x, w, beta=beta) for o, x in
                                    zip(out.view(-1, H).chunk(2), a.view(-1, n).chunk(2))],
        "addmm_2d_transposed": lambda: out.view(-1, H).t().addmm_(w.t(), a.view(-1, n).t(),
                                                                   beta=beta),
        "addmm_2d_cublaslt": _with_blas("cublaslt", lambda: out.view(-1, H).addmm_(
            a.view(-1, n), w, beta=beta)),
        "baddbmm_seq_first": lambda: out_sf.baddbmm_(a_sf, w.expand(B, -1, -1), beta=beta),
    }
    slices = split_k(n, SPLIT_K)
    if len(slices) > 1:  # accumulating GEMMs over K slices, the first honouring beta
        def split(batched):
            def run():
                for i, (start, stop) in enumerate(slices):
                    b_i = beta if i == 0 else 1.0
                    a_i, w_i = a[..., start:stop], w[start:stop]
                    if batched:
                        out.baddbmm_(a_i, w_i.expand(B, -1, -1), beta=b_i)
                    else:
                        out.view(-1, H).addmm_(a_i.reshape(-1, a_i.shape[-1]), w_i, beta=b_i)
            return run
        variants["baddbmm_split_k"] = split(True)
        variants["addmm_2d_split_k"] = split(False)
    return variants, reset, (lambda: out), (lambda: out_sf)


def forward_variants(n, dev="cuda"):
    """y [B, S, n] = x [B, S, H] @ w [n, H]^T: the in-projections' forward."""
    dt = torch.bfloat16
    x = torch.randn(B, S, H, device=dev, dtype=dt)
    w = torch.randn(n, H, device=dev, dtype=dt) / H ** 0.5
    x_sf = x.transpose(0, 1).contiguous().transpose(0, 1)
    return {
        "mm_2d": lambda: (x.view(-1, H) @ w.t()).view(B, S, n),
        "mm_2d_cublaslt": _with_blas("cublaslt", lambda: (x.view(-1, H) @ w.t()).view(B, S, n)),
        "bmm_3d": lambda: torch.bmm(x, w.t().expand(B, -1, -1)),
        "bmm_seq_first": lambda: torch.bmm(x_sf, w.t().expand(B, -1, -1)),
    }


def weight_grad_variants(n, dev="cuda"):
    """g [B, S, n]^T @ x [B, S, H] over all rows: the in-projections' weight gradient."""
    dt = torch.bfloat16
    g = torch.randn(B, S, n, device=dev, dtype=dt)
    x = torch.randn(B, S, H, device=dev, dtype=dt)
    g_sf = g.transpose(0, 1).contiguous()
    x_sf = x.transpose(0, 1).contiguous()
    return {
        "mm_2d": lambda: g.view(-1, n).t() @ x.view(-1, H),
        "mm_2d_cublaslt": _with_blas("cublaslt", lambda: g.view(-1, n).t() @ x.view(-1, H)),
        "mm_seq_first": lambda: g_sf.view(-1, n).t() @ x_sf.view(-1, H),
        "mm_2d_transposed": lambda: (x.view(-1, H).t() @ g.view(-1, n)).t(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the rows as JSON lines")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS),
                        help="projection widths n (default: GLA's); session 28's retention "
                             "profile ran the input-gradient accumulation at K = 4096 at ~530 "
                             "TFLOP/s, session 16's GDN one at K = 3072 at ~400")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_layout_probe: needs a CUDA GPU")
    rows = []
    for n in args.widths:
        for beta in (0.0, 1.0):
            variants, reset, out, out_sf = input_grad_variants(n, beta)
            reset()
            variants["addmm_2d"]()
            expected = out().clone()
            for name, fn in variants.items():
                reset()
                fn()
                got = out_sf() if name.endswith("seq_first") else out()
                err = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
                rows.append(dict(gemm="input_grad", n=n, beta=beta, variant=name,
                                 ms=event_time_ms(fn), rel_err=err, kernels=_kernels(fn)))
        for gemm, variants in (("forward", forward_variants(n)),
                               ("weight_grad", weight_grad_variants(n))):
            expected = variants["mm_2d"]()
            for name, fn in variants.items():
                err = ((fn().float() - expected.float()).norm() / expected.float().norm()).item()
                rows.append(dict(gemm=gemm, n=n, variant=name, ms=event_time_ms(fn), rel_err=err,
                                 kernels=_kernels(fn)))
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               cuda=torch.version.cuda)
    for row in rows:
        row.update(env, TFLOP_s=2 * B * S * row["n"] * H / row["ms"] / 1e9)
        print("ROW", json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
