"""The mixers' layout: swap_leading_dims ([s, b, ...] <-> [b, s, ...] copy and its gradient)
and the GEMMs that read / write the transposed view instead (linear_rows, matmul_into,
weight_grads, linear_to_seq_first), and a mixer's layer running without either copy."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from linear_moe.layers.layout import (
    _swap_copy,
    linear_rows,
    linear_to_seq_first,
    matmul_into,
    swap_leading_dims,
    weight_grads,
)


@pytest.mark.parametrize("shape,dtype", [
    ((5, 3, 16), torch.bfloat16),      # rows of 32 bytes: complex128 elements
    ((5, 3, 4, 8), torch.float32),     # trailing dims folded into one row
    ((4, 6, 3), torch.bfloat16),       # 6-byte rows: no wider element divides them
    ((7, 5, 2, 4), torch.float16),     # 16-byte rows
    ((1, 4, 8), torch.bfloat16),       # a size-1 dim: the transposed view, no copy
])
def test_swap_matches_transpose_contiguous(shape, dtype):
    x = torch.randn(*shape).to(dtype).requires_grad_()
    y = swap_leading_dims(x)
    assert y.is_contiguous() and y.dtype == dtype
    assert torch.equal(y, x.transpose(0, 1).contiguous())
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad.transpose(0, 1))


def test_swap_copy_of_strided_or_unaligned_tensors():
    strided = torch.randn(6, 5, 16).transpose(0, 1)
    assert torch.equal(_swap_copy(strided), strided.transpose(0, 1).contiguous())
    unaligned = torch.randn(4 * 3 * 8 + 1).to(torch.bfloat16)[1:].view(4, 3, 8)  # 2-byte offset
    assert unaligned.data_ptr() % 4 != 0
    assert torch.equal(_swap_copy(unaligned), unaligned.transpose(0, 1).contiguous())


def _seq_first_view(s, b, k, seed=0):
    """[b, s, k]: the transposed view of a contiguous [s, b, k] tensor (fp64)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(s, b, k, generator=g, dtype=torch.float64).transpose(0, 1)


