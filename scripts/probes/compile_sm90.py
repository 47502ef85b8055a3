"""Compile our Triton kernels for sm_90 on a machine without a GPU (Triton's nvidia backend and
its bundled ptxas) and print each variant's registers, spills and shared memory: a kernel that
does not compile, or spills, shows here before a device call is spent on it.

    python scripts/probes/compile_sm90.py
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from linear_moe.ops import causal_conv, low_rank_gate

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")


def compile_variant(kernel, signature, constexprs, num_warps):
    fn = kernel.fn if hasattr(kernel, "fn") else kernel  # the autotuner's JIT function
    sig = {name: ("constexpr" if name in constexprs else signature.get(name, "i32"))
           for name in fn.arg_names}
    src = ASTSource(fn, sig, constexprs)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    return compiled.metadata.shared, ptxas_usage(compiled.asm["ptx"]), compiled


def ptxas_usage(ptx: str) -> str:
    """ptxas -v's registers and spills line for the PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([PTXAS, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
        out = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return (f"{regs.group(1) if regs else '?'} registers, "
            f"{spill.group(1) if spill else '?'} B spill stores")


def report(name, kernel, signature, fixed):
    """Every autotune config of ``kernel`` with the ``fixed`` constexprs."""
    for config in kernel.configs:
        constexprs = {**fixed, **config.kwargs}
        shown = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
        try:
            shared, usage, _ = compile_variant(kernel, signature, constexprs, config.num_warps)
            print(f"{name} {shown} warps={config.num_warps}: {usage}, shared {shared} B")
        except Exception as e:  # report and go on: the point is the list
            print(f"{name} {shown} warps={config.num_warps}: FAILED {type(e).__name__}: "
                  f"{str(e).splitlines()[0][:300] if str(e) else ''}")


bf16 = "*bf16"
conv_sig = dict(x=bf16, w=bf16, b=bf16, y=bf16, dy=bf16, dx=bf16, dw_part="*fp32",
                db_part="*fp32", eps="fp32")
for hdp in (128, 64):
    report(f"conv fwd+l2norm HDP={hdp}", causal_conv._fwd_l2norm_kernel, conv_sig,
           dict(W=4, HAS_BIAS=False, SILU=True, HDP=hdp))
for l2, hdp in ((False, 64), (True, 128)):
    report(f"conv bwd l2norm={l2}", causal_conv._bwd_kernel, conv_sig,
           dict(HAS_BIAS=False, SILU=True, L2NORM=l2, HDP=hdp, L=128))
gate_sig = dict(z=bf16, w=bf16, b=bf16, g=bf16, dg=bf16, dz=bf16, dw_part="*fp32",
                db_part="*fp32", inv_norm="fp32", clamp_min="fp32")
common = dict(R=16, HAS_BIAS=True, CLAMP=False, IEEE=False)
report("gate fwd", low_rank_gate._fwd_kernel, gate_sig, common)
report("gate bwd dz", low_rank_gate._bwd_dz_kernel, gate_sig, common)
report("gate bwd dw", low_rank_gate._bwd_dw_kernel, gate_sig, dict(common, GROUPS=64))
report("gate fwd fp32", low_rank_gate._fwd_kernel, {**gate_sig, "z": "*fp32", "w": "*fp32"},
       dict(common, IEEE=True))
