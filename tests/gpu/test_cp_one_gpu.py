"""Context parallelism through fla's kernels on one GPU: two gloo processes share the GPU (NCCL
refuses two ranks on one device), each runs its two chunks of megatron's CP layout with fla's
chunked kernels, and the result is compared with the same model run whole on the GPU.

The CPU suite (tests/test_cp_parity.py) proves the state passing in fp32 on the reference ops;
this proves it on the kernels that train: fla's initial_state / final state, the transition
probe (zero values from the identity state) and the conv halos, in fp32 at a length where each
piece spans several of fla's 64-token chunks - and fla's own CP (its kernels exchanging the
states) for the delta-rule / DPLR ops, against the whole sequence and against our state passing. Two GPUs with NCCL and bf16 training:
test_cp_gpu.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed
from linear_moe.registry import registered_mixers
from test_cp_parity import _this_rank

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SEQ, BATCH, VOCAB, CP = 512, 2, 256, 2  # pieces of 128 tokens: two of fla's chunks each
TOL = 2e-3  # ||cp - whole|| / ||whole||; fla's fp32 kernels, summed in another order
CP_MIXERS = sorted(n for n, e in registered_mixers().items() if e.supports_cp)
# The mixers whose op takes fla's own CP (ops.NATIVE_CONTEXT_PARALLEL): each runs here with
# linear_moe's state passing (the default) and, as "<name>/fla", with --la-cp-kernel fla.
FLA_NATIVE_CP = tuple(n for n in CP_MIXERS if registered_mixers()[n].builder.fla_context_parallel)
CASES = CP_MIXERS + [f"{name}/fla" for name in FLA_NATIVE_CP]
# Every case runs in the one module fixture (two processes): a device call short of time picks
# some (comma-separated) instead of waiting for all.
if os.environ.get("LINEAR_MOE_CP_CASES"):
    CASES = [c for c in os.environ["LINEAR_MOE_CP_CASES"].split(",") if c in CASES]


def _build(case, cp):
    from megatron.core import tensor_parallel

    from linear_moe.ops import fla_compat
    from model_utils import tiny_config, tiny_model

    la_module, _, cp_kernel = case.partition("/")
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    torch.manual_seed(123)
    # mamba2's chunk mode is refused at build on Hopper + Triton < 3.7.1 (its backward)
    mode = ("fused_recurrent" if la_module == "mamba2" and fla_compat.hopper_guard_active()
            else "chunk")
    # head dims 64-128: the ones fla_compat's Hopper guard has proven (and fla wants >= 16)
    config = tiny_config(la_module=la_module, context_parallel_size=cp, la_backend="fla",
                         la_cp_kernel=cp_kernel or "ours",
                         la_mode=mode, hidden_size=256, num_attention_heads=4, kv_channels=64,
                         ffn_hidden_size=512, la_num_heads=2, la_ssm_groups=2,
                         la_ssm_state_dim=64)
    return tiny_model(config, "qwen2_moe", VOCAB, SEQ).cuda()


def _relative(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _gloo_all_gathers():
    """The all-gathers on CUDA tensors through gloo, staged on the host: gloo's CUDA support
    covers broadcast / all-reduce only by the docs, and fla's CP gathers into out [size,
    *x.shape] with all_gather_into_tensor, a shape gloo (unlike NCCL) refuses."""
    dist = torch.distributed
    all_gather = dist.all_gather

    def gather(outs, inp, group=None, async_op=False):
        assert not async_op
        staged = [torch.empty_like(o, device="cpu") for o in outs]
        all_gather(staged, inp.detach().cpu().contiguous(), group=group)
        for o, s in zip(outs, staged):
            o.copy_(s)

    dist.all_gather = gather
    dist.all_gather_into_tensor = lambda out, inp, group=None, async_op=False: gather(
        list(out.unbind(0)), inp, group, async_op)


def _worker(rank, world_size, mixers):
    import traceback

    from megatron.core import parallel_state as mpu

    torch.cuda.set_device(0)
    _gloo_all_gathers()
    if os.environ.get("LINEAR_MOE_DUMP_AFTER"):  # a device call's stack dump before its cut
        import faulthandler

        faulthandler.dump_traceback_later(float(os.environ["LINEAR_MOE_DUMP_AFTER"]))
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).cuda()
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).cuda()
    positions = torch.arange(SEQ, device="cuda").expand(BATCH, SEQ)
    from linear_moe.parallel.context_parallel import SequenceChunks

    native_calls = []  # which path each case took
    fla_native = SequenceChunks.fla_native
    SequenceChunks.fla_native = lambda *a, **k: native_calls.append(1) or fla_native(*a, **k)
    results = {}
    # One case at a time (its whole-sequence run, then CP=2), each reported as it ends: a device
    # call cut by its deadline still says which cases passed.
    for name in mixers:
        print(f"rank {rank}: {name}", flush=True)
        try:
            mpu.destroy_model_parallel()
            mpu.initialize_model_parallel(1)
            model = _build(name, 1)
            ref_logits = model(tokens, positions, None)
            F.cross_entropy(ref_logits.reshape(-1, VOCAB), labels.reshape(-1)).backward()
            with torch.no_grad():  # the control: this rank's chunks without what precedes them
                alone = model(_this_rank(tokens, rank), _this_rank(positions, rank), None)
            ref = {n: (p.detach().clone(), p.grad.clone())
                   for n, p in model.named_parameters() if p.grad is not None}
            control = _relative(alone, _this_rank(ref_logits, rank))
            mpu.destroy_model_parallel()
            mpu.initialize_model_parallel(1, context_parallel_size=CP)
            group = mpu.get_context_parallel_group()
            native_calls.clear()
            model = _build(name, CP)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, (weight, _) in ref.items():
                    params[n].copy_(weight)
            logits = model(_this_rank(tokens, rank), _this_rank(positions, rank), None)
            loss = F.cross_entropy(logits.reshape(-1, VOCAB),
                                   _this_rank(labels, rank).reshape(-1), reduction="sum")
            (loss / labels.numel()).backward()
            errors = {"logits": _relative(logits.detach(), _this_rank(ref_logits, rank))}
            for n, (_, grad) in ref.items():
                mine = params[n].grad.clone()
                torch.distributed.all_reduce(mine, group=group)  # gloo: CUDA tensors staged
                errors[n] = _relative(mine, grad)
            results[name] = (errors, control, bool(native_calls))
            worst = max(errors, key=errors.get)
            print(f"rank {rank}: {name} logits {errors['logits']:.2e} worst {worst} "
                  f"{errors[worst]:.2e} control {control:.2e} fla-native {bool(native_calls)}",
                  flush=True)
        except Exception:  # noqa: BLE001 - the test reports it
            results[name] = traceback.format_exc()
            print(f"rank {rank}: {name} failed", flush=True)
    mpu.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def cp_results():
    return run_distributed(_worker, CP, CASES)


@pytest.mark.parametrize("la_module", CASES)
def test_cp2_on_fla_kernels_matches_the_whole_sequence(la_module, cp_results):
    path = os.environ.get("LINEAR_MOE_GPU_RESULTS")
    for rank, rank_results in enumerate(cp_results):
        result = rank_results[la_module]
        assert not isinstance(result, str), result
        errors, control, native = result
        assert native == la_module.endswith("/fla"), f"fla's own CP ran: {native}"
        worst = max(errors, key=errors.get)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"test": "cp_one_gpu", "mixer": la_module, "rank": rank,
                                    "logits": errors["logits"], "worst": worst,
                                    "worst_rel": errors[worst], "control": control,
                                    "fla_native_cp": native}) + "\n")
        assert any(".self_attention.o_proj." in n for n in errors), "mixer grads not compared"
        assert errors[worst] <= TOL, f"rank {rank} {worst}: relative error {errors[worst]:.3e}"
    # rank 1's chunks follow others: alone they are far off, so TOL can tell a missing exchange
    assert cp_results[1][la_module][1] > 10 * TOL, cp_results[1][la_module][1]
