"""The CUDA paths of the short convolution (fla's Triton causal_conv1d, SiLU fused, and our
candidate kernel linear_moe.ops.causal_conv) and of the rotary embedding (fla's Triton
rotary_embedding) equal their torch paths: in fp32 to rounding, in bf16 within the GPU suite's
bound, fwd and bwd."""

from __future__ import annotations

import pytest
import torch

from autograd_utils import run_and_record_saved
from test_fla_parity import _record, rel_err
from linear_moe.layers.rotary import apply_rotary
from linear_moe.layers.short_conv import ShortConvolution

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _run(conv, x, dy):
    x = x.detach().requires_grad_()  # a new leaf with x's strides (a strided slice stays one)
    y = conv(x)
    y.backward(dy.to(y.dtype))
    return [y, x.grad, conv.weight.grad] + ([conv.bias.grad] if conv.bias is not None else [])


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "slice"])
@pytest.mark.parametrize("kernel", ["fla", "ours"])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)],
                         ids=["fp32", "bf16"])
def test_fla_short_conv_matches_torch_conv1d(dtype, tol, activation, kernel, strided):
    torch.manual_seed(0)
    channels, size = 384, 4
    fused = ShortConvolution(channels, size, 0, 1, dtype, activation=activation, bias=True,
                             fused=True, kernel=kernel).cuda()
    ref = ShortConvolution(channels, size, 0, 1, torch.float32, activation=activation,
                           bias=True, fused=False).cuda()
    with torch.no_grad():
        ref.weight.copy_(fused.weight.float())
        ref.bias.copy_(fused.bias.float())
    # T not a multiple of any block; "slice": q's part of a fused in-projection's output
    wide = torch.randn(2, 301, 2 * channels if strided else channels, device="cuda")
    dy = torch.randn(2, 301, channels, device="cuda")
    out = _run(fused, wide.to(dtype)[..., :channels], dy.to(dtype))
    out_ref = _run(ref, wide[..., :channels], dy)
    assert out[0].dtype == dtype
    case = f"{activation}/{str(dtype)[6:]}/{'slice' if strided else 'contiguous'}"
    for name, a, b in zip(["y", "dx", "dweight", "dbias"], out, out_ref):
        err = rel_err(a.float(), b)
        _record(f"short_conv/{kernel}", case, size, name, err)
        assert err <= tol, (name, err)


@pytest.mark.parametrize("head_dim", [96, 128])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)],
                         ids=["fp32", "bf16"])
def test_our_short_conv_with_the_qk_l2norm_matches_torch(dtype, tol, activation, head_dim):
    """Our conv kernels with each head L2-normalised in them (--la-qk-l2norm-in-conv) against
    the torch path (conv1d, then the ops' l2norm) in fp32: q's slice of a fused in-projection,
    a head dim that is not a power of two (GDN's 96) and one that is."""
    torch.manual_seed(0)
    channels, size = 4 * head_dim, 4
    fused = ShortConvolution(channels, size, 0, 1, dtype, activation=activation, bias=True,
                             fused=True, kernel="ours", l2norm_head_dim=head_dim).cuda()
    ref = ShortConvolution(channels, size, 0, 1, torch.float32, activation=activation,
                           bias=True, fused=False, l2norm_head_dim=head_dim).cuda()
    with torch.no_grad():
        ref.weight.copy_(fused.weight.float())
        ref.bias.copy_(fused.bias.float())
    wide = torch.randn(2, 301, 3 * channels, device="cuda")
    dy = torch.randn(2, 301, channels, device="cuda")
    out = _run(fused, wide.to(dtype)[..., :channels], dy.to(dtype))
    out_ref = _run(ref, wide[..., :channels], dy)
    case = f"{activation}/{str(dtype)[6:]}/hd{head_dim}"
    for name, a, b in zip(["y", "dx", "dweight", "dbias"], out, out_ref):
        err = rel_err(a.float(), b)
        _record("short_conv/ours+l2norm", case, size, name, err)
        assert err <= tol, (name, err)


@pytest.mark.parametrize("clamp_min", [None, -0.05])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)],
                         ids=["fp32", "bf16"])
