"""Mixture-of-Memories: one memory with top-1 routing is exactly the base mixer; capacity drops
the overflow; the load-balancing loss reaches the router."""

import torch

from dist_utils import run_distributed


def _config(la_module, **overrides):
    from linear_moe.config import LinearMoEConfig, resolve_mixer_defaults

    config = LinearMoEConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                             params_dtype=torch.float32, use_cpu_initialization=True,
                             normalization="RMSNorm", add_bias_linear=False,
                             gradient_accumulation_fusion=False, la_module=la_module,
                             la_num_heads=2, la_chunk_size=8, **overrides)
    resolve_mixer_defaults(config)
    return config


def _mom_worker(rank, world_size):
    from megatron.core import parallel_state as mpu
    from megatron.core.transformer.enums import AttnMaskType

    from linear_moe.mixers.gla import GLAMixer
    from linear_moe.mixers.mom import MoMGLAMixer

    mpu.initialize_model_parallel(1)
    build = lambda cls, cfg: cls(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal)
    torch.manual_seed(0)
    x = torch.randn(20, 3, 32, requires_grad=True)
    results = {}

    # 1. M = 1, top-1, no shared memory == plain GLA with the same weights.
    mom = build(MoMGLAMixer, _config("mom_gla", la_mom_num_memories=1, la_mom_topk=1,
                                     la_mom_shared_memory=False, la_mom_aux_loss_coeff=0.0))
    gla = build(GLAMixer, _config("gla"))
    renamed = {k.replace("memories.0.k.", "k_proj.").replace("memories.0.v.", "v_proj.")
               .replace("memories.0.", ""): v for k, v in mom.state_dict().items()
               if not k.startswith("router.")}
    gla.load_state_dict(renamed)
    results["single_memory"] = (mom(x)[0] - gla(x)[0]).abs().max().item()

    # 2. Capacity: with factor 0.25 a memory takes at most 0.25 * T * k / M tokens per row.
    mom = build(MoMGLAMixer, _config("mom_gla", la_mom_num_memories=4, la_mom_topk=2,
                                     la_mom_capacity_factor=0.25))
    xb = x.transpose(0, 1)  # _route takes the mixer layout [b, s, h]
    routed, aux = mom._route(xb, *mom._segments(*xb.shape[:2], xb.device))
    results["max_taken"] = int((routed.view(*xb.shape[:2], -1) > 0).sum(1).max())
    results["capacity"] = max(1, int(0.25 * 20 * 2 / 4))

    # 3. The load-balancing loss gives the router a gradient even with a zero output gradient.
    out, _ = mom(x)
    out.backward(torch.zeros_like(out))
    results["router_grad"] = mom.router.weight.grad.abs().sum().item()
    results["aux"] = aux.item()
    return results


def test_mixture_of_memories():
    r = run_distributed(_mom_worker, 1)[0]
    assert r["single_memory"] < 1e-5, r
    assert r["max_taken"] == r["capacity"], r  # the capacity binds, and holds
    assert r["aux"] > 0 and r["router_grad"] > 0, r
