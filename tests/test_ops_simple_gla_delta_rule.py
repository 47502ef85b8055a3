"""Scalar-decay GLA (simple_gla / retention / lightning) and DeltaNet's delta rule: the chunked
references against step-by-step loops of the papers' recurrences (fp64 oracle, fp32 op)."""

import pytest
import torch
import torch.nn.functional as F

from linear_moe.ops import delta_rule, simple_gla

TOL = 1e-5


def simple_gla_oracle(q, k, v, log_decay, scale, h0=None):
    """S_t = exp(g_t) S_{t-1} + k_t^T v_t ; o_t = scale q_t S_t (per head, g_t scalar)."""
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double()
    out = []
    for t in range(T):
        S = log_decay[:, t, :, None, None].double().exp() * S + \
            k[:, t, :, :, None].double() * v[:, t, :, None, :].double()
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].double(), S))
    return torch.stack(out, 1), S


def delta_rule_oracle(q, k, v, beta, scale, h0=None):
    """S_t = S_{t-1} - beta_t k_t^T (k_t S_{t-1}) + beta_t k_t^T v_t, q/k L2-normalised."""
    q, k = F.normalize(q.double(), dim=-1), F.normalize(k.double(), dim=-1)
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double()
    out = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None, None].double()
        S = S - bt * kt[..., :, None] * torch.einsum("bhk,bhkv->bhv", kt, S)[..., None, :] \
            + bt * kt[..., :, None] * v[:, t, :, None, :].double()
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S


def _inputs(T, K=8, V=6, H=3, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=g) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g)
    log_decay = F.logsigmoid(torch.randn(B, T, H, generator=g) * 2)
    beta = torch.rand(B, T, H, generator=g)
    h0 = torch.randn(B, H, K, V, generator=g)
    return q, k, v, log_decay, beta, h0


@pytest.mark.parametrize("T", [1, 37, 64, 150])
@pytest.mark.parametrize("chunk", [16, 64])
def test_simple_gla_data_dependent_decay(T, chunk):
    q, k, v, g, _, h0 = _inputs(T)
    o, S = simple_gla(q, k, v, g=g, initial_state=h0, output_final_state=True,
                      chunk_size=chunk)
    o_ref, S_ref = simple_gla_oracle(q, k, v, g, 8 ** -0.5, h0)
    assert (o.double() - o_ref).abs().max() < TOL and (S.double() - S_ref).abs().max() < TOL


@pytest.mark.parametrize("T", [5, 100])
def test_simple_gla_fixed_per_head_decay(T):
    q, k, v, _, _, _ = _inputs(T)
    gamma = (1 - 2.0 ** (-5.0 - torch.arange(3.0))).log()  # RetNet's multi-scale decays
    o, _ = simple_gla(q, k, v, g_gamma=gamma, chunk_size=16)
    o_ref, _ = simple_gla_oracle(q, k, v, gamma.expand(2, T, 3), 8 ** -0.5)
    assert (o.double() - o_ref).abs().max() < TOL


def test_simple_gla_grads_match_oracle():
    q, k, v, g, _, _ = (x.requires_grad_() for x in _inputs(45))
    simple_gla(q, k, v, g=g, chunk_size=16)[0].square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v, g)]
    for x in (q, k, v, g):
        x.grad = None
    simple_gla_oracle(q, k, v, g, 8 ** -0.5)[0].square().sum().backward()
    for a, x in zip(grads, (q, k, v, g)):
        assert (a.double() - x.grad.double()).abs().max() < 1e-4 * max(1.0, x.grad.abs().max())


def test_simple_gla_needs_exactly_one_decay():
    q, k, v, g, _, _ = _inputs(4)
    with pytest.raises(ValueError, match="exactly one"):
        simple_gla(q, k, v)
    with pytest.raises(ValueError, match="exactly one"):
        simple_gla(q, k, v, g=g, g_gamma=torch.zeros(3))


@pytest.mark.parametrize("T", [1, 37, 64, 150])
@pytest.mark.parametrize("chunk", [16, 64])
def test_delta_rule_matches_oracle(T, chunk):
    q, k, v, _, beta, h0 = _inputs(T)
    o, S = delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True,
                      chunk_size=chunk)
    o_ref, S_ref = delta_rule_oracle(q, k, v, beta, 8 ** -0.5, h0)
    assert (o.double() - o_ref).abs().max() < TOL and (S.double() - S_ref).abs().max() < TOL


def test_delta_rule_grads_match_oracle():
    q, k, v, _, beta, _ = (x.requires_grad_() for x in _inputs(40))
    delta_rule(q, k, v, beta, chunk_size=16)[0].square().sum().backward()
    grads = [x.grad.clone() for x in (q, k, v, beta)]
    for x in (q, k, v, beta):
        x.grad = None
    delta_rule_oracle(q, k, v, beta, 8 ** -0.5)[0].square().sum().backward()
    for a, x in zip(grads, (q, k, v, beta)):
        assert (a.double() - x.grad.double()).abs().max() < 1e-4 * max(1.0, x.grad.abs().max())


