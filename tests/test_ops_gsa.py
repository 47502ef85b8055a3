"""Gated Slot Attention: the chunked reference op against a step-by-step loop of the paper's
recurrence (fp64 oracle, fp32 op), against fla's own naive_recurrent_gsa, and the layer
against fla's GatedSlotAttention forward written out in plain torch."""

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from linear_moe.ops import gsa

TOL = 1e-5


def gsa_oracle(q, k, v, s, g, scale, h0=None):
    """Zhang et al. 2024, per head, in the paper's orientation (slots x features):
        K~_t = diag(alpha_t) K~_{t-1} + s_t k_t^T,  V~_t = diag(alpha_t) V~_{t-1} + s_t v_t^T
        o_t  = V~_t^T softmax(scale K~_t q_t),      alpha_t = exp(g_t)
    Returns o and the final states in the op's layout (K~^T [K, M], V~ [M, V])."""
    q, k, v, s, g = (x.double() for x in (q, k, v, s, g))
    B, T, H, K = q.shape
    M, V = s.shape[-1], v.shape[-1]
    if h0 is None:
        Kt, Vt = (torch.zeros(B, H, M, d, dtype=torch.float64) for d in (K, V))
    else:
        Kt, Vt = h0[0].double().transpose(-1, -2), h0[1].double()
    out = []
    for t in range(T):
        alpha, st = g[:, t].exp()[..., None], s[:, t, :, :, None]
        Kt = alpha * Kt + st * k[:, t, :, None, :]
        Vt = alpha * Vt + st * v[:, t, :, None, :]
        p = (scale * torch.einsum("bhmk,bhk->bhm", Kt, q[:, t])).softmax(-1)
        out.append(torch.einsum("bhmv,bhm->bhv", Vt, p))
    o = torch.stack(out, 1) if out else v.new_zeros(B, 0, H, V)
    return o, (Kt.transpose(-1, -2), Vt)


def _inputs(T, K=8, V=6, M=5, H=3, B=2, seed=0, gate_scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, M, generator=gen) * gate_scale)
    s = -torch.expm1(g)  # the layer's write strength 1 - alpha_t
    h0 = (torch.randn(B, H, K, M, generator=gen), torch.randn(B, H, M, V, generator=gen))
    return q, k, v, s, g, h0


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("T", [1, 37, 64, 150])
@pytest.mark.parametrize("chunk", [16, 64])
def test_gsa_matches_recurrence(T, chunk):
    q, k, v, s, g, h0 = _inputs(T)
    o, (hk, hv) = gsa(q, k, v, s, g, initial_state=h0, output_final_state=True,
                      chunk_size=chunk)
    o_ref, (hk_ref, hv_ref) = gsa_oracle(q, k, v, s, g, 8 ** -0.5, h0)
    assert o.dtype == torch.float32 and hk.shape == (2, 3, 8, 5) and hv.shape == (2, 3, 5, 6)
    assert max(_max_err(o, o_ref), _max_err(hk, hk_ref), _max_err(hv, hv_ref)) < TOL


def test_gsa_free_slot_writes_and_strong_decay():
    """s need not be 1 - alpha, and a near-total forget (log decays down to -60 per step)
    stays finite: every decay exponent the op forms is a sum of g terms, never positive."""
    q, k, v, _, _, h0 = _inputs(70, seed=1)
    gen = torch.Generator().manual_seed(2)
    g = -torch.rand(2, 70, 3, 5, generator=gen) * 60
    s = torch.rand(2, 70, 3, 5, generator=gen)
    o, (hk, hv) = gsa(q, k, v, s, g, initial_state=h0, output_final_state=True, chunk_size=32)
    o_ref, (hk_ref, hv_ref) = gsa_oracle(q, k, v, s, g, 8 ** -0.5, h0)
    assert torch.isfinite(o).all()
    assert max(_max_err(o, o_ref), _max_err(hk, hk_ref), _max_err(hv, hv_ref)) < TOL


def test_gsa_grads_match_recurrence():
    q, k, v, s, g, (hk0, hv0) = _inputs(45)
    leaves = [x.requires_grad_() for x in (q, k, v, s, g, hk0, hv0)]

    def loss(o, states):  # reach the outputs and both final states
        return o.square().sum() + states[0].sin().sum() + states[1].cos().sum()

    loss(*gsa(*leaves[:5], initial_state=tuple(leaves[5:]), output_final_state=True,
              chunk_size=16)).backward()
    grads = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    loss(*gsa_oracle(*leaves[:5], 8 ** -0.5, tuple(leaves[5:]))).backward()
    for name, a, x in zip(("q", "k", "v", "s", "g", "hk0", "hv0"), grads, leaves):
        assert _max_err(a, x.grad) < TOL * max(1.0, x.grad.abs().max().item()), name


