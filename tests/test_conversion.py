"""HF transformers <-> Megatron checkpoint conversion (linear_moe.conversion, toolkits/checkpoint).

- each supported architecture (tiny, random, fp32): the converted checkpoint, loaded by
  linear_moe.inference (dist checkpointing), gives the HF model's logits; exported back, every
  HF tensor is identical;
- a hybrid pattern keeps the HF embeddings, norms, MLPs / experts and 'N' attention exactly,
  lists the 'L' layers' fresh mixer tensors and the HF attention tensors left unused, and
  refuses to export to HF;
- a run trained by megatron.training, exported to HF and converted back by the two CLIs,
  finetunes with the same losses as from its own checkpoint (also under TP = 2);
- a bf16 HF model converts in bf16 (stored so, loaded as fp32 on the CPU with its logits) and
  exports back to identical bf16 tensors;
- bad input fails before any model is built, with the fix in the message.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from test_pretrain import _command, _env, _losses, _run

ROOT = Path(__file__).resolve().parents[1]


def _hf_config(arch: str, vocab: int):
    import transformers as T

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=256)
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=32)
    return {
        "LlamaForCausalLM": lambda: T.LlamaConfig(**common, intermediate_size=96,
                                                  num_key_value_heads=2),
        "Qwen2ForCausalLM": lambda: T.Qwen2Config(**common, intermediate_size=96,
                                                  num_key_value_heads=2, tie_word_embeddings=True),
        # layer 1 dense (mlp_only_layers), renormalised top-k
        "Qwen2MoeForCausalLM": lambda: T.Qwen2MoeConfig(
            **common, **moe, intermediate_size=96, shared_expert_intermediate_size=48,
            num_experts=4, num_key_value_heads=4, mlp_only_layers=[1], norm_topk_prob=False,
            tie_word_embeddings=False),
        # head dim 32 over hidden 64 / 4 heads: q/k norm over the head dim, not hidden / heads
        "Qwen3ForCausalLM": lambda: T.Qwen3Config(**common, intermediate_size=96,
                                                  num_key_value_heads=2, head_dim=32),
        "Qwen3MoeForCausalLM": lambda: T.Qwen3MoeConfig(
            **common, **moe, intermediate_size=96, num_experts=4, num_key_value_heads=2,
            mlp_only_layers=[2], norm_topk_prob=True, tie_word_embeddings=False),
        "MixtralForCausalLM": lambda: T.MixtralConfig(
            **common, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
            num_key_value_heads=2),
        # first layer dense, scaled routing, MLA without q-LoRA
        "DeepseekV2ForCausalLM": lambda: T.DeepseekV2Config(
            **common, **moe, intermediate_size=96, n_routed_experts=4, n_shared_experts=1,
            first_k_dense_replace=1, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.5,
            tie_word_embeddings=False),
    }[arch]()


def _save_hf_model(arch: str, path: Path, seed: int = 0):
    """A random tiny HF model (norm weights perturbed off 1) with the default tokenizer."""
    import transformers as T

    from linear_moe.data import default_tokenizer_path

    tokenizer = T.AutoTokenizer.from_pretrained(default_tokenizer_path())
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(_hf_config(arch, len(tokenizer))).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def _convert_and_compare(rank, world_size, arch, root):
    import transformers as T

    from linear_moe.conversion.core import hf_to_megatron, megatron_to_hf
    from linear_moe.inference import load_checkpoint

    root = Path(root)
    hf = _save_hf_model(arch, root / "hf")
    report = hf_to_megatron(str(root / "hf"), str(root / "mcore"))
    model, _ = load_checkpoint(str(root / "mcore"), device="cpu")
    tokens = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        got = model(tokens, torch.arange(24).expand(2, 24), None).float()
    logits_error = (want - got[..., :want.shape[-1]]).abs().max().item()
    exported = megatron_to_hf(str(root / "mcore"), str(root / "hf_out"))
    back = T.AutoModelForCausalLM.from_pretrained(root / "hf_out").float()
    original, returned = hf.state_dict(), back.state_dict()
    unequal = sorted(k for k in original if k not in returned
                     or not torch.equal(original[k], returned[k]))
    return (report, logits_error, want.abs().max().item(), exported, type(back).__name__,
            unequal, sorted(set(returned) - set(original)))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM",
                                  "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM",
                                  "DeepseekV2ForCausalLM"])
def test_hf_model_converts_with_its_logits_and_exports_back_identical(arch, tmp_path):
    report, error, scale, exported, back_class, unequal, extra = run_distributed(
        _convert_and_compare, 1, arch, str(tmp_path))[0]
    assert report["architecture"] == arch and report["layer_type_list"] == "NNN"
    assert not report["unused_hf_tensors"] and not report["fresh_megatron_tensors"]
    assert scale > 0.1 and error < 1e-5 * max(scale, 1.0), (error, scale)
    assert exported == back_class == arch
    assert not unequal and not extra, (unequal, extra)


def _hybrid(rank, world_size, root):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from linear_moe.conversion.core import hf_to_megatron, megatron_to_hf
    from linear_moe.inference import checkpoint_dir

    root = Path(root)
    hf = _save_hf_model("Qwen2MoeForCausalLM", root / "hf").state_dict()
    report = hf_to_megatron(str(root / "hf"), str(root / "mcore"),
                            ["--layer-type-list", "LNL", "--la-module", "gla"])
    dcp_to_torch_save(checkpoint_dir(str(root / "mcore")), root / "flat.pt")
    stored = torch.load(root / "flat.pt", weights_only=False)
    q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    checks = {
        "embedding": torch.equal(stored["embedding.word_embeddings.weight"],
                                 hf["model.embed_tokens.weight"]),
        # GQA 4 heads / 4 groups of 16: per group its q, k, v head
        "N-layer qkv": torch.equal(stored["decoder.layers.1.self_attention.linear_qkv.weight"],
                                   torch.cat([q.view(4, 16, 64), k.view(4, 16, 64),
                                              v.view(4, 16, 64)], 1).reshape(-1, 64)),
        "L-layer experts": torch.equal(stored["decoder.layers.0.mlp.experts.experts.linear_fc1.weight"][3],
                                       hf["model.layers.0.mlp.experts.gate_up_proj"][3]),
        "L-layer norm": torch.equal(stored["decoder.layers.2.pre_mlp_layernorm.weight"],
                                    hf["model.layers.2.post_attention_layernorm.weight"]),
    }
    try:
        megatron_to_hf(str(root / "mcore"), str(root / "hf_out"))
        refusal = None
    except ValueError as exc:
        refusal = str(exc)
    return report, checks, refusal


@pytest.mark.slow
def test_hybrid_pattern_keeps_the_hf_parts_and_starts_the_mixers_fresh(tmp_path):
    report, checks, refusal = run_distributed(_hybrid, 1, str(tmp_path))[0]
    assert all(checks.values()), checks
    assert report["linear_layers"] == [0, 2] and report["layer_type_list"] == "LNL"
    assert report["unused_hf_tensors"] == sorted(
        f"model.layers.{i}.self_attn.{p}_proj.{w}" for i in (0, 2) for p in "qkvo"
        for w in ("weight", "bias") if not (p == "o" and w == "bias"))
    assert all(".self_attention." in t and t.split(".")[2] in ("0", "2")
               for t in report["fresh_megatron_tensors"])
    assert "decoder.layers.0.self_attention.q_proj.weight" in report["fresh_megatron_tensors"]
    saved = json.loads((tmp_path / "mcore" / "linear_moe_convert.json").read_text())
    assert saved["unused_hf_tensors"] == report["unused_hf_tensors"]
    assert refusal and "only all-'N' models export to HF" in refusal


@pytest.mark.slow
def test_trained_run_round_trips_through_hf_and_trains_on(tmp_path):
    """megatron.training run (llama3, all-'N') -> mcore_to_hf.py -> hf_to_mcore.py -> finetune:
    the same losses as finetuning from the run's own checkpoint, and under TP = 2 too."""
    from linear_moe.data import ensure_default_dataset

    data = ensure_default_dataset(tmp_path / "data")
    model = ["--layer-type-list", "NNNN", "--save-interval", "1000", "--lr-warmup-iters", "0"]
    trained = tmp_path / "trained"
    fresh = _losses(_run(_command(data, trained, base_model="llama3", train_iters=8,
                                  extra=[*model, "--save-interval", "8"])))  # (the last wins)
    for script, flags in [("mcore_to_hf.py", ["--load", trained, "--hf-out", tmp_path / "hf"]),
                          ("hf_to_mcore.py", ["--hf-dir", tmp_path / "hf", "--save",
                                              tmp_path / "converted"])]:
        proc = subprocess.run([sys.executable, str(ROOT / "toolkits" / "checkpoint" / script),
                               *map(str, flags)], capture_output=True, text=True, env=_env(),
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"]

    def finetune(start, name, extra=()):
        cmd = _command(data, tmp_path / name, base_model="llama3", train_iters=3,
                       extra=[*model, "--pretrained-checkpoint", str(start), *extra])
        return _losses(_run(cmd))

    own = finetune(trained, "from_own")
    converted = finetune(tmp_path / "converted", "from_converted")
    assert own == converted and len(own) == 3, (own, converted)
    # two ranks (torchrun, gloo): dist checkpointing shards the release checkpoint by TP
    from test_eval import _free_port

    cmd = _command(data, tmp_path / "tp2", base_model="llama3", train_iters=3,
                   extra=[*model, "--pretrained-checkpoint", str(tmp_path / "converted"),
                          "--tensor-model-parallel-size", "2"])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), *cmd[1:]], capture_output=True,
                          text=True, env={**_env(), "CUDA_DEVICE_MAX_CONNECTIONS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tp2 = _losses(proc.stdout)
    assert sorted(tp2) == [1, 2, 3] and all(abs(tp2[i] - own[i]) < 1e-4 * own[i] for i in tp2), (
        tp2, own)
    assert own[1] < fresh[1] - 0.5  # the same first batch: trained weights, not a fresh start


def test_bad_input_fails_with_the_fix(tmp_path):
    import transformers as T

    from linear_moe.conversion.core import hf_to_megatron, megatron_to_hf

    with pytest.raises(FileNotFoundError, match="has no config.json; pass a HF model directory"):
        hf_to_megatron(str(tmp_path), str(tmp_path / "out"))
    T.GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(
        tmp_path / "gpt2")
    with pytest.raises(ValueError, match="no converter for HF architecture 'GPT2LMHeadModel'; "
                                         "supported: LlamaForCausalLM"):
        hf_to_megatron(str(tmp_path / "gpt2"), str(tmp_path / "out"))
    grouped = _hf_config("DeepseekV2ForCausalLM", 512)
    grouped.topk_method, grouped.n_group, grouped.topk_group = "group_limited_greedy", 2, 1
    grouped.architectures = ["DeepseekV2ForCausalLM"]
    grouped.save_pretrained(tmp_path / "grouped")
    with pytest.raises(ValueError, match="topk_method='group_limited_greedy' is not supported"):
        hf_to_megatron(str(tmp_path / "grouped"), str(tmp_path / "out"))
    llama = _hf_config("LlamaForCausalLM", 512)
    llama.architectures = ["LlamaForCausalLM"]
    llama.rope_parameters = {"rope_type": "default", "rope_theta": 10000.5}
    llama.save_pretrained(tmp_path / "theta")
    with pytest.raises(ValueError, match="RoPE theta 10000.5 is not an integer"):
        hf_to_megatron(str(tmp_path / "theta"), str(tmp_path / "out"))
    llama.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    llama.save_pretrained(tmp_path / "llama")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "latest_checkpointed_iteration.txt").write_text("release")
    with pytest.raises(FileExistsError, match="already holds a checkpoint; pass an empty --save"):
        hf_to_megatron(str(tmp_path / "llama"), str(tmp_path / "full"))
    with pytest.raises(FileExistsError, match="already holds a HF model; pass an empty directory"):
        megatron_to_hf(str(tmp_path / "full"), str(tmp_path / "llama"))


