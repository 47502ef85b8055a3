"""CPU tests of the reference ops against step-by-step loop oracles (fp64).

The oracles below are the recurrences written out one time step at a time,
independently of the chunked code under test.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from linear_moe.ops import fla_compat, gated_delta_rule, gla, resolve_backend

gla_module = importlib.import_module("linear_moe.ops.gla")  # the attribute `gla` is the function

ATOL = 1e-5
B, H, K, V = 2, 2, 16, 8
T_VALUES = (1, 37, 64, 128, 150)
CHUNKS = (16, 64)


# ---------------------------------------------------------------- oracles

def gla_oracle(q, k, v, gk, scale, h0=None):
    """S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t ; o_t = scale q_t S_t (fp64)."""
    q, k, v, gk = (x.double() for x in (q, k, v, gk))
    Bq, T, Hq, Kq = q.shape
    S = torch.zeros(Bq, Hq, Kq, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double()
    outs = [S.new_zeros(Bq, 0, Hq, v.shape[-1])]  # keeps T == 0 valid
    for t in range(T):
        S = gk[:, t].exp()[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)[:, None])
    return torch.cat(outs, 1), S


def gdn_oracle(q, k, v, g, beta, scale, h0=None, l2norm=True):
    """S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t ; o_t = scale q_t S_t (fp64)."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    if l2norm:  # fla's in-kernel form: x / sqrt(sum x^2 + 1e-6)
        q = q / (q.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
        k = k / (k.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    Bq, T, Hq, Kq = q.shape
    S = torch.zeros(Bq, Hq, Kq, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double()
    eye = torch.eye(Kq, dtype=torch.float64)
    outs = [S.new_zeros(Bq, 0, Hq, v.shape[-1])]
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        transition = eye - bt * kt[..., :, None] * kt[..., None, :]
        S = g[:, t].exp()[..., None, None] * (transition @ S) + bt * kt[..., :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)[:, None])
    return torch.cat(outs, 1), S


# ---------------------------------------------------------------- inputs

def gla_inputs(T, *, max_decay=1.0, batch=B, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, T, H, K, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, T, H, V, generator=gen, dtype=dtype)
    gk = -max_decay * torch.rand(batch, T, H, K, generator=gen, dtype=dtype)  # uniform in [-max_decay, 0]
    h0 = torch.randn(batch, H, K, V, generator=gen, dtype=dtype)
    return q, k, v, gk, h0


def gdn_inputs(T, *, max_decay=1.0, batch=B, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, T, H, K, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, T, H, V, generator=gen, dtype=dtype)
    g = -max_decay * torch.rand(batch, T, H, generator=gen, dtype=dtype)
    beta = torch.rand(batch, T, H, generator=gen, dtype=dtype)
    h0 = torch.randn(batch, H, K, V, generator=gen, dtype=dtype)
    return q, k, v, g, beta, h0


def max_err(a, b):
    assert a.shape == b.shape
    return (a.double() - b.double()).abs().amax().item() if a.numel() else 0.0


# ---------------------------------------------------------------- forward parity

@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_gla_matches_oracle(T, chunk, with_h0):
    q, k, v, gk, h0 = gla_inputs(T)
    h0 = h0 if with_h0 else None
    o, ht = gla(q, k, v, gk, initial_state=h0, output_final_state=True, chunk_size=chunk)
    o_ref, ht_ref = gla_oracle(q, k, v, gk, K**-0.5, h0)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    assert o.shape == (B, T, H, V) and ht.shape == (B, H, K, V)
    assert max_err(o, o_ref) <= ATOL
    assert max_err(ht, ht_ref) <= ATOL


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_gdn_matches_oracle(T, chunk, with_h0):
    q, k, v, g, beta, h0 = gdn_inputs(T)
    h0 = h0 if with_h0 else None
    o, ht = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk)
    o_ref, ht_ref = gdn_oracle(q, k, v, g, beta, K**-0.5, h0)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    assert max_err(o, o_ref) <= ATOL
    assert max_err(ht, ht_ref) <= ATOL


def test_gdn_without_l2norm_and_custom_scale():
    q, k, v, g, beta, h0 = gdn_inputs(37)
    k = F.normalize(k, dim=-1)  # the delta rule is only stable for |k| <= ~1
    o, ht = gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=h0, output_final_state=True,
                             use_qk_l2norm=False, chunk_size=16)
    o_ref, ht_ref = gdn_oracle(q, k, v, g, beta, 0.3, h0, l2norm=False)
    assert max_err(o, o_ref) <= ATOL and max_err(ht, ht_ref) <= ATOL


