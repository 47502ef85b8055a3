"""Run a function in N gloo processes on the CPU (megatron_patch.cpu_support enabled)."""

from __future__ import annotations

import os
import pickle
import tempfile

import torch
import torch.multiprocessing as mp


def _worker(rank, world_size, fn, args, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      OMP_NUM_THREADS="1")
    import megatron_patch  # noqa: F401
    from megatron_patch import cpu_support

    cpu_support.enable()
    # Rendezvous through a file in this call's own directory: no TCP port to pick, so two
    # pytest-xdist workers cannot race for the same one.
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'rendezvous')}", rank=rank,
        world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


def run_distributed(fn, world_size: int, *args):
    """Returns the list of fn(rank, world_size, *args) results, one per rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_worker, args=(world_size, fn, args, out_dir),
                           nprocs=world_size, join=True, start_method="spawn")
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def grad_errors(model, reference, relative=False) -> dict[str, float]:
    """Per parameter, the max abs difference of model's gradient from reference's (same names),
    divided by the reference gradient's max abs value when relative."""
    ref = dict(reference.named_parameters())
    errors = {}
    for name, p in model.named_parameters():
        diff = (p.grad.float() - ref[name].grad.float()).abs().max().item()
        errors[name] = diff / max(ref[name].grad.float().abs().max().item(), 1e-12) if relative \
            else diff
    return errors
