"""RWKV-6 and RWKV-7 reference ops against step-by-step loops of their recurrences (fp64 oracle,
fp32 op): outputs, final states, gradients, initial states, packed sequences, strong decays."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from linear_moe.ops import rwkv6, rwkv7

gla_module = importlib.import_module("linear_moe.ops.gla")

ATOL = 1e-5
B, H, K, V = 2, 2, 16, 8
T_VALUES = (1, 37, 64, 150)
CHUNKS = (16, 64)
CU_SEQLENS = torch.tensor([0, 5, 75, 75, 150])  # includes an empty sequence


def max_err(a, b):
    assert a.shape == b.shape
    return (a.double() - b.double()).abs().amax().item() if a.numel() else 0.0


# ---------------------------------------------------------------- oracles

def rwkv6_oracle(r, k, v, w, u, scale, h0=None):
    """o_t = scale r_t (S_{t-1} + diag(u) k_t^T v_t) ; S_t = diag(exp(w_t)) S_{t-1} + k_t^T v_t."""
    r, k, v, w, u = (x.double() for x in (r, k, v, w, u))
    Bq, T, Hq, Kq = r.shape
    S = torch.zeros(Bq, Hq, Kq, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double()
    outs = [S.new_zeros(Bq, 0, Hq, v.shape[-1])]
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", r[:, t], S + u[:, :, None] * kv)[:, None])
        S = w[:, t].exp()[..., None] * S + kv
    return torch.cat(outs, 1), S


def rwkv7_oracle(r, w, k, v, a, b, scale, h0=None):
    """S_t = (diag(exp(w_t)) + b_t^T a_t) S_{t-1} + k_t^T v_t ; o_t = scale r_t S_t."""
    r, w, k, v, a, b = (x.double() for x in (r, w, k, v, a, b))
    Bq, T, Hq, Kq = r.shape
    S = torch.zeros(Bq, Hq, Kq, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double()
    outs = [S.new_zeros(Bq, 0, Hq, v.shape[-1])]
    for t in range(T):
        transition = torch.diag_embed(w[:, t].exp()) + b[:, t, :, :, None] * a[:, t, :, None, :]
        S = transition @ S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", r[:, t], S)[:, None])
    return torch.cat(outs, 1), S


# ---------------------------------------------------------------- inputs

def rwkv6_inputs(T, *, max_decay=1.0, batch=B, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r, k = (torch.randn(batch, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(batch, T, H, V, generator=gen)
    w = -max_decay * torch.rand(batch, T, H, K, generator=gen)
    u = torch.randn(H, K, generator=gen)
    h0 = torch.randn(batch, H, K, V, generator=gen)
    return r, k, v, w, u, h0


def rwkv7_inputs(T, *, max_decay=0.6065, batch=B, seed=0):
    """As RWKV-7's layer makes them: a = -kk, b = kk * a_gate, kk unit-norm, a_gate in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    r, k = (torch.randn(batch, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(batch, T, H, V, generator=gen)
    w = -max_decay * torch.rand(batch, T, H, K, generator=gen)
    kk = F.normalize(torch.randn(batch, T, H, K, generator=gen), dim=-1)
    a_gate = torch.rand(batch, T, H, K, generator=gen)
    h0 = torch.randn(batch, H, K, V, generator=gen)
    return r, w, k * K**-0.5, v, -kk, kk * a_gate, h0


# ---------------------------------------------------------------- RWKV-6

@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_rwkv6_matches_oracle(T, chunk, with_h0):
    r, k, v, w, u, h0 = rwkv6_inputs(T)
    h0 = h0 if with_h0 else None
    o, ht = rwkv6(r, k, v, w, u, initial_state=h0, output_final_state=True, chunk_size=chunk)
    o_ref, ht_ref = rwkv6_oracle(r, k, v, w, u, K**-0.5, h0)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    assert o.shape == (B, T, H, V) and ht.shape == (B, H, K, V)
    assert max_err(o, o_ref) <= ATOL and max_err(ht, ht_ref) <= ATOL


@pytest.mark.parametrize("chunk", CHUNKS)
def test_rwkv6_strong_decay_and_custom_scale(chunk):
    # fla's layer passes w = -exp(.), unbounded below: -8 per step sums to -512 over a chunk
    r, k, v, w, u, h0 = rwkv6_inputs(150, max_decay=8.0)
    w[:, 40:60] = 0.0  # no decay right after strong ones: needs cancellation-free sums
    o, ht = rwkv6(r, k, v, w, u, scale=1.0, initial_state=h0, output_final_state=True,
                  chunk_size=chunk)
    o_ref, ht_ref = rwkv6_oracle(r, k, v, w, u, 1.0, h0)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert max_err(o, o_ref) <= ATOL and max_err(ht, ht_ref) <= ATOL


