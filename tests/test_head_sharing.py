"""Head sharing (fla's num_kv_heads / num_v_heads).

A mixer with shared heads equals the plain mixer (no sharing, as many heads as the recurrence)
whose k/v (GQA) or q/k (GVA) projections, convs and GLA's key decay hold each shared head
repeated over the consecutive heads that read it, fla's '(h g)' layout. TP=2 equals TP=1, and
bad head counts fail at argument validation and in the mixer with one-line errors.
"""


import pytest
import torch

from arg_utils import parsed_args
from dist_utils import run_distributed

HIDDEN, SEQ, BATCH = 32, 12, 2


def _config(la_module, **overrides):
    from linear_moe.config import LinearMoEConfig, resolve_mixer_defaults

    fields = dict(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4,
                  params_dtype=torch.float32, use_cpu_initialization=True,
                  normalization="RMSNorm", add_bias_linear=False,
                  gradient_accumulation_fusion=False, la_module=la_module, la_num_heads=4,
                  la_chunk_size=4, la_backend="reference")
    config = LinearMoEConfig(**{**fields, **overrides})
    resolve_mixer_defaults(config)
    return config


def _repeat_heads(t, shared_heads, group):
    """[shared_heads * d, ...] rows -> [shared_heads * group * d, ...], head i of the result
    being shared head i // group."""
    return t.reshape(shared_heads, -1, *t.shape[1:]).repeat_interleave(group, 0).flatten(0, 1)


def _load_repeated(plain, shared, shared_heads, group):
    """Give `plain` the weights of `shared`, repeating the rows of the shared projections."""
    state = {}
    for name, p in shared.state_dict().items():
        target = plain.state_dict()[name]
        if not isinstance(p, torch.Tensor):  # Megatron's _extra_state
            continue
        state[name] = p if p.shape == target.shape else _repeat_heads(p, shared_heads, group)
        assert state[name].shape == target.shape, name
    missing, unexpected = plain.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing


def _equivalence_worker(rank, world_size):
    from einops import repeat
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.enums import AttnMaskType

    from linear_moe.registry import get_mixer

    mpu.initialize_model_parallel(1)
    build = lambda cfg: get_mixer(cfg.la_module).builder(
        cfg, layer_number=1, attn_mask_type=AttnMaskType.causal)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(0))
    results = {}

    # GQA: 4 query heads over 2 k/v heads.
    for name, extra in (("gla", {}), ("retention", {}), ("simple_gla", {}),
                        ("gla_conv", dict(la_use_short_conv=True))):
        la_module = name.split("_conv")[0]
        torch.manual_seed(1)
        shared = build(_config(la_module, la_num_kv_heads=2, **extra))
        plain = build(_config(la_module, **extra))
        assert shared.k_proj.weight.shape[0] == plain.k_proj.weight.shape[0] // 2
        _load_repeated(plain, shared, shared_heads=2, group=2)
        results[f"kv_{name}"] = (shared(x)[0] - plain(x)[0]).abs().max().item()

    # GVA: 2 q/k heads, 4 value heads; the plain mixer has 4 heads of the same head dims
    # (twice the key width).
    for name in ("gated_deltanet", "kda"):
        torch.manual_seed(1)
        shared = build(_config(name, la_num_heads=2, la_num_v_heads=4))
        cfg = shared.config
        plain = build(_config(name, la_num_heads=4, la_expand_k=2 * cfg.la_expand_k,
                              la_expand_v=2 * cfg.la_expand_v))
        assert (shared.head_k_dim, shared.head_v_dim) == (plain.head_k_dim, plain.head_v_dim)
        assert shared.v_proj.weight.shape == plain.v_proj.weight.shape
        _load_repeated(plain, shared, shared_heads=2, group=2)
        results[f"v_{name}"] = (shared(x)[0] - plain(x)[0]).abs().max().item()

    # The mixer itself refuses a k/v head count that does not divide the query heads.
    try:
        build(_config("gla", la_num_kv_heads=3))
        results["mixer_error"] = 1.0
    except ValueError as e:
        results["mixer_error"] = float("must divide --la-num-heads 4" not in str(e))

    # The layout is fla's: repeat(x, '... (h d) -> ... (h g) d').
    mixer = build(_config("gla", la_num_kv_heads=2))
    t = torch.randn(BATCH, SEQ, 2 * 3)
    ours = mixer.expand_heads(t.view(BATCH, SEQ, 2, 3))
    results["fla_layout"] = (ours - repeat(t, "... (h d) -> ... (h g) d", g=2, d=3)).abs().max()
    return results


