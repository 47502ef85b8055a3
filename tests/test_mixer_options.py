"""Mixer options (fla layer options as --la-* config fields): each changes what it should, and a
mixer that does not read one refuses it at argument validation.

The mixer checks run in one single-rank process (run_distributed(..., 1): Megatron's parallel
state); the results are compared here.
"""

import inspect
import re

import pytest
import torch
import torch.nn.functional as F

from arg_utils import parsed_args
from autograd_utils import run_and_record_saved
from dist_utils import run_distributed
from linear_moe.arguments import validate_args
from linear_moe.layers import ShortConvolution
from linear_moe.layers.feature_maps import elementwise_feature_map
from linear_moe.registry import mixer_specific_options, registered_mixers

H, HEADS, SEQ, BATCH = 32, 2, 13, 2


def _config(la_module, **overrides):
    from linear_moe.config import LinearMoEConfig, resolve_mixer_defaults

    config = LinearMoEConfig(num_layers=1, hidden_size=H, num_attention_heads=HEADS,
                             params_dtype=torch.float32, use_cpu_initialization=True,
                             normalization="RMSNorm", add_bias_linear=False,
                             gradient_accumulation_fusion=False, la_module=la_module,
                             la_num_heads=HEADS, la_chunk_size=4, la_backend="reference",
                             **overrides)
    resolve_mixer_defaults(config)
    return config


def _build(la_module, seed=0, **overrides):
    from megatron.core.transformer.enums import AttnMaskType

    entry = registered_mixers()[la_module]
    torch.manual_seed(seed)
    return entry.builder(_config(la_module, **overrides), layer_number=1,
                         attn_mask_type=AttnMaskType.causal)


class _Capture:
    """Replace ``module.name`` by a wrapper recording its arguments (restored on exit)."""

    def __init__(self, module, name):
        self.module, self.name, self.calls = module, name, []

    def __enter__(self):
        self.orig = getattr(self.module, self.name)

        def wrapped(*args, **kwargs):
            self.calls.append((args, kwargs))
            return self.orig(*args, **kwargs)

        setattr(self.module, self.name, wrapped)
        return self

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.orig)


def _same_weights(dst, src):
    dst.load_state_dict(src.state_dict(), strict=False)


# -- plain-torch restatement of fla's DeltaNet forward (fla/layers/delta_net.py) -------------
def _fla_deltanet_reference(m, x, *, use_short_conv, use_beta, act, qk_norm, neg_eigval, gate):
    xb = x.transpose(0, 1)  # [b, s, h]
    dk = dv = H // HEADS

    def conv(t, c, silu):
        y = F.conv1d(t.transpose(1, 2), c.weight, c.bias, padding=c.kernel_size - 1,
                     groups=t.shape[-1])[..., :t.shape[1]].transpose(1, 2)
        return F.silu(y) if silu else y

    q, k, v = (F.linear(xb, p.weight) for p in (m.q_proj, m.k_proj, m.v_proj))
    if use_short_conv:
        q, k, v = conv(q, m.q_conv, act == "silu"), conv(k, m.k_conv, act == "silu"), \
            conv(v, m.v_conv, True)
    else:
        if act == "silu":
            q, k = F.silu(q), F.silu(k)
        v = F.silu(v)
    q, k, v = q.unflatten(-1, (HEADS, dk)), k.unflatten(-1, (HEADS, dk)), \
        v.unflatten(-1, (HEADS, dv))
    if act == "relu":
        q, k = q.relu(), k.relu()
    elif act == "elu":
        q, k = F.elu(q) + 1, F.elu(k) + 1
    if qk_norm == "sum":
        q, k = F.normalize(q, p=1, dim=-1, eps=1e-6), F.normalize(k, p=1, dim=-1, eps=1e-6)
    else:
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
    beta = F.linear(xb, m.b_proj.weight).sigmoid() if use_beta else q.new_ones(q.shape[:3])
    if neg_eigval:
        beta = beta * 2
    b, s = xb.shape[:2]
    S = q.new_zeros(b, HEADS, dk, dv)
    outs = []
    for t in range(s):
        kt, vt, bt = k[:, t], v[:, t], beta[:, t, :, None]
        err = vt - torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + torch.einsum("bhk,bhv->bhkv", kt, bt * err)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * dk ** -0.5, S))
    o = torch.stack(outs, 1)
    o = F.rms_norm(o, (dv,), m.o_norm.weight, m.config.layernorm_epsilon)
    if gate:
        o = o * F.silu(F.linear(xb, m.g_proj.weight).unflatten(-1, (HEADS, dv)))
    return F.linear(o.flatten(-2), m.o_proj.weight).transpose(0, 1)


