"""The grouped_mm experts equal megatron-core's SequentialMLP: the grouped GEMM itself (with an
empty expert), and a whole MoE model (SwiGLU experts, shared expert) fwd + bwd with the same
weights and state-dict keys, on one rank and under expert parallelism (EP=2)."""

import pytest
import torch
import torch.nn.functional as F

from dist_utils import grad_errors, run_distributed
from expert_utils import experts_over
from model_utils import tiny_config, tiny_model
from linear_moe.layers.grouped_experts import _GroupedLinear, grouped_mm_unsupported_reason

SEQ, BATCH, VOCAB = 32, 2, 128


def test_grouped_linear_matches_per_group_matmuls_with_an_empty_group():
    torch.manual_seed(0)
    sizes = [5, 0, 9, 2]
    x = torch.randn(sum(sizes), 16, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(32, 16, dtype=torch.float64, requires_grad=True) for _ in sizes]
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    dy = torch.randn(sum(sizes), 32, dtype=torch.float64)

    y = _GroupedLinear.apply(x.float(), offs, *(w.float() for w in weights))
    ref = torch.cat([xs @ w.T for xs, w in zip(x.split(sizes), weights)])
    assert (y.double() - ref).abs().max() < 1e-5
    grads = torch.autograd.grad(y, [x, *weights], dy.float())
    ref_grads = torch.autograd.grad(ref, [x, *weights], dy)
    for g, r in zip(grads, ref_grads):
        assert (g.double() - r).abs().max() < 1e-4 * max(1.0, r.abs().max().item())
    assert grads[2].abs().max() == 0  # the empty expert gets a zero gradient


def _toy_experts(sizes, recompute):
    """SwiGLU experts 16 -> 2 x 32 -> 16 as a function of (x, probs), and their weights."""
    fc1 = [torch.randn(64, 16, requires_grad=True) for _ in sizes]
    fc2 = [torch.randn(16, 32, requires_grad=True) for _ in sizes]
    experts = experts_over(fc1, fc2, moe_act_recompute=recompute)
    return lambda x, probs: experts.forward(x, torch.tensor(sizes), probs)[0], fc1, fc2


@pytest.mark.parametrize("recompute", [False, True], ids=["keep_act", "moe_act_recompute"])
def test_experts_pad_an_unaligned_token_count(recompute):
    """Rows are padded to a multiple of 8 for the weight-gradient GEMM; 13 routed tokens give
    the per-expert loop's outputs and gradients (also with the activation recomputed)."""
    torch.manual_seed(0)
    sizes = [4, 0, 6, 3]
    experts, fc1, fc2 = _toy_experts(sizes, recompute)
    x = torch.randn(sum(sizes), 16, requires_grad=True)
    probs = torch.rand(sum(sizes))
    probs.requires_grad_()
    out = experts(x, probs)
    assert out.shape == (13, 16)
    ref = []
    for xs, ps, a, b in zip(x.split(sizes), probs.split(sizes), fc1, fc2):
        g, u = (xs @ a.T).chunk(2, -1)
        ref.append((F.silu(g) * u * ps[:, None]) @ b.T)
    ref = torch.cat(ref)
    assert (out - ref).abs().max() < 1e-4
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, probs, *fc1, *fc2], dy)
    ref_grads = torch.autograd.grad(ref, [x, probs, *fc1, *fc2], dy)
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() < 1e-3 * max(1.0, r.abs().max().item())


def test_unaligned_or_biased_experts_fall_back_with_a_reason():
    from linear_moe.config import LinearMoEConfig

    cfg = LinearMoEConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                          add_bias_linear=False, gated_linear_unit=True)
    assert grouped_mm_unsupported_reason(cfg, 64, 48) is None
    assert "aligned" in grouped_mm_unsupported_reason(cfg, 64, 6)
    cfg.add_bias_linear = True
    assert "bias" in grouped_mm_unsupported_reason(cfg, 64, 48)


def test_moe_act_recompute_keeps_no_activation_output():
    """With the recompute, backward keeps no [rows, ffn] tensor (the activation's output and, in
    this unfused CPU activation, its intermediates); only fc1's [rows, 2 ffn] output and the
    probabilities are kept, as the fused SwiGLU keeps anyway."""
    def saved_shapes(recompute):
        torch.manual_seed(0)
        experts, _, _ = _toy_experts([5, 3, 0, 9], recompute)  # 17 rows, padded to 24
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            experts(torch.randn(17, 16, requires_grad=True), torch.rand(17))
        return shapes

    assert (24, 32) in saved_shapes(False)
    kept = saved_shapes(True)
    assert (24, 32) not in kept and (24, 64) in kept


def test_moe_act_recompute_needs_grouped_experts():
    from arg_utils import parsed_args
    from linear_moe.arguments import validate_args

    validate_args(parsed_args(["--moe-act-recompute"]))
    for argv, overrides in ((["--moe-act-recompute"], dict(num_experts=None)),
                            (["--moe-act-recompute", "--moe-expert-impl", "sequential"], {})):
        with pytest.raises(ValueError, match="grouped_mm MoE experts only"):
            validate_args(parsed_args(argv, **overrides))


