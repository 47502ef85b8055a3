"""MoE experts as two grouped GEMMs over ``torch._grouped_mm``.

megatron-core 0.19.2 only groups expert GEMMs through TransformerEngine; without it the local
spec's SequentialMLP runs one small GEMM pair per expert in a Python loop (64 experts: ~4x the
dense step on the H100, ../shared/DEVICE.md). This module keeps SequentialMLP's parameters,
initialisation and checkpoint format (it *is* a SequentialMLP, so checkpoints move freely
between the two) and replaces only the forward: the tokens arrive sorted by expert, so fc1 and
fc2 of all local experts are each one ``torch._grouped_mm`` over the token offsets.

The experts' weights are stacked on the fly inside a custom autograd function that saves the
weight list, not the stacked copy, and re-stacks in backward: no extra weight-sized activation
is held per layer, at the cost of one weight-sized copy per pass (~0.1 ms per layer at
A0.3B-2B on an H100, against GEMMs of several ms).

With --moe-act-recompute, fc2 does not keep the activation's output for its weight gradient
but recomputes it in backward from fc1's output, which the activation's own backward keeps
anyway (megatron-core's "moe_act" recompute, which it only offers with TransformerEngine's
grouped GEMM): one [routed tokens, ffn] tensor less per MoE layer for one elementwise pass.

Expert linears are local matmuls here: under expert-TP/EP Megatron marks them
``explicit_expert_comm`` (the token dispatcher does the communication), and with TP = EP = 1
their copy/reduce is the identity.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from .mlp import mlp_activation

EXPERT_IMPLS = ("grouped_mm", "sequential")
_ROW_ALIGN = 8  # rows: 16 bytes in bf16 (and 32 in fp32)


def _grouped_forward_mm(x, offs, weights):
    """y[rows of group e] = x[rows of group e] @ W_e^T for W_e [out, in]; groups end at offs."""
    return torch._grouped_mm(x, torch.stack(weights).transpose(1, 2), offs=offs)


def _grouped_backward_mm(dy, x, offs, weights):
    """(dx, [dW_e]) of _grouped_forward_mm."""
    dy = dy.contiguous()
    dx = torch._grouped_mm(dy, torch.stack(weights), offs=offs)
    # dW_e = dy_e^T x_e: a grouped GEMM whose reduction runs over each group's rows.
    dw = torch._grouped_mm(dy.t(), x, offs=offs)  # [E, out, in]
    return dx, dw.unbind(0)


class _GroupedLinear(torch.autograd.Function):
    """_grouped_forward_mm, keeping the weight list (not the stacked copy) for backward."""

    @staticmethod
    def forward(ctx, x, offs, *weights):
        ctx.save_for_backward(x, offs, *weights)
        return _grouped_forward_mm(x, offs, weights)

    @staticmethod
    def backward(ctx, dy):
        x, offs, *weights = ctx.saved_tensors
        dx, dw = _grouped_backward_mm(dy, x, offs, weights)
        return (dx, None, *dw)


class _ActivationThenGroupedLinear(torch.autograd.Function):
    """_grouped_forward_mm(act(h)) that keeps h, not act(h): act is recomputed in backward."""

    @staticmethod
    def forward(ctx, activation, h, probs, offs, *weights):
        with torch.no_grad():
            a = activation(h, probs)
        ctx.activation = activation
        ctx.save_for_backward(h, probs, offs, *weights)
        return _grouped_forward_mm(a, offs, weights)

    @staticmethod
    def backward(ctx, dy):
        h, probs, offs, *weights = ctx.saved_tensors
        with torch.enable_grad():
            h_, probs_ = h.detach().requires_grad_(), probs.detach().requires_grad_()
            a = ctx.activation(h_, probs_)
        da, dw = _grouped_backward_mm(dy, a.detach(), offs, weights)
        dh, dprobs = torch.autograd.grad(a, (h_, probs_), da)
        return (None, dh, dprobs, None, *dw)


def grouped_mm_unsupported_reason(config, hidden_size: int, ffn_local: int) -> str | None:
    """Why the grouped path cannot run this config (None: it can)."""
    if config.add_bias_linear:
        return "expert biases (--disable-bias-linear is the supported setting)"
    if config.fp8 or getattr(config, "fp4", None):
        return "fp8/fp4 experts (need TransformerEngine)"
    if getattr(config, "activation_func_clamp_value", None) is not None:
        return "clamped GLU activations"
    if config.moe_apply_probs_on_input:
        return "--moe-apply-probs-on-input"
    # torch._grouped_mm needs 16-byte aligned rows.
    elem = torch.finfo(config.params_dtype).bits // 8
    widths = (hidden_size, ffn_local, ffn_local * (2 if config.gated_linear_unit else 1))
    if any((w * elem) % 16 for w in widths):
        return f"hidden/ffn widths {widths} not 16-byte aligned"
    return None


@functools.lru_cache(maxsize=None)
def _note_fallback(reason: str) -> None:
    """Say once per reason (not once per MoE layer) why the experts run as a loop."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(f"linear_moe: grouped_mm experts fall back to the per-expert loop: {reason}",
              flush=True)