DELTANET_CASES = {
    "defaults": dict(),
    "no_beta-relu-sum-neg-gate": dict(la_use_beta=False, la_qk_activation="relu",
                                      la_qk_norm="sum", la_allow_neg_eigval=True,
                                      la_use_output_gate=True),
    "no_conv-elu-neg": dict(la_use_short_conv=False, la_qk_activation="elu",
                            la_allow_neg_eigval=True),
    "no_conv-silu": dict(la_use_short_conv=False),
    "identity-conv_bias": dict(la_qk_activation="identity", la_conv_bias=True),
}


def _options_worker(rank, world_size):
    from megatron.core import parallel_state as mpu

    from linear_moe import ops
    from linear_moe.mixers import base as mixer_base  # LinearMixer.rotate applies RoPE

    mpu.initialize_model_parallel(1)
    torch.manual_seed(1)
    x = torch.randn(SEQ, BATCH, H)
    r = {}

    # allow_neg_eigval: the beta the op gets is doubled, in (0, 2).
    for name, op in (("deltanet", "delta_rule"), ("gated_deltanet", "gated_delta_rule"),
                     ("kda", "kda")):
        off, on = _build(name), _build(name, la_allow_neg_eigval=True)
        _same_weights(on, off)
        betas = []
        for m in (off, on):
            with _Capture(ops, op) as cap:
                m(x)
            betas.append(cap.calls[0][0][-1] if op != "delta_rule" else cap.calls[0][0][3])
        r[f"neg_eigval/{name}"] = ((betas[1] - 2 * betas[0]).abs().max().item(),
                                   betas[1].min().item(), betas[1].max().item(),
                                   betas[0].max().item())

    # conv bias: present on every short conv (q/k/v; mamba2's x/B/C), used in forward.
    for name in ("gla", "mamba2"):
        m = _build(name, la_use_short_conv=True, la_conv_bias=True)
        convs = {n: c for n, c in m.named_modules() if isinstance(c, ShortConvolution)}
        shapes = {n: (tuple(c.bias.shape), c.weight.shape[0],
                      getattr(c.bias, "tensor_model_parallel", False))
                  for n, c in convs.items()}
        out = m(x)[0]
        with torch.no_grad():
            for c in convs.values():
                c.bias.zero_()
        r[f"conv_bias/{name}"] = (shapes, (out - m(x)[0]).abs().max().item())
    r["conv_bias/off"] = [n for n, _ in _build("gla", la_use_short_conv=True).named_parameters()
                          if "conv.bias" in n]

    # GLA clamp_min: the log decay the op gets is clamped from below.
    for clamp in (None, -0.02):
        with _Capture(ops, "gla") as cap:
            _build("gla", la_clamp_min=clamp)(x)
        r[f"clamp/{clamp}"] = cap.calls[0][0][3].min().item()

    # elementwise_affine off: no norm weight (GatedRMSNorm, GSA's per-channel weight, RWKV's
    # GroupNorm), and the output is the plain norm.
    for name in ("gla", "gsa", "rwkv6"):
        m = _build(name, la_norm_elementwise_affine=False)
        ref = _build(name)
        r[f"affine/{name}"] = sorted(n for n in m.state_dict() if "norm" in n)
        r[f"affine_ref/{name}"] = sorted(n for n in ref.state_dict() if "norm" in n)
        _same_weights(m, ref)  # the norm weights are ones (gla, gsa) at init: same output
        if name != "rwkv6":
            r[f"affine_out/{name}"] = (m(x)[0] - ref(x)[0]).abs().max().item()

    # feature maps on q/k (gla, simple_gla, retention; retention's RoPE disabled to compare).
    orig_rotary = mixer_base.apply_rotary
    mixer_base.apply_rotary = lambda t, theta, fused=False, offset=0: t
    try:
        for name, op in (("gla", "gla"), ("simple_gla", "simple_gla"),
                         ("retention", "simple_gla")):
            got = {}
            for fmap in (None, "relu", "elu"):
                with _Capture(ops, op) as cap:
                    _build(name, la_feature_map=fmap)(x)
                got[fmap] = cap.calls[0][0][:2]
            r[f"fmap/{name}"] = max(
                (got["relu"][i] - got[None][i].relu()).abs().max().item() for i in (0, 1))
            r[f"fmap_elu/{name}"] = max(
                (got["elu"][i] - (F.elu(got[None][i]) + 1)).abs().max().item() for i in (0, 1))
    finally:
        mixer_base.apply_rotary = orig_rotary

    # deltanet options against the plain-torch fla DeltaNet forward.
    for case, overrides in DELTANET_CASES.items():
        m = _build("deltanet", **overrides)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "conv.bias" in n or "o_norm" in n:
                    p.uniform_(0.5, 1.5)  # non-trivial bias / norm weight
        cfg = m.config
        ref = _fla_deltanet_reference(
            m, x, use_short_conv=cfg.la_use_short_conv, use_beta=cfg.la_use_beta,
            act=cfg.la_qk_activation, qk_norm=cfg.la_qk_norm,
            neg_eigval=cfg.la_allow_neg_eigval, gate=cfg.la_use_output_gate)
        r[f"deltanet/{case}"] = ((m(x)[0] - ref).abs().max().item(), hasattr(m, "b_proj"))

    # mamba2: init ranges, D per channel, dt clamp, norm before/after the gate.
    m = _build("mamba2", la_ssm_a_init_range=(2.0, 3.0), la_ssm_dt_min=0.01,
               la_ssm_dt_max=0.02, la_ssm_dt_init_floor=1e-4)
    A, dt = m.A_log.exp(), F.softplus(m.dt_bias)
    r["mamba2/init"] = (A.min().item(), A.max().item(), dt.min().item(), dt.max().item())
    m = _build("mamba2", la_ssm_dt_min=0.01, la_ssm_dt_max=0.02, la_ssm_dt_init_floor=0.05)
    r["mamba2/floor"] = F.softplus(m.dt_bias).min().item()

    m = _build("mamba2", la_ssm_d_has_hdim=True)
    with torch.no_grad():
        m.D.uniform_(-1, 1)
    with _Capture(ops, "ssd") as cap:
        m(x)
    args = cap.calls[0][0]
    xs, D = args[0], args[5]
    y_d, _ = ops.ssd(*args[:5], D, backend="reference", chunk_size=4)
    y_0, _ = ops.ssd(*args[:5], None, backend="reference", chunk_size=4)
    r["mamba2/D"] = (tuple(m.D.shape), tuple(D.shape),
                     (y_d - y_0 - D * xs).abs().max().item() if D.dim() == 2 else None)

    m = _build("mamba2", la_ssm_dt_limit=(0.05, 0.2))
    with _Capture(ops, "ssd") as cap:
        m(x * 10)
    dt = cap.calls[0][0][1]
    r["mamba2/dt_limit"] = (dt.min().item(), dt.max().item())

    for before in (False, True):
        m = _build("mamba2", la_ssm_norm_before_gate=before)
        with torch.no_grad():
            m.o_norm.weight.uniform_(0.5, 1.5)
        with _Capture(ops, "ssd") as cap:
            out = m(x)[0]
        y = ops.ssd(*cap.calls[0][0], backend="reference", chunk_size=4)[0]
        z = F.linear(x.transpose(0, 1), m.z_proj.weight).unflatten(-1, (HEADS, -1))
        w, eps = m.o_norm.weight, m.config.layernorm_epsilon
        dv = z.shape[-1]
        if before:
            o = F.rms_norm(y, (dv,), w, eps) * F.silu(z)
        else:
            o = F.rms_norm(y * F.silu(z), (dv,), w, eps)
        ref = F.linear(o.flatten(-2), m.o_proj.weight).transpose(0, 1)
        r[f"mamba2/norm_before_gate={before}"] = (out - ref).abs().max().item()

    # project() (one GEMM over several in-projections, one with a bias) and project_each()
    # (a GEMM each, x's gradient accumulated in the backward GEMMs) equal each projection on its
    # own, outputs and gradients (x, weights, bias) alike; project_each also with an output
    # that does not reach the loss.
    m = _build("simple_gla")
    xb = torch.randn(BATCH, SEQ, H)
    projections = (m.q_proj, m.v_proj, m.g_decay_proj)
    for used in ((0, 1, 2), (0, 2)):
        grads = {}
        for how in ("project", "project_each", "separate"):
            if how == "project" and used != (0, 1, 2):
                continue
            xi = xb.clone().requires_grad_()
            m.zero_grad()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                          lambda t: t):
                outs = (m.project(xi, *projections) if how == "project"
                        else m.project_each(xi, *projections) if how == "project_each"
                        else [p(xi)[0] for p in projections])
            if how == "project":  # what autograd keeps: x and the weights, no concatenated copy
                params = {p.weight.data_ptr() for p in projections}
                concat = (sum(p.weight.shape[0] for p in projections), H)
                r["project_saved_copies"] = [tuple(t.shape) for t in saved
                                             if t.data_ptr() not in params
                                             and tuple(t.shape) in (concat, concat[::-1])]
            sum((outs[i] * torch.randn_like(outs[i], generator=torch.Generator().manual_seed(i)))
                .sum() for i in used).backward()
            grads[how] = [*outs, xi.grad] + [
                t.grad.clone() if t.grad is not None else torch.zeros_like(t)
                for p in projections for t in (p.weight, p.bias) if t is not None]
        for how in grads:
            if how != "separate":
                r[f"{how}/{len(used)}"] = (len(grads[how]), max(
                    (a - b).abs().max().item() for a, b in zip(grads[how], grads["separate"])))

    # The output gate's projection: in qkv's one call of the in-projections, without short
    # convs (gla) as with them (gated_deltanet: its own output beside the fused GEMM); the
    # output and x's gradient equal output() making the gate itself from x (qkv's gate dropped).
    for name in ("gla", "gated_deltanet"):
        m = _build(name)
        runs = []
        for drop_gate in (False, True):
            # g_proj's own GEMMs: the module's (none here: the mixers read the batch-first
            # view of x through project_each) or project_each's of g_proj alone
            calls = []
            hook = m.g_proj.register_forward_hook(lambda *_: calls.append(1))
            m.project_each = lambda xi, *p, _orig=m.project_each: (
                calls.append(1) if p == (m.g_proj,) else None) or _orig(xi, *p)
            qkv = m.qkv
            if drop_gate:
                m.qkv = lambda xi, *extra: (*qkv(xi, *extra)[:-1], None)
            xi = x.clone().requires_grad_()
            out = m(xi)[0]
            out.pow(2).sum().backward()
            m.qkv = qkv
            del m.project_each
            hook.remove()
            runs.append((len(calls), out.detach(), xi.grad))
        r[f"gate/{name}"] = (runs[0][0], runs[1][0], (runs[0][1] - runs[1][1]).abs().max().item(),
                             (runs[0][2] - runs[1][2]).abs().max().item())
    return r


