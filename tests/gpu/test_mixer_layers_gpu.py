"""Whole model on the GPU: each mixer with the fla kernels in bf16 against the same weights run
through the fp32 torch reference op (fp32 weights), forward logits and every gradient.

This checks the glue around the kernels (layouts, gates, norms, TP-sharded projections) on the
path training actually takes, beyond the op-level parity of test_fla_parity.py.

A whole model in bf16 is not within 1e-2 of fp32 even without any fla kernel: the first GPU run
(H100, session 3) measured 1.2-1.6e-2 on the MLP and layernorm weights' gradients, and more on
gradients that are sums of many cancelling terms (decay biases, dt_bias). So the bar is the bf16
noise floor, measured in the same test: the same weights in bf16 through the *torch reference*
op. The fla kernels must not add error beyond it: per tensor, the fla model's error against fp32
is at most FLOOR_FACTOR x the bf16 reference model's, or ABS_TOL, whichever is larger.
gated_deltanet's A_log / dt_bias gradients, per-head sums that cancel up to 15-fold, are judged
against their terms' magnitudes instead (_decay_sums_against_their_terms).
"""

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("megatron_single_gpu")]

from megatron.core import tensor_parallel

from linear_moe.ops import fla_compat
from linear_moe.registry import registered_mixers

SEQ, BATCH, VOCAB = 300, 2, 512  # 300: not a multiple of the 64-token chunk
# Weights and tokens; another seed tells a tensor's error near its bound from a systematic one.
SEED = int(os.environ.get("LINEAR_MOE_TEST_SEED", "0"))
FLOOR_FACTOR, ABS_TOL = 2.0, 2e-2


def _model(la_module, head_dim, backend, dtype, device="cuda"):
    """The test's two-layer "LN" model (scripts/probes/gdn_decay_grad_precision.py builds it on
    the CPU too)."""
    from megatron.core.models.gpt import GPTModel

    from linear_moe.config import LinearMoEConfig, resolve_mixer_defaults
    from linear_moe.model_provider import decoder_block_spec

    hidden, heads = 2 * head_dim * 2, 2  # la heads of exactly head_dim with expand_k = 0.5
    config = LinearMoEConfig(
        num_layers=2, hidden_size=hidden, num_attention_heads=4, ffn_hidden_size=2 * hidden,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, normalization="RMSNorm",
        add_bias_linear=False, add_qkv_bias=True, gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, hidden_dropout=0.0,
        attention_dropout=0.0, la_module=la_module, layer_type_list="LN", la_num_heads=heads,
        la_expand_k=head_dim * heads / hidden, la_expand_v=head_dim * heads / hidden,
        la_backend=backend, use_cpu_initialization=device == "cpu",
    )
    resolve_mixer_defaults(config)
    model = GPTModel(config, decoder_block_spec(config, "qwen2_moe"), vocab_size=VOCAB,
                     max_sequence_length=SEQ, position_embedding_type="rope")
    return model.to(device)


def _run(model, tokens, labels):
    positions = torch.arange(SEQ, device=tokens.device).expand(BATCH, SEQ)
    logits = model(tokens, positions, None)
    F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1)).backward()
    return logits.float()


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _in_bf16(state_dict):
    """A model's state in bf16 (megatron's _extra_state entries are None: kept)."""
    return {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in state_dict.items()}