def test_rwkv6_varlen_equals_separate_sequences():
    r, k, v, w, u, _ = rwkv6_inputs(150, batch=1)
    h0 = torch.randn(4, H, K, V)
    o, ht = rwkv6(r, k, v, w, u, initial_state=h0, output_final_state=True,
                  cu_seqlens=CU_SEQLENS, chunk_size=16)
    for n, (s, e) in enumerate(zip(CU_SEQLENS[:-1].tolist(), CU_SEQLENS[1:].tolist())):
        o_ref, ht_ref = rwkv6_oracle(r[:, s:e], k[:, s:e], v[:, s:e], w[:, s:e], u, K**-0.5,
                                     h0[n:n + 1])
        assert max_err(o[:, s:e], o_ref) <= ATOL and max_err(ht[n:n + 1], ht_ref) <= ATOL


# ---------------------------------------------------------------- RWKV-7

@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_rwkv7_matches_oracle(T, chunk, with_h0):
    r, w, k, v, a, b, h0 = rwkv7_inputs(T)
    h0 = h0 if with_h0 else None
    o, ht = rwkv7(r, w, k, v, a, b, initial_state=h0, output_final_state=True, chunk_size=chunk)
    o_ref, ht_ref = rwkv7_oracle(r, w, k, v, a, b, 1.0, h0)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    assert o.shape == (B, T, H, V) and ht.shape == (B, H, K, V)
    assert max_err(o, o_ref) <= ATOL and max_err(ht, ht_ref) <= ATOL


@pytest.mark.parametrize("chunk", CHUNKS)
def test_rwkv7_strong_decay_and_custom_scale(chunk):
    r, w, k, v, a, b, h0 = rwkv7_inputs(150, max_decay=8.0)
    w[:, 40:60] = 0.0
    o, ht = rwkv7(r, w, k, v, a, b, scale=0.25, initial_state=h0, output_final_state=True,
                  chunk_size=chunk)
    o_ref, ht_ref = rwkv7_oracle(r, w, k, v, a, b, 0.25, h0)
    assert torch.isfinite(o).all() and torch.isfinite(ht).all()
    assert max_err(o, o_ref) <= ATOL and max_err(ht, ht_ref) <= ATOL


def test_rwkv7_varlen_equals_separate_sequences():
    r, w, k, v, a, b, _ = rwkv7_inputs(150, batch=1)
    h0 = torch.randn(4, H, K, V)
    o, ht = rwkv7(r, w, k, v, a, b, initial_state=h0, output_final_state=True,
                  cu_seqlens=CU_SEQLENS, chunk_size=16)
    for n, (s, e) in enumerate(zip(CU_SEQLENS[:-1].tolist(), CU_SEQLENS[1:].tolist())):
        o_ref, ht_ref = rwkv7_oracle(*(x[:, s:e] for x in (r, w, k, v, a, b)), 1.0, h0[n:n + 1])
        assert max_err(o[:, s:e], o_ref) <= ATOL and max_err(ht[n:n + 1], ht_ref) <= ATOL


# ---------------------------------------------------------------- gradients

def _grads(fn, inputs, do, dht):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, ht = fn(*leaves)
    torch.autograd.backward([o, ht], [do.to(o.dtype), dht.to(ht.dtype)])
    return [x.grad for x in leaves]


@pytest.mark.parametrize("max_decay", [1.0, 8.0])
def test_rwkv6_grads_match_oracle(max_decay):
    inputs = rwkv6_inputs(45, max_decay=max_decay)
    do, dht = torch.randn(B, 45, H, V), torch.randn(B, H, K, V)
    ours = _grads(lambda *x: rwkv6(*x[:5], initial_state=x[5], output_final_state=True,
                                   chunk_size=16), inputs, do, dht)
    ref = _grads(lambda *x: rwkv6_oracle(*x[:5], K**-0.5, x[5]), [x.double() for x in inputs],
                 do, dht)
    for name, a, b in zip(("r", "k", "v", "w", "u", "h0"), ours, ref):
        assert torch.isfinite(a).all(), name
        assert max_err(a, b) <= ATOL, name


def test_rwkv7_grads_match_oracle():
    inputs = rwkv7_inputs(45)
    do, dht = torch.randn(B, 45, H, V), torch.randn(B, H, K, V)
    ours = _grads(lambda *x: rwkv7(*x[:6], initial_state=x[6], output_final_state=True,
                                   chunk_size=16), inputs, do, dht)
    ref = _grads(lambda *x: rwkv7_oracle(*x[:6], 1.0, x[6]), [x.double() for x in inputs],
                 do, dht)
    for name, a, b in zip(("r", "w", "k", "v", "a", "b", "h0"), ours, ref):
        assert torch.isfinite(a).all(), name
        assert max_err(a, b) <= ATOL, name


