"""CP=2 (two gloo processes) gives the logits and gradients of CP=1, for every mixer with
context-parallel support in a hybrid 'LN' model (the 'N' layer: SDPA over all-gathered keys and
values), dense and with MoE, and under TP=2 x CP=2 (four ranks). (Training through
megatron.training under CP=2, resumed from a single-rank checkpoint:
tests/test_parallel_resume.py.)

Each rank feeds its two chunks of megatron's CP layout (chunks r and 2*cp-1-r of 2*cp), as
megatron.training's get_batch_on_this_cp_rank cuts them; the CP=2 model is loaded with the CP=1
model's weights, and its gradients are summed over the CP ranks as the data-parallel reduction
over the dp x cp group does. The convs (GDN, KDA, DeltaNet, Mamba2 by default) and token shifts
(RWKV) read across the chunk borders, the recurrences carry state across them, and the 'N'
layer's keys cross them, so a missing exchange fails at ~1e-2 to 1e-1 (the logits of the same
chunks run without context differ by that much).
"""

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from model_utils import tiny_config, tiny_model
from linear_moe.registry import registered_mixers

SEQ, BATCH, VOCAB, CP = 32, 2, 128, 2
TOL = 1e-5
CP_MIXERS = sorted(n for n, e in registered_mixers().items() if e.supports_cp)
# (mixer, MoE, config overrides); MoM with a capacity: its queues continue across the ranks
CASES = ([(m, False, ()) for m in CP_MIXERS] + [("gated_deltanet", True, ()), ("rwkv6", True, ())]
         + [("mom_gla", False, (("la_mom_capacity_factor", 0.5),))])


def _this_rank(t, rank, cp=CP):
    """megatron's CP layout: chunks rank and 2*cp-1-rank of 2*cp along dim 1."""
    c = t.shape[1] // (2 * cp)
    first, second = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat([t[:, first:first + c], t[:, second:second + c]], 1)


def _build(la_module, cp, moe, overrides=(), tp=1, glu=True):
    from megatron.core import tensor_parallel

    moe_fields = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
                      moe_token_dispatcher_type="alltoall",
                      moe_router_load_balancing_type="none") if moe else {}
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    torch.manual_seed(123)
    mlp = {} if glu else dict(gated_linear_unit=False, activation_func=F.gelu)
    config = tiny_config(la_module=la_module, context_parallel_size=cp, la_chunk_size=8,
                         la_ssm_groups=2, la_ssm_state_dim=8, tensor_model_parallel_size=tp,
                         sequence_parallel=tp > 1, **mlp, **moe_fields, **dict(overrides))
    return tiny_model(config, "qwen2_moe", VOCAB, SEQ)


def _batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return tokens, labels, torch.arange(SEQ).expand(BATCH, SEQ)


def _parallel_worker(rank, world_size, cases, tp=1):
    """Every case's one-rank reference, then its run under TP=tp x CP=2 (world_size = 2 tp):
    weights copied from the reference (sliced along their TP dim), this CP rank's chunks in,
    gradients summed over CP (and over TP for the sequence-parallel norms), each rank's shard
    compared; {case: (per-tensor max abs error, control) or a traceback}."""
    import traceback

    from megatron.core import parallel_state as mpu

    from test_tp_parity import _reduce_sequence_parallel_grads

    # no GLU under TP: megatron interleaves a GLU's halves per TP rank, which slicing cannot
    glu = tp == 1
    tokens, labels, positions = _batch()
    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(1)
    cp_rank = rank // tp  # megatron's rank order is tp-cp-...: TP varies fastest
    references = {}
    for case in cases:
        model = _build(case[0], 1, case[1], case[2], glu=glu)
        logits = model(tokens, positions, None)
        F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1)).backward()
        with torch.no_grad():  # the control: this rank's chunks without what precedes them
            alone = model(_this_rank(tokens, cp_rank), _this_rank(positions, cp_rank), None)
        references[case] = (logits.detach(), {n: (p.detach().clone(), p.grad.clone())
                                              for n, p in model.named_parameters()
                                              if p.grad is not None},
                            (alone - _this_rank(logits, cp_rank)).abs().max().item())
    mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=CP)
    assert cp_rank == mpu.get_context_parallel_rank()
    tp_rank = mpu.get_tensor_model_parallel_rank()
    results = {}
    for case in cases:
        try:
            ref_logits, ref, control = references[case]
            model = _build(case[0], CP, case[1], case[2], tp=tp, glu=glu)
            params = dict(model.named_parameters())

            def shard(name, full):
                p = params[name]
                if getattr(p, "tensor_model_parallel", False):
                    return full.chunk(tp, dim=p.partition_dim)[tp_rank]
                return full

            with torch.no_grad():
                for name, (weight, _) in ref.items():
                    params[name].copy_(shard(name, weight))
            logits = model(_this_rank(tokens, cp_rank), _this_rank(positions, cp_rank), None)
            # this rank's share of the mean over every token of the sequence
            loss = F.cross_entropy(logits.reshape(-1, VOCAB),
                                   _this_rank(labels, cp_rank).reshape(-1), reduction="sum")
            (loss / labels.numel()).backward()
            if tp > 1:
                _reduce_sequence_parallel_grads(model, mpu.get_tensor_model_parallel_group())
            errors = {"logits": (logits.detach()
                                 - _this_rank(ref_logits, cp_rank)).abs().max().item()}
            for name, (_, grad) in ref.items():
                mine = params[name].grad.clone()
                torch.distributed.all_reduce(mine, group=mpu.get_context_parallel_group())
                errors[name] = (mine - shard(name, grad)).abs().max().item()
            results[case] = (errors, control)
        except Exception:  # noqa: BLE001 - the case's test reports it
            results[case] = traceback.format_exc()
    mpu.destroy_model_parallel()
    return results


