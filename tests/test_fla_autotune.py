"""fla's state-passing kernels get T and H in their autotune keys (linear_moe.ops.fla_autotune):
checked on the CPU on fla's kernel objects themselves; the effect on kernel times is measured on
the GPU by the benchmarks."""

import pytest

pytest.importorskip("fla.ops")


def _keys(module, name):
    import importlib

    from linear_moe.ops.fla_autotune import _autotuner

    return list(_autotuner(getattr(importlib.import_module(module), name)).keys)


def test_state_kernels_are_keyed_on_seq_len_and_heads():
    from linear_moe.ops.fla_autotune import key_state_kernels_on_shape

    intra_before = _keys("fla.ops.gla.chunk", "chunk_gla_bwd_kernel_intra")
    changed = key_state_kernels_on_shape()
    # GLA's state kernels: keyed on the head dims only before (fla 0.6.0).
    for kernel in ("chunk_fwd_kernel_h", "chunk_bwd_kernel_dh"):
        keys = _keys("fla.ops.common.chunk_h", kernel)
        assert keys[-2:] == ["T", "H"] and keys.count("T") == 1, keys
        assert f"fla.ops.common.chunk_h.{kernel}" in changed
    # The delta rule's already held H: only T is added, once.
    keys = _keys("fla.ops.common.chunk_delta_h", "chunk_gated_delta_rule_bwd_kernel_dhu_blockdim64")
    assert keys.count("T") == 1 and keys.count("H") == 1, keys
    # Kernels parallel over chunks keep fla's keys; a second call changes nothing.
    assert _keys("fla.ops.gla.chunk", "chunk_gla_bwd_kernel_intra") == intra_before
    assert key_state_kernels_on_shape() == []


def test_training_flag_reaches_the_config_and_is_checked():
    from linear_moe.config import LinearMixerFields
    from linear_moe.ops.fla_autotune import apply_autotune_keys

    assert LinearMixerFields.la_fla_autotune_keys == "shape"
    assert apply_autotune_keys("fla") == []  # fla's keys: nothing touched
    assert apply_autotune_keys("shape") == []  # no CUDA here: fla's kernels do not run
    with pytest.raises(ValueError, match="choose shape or fla"):
        apply_autotune_keys("per-shape")