# One xdist worker for the module (make test: --dist loadgroup), so the fixture runs once.
pytestmark = pytest.mark.xdist_group("mixer_options")


@pytest.fixture(scope="module")
def results():
    return run_distributed(_options_worker, 1)[0]


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "kda"])
def test_allow_neg_eigval_doubles_beta(results, name):
    diff, lo, hi, hi_off = results[f"neg_eigval/{name}"]
    assert diff < 1e-6
    assert 0 < lo and hi < 2 and hi > 1 >= hi_off


@pytest.mark.parametrize("name", ["gla", "mamba2"])
def test_conv_bias_on_every_short_conv_and_used(results, name):
    shapes, changed = results[f"conv_bias/{name}"]
    assert len(shapes) == 3
    for bias_shape, channels, sharded in shapes.values():
        assert bias_shape == (channels,) and sharded
    assert changed > 1e-4
    assert results["conv_bias/off"] == []


def test_project_is_the_separate_projections_in_one_gemm(results):
    count, diff = results["project/3"]
    assert count == 3 + 1 + 4  # outputs, x's gradient, three weights and one bias
    assert diff < 1e-5
    assert results["project_saved_copies"] == []  # the per-step weight concat is not kept


@pytest.mark.parametrize("used", [3, 2])
def test_project_each_is_the_separate_projections(results, used):
    count, diff = results[f"project_each/{used}"]
    assert count == 3 + 1 + 4
    assert diff < 1e-5