def test_our_low_rank_log_decay_matches_torch(dtype, tol, clamp_min):
    """GLA's key decay in one kernel of ours (up projection, bias, logsigmoid, normaliser,
    clamp) against F.linear and the mixer's torch log decay in fp32 on the same (rounded)
    inputs, at GLA's rank 16 with a key width (1000) that is not a multiple of the tiles. The
    same inputs: under the clamp, bf16 rounding of z and W moves entries across the clamp's
    edge, where the gradient jumps from full to zero (0.07 of dz's norm against fp32 inputs,
    H100, 2026-12-07), the torch path in bf16 alike - not the kernel's error; entries within
    1e-4 of the edge get no upstream gradient."""
    import torch.nn.functional as F

    from linear_moe.mixers.gla import _log_decay
    from linear_moe.ops.low_rank_gate import low_rank_log_decay

    torch.manual_seed(0)
    z0 = torch.randn(2, 4099, 16, device="cuda")
    w0 = torch.randn(1000, 16, device="cuda") * 0.5
    b0 = torch.randn(1000, device="cuda")
    dg = torch.randn(2, 4099, 1000, device="cuda")
    if clamp_min is not None:
        # No upstream gradient where g lies within 1e-4 of the clamp's edge (float64 on the
        # rounded inputs): there the gradient jumps, and the last bit of a sum of 16 products
        # decides the side (fp32 on the same inputs: dz 8.0e-4 of its norm, H100, 2026-12-07).
        z64, w64, b64 = (t.to(dtype).double() for t in (z0, w0, b0))
        g64 = F.logsigmoid(F.linear(z64, w64, b64)) / 16.0
        dg = dg * ((g64 - clamp_min).abs() > 1e-4)
    out = []
    for ours, dt in ((True, dtype), (False, torch.float32)):
        # new leaves each run (t.to(fp32) of an fp32 tensor is the tensor itself: the two runs'
        # gradients would accumulate into one .grad and compare equal)
        z, w, b = (t.to(dtype).to(dt).clone().requires_grad_() for t in (z0, w0, b0))
        g = (low_rank_log_decay(z, w, b, 16.0, clamp_min) if ours
             else _log_decay(F.linear(z, w, b), 16.0, clamp_min))
        g.backward(dg.to(dtype).to(dt))
        out.append((g, z.grad, w.grad, b.grad))
    assert out[0][0].dtype == dtype
    for name, a, b in zip(["g", "dz", "dweight", "dbias"], *out):
        err = rel_err(a.float(), b)
        _record("low_rank_log_decay", f"{str(dtype)[6:]}/clamp={clamp_min}", 16, name, err)
        assert err <= tol, (name, err)


@pytest.mark.parametrize("offset", [0, 37], ids=["offset0", "offset37"])  # 37: decoding
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)],
                         ids=["fp32", "bf16"])
def test_fla_rotary_matches_torch(dtype, tol, offset):
    """Our launch of fla's rotary kernel (new outputs, no zero fill or gradient clone) against
    the torch path, and bit for bit against fla's own rotary_embedding (same kernel)."""
    from fla.modules.rotary import rotary_embedding

    from linear_moe.layers.rotary import _cos_sin

    torch.manual_seed(0)
    x = torch.randn(2, 4099, 4, 128, device="cuda")  # long enough for large angles
    dy = torch.randn_like(x)
    out = []
    for fused, inp in ((True, x.to(dtype)), (False, x)):
        leaf = inp.detach().clone().requires_grad_()
        y = apply_rotary(leaf, 10000.0, fused, offset=offset)
        y.backward(dy.to(y.dtype))
        out.append((y, leaf.grad))
    assert out[0][0].dtype == dtype
    for name, a, b in zip(["y", "dx"], out[0], out[1]):
        err = rel_err(a.float(), b)
        _record("rotary", f"{str(dtype)[6:]}/offset={offset}", 128, name, err)
        assert err <= tol, (name, err)
    leaf = x.to(dtype).requires_grad_()
    cos, sin = (t[offset:] for t in _cos_sin(x.shape[1] + offset, 128, 10000.0, x.device, dtype))
    y = rotary_embedding(leaf, cos, sin)
    y.backward(dy.to(dtype))
    assert torch.equal(y, out[0][0]) and torch.equal(leaf.grad, out[0][1])


def test_swap_leading_dims_on_cuda():
    """The mixers' [s, b, h] <-> [b, s, h] copy on CUDA (rows moved as 16-byte elements)."""
    from linear_moe.layers.layout import swap_leading_dims

    x = torch.randn(257, 3, 1536, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = swap_leading_dims(x)
    assert y.is_contiguous() and torch.equal(y, x.transpose(0, 1).contiguous())
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad.transpose(0, 1))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)],
                         ids=["fp32", "bf16"])
def test_swiglu_linear_matches_torch(dtype, tol):
    """--mlp-act-recompute's _SwiGLULinear on CUDA (megatron-core's compiled swiglu forward,
    our compiled activation + gradient pass in backward) against fp32 torch autograd."""
    from linear_moe.layers.mlp import _SwiGLULinear

    torch.manual_seed(0)
    h = torch.randn(301, 2, 2 * 352, device="cuda")
    weight = torch.randn(128, 352, device="cuda") / 352 ** 0.5
    dy = torch.randn(301, 2, 128, device="cuda")
    outs = []
    for run_dtype in (dtype, torch.float32):
        hi, wi = (t.to(run_dtype).requires_grad_() for t in (h, weight))
        if run_dtype == dtype:
            y = _SwiGLULinear.apply(hi, wi)
        else:
            a, b = hi.chunk(2, -1)
            y = torch.nn.functional.linear(torch.nn.functional.silu(a) * b, wi)
        y.backward(dy.to(run_dtype))
        outs.append([y, hi.grad, wi.grad])
    for name, a, b in zip(["y", "dh", "dweight"], *outs):
        assert a.dtype == dtype
        err = rel_err(a.float(), b)
        _record("swiglu_linear", str(dtype)[6:], 352, name, err)
        assert err <= tol, (name, err)