class GroupedMMExperts(SequentialMLP):
    """SequentialMLP whose forward groups all local experts' GEMMs (see module docstring)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, name=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection,
                         name=name)
        self.unsupported = grouped_mm_unsupported_reason(
            self.config, self.config.hidden_size, self.local_experts[0].linear_fc2.weight.shape[1])
        if self.unsupported:
            _note_fallback(self.unsupported + self._recompute_lost())

    def _recompute_lost(self) -> str:
        lost = getattr(self.config, "moe_act_recompute", False)
        return " (so --moe-act-recompute has no effect)" if lost else ""

    def _activation(self, h, probs):
        """Megatron MLP's activation, scaled per token by its routing probability."""
        return mlp_activation(self.config, h, probs=probs)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        if self.unsupported or self.num_local_experts == 1 or x.dtype not in (
                torch.bfloat16, torch.float32) or (x.is_cuda and x.dtype != torch.bfloat16):
            if self._recompute_lost():  # a loop that does not recompute: say so once
                _note_fallback((self.unsupported or f"{self.num_local_experts} local expert(s), "
                                f"{x.dtype} on {x.device.type}") + self._recompute_lost())
            return super().forward(x, tokens_per_expert, permuted_probs)
        try:
            return self._grouped_forward(x, tokens_per_expert, permuted_probs)
        except RuntimeError as error:
            if not x.is_cuda:
                raise
            # torch._grouped_mm's CUDA kernels target recent GPUs (Hopper and newer); elsewhere
            # train on with the per-expert loop rather than stop, and say so once.
            self.unsupported = f"torch._grouped_mm failed on this GPU: {str(error).splitlines()[0]}"
            _note_fallback(self.unsupported + self._recompute_lost())
            return super().forward(x, tokens_per_expert, permuted_probs)

    def _grouped_forward(self, x, tokens_per_expert, permuted_probs):
        rows = x.shape[0]
        # The weight-gradient GEMM reads x and dy transposed: its leading dimension is the row
        # count, which must be 16-byte aligned. Zero rows appended to the last expert change
        # nothing (zero inputs, and their outputs are dropped so their gradients are zero).
        pad = -rows % _ROW_ALIGN
        counts = torch.as_tensor(tokens_per_expert, device=x.device)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            permuted_probs = F.pad(permuted_probs, (0, pad))
            counts = counts.clone()
            counts[-1] += pad
        offs = counts.cumsum(0).to(torch.int32)
        fc1 = [e.linear_fc1.weight for e in self.local_experts]
        fc2 = [e.linear_fc2.weight for e in self.local_experts]
        h = _GroupedLinear.apply(x, offs, *fc1)
        if getattr(self.config, "moe_act_recompute", False):
            return _ActivationThenGroupedLinear.apply(self._activation, h, permuted_probs, offs,
                                                      *fc2)[:rows], None
        h = self._activation(h, permuted_probs)
        return _GroupedLinear.apply(h, offs, *fc2)[:rows], None