@pytest.mark.parametrize("name", ["gla", "gated_deltanet"])
def test_output_gate_joins_the_in_projections(results, name):
    in_qkv, in_output, out_diff, grad_diff = results[f"gate/{name}"]
    # no GEMM of g_proj alone (the gate comes from qkv's call, beside the fused GEMM with
    # convs); with qkv's gate dropped, output() makes one
    assert in_qkv == 0 and in_output == 1
    assert out_diff < 1e-5 and grad_diff < 1e-5


def test_conv_bias_shards_by_channels_like_the_weight():
    torch.manual_seed(3)
    full = ShortConvolution(8, 4, 0, 1, torch.float32, bias=True)
    shards = []
    for rank in range(2):
        torch.manual_seed(3)
        shards.append(ShortConvolution(8, 4, rank, 2, torch.float32, bias=True))
    assert all(s.bias.shape == (4,) and s.bias.partition_dim == 0 for s in shards)
    assert torch.equal(torch.cat([s.bias for s in shards]), full.bias)
    assert torch.equal(torch.cat([s.weight for s in shards]), full.weight)
    x = torch.randn(2, 5, 8)
    ref = F.silu(F.conv1d(x.transpose(1, 2), full.weight, full.bias, padding=3,
                          groups=8)[..., :5].transpose(1, 2))
    torch.testing.assert_close(full(x), ref)
    assert ShortConvolution(8, 4, 0, 1, torch.float32).bias is None