def test_final_state_only_on_request():
    q, k, v, gk, _ = gla_inputs(5)
    assert gla(q, k, v, gk)[1] is None
    q, k, v, g, beta, _ = gdn_inputs(5)
    assert gated_delta_rule(q, k, v, g, beta)[1] is None


def test_low_precision_inputs_give_output_in_input_dtype():
    q, k, v, gk, h0 = gla_inputs(37)
    o, ht = gla(q.bfloat16(), k.bfloat16(), v.bfloat16(), gk.bfloat16(), initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    o_ref, _ = gla_oracle(q.bfloat16(), k.bfloat16(), v.bfloat16(), gk.bfloat16(), K**-0.5, h0)
    assert max_err(o, o_ref) <= 0.05  # bf16 rounding of the output only


# ---------------------------------------------------------------- strong decays

@pytest.mark.parametrize("chunk", CHUNKS)
def test_gla_strong_decay_is_stable(chunk):
    # -8 per step sums to -512 over a 64-chunk: exp(-cumsum) would overflow fp32
    q, k, v, gk, h0 = gla_inputs(150, max_decay=8.0)
    gk[:, 40:60] = 0.0  # a span of no decay right after strong ones: needs cancellation-free sums
    o, ht = gla(q, k, v, gk, initial_state=h0, output_final_state=True, chunk_size=chunk)
    o_ref, ht_ref = gla_oracle(q, k, v, gk, K**-0.5, h0)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert max_err(o, o_ref) <= ATOL and max_err(ht, ht_ref) <= ATOL


@pytest.mark.parametrize("chunk", CHUNKS)
def test_gdn_strong_decay_is_stable(chunk):
    q, k, v, g, beta, h0 = gdn_inputs(150, max_decay=8.0)
    g[:, 40:60] = 0.0
    o, ht = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk)
    o_ref, ht_ref = gdn_oracle(q, k, v, g, beta, K**-0.5, h0)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert max_err(o, o_ref) <= ATOL and max_err(ht, ht_ref) <= ATOL


# ---------------------------------------------------------------- varlen

CU_SEQLENS = torch.tensor([0, 5, 75, 75, 150])  # includes an empty sequence


def test_gla_varlen_equals_separate_sequences():
    q, k, v, gk, _ = gla_inputs(150, batch=1)
    h0 = torch.randn(4, H, K, V)
    o, ht = gla(q, k, v, gk, initial_state=h0, output_final_state=True, cu_seqlens=CU_SEQLENS, chunk_size=16)
    for n, (s, e) in enumerate(zip(CU_SEQLENS[:-1].tolist(), CU_SEQLENS[1:].tolist())):
        o_n, ht_n = gla(q[:, s:e], k[:, s:e], v[:, s:e], gk[:, s:e], initial_state=h0[n:n + 1],
                        output_final_state=True, chunk_size=16)
        o_ref, ht_ref = gla_oracle(q[:, s:e], k[:, s:e], v[:, s:e], gk[:, s:e], K**-0.5, h0[n:n + 1])
        assert torch.equal(o[:, s:e], o_n) and torch.equal(ht[n:n + 1], ht_n)
        assert max_err(o_n, o_ref) <= ATOL and max_err(ht_n, ht_ref) <= ATOL


