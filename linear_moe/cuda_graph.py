"""A whole training step (forward + backward) as one CUDA graph.

The fla kernels are launched from Python (Triton), several per op, so at the peer shape a step
is bound by the host: the profile of 2026-12-02 shows more CPU time per step than GPU time, for
fla's own model as for ours. Replaying a captured step launches all of it at once.
Megatron-core's ``--cuda-graph-impl full_iteration`` does this inside ``pretrain``; this helper
does it for a bare step (benchmarks, the GPU tests), the pattern of PyTorch's whole-network
capture: warm up on a side stream (Triton compiles and autotunes, the allocator settles), drop
the gradients so the capture allocates them in the graph's pool, capture once.

The step must read its inputs from tensors that stay put (copy new data into them before a
replay) and must not synchronise with the host.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch


def capture_step(step: Callable[[], torch.Tensor], params: Iterable[torch.nn.Parameter],
                 warmup: int = 3) -> tuple[Callable[[], None], torch.Tensor]:
    """Capture ``step`` (forward + backward, returns the loss) after ``warmup`` eager runs.

    Returns ``(replay, loss)``: each ``replay()`` reruns the step on the current contents of its
    input tensors and overwrites ``loss`` and every ``param.grad`` in place."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a GPU; run the step eagerly on the CPU")
    params = list(params)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    return graph.replay, loss