# One xdist worker for the module (make test: --dist loadgroup), so the fixture runs once.
pytestmark = pytest.mark.xdist_group("cp_parity")


@pytest.fixture(scope="module")
def cp_results():
    return run_distributed(_parallel_worker, CP, CASES)


@pytest.mark.parametrize("case", CASES, ids=[
    f"{m}-{'moe' if moe else 'dense'}" + "".join(f"-{k}={v}" for k, v in o) for m, moe, o in CASES])
def test_cp2_matches_cp1(case, cp_results):
    for rank_results in cp_results:
        result = rank_results[case]
        assert not isinstance(result, str), result
        errors, control = result
        assert any(".self_attention.o_proj." in n for n in errors), "mixer grads not compared"
        assert len(errors) > 10
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOL, f"{worst}: max abs diff {errors[worst]:.3e}"
    # rank 1's chunks follow others: run alone, their logits are far off, so TOL can tell
    assert cp_results[1][case][1] > 1e-3



TP = 2
TP_CP_CASES = [("gated_deltanet", True, ()), ("rwkv7", False, ()), ("retention", False, ())]


@pytest.mark.slow
def test_tp2_cp2_matches_one_rank():
    for rank_results in run_distributed(_parallel_worker, TP * CP, TP_CP_CASES, TP):
        for case, result in rank_results.items():
            assert not isinstance(result, str), result
            errors = result[0]
            assert any(".self_attention.o_proj." in n for n in errors), case
            worst = max(errors, key=errors.get)
            assert errors[worst] <= TOL, f"{case} {worst}: max abs diff {errors[worst]:.3e}"


def _state_passing_worker(rank, world_size):
    """linear attention with its normaliser (a tuple state (S, z)) through state_passing, with
    the probe pass and with the identity shortcut, against the whole sequence; {form: error}."""
    from linear_moe.ops import linear_attn
    from linear_moe.parallel.context_parallel import SequenceChunks

    g = torch.Generator().manual_seed(5)
    q, k = (F.elu(torch.randn(2, 64, 2, 8, generator=g)) + 1 for _ in range(2))
    v = torch.randn(2, 64, 2, 8, generator=g)
    whole, _ = linear_attn(q, k, v, normalize=True, chunk_size=8)
    chunks = SequenceChunks(torch.distributed.group.WORLD)
    mine = [_this_rank(t, rank) for t in (q, k, v)]
    errors = {}
    for identity in (False, True):
        o, _ = chunks.state_passing(linear_attn, tuple(mine),
                                    dict(normalize=True, chunk_size=8), 2, identity)
        errors[identity] = (o - _this_rank(whole, rank)).abs().max().item()
    return errors


def test_state_passing_carries_a_normaliser_with_and_without_the_probe():
    for errors in run_distributed(_state_passing_worker, CP):
        assert max(errors.values()) <= TOL, errors


def _widened_inputs(op_name, g):
    """Small inputs for an ops.WIDENED_PROBE op: V (4) unlike K (8), so a mixed-up state side
    fails."""
    B, T, H, K, V = 2, 32, 2, 8, 4
    rand = lambda *shape: torch.randn(*shape, generator=g)
    q, k = rand(B, T, H, K), rand(B, T, H, K)
    v, beta = rand(B, T, H, V), rand(B, T, H).sigmoid()
    if op_name == "delta_rule":
        return (q, k, v, beta)
    if op_name == "gated_delta_rule":
        return (q, k, v, -rand(B, T, H).exp() * 0.1, beta)
    if op_name == "kda":
        return (q, k, v, -rand(B, T, H, K).exp() * 0.1, beta)
    kk = F.normalize(rand(B, T, H, K), dim=-1)  # rwkv7(r, w, k, v, a, b), as the layer's
    return (q, -rand(B, T, H, K).exp() * 0.1, k, v, -kk, kk * rand(B, T, H, K).sigmoid())