def _build(impl, ep, dtype, act_recompute=False, device_dispatch=False, tp=1):
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    torch.manual_seed(123)
    config = tiny_config(
        params_dtype=dtype, expert_model_parallel_size=ep, tensor_model_parallel_size=tp,
        add_qkv_bias=True, num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32,
        # gloo has no all_to_all_single with split sizes: EP on CPU uses the allgather dispatcher
        moe_token_dispatcher_type="allgather",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
        moe_expert_impl=impl, moe_act_recompute=act_recompute,
        moe_device_dispatch=device_dispatch)
    return tiny_model(config, "qwen2_moe", VOCAB, SEQ).to(dtype)


def _step(model):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    logits = model(tokens, torch.arange(SEQ).expand(BATCH, SEQ), None)
    F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1)).backward()
    return logits.detach().float()


def _compare_worker(rank, world_size, dtype, act_recompute=False):
    from megatron.core import parallel_state as mpu

    from linear_moe.layers.grouped_experts import GroupedMMExperts

    seq = _build("sequential", world_size, dtype)
    grouped = _build("grouped_mm", world_size, dtype, act_recompute)
    assert any(isinstance(m, GroupedMMExperts) for m in grouped.modules())
    assert not any(isinstance(m, GroupedMMExperts) for m in seq.modules())
    assert seq.state_dict().keys() == grouped.state_dict().keys()
    grouped.load_state_dict(seq.state_dict())
    ref, out = _step(seq), _step(grouped)
    scale = ref.abs().max().item()
    errors = {"logits": (out - ref).abs().max().item() / scale,
              **grad_errors(grouped, seq, relative=True)}
    mpu.destroy_model_parallel()
    return errors


@pytest.mark.parametrize("ep,act_recompute", [(1, False), (2, False), (1, True)],
                         ids=["ep1", "ep2", "ep1-moe_act_recompute"])
def test_grouped_experts_equal_sequential_fp32(ep, act_recompute):
    for errors in run_distributed(_compare_worker, ep, torch.float32, act_recompute):
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-5, (worst, errors[worst])


def test_grouped_experts_equal_sequential_bf16():
    (errors,) = run_distributed(_compare_worker, 1, torch.bfloat16)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 3e-2, (worst, errors[worst])


def _device_dispatch_worker(rank, world_size):
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    from linear_moe.cuda_graph import find_host_syncs
    from linear_moe.layers.device_dispatch import DeviceTokenDispatcher

    ref = _build("grouped_mm", 1, torch.float32, tp=world_size)
    dev = _build("grouped_mm", 1, torch.float32, device_dispatch=True, tp=world_size)
    dispatchers = [type(m.token_dispatcher) for m in dev.modules() if hasattr(m, "token_dispatcher")]
    assert dispatchers and all(d is DeviceTokenDispatcher for d in dispatchers)
    assert all(type(m.token_dispatcher) is MoEAllGatherTokenDispatcher
               for m in ref.modules() if hasattr(m, "token_dispatcher"))
    dev.load_state_dict(ref.state_dict())
    expected, out = _step(ref), _step(dev)
    errors = {"logits": (out - expected).abs().max().item() / expected.abs().max().item(),
              **grad_errors(dev, ref, relative=True)}
    syncs = {"megatron-core's dispatcher": sum(find_host_syncs(lambda: _step(ref)).values()),
             "device dispatch": dict(find_host_syncs(lambda: _step(dev)))}
    mpu.destroy_model_parallel()
    return errors, syncs


@pytest.mark.parametrize("tp", [1, 2])
def test_device_dispatch_equals_megatron_allgather_dispatch(tp):
    """--moe-device-dispatch: the same logits and gradients as megatron-core's all-gather
    dispatcher (fp32), without its host reads (the step a CUDA graph can capture)."""
    for errors, syncs in run_distributed(_device_dispatch_worker, tp):
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-5, (worst, errors[worst])
        assert syncs["megatron-core's dispatcher"] > 0 and not syncs["device dispatch"], syncs


def test_device_dispatch_refusals():
    from arg_utils import parsed_args

    from linear_moe.arguments import validate_args

    validate_args(parsed_args(["--moe-device-dispatch"]))
    for argv, overrides, message in (
            ([], dict(num_experts=None), "a model without MoE layers"),
            ([], dict(expert_model_parallel_size=2), "it needs EP 1"),
            (["--moe-expert-impl", "sequential"], {}, "use grouped_mm"),
            ([], dict(moe_expert_capacity_factor=1.0), "token-dropping capacity factor")):
        with pytest.raises(ValueError, match=f"--moe-device-dispatch does not support .*{message}"):
            validate_args(parsed_args(["--moe-device-dispatch", *argv], **overrides))
