"""Run a differentiable function the way the memory tests look at it."""

from __future__ import annotations

import torch


def run_and_record_saved(fn, inputs, dy, *, call=None):
    """fn on fresh leaf copies of inputs, backward with dy. Returns (the output followed by each
    input's gradient, the (shape, dtype) of every tensor autograd saved for backward, sorted).
    call(fn, leaves) makes the call where fn takes views of the leaves (default fn(*leaves))."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = call(fn, leaves) if call is not None else fn(*leaves)
    y.backward(dy)
    return (y, *(t.grad for t in leaves)), sorted((tuple(t.shape), t.dtype) for t in saved)