def test_gdn_varlen_equals_separate_sequences():
    q, k, v, g, beta, _ = gdn_inputs(150, batch=1)
    h0 = torch.randn(4, H, K, V)
    o, ht = gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                             cu_seqlens=CU_SEQLENS, chunk_size=16)
    for n, (s, e) in enumerate(zip(CU_SEQLENS[:-1].tolist(), CU_SEQLENS[1:].tolist())):
        o_n, ht_n = gated_delta_rule(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e],
                                     initial_state=h0[n:n + 1], output_final_state=True, chunk_size=16)
        o_ref, ht_ref = gdn_oracle(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], K**-0.5, h0[n:n + 1])
        assert torch.equal(o[:, s:e], o_n) and torch.equal(ht[n:n + 1], ht_n)
        assert max_err(o_n, o_ref) <= ATOL and max_err(ht_n, ht_ref) <= ATOL


def test_normalised_linear_attn_varlen_equals_separate_sequences():
    """The numerator's state and the normaliser's key sum both restart per sequence, each from
    its own initial state (packed documents, decoding a batch of them)."""
    from linear_moe.ops import linear_attn

    g = torch.Generator().manual_seed(11)
    q, k = (F.elu(torch.randn(1, 150, H, K, generator=g)) + 1 for _ in range(2))
    v = torch.randn(1, 150, H, V, generator=g)
    S0, z0 = torch.randn(4, H, K, V, generator=g), torch.rand(4, H, K, generator=g) * 5
    o, (S, z) = linear_attn(q, k, v, normalize=True, initial_state=(S0, z0),
                            output_final_state=True, cu_seqlens=CU_SEQLENS, chunk_size=16)
    for n, (s, e) in enumerate(zip(CU_SEQLENS[:-1].tolist(), CU_SEQLENS[1:].tolist())):
        o_n, (S_n, z_n) = linear_attn(q[:, s:e], k[:, s:e], v[:, s:e], normalize=True,
                                      initial_state=(S0[n:n + 1], z0[n:n + 1]),
                                      output_final_state=True, chunk_size=16)
        assert max_err(o[:, s:e], o_n) <= ATOL and max_err(S[n:n + 1], S_n) <= ATOL
        assert max_err(z[n:n + 1], z_n) <= ATOL


def test_varlen_rejects_bad_layouts():
    q, k, v, gk, _ = gla_inputs(10)
    with pytest.raises(ValueError, match="batch size 1"):
        gla(q, k, v, gk, cu_seqlens=torch.tensor([0, 10]))
    q, k, v, gk = (x[:1] for x in (q, k, v, gk))
    with pytest.raises(ValueError, match="T=10"):
        gla(q, k, v, gk, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="2 sequences"):
        gla(q, k, v, gk, cu_seqlens=torch.tensor([0, 4, 10]), initial_state=torch.zeros(3, H, K, V))


# ---------------------------------------------------------------- gradients

def _grads(fn, inputs, do, dht):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, ht = fn(*leaves)
    torch.autograd.backward([o, ht], [do.to(o.dtype), dht.to(ht.dtype)])
    return [x.grad for x in leaves]


@pytest.mark.parametrize("max_decay", [1.0, 8.0])
def test_gla_grads_match_oracle(max_decay):
    q, k, v, gk, h0 = gla_inputs(37, max_decay=max_decay)
    do, dht = torch.randn(B, 37, H, V), torch.randn(B, H, K, V)
    ours = _grads(lambda *x: gla(*x[:4], initial_state=x[4], output_final_state=True, chunk_size=16),
                  (q, k, v, gk, h0), do, dht)
    ref = _grads(lambda *x: gla_oracle(*x[:4], K**-0.5, x[4]), [x.double() for x in (q, k, v, gk, h0)], do, dht)
    for name, a, b in zip(("q", "k", "v", "gk", "h0"), ours, ref):
        assert torch.isfinite(a).all(), name
        assert max_err(a, b) <= ATOL, name