def test_gla_clamp_min_clamps_the_log_decay(results):
    assert results["clamp/None"] < -0.02
    assert results["clamp/-0.02"] == pytest.approx(-0.02)


@pytest.mark.parametrize("name", ["gla", "gsa", "rwkv6"])
def test_no_elementwise_affine_drops_the_norm_weight(results, name):
    assert results[f"affine/{name}"] == []
    assert results[f"affine_ref/{name}"]  # the default has them
    if name != "rwkv6":
        assert results[f"affine_out/{name}"] < 1e-6  # weight ones == no weight


@pytest.mark.parametrize("name", ["gla", "simple_gla", "retention"])
def test_feature_map_applied_to_q_and_k(results, name):
    assert results[f"fmap/{name}"] < 1e-6
    assert results[f"fmap_elu/{name}"] < 1e-6


def test_feature_map_only_elementwise_on_fixed_key_dim_mixers():
    assert elementwise_feature_map(None, "gla") is None
    with pytest.raises(ValueError, match="only an elementwise --la-feature-map"):
        elementwise_feature_map("hedgehog", "gla")


@pytest.mark.parametrize("case", list(DELTANET_CASES))
def test_deltanet_options_match_fla_forward(results, case):
    err, has_b_proj = results[f"deltanet/{case}"]
    assert err < 1e-4  # chunked fp32 reference op vs the step-by-step recurrence
    assert has_b_proj == DELTANET_CASES[case].get("la_use_beta", True)


def test_mamba2_init_options(results):
    a_lo, a_hi, dt_lo, dt_hi = results["mamba2/init"]
    assert 2.0 <= a_lo and a_hi <= 3.0
    assert 0.01 - 1e-6 <= dt_lo and dt_hi <= 0.02 + 1e-6
    assert results["mamba2/floor"] == pytest.approx(0.05, rel=1e-5)


