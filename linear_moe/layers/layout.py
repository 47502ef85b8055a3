"""The mixers' layout: batch-first ops inside Megatron's [s, b, h] activations.

Two tools. The GEMMs on the transposed view (below): the in-projections read the [b, s, h]
view of the [s, b, h] input in place and o_proj writes its [s, b, h] output through the view,
so a mixer needs no copy of its input or output. And the copy itself, swapping the two leading
dims at memory speed, for what still needs one: the mixers that read x otherwise (token shifts,
routing) and a weight gradient whose rows sit in two orders, where a copy moves fewer bytes
than per-sequence partials. torch runs a copy of a permuted tensor through its generic strided
kernel, one 2-byte element at a time for bf16 (the four copies per layer were 1.1 ms/step of
the GLA layer bench's 3.0 ms overhead, H200, 2026-12-05); only the leading dims move and every
row of the trailing dims stays contiguous, so the same copy runs on the rows viewed as 16-byte
elements (complex128): 8 bf16 per load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Widest first; a row whose byte size (or start) does not divide by one tries the next.
_WIDE_DTYPES = (torch.complex128, torch.float64, torch.float32)


def _swap_copy(t: torch.Tensor) -> torch.Tensor:
    """t [a, b, ...] -> a contiguous [b, a, ...] copy."""
    if t.is_contiguous():
        rows = t.reshape(t.shape[0], t.shape[1], -1)  # a view
        row_bytes = rows.shape[-1] * t.element_size()
        for wide in _WIDE_DTYPES:
            size = wide.itemsize
            offset_bytes = t.storage_offset() * t.element_size()  # view(dtype) checks this
            if (size > t.element_size() and row_bytes % size == 0 and offset_bytes % size == 0
                    and t.data_ptr() % size == 0):
                swapped = rows.view(wide).transpose(0, 1).contiguous().view(t.dtype)
                return swapped.view(t.shape[1], t.shape[0], *t.shape[2:])
    return t.transpose(0, 1).contiguous()


class _SwapLeadingDims(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _swap_copy(x)

    @staticmethod
    def backward(ctx, grad):
        return _swap_copy(grad)


def swap_leading_dims(x: torch.Tensor) -> torch.Tensor:
    """x [a, b, ...] -> contiguous [b, a, ...] (x.transpose(0, 1).contiguous(), and its
    gradient likewise, at memory speed)."""
    if x.shape[0] == 1 or x.shape[1] == 1:  # the transposed view is contiguous: no copy
        return x.transpose(0, 1).contiguous()
    return _SwapLeadingDims.apply(x)


# -- GEMMs on the transposed view, instead of the copies ------------------------------------
# x.transpose(0, 1) of a contiguous [s, b, k] tensor is a [b, s, k] view whose rows of k are
# contiguous at a stride of b*k: a batched GEMM over b reads or writes it in place (the row
# stride is cuBLAS's leading dimension, the batch stride k; torch's bmm passes such operands and
# outputs to cuBLAS uncopied). So the in-projections can read Megatron's [s, b, h] input and
# o_proj can write its [s, b, h] output without the copies above. Only a weight gradient, a sum
# over rows that sit in different orders in its two operands, needs partial products per
# sequence (b * n * k elements) or a copy of one operand into the other's order (s * b * width);
# it takes the smaller.

def _rows(t: torch.Tensor):
    """t [B, S, n] as ("bs" | "sb", [B*S, n] rows in that order) without a copy, or (None, None)."""
    if t.is_contiguous():
        return "bs", t.reshape(-1, t.shape[-1])
    if t.transpose(0, 1).is_contiguous():
        return "sb", t.transpose(0, 1).reshape(-1, t.shape[-1])
    return None, None


def _rows_in(t: torch.Tensor, order: str) -> torch.Tensor:
    """t [B, S, n]'s rows as [B*S, n] in ``order``, copied into it where they are not."""
    have, rows = _rows(t)
    if have == order:
        return rows
    if have is None:
        t = t.contiguous()
    seq_first = t.transpose(0, 1) if order == "bs" else t  # its swap is in ``order``
    return _swap_copy(seq_first).reshape(-1, t.shape[-1])


# How a GEMM of contiguous [B, S, k] operands is called (a mixer's ``la_gemm_form``, passed to
# the functions below): "batched" (default) makes it the batched GEMM over B that the
# transposed views take, "rows" flattens them into one 2-D GEMM over B*S rows. The same
# products; cuBLAS picks its kernel by the call's form: in session 25's profiles (H100, GLA
# layer, T = 2048, B = 32) the 2-D GEMMs' row-major outputs got 192x192 tiles, up to 14% slower
# than the 256x128 ones the batched calls got, and in session 26's layer A/Bs the batched form
# took 0.1-0.6 ms off a GLA / GDN layer step (benchmarks/NOTES.md).
# scripts/probes/gemm_layout_probe.py and layer_bench --gemm-form measure the choice.
# Sequences shorter than BATCHED_MIN_ROWS always take the 2-D GEMM: a batch of a few rows would
# fill a fraction of each of the batched kernel's tiles, and at decoding (S = 1) every batch
# would read the whole weight where one GEMM over the B rows reads it once.
GEMM_FORMS = ("batched", "rows")
DEFAULT_GEMM_FORM = "batched"
BATCHED_MIN_ROWS = 256


def check_gemm_form(form: str) -> str:
    """form, if it is one of GEMM_FORMS."""
    if form not in GEMM_FORMS:
        raise ValueError(f"GEMM form {form!r} is not one of {', '.join(GEMM_FORMS)} "
                         "(--la-gemm-form)")
    return form