def test_transposed_view_gemms_copy_nothing_on_cuda():
    """layout's GEMMs on CUDA: the in-projection reading the transposed view of [s, b, h], its
    input gradient written in that layout, and o_proj writing [s, b] order (linear_to_seq_first,
    forward and backward, its weight gradient from per-sequence partials): no copy of an
    activation (no aten copy / clone / contiguous of a tensor with the s dim, also none inside
    bmm), and equal to the GEMMs on contiguous copies."""
    from torch.profiler import ProfilerActivity, profile

    from linear_moe.layers.layout import linear_rows, linear_to_seq_first, matmul_into

    torch.manual_seed(0)
    s, b, h, n = 2048, 4, 1024, 768
    x_sb = torch.randn(s, b, h, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, h, device="cuda") / h ** 0.5).to(torch.bfloat16)
    wo = (torch.randn(h, n, device="cuda") / n ** 0.5).to(torch.bfloat16).requires_grad_()
    x = x_sb.transpose(0, 1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 record_shapes=True) as prof:
        y = linear_rows(x, w)
        gx = matmul_into(torch.empty_like(x), y, w)
        o = y.detach().requires_grad_()
        out = linear_to_seq_first(o, wo)
        out.backward(x_sb)
        torch.cuda.synchronize()
    copy_ops = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy")
    copies = [(e.name, e.input_shapes) for e in prof.events() if e.name in copy_ops
              and any(s in shape for shape in e.input_shapes if shape)]
    assert not copies, copies
    assert any(e.name == "aten::bmm" for e in prof.events())
    xc = x.contiguous()
    ref_y = xc @ w.t()
    assert rel_err(y.float(), ref_y.float()) <= 1e-2
    assert gx.stride() == x.stride() and rel_err(gx.float(), (ref_y @ w).float()) <= 1e-2
    ref_out = (o @ wo.t()).transpose(0, 1)
    assert out.is_contiguous() and rel_err(out.float(), ref_out.float()) <= 1e-2
    ref_gw = x_sb.transpose(0, 1).reshape(-1, h).t().float() @ o.reshape(-1, n).float()
    assert rel_err(wo.grad.float(), ref_gw) <= 1e-2


@pytest.mark.parametrize("clamp_min", [None, -0.5])
def test_gla_log_decay_compiled_matches_eager(clamp_min):
    """GLA's compiled log decay (one inductor pass each way) against the eager ops in fp32,
    forward and backward, in bf16 within the suite's bound. Both read the same bf16 values:
    the clamp's gradient is 0 or ~dy / 16, so z's own bf16 rounding across the clamp (~0.1% of
    z ~ N(0, 16) lie that near -8) alone is a 2.5e-2 error (H200, fourteenth session)."""
    from linear_moe.mixers.gla import _log_decay, _log_decay_cuda

    torch.manual_seed(0)
    z = (torch.randn(2, 513, 8, 64, device="cuda") * 4).bfloat16().float()
    dy = torch.randn_like(z).bfloat16().float()
    runs = []
    for fn, dtype in ((_log_decay_cuda, torch.bfloat16), (_log_decay, torch.float32)):
        zi = z.to(dtype).requires_grad_()
        y = fn(zi, 16.0, clamp_min)
        y.backward(dy.to(dtype))
        runs.append((y, zi.grad))
    for a, b in zip(*runs):
        assert rel_err(a.float(), b) <= 1e-2


def test_gdn_log_decay_compiled_matches_eager_and_keeps_only_its_inputs():
    """GDN's compiled log decay -exp(A_log) softplus(a + dt_bias) equals the eager ops (fp32, both
    from the same bf16 a), forward and all three gradients, and keeps for backward only its
    inputs (a bf16 slice of the in-projection's output, the two per-head parameters), where
    eager kept two fp32 [tokens, heads] tensors."""
    from linear_moe.mixers.gated_deltanet import _log_decay, _log_decay_cuda

    torch.manual_seed(0)
    fused = (torch.randn(2, 513, 40, device="cuda") * 3).bfloat16()
    A_log, dt_bias = torch.randn(8, device="cuda"), torch.randn(8, device="cuda")
    dy = torch.randn(2, 513, 8, device="cuda")
    runs, kept = [], []
    for fn in (_log_decay_cuda, _log_decay):
        grads, saved = run_and_record_saved(fn, (fused, A_log, dt_bias), dy,
                                            call=lambda f, t: f(t[0][..., 32:40], t[1], t[2]))
        runs.append(grads)
        kept.append(saved)
    assert all(dtype == torch.bfloat16 or len(shape) == 1 for shape, dtype in kept[0]), kept[0]
    for a, b in zip(*runs):
        assert rel_err(a.float(), b.float()) <= 1e-5