def _widened_worker(rank, world_size):
    """Each ops.WIDENED_PROBE op through state_passing_widened: one op call, and the
    output and every input's gradient equal the whole sequence's; {op: (calls, max abs error
    relative to the largest entry)}."""
    from linear_moe import ops
    from linear_moe.parallel.context_parallel import SequenceChunks

    chunks = SequenceChunks(torch.distributed.group.WORLD)
    results = {}
    # in one order on every rank (a set's order follows the functions' ids): the state
    # passing's all-gathers must pair up
    for op in sorted(ops.WIDENED_PROBE, key=lambda op: op.__name__):
        name = op.__name__
        inputs = _widened_inputs(name, torch.Generator().manual_seed(11))
        value_arg = 3 if name == "rwkv7" else 2
        weight = torch.randn(inputs[value_arg].shape, generator=torch.Generator().manual_seed(3))
        whole = [t.clone().requires_grad_() for t in inputs]
        o, _ = op(*whole, chunk_size=8)
        (o * weight).sum().backward()
        mine = [_this_rank(t, rank).detach().requires_grad_() for t in inputs]
        calls = []
        counted = lambda *a, **k: calls.append(1) or op(*a, **k)  # noqa: E731
        o_cp, _ = chunks.state_passing_widened(counted, tuple(mine), {"chunk_size": 8},
                                               value_arg)
        (o_cp * _this_rank(weight, rank)).sum().backward()
        relative = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
        errors = {"o": relative(o_cp, _this_rank(o, rank))}
        for i, (a, b) in enumerate(zip(mine, whole)):
            errors[f"grad{i}"] = relative(a.grad, _this_rank(b.grad, rank))
        results[name] = (len(calls), errors)
    return results


def test_widened_state_passing_is_one_op_pass_with_the_whole_sequences_math():
    for rank_results in run_distributed(_widened_worker, CP):
        assert set(rank_results) == {"delta_rule", "gated_delta_rule", "kda", "rwkv7"}
        for name, (calls, errors) in rank_results.items():
            assert calls == 1, f"{name}: {calls} op passes"
            assert max(errors.values()) <= TOL, (name, errors)


def test_fla_zigzag_layout_is_megatrons():
    """fla's own CP (the delta-rule ops' path on its chunk kernels, ops.NATIVE_CONTEXT_PARALLEL)
    lays a sequence out as megatron does: rank r holds parts r and 2 * size - 1 - r of 2 * size,
    in that order, so a rank's local tokens go to fla's kernels unchanged."""
    from fla.ops.cp.context import get_cp_cu_seqlens

    from linear_moe.parallel.context_parallel import SequenceChunks

    for size in (2, 3, 4):
        for rank in range(size):
            piece = 8
            context = get_cp_cu_seqlens(torch.tensor([0, 2 * size * piece]), world_size=size,
                                        rank=rank, layout="zigzag")
            assert context.part_len == piece
            assert context.cu_seqlens_cpu.tolist() == [0, piece, 2 * piece]  # one sequence
            # the parts before each of this rank's pieces: their global chunk ids
            assert context.pre_num_ranks_by_part == SequenceChunks.layout(rank, size)


@pytest.mark.parametrize("op", ["delta_rule", "gated_delta_rule", "kda", "rwkv7"])
def test_fla_cp_context_refused_off_fla_chunk_kernels(op):
    from linear_moe import ops

    assert getattr(ops, op) in ops.NATIVE_CONTEXT_PARALLEL
    x = torch.randn(1, 8, 2, 4)
    args = {"delta_rule": (x, x, x, x[..., 0].sigmoid()),
            "gated_delta_rule": (x, x, x, x[..., 0], x[..., 0].sigmoid()),
            "kda": (x, x, x, -x.abs(), x[..., 0].sigmoid()),
            "rwkv7": (x, -x.abs(), x, x, x, x)}[op]
    with pytest.raises(ValueError, match="cp_context .* needs fla's chunk kernels"):
        getattr(ops, op)(*args, cp_context=object())


def _fla_native_rows_worker(rank, world_size):
    from linear_moe import ops
    from linear_moe.parallel.context_parallel import SequenceChunks

    chunks = SequenceChunks(torch.distributed.group.WORLD)
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 3, 16, 2, 4
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    decay, beta = -torch.rand(B, T, H, generator=g), torch.rand(B, T, H, generator=g)
    contexts = []

    def op(*args, cp_context, **kwargs):  # one rank holds the whole sequence, in order
        contexts.append(cp_context)
        assert args[0].shape[0] == 1 and "output_final_state" not in kwargs
        return ops.gated_delta_rule(*args, **kwargs)

    o, state = chunks.fla_native(op, (q, k, v, decay, beta), dict(output_final_state=False))
    whole, _ = ops.gated_delta_rule(q, k, v, decay, beta)
    return ((o - whole).abs().max().item(), state, len(contexts),
            len({id(c) for c in contexts}), contexts[0].layout, contexts[0].part_len)


def test_fla_native_runs_each_row_with_one_context():
    """fla_native's plumbing on the CPU: one op call a batch row with fla's CP context (built
    once; zigzag parts of half the local tokens), outputs stacked back in order."""
    error, state, calls, distinct, layout, part_len = run_distributed(_fla_native_rows_worker, 1)[0]
    assert error == 0.0 and state is None
    assert (calls, distinct, layout, part_len) == (3, 1, "zigzag", 8)
