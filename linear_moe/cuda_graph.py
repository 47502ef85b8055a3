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

import collections
import os
import traceback
from typing import Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Tensor calls that need the host to see device data (a sync, illegal while capturing) or whose
# output shape depends on the data (the graph would replay the captured shape).
HOST_READS = frozenset({"cpu", "tolist", "item", "numpy", "__bool__", "__int__", "__float__",
                        "__index__"})
DATA_DEPENDENT_SHAPES = frozenset({"nonzero", "masked_select", "unique", "unique_consecutive",
                                   "bincount"})


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


class _HostSyncRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        # A device tensor sent to the host (on the CPU every .to() stays on the host, so
        # there only the explicit .cpu() / .tolist() / .item() calls are seen).
        to_cpu = (name == "to" and torch.is_tensor(args[0]) and args[0].device.type != "cpu"
                  and any(str(a) == "cpu" for a in (*args[1:], *kwargs.values())))
        tensor_repeats = name == "repeat_interleave" and len(args) > 1 and torch.is_tensor(args[1])
        if name in HOST_READS or name in DATA_DEPENDENT_SHAPES or to_cpu or tensor_repeats:
            _count(self.calls, name)
        return func(*args, **kwargs)


class _ScalarReadRecorder(TorchDispatchMode):
    """Scalar reads that bypass the Python tensor methods (``if t:``, ``int(t)`` in C++)."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.startswith("_local_scalar_dense"):
            _count(self.calls, "_local_scalar_dense")
        return func(*args, **(kwargs or {}))


# Calls that read host-only tensors on the GPU too: megatron-core's RNG tracker compares the CPU
# generator's state (torch.get_rng_state()) before and after a fork.
HOST_ONLY_CALLERS = ("tensor_parallel/random.py",)


def _count(calls, name):
    """Count the call under its two innermost linear_moe/megatron frames."""
    stack = traceback.extract_stack()
    if any(f.filename.endswith(HOST_ONLY_CALLERS) for f in stack):
        return
    frames = [f for f in stack if ("linear_moe" in f.filename or "megatron" in f.filename)
              and not f.filename.endswith(("cuda_graph.py", "cpu_support.py"))]
    where = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[-2:][::-1])
    calls[(name, where)] += 1


def find_host_syncs(step: Callable[[], object]) -> collections.Counter:
    """Run ``step`` once and count the calls that would break its CUDA-graph capture: host reads
    of tensor data and data-dependent output shapes, keyed by (call, where). Works on the CPU,
    where a sync costs nothing, so CI can tell a capturable step from one that is not."""
    functions = _HostSyncRecorder()
    with functions, _ScalarReadRecorder(functions.calls):
        step()
    return functions.calls
