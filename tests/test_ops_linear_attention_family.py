"""The linear-attention family: linear attention with its feature maps (elementwise, DPFP,
learnable hedgehog / t2r), Based and ReBased.

- each reference op (ops.linear_attn, ops.based, ops.rebased) equals a step-by-step loop of the
  paper's recurrence S_t = S_{t-1} + phi(k_t)^T v_t, z_t = z_{t-1} + phi(k_t),
  o_t = phi(q_t) S_t [/ (phi(q_t) z_t + eps)] (fp64 oracle, fp32 op, forward and grads), the
  oracles using the papers' full feature maps (x (x) x with all d^2 products);
- each feature map matches its formula;
- the learnable maps (and DPFP with the normalisers) under TP=2 equal TP=1, and train.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from arg_utils import parsed_args
from dist_utils import run_distributed
from linear_moe import ops
from linear_moe.arguments import validate_args
from linear_moe.layers.feature_maps import (FEATURE_MAP_NAMES, PerHeadFeatureMap, dpfp,
                                            feature_dim, feature_map)
from linear_moe.ops.based import quadratic_feature_map, taylor_feature_map
from test_pretrain import _command, _losses, _run, dataset  # noqa: F401 (dataset: fixture)

TOL = 1e-5
T_VALUES = (1, 37, 150)  # 37, 150: not multiples of the chunk
CHUNKS = (16, 64)


# ---------------------------------------------------------------- oracles (fp64, one step at a time)

def linear_attn_oracle(fq, fk, v, scale, normalize, eps):
    fq, fk, v = (x.double() for x in (fq, fk, v))
    B, T, H, K = fq.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64)
    z = torch.zeros(B, H, K, dtype=torch.float64)
    out = []
    for t in range(T):
        S = S + fk[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + fk[:, t]
        o = scale * torch.einsum("bhk,bhkv->bhv", fq[:, t], S)
        if normalize:
            o = o / (scale * (fq[:, t] * z).sum(-1, keepdim=True) + eps)
        out.append(o)
    return torch.stack(out, 1)


def outer(x):
    """x [..., d] -> vec(x x^T) [..., d^2], the paper's x (x) x."""
    return (x[..., :, None] * x[..., None, :]).flatten(-2)


def based_oracle(q, k, v, eps=1e-6):
    """Taylor map [1, x, x (x) x / sqrt(2)] of x = q / d^(1/4) (so s = q.k / sqrt(d))."""
    r = q.shape[-1] ** -0.25
    phi = lambda x: torch.cat([torch.ones_like(x[..., :1]), x, outer(x) / math.sqrt(2)], -1)
    return linear_attn_oracle(phi(q.double() * r), phi(k.double() * r), v, 1.0, True, eps)


def rebased_oracle(q, k, v, eps=1e-5):
    r = q.shape[-1] ** -0.25
    return linear_attn_oracle(outer(q.double() * r), outer(k.double() * r), v, 1.0, True, eps)


# ---------------------------------------------------------------- inputs

def _inputs(T, d=16, V=8, H=3, B=2, seed=0, dtype=torch.float32, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, d, generator=g, dtype=dtype) + offset for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    return q, k, v


def _positive(x):
    return F.elu(x) + 1  # a positive feature map, as normalised linear attention needs


def _assert_close(a, ref):
    """fp32 vs fp64: |a - ref| <= TOL, relative to |ref| where it exceeds 1 (sums without a
    decay or normaliser grow with T)."""
    err = (a.double() - ref).abs().max().item()
    assert err <= TOL * max(1.0, ref.abs().max().item()), f"max abs diff {err:.3e}"