def _as_rows(form: str, *operands: torch.Tensor) -> bool:
    """Whether a GEMM of these [B, S, .] operands runs as one 2-D GEMM over all rows: each is
    contiguous, and the rows form is chosen or the sequences are short."""
    return (all(t.is_contiguous() for t in operands)
            and (form == "rows" or operands[0].shape[1] < BATCHED_MIN_ROWS))


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                form: str = DEFAULT_GEMM_FORM):
    """x [B, S, k] @ weight.T (+ bias) -> contiguous [B, S, n]; x contiguous or the transposed
    view of a contiguous [S, B, k] tensor (read in place by one batched GEMM)."""
    if _as_rows(form, x):
        return F.linear(x, weight, bias)
    out = torch.bmm(x, weight.t().expand(x.shape[0], -1, -1))
    return out if bias is None else out.add_(bias)


def matmul_into(out: torch.Tensor, a: torch.Tensor, mat: torch.Tensor,
                accumulate: bool = False, alpha: float = 1.0,
                form: str = DEFAULT_GEMM_FORM) -> torch.Tensor:
    """out (+)= alpha * a @ mat, in place: out [B, S, n] and a [B, S, k] each contiguous or a
    transposed view as in ``linear_rows``, mat [k, n]."""
    # beta 0 writes out without reading it (out may be uninitialised): alpha costs no pass.
    beta = 1.0 if accumulate else 0.0
    if _as_rows(form, out, a):
        out_2d, a_2d = out.view(-1, out.shape[-1]), a.reshape(-1, a.shape[-1])
        out_2d.addmm_(a_2d, mat, beta=beta, alpha=alpha)
    else:
        out.baddbmm_(a, mat.expand(a.shape[0], -1, -1), beta=beta, alpha=alpha)
    return out


def weight_grads(grads, x: torch.Tensor) -> list:
    """[g.T @ x summed over all rows, for g in grads] ([n_i, k] in g's dtype; None for None):
    the weight gradients of linears of x [B, S, k] whose output gradients are grads [B, S, n_i],
    any operand contiguous or a transposed view. Rows in one order in both: one GEMM. Otherwise
    the cheapest in bytes moved of: per-sequence partial products in fp32, summed (B * n_i * k
    elements of at least 4 bytes); a copy of g (S * B * n_i elements); one copy of x shared by
    every g (S * B * k)."""
    x_order, x_rows = _rows(x)
    B, S, k = x.shape
    out = [None] * len(grads)
    mismatched = []
    for i, g in enumerate(grads):
        if g is None:
            continue
        g_order, g_rows = _rows(g)
        if g_order is not None and g_order == x_order:
            out[i] = g_rows.t() @ x_rows
        else:
            mismatched.append(i)
    if not mismatched:
        return out
    size = x.element_size()
    partial_bytes = {i: B * grads[i].shape[-1] * k * max(size, 4) for i in mismatched}
    copy_bytes = {i: S * B * grads[i].shape[-1] * size for i in mismatched}
    own = {i: min(partial_bytes[i], copy_bytes[i]) for i in mismatched}
    if x_order is None or S * B * k * size < sum(own.values()):  # one copy of x for all
        order = _rows(grads[mismatched[0]])[0] or "bs"
        x_rows = _rows_in(x, order)
        for i in mismatched:
            out[i] = _rows_in(grads[i], order).t() @ x_rows
        return out
    for i in mismatched:
        g = grads[i]
        if partial_bytes[i] <= copy_bytes[i]:  # [B, n, k] partials, summed
            out[i] = _bmm_fp32(g.transpose(1, 2), x).sum(0).to(g.dtype)
        else:
            out[i] = _rows_in(g, x_order).t() @ x_rows
    return out


def _bmm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b batched with at least fp32 results: the partial products of a bf16 / fp16 weight
    gradient are summed before one rounding, as inside one GEMM (rounded each, they lose digits
    wherever the partials cancel)."""
    if a.dtype not in (torch.bfloat16, torch.float16):
        return torch.bmm(a, b)
    if a.is_cuda and _BMM_HAS_OUT_DTYPE:
        return torch.bmm(a, b, torch.float32)  # out_dtype: cuBLAS writes its fp32 accumulator
    return torch.bmm(a.float(), b.float())


_BMM_HAS_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")  # torch >= 2.9 (CUDA kernels)


class _LinearToSeqFirst(torch.autograd.Function):
    """o [B, S, v] @ weight.T -> contiguous [S, B, n]: the GEMM writes the transposed view."""

    @staticmethod
    def forward(ctx, o, weight, form):
        ctx.save_for_backward(o, weight)
        ctx.form = form
        out = o.new_empty(o.shape[1], o.shape[0], weight.shape[0])
        matmul_into(out.transpose(0, 1), o, weight.t(), form=form)
        return out

    @staticmethod
    def backward(ctx, grad):
        o, weight = ctx.saved_tensors
        grad_bs = grad.transpose(0, 1)
        grad_o = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_o = matmul_into(torch.empty_like(o), grad_bs, weight, form=ctx.form)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grads([grad_bs], o)[0]
        return grad_o, grad_w, None


def linear_to_seq_first(o: torch.Tensor, weight: torch.Tensor,
                        form: str = DEFAULT_GEMM_FORM) -> torch.Tensor:
    """o [B, S, v] @ weight.T -> [S, B, n], with no [b, s] -> [s, b] copy forward or backward
    (the mixers' output projection)."""
    return _LinearToSeqFirst.apply(o.contiguous(), weight, form)