def _errors(model, ref, logits_ref, tokens, labels):
    """model's logits and every parameter's gradient against ref's (run before, its logits
    logits_ref), as relative L2 errors by name."""
    err = {"logits": _rel(_run(model, tokens, labels), logits_ref)}
    ref_params = dict(ref.named_parameters())
    err.update({n: _rel(p.grad, ref_params[n].grad) for n, p in model.named_parameters()})
    return err


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("la_module", sorted(registered_mixers()))
def test_fla_model_matches_fp32_reference(la_module, head_dim, monkeypatch):
    if la_module == "simple_gla" and not fla_compat.should_lift("simple_gla", head_dim):
        pytest.skip("simple_gla's gated chunk backward is behind fla's Hopper guard until "
                    "test_fla_parity proves it (fla_compat.PROVEN_GATED_BWD)")
    if (la_module == "mamba2" and fla_compat.hopper_guard_active()
            and fla_compat.guard_policy() != "lift_all"):
        pytest.skip("mamba2's chunk backward is refused on this GPU (see linear_moe/mixers/"
                    "mamba2.py); LINEAR_MOE_FLA_HOPPER_GUARD=lift_all measures it")
    # megatron-core draws TP-sharded weights from its own RNG tracker: reseed it too, or a
    # test's weights depend on the tests run before it in the process (session 12: "seed 0"
    # drew other weights in a batch than alone). The fixture's seed, so a lone run is unchanged.
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    torch.manual_seed(SEED)
    ref = _model(la_module, head_dim, "reference", torch.float32)
    weights_bf16 = _in_bf16(ref.state_dict())
    fast = _model(la_module, head_dim, "fla", torch.bfloat16)
    fast.load_state_dict(weights_bf16)
    floor = _model(la_module, head_dim, "reference", torch.bfloat16)
    floor.load_state_dict(weights_bf16)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
    decays = _capture_log_decay(monkeypatch) if la_module == "gated_deltanet" else None
    logits_ref = _run(ref, tokens, labels)
    fla_err = _errors(fast, ref, logits_ref, tokens, labels)
    floor_err = _errors(floor, ref, logits_ref, tokens, labels)
    extra = {}
    if decays is not None:
        extra = _decay_sums_against_their_terms(decays, ref, fast, floor, fla_err, floor_err)
    bound = {n: max(ABS_TOL, FLOOR_FACTOR * floor_err[n]) for n in fla_err}
    _record(la_module, head_dim, fla_err, floor_err, extra)
    over = {n: (f"fla {fla_err[n]:.2e}", f"bf16 floor {floor_err[n]:.2e}")
            for n in fla_err if fla_err[n] > bound[n]}
    assert not over, f"fla adds error beyond the bf16 floor: {over}"
    assert any("self_attention.o_proj" in n for n in fla_err)


def _append_result(row):
    """One row to $LINEAR_MOE_GPU_RESULTS (the device jobs bring it back), with seed and device."""
    path = os.environ.get("LINEAR_MOE_GPU_RESULTS")
    if path:
        import json

        with open(path, "a") as f:
            f.write(json.dumps({**row, "seed": SEED,
                                "device": torch.cuda.get_device_name()}) + "\n")


def _capture_log_decay(monkeypatch):
    """gated_deltanet's per-position log decay g (its gradient kept) and input a, one entry per
    forward in run order (reference, fla, floor: the test's model has one such layer)."""
    from linear_moe.mixers import gated_deltanet

    seen = []

    def keeping(log_decay):
        def wrapped(a, A_log, dt_bias):
            g = log_decay(a, A_log, dt_bias)
            g.retain_grad()
            seen.append((a.detach(), g))
            return g
        return wrapped

    for name in ("_log_decay", "_log_decay_cuda"):  # mix() looks them up at each call
        monkeypatch.setattr(gated_deltanet, name, keeping(getattr(gated_deltanet, name)))
    return seen


