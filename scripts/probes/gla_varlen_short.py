"""GPU probe (session 20): fla's chunk_gla over many short packed sequences, as MoM's
memories feed it, against our fp32 reference - the varlen GPU test's mom_gla case hit a CUDA
'misaligned address' inside chunk_gla_fwd_kernel_o's autotune. One case per process
(a CUDA error poisons the context): python scripts/probes/gla_varlen_short.py DTYPE LENGTHS."""

import sys

import torch

from linear_moe import ops

dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[1]]
lengths = [int(n) for n in sys.argv[2].split(",")]
H, K, V = 2, 64, 128
torch.manual_seed(0)
T = sum(lengths)
cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                  device="cuda")
q, k = (torch.randn(1, T, H, K, device="cuda") for _ in range(2))
v = torch.randn(1, T, H, V, device="cuda")
gk = torch.nn.functional.logsigmoid(torch.randn(1, T, H, K, device="cuda")) / 16
inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)] + [gk.requires_grad_()]
o, _ = ops.gla(*inputs, cu_seqlens=cu, backend="fla")
o.float().square().sum().backward()
torch.cuda.synchronize()
ref_in = [t.detach().float().requires_grad_() for t in inputs]
r, _ = ops.gla(*[t.cpu() for t in ref_in], cu_seqlens=cu.cpu(), backend="reference")
print("ROW gla_varlen", sys.argv[1], sys.argv[2][:40], "o rel",
      ((o.float().cpu() - r).norm() / r.norm()).item())
