"""Run megatron-core and megatron.training on a machine without CUDA (gloo, fp32).

megatron-core assumes CUDA in many places (``torch.cuda.current_device()`` as a tensor device,
``device='cuda'`` literals, CUDA streams/events in DDP, the CUDA RNG state in the
model-parallel RNG tracker, ``assert torch.cuda.is_available()`` in ``initialize_megatron``).
This module is the ONE place that bends those to the CPU; it is used by the tests and by the CPU
fallback of the training entry point. It does nothing to a process that has CUDA.

What it does, and why each is needed:
- a TorchFunctionMode maps every CUDA device argument of a torch call to the CPU, so the ~200
  ``device=torch.cuda.current_device()`` / ``device='cuda'`` call sites allocate on the CPU;
- ``torch.cuda`` query/sync/stream/event/RNG/memory functions become CPU no-ops or CPU equivalents;
- the model-parallel RNG tracker uses the CPU generator;
- the CUDA JIT-fusion warm-up is skipped;
- ``initialize_megatron`` runs with ``allow_no_cuda=True`` and the CPU counted as one device
  (it builds the model-parallel groups and seeds the RNG tracker only when a device exists);
- ``CPU_ARGS`` are the Megatron flags the CPU needs (gloo, CPU init, no CUDA fusions).
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch.overrides import TorchFunctionMode

# The fusions whose kernels are CUDA / TE (gradient-accumulation fusion: APEX's CUDA extension):
# Megatron's flag that turns each off, and the argument it clears.
CPU_FUSIONS_OFF = {
    "--no-gradient-accumulation-fusion": "gradient_accumulation_fusion",
    "--no-bias-swiglu-fusion": "bias_swiglu_fusion",
    "--no-bias-gelu-fusion": "bias_gelu_fusion",
    "--no-bias-dropout-fusion": "bias_dropout_fusion",
    "--no-masked-softmax-fusion": "masked_softmax_fusion",
    "--no-rope-fusion": "apply_rope_fusion",
}
# Flags appended to Megatron's argv when there is no GPU (NCCL needs CUDA).
CPU_ARGS = [
    "--distributed-backend", "gloo",
    "--use-cpu-initialization",
    *CPU_FUSIONS_OFF,
    "--transformer-impl", "local",
]

_ENABLED = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _cpu_device(device):
    # Bare integers are CUDA ordinals in torch factory calls.
    if _is_cuda(device) or (isinstance(device, int) and not isinstance(device, bool)):
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):  # e.g. megatron's CP index tensors; no pinned CPU memory
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.cuda,):
            return args[0]
        if func is torch.Tensor.to and args:
            args = tuple(_cpu_device(a) if _is_cuda(a) else a for a in args)
        if func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Optimizer/clip-grad code asserts `grad.type() == 'torch.cuda.FloatTensor'`.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NullStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _noop():
    # A new function per patched name: torch._dynamo refuses one object under two names.
    return lambda *args, **kwargs: None


def _zero():
    return lambda *args, **kwargs: 0


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.set_device = _noop()
    cuda.synchronize = _noop()
    cuda.empty_cache = _noop()
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.is_current_stream_capturing = lambda: False
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(cuda, name, _zero())
    cuda.reset_peak_memory_stats = _noop()
    cuda.reset_max_memory_allocated = _noop()
    cuda.memory_stats = lambda *a, **k: {}
    # Architecture queries (e.g. argument validation with TP > 1 asks for the compute
    # capability): a "device" of capability 0.0.
    cuda.get_device_capability = lambda *a, **k: (0, 0)
    # gcnArchName: inductor's cache key reads it where torch.version.cuda is None (a CPU wheel),
    # so torch.compile on the CPU failed in a process with this module enabled.
    cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(
        major=0, minor=0, name="cpu", gcnArchName="cpu", total_memory=0,
        multi_processor_count=1)
    # RNG: the CPU generator plays the CUDA one.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.manual_seed = lambda seed: None  # torch.manual_seed already seeds the CPU generator
    cuda.manual_seed_all = lambda seed: None
    torch.cuda.random.get_rng_state = cuda.get_rng_state
    torch.cuda.random.set_rng_state = cuda.set_rng_state


def _patch_megatron():
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # The tracker's add() seeds via torch.cuda.manual_seed; on the CPU the tracker's named states
    # must still differ per seed, so seed the CPU generator temporarily.
    def tracker_add(self, name, seed):
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"cuda rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    mp_random.CudaRNGStatesTracker.add = tracker_add

    try:
        from megatron.training import initialize as mt_init
        from megatron.training import training as mt_training
    except ImportError:  # megatron-core without the training package
        return

    original = mt_init.initialize_megatron

    @functools.wraps(original)
    def initialize_megatron_on_cpu(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        # _initialize_distributed builds the model-parallel groups, and _set_random_seed seeds
        # the model-parallel RNG tracker, only when a device is counted: count the CPU as one.
        device_count = torch.cuda.device_count
        torch.cuda.device_count = lambda: 1
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.device_count = device_count

    mt_init.initialize_megatron = initialize_megatron_on_cpu
    mt_training.initialize_megatron = initialize_megatron_on_cpu
    # The JIT warm-up compiles CUDA fusion kernels on CUDA tensors; the CPU flags turn the
    # fusions off, so there is nothing to warm up.
    mt_training.set_jit_fusion_options = lambda *args, **kwargs: None


def enable() -> bool:
    """Make megatron-core run on the CPU. No-op (returns False) when CUDA is available."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    _patch_torch_cuda()
    _patch_megatron()
    _CudaToCpuMode().__enter__()  # stays on the mode stack for the life of the process
    _ENABLED = True
    return True


def cpu_scope(device: torch.device):
    """Torch calls inside run on the CPU when ``device`` is the CPU in a process that has CUDA
    (a CPU model on a GPU machine): megatron-core moves some tensors to
    ``torch.cuda.current_device()`` on its own, e.g. the MoE router its weight at every forward.
    A no-op for a CUDA device, and where ``enable()`` already maps CUDA to the CPU."""
    if device.type != "cpu" or _ENABLED or not torch.cuda.is_available():
        return contextlib.nullcontext()
    return _CudaToCpuMode()


def is_enabled() -> bool:
    return _ENABLED