def test_linear_rows_and_matmul_into_on_the_transposed_view():
    x = _seq_first_view(7, 3, 16)
    w, bias = torch.randn(12, 16, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    y = linear_rows(x, w, bias)
    assert y.is_contiguous() and torch.allclose(y, F.linear(x.contiguous(), w, bias))
    g = torch.randn(3, 7, 12, dtype=torch.float64)
    gx = matmul_into(torch.empty_like(x), g, w)  # written in x's layout
    assert gx.stride() == x.stride() and torch.allclose(gx, g @ w)
    matmul_into(gx, g, 2 * w, accumulate=True)
    assert torch.allclose(gx, 3 * (g @ w))
    out = torch.empty(7, 3, 16, dtype=torch.float64)  # a transposed view as the output
    matmul_into(out.transpose(0, 1), g, w)
    assert torch.allclose(out, (g @ w).transpose(0, 1))


def test_both_gemm_forms_give_the_same_products(monkeypatch):
    """Contiguous operands as one 2-D GEMM over all rows or as the batched GEMM over B (the
    ``form`` argument, a mixer's la_gemm_form): the same results, the batched one through bmm /
    baddbmm; sequences under BATCHED_MIN_ROWS take the 2-D GEMM either way."""
    from linear_moe.layers import layout

    assert layout.DEFAULT_GEMM_FORM == "batched"  # faster on the H100 (session 26 A/Bs)
    monkeypatch.setattr(layout, "BATCHED_MIN_ROWS", 4)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    w, bias = torch.randn(12, 16, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    g = torch.randn(3, 7, 12, dtype=torch.float64)
    results, ops = {}, {}
    for form in layout.GEMM_FORMS:
        with _Ops() as recorded:  # (defined below, with the up projection's test)
            y = linear_rows(x, w, bias, form=form)
            gx = matmul_into(torch.empty_like(x), g, w, form=form)
            matmul_into(gx, g, w, accumulate=True, alpha=0.5, form=form)
        results[form] = (y, gx)
        ops[form] = [n.split(".")[1] for n in recorded.names if "mm" in n]
    assert ops == {"rows": ["addmm", "addmm_", "addmm_"],
                   "batched": ["bmm", "baddbmm_", "baddbmm_"]}, ops
    (y_rows, gx_rows), (y_batched, gx_batched) = results["rows"], results["batched"]
    assert torch.allclose(y_rows, F.linear(x, w, bias)) and torch.allclose(y_batched, y_rows)
    assert torch.allclose(gx_rows, 1.5 * (g @ w)) and torch.allclose(gx_batched, gx_rows)
    with pytest.raises(ValueError, match=r"is not one of batched, rows \(--la-gemm-form\)"):
        layout.check_gemm_form("columns")
    # Sequences shorter than BATCHED_MIN_ROWS (decoding's one token) take the 2-D GEMM.
    x_short, g_short = x[:, :3].contiguous(), g[:, :3].contiguous()
    with _Ops() as recorded:
        y = linear_rows(x_short, w, bias, form="batched")
        matmul_into(torch.empty_like(x_short), g_short, w, form="batched")
    assert [n.split(".")[1] for n in recorded.names if "mm" in n] == ["addmm", "addmm_"]
    assert torch.allclose(y, F.linear(x_short, w, bias))


def _gemm_form_worker(rank, world_size):
    from megatron.core import parallel_state as mpu
    from test_mixer_options import H, SEQ, _build

    from linear_moe.layers import layout

    mpu.initialize_model_parallel(1)
    layout.BATCHED_MIN_ROWS = min(layout.BATCHED_MIN_ROWS, SEQ)  # this process only
    x = torch.randn(SEQ, 3, H)
    x = x.transpose(0, 1).contiguous().transpose(0, 1)  # [s, b, h] as the input norm stores it
    runs = {}
    for form in layout.GEMM_FORMS:
        m = _build("gla", la_gemm_form=form)  # the same seed: the same weights
        xi = x.clone().requires_grad_()
        with _Ops() as ops:
            out = m(xi)[0]
            out.pow(2).sum().backward()
        mms = sorted({n.split(".")[1] for n in ops.names if "mm" in n})
        runs[form] = (m.gemm_form, mms, out.detach(), xi.grad, m.q_proj.weight.grad)
    try:
        _build("gla", la_gemm_form="columns")
        refusal = None
    except ValueError as e:
        refusal = str(e)
    return runs, refusal


def test_a_mixers_gemm_form_reaches_its_gemms():
    """--la-gemm-form: a mixer's in-projections call the GEMMs of its form forward and backward
    (rows: addmm / addmm_, batched: none of those), with equal outputs and gradients; an
    unknown form is refused when the mixer is built."""
    from dist_utils import run_distributed

    runs, refusal = run_distributed(_gemm_form_worker, 1)[0]
    (form_b, mms_b, out_b, gx_b, gw_b), (form_r, mms_r, out_r, gx_r, gw_r) = (
        runs["batched"], runs["rows"])
    assert (form_b, form_r) == ("batched", "rows")
    # (o_proj writes its output and reads its gradient through the [s, b] transposed view,
    # and the reference op has batched products of its own: bmm / baddbmm_ in either form.)
    assert not {"addmm", "addmm_"} & set(mms_b), mms_b
    assert {"addmm", "addmm_"} <= set(mms_r), mms_r
    torch.testing.assert_close(out_b, out_r)
    torch.testing.assert_close(gx_b, gx_r)
    torch.testing.assert_close(gw_b, gw_r)
    assert refusal is not None and "is not one of batched, rows (--la-gemm-form)" in refusal


@pytest.mark.parametrize("contiguous", [True, False])
def test_matmul_into_ignores_what_out_held_and_scales_in_the_gemm(contiguous):
    """out is written with beta 0: garbage (here NaN) in an uninitialised out never reaches the
    result, and alpha is applied inside the GEMM, the first write and the accumulation alike."""
    g = torch.randn(3, 7, 12, dtype=torch.float64)
    w = torch.randn(12, 16, dtype=torch.float64)
    if contiguous:
        out = torch.full((3, 7, 16), float("nan"), dtype=torch.float64)
    else:  # the transposed view of [s, b, k]
        out = torch.full((7, 3, 16), float("nan"), dtype=torch.float64).transpose(0, 1)
    matmul_into(out, g, w, alpha=0.5)
    assert torch.allclose(out, 0.5 * (g @ w))
    matmul_into(out, g, w, accumulate=True, alpha=0.25)
    assert torch.allclose(out, 0.75 * (g @ w))

# (s, b, k): which way weight_grads sums rows stored in two orders. Widths 12 and 5.
@pytest.mark.parametrize("s,b,k,way", [
    (7, 3, 16, "copy x"),      # one copy of x (7*3*16) below the grads' own (252 + 105)
    (40, 3, 4, "partials"),    # per-sequence partials (3*12*4) below a copy of x or g
    (2, 3, 64, "copy g"),      # copying each g (2*3*12) below partials and a copy of x
])
def test_weight_grads_equal_one_gemm_over_all_rows(s, b, k, way):
    x = _seq_first_view(s, b, k)
    grads = [torch.randn(b, s, n, dtype=torch.float64) for n in (12, 5)]
    ref = [g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, k) for g in grads]
    got = weight_grads([grads[0], None, grads[1]], x)
    assert got[1] is None
    for a, r in zip((got[0], got[2]), ref):
        assert a.dtype == torch.float64 and torch.allclose(a, r, rtol=1e-12, atol=1e-12)
    own = [min(b * g.shape[-1] * k, s * b * g.shape[-1]) for g in grads]  # fp64: 8 bytes each
    taken = ("copy x" if s * b * k < sum(own) else
             "partials" if own[0] == b * 12 * k else "copy g")
    assert taken == way
    # rows in one order in both (x contiguous): one GEMM
    xc = x.contiguous()
    assert torch.allclose(weight_grads([grads[0]], xc)[0], ref[0], rtol=1e-12, atol=1e-12)


def test_linear_to_seq_first_gradcheck():
    o = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    out = linear_to_seq_first(o, w)
    assert out.shape == (5, 3, 6) and out.is_contiguous()
    assert torch.allclose(out, F.linear(o, w).transpose(0, 1))
    assert torch.autograd.gradcheck(linear_to_seq_first, (o, w))


class _LayoutCopies(TorchDispatchMode):
    """Counts the copies that change the layout of a [s, b, w] / [b, s, w] tensor (w in widths):
    layout's _swap_copy calls and copy ops reading the transposed view of one (a GEMM's input
    made contiguous, say; not other strided tensors, such as the CPU conv's [b, c, s]
    gradient)."""

    COPIES = {"aten.copy_.default": 1, "aten.clone.default": 0, "aten._to_copy.default": 0}

    def __init__(self, dims, widths):
        super().__init__()
        self.dims, self.widths, self.count = dims, widths, 0

    def __enter__(self):
        from linear_moe.layers import layout

        self._swap_copy = layout._swap_copy
        layout._swap_copy = lambda t: (self._count(t), self._swap_copy(t))[1]
        return super().__enter__()

    def __exit__(self, *exc):
        from linear_moe.layers import layout

        layout._swap_copy = self._swap_copy
        return super().__exit__(*exc)

    def _count(self, t):
        if t.dim() == 3 and set(t.shape[:2]) == self.dims and t.shape[2] in self.widths:
            self.count += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        index = self.COPIES.get(str(func))
        src = args[index] if index is not None else None
        if isinstance(src, torch.Tensor) and src.dim() == 3 and src.stride(2) == 1 \
                and src.stride(0) < src.stride(1):  # a transposed view
            self._count(src)
        return func(*args, **(kwargs or {}))


_LAYER_MIXERS = ("gla", "gated_deltanet", "hgrn2")


def _layer_copies_worker(rank, world_size):
    from megatron.core import parallel_state as mpu
    from test_mixer_options import SEQ, _build

    mpu.initialize_model_parallel(1)
    results = {}
    for name in _LAYER_MIXERS:
        m = _build(name)
        x = torch.randn(SEQ, 3, m.hidden_size)
        dims, widths = {SEQ, 3}, {m.hidden_size, m.value_dim}
        runs = []
        for strided in (True, False):
            m.strided_input = strided
            xi = x.clone().requires_grad_()
            with _LayoutCopies(dims, widths) as fwd:
                out = m(xi)[0]
            with _LayoutCopies(dims, widths) as bwd:
                out.pow(2).sum().backward()
            runs.append((fwd.count, bwd.count, out.detach(), xi.grad))
            m.zero_grad()
        (fwd, bwd, out, grad), (fwd_swap, bwd_swap, out_swap, grad_swap) = runs
        results[name] = (fwd, bwd, fwd_swap, bwd_swap, (out - out_swap).abs().max().item(),
                         (grad - grad_swap).abs().max().item())
    return results


@pytest.fixture(scope="module")
def layer_copies():
    from dist_utils import run_distributed

    return run_distributed(_layer_copies_worker, 1)[0]


@pytest.mark.parametrize("name", _LAYER_MIXERS)
def test_layer_forward_copies_neither_input_nor_output(layer_copies, name):
    """A strided-input mixer's forward makes no [b, s] copy of its input or output (with
    strided_input off: the input's swap; the output's is gone for every mixer); backward at most
    one per side, for a weight gradient where that is cheaper than per-sequence partials. The
    outputs and the input's gradient equal those with strided_input off."""
    fwd, bwd, fwd_swap, bwd_swap, out_diff, grad_diff = layer_copies[name]
    assert (fwd, fwd_swap) == (0, 1) and bwd <= 2 and bwd_swap >= 1
    assert out_diff < 1e-6 and grad_diff < 1e-6


def test_weight_grads_partials_round_once_in_bf16():
    """The partial products are summed in fp32 and rounded to bf16 once, so every entry is
    within bf16 rounding of the exact sum, as one GEMM's, also where the partials cancel."""
    x = _seq_first_view(64, 8, 4).to(torch.bfloat16)
    g = torch.randn(8, 64, 12, dtype=torch.float64).to(torch.bfloat16)
    got = weight_grads([g], x)[0]  # 8 * 12 * 4 partials, well below a copy of x or g
    exact = g.double().reshape(-1, 12).t() @ x.double().reshape(-1, 4)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - exact).abs() / exact.abs()).max() <= 2 ** -8


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _up_projection_worker(rank, world_size):
    from megatron.core import parallel_state as mpu
    from test_mixer_options import _build

    mpu.initialize_model_parallel(1)
    results = {}
    for name, up in (("gla", "gk_up"), ("rwkv6", "w_up"), ("rwkv7", "a_up")):
        m = _build(name)
        linear = getattr(m, up)
        torch.nn.init.normal_(linear.bias)
        low = torch.randn(3, 5, linear.weight.shape[1], requires_grad=True)
        grad = torch.randn(3, 5, linear.weight.shape[0])
        runs = []
        for way in ("module", "up"):
            with _Ops() as ops:
                out = linear(low)[0] if way == "module" else m.up(linear, low)
            out.backward(grad)
            runs.append((out.detach(), low.grad, linear.weight.grad, linear.bias.grad, ops.names))
            low.grad = linear.weight.grad = linear.bias.grad = None
        (*want, module_ops), (*got, up_ops) = runs
        results[name] = ([(a - b).abs().max().item() for a, b in zip(want, got)],
                         "aten.add.Tensor" in module_ops, "aten.add.Tensor" in up_ops)
    return results


def test_up_projection_adds_its_bias_in_the_gemm():
    """A low-rank chain's up projection (LinearMixer.up) computes what the module's own call
    does, outputs and all three gradients, without the separate pass that adds the bias
    (Megatron's ColumnParallelLinear adds it after its GEMM: 0.18 ms of GLA's layer step on
    the H100)."""
    from dist_utils import run_distributed

    for name, (diffs, module_adds, up_adds) in run_distributed(_up_projection_worker, 1)[0].items():
        assert max(diffs) < 1e-5, (name, diffs)
        assert module_adds and not up_adds, name