def test_mamba2_d_per_channel(results):
    d_shape, op_shape, err = results["mamba2/D"]
    assert d_shape == (H * 2,)  # expand_v 2: one D per channel
    assert op_shape == (HEADS, H * 2 // HEADS)
    assert err < 1e-5


def test_mamba2_dt_limit_and_norm_before_gate(results):
    lo, hi = results["mamba2/dt_limit"]
    assert lo == pytest.approx(0.05) and hi == pytest.approx(0.2)  # x * 10 reaches both bounds
    assert results["mamba2/norm_before_gate=False"] < 1e-5
    assert results["mamba2/norm_before_gate=True"] < 1e-5


# -- argument validation ---------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--la-module", "gla", "--la-allow-neg-eigval"],
     r"mixer 'gla' does not use --la-allow-neg-eigval; drop it \(it applies to: deltanet, "
     r"gated_deltanet, kda\)"),
    (["--la-module", "mamba2", "--la-clamp-min", "-5"], "does not use --la-clamp-min"),
    (["--la-module", "gated_deltanet", "--la-qk-norm", "sum"], "does not use --la-qk-norm"),
    (["--la-module", "rwkv6", "--la-feature-map", "relu"], "does not use --la-feature-map"),
    (["--la-module", "gla", "--la-ssm-dt-limit", "0", "1"], "does not use --la-ssm-dt-limit"),
    (["--la-module", "kda", "--la-gsa-num-slots", "8"], "does not use --la-gsa-num-slots"),
    (["--la-module", "gla", "--la-conv-bias"], "--la-conv-bias needs a short convolution"),
    (["--la-module", "gla", "--la-conv-kernel", "ours"],
     "--la-conv-kernel ours needs a short convolution"),
    (["--la-module", "gated_deltanet", "--la-cp-kernel", "fla"],
     "--la-cp-kernel fla needs context parallelism"),
    (["--la-module", "gla", "--la-qk-l2norm-in-conv"], "does not use --la-qk-l2norm-in-conv"),
    (["--la-module", "gated_deltanet", "--no-la-use-short-conv", "--la-qk-l2norm-in-conv"],
     "--la-qk-l2norm-in-conv needs a short convolution"),
    (["--la-module", "gated_deltanet", "--la-fused-log-decay"],
     "does not use --la-fused-log-decay"),
    (["--la-module", "deltanet", "--la-qk-activation", "relu", "--la-qk-l2norm-in-conv"],
     "--la-qk-l2norm-in-conv needs deltanet's q/k L2 norm right after the convs"),
    (["--la-module", "gla", "--la-gate-low-rank-dim", "24", "--la-fused-log-decay"],
     "--la-fused-log-decay takes --la-gate-low-rank-dim a power of two in \\[16, 128\\], not 24"),
    (["--la-module", "based", "--no-la-norm-elementwise-affine"],
     "needs an output norm.*--la-output-norm identity"),
])
def test_unused_option_rejected(argv, message):
    with pytest.raises(ValueError, match=message):
        validate_args(parsed_args(argv))


@pytest.mark.parametrize("argv,message", [
    (["--la-module", "gla"], "--la-cp-kernel fla applies to .*not 'gla'"),
    (["--la-module", "kda", "--la-backend", "reference"], "drop --la-backend reference"),
])
def test_fla_cp_kernel_refused_where_it_cannot_run(argv, message):
    args = parsed_args([*argv, "--la-cp-kernel", "fla"], context_parallel_size=2, seq_length=64)
    with pytest.raises(ValueError, match=message):
        validate_args(args)
    # where it runs: the mixers that declare fla's CP, on fla's kernels
    validate_args(parsed_args(["--la-module", "kda", "--la-cp-kernel", "fla"],
                              context_parallel_size=2, seq_length=64))