def test_shared_heads_equal_repeated_plain_mixer():
    results = run_distributed(_equivalence_worker, 1)[0]
    for name, err in results.items():
        assert err < 1e-5, (name, err)


def _tp_worker(rank, world_size, cases):
    from test_tp_parity import tp_parity_cases

    return tp_parity_cases([(la_module, False, overrides) for la_module, overrides in cases])


@pytest.mark.slow
def test_tp2_matches_tp1_with_shared_heads():
    from test_tp_parity import assert_tp_parity

    cases = [("gla", dict(la_num_kv_heads=2)),
             ("gated_deltanet", dict(la_num_heads=2, la_num_v_heads=4))]
    for rank_results in run_distributed(_tp_worker, 2, cases):
        for (la_module, _), result in zip(cases, rank_results):
            assert_tp_parity(result, la_module)


@pytest.mark.parametrize("overrides,message", [
    (dict(la_module="gla", la_num_kv_heads=3), r"--la-num-kv-heads 3 must divide --la-num-heads 4"),
    (dict(la_module="gla", la_num_kv_heads=1, tensor_model_parallel_size=2),
     r"--la-num-kv-heads 1 is not divisible by --tensor-model-parallel-size 2.*smaller TP"),
    (dict(la_module="gated_deltanet", la_num_v_heads=6), r"--la-num-v-heads 6 must be a multiple"),
    (dict(la_module="gated_deltanet", la_num_heads=2, la_num_v_heads=4,
          tensor_model_parallel_size=4), r"--la-num-heads 2 \(the q/k heads.*divisible by "
                                         r"--tensor-model-parallel-size 4"),
    (dict(la_module="gated_deltanet", la_num_kv_heads=2),
     r"mixer 'gated_deltanet' does not use --la-num-kv-heads; drop it .*gla"),
    (dict(la_module="gla", la_num_v_heads=8), r"mixer 'gla' does not use --la-num-v-heads.*kda"),
    (dict(la_module="mamba2", la_num_kv_heads=2), r"does not use --la-num-kv-heads"),
])
def test_bad_head_sharing_fails_at_validation(overrides, message):
    from linear_moe.arguments import validate_args

    with pytest.raises(ValueError, match=message) as info:
        validate_args(parsed_args(**overrides))
    assert "\n" not in str(info.value)


def test_unset_options_validate_and_set_ones_pass():
    from linear_moe.arguments import validate_args

    validate_args(parsed_args(la_module="gla"))
    validate_args(parsed_args(la_module="retention", la_num_kv_heads=2, tensor_model_parallel_size=2))
    validate_args(parsed_args(la_module="kda", la_num_heads=2, la_num_v_heads=8,
                        tensor_model_parallel_size=2))


def test_mixer_rejects_bad_head_sharing():
    from linear_moe.mixers.base import check_head_sharing

    with pytest.raises(ValueError, match="--la-num-kv-heads 2 is not divisible by "
                                         "--tensor-model-parallel-size 4"):
        check_head_sharing("gla", "kv", 4, 2, None, 4)
    with pytest.raises(ValueError, match="mixer 'gla' does not use --la-num-v-heads"):
        check_head_sharing("gla", "kv", 4, None, 8, 1)


def test_registry_options_match_mixer_head_sharing():
    from linear_moe.registry import registered_mixers

    for name, entry in registered_mixers().items():
        sharing = getattr(entry.builder, "head_sharing", None)
        assert ("la_num_kv_heads" in entry.options) == (sharing == "kv"), name
        assert ("la_num_v_heads" in entry.options) == (sharing == "v"), name