def _decay_sums_against_their_terms(decays, ref, fast, floor, fla_err, floor_err):
    """A_log's and dt_bias's gradients are per-head sums over the batch's 600 positions of
    dg * dg/dtheta (g the log decay), terms of both signs. Each sum's error is judged against the
    sum of its terms' magnitudes, the usual measure of a summation's accuracy (it exceeds the
    sum by the condition number: 15.6 at seeds 0 and 1, 2.7 at seed 2 for hd64, 4.4 for hd128;
    H100, session 28; recorded), and the terms' varying factor, the per-position gate gradient
    dg, by the floor rule like every other tensor. Why: relative to the sum, fla's bf16 kernels
    at head_dim 64 gave these two 2.6e-2 / 3.6e-2 at seeds 0 / 1 against a floor of 4e-3 /
    1.4e-2 (1.7e-3 / 2.3e-3 of the terms' magnitudes, under bf16's unit roundoff 3.9e-3), with
    dg itself at the floor (seed 1: 1.50e-2 against 1.48e-2), and fla in fp32 gives them within
    3.2e-3 of the reference (test below): the glue is right, and what bf16 costs on them is
    recorded (decay_sums) rather than bounded by a floor that swings with the draw's
    cancellation."""
    from linear_moe.mixers.gated_deltanet import _log_decay

    (a_ref, g_ref), (_, g_fla), (_, g_floor) = decays
    fla_err["gate_grad"], floor_err["gate_grad"] = (_rel(g.grad, g_ref.grad)
                                                    for g in (g_fla, g_floor))
    names = [n for n, _ in ref.named_parameters() if n.endswith(("A_log", "dt_bias"))]
    ref_params = dict(ref.named_parameters())
    thetas = [ref_params[n].detach().requires_grad_() for n in names]
    # dg/dA_log = g and dg/ddt_bias = -exp(A_log) sigmoid(a + dt_bias): both negative at every
    # position, so the gradient of sum(|dg| * g) is minus the sum of the terms' magnitudes.
    magnitudes = torch.autograd.grad((g_ref.grad.abs() * _log_decay(a_ref, *thetas)).sum(),
                                     thetas)
    extra = {}
    grads = {"fla": dict(fast.named_parameters()), "floor": dict(floor.named_parameters())}
    for name, magnitude in zip(names, magnitudes):
        ref_grad = ref_params[name].grad.float()
        scale = magnitude.float().norm()
        extra[name] = {"rel_to_sum": (fla_err[name], floor_err[name]),
                       "condition": (scale / ref_grad.norm()).item()}
        fla_err[name], floor_err[name] = (
            ((grads[m][name].grad.float() - ref_grad).norm() / scale).item()
            for m in ("fla", "floor"))
    return extra


def _record(la_module, head_dim, fla_err, floor_err, extra=None):
    # The five tensors closest to (or over) their bound, to tell a kernel issue from bf16 noise.
    ranked = sorted(fla_err, key=lambda n: -fla_err[n] / max(ABS_TOL, FLOOR_FACTOR * floor_err[n]))
    _append_result({"test": "model_fla_bf16_vs_reference_fp32", "mixer": la_module,
                    "head_dim": head_dim, "max_rel_err": max(fla_err.values()),
                    "max_floor_err": max(floor_err.values()),
                    "closest_to_bound": [(n, fla_err[n], floor_err[n]) for n in ranked[:5]],
                    "guard_policy": fla_compat.guard_policy(), **({"decay_sums": extra}
                                                                    if extra else {})})


FP32_TOL = 1e-2  # Triton's dots take fp32 inputs as tf32 (10-bit mantissa) unless told otherwise


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("la_module", ["gated_deltanet", "gla"])
def test_fla_model_in_fp32_matches_fp32_reference(la_module, head_dim):
    """The same model with fla's kernels fed fp32 (weights and activations) against the fp32
    reference: what is left is the kernels' algorithm (chunked, tf32 dots), not bf16 rounding.
    Session 27: gated_deltanet hd64's A_log / dt_bias gradients were 2.2-2.6e-2 from fp32 in bf16
    over three weight draws while the bf16 reference's floor ranged 4e-3 to 2e-2; this tells a
    glue or kernel error (large here too) from precision the bf16 kernels lose (small here)."""
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    torch.manual_seed(SEED)
    ref = _model(la_module, head_dim, "reference", torch.float32)
    fast = _model(la_module, head_dim, "fla", torch.float32)
    fast.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
    err = _errors(fast, ref, _run(ref, tokens, labels), tokens, labels)
    worst = sorted(err, key=err.get, reverse=True)[:5]
    _append_result({"test": "model_fla_fp32_vs_reference_fp32", "mixer": la_module,
                    "head_dim": head_dim, "worst": [(n, err[n]) for n in worst]})
    over = {n: f"{e:.2e}" for n, e in err.items() if e > FP32_TOL}
    assert not over, f"fla's kernels in fp32 differ from the fp32 reference: {over}"