@pytest.mark.parametrize("argv", [
    ["--la-module", "deltanet", "--la-qk-norm", "sum", "--no-la-use-beta",
     "--la-allow-neg-eigval", "--la-conv-bias"],
    ["--la-module", "gla", "--la-clamp-min", "-5", "--la-feature-map", "relu"],
    ["--la-module", "mamba2", "--la-ssm-dt-limit", "0", "1", "--la-ssm-d-has-hdim",
     "--la-conv-bias"],
    ["--la-module", "linear_attention"],
    ["--la-module", "gla", "--la-ssm-dt-limit", "0", "inf"],  # the default is no change
])
def test_used_options_accepted(argv):
    args = parsed_args(argv)
    validate_args(args)
    if args.la_module == "linear_attention":
        assert args.la_feature_map == "elu"  # its registry default
    if "--la-ssm-dt-limit" in argv:
        assert isinstance(args.la_ssm_dt_limit, tuple)


def test_declared_options_are_what_each_mixer_reads():
    from linear_moe.mixers import base

    specific = mixer_specific_options()
    fields = lambda src: set(re.findall(r"la_[a-z0-9_]+", src)) & specific
    in_base = fields(inspect.getsource(base))  # read for every mixer (e.g. head sharing)
    for name, entry in registered_mixers().items():
        source = inspect.getsource(inspect.getmodule(entry.builder))
        read = fields(re.sub(r"options=\([^)]*\)", "", source))  # not the declaration itself
        assert set(entry.options) <= read | in_base, (name, set(entry.options) - read)
        if not name.startswith("mom_"):  # mom.py holds two mixers
            assert read <= set(entry.options), (name, read - set(entry.options))


@pytest.mark.slow
def test_conv_bias_tp2_matches_tp1():
    from test_tp_parity import _tp_parity_worker, assert_tp_parity

    results = run_distributed(_tp_parity_worker, 2, "gated_deltanet", False,
                              {"la_conv_bias": True})
    for result in results:
        errors = assert_tp_parity(result)
        assert any("conv.bias" in n for n in errors), "conv bias grads not compared"


def test_mamba2_chunk_refused_where_its_backward_is_unproven(monkeypatch):
    from linear_moe.mixers import mamba2
    from linear_moe.ops import fla_compat

    def config(backend="auto", mode="chunk"):
        cfg = _config("mamba2")
        cfg.la_backend, cfg.la_mode = backend, mode
        return cfg

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fla_compat, "hopper_guard_active", lambda: True)
    monkeypatch.delenv(fla_compat.GUARD_ENV, raising=False)
    with pytest.raises(ValueError, match="--la-mode fused_recurrent or --la-backend reference"):
        mamba2.refuse_unproven_chunk_backward(config())
    mamba2.refuse_unproven_chunk_backward(config(backend="reference"))
    mamba2.refuse_unproven_chunk_backward(config(mode="fused_recurrent"))
    monkeypatch.setenv(fla_compat.GUARD_ENV, "lift_all")  # the GPU suite's measuring switch
    mamba2.refuse_unproven_chunk_backward(config())
    monkeypatch.setattr(fla_compat, "hopper_guard_active", lambda: False)
    monkeypatch.delenv(fla_compat.GUARD_ENV)
    mamba2.refuse_unproven_chunk_backward(config())


def test_gdn_log_decay_compiled_keeps_only_its_inputs():
    """GDN's log decay compiled (CUDA's path; here inductor's CPU backend) equals the eager
    function and keeps for backward only its inputs, where eager keeps softplus's fp32 input
    and output (12 MiB at the peer's 8K shape)."""
    from linear_moe.mixers.gated_deltanet import _log_decay, _log_decay_cuda

    torch.manual_seed(0)
    fused = torch.randn(2, 33, 40).to(torch.bfloat16)
    A_log, dt_bias = torch.randn(8), torch.randn(8)
    runs, kept = [], []
    for fn in (_log_decay_cuda, _log_decay):
        grads, saved = run_and_record_saved(fn, (fused, A_log, dt_bias), torch.ones(2, 33, 8),
                                            call=lambda f, t: f(t[0][..., 32:40], t[1], t[2]))
        runs.append(grads)
        kept.append(saved)
    assert kept[0] == sorted([((8,), torch.float32), ((8,), torch.float32),
                              ((2, 33, 8), torch.bfloat16)])
    assert ((2, 33, 8), torch.float32) in kept[1]  # eager: softplus's fp32 input / output
    for a, b in zip(*runs):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