def _mixers_from_attention(rank, world_size, root):
    from linear_moe.conversion.core import hf_to_megatron
    from linear_moe.inference import load_checkpoint

    root = Path(root)
    hf = _save_hf_model("LlamaForCausalLM", root / "hf").state_dict()
    errors = []
    try:  # GLA's default keys are half the width (--la-expand-k 0.5)
        hf_to_megatron(str(root / "hf"), str(root / "bad"), ["--layer-type-list", "LNL",
                                                             "--la-module", "gla"], True)
    except ValueError as exc:
        errors.append(str(exc))
    report = hf_to_megatron(str(root / "hf"), str(root / "mcore"),
                            ["--layer-type-list", "LNL", "--la-module", "gla",
                             "--la-expand-k", "1"], mixers_from_attention=True)
    model, _ = load_checkpoint(str(root / "mcore"), device="cpu")
    ours = model.state_dict()
    mixer = "decoder.layers.2.self_attention"
    k = hf["model.layers.2.self_attn.k_proj.weight"].view(2, 16, 64)  # 2 KV groups of 16
    checks = {
        "q": torch.equal(ours[f"{mixer}.q_proj.weight"], hf["model.layers.2.self_attn.q_proj.weight"]),
        "o": torch.equal(ours[f"{mixer}.o_proj.weight"], hf["model.layers.2.self_attn.o_proj.weight"]),
        # query heads 0, 1 use group 0 and heads 2, 3 group 1, as in megatron's GQA
        "k": torch.equal(ours[f"{mixer}.k_proj.weight"].view(4, 16, 64),
                         k[[0, 0, 1, 1]]),
    }
    return errors, report, checks


