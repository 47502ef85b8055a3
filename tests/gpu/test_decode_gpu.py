"""Incremental decoding on CUDA with fla's kernels (tests/test_decode.py's check on the GPU): a
prompt's forward, then one token per step through megatron-core's StaticInferenceContext, gives
the whole sequence's logits at every position, for every mixer with decode support, in fp32
(fla's kernels take fp32; bf16 would bound the kernels by its own rounding instead)."""

from __future__ import annotations

import pytest
import torch

from linear_moe.registry import registered_mixers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SEQ, PROMPT, VOCAB = 90, 70, 128  # the prompt over one of fla's 64-token chunks
DECODING = sorted(n for n, e in registered_mixers().items() if e.supports_decode)


@pytest.mark.parametrize("mixer", DECODING)
@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
def test_decoding_on_fla_gives_the_full_forward_logits(mixer, mode, megatron_single_gpu):
    from megatron.core.inference.contexts import StaticInferenceContext

    from linear_moe.registry import get_mixer
    from model_utils import tiny_config, tiny_model

    if mode not in get_mixer(mixer).modes:
        pytest.skip(f"{mixer} has no {mode} mode")
    from linear_moe.ops import fla_compat

    if mixer == "mamba2" and mode == "chunk" and fla_compat.hopper_guard_active():
        pytest.skip("mamba2's chunk mode is refused at build on this GPU (its backward; see "
                    "linear_moe/mixers/mamba2.py)")
    torch.manual_seed(0)
    # head dims 64 (fla's kernels want >= 16): hidden 256, two mixer heads, expand_k 0.5
    config = tiny_config(la_module=mixer, la_backend="fla", la_mode=mode, hidden_size=256,
                         num_attention_heads=4, kv_channels=64, ffn_hidden_size=512,
                         la_num_heads=2)
    model = tiny_model(config, "qwen2_moe", VOCAB, SEQ).cuda().eval()
    tokens = torch.randint(0, VOCAB, (2, SEQ), device="cuda")
    positions = torch.arange(SEQ, device="cuda").expand(2, SEQ)
    with torch.no_grad():
        full = model(tokens, positions, None)
        context = StaticInferenceContext(2, SEQ)
        start, worst = 0, 0.0
        for end in [PROMPT, *range(PROMPT + 1, SEQ + 1)]:
            out = model(tokens[:, start:end], positions[:, start:end], None,
                        inference_context=context)
            context.sequence_len_offset += end - start
            worst = max(worst, (out[:, -1] - full[:, end - 1]).abs().max().item())
            start = end
    scale = full.abs().max().item()
    # fla's fp32 kernels use tf32 dot products: ~1e-3 of the logits' scale
    assert worst <= 2e-3 * max(scale, 1.0), (worst, scale)