def ssd_oracle(x, dt, A, B, C, D):
    """Mamba2: S_t = exp(dt_t A) S_{t-1} + B_t^T (dt_t x_t); y_t = C_t S_t + D x_t."""
    b, T, H, P = x.shape
    S = torch.zeros(b, H, B.shape[-1], P, dtype=torch.float64)
    out = []
    for t in range(T):
        a = (dt[:, t] * A).double().exp()[..., None, None]
        S = a * S + B[:, t, :, :, None].double() * (dt[:, t, :, None] * x[:, t]).double()[..., None, :]
        out.append(torch.einsum("bhn,bhnp->bhp", C[:, t].double(), S) + D.double()[:, None] * x[:, t].double())
    return torch.stack(out, 1)


@pytest.mark.parametrize("T", [1, 50, 128])
def test_ssd_matches_mamba2_recurrence(T):
    from linear_moe.ops import ssd

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, T, 4, 6, generator=g)
    dt = F.softplus(torch.randn(2, T, 4, generator=g))
    A = -torch.rand(4, generator=g) * 4
    B, C = (torch.randn(2, T, 4, 5, generator=g) for _ in range(2))
    D = torch.randn(4, generator=g)
    y, _ = ssd(x, dt, A, B, C, D, chunk_size=16)
    assert (y.double() - ssd_oracle(x, dt, A, B, C, D)).abs().max() < TOL


def kda_oracle(q, k, v, g, beta, scale, h0=None):
    """S_t = (I - beta k^T k) Diag(exp(g_t)) S_{t-1} + beta k^T v, q/k L2-normalised."""
    q, k = F.normalize(q.double(), dim=-1), F.normalize(k.double(), dim=-1)
    B, T, H, K = q.shape
    S = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float64) if h0 is None else h0.double()
    out = []
    for t in range(T):
        kt, bt = k[:, t], beta[:, t, :, None, None].double()
        S = g[:, t].double().exp()[..., None] * S
        S = S - bt * kt[..., :, None] * torch.einsum("bhk,bhkv->bhv", kt, S)[..., None, :] \
            + bt * kt[..., :, None] * v[:, t, :, None, :].double()
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S


@pytest.mark.parametrize("T", [1, 37, 64, 150])
@pytest.mark.parametrize("chunk", [16, 64])
def test_kda_matches_oracle(T, chunk):
    from linear_moe.ops import kda

    q, k, v, _, beta, h0 = _inputs(T)
    g = F.logsigmoid(torch.randn(2, T, 3, 8, generator=torch.Generator().manual_seed(5)) * 2)
    o, S = kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=chunk)
    o_ref, S_ref = kda_oracle(q, k, v, g, beta, 8 ** -0.5, h0)
    assert (o.double() - o_ref).abs().max() < TOL and (S.double() - S_ref).abs().max() < TOL


def test_kda_grads_match_oracle():
    from linear_moe.ops import kda

    q, k, v, _, beta, _ = _inputs(40)
    g = F.logsigmoid(torch.randn(2, 40, 3, 8, generator=torch.Generator().manual_seed(5)))
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]
    kda(*leaves, chunk_size=16)[0].square().sum().backward()
    grads = [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    kda_oracle(*leaves, 8 ** -0.5)[0].square().sum().backward()
    for a, x in zip(grads, leaves):
        assert (a.double() - x.grad.double()).abs().max() < 1e-4 * max(1.0, x.grad.abs().max())


def test_kda_gate_inputs_equal_the_precomputed_log_decay():
    """kda(f, A_log=, dt_bias=) forms Kimi Linear's log decay -exp(A_log) softplus(f + dt_bias)
    itself (fla: inside its chunk kernel): the same outputs and gradients, through to A_log and
    dt_bias, as that decay computed first; and the two gate tensors come together."""
    from linear_moe.ops import kda

    q, k, v, _, beta, h0 = _inputs(40)
    gen = torch.Generator().manual_seed(6)
    f, A_log, dt_bias = torch.randn(2, 40, 3, 8, generator=gen), torch.randn(3, generator=gen), \
        torch.randn(24, generator=gen)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, f, beta, A_log, dt_bias)]
        lq, lk, lv, lf, lb, la, ld = leaves
        if fused:
            o, S = kda(lq, lk, lv, lf, lb, A_log=la, dt_bias=ld, initial_state=h0,
                       output_final_state=True, chunk_size=16)
        else:
            g = -la.exp()[:, None] * F.softplus(lf + ld.view(3, 8))
            o, S = kda(lq, lk, lv, g, lb, initial_state=h0, output_final_state=True,
                       chunk_size=16)
        (o.square().sum() + S.sum()).backward()
        results.append([o, S] + [t.grad for t in leaves])
    for a, b in zip(*results):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
    with pytest.raises(ValueError, match="A_log \\[H\\] and dt_bias \\[H \\* K\\] together"):
        kda(q, k, v, f, beta, A_log=A_log)