def test_gradcheck_fp64(monkeypatch):
    monkeypatch.setattr(gla_module, "_SUB_CHUNK", 2)  # 4 sub-blocks per 8-chunk: every decay path
    gen = torch.Generator().manual_seed(1)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    r, k, w = rand(1, 11, 1, 3), rand(1, 11, 1, 3), -F.softplus(rand(1, 11, 1, 3))
    v, u, h0 = rand(1, 11, 1, 2), rand(1, 3), rand(1, 1, 3, 2)

    def fn6(*x):
        return rwkv6(*x[:5], initial_state=x[5], output_final_state=True, chunk_size=8)

    assert torch.autograd.gradcheck(fn6, [x.requires_grad_() for x in (r, k, v, w, u, h0)])
    kk = F.normalize(rand(1, 11, 1, 3), dim=-1)
    a, b = -kk, kk * torch.rand(1, 11, 1, 3, generator=gen, dtype=torch.float64)

    def fn7(*x):
        return rwkv7(*x[:6], initial_state=x[6], output_final_state=True, chunk_size=8)

    leaves = [x.detach().requires_grad_() for x in (r, w, k, v, a, b, h0)]
    assert torch.autograd.gradcheck(fn7, leaves)


# ---------------------------------------------------------------- API

def test_final_state_only_on_request_and_low_precision_output():
    r, k, v, w, u, _ = rwkv6_inputs(5)
    assert rwkv6(r, k, v, w, u)[1] is None
    o, _ = rwkv6(r.bfloat16(), k.bfloat16(), v.bfloat16(), w, u)
    assert o.dtype == torch.bfloat16
    r, w, k, v, a, b, _ = rwkv7_inputs(5)
    assert rwkv7(r, w, k, v, a, b)[1] is None
    assert rwkv7(r.bfloat16(), w, k, v, a, b)[0].dtype == torch.bfloat16


def test_shape_errors_and_cpu_fla_refused():
    r, k, v, w, u, _ = rwkv6_inputs(4)
    with pytest.raises(ValueError, match=r"u \[H, K\]"):
        rwkv6(r, k, v, w, u[0])
    with pytest.raises(ValueError, match="move to CUDA"):
        rwkv6(r, k, v, w, u, backend="fla")
    r, w, k, v, a, b, _ = rwkv7_inputs(4)
    with pytest.raises(ValueError, match="r, w, k, a, b"):
        rwkv7(r, w, k, v, a[..., :3], b)
    with pytest.raises(ValueError, match="valid modes"):
        rwkv7(r, w, k, v, a, b, mode="parallel")


def test_fla_backwards_avoid_the_hopper_guarded_kernel():
    """The ops do not route through fla_compat because neither fla backward calls
    chunk_o.chunk_bwd_dqkwg (fla #640); read the installed sources to keep that true."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        pytest.skip("fla not installed")
    ops = Path(spec.origin).parent / "ops"
    sources = [ops / "rwkv6" / "chunk.py", ops / "rwkv7" / "chunk.py",
               *(ops / "generalized_delta_rule" / "dplr").glob("*.py")]
    for path in sources:
        assert "chunk_bwd_dqkwg" not in path.read_text(), path
    assert "chunk_dplr_delta_rule" in (ops / "rwkv7" / "chunk.py").read_text()


# ---------------------------------------------------------------- the mixers

def _causality_worker(rank, world_size):
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    from test_tp_parity import _config

    from linear_moe.registry import get_mixer

    mpu.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    changed = {}
    for name in ("rwkv6", "rwkv7"):
        torch.manual_seed(0)
        mixer = get_mixer(name).builder(_config(name, 1, False), layer_number=1)
        x = torch.randn(20, 2, 64)  # [s, b, h]
        y = x.clone()
        y[11, 1] += 1.0  # perturb one token of one sequence
        with torch.no_grad():
            diff = (mixer(y)[0] - mixer(x)[0]).abs().amax(-1)  # [s, b]
        changed[name] = diff.gt(1e-6).nonzero().tolist()
    mpu.destroy_model_parallel()
    return changed


@pytest.mark.slow
def test_mixers_are_causal_per_sequence():
    """Token shift and the recurrence see only the past: a change at step 11 of one sequence
    reaches steps 11.. of that sequence and nothing else."""
    from dist_utils import run_distributed

    for name, changed in run_distributed(_causality_worker, 1)[0].items():
        assert changed == [[t, 1] for t in range(11, 20)], name