@pytest.mark.parametrize("max_decay", [1.0, 8.0])
def test_gdn_grads_match_oracle(max_decay):
    q, k, v, g, beta, h0 = gdn_inputs(37, max_decay=max_decay)
    do, dht = torch.randn(B, 37, H, V), torch.randn(B, H, K, V)
    ours = _grads(lambda *x: gated_delta_rule(*x[:5], initial_state=x[5], output_final_state=True, chunk_size=16),
                  (q, k, v, g, beta, h0), do, dht)
    ref = _grads(lambda *x: gdn_oracle(*x[:5], K**-0.5, x[5]), [x.double() for x in (q, k, v, g, beta, h0)], do, dht)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "h0"), ours, ref):
        assert torch.isfinite(a).all(), name
        assert max_err(a, b) <= ATOL, name


def test_gla_gradcheck_fp64(monkeypatch):
    monkeypatch.setattr(gla_module, "_SUB_CHUNK", 2)  # 4 sub-blocks per 8-chunk: every decay path
    gen = torch.Generator().manual_seed(1)
    q, k, gk = (torch.randn(1, 11, 1, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    v = torch.randn(1, 11, 1, 2, generator=gen, dtype=torch.float64)
    gk = -F.softplus(gk)
    h0 = torch.randn(1, 1, 3, 2, generator=gen, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (q, k, v, gk, h0)]
    fn = lambda *x: gla(*x[:4], initial_state=x[4], output_final_state=True, chunk_size=8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_gdn_gradcheck_fp64():
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 11, 1, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 11, 1, 2, generator=gen, dtype=torch.float64)
    g = -torch.rand(1, 11, 1, generator=gen, dtype=torch.float64)
    beta = torch.rand(1, 11, 1, generator=gen, dtype=torch.float64)
    h0 = torch.randn(1, 1, 3, 2, generator=gen, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]
    fn = lambda *x: gated_delta_rule(*x[:5], initial_state=x[5], output_final_state=True, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


# ---------------------------------------------------------------- dispatcher

def test_resolve_backend():
    cpu = torch.zeros(1)
    assert resolve_backend("auto", cpu) == "reference"
    assert resolve_backend("reference", cpu) == "reference"
    with pytest.raises(ValueError, match=r"use backend='reference' or move to CUDA"):
        resolve_backend("fla", cpu)
    with pytest.raises(ValueError, match="valid backends: auto, fla, reference"):
        resolve_backend("triton", cpu)


def test_ops_reject_fla_on_cpu_and_unknown_mode():
    q, k, v, gk, _ = gla_inputs(4)
    with pytest.raises(ValueError, match=r"use backend='reference' or move to CUDA") as err:
        gla(q, k, v, gk, backend="fla")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="valid modes: chunk, fused_recurrent"):
        gla(q, k, v, gk, mode="parallel")
    q, k, v, g, beta, _ = gdn_inputs(4)
    with pytest.raises(ValueError, match=r"use backend='reference' or move to CUDA"):
        gated_delta_rule(q, k, v, g, beta, backend="fla")
    with pytest.raises(ValueError, match="valid modes: chunk, fused_recurrent"):
        gated_delta_rule(q, k, v, g, beta, mode="parallel")
    with pytest.raises(ValueError, match="g, beta"):
        gated_delta_rule(q, k, v, g[..., None], beta)


def test_import_does_not_load_fla():
    code = "import sys, linear_moe.ops; assert 'fla' not in sys.modules, 'fla imported eagerly'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------- fla Hopper-guard shim (faked fla)

@pytest.fixture
def fake_fla(monkeypatch):
    """Stand-ins for the two fla modules the shim touches, with fla's guard logic."""
    chunk_o = types.ModuleType("fla.ops.common.chunk_o")
    chunk_o.TRITON_ABOVE_3_7_1 = False  # as on the lent H100 (Triton 3.6)

    def chunk_bwd_dqkwg(q, k, v, do, h, dh, w=None, g=None, **kwargs):
        if g is not None and not chunk_o.TRITON_ABOVE_3_7_1:
            raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs ... (see #640)")
        return "ran"

    consumer = types.ModuleType("fla.ops.gated_delta_rule.chunk")
    consumer.chunk_bwd_dqkwg = chunk_bwd_dqkwg
    simple_gla = types.ModuleType("fla.ops.simple_gla.chunk")  # the second consumer
    simple_gla.chunk_bwd_dqkwg = chunk_bwd_dqkwg
    monkeypatch.setitem(sys.modules, "fla.ops.common.chunk_o", chunk_o)
    monkeypatch.setitem(sys.modules, "fla.ops.gated_delta_rule.chunk", consumer)
    monkeypatch.setitem(sys.modules, "fla.ops.simple_gla.chunk", simple_gla)
    monkeypatch.delenv(fla_compat.GUARD_ENV, raising=False)
    return chunk_o, consumer


def _call_bwd(consumer, head_dim):
    k = torch.zeros(1, 1, 1, head_dim)
    return consumer.chunk_bwd_dqkwg(q=k, k=k, v=k, do=k, h=k, dh=k, g=torch.zeros(1))


def test_hopper_shim_lifts_only_proven_dims(fake_fla):
    chunk_o, consumer = fake_fla
    fla_compat.install_hopper_guard_shim()
    fla_compat.install_hopper_guard_shim()  # idempotent: wrapped once
    assert not getattr(consumer.chunk_bwd_dqkwg.__wrapped__, fla_compat._SHIM_ATTR, False)
    for head_dim in (64, 96, 128):
        assert _call_bwd(consumer, head_dim) == "ran"
        assert chunk_o.TRITON_ABOVE_3_7_1 is False  # restored after the call
    with pytest.raises(RuntimeError, match="#640"):
        _call_bwd(consumer, 32)
    # simple_gla's data-dependent-gate backward is proven at 64 and 128 only: guard kept elsewhere
    simple_gla = sys.modules["fla.ops.simple_gla.chunk"]
    for head_dim in (64, 128):
        assert _call_bwd(simple_gla, head_dim) == "ran"
    for head_dim in (32, 96):
        with pytest.raises(RuntimeError, match="#640"):
            _call_bwd(simple_gla, head_dim)
    # positional k works too
    k = torch.zeros(1, 1, 1, 64)
    assert consumer.chunk_bwd_dqkwg(k, k, k, k, k, k, None, torch.zeros(1)) == "ran"


def test_hopper_shim_env_policies(fake_fla, monkeypatch):
    _, consumer = fake_fla
    fla_compat.install_hopper_guard_shim()
    monkeypatch.setenv(fla_compat.GUARD_ENV, "keep")
    with pytest.raises(RuntimeError, match="#640"):
        _call_bwd(consumer, 64)
    monkeypatch.setenv(fla_compat.GUARD_ENV, "lift_all")
    assert _call_bwd(consumer, 32) == "ran"
    monkeypatch.setenv(fla_compat.GUARD_ENV, "bogus")
    with pytest.raises(ValueError, match="keep"):
        _call_bwd(consumer, 64)


def test_hopper_shim_targets_real_fla_names():
    """Read (not import: Triton import is slow) the installed fla sources the shim relies on."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("fla not installed")
    root = Path(spec.origin).parent / "ops"
    chunk_o = (root / "common" / "chunk_o.py").read_text()
    assert "def chunk_bwd_dqkwg(" in chunk_o
    assert "IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1" in chunk_o
    assert "import chunk_bwd_dqkwg" in (root / "gated_delta_rule" / "chunk.py").read_text()
    assert "chunk_bwd_dqkwg" in (root / "simple_gla" / "chunk.py").read_text()
    assert "chunk_bwd_dqkwg" not in (root / "gla" / "chunk.py").read_text()  # chunk_gla: own backward