def _assert_grads_match(run_op, run_oracle, inputs):
    """Grads of <o, w> for a fixed random w: fp32 op vs fp64 oracle."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    o = run_op(*leaves)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(5))
    (o * w).sum().backward()
    leaves64 = [x.double().requires_grad_() for x in inputs]
    (run_oracle(*leaves64) * w.double()).sum().backward()
    for name, a, b in zip("qkv", leaves, leaves64):
        err = (a.grad.double() - b.grad).abs().max().item()
        assert err <= TOL * max(1.0, b.grad.abs().max().item()), f"d{name}: {err:.3e}"


# ---------------------------------------------------------------- reference ops vs loops

@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalised"])
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("T", T_VALUES)
def test_linear_attn_matches_loop(T, chunk, normalize):
    q, k, v = _inputs(T, d=8)
    fq, fk = _positive(q), _positive(k)
    o, _ = ops.linear_attn(fq, fk, v, normalize=normalize, chunk_size=chunk)
    ref = linear_attn_oracle(fq, fk, v, 8 ** -0.5, normalize, 1e-10)
    assert o.dtype == torch.float32
    _assert_close(o, ref)


@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalised"])
def test_linear_attn_grads_match_loop(normalize):
    op = lambda q, k, v: ops.linear_attn(_positive(q), _positive(k), v, normalize=normalize,
                                         chunk_size=16)[0]
    oracle = lambda q, k, v: linear_attn_oracle(_positive(q), _positive(k), v, 8 ** -0.5,
                                                normalize, 1e-10)
    _assert_grads_match(op, oracle, _inputs(45, d=8))


# q and k around a shared offset keep q.k away from 0: rebased's kernel (q.k)^2 is then not
# dominated by the fp32 rounding of its expanded features (tested in fp64 below without it).
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("T", T_VALUES)
@pytest.mark.parametrize("op,oracle", [(ops.based, based_oracle), (ops.rebased, rebased_oracle)],
                         ids=["based", "rebased"])
def test_polynomial_attention_matches_loop(op, oracle, T, chunk):
    q, k, v = _inputs(T, offset=0.5)
    o, _ = op(q, k, v, chunk_size=chunk)
    assert o.shape == v.shape and o.dtype == torch.float32
    _assert_close(o, oracle(q, k, v))


@pytest.mark.parametrize("op,oracle", [(ops.based, based_oracle), (ops.rebased, rebased_oracle)],
                         ids=["based", "rebased"])
def test_polynomial_attention_grads_match_loop(op, oracle):
    _assert_grads_match(lambda q, k, v: op(q, k, v, chunk_size=16)[0], oracle,
                        _inputs(45, offset=0.5))


@pytest.mark.parametrize("op,oracle", [(ops.based, based_oracle), (ops.rebased, rebased_oracle)],
                         ids=["based", "rebased"])
def test_polynomial_attention_fp64_any_inputs(op, oracle):
    q, k, v = _inputs(70, dtype=torch.float64)
    assert (op(q, k, v, chunk_size=16)[0] - oracle(q, k, v)).abs().max() <= 1e-10


def test_based_scale_and_eps_reach_the_kernel():
    q, k, v = _inputs(20, offset=0.5)
    o, _ = ops.based(q, k, v, scale=0.1, eps=1e-3, chunk_size=16)
    r = 0.1 ** 0.5
    phi = lambda x: torch.cat([torch.ones_like(x[..., :1]), x, outer(x) / math.sqrt(2)], -1)
    ref = linear_attn_oracle(phi(q.double() * r), phi(k.double() * r), v, 1.0, True, 1e-3)
    _assert_close(o, ref)


@pytest.mark.parametrize("op,modes", [(ops.based, "chunk, parallel, fused_chunk"),
                                      (ops.rebased, "parallel, chunk")], ids=["based", "rebased"])
def test_polynomial_attention_rejects_other_modes(op, modes):
    q, k, v = _inputs(4)
    with pytest.raises(ValueError, match=f"mode 'fused_recurrent'; valid modes: {modes}"):
        op(q, k, v, mode="fused_recurrent")


# ---------------------------------------------------------------- feature maps vs formulas

def test_elementwise_feature_maps():
    x = torch.randn(2, 5, 3, 8)
    expected = {"identity": x, "elu": torch.where(x > 0, x + 1, x.exp()),
                "relu": x.clamp_min(0), "swish": x * torch.sigmoid(x)}
    for name, value in expected.items():
        assert torch.allclose(feature_map(name)(x), value, atol=1e-6), name
        assert feature_dim(name, 8) == 8


def test_taylor_feature_map_is_second_order_exp_expansion():
    x, y = torch.randn(2, 50, 16, dtype=torch.float64).unbind(0)
    s = (x * y).sum(-1)
    fx, fy = taylor_feature_map(x), taylor_feature_map(y)
    assert fx.shape[-1] == 1 + 16 + 16 * 17 // 2
    assert torch.allclose((fx * fy).sum(-1), 1 + s + s * s / 2)
    # the paper's full form [1, x, x (x) x / sqrt(2)] has the same inner products
    full = lambda z: torch.cat([torch.ones_like(z[..., :1]), z, outer(z) / math.sqrt(2)], -1)
    assert torch.allclose((full(x) * full(y)).sum(-1), (fx * fy).sum(-1))


def test_quadratic_feature_map_is_squared_dot_product():
    x, y = torch.randn(2, 50, 16, dtype=torch.float64).unbind(0)
    fx, fy = quadratic_feature_map(x), quadratic_feature_map(y)
    assert fx.shape[-1] == 16 * 17 // 2
    assert torch.allclose((fx * fy).sum(-1), (x * y).sum(-1) ** 2)


@pytest.mark.parametrize("nu", [1, 3])
def test_dpfp_matches_schlag_formula(nu):
    """phi_{i + 2d (j - 1)}(x) = r(x)_i r(x)_{(i - j) mod 2d}, r(x) = [relu(x), relu(-x)]."""
    d = 5
    x = torch.randn(4, d)
    r = torch.cat([x.clamp_min(0), (-x).clamp_min(0)], -1)
    expected = torch.stack([r[:, i] * r[:, (i - j) % (2 * d)]
                            for j in range(1, nu + 1) for i in range(2 * d)], -1)
    assert torch.equal(dpfp(x, nu), expected)
    assert torch.equal(feature_map("dpfp", nu=nu)(x), expected)
    assert feature_dim("dpfp", d, nu) == expected.shape[-1] == 2 * nu * d


def _per_head_map(kind, H=4, d=6, tp_rank=0, tp_size=1, seed=0):
    torch.manual_seed(seed)
    return PerHeadFeatureMap(kind, H, d, tp_rank, tp_size)


@pytest.mark.parametrize("kind", ["hedgehog", "t2r"])
def test_learnable_maps_match_per_head_formula(kind):
    phi = _per_head_map(kind)
    with torch.no_grad():  # random per-head maps, not the init
        phi.weight.normal_()
        phi.bias.normal_()
    x = torch.randn(2, 7, 4, 6)
    out = phi(x)
    for h in range(4):
        y = F.linear(x[:, :, h], phi.weight[h], phi.bias[h])
        expected = torch.cat([2 * y, -2 * y], -1).softmax(-1) if kind == "hedgehog" else F.relu(y)
        assert torch.allclose(out[:, :, h], expected, atol=1e-6), (kind, h)
    assert out.shape[-1] == feature_dim(kind, 6)


def test_hedgehog_starts_as_softmax_of_plus_minus_x():
    x = torch.randn(3, 5, 4, 6)
    out = _per_head_map("hedgehog")(x)
    assert torch.allclose(out, torch.cat([2 * x, -2 * x], -1).softmax(-1), atol=1e-6)
    assert torch.allclose(out.sum(-1), torch.ones(3, 5, 4))


@pytest.mark.parametrize("kind", ["hedgehog", "t2r"])
def test_learnable_map_shards_are_slices_of_the_full_map(kind):
    full = _per_head_map(kind)
    for rank in range(2):
        shard = _per_head_map(kind, tp_rank=rank, tp_size=2)
        assert shard.weight.shape == (2, 6, 6) and shard.weight.partition_dim == 0
        assert torch.equal(shard.weight, full.weight[2 * rank:2 * rank + 2])
        assert torch.equal(shard.bias, full.bias[2 * rank:2 * rank + 2])


def test_unknown_feature_map_lists_the_choices():
    with pytest.raises(ValueError, match="unknown --la-feature-map 'nope'.*hedgehog, t2r"):
        feature_map("nope")
    assert set(FEATURE_MAP_NAMES) == {"identity", "elu", "relu", "swish", "dpfp", "hedgehog",
                                      "t2r"}


# ---------------------------------------------------------------- arguments

def _validated_args(**overrides):
    args = parsed_args(**overrides)
    validate_args(args)
    return args


@pytest.mark.parametrize("la_module,mode,choices", [
    ("based", "fused_recurrent", "chunk, parallel, fused_chunk"),
    ("rebased", "fused_chunk", "parallel, chunk"),
    ("linear_attention", "parallel", "chunk, fused_recurrent"),
])
def test_unsupported_mode_fails_at_argument_parsing(la_module, mode, choices):
    with pytest.raises(ValueError, match=f"'{la_module}' has no --la-mode '{mode}'; choose one "
                                         f"of {choices}"):
        _validated_args(la_module=la_module, la_mode=mode)


def test_family_flags_parse_and_resolve_defaults():
    args = parsed_args(["--la-module", "based", "--la-mode", "parallel", "--la-feature-dim", "8",
                        "--la-dpfp-nu", "2", "--la-feature-map-norm", "--la-norm-k"])
    assert (args.la_feature_dim, args.la_dpfp_nu) == (8, 2)
    assert args.la_feature_map_norm and args.la_norm_k and not args.la_norm_q
    args = _validated_args(la_module="based", la_mode="parallel")
    assert args.la_output_norm == "identity" and args.la_use_output_gate is False


# ---------------------------------------------------------------- TP=2 == TP=1, training

def _linear_attention_tp_worker(rank, world_size, overrides, moe):
    import test_tp_parity as tpp

    make_config = tpp._config

    def config(la_module, tp, moe):
        c = make_config(la_module, tp, moe)
        for name, value in overrides.items():
            setattr(c, name, value)
        return c

    tpp._config = config  # _build reads the module global at call time
    return tpp._tp_parity_worker(rank, world_size, "linear_attention", moe)


# (overrides, MoE + sequence parallelism): each map once, the SP gather path once (CI time).
TP_CASES = {
    "hedgehog-moe_sp": ({"la_feature_map": "hedgehog"}, True),
    "t2r-norm_qk-dense": ({"la_feature_map": "t2r", "la_norm_q": True, "la_norm_k": True},
                          False),
    "dpfp-normalised-dense": ({"la_feature_map": "dpfp", "la_dpfp_nu": 2,
                               "la_feature_map_norm": True}, False),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", TP_CASES)
def test_feature_map_tp2_matches_tp1(case):
    from test_tp_parity import assert_tp_parity

    overrides, moe = TP_CASES[case]
    learnable = overrides["la_feature_map"] in ("hedgehog", "t2r")
    for result in run_distributed(_linear_attention_tp_worker, 2, overrides, moe):
        errors = assert_tp_parity(result, case)
        if learnable:  # the per-head maps' own grads were gathered and compared
            assert any("self_attention.phi_q.weight" in n for n in errors)
            assert any("self_attention.phi_k.bias" in n for n in errors)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [
    ["--la-feature-map", "hedgehog"],
    ["--la-feature-map", "t2r"],
    ["--la-feature-map", "dpfp", "--la-dpfp-nu", "2", "--la-feature-map-norm"],
], ids=["hedgehog", "t2r", "dpfp-normalised"])
def test_feature_map_trains_in_tiny_preset(flags, dataset, tmp_path):  # noqa: F811
    losses = _losses(_run(_command(dataset, tmp_path / "ckpt", "linear_attention",
                                   train_iters=20, extra=["--save-interval", "1000", *flags])))
    assert sorted(losses) == list(range(1, 21))
    first, last = losses[1], sum(losses[i] for i in range(16, 21)) / 5
    assert last < first - 0.5, f"{flags}: loss did not fall: {first:.3f} -> {last:.3f}"
