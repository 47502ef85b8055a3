"""Issue 5 item 3's "equal numerics": our gated_deltanet layer and megatron-core's own
GatedDeltaNet layer (benchmarks/native_gdn.py, e2e_bench's `megatron_gdn` comparator), given the
same weights, compute the same function.

megatron-core's layer runs on CUDA only (fla's l2norm and conv inside, parameters made on the
current device), so this is a GPU test. The truth is our layer in fp32 through the torch
reference op; both bf16 layers (ours with fla's kernels, megatron-core's) are measured against it,
output and every gradient, and must be as close to it as each other (within 2x, or ABS_TOL).
"""

import os
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("megatron_single_gpu")]

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

SEQ, BATCH, HIDDEN, HEADS = 300, 2, 256, 2  # head dims 128: fla's proven path on Hopper
FACTOR, ABS_TOL = 2.0, 2e-2


def _config(la_module, backend, dtype):
    from linear_moe.config import LinearMoEConfig, resolve_mixer_defaults

    config = LinearMoEConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS,
                             params_dtype=dtype, bf16=dtype == torch.bfloat16,
                             normalization="RMSNorm", add_bias_linear=False,
                             gradient_accumulation_fusion=False, la_module=la_module,
                             la_num_heads=HEADS, la_expand_k=1.0, la_expand_v=1.0,
                             la_backend=backend, activation_func=torch.nn.functional.silu)
    # (megatron-core's layer gates with config.activation_func: SiLU, as in the presets)
    resolve_mixer_defaults(config)
    return config


def _ours(backend, dtype):
    from linear_moe.registry import get_mixer

    return get_mixer("gated_deltanet").builder(_config("gated_deltanet", backend, dtype),
                                               layer_number=1).cuda()


def _megatron_core(ours):
    """megatron-core's layer with our layer's weights: in_proj is [q | k | v | z | beta | alpha]
    (its in_proj_split_names), conv1d is [q | k | v]."""
    import native_gdn  # noqa: F401  (registers megatron_gdn)
    from linear_moe.registry import get_mixer

    theirs = get_mixer("megatron_gdn").builder(
        _config("megatron_gdn", "fla", torch.bfloat16), layer_number=1).cuda()
    with torch.no_grad():
        theirs.in_proj.weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight,
                                               ours.v_proj.weight, ours.g_proj.weight,
                                               ours.b_proj.weight, ours.a_proj.weight]))
        theirs.conv1d.weight.copy_(torch.cat([ours.q_conv.weight, ours.k_conv.weight,
                                              ours.v_conv.weight]))
        for mine, its in ((ours.A_log, theirs.A_log), (ours.dt_bias, theirs.dt_bias),
                          (ours.o_norm.weight, theirs.out_norm.weight),
                          (ours.o_proj.weight, theirs.out_proj.weight)):
            its.copy_(mine)
    return theirs


def _grads_in_our_names(layer, theirs: bool):
    if not theirs:
        return {n: p.grad for n, p in layer.named_parameters()}
    widths = [layer.qk_dim_local_tp, layer.qk_dim_local_tp, layer.v_dim_local_tp,
              layer.v_dim_local_tp, layer.num_value_heads, layer.num_value_heads]
    q, k, v, g, b, a = layer.in_proj.weight.grad.split(widths)
    cq, ck, cv = layer.conv1d.weight.grad.split(widths[:3])
    return {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v, "g_proj.weight": g,
            "b_proj.weight": b, "a_proj.weight": a, "q_conv.weight": cq, "k_conv.weight": ck,
            "v_conv.weight": cv, "A_log": layer.A_log.grad, "dt_bias": layer.dt_bias.grad,
            "o_norm.weight": layer.out_norm.weight.grad, "o_proj.weight": layer.out_proj.weight.grad}


def _run(layer, x, dout, theirs=False):
    x = x.detach().clone().requires_grad_()
    out, _ = layer(x, None)
    out.backward(dout.to(out.dtype))
    return {"output": out, "input_grad": x.grad, **_grads_in_our_names(layer, theirs)}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def test_our_gdn_layer_matches_megatron_core_gdn_layer():
    torch.manual_seed(0)
    ref = _ours("reference", torch.float32)
    ours = _ours("fla", torch.bfloat16)
    ours.load_state_dict({k: v.to(torch.bfloat16) if torch.is_tensor(v) else v
                          for k, v in ref.state_dict().items()})  # megatron's _extra_state: None
    theirs = _megatron_core(ours)
    x = torch.randn(SEQ, BATCH, HIDDEN, device="cuda")
    dout = torch.randn(SEQ, BATCH, HIDDEN, device="cuda")
    truth = _run(ref, x, dout)
    ours_err = {n: _rel(t, truth[n]) for n, t in _run(ours, x.bfloat16(), dout).items()}
    theirs_err = {n: _rel(t, truth[n])
                  for n, t in _run(theirs, x.bfloat16(), dout, theirs=True).items()}
    assert set(ours_err) == set(theirs_err) == set(truth)
    path = os.environ.get("LINEAR_MOE_GPU_RESULTS")
    if path:
        import json

        with open(path, "a") as f:
            f.write(json.dumps({"test": "gdn_ours_vs_megatron_core_vs_fp32",
                                "ours_rel_err": ours_err, "megatron_core_rel_err": theirs_err,
                                "device": torch.cuda.get_device_name()}) + "\n")
    apart = {n: (f"ours {ours_err[n]:.2e}", f"megatron-core {theirs_err[n]:.2e}")
             for n in truth
             if max(ours_err[n], theirs_err[n]) > max(ABS_TOL, FACTOR * min(ours_err[n],
                                                                            theirs_err[n]))}
    assert not apart, f"the two layers differ beyond bf16 noise: {apart}"
    assert ours_err["output"] <= ABS_TOL and theirs_err["output"] <= ABS_TOL
