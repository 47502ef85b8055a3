"""Every base preset x size builds (on the meta device, so 47B parameters cost nothing) and its
parameter counts match the released models it reproduces; each base's tiny size trains on the
CPU with an 'LLN…' hybrid pattern."""

import pytest

from dist_utils import run_distributed
from linear_moe.models import PRESETS

CASES = [(base, size) for base, preset in sorted(PRESETS.items()) for size in preset.sizes]


def _count_worker(rank, world_size, cases):
    from megatron.core import parallel_state as mpu

    from linear_moe.model_provider import build_standalone, parameter_counts

    mpu.initialize_model_parallel(1)
    results = {}
    for base, size, pattern, vocab in cases:
        model, config, _ = build_standalone(
            ["--base-model", base, "--model-size", size, "--layer-type-list", pattern,
             "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab - 1), "--mock-data",
             "--seq-length", "128", "--max-position-embeddings", "4096", "--micro-batch-size",
             "1", "--train-iters", "1"], device="meta")
        results[(base, size, pattern)] = parameter_counts(model, config)
    return results


@pytest.fixture(scope="module")
def counts():
    cases = [(base, size, "N", PRESETS[base].published.get(size, (0, 0, 4096))[2])
             for base, size in CASES]
    cases += [(base, "tiny", "LLLN", 4096) for base in PRESETS]
    return run_distributed(_count_worker, 1, cases)[0]


@pytest.mark.slow
@pytest.mark.parametrize("base,size", CASES)
def test_preset_builds(counts, base, size):
    total, active = counts[(base, size, "N")]
    assert 0 < active <= total


@pytest.mark.slow
@pytest.mark.parametrize("base,size", [(b, s) for b, s in CASES if s in PRESETS[b].published])
def test_parameter_counts_match_released_models(counts, base, size):
    total, active, _ = PRESETS[base].published[size]
    got_total, got_active = counts[(base, size, "N")]
    assert got_total == total, f"{base} {size}: {got_total:,} parameters, released {total:,}"
    assert got_active == active, f"active {got_active:,} vs {active:,}"


@pytest.mark.slow
@pytest.mark.parametrize("base", sorted(PRESETS))
def test_hybrid_tiny_builds_with_fewer_or_equal_params(counts, base):
    assert counts[(base, "tiny", "LLLN")][0] > 0
