"""TP=2 (two gloo processes) gives the logits and gradients of TP=1, for every mixer in a hybrid
'LN' model: with a dense MLP, and with MoE + sequence parallelism (what MoE with TP>1 needs).

The TP=2 model is loaded with the TP=1 model's weights (sliced along each parameter's TP dim),
so the comparison tests the forward/backward math of the sharded layers, not initialisation.
"""

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from model_utils import tiny_config, tiny_model
from linear_moe.registry import registered_mixers

SEQ, BATCH, VOCAB = 24, 2, 128
TOL = 1e-5


def _config(la_module, tp, moe, **overrides):
    moe_fields = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
                      moe_shared_expert_intermediate_size=48) if moe else {}
    return tiny_config(
        tensor_model_parallel_size=tp, sequence_parallel=moe and tp > 1, add_qkv_bias=True,
        gated_linear_unit=False, activation_func=F.gelu, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none", la_module=la_module, la_chunk_size=8,
        la_num_heads=overrides.pop("la_num_heads", 4), la_ssm_groups=2, la_ssm_state_dim=8,
        la_use_short_conv=None,  # the mixer default (convs are covered by the mixers that have them)
        **moe_fields, **overrides)


def _init_parallel(tp):
    # Once per TP size, not per case: gloo groups' threads outlive destroy_model_parallel, and
    # 68 initialisations in one process left ~4,000 of them (CI time went from 1 to 9 min).
    from megatron.core import parallel_state as mpu

    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(tensor_model_parallel_size=tp)


def _build(la_module, tp, moe, **overrides):
    """The model under the current parallel state, which _init_parallel(tp) set up."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123)
    torch.manual_seed(123)
    return tiny_model(_config(la_module, tp, moe, **overrides), "qwen2_moe", VOCAB, SEQ)


def _step(model):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    logits = model(tokens, positions, None)
    loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1))
    loss.backward()
    return logits.detach()


def _reduce_sequence_parallel_grads(model, group):
    # What finalize_model_grads does for SP: norms/router see a sequence shard per rank.
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            torch.distributed.all_reduce(p.grad, group=group)


def _gather(t, p, group, world):
    if not getattr(p, "tensor_model_parallel", False):
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=p.partition_dim)


def _reference(la_module, moe, overrides):
    ref = _build(la_module, 1, moe, **overrides)
    logits = _step(ref)
    params = {n: p.detach().clone() for n, p in ref.named_parameters()}
    grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    return logits, params, grads


def _tp2_errors(la_module, moe, overrides, reference):
    from megatron.core import parallel_state as mpu

    ref_logits, ref_params, ref_grads = reference
    model = _build(la_module, 2, moe, **overrides)
    tp_group, tp_rank = mpu.get_tensor_model_parallel_group(), mpu.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = ref_params[name]
            if getattr(p, "tensor_model_parallel", False):
                full = full.chunk(2, dim=p.partition_dim)[tp_rank]
            assert full.shape == p.shape, (name, full.shape, p.shape)
            p.copy_(full)
    logits = _step(model)
    _reduce_sequence_parallel_grads(model, tp_group)

    errors = {"logits": (logits - ref_logits).abs().max().item()}
    for name, p in model.named_parameters():
        if name not in ref_grads:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        grad = _gather(p.grad, p, tp_group, 2)
        errors[name] = (grad - ref_grads[name]).abs().max().item()
    return errors, len(ref_grads)


def _reported(fn, *args):
    import traceback

    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - the case's test reports it
        return traceback.format_exc()


def tp_parity_cases(cases):
    """[(max abs error per tensor, number of grads) or a traceback] for each (la_module, moe,
    overrides) case: every TP=1 reference under one initialisation, then every TP=2 model under
    one (spawning, importing and initialising cost more than most cases)."""
    from megatron.core import parallel_state as mpu

    _init_parallel(1)
    references = [_reported(_reference, *case) for case in cases]
    _init_parallel(2)
    results = [ref if isinstance(ref, str) else _reported(_tp2_errors, *case, ref)
               for case, ref in zip(cases, references)]
    mpu.destroy_model_parallel()
    return results


def _tp_parity_worker(rank, world_size, la_module, moe, overrides=None):
    result = tp_parity_cases([(la_module, moe, overrides or {})])[0]
    assert not isinstance(result, str), result
    return result


def assert_tp_parity(result, label=""):
    """One rank's tp_parity_cases result: no traceback, >10 grads compared, all <= TOL."""
    assert not isinstance(result, str), result
    errors, num_grads = result
    assert num_grads > 10, label
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{label} {worst}: max abs diff {errors[worst]:.3e}"
    return errors


def _tp_parity_batch_worker(rank, world_size, cases):
    results = tp_parity_cases([(la_module, moe, {}) for la_module, moe in cases])
    return dict(zip(cases, results))


# One xdist worker for the module (make test: --dist loadgroup), so the fixture runs once.
pytestmark = pytest.mark.xdist_group("tp_parity")


@pytest.fixture(scope="module")
def tp_parity_results(request):
    """Results of all test_tp2_matches_tp1 cases this session selected, computed once."""
    cases = [(item.callspec.params["la_module"], item.callspec.params["moe"])
             for item in request.session.items
             if getattr(item, "originalname", None) == "test_tp2_matches_tp1"
             and item.module is request.module]  # a same-named test elsewhere is not ours
    return run_distributed(_tp_parity_batch_worker, 2, cases)


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe_sp"])
@pytest.mark.parametrize("la_module", sorted(registered_mixers()))
def test_tp2_matches_tp1(la_module, moe, tp_parity_results):
    for rank_results in tp_parity_results:
        errors = assert_tp_parity(rank_results[(la_module, moe)])
        assert any(".self_attention.o_proj." in n for n in errors), "mixer grads not compared"
