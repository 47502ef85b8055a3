"""The interface every linear mixer implements.

A mixer sits in a Megatron TransformerLayer's ``self_attention`` slot, so it takes the arguments
that slot is built with and returns ``(output [s, b, h], bias)``. Subclasses build their
projections with ``column``/``row`` and implement ``mix(x) -> o`` on the full sequence.

Layout: Megatron's activations are [s, b, h] but the ops take [b, s, H, D], so everything in
``mix`` is batch-first: the in-projections give [b, s, H*D], ``heads`` only views that as
[b, s, H, D], short convolutions run on [b, s, c] and token shifts / routing act on dim 1. The
layer's input norm stores its [s, b, h] output batch-first (MixerInputRMSNorm), so x is a
contiguous [b, s, h] view. Where it is not (sequence parallelism's gathered input, a caller's
[s, b, h] tensor), the mixers with ``strided_input`` take the transposed view, which their
in-projections' batched GEMMs read in place (layout.py, "GEMMs on the transposed view"; their
weight gradients then copy x once into [b, s] order), and the others get one [b, s, h] copy.
``unheads`` gives [b, s, H*D] and ``project_out``'s GEMM writes o_proj's output in [s, b] order
(under sequence parallelism it reduce-scatters dim 0), without a copy.

Tensor parallelism: every projection is split by heads (ColumnParallelLinear in,
RowParallelLinear out); per-head parameters are sharded with ``init_tp_sharded_``. Under sequence
parallelism the input is gathered once here, so the projections run on the full sequence and
the output projection reduce-scatters back.

Sequence context: the three things in a mixer that look across positions (the op's recurrence,
short convolutions, token shifts) go through ``recurrent``, ``convolve`` and
``token_shift_delta``, which take what precedes the tokens from the forward's context: the
previous call's state while decoding, the other ranks' chunks under context parallelism
(linear_moe.parallel.context_parallel, for mixers with ``cp_value_arg``), nothing across a
document's start with packed documents (linear_moe.layers.documents).

Head sharing (fla's ``num_kv_heads`` / ``num_v_heads``): ``num_heads`` is the number of heads the
recurrence and the output run over (one state per head; per-head decays, betas, norms). q, k
and v each have ``num_q_heads`` / ``num_k_heads`` / ``num_v_heads`` heads, equal to ``num_heads``
unless the mixer opts in via ``head_sharing``:

* ``"kv"`` (--la-num-kv-heads, GQA): k and v have fewer heads than q;
* ``"v"`` (--la-num-v-heads, GVA): v has more heads than q and k (``num_heads`` is then the
  value-head count, and the value/output width grows with it).

``qkv`` repeats each shared head over the consecutive heads that read it, fla's
``repeat(x, '... (h d) -> ... (h g) d')`` (head i reads shared head i // g). Head dims never
change: head_k_dim = hidden*expand_k / --la-num-heads, head_v_dim likewise. Under TP every
projection is split by heads and the shared head count must divide by TP, so a rank holds
whole groups: its shared heads and exactly the heads that read them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)

from linear_moe.layers import GatedRMSNorm, ShortConvolution, apply_rotary, init_tp_sharded_
from linear_moe.layers.documents import Documents
from linear_moe.layers.rwkv import token_shift_delta
from linear_moe.layers.layout import (
    DEFAULT_GEMM_FORM,
    check_gemm_form,
    linear_rows,
    linear_to_seq_first,
    matmul_into,
    swap_leading_dims,
    weight_grads,
)
from linear_moe.parallel.context_parallel import SequenceChunks


@dataclass
class DecodeCache:
    """One mixer layer's state between decoding calls: ``offset`` tokens seen so far, and
    named states (the recurrence's, each short conv's last inputs, the token shift's last x)."""

    offset: int = 0
    states: dict = field(default_factory=dict)


def qk_l2norm_in_conv_needs_conv(la_module: str) -> str:
    """The one-line error for --la-qk-l2norm-in-conv asked of a mixer with its convs off."""
    return (f"--la-qk-l2norm-in-conv needs a short convolution, which mixer '{la_module}' has "
            "off; add --la-use-short-conv or drop the flag")


def check_head_sharing(la_module: str, head_sharing: str | None, num_heads: int,
                       num_kv_heads: int | None, num_v_heads: int | None, tp: int) -> None:
    """Validate --la-num-kv-heads / --la-num-v-heads for a mixer (``head_sharing`` as
    LinearMixer.head_sharing; a mixer with it also lists the field in its registry ``options``);
    raises a one-line ValueError naming the fix."""
    for option, flag, value in (("kv", "--la-num-kv-heads", num_kv_heads),
                                ("v", "--la-num-v-heads", num_v_heads)):
        if value is not None and head_sharing != option:
            from linear_moe.registry import registered_mixers

            able = [n for n, e in registered_mixers().items()
                    if getattr(e.builder, "head_sharing", None) == option]
            raise ValueError(f"mixer '{la_module}' does not use {flag}; drop it (it applies to: "
                             f"{', '.join(able)})")
    if num_kv_heads is not None:
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"--la-num-kv-heads {num_kv_heads} must divide --la-num-heads "
                             f"{num_heads}; pick a divisor of {num_heads}")
        if num_kv_heads % tp:
            raise ValueError(f"--la-num-kv-heads {num_kv_heads} is not divisible by "
                             f"--tensor-model-parallel-size {tp} (each TP rank holds whole k/v "
                             f"heads); use a multiple of {tp} kv heads or a smaller TP size")
    if num_v_heads is not None:
        if num_v_heads < num_heads or num_v_heads % num_heads:
            raise ValueError(f"--la-num-v-heads {num_v_heads} must be a multiple of "
                             f"--la-num-heads {num_heads} (the q/k heads); pick one")
        if num_heads % tp:
            raise ValueError(f"--la-num-heads {num_heads} (the q/k heads of --la-num-v-heads) "
                             f"is not divisible by --tensor-model-parallel-size {tp} (each TP "
                             f"rank holds whole q/k heads); use a multiple of {tp} q/k heads or "
                             "a smaller TP size")