def test_gsa_packed_sequences_match_separate_runs():
    q, k, v, s, g, _ = _inputs(90, B=1)
    bounds = [0, 17, 17, 64, 90]  # includes an empty sequence
    gen = torch.Generator().manual_seed(4)
    h0 = (torch.randn(4, 3, 8, 5, generator=gen), torch.randn(4, 3, 5, 6, generator=gen))
    o, (hk, hv) = gsa(q, k, v, s, g, initial_state=h0, output_final_state=True,
                      cu_seqlens=torch.tensor(bounds), chunk_size=16)
    for n, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = [x[:, a:b] for x in (q, k, v, s, g)]
        o_ref, (hk_ref, hv_ref) = gsa_oracle(*part, 8 ** -0.5, (h0[0][n:n + 1], h0[1][n:n + 1]))
        if b > a:
            assert _max_err(o[:, a:b], o_ref) < TOL
        assert max(_max_err(hk[n:n + 1], hk_ref), _max_err(hv[n:n + 1], hv_ref)) < TOL


def test_gsa_matches_fla_naive_recurrence():
    """Same semantics as fla's own CPU oracle (naive_recurrent_gsa), scale included."""
    naive = pytest.importorskip("fla.ops.gsa.naive").naive_recurrent_gsa
    q, k, v, s, g, h0 = _inputs(50)
    o, (hk, hv) = gsa(q, k, v, s, g, scale=0.7, initial_state=h0, output_final_state=True,
                      chunk_size=16)
    o_ref, (hk_ref, hv_ref) = naive(q, k, v, s, g, scale=0.7, initial_state=h0,
                                    output_final_state=True)
    assert max(_max_err(o, o_ref), _max_err(hk, hk_ref), _max_err(hv, hv_ref)) < 1e-4


def test_gsa_rejects_mismatched_shapes():
    q, k, v, s, g, _ = _inputs(4)
    with pytest.raises(ValueError, match=r"s, g \[B, T, H, M\]"):
        gsa(q, k, v, s, g[..., :4])


def _layer_worker(rank, world_size):
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.enums import AttnMaskType

    from linear_moe.config import LinearMoEConfig, resolve_mixer_defaults
    from linear_moe.mixers.gsa import GSAMixer

    mpu.initialize_model_parallel(1)
    config = LinearMoEConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                             params_dtype=torch.float32, use_cpu_initialization=True,
                             normalization="RMSNorm", add_bias_linear=False,
                             gradient_accumulation_fusion=False, la_module="gsa",
                             la_num_heads=2, la_chunk_size=8, la_gsa_num_slots=6,
                             la_use_short_conv=True)
    resolve_mixer_defaults(config)
    torch.manual_seed(0)
    mixer = GSAMixer(config, layer_number=1, attn_mask_type=AttnMaskType.causal)
    with torch.no_grad():
        mixer.norm_weight.uniform_(0.5, 1.5)  # a non-trivial per-channel weight
    x = torch.randn(21, 3, 32)  # [s, b, h]
    out = mixer(x)[0]

    # fla's GatedSlotAttention.forward (fla/layers/gsa.py) on the same weights, in plain torch.
    naive = __import__("fla.ops.gsa.naive", fromlist=["naive_recurrent_gsa"]).naive_recurrent_gsa
    xb = x.transpose(0, 1)  # [b, s, h]

    def proj_conv(lin, conv):
        y = F.conv1d(F.linear(xb, lin.weight).transpose(1, 2), conv.weight, padding=3,
                     groups=conv.weight.shape[0])[..., :xb.shape[1]]
        return F.silu(y.transpose(1, 2))

    q = proj_conv(mixer.q_proj, mixer.q_conv).unflatten(-1, (2, 16))
    k = proj_conv(mixer.k_proj, mixer.k_conv).unflatten(-1, (2, 16))
    v = proj_conv(mixer.v_proj, mixer.v_conv).unflatten(-1, (2, 16))
    f = F.linear(xb, mixer.f_proj.weight).unflatten(-1, (2, 6))
    q, k, v = F.silu(q), F.silu(k), F.silu(v)  # swish feature map on q/k, silu on v
    f = F.logsigmoid(f) / 8
    o, _ = naive(q, k, v, 1 - f.exp(), f, scale=1.0)
    # fla norms over all heads at once; here per head (see linear_moe/mixers/gsa.py)
    o = F.rms_norm(F.silu(o), (16,), eps=config.layernorm_epsilon) * mixer.norm_weight
    ref = F.linear(o.flatten(-2), mixer.o_proj.weight).transpose(0, 1)
    return (out - ref).abs().max().item()


def test_gsa_layer_matches_fla_layer_forward():
    pytest.importorskip("fla.ops.gsa.naive")
    assert run_distributed(_layer_worker, 1)[0] < 1e-5