@pytest.mark.slow
def test_mixers_start_from_the_hf_attention_on_request(tmp_path):
    errors, report, checks = run_distributed(_mixers_from_attention, 1, str(tmp_path))[0]
    assert len(errors) == 1 and "give the mixer the attention's dimensions (e.g. --la-expand-k 1" \
        in errors[0], errors
    assert all(checks.values()), checks
    assert report["mixers_from_attention"] and not report["unused_hf_tensors"]
    fresh = report["fresh_megatron_tensors"]
    assert "decoder.layers.0.self_attention.g_proj.weight" in fresh
    assert not any(t.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                               "o_proj.weight")) for t in fresh), fresh


def _bf16(rank, world_size, root):
    import transformers as T

    from linear_moe.conversion.core import hf_to_megatron, megatron_to_hf
    from linear_moe.inference import load_checkpoint

    root = Path(root)
    _save_hf_model("MixtralForCausalLM", root / "fp32")
    hf = T.AutoModelForCausalLM.from_pretrained(root / "fp32", dtype=torch.bfloat16)
    hf.save_pretrained(root / "hf")
    T.AutoTokenizer.from_pretrained(root / "fp32").save_pretrained(root / "hf")
    report = hf_to_megatron(str(root / "hf"), str(root / "mcore"))
    model, args = load_checkpoint(str(root / "mcore"), device="cpu")  # fp32 on the CPU
    tokens = torch.randint(0, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf.float()(tokens).logits
        got = model(tokens, torch.arange(16).expand(2, 16), None).float()[..., :want.shape[-1]]
    megatron_to_hf(str(root / "mcore"), str(root / "hf_out"))
    back = T.AutoModelForCausalLM.from_pretrained(root / "hf_out")
    original = T.AutoModelForCausalLM.from_pretrained(root / "hf").state_dict()
    returned = back.state_dict()
    same = all(returned[k].dtype == torch.bfloat16 and torch.equal(original[k], returned[k])
               for k in original)
    return report["dtype"], args.params_dtype, (want - got).abs().max().item(), same


@pytest.mark.slow
def test_bf16_model_converts_in_bf16_and_back_exactly(tmp_path):
    dtype, params_dtype, error, same = run_distributed(_bf16, 1, str(tmp_path))[0]
    assert dtype == "bfloat16" and params_dtype == torch.float32  # stored bf16, loaded fp32
    assert error < 1e-5 and same, (error, same)
