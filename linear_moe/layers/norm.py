"""RMSNorm for the layer-norm slots, and the gated per-head output norm of the linear mixers."""

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

_GATE_FNS = {
    "swish": F.silu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}
GATE_FNS = tuple(_GATE_FNS)
_FLA_GATE_ACTIVATIONS = {"swish": "swish", "silu": "swish", "sigmoid": "sigmoid"}


def _rms_norm_weight_grad(grad_out, x, rstd):
    """The RMSNorm weight's gradient: sum over rows of dy * x * rstd, in fp32 at least."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return (grad_out.to(acc) * x.to(acc) * rstd.to(acc)).flatten(0, -2).sum(0)


# One compiled reduction (inductor splits it over the rows): torch's GammaBeta kernel reduced it
# at ~1 TB/s, 64 of the 103 us of each RMSNorm backward at the peer's [16384, 1024] (H100
# profile, ninth session), ~1.6 ms of a GLA 8K step.
_rms_norm_weight_grad_cuda = torch.compile(_rms_norm_weight_grad)


def _rms_norm_input_grad(grad_out, x, weight, rstd, grad_residual, batch_first=False):
    """x's gradient through y = x * rstd * weight, plus grad_residual, the gradient x got as the
    layer's residual branch (None: none), in one pass; fp32 at least inside, x's dtype out, in
    x's layout or, batch_first (x [s, b, h]), stored as the transposed view of a contiguous
    [b, s, h] tensor."""
    acc = torch.promote_types(x.dtype, torch.float32)
    rstd = rstd.to(acc)
    g = grad_out.to(acc) * weight.to(acc)
    x_hat = x.to(acc) * rstd
    grad_x = rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
    if grad_residual is not None:
        grad_x = grad_x + grad_residual.to(acc)
    grad_x = grad_x.to(x.dtype)
    if batch_first:
        return grad_x.transpose(0, 1).contiguous().transpose(0, 1)
    return grad_x.contiguous()  # whatever grad_out's layout (compiled: the store's order)


# One row reduction reading the residual's gradient beside dy and x: without it autograd adds
# the two gradients of the layer's input in a pass of its own (a 32 MiB bf16 add, ~32 us, two
# per layer at the peer's [16384, 1024]: H100 profile of the ninth session).
_rms_norm_input_grad_cuda = torch.compile(_rms_norm_input_grad)


def _rms_norm_batch_first(x, weight, eps):
    """rms_norm(x) of x [s, b, h] (as torch's: fp32 inside, x * rstd * weight), stored
    batch-first: the [s, b, h] view of a contiguous [b, s, h] tensor, which a linear mixer reads
    as its contiguous [b, s, h] input. And rstd [s, b, 1] in fp32 at least, as _fused_rms_norm's."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (xf * rstd * weight.to(acc)).to(x.dtype)
    return y.transpose(0, 1).contiguous().transpose(0, 1), rstd


# One kernel that writes each normalised row to its batch-first place (rows stay contiguous, so
# the permuted store is coalesced): the mixer then needs no copy of its input in either order.
# Was torch's fused kernel writing [s, b, h] and, in every mixer's backward, a copy of x into
# [b, s] order for the in-projections' weight gradients (their output gradients are batch-first):
# ~0.18 ms of the GLA and GDN layer bench's steps (65,536 x 2048 bf16; H100 op diff, session 16).
_rms_norm_batch_first_cuda = torch.compile(_rms_norm_batch_first)


class _FusedRMSNorm(torch.autograd.Function):
    """torch's fused rms_norm forward (aten._fused_rms_norm, what F.rms_norm runs), the weight's
    gradient as our own reduction (compiled on CUDA).

    With residual=True it returns (y, x): x itself as the layer's residual branch (megatron-core's
    TransformerLayer takes a norm's (output, residual) pair), so the gradients of x's two uses
    meet in this backward, one pass with the norm's input gradient, instead of in autograd's add.
    Without, x's gradient is torch's fused CUDA kernel (or our formula off CUDA)."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual, batch_first=False, batch_first_grad=False):
        if batch_first:
            norm = _rms_norm_batch_first_cuda if x.is_cuda else _rms_norm_batch_first
            out, rstd = norm(x, weight, eps)
        else:
            out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.set_materialize_grads(False)
        ctx.batch_first_grad = batch_first_grad
        return (out, x) if residual else out

    @staticmethod
    def backward(ctx, grad_out, grad_residual=None):
        if grad_out is None:  # only the residual branch was used
            return grad_residual, None, None, None, None, None
        x, weight, rstd = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # torch's kernel takes a contiguous gradient and writes x's layout; the compiled
            # formula reads any layout (a batch-first output's gradient arrives batch-first).
            if (x.is_cuda and grad_residual is None and grad_out.is_contiguous()
                    and not ctx.batch_first_grad):
                grad_x, _ = torch.ops.aten._fused_rms_norm_backward(
                    grad_out, x, [x.shape[-1]], rstd, weight, [True, False])
            else:
                input_grad = _rms_norm_input_grad_cuda if x.is_cuda else _rms_norm_input_grad
                grad_x = input_grad(grad_out, x, weight, rstd, grad_residual,
                                    ctx.batch_first_grad)
        if ctx.needs_input_grad[1]:
            weight_grad = _rms_norm_weight_grad_cuda if x.is_cuda else _rms_norm_weight_grad
            grad_w = weight_grad(grad_out, x, rstd).to(weight.dtype)
        return grad_x, grad_w, None, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float,
             batch_first: bool = False) -> torch.Tensor:
    """F.rms_norm over the last dim in x's dtype (fp32 inside); on CUDA with a weight, through
    _FusedRMSNorm. batch_first (x [s, b, h], a weight): the output stored batch-first, as the
    transposed view of a contiguous [b, s, h] tensor (_rms_norm_batch_first)."""
    if (x.is_cuda or batch_first) and weight is not None:
        return _FusedRMSNorm.apply(x.contiguous(), weight, eps, False, batch_first)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rms_norm_with_residual(x: torch.Tensor, weight: torch.Tensor, eps: float,
                           batch_first: bool = False, batch_first_grad: bool = False):
    """(rms_norm(x), x), x's two gradients summed inside the norm's backward (_FusedRMSNorm);
    batch_first as in rms_norm (the residual x stays as it is); batch_first_grad: x's gradient
    (x [s, b, h]) stored as the transposed view of a contiguous [b, s, h] tensor."""
    return _FusedRMSNorm.apply(x.contiguous(), weight, eps, True, batch_first, batch_first_grad)


class RMSNorm(torch.nn.Module):
    """RMSNorm in fp32 that supports sequence parallelism.

    megatron-core's local WrappedTorchNorm refuses sequence_parallel, which MoE with TP>1
    requires; the weight is marked ``sequence_parallel`` so finalize_model_grads all-reduces its
    gradient over the TP group.
    """

    #: Store the output batch-first (rms_norm's batch_first): a linear mixer's input norm.
    batch_first_out = False

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x):
        # In the input's dtype: torch accumulates in fp32 inside rms_norm either way, and a
        # bf16 input then takes one kernel instead of an fp32 copy in and a cast out.
        return rms_norm(x, self.weight.to(x.dtype), self.eps, self.batch_first_out)


class ResidualRMSNorm(RMSNorm):
    """RMSNorm for a TransformerLayer's input / pre-MLP slot (--fused-residual-rmsnorm): returns
    (norm(x), x), the pair megatron-core's layer takes as (output, residual), so the residual
    branch's gradient joins the norm's input gradient in one pass (rms_norm_with_residual); what
    megatron-core's TEFusedResidualRMSNorm does with TransformerEngine. Not for layers whose
    norms megatron-core recomputes (model_provider.layer_specs picks RMSNorm there): that
    checkpoint frees the norm's outputs, and the residual is x's own storage."""

    #: Store x's gradient batch-first (rms_norm_with_residual's batch_first_grad): the pre-MLP
    #: norm after a linear mixer, whose output projection's backward takes that gradient.
    batch_first_grad = False

    def forward(self, x):
        return rms_norm_with_residual(x, self.weight.to(x.dtype), self.eps, self.batch_first_out,
                                      self.batch_first_grad)


class MixerInputRMSNorm(RMSNorm):
    """RMSNorm for a linear mixer's input slot: its output [s, b, h] is stored batch-first, the
    layout the mixer's ops and in-projections read (LinearMixer._forward), so the mixer copies
    x in neither order (see _rms_norm_batch_first). Not under sequence parallelism, where the
    mixer all-gathers its input into a new [s, b, h] tensor."""

    batch_first_out = True


class MixerInputResidualRMSNorm(ResidualRMSNorm):
    """ResidualRMSNorm with MixerInputRMSNorm's batch-first output (the residual x unchanged)."""

    batch_first_out = True


class AfterMixerResidualRMSNorm(ResidualRMSNorm):
    """ResidualRMSNorm for the pre-MLP slot of a linear mixer's layer: its input h = residual +
    mixer output gets its whole gradient here (the residual branch's summed in), stored
    batch-first, and the residual add passes that tensor on to the mixer's output projection,
    whose weight gradient then pairs it with the mixer's batch-first o in one GEMM (a
    seq-first gradient costs a copy into [b, s] order: 0.18 ms of the GLA / GDN layer bench's
    step). The input norm's backward reads it in place as its residual branch's gradient. Not
    under sequence parallelism (the output projection's reduce-scatter gathers the gradient
    into a new tensor)."""

    batch_first_grad = True


class GatedRMSNorm(torch.nn.Module):
    """o = RMSNorm_headdim(o) * weight * gate_fn(g), one weight shared by all heads (no weight
    with elementwise_affine=False, fla's RMSNorm(elementwise_affine=False)).

    Each TP rank sees only its heads, so the shared weight's gradient is a partial sum per rank:
    routing the weight through copy_to_tensor_model_parallel_region all-reduces it in backward.
    """

    def __init__(self, head_dim: int, eps: float, gate_fn: str, params_dtype, tp_group,
                 use_norm: bool = True, fused: bool = False, elementwise_affine: bool = True):
        super().__init__()
        if gate_fn not in _GATE_FNS:
            raise ValueError(f"unknown --la-gate-fn '{gate_fn}'; choose one of {list(_GATE_FNS)}")
        self.eps = eps
        # fla's Triton rms_norm_gated on CUDA: norm, weight and gate in one kernel each way
        # (fp32 inside); the plain-torch path stays the reference.
        self.fused_activation = _FLA_GATE_ACTIVATIONS.get(gate_fn) if fused else None
        self.fused = fused
        self.gate_fn = _GATE_FNS[gate_fn]
        self.tp_group = tp_group
        self.use_norm = use_norm
        self.weight = None
        if use_norm and elementwise_affine:
            self.weight = torch.nn.Parameter(torch.ones(head_dim, dtype=params_dtype))

    def _tp_weight(self, dtype):
        """The shared weight in `dtype`, its gradient all-reduced over TP (None without one)."""
        if self.weight is None:
            return None
        return copy_to_tensor_model_parallel_region(self.weight, group=self.tp_group).to(dtype)

    def forward(self, o, gate=None):
        """o: [..., H, D]; gate: same shape or None."""
        if (self.fused_activation and o.is_cuda and self.weight is not None
                and gate is not None):
            from fla.modules.fused_norm_gate import rms_norm_gated

            d = o.shape[-1]
            y = rms_norm_gated(o.reshape(-1, d), gate.reshape(-1, d), self._tp_weight(o.dtype),
                               None, activation=self.fused_activation, eps=self.eps)
            return y.view_as(o)
        if self.fused and o.is_cuda and gate is None and self.use_norm:
            # No gate: torch's CUDA rms_norm in the input's dtype (fp32 inside), as RMSNorm.
            # The fp32 path's casts cost two more passes each way (deltanet's layer, whose
            # output norm has no gate: 2.3 ms of its 6.2 ms overhead, H200 session 8).
            return rms_norm(o, self._tp_weight(o.dtype), self.eps)
        y = o.float()
        if self.use_norm:
            y = F.rms_norm(y, (y.shape[-1],), self._tp_weight(torch.float32), self.eps)
        if gate is not None:
            y = y * self.gate_fn(gate.float())
        return y.to(o.dtype)