class _GradientBuffer:
    """The gradient of a fused in-projection's output [b, s, sum of widths], allocated by the
    first consumer's backward that writes its slice in place (our short conv's) and completed
    by _SplitSharingGradient's backward, which then has nothing to concatenate."""

    def __init__(self, out: torch.Tensor, widths):
        self.shape, self.dtype, self.device = out.shape, out.dtype, out.device
        self.widths = widths
        self.buffer = None

    def slice(self, i: int) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        start = sum(self.widths[:i])
        return self.buffer[..., start:start + self.widths[i]]

    def writer(self, i: int):
        """For causal_conv's grad_x_into: slice i, allocated on first use."""
        return lambda: self.slice(i)


class _SplitSharingGradient(torch.autograd.Function):
    """out.split(widths, -1), whose backward takes the slices written into the _GradientBuffer
    in place and copies only the other gradients (zeros for outputs that reached no loss),
    instead of concatenating them all: the conv mixers' 0.43 ms per layer step at the GDN layer
    bench's shape (H200 profile, eighth session)."""

    @staticmethod
    def forward(ctx, out, grads):
        ctx.grads = grads
        ctx.set_materialize_grads(False)
        return tuple(out.split(grads.widths, -1))

    @staticmethod
    def backward(ctx, *grads):
        written = ctx.grads
        for i, grad in enumerate(grads):
            view = written.slice(i)
            if grad is None:
                view.zero_()
            elif grad.data_ptr() != view.data_ptr() or grad.stride() != view.stride():
                view.copy_(grad)
        buffer, written.buffer = written.buffer, None
        return buffer, None


class _SharedInputLinears(torch.autograd.Function):
    """Linears of one input x [b, s, h], in groups: output i = x @ cat(group i's weights).T
    + their biases. A group of several is one GEMM, split by the caller; the concatenation is
    a per-step copy, not kept for backward, where it is made again (kept, it was hidden x sum
    of widths per layer: 72 MiB over the peer's 12 GDN layers, most of its 85 MiB forward-memory
    gap to fla's model, H200 census, session 8). Backward accumulates x's gradient inside the
    GEMMs (beta 1) instead of autograd summing one gradient per output (three passes over
    [tokens, hidden] each), and forms every weight gradient in one weight_grads call, so at
    most one copy of x. x may be the transposed view of [s, b, h] (layout's GEMMs).
    grad_scales: per group, the factor of its share of x's gradient (LinearMixer._linears);
    form: the GEMM form (layout.GEMM_FORMS)."""

    @staticmethod
    def forward(ctx, x, group_sizes, grad_scales, form, *weights_and_biases):
        num = len(weights_and_biases) // 2
        weights, biases = weights_and_biases[:num], weights_and_biases[num:]
        ctx.save_for_backward(x, *weights)
        ctx.group_sizes, ctx.grad_scales, ctx.form = group_sizes, grad_scales, form
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: skipped
        outs = []
        for ws, bs in zip(_grouped(group_sizes, weights), _grouped(group_sizes, biases)):
            bias = None
            if any(b is not None for b in bs):
                bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b
                                  for w, b in zip(ws, bs)])
            outs.append(linear_rows(x, _concat(ws), bias, form=form))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, *weights = ctx.saved_tensors
        num, sizes = len(weights), ctx.group_sizes
        groups = _grouped(sizes, weights)
        firsts = _starts(sizes)  # each group's first weight
        grad_x = None
        if ctx.needs_input_grad[0]:
            # The first GEMM writes x's gradient, the others read and add to it: the narrowest
            # group goes first, since for a low-rank down projection (K = 16) adding is a full
            # read and write of the gradient around little compute, where a wide GEMM hides it.
            order = sorted(range(len(groups)), key=lambda i: sum(w.shape[0] for w in groups[i]))
            for i in order:
                grad, ws, scale = grads[i], groups[i], ctx.grad_scales[i]
                if grad is None:  # an output that did not reach the loss
                    continue
                if grad_x is None:
                    grad_x = matmul_into(torch.empty_like(x), grad, _concat(ws), alpha=scale,
                                         form=ctx.form)
                else:
                    matmul_into(grad_x, grad, _concat(ws), accumulate=True, alpha=scale,
                                form=ctx.form)
        needs = ctx.needs_input_grad[4:]
        wanted = [g if any(needs[f:f + n]) else None for g, f, n in zip(grads, firsts, sizes)]
        grad_weights, grad_biases = [None] * num, [None] * num
        for grad, grad_w, f, ws in zip(grads, weight_grads(wanted, x), firsts, groups):
            if grad is None:
                continue
            widths = [w.shape[0] for w in ws]
            if grad_w is not None:
                grad_weights[f:f + len(ws)] = grad_w.split(widths)
            if any(needs[num + f:num + f + len(ws)]):
                grad_biases[f:f + len(ws)] = _sum_rows(grad).split(widths)
        grad_weights = [g if need else None for g, need in zip(grad_weights, needs)]
        grad_biases = [g if need else None for g, need in zip(grad_biases, needs[num:])]
        return grad_x, None, None, None, *grad_weights, *grad_biases


