"""--mlp-act-recompute: the dense MLP frees its activation's output after fc2's forward and
recomputes it for fc2's backward. The same loss and gradients as megatron-core's MLP (one rank,
and TP=2 with sequence parallelism), no [tokens, ffn] activation output kept, and the flag
refused where it would do nothing."""

import pytest
import torch
import torch.nn.functional as F

from dist_utils import grad_errors, run_distributed
from model_utils import tiny_config, tiny_model

SEQ, BATCH, VOCAB, FFN = 16, 2, 128, 96


def _build(tp, recompute, dtype=torch.float32, parallel_output=False, **overrides):
    """A 2-layer 'LN' llama3-style dense model (test_cross_entropy builds it too)."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    torch.manual_seed(123)
    config = tiny_config(params_dtype=dtype, tensor_model_parallel_size=tp,
                         mlp_act_recompute=recompute, **overrides)
    return tiny_model(config, "llama3", VOCAB, SEQ, parallel_output).to(dtype)


def _loss(model):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    logits = model(tokens, torch.arange(SEQ).expand(BATCH, SEQ), None)
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1))


def _compare_worker(rank, world_size, bias):
    from megatron.core import parallel_state as mpu

    from linear_moe.layers import mlp as mlp_module

    plain = _build(world_size, recompute=False, add_bias_linear=bias)
    recomputing = _build(world_size, recompute=True, add_bias_linear=bias)
    assert sum(isinstance(m, mlp_module.ActivationRecomputeMLP)
               for m in recomputing.modules()) == 2
    assert not any(isinstance(m, mlp_module.ActivationRecomputeMLP) for m in plain.modules())
    recomputing.load_state_dict(plain.state_dict())
    fused_calls = []
    apply = mlp_module._SwiGLULinear.apply
    mlp_module._SwiGLULinear.apply = lambda *a: fused_calls.append(1) or apply(*a)
    try:
        ref_loss, loss = _loss(plain), _loss(recomputing)
    finally:
        mlp_module._SwiGLULinear.apply = apply
    ref_loss.backward()
    loss.backward()
    errors = {"loss": abs(loss.item() - ref_loss.item()), **grad_errors(recomputing, plain)}
    mpu.destroy_model_parallel()
    return errors, len(fused_calls)


# No fc1 bias: the activation and fc2 through _SwiGLULinear (recompute folded into the
# backward), once per layer; with a bias: megatron-core's fc2 and the CheckpointWithoutOutput
# recompute.
@pytest.mark.parametrize("tp,bias", [(1, False), (2, False), (1, True), (2, True)],
                         ids=["tp1", "tp2-sp", "tp1-bias", "tp2-sp-bias"])
def test_recomputing_mlp_equals_megatron_mlp(tp, bias):
    for errors, fused_calls in run_distributed(_compare_worker, tp, bias):
        assert fused_calls == (0 if bias else 2)
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-6, (worst, errors[worst])


def _kept_shapes_worker(rank, world_size, recompute):
    """Shapes of the tensors the MLP saves for backward whose storage is still allocated when
    its forward returns (the recompute frees fc2's saved input in place)."""
    from megatron.core import parallel_state as mpu

    model = _build(1, recompute)
    mlp = model.decoder.layers[0].mlp
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(SEQ, BATCH, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = mlp(x)
    kept = [tuple(t.shape) for t in saved if t.untyped_storage().size() > 0]
    out.sum().backward()  # the recompute must still give the gradient
    assert x.grad is not None and torch.isfinite(x.grad).all()
    mpu.destroy_model_parallel()
    return kept


def test_recomputing_mlp_keeps_no_activation_output():
    """Without the flag fc2 keeps the [s, b, ffn] activation output (and this unfused CPU SwiGLU
    keeps its halves); with it only fc1's [s, b, 2 ffn] output is kept, for the recompute."""
    (kept,) = run_distributed(_kept_shapes_worker, 1, False)
    (kept_recompute,) = run_distributed(_kept_shapes_worker, 1, True)
    assert (SEQ, BATCH, FFN) in kept
    assert (SEQ, BATCH, FFN) not in kept_recompute and (SEQ, BATCH, 2 * FFN) in kept_recompute


def test_mlp_act_recompute_needs_a_dense_layer():
    from arg_utils import parsed_args
    from linear_moe.arguments import validate_args

    validate_args(parsed_args(["--mlp-act-recompute"], num_experts=None))
    validate_args(parsed_args(["--mlp-act-recompute"], moe_layer_freq=[0, 1, 1, 1]))
    with pytest.raises(ValueError, match="every layer here is MoE; use --moe-act-recompute"):
        validate_args(parsed_args(["--mlp-act-recompute"]))


def test_mlp_act_recompute_refuses_activations_it_cannot_recompute():
    from types import SimpleNamespace

    from linear_moe.layers.mlp import activation_recompute_unsupported_reason

    base = dict(bias_activation_fusion=False, gated_linear_unit=True, activation_func=F.silu,
                use_te_activation_func=False, activation_func_clamp_value=None)
    assert activation_recompute_unsupported_reason(SimpleNamespace(**base)) is None
    for change, words in ((dict(use_te_activation_func=True), "TransformerEngine"),
                          (dict(activation_func_clamp_value=7.0), "clamped"),
                          (dict(bias_activation_fusion=True, activation_func=F.gelu), "SwiGLU")):
        reason = activation_recompute_unsupported_reason(SimpleNamespace(**{**base, **change}))
        assert reason and words in reason
