"""The delta-rule mixers' q / k L2 norm inside their short convs (--la-qk-l2norm-in-conv, the
default): our conv kernel normalises each head in registers (forward and the norm's backward),
so fla's op, called with use_qk_l2norm off, spends no passes of its own on it. The kernels
equal the torch path (conv, then the ops' l2norm) in Triton's interpreter, and a model with
the norm in the convs equals one with it in the op."""

import torch
import torch.nn.functional as F

from interpreter_utils import run_in_triton_interpreter

_INTERPRETED = r"""
import torch
from linear_moe.layers import ShortConvolution
from linear_moe.ops.causal_conv import causal_conv
from linear_moe.ops.gated_delta_rule import l2norm

worst = 0.0
# head dims that are not a power of two (lanes past them masked) and one that is; a strided
# slice; with and without bias / SiLU; a width below the backward's 4
for strided, bias, silu, width, head_dim in [(True, True, True, 4, 12), (False, False, True, 3, 16),
                                             (True, False, False, 4, 20)]:
    torch.manual_seed(0)
    batch, seq, channels = 2, 300, 5 * head_dim
    conv = ShortConvolution(channels, width, 0, 1, torch.float32, bias=bias, fused=False,
                            activation="silu" if silu else None, l2norm_head_dim=head_dim)
    wide = torch.randn(batch, seq, 2 * channels if strided else channels)
    x0 = wide[..., :channels] if strided else wide
    dy = torch.randn(batch, seq, channels)
    results = []
    for ours in (True, False):
        x = x0.detach().requires_grad_()
        conv.zero_grad()
        if ours:
            y = causal_conv(x, conv.weight.squeeze(1), conv.bias, conv.activation,
                            l2norm_head_dim=head_dim)
        else:  # the module's torch path: the conv, then the norm
            y = conv(x)
        y.backward(dy)
        results.append([y, x.grad, conv.weight.grad] + ([conv.bias.grad] if bias else []))
    y = results[0][0].unflatten(-1, (-1, head_dim))
    assert torch.allclose(y.norm(dim=-1), torch.ones(()), atol=1e-5)  # unit heads
    for a, b in zip(*results):
        worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
# the torch path is the conv and then the ops' own l2norm
torch.manual_seed(1)
conv = ShortConvolution(24, 4, 0, 1, torch.float32, fused=False, l2norm_head_dim=8)
plain = ShortConvolution(24, 4, 0, 1, torch.float32, fused=False)
plain.load_state_dict(conv.state_dict())
x = torch.randn(2, 50, 24)
assert torch.equal(conv(x), l2norm(plain(x).unflatten(-1, (-1, 8))).flatten(-2))
assert worst < 1e-5, worst
print("ok", worst)
"""


def test_conv_kernels_with_the_qk_l2norm_equal_the_torch_path_in_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED)


def _in_conv_worker(rank, world_size, cases):
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    from dist_utils import grad_errors
    from linear_moe import ops
    from model_utils import tiny_config, tiny_model

    seq, batch, vocab = 16, 2, 128
    results = {}
    for name, overrides in cases:
        runs, asked = [], []
        for in_conv in (False, None):  # in the op / the default: in the convs
            mpu.destroy_model_parallel()
            mpu.initialize_model_parallel(tensor_model_parallel_size=1)
            tensor_parallel.model_parallel_cuda_manual_seed(123)
            torch.manual_seed(123)
            model = tiny_model(tiny_config(layer_type_list="LL", la_qk_l2norm_in_conv=in_conv,
                                           **overrides), "llama3", vocab, seq)
            if runs:
                model.load_state_dict(runs[0][0].state_dict())
            op = {"gated_deltanet": "gated_delta_rule", "deltanet": "delta_rule",
                  "kda": "kda"}[overrides["la_module"]]
            real = getattr(ops, op)

            def spy(*args, use_qk_l2norm=True, **kwargs):
                asked.append(use_qk_l2norm)
                return real(*args, use_qk_l2norm=use_qk_l2norm, **kwargs)

            setattr(ops, op, spy)
            try:
                g = torch.Generator().manual_seed(7)
                tokens = torch.randint(0, vocab, (batch, seq), generator=g)
                labels = torch.randint(0, vocab, (batch, seq), generator=g)
                logits = model(tokens, torch.arange(seq).expand(batch, seq), None)
                loss = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1))
                loss.backward()
            finally:
                setattr(ops, op, real)
            normed = sum(getattr(m, "l2norm_head_dim", None) is not None
                         for m in model.modules())
            runs.append((model, loss.item(), normed))
        (op_model, op_loss, op_normed), (conv_model, conv_loss, conv_normed) = runs
        results[name] = dict(asked=asked, normed=(op_normed, conv_normed),
                             errors={"loss": abs(op_loss - conv_loss),
                                     **grad_errors(conv_model, op_model)})
    mpu.destroy_model_parallel()
    return results


def test_qk_l2norm_in_the_convs_equals_the_ops():
    """Loss and every gradient equal with the norm in the op (--no-la-qk-l2norm-in-conv) and
    in the convs (the default); the op is then asked not to normalise, and the q / k convs of
    both layers normalise. DeltaNet with a q / k activation after the convs (relu) keeps the
    norm in the op."""
    from dist_utils import run_distributed

    cases = [("gated_deltanet", dict(la_module="gated_deltanet")),
             ("deltanet", dict(la_module="deltanet")),
             ("kda", dict(la_module="kda")),
             ("deltanet/relu", dict(la_module="deltanet", la_qk_activation="relu"))]
    (results,) = run_distributed(_in_conv_worker, 1, cases)
    for name, r in results.items():
        moved = name != "deltanet/relu"
        # two layers: the op asked to normalise by both (flag off), then by neither (default)
        assert r["asked"] == [True, True] + [not moved] * 2, (name, r["asked"])
        assert r["normed"] == (0, 4 if moved else 0), (name, r["normed"])
        worst = max(r["errors"], key=r["errors"].get)
        assert r["errors"][worst] < 1e-5, (name, worst, r["errors"][worst])


def _no_conv_worker(rank, world_size):
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    from model_utils import tiny_config, tiny_model

    mpu.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    out = {}
    no_conv = dict(la_module="gated_deltanet", la_use_short_conv=False)
    cases = [("default", None, no_conv), ("required", True, no_conv),
             ("relu", True, dict(la_module="deltanet", la_qk_activation="relu"))]
    try:
        for case, in_conv, overrides in cases:
            try:
                model = tiny_model(tiny_config(la_qk_l2norm_in_conv=in_conv, **overrides),
                                   "llama3", 128, 16)
                out[case] = [m.qk_l2norm_in_conv for m in model.modules()
                             if hasattr(m, "qk_l2norm_in_conv")]
            except ValueError as e:
                out[case] = str(e)
    finally:
        mpu.destroy_model_parallel()
    return out


def test_where_the_norm_cannot_move_it_stays_in_the_op_and_requiring_it_is_refused():
    from dist_utils import run_distributed

    (out,) = run_distributed(_no_conv_worker, 1)
    assert out["default"] and not any(out["default"]), out
    assert "--la-qk-l2norm-in-conv needs a short convolution" in out["required"], out
    # deltanet with a relu after the convs: the norm cannot move there, and asking is refused
    assert "--la-qk-l2norm-in-conv needs deltanet's q/k L2 norm right after" in out["relu"], out