def _replicated(linear) -> bool:
    """A plain torch.nn.Linear among a mixer's in-projections is replicated over TP."""
    return not isinstance(linear, ColumnParallelLinear)


def _starts(sizes):
    """Where each of consecutive groups of the given sizes starts."""
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _grouped(sizes, items):
    """items cut into consecutive groups of the given sizes."""
    return [items[i:i + n] for i, n in zip(_starts(sizes), sizes)]


def _concat(weights):
    return weights[0] if len(weights) == 1 else torch.cat(weights)


def _sum_rows(grad: torch.Tensor) -> torch.Tensor:
    """A bias gradient: grad summed over every dim but the last."""
    return grad.sum(tuple(range(grad.dim() - 1)))


class LinearMixer(MegatronModule):
    #: Head sharing the mixer supports: "kv" (--la-num-kv-heads), "v" (--la-num-v-heads) or None.
    head_sharing: str | None = None
    #: ``mix`` may get x as the transposed view of Megatron's [s, b, h] input (when the input
    #: norm did not store it batch-first), which project / project_each / qkv / output read in
    #: place. False for a mixer that reads x otherwise (token shifts, routing, its modules' own
    #: GEMMs): it then gets a [b, s, h] copy, once, where each such read of the view would copy
    #: or run strided.
    strided_input: bool = True
    #: Under context parallelism: the position of the value input among the op's arguments
    #: (``recurrent``; see linear_moe.parallel.context_parallel), or None for a mixer whose
    #: recurrence is not of the form CP's state passing takes.
    cp_value_arg: int | None = None
    #: The recurrence has no decay (its transition is the identity): CP skips the probe pass.
    cp_identity_transition: bool = False
    #: Its op is one of ops.NATIVE_CONTEXT_PARALLEL: --la-cp-kernel fla runs fla's own CP.
    fla_context_parallel: bool = False

    @classmethod
    def has_cp_support(cls) -> bool:
        """A value argument for the generic state passing, or a ``cp_recurrent`` of its own."""
        return cls.cp_value_arg is not None or cls.cp_recurrent is not LinearMixer.cp_recurrent

    def __init__(self, config, submodules=None, layer_number: int | None = None,
                 attn_mask_type=None, pg_collection=None, cp_comm_type=None, **unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        if pg_collection is not None:
            self.tp_group = pg_collection.tp
        else:
            self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.tp_size = self.tp_group.size()
        self.tp_rank = self.tp_group.rank()
        self.cp = None  # this rank's pieces of the sequence under context parallelism
        if config.context_parallel_size > 1:
            if not self.has_cp_support():
                raise ValueError(f"mixer '{config.la_module}' has no context-parallel support; "
                                 "use --context-parallel-size 1 or a mixer with cp=yes "
                                 "(`linear-moe mixers`)")
            cp_group = (pg_collection.cp if pg_collection is not None
                        else parallel_state.get_context_parallel_group())
            self.cp = SequenceChunks(cp_group)

        self.hidden_size = config.hidden_size
        # How the projection GEMMs on contiguous operands are called (layout.GEMM_FORMS).
        self.gemm_form = check_gemm_form(getattr(config, "la_gemm_form", DEFAULT_GEMM_FORM))
        self.num_heads = config.la_num_heads
        num_kv_heads = getattr(config, "la_num_kv_heads", None)
        num_v_heads = getattr(config, "la_num_v_heads", None)
        check_head_sharing(config.la_module, self.head_sharing, self.num_heads, num_kv_heads,
                           num_v_heads, self.tp_size)
        if self.num_heads % self.tp_size:
            raise ValueError(f"--la-num-heads {self.num_heads} is not divisible by "
                             f"--tensor-model-parallel-size {self.tp_size}")
        self.num_local_heads = self.num_heads // self.tp_size
        self.key_dim = int(config.hidden_size * config.la_expand_k)
        self.value_dim = int(config.hidden_size * config.la_expand_v)
        for name, dim in (("key", self.key_dim), ("value", self.value_dim)):
            if dim % self.num_heads:
                raise ValueError(f"{name} dim {dim} (hidden * la_expand_{name[0]}) is not "
                                 f"divisible by --la-num-heads {self.num_heads}")
        self.head_k_dim = self.key_dim // self.num_heads
        self.head_v_dim = self.value_dim // self.num_heads
        # Head sharing (see the module docstring); all equal to num_heads when unset.
        self.num_q_heads = self.num_k_heads = self.num_v_heads = self.num_heads
        if num_kv_heads is not None:
            self.num_k_heads = self.num_v_heads = num_kv_heads
        if num_v_heads is not None:
            self.num_heads = self.num_v_heads = num_v_heads
            self.num_local_heads = num_v_heads // self.tp_size
            self.value_dim = num_v_heads * self.head_v_dim

        self._decoding: DecodeCache | None = None  # set during a decoding forward
        self._documents: Documents | None = None  # set during a packed-documents forward
        # The input is gathered over the sequence once (forward), so in-projections must not
        # gather again.
        self._in_config = copy.copy(config)
        self._in_config.sequence_parallel = False

    # -- building blocks -------------------------------------------------------------------
    def column(self, in_features: int, out_features: int, bias: bool = False):
        """Input projection split over TP by output features (i.e. by heads)."""
        return ColumnParallelLinear(
            in_features, out_features, config=self._in_config,
            init_method=self.config.init_method, gather_output=False, bias=bias,
            skip_bias_add=False, tp_group=self.tp_group)

    def row(self, in_features: int):
        """Output projection back to the hidden size, reducing over TP."""
        return RowParallelLinear(
            in_features, self.hidden_size, config=self.config,
            init_method=self.config.output_layer_init_method, bias=self.config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=True, tp_group=self.tp_group)

    def short_conv(self, channels: int, l2norm_head_dim: int | None = None) -> ShortConvolution:
        """A SiLU short convolution over the sequence, channels split over TP by heads, with a
        bias under --la-conv-bias; its output's heads of l2norm_head_dim L2-normalised."""
        return ShortConvolution(channels, self.config.la_conv_size, self.tp_rank, self.tp_size,
                                self.config.params_dtype,
                                bias=getattr(self.config, "la_conv_bias", False),
                                fused=self.config.la_backend != "reference",
                                kernel=getattr(self.config, "la_conv_kernel", "auto"),
                                l2norm_head_dim=l2norm_head_dim)

    def build_qkv(self, qk_l2norm: bool = False):
        """q/k/v projections split by heads (num_q/k/v_heads each), plus SiLU short
        convolutions on each when --la-use-short-conv is on.

        qk_l2norm: the mixer L2-normalises q and k per head right after their convs (the
        delta-rule ops' use_qk_l2norm); with the convs and --la-qk-l2norm-in-conv the convs do
        it, in our kernel's registers on CUDA, where fla's op spends two passes over q and k
        each way. ``qk_l2norm_in_conv`` says so; the op must then not normalise again."""
        dims = (self.num_q_heads * self.head_k_dim, self.num_k_heads * self.head_k_dim,
                self.num_v_heads * self.head_v_dim)
        self.q_proj, self.k_proj, self.v_proj = (self.column(self.hidden_size, d) for d in dims)
        self.use_short_conv = self.config.la_use_short_conv
        in_conv = getattr(self.config, "la_qk_l2norm_in_conv", None)
        if qk_l2norm and in_conv is True and not self.use_short_conv:
            raise ValueError(qk_l2norm_in_conv_needs_conv(self.config.la_module))
        self.qk_l2norm_in_conv = qk_l2norm and self.use_short_conv and in_conv is not False
        if self.use_short_conv:
            head_dim = self.head_k_dim if self.qk_l2norm_in_conv else None
            self.q_conv, self.k_conv = (self.short_conv(d, head_dim) for d in dims[:2])
            self.v_conv = self.short_conv(dims[2])

    def project(self, x, *projections, gradient_buffer: bool = False, separate=()):
        """x [b, s, h] through several of this mixer's in-projections (``column`` modules) as
        one GEMM, split back into their outputs ([b, s, out] views). x is read once and its
        gradient is one GEMM, instead of one per projection summed up (GDN has five). The
        weights stay separate parameters, so checkpoints and TP sharding are unchanged; their
        concatenation is a per-step copy that is not kept for backward (_SharedInputLinears).

        Only for outputs read in place (fla's short conv reads strided slices): a kernel that
        copies its slice costs a copy forward and the split's concatenation backward, more
        than the GEMMs save (retention's layer measured 1.13x -> 1.17x with it). A consumer
        that keeps a slice for backward keeps the whole output alive, so output gates, which
        the gated norm keeps, go in ``separate``: their own GEMMs, outputs returned after the
        split ones, x's gradient still accumulated in the same backward.

        gradient_buffer: returns (outputs, _GradientBuffer) instead, whose ``writer(i)`` gives
        output i's consumer the slice of the output's gradient to write in place (our short
        conv's backward), so the gradients need no concatenation."""
        if len(projections) == 1 and not gradient_buffer:
            return self.project_each(x, *projections, *separate)
        out, *separate_outs = self._linears(x, [projections, *((p,) for p in separate)])
        widths = [p.weight.shape[0] for p in projections]
        if gradient_buffer:
            grads = _GradientBuffer(out, widths)
            return (*_SplitSharingGradient.apply(out, grads), *separate_outs), grads
        return (*out.split(widths, -1), *separate_outs)

    def project_each(self, x, *projections):
        """x [b, s, h] through several of this mixer's in-projections, each output its own
        tensor (for kernels that would copy a slice of one fused output), with x's gradient
        accumulated inside the backward GEMMs (_SharedInputLinears). ``column`` modules, or
        torch.nn.Linear ones replicated over TP (a low-rank gate's down projection). Also a
        low-rank chain's up projection (x [b, s, r]): its bias is added in the GEMM's epilogue,
        where the module's own call adds it in a pass of its own (GLA's gk_up: 0.18 ms of the
        layer bench's step, H100 profile, 2026-12-06)."""
        alone = projections[0] if len(projections) == 1 else None
        if isinstance(alone, ColumnParallelLinear) and alone.bias is None and x.is_contiguous():
            return (alone(x)[0],)  # the module's own GEMM
        return self._linears(x, [(p,) for p in projections])

    def up(self, linear, low):
        """A low-rank chain's up projection ``linear`` of its rank-r input ``low`` [b, s, r]
        (project_each: a bias in the GEMM's epilogue)."""
        return self.project_each(low, linear)[0]

    def _linears(self, x, groups):
        """_SharedInputLinears over groups of linears, behind the TP copy of x (_column_input).
        A group of one torch.nn.Linear is replicated over TP: every rank holds all of its share
        of x's gradient, which the copy's all-reduce would sum tp times, so it is scaled by
        1 / tp (exact for a power of two)."""
        linears = [p for group in groups for p in group]
        scales = tuple(1.0 / self.tp_size if len(g) == 1 and _replicated(g[0]) else 1.0
                       for g in groups)
        if any(_replicated(p) for g in groups if len(g) > 1 for p in g):
            raise ValueError("a linear replicated over TP cannot share a fused GEMM with "
                             "TP-split ones; pass it as its own projection")
        return _SharedInputLinears.apply(self._column_input(x), tuple(len(g) for g in groups),
                                         scales, self.gemm_form, *(p.weight for p in linears),
                                         *(p.bias for p in linears))

    def _column_input(self, x):
        """x as the projections' own GEMMs take it: under TP, what each ColumnParallelLinear
        does first (its backward all-reduces x's gradient). On the transposed view, to the
        [s, b, h] tensor beneath, so the all-reduce gets its gradient contiguous."""
        if self.tp_size > 1:
            if x.is_contiguous():
                x = copy_to_tensor_model_parallel_region(x, group=self.tp_group)
            else:
                x = copy_to_tensor_model_parallel_region(
                    x.transpose(0, 1), group=self.tp_group).transpose(0, 1)
        return x

    def qkv(self, x, *extra):
        """x [b, s, h] -> q, k [b, s, H_local, Dk] and v [b, s, H_local, Dv], convolved over
        the sequence where enabled (shared heads repeated to H_local by expand_heads), followed
        by the outputs of the ``extra`` in-projections (``column`` modules, or torch.nn.Linear
        ones replicated over TP) and the output gate's projection [b, s, value_dim / tp] (None
        without a gate), which ``output`` takes. All in one call (_SharedInputLinears), so x's
        gradient is accumulated in its backward GEMMs. With the short convs, which read the
        slices in place, q, k, v and the split extras are one GEMM (``project``), the gate
        (which the gated norm keeps) and replicated extras their own beside it; without, every
        projection writes its own output (``project_each``)."""
        gates = (self.g_proj,) if self.use_output_gate else ()
        if self.use_short_conv:  # our conv writes its input gradient into the GEMM's
            fused = (self.q_proj, self.k_proj, self.v_proj,
                     *(p for p in extra if not _replicated(p)))
            replicated = tuple(p for p in extra if _replicated(p))
            (q, k, v, *outs), grads = self.project(x, *fused, gradient_buffer=True,
                                                   separate=(*replicated, *gates))
            by_linear = dict(zip(fused[3:] + replicated + gates, outs))
            rest = [by_linear[p] for p in extra]  # in the order asked
            gate = by_linear[self.g_proj] if gates else None
            convs = (self.q_conv, self.k_conv, self.v_conv)
            q, k, v = (self.convolve(conv, t, grad_x_into=grads.writer(i))
                       for i, (conv, t) in enumerate(zip(convs, (q, k, v))))
        else:  # the kernels would copy slices of one output: separate GEMMs write them whole
            q, k, v, *rest = self.project_each(x, self.q_proj, self.k_proj, self.v_proj, *extra,
                                               *gates)
            gate = rest.pop() if gates else None
        return (self.expand_heads(self.heads(q, self.head_k_dim)),
                self.expand_heads(self.heads(k, self.head_k_dim)),
                self.expand_heads(self.heads(v, self.head_v_dim)), *rest, gate)

    def convolve(self, conv: ShortConvolution, t: torch.Tensor, grad_x_into=None):
        """A short conv over t [b, s, c] in this forward's sequence context: the decoding
        state, the context-parallel halo or the packed documents' borders."""
        return conv(t, grad_x_into=grad_x_into, cache=self._decoding, cp=self.cp,
                    documents=self._documents)

    def expand_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[b, s, n, ...] with n local shared heads -> [b, s, H_local, ...]: each head repeated
        over the H_local / n consecutive heads that read it (fla's '(h g)' layout)."""
        n = t.shape[2]
        if n == self.num_local_heads:
            return t
        return t.repeat_interleave(self.num_local_heads // n, dim=2)

    @staticmethod
    def per_head(t: torch.Tensor) -> torch.Tensor:
        """A per-head projection [b, s, H_local] in fp32."""
        return t.float()

    def build_output(self):
        """Optional output-gate projection, per-head output norm (+ gate, as fla's
        FusedRMSNormGated) and the output projection."""
        self.use_output_gate = self.config.la_use_output_gate
        if self.use_output_gate:
            self.g_proj = self.column(self.hidden_size, self.value_dim)
        self.build_output_norm_and_projection()

    def build_output_norm_and_projection(self):
        kind = self.config.la_output_norm
        if kind not in ("rmsnorm", "identity"):
            raise ValueError(f"unknown --la-output-norm '{kind}'; choose rmsnorm or identity")
        self.build_output_norm(use_norm=kind == "rmsnorm")
        self.o_proj = self.row(self.value_dim)

    def build_output_norm(self, use_norm: bool):
        """o_norm: the per-head RMSNorm (where use_norm) and the optional output gate."""
        self.o_norm = GatedRMSNorm(self.head_v_dim, self.config.layernorm_epsilon,
                                   self.config.la_gate_fn, self.config.params_dtype,
                                   self.tp_group, use_norm=use_norm,
                                   fused=self.config.la_backend != "reference",
                                   elementwise_affine=self.config.la_norm_elementwise_affine)

    def output(self, o, x, gate=None):
        """o [b, s, H_local, Dv], x [b, s, h] -> [b, s, value_dim / tp], normed and gated by
        the output gate: ``gate`` as ``qkv`` returned it, else projected from x here."""
        if self.use_output_gate:
            if gate is None:
                gate = self.project_each(x, self.g_proj)[0]
            gate = self.heads(gate, self.head_v_dim)
        return self.unheads(self.o_norm(o, gate))

    def per_head_parameter(self, init_fn) -> torch.nn.Parameter:
        """A [num_heads] parameter (decay rate, dt bias, skip), this rank's heads."""
        p = torch.nn.Parameter(torch.empty(self.num_local_heads, dtype=self.config.params_dtype))
        return init_tp_sharded_(p, (self.num_heads,), 0, init_fn, self.tp_rank, self.tp_size)

    def local_heads(self) -> slice:
        """This TP rank's heads among all --la-num-heads (for per-head constants)."""
        return slice(self.tp_rank * self.num_local_heads,
                     (self.tp_rank + 1) * self.num_local_heads)

    @staticmethod
    def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
        """[b, s, H*D] -> [b, s, H, D], the layout of the ops (a view)."""
        return x.unflatten(-1, (-1, head_dim))

    @staticmethod
    def unheads(x: torch.Tensor) -> torch.Tensor:
        """[b, s, H, D] -> [b, s, H*D], what ``mix`` returns (``forward``'s output projection
        writes it in [s, b] order)."""
        return x.flatten(2)

    # -- Megatron interface ----------------------------------------------------------------
    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """x: [b, s, h] full sequence -> o: [b, s, value_dim / tp] (via ``unheads``)."""
        raise NotImplementedError

    def forward(self, hidden_states, attention_mask=None, inference_context=None,
                packed_seq_params=None, **unused):
        if inference_context is not None:
            self._decoding = self._decode_cache(inference_context)
            try:
                return self._forward(hidden_states, packed_seq_params)
            finally:
                gathered = self.tp_size if self.config.sequence_parallel else 1
                self._decoding.offset += hidden_states.shape[0] * gathered
                self._decoding = None
        return self._forward(hidden_states, packed_seq_params)

    @classmethod
    def decode_unsupported(cls, config) -> str | None:
        """Why a model of ``config`` cannot decode one token at a time (None: it can)."""
        from linear_moe.registry import get_mixer

        if not get_mixer(config.la_module).supports_decode:
            return (f"mixer '{config.la_module}' has no incremental-decoding support yet "
                    "(`linear-moe mixers` lists decode=yes ones)")
        return None

    def _decode_cache(self, inference_context) -> "DecodeCache":
        """This layer's recurrent state in megatron's static inference context (where its
        attention layers keep their KV cache), keyed by layer number."""
        reason = self.decode_unsupported(self.config)
        if reason:
            raise NotImplementedError(reason)
        if not inference_context.is_static_batching() or inference_context.batch_size_offset:
            raise NotImplementedError("linear mixers decode with megatron's "
                                      "StaticInferenceContext over the whole batch only")
        store = inference_context.key_value_memory_dict
        if inference_context.sequence_len_offset == 0:  # a new prompt
            store[self.layer_number] = DecodeCache()
        cache = store.get(self.layer_number)
        if cache is None:
            raise ValueError(f"layer {self.layer_number} has no state at position "
                             f"{inference_context.sequence_len_offset}: start decoding with the "
                             "prompt at sequence_len_offset 0")
        if cache.offset != inference_context.sequence_len_offset:
            raise ValueError(f"layer {self.layer_number} holds the state after {cache.offset} "
                             "tokens but the context is at "
                             f"{inference_context.sequence_len_offset}")
        return cache

    def recurrent(self, op, *args, **kwargs):
        """op(*args, **kwargs) -> (o, final state); while decoding, started from the state
        the previous call left and leaving its own; under context parallelism, from the state
        the chunks before leave (no final state); with packed documents, each from zero."""
        if self.cp is not None:
            return self.cp_recurrent(op, args, kwargs)
        if self._documents is not None:  # each document from a zero state
            return op(*args, cu_seqlens=self._documents.cu_seqlens, **kwargs)
        cache = self._decoding
        if cache is None:
            return op(*args, **kwargs)
        o, state = op(*args, initial_state=cache.states.get("recurrent"),
                      output_final_state=True, **kwargs)
        cache.states["recurrent"] = state
        return o, state

    def cp_recurrent(self, op, args: tuple, kwargs: dict):
        """``recurrent`` under context parallelism: from the state the chunks before leave
        (one op pass for a diagonal-decay op, ops.DIAGONAL_DECAY, or through fla's own CP for
        ops.NATIVE_CONTEXT_PARALLEL under --la-cp-kernel fla; one at V + K value width for
        ops.WIDENED_PROBE; else three, or two without decay)."""
        from linear_moe.ops import (
            DIAGONAL_DECAY, NATIVE_CONTEXT_PARALLEL, WIDENED_PROBE, resolve_backend,
        )

        if op in NATIVE_CONTEXT_PARALLEL and getattr(self.config, "la_cp_kernel", "ours") == "fla":
            backend = resolve_backend(kwargs.get("backend", "auto"), args[0])
            if backend != "fla" or kwargs.get("mode", "chunk") != "chunk":
                raise ValueError("--la-cp-kernel fla runs fla's chunk kernels on CUDA, not "
                                 f"backend '{backend}' mode '{kwargs.get('mode')}'; drop "
                                 "--la-cp-kernel fla or use --la-mode chunk on a GPU")
            return self.cp.fla_native(op, args, kwargs)
        diagonal = DIAGONAL_DECAY.get(op)
        if diagonal is not None:
            return self.cp.diagonal_state_passing(op, args, kwargs, *diagonal(args, kwargs))
        if op in WIDENED_PROBE:
            return self.cp.state_passing_widened(op, args, kwargs, self.cp_value_arg)
        return self.cp.state_passing(op, args, kwargs, self.cp_value_arg,
                                     self.cp_identity_transition)

    @property
    def position_offset(self) -> int:
        """The position of this call's first token (non-zero only while decoding)."""
        return 0 if self._decoding is None else self._decoding.offset

    def rotate(self, t: torch.Tensor, theta: float, fused: bool) -> torch.Tensor:
        """RoPE on t [b, s, H, D] at its tokens' positions in the whole sequence (from the
        decoding offset; per piece under context parallelism)."""
        if self.cp is not None:
            return self.cp.per_piece(
                t, lambda piece, offset: apply_rotary(piece, theta, fused, offset=offset))
        return apply_rotary(t, theta, fused, offset=self.position_offset)

    def token_shift_delta(self, x: torch.Tensor) -> torch.Tensor:
        """x_{t-1} - x_t over x [b, s, h] (zero before the first token, the previous call's
        last token while decoding, the chunk before's under context parallelism)."""
        if self.cp is not None:
            folded = self.cp.fold(x)
            return self.cp.unfold(token_shift_delta(folded, self.cp.halo(folded, 1)))
        if self._documents is not None:
            return self._documents.previous(x, 1) - x
        previous = None
        if self._decoding is not None:
            previous = self._decoding.states.get("shift")
            self._decoding.states["shift"] = x[:, -1:]
        return token_shift_delta(x, previous)

    def _forward(self, hidden_states, packed_seq_params):
        x = hidden_states
        if self.config.sequence_parallel and self.tp_size > 1:
            # Every rank then holds the full sequence and gets its full gradient (the
            # in-projections all-reduce it), so backward only needs to split it.
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False,
                                                     group=self.tp_group)
        # Batch-first for the ops (see the module docstring): a view, contiguous where the input
        # norm stored it batch-first (MixerInputRMSNorm), else strided, which a mixer without
        # strided_input gets copied.
        x = x.transpose(0, 1)
        if not (self.strided_input or x.is_contiguous()):
            x = swap_leading_dims(x.transpose(0, 1))
        if packed_seq_params is None:
            return self.project_out(self.mix(x))
        b, s = x.shape[:2]
        self._documents = self._packed_documents(packed_seq_params, b * s)
        try:  # the rows as one stream of documents (fla's varlen layout)
            o = self.mix(x.reshape(1, b * s, x.shape[2]))
        finally:
            self._documents = None
        return self.project_out(o.reshape(b, s, o.shape[-1]))

    def _packed_documents(self, packed_seq_params, tokens: int) -> Documents:
        from linear_moe.registry import get_mixer

        if not get_mixer(self.config.la_module).supports_varlen:
            raise NotImplementedError(
                f"mixer '{self.config.la_module}' has no packed-document (varlen) support; "
                "train without --reset-attention-mask or with a mixer with varlen=yes "
                "(`linear-moe mixers`)")
        if packed_seq_params.qkv_format != "sbhd" or packed_seq_params.cu_seqlens_q is None:
            raise NotImplementedError(
                "linear mixers take packed documents as sbhd batches with cu_seqlens_q over the "
                "flattened rows (linear_moe.pretrain.get_batch under --reset-attention-mask)")
        documents = Documents(packed_seq_params.cu_seqlens_q)
        if documents.length != tokens:
            raise ValueError(f"cu_seqlens_q covers {documents.length} tokens, the batch has "
                             f"{tokens}")
        return documents

    def project_out(self, o):
        """o [b, s, value_dim / tp] -> (out [s, b, h], bias): o_proj's GEMM writes the [s, b]
        order itself, then RowParallelLinear's reduction (all-reduce, or under sequence
        parallelism reduce-scatter over s); the bias is returned, as o_proj skips adding it."""
        out = linear_to_seq_first(o, self.o_proj.weight, form=self.gemm_form)
        if self.tp_size > 1:
            if self.config.sequence_parallel:
                out = reduce_scatter_to_sequence_parallel_region(out, group=self.tp_group)
            else:
                out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out, self.o_proj.bias

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Megatron linears shard themselves; other parameters shard along the TP dim they were
        marked with (init_tp_sharded_) and are replicated otherwise."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = {}
        megatron_children = (ColumnParallelLinear, RowParallelLinear, MegatronModule)
        for name, child in self.named_children():
            child_prefix = f"{prefix}{name}."
            if isinstance(child, megatron_children):
                out.update(sharded_state_dict_default(child, child_prefix, sharded_offsets,
                                                      metadata, tp_group=self.tp_group))
                continue
            state = child.state_dict(prefix="", keep_vars=True)
            axis_map = {k: v.partition_dim for k, v in state.items()
                        if getattr(v, "tensor_model_parallel", False)}
            out.update(make_sharded_tensors_for_checkpoint(
                state, child_prefix, axis_map, sharded_offsets, tp_group=self.tp_group,
                dp_cp_group=metadata["dp_cp_group"]))
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        axis_map = {k: v.partition_dim for k, v in own.items()
                    if getattr(v, "tensor_model_parallel", False)}
        out.update(make_sharded_tensors_for_checkpoint(
            own, prefix, axis_map, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=metadata["dp_cp_group"]))
        return out
