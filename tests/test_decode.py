"""Incremental decoding: a prompt's forward, then one token at a time through megatron-core's
StaticInferenceContext (the 'N' layers' KV cache, the 'L' mixers' recurrent states, short-conv
inputs and token shifts), gives the logits of the whole sequence's forward at every step, for
every mixer registered with decode support (all of them); MoM with a capacity (a share of
the whole sequence) refuses with the fix."""

import pytest
import torch

from dist_utils import run_distributed
from linear_moe.registry import registered_mixers
from test_tp_parity import SEQ, VOCAB, _build, _init_parallel

DECODING = sorted(n for n, e in registered_mixers().items() if e.supports_decode)
PROMPT = 13  # over one chunk (la_chunk_size 8) and not a multiple of it


def _decode_errors(rank, world_size, mixers, overrides=None):
    from megatron.core.inference.contexts import StaticInferenceContext

    _init_parallel(1)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    positions = torch.arange(SEQ).expand(2, SEQ)
    errors, refusals = {}, {}
    for mixer in mixers:
        model = _build(mixer, 1, moe=True, **(overrides or {})).eval()
        with torch.no_grad():
            full = model(tokens, positions, None)
            context = StaticInferenceContext(2, SEQ)
            worst, start = 0.0, 0
            for end in [PROMPT, *range(PROMPT + 1, SEQ + 1)]:
                try:
                    out = model(tokens[:, start:end], positions[:, start:end], None,
                                inference_context=context)
                except NotImplementedError as exc:
                    refusals[mixer] = str(exc)
                    break
                context.sequence_len_offset += end - start
                # the context keeps only the last position's logits
                worst = max(worst, (out[:, -1] - full[:, end - 1]).abs().max().item())
                start = end
        errors[mixer] = (worst, full.abs().max().item())
    return errors, refusals


@pytest.mark.slow
def test_decoding_step_by_step_gives_the_full_forward_logits():
    assert set(DECODING) == set(registered_mixers())
    errors, refusals = run_distributed(_decode_errors, 1, DECODING)[0]
    assert not refusals, refusals
    bad = {m: e for m, e in errors.items() if not e[0] <= 1e-4 * max(e[1], 1.0)}
    assert not bad, bad


def test_mom_with_a_capacity_refuses_to_decode_with_the_fix():
    _, refusals = run_distributed(_decode_errors, 1, ["mom_gla"],
                                  {"la_mom_capacity_factor": 1.0})[0]
    assert "set --la-mom-capacity-factor 0" in refusals["mom_gla"], refusals
