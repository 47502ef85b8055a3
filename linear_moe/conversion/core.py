"""HF transformers <-> Megatron checkpoints: the part every base model shares.

A base model's module (llama3.py, qwen2_moe.py, mixtral.py, deepseek_v2.py) describes its HF
architecture as an ``HFFormat``: how the HF config maps to Megatron flags and back, and which HF
tensors make which Megatron tensors (``Rule``s, each a pair of inverse functions). This core runs
both directions on the single-rank model:

- ``hf_to_megatron``: transformers loads the HF model (its own weight conversions included); our
  model is built from the derived flags plus the user's (a hybrid pattern, a mixer); its
  tensors are filled and saved as a megatron.training 'release' checkpoint through dist
  checkpointing, which reshards at load time (tested: TP = 2), so there is no separate reshard
  step.
- ``megatron_to_hf``: linear_moe.inference.load_checkpoint loads a checkpoint (any layout), the HF
  model is filled with strict key checking and save_pretrained writes it with the tokenizer.

Nothing is dropped silently: every HF tensor is used or listed, and 'L' layers' mixers (which
HF's softmax models lack) are listed as freshly initialised.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

Tensors = list[torch.Tensor]

# Flags every conversion passes: our model without data or training (the checkpoint is what
# matters).
_BUILD_ONLY = ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "1",
               "--train-iters", "1", "--no-gradient-accumulation-fusion"]

ARGS_FILE = "linear_moe_convert.json"


@dataclass(frozen=True)
class Rule:
    """Megatron tensors ``megatron`` <-> HF tensors ``hf`` (state-dict keys), by two inverse
    functions on the lists of tensors."""

    megatron: tuple[str, ...]
    hf: tuple[str, ...]
    to_megatron: Callable[[Tensors], Tensors]
    to_hf: Callable[[Tensors], Tensors]


def same(m: str, h: str) -> Rule:
    return Rule((m,), (h,), list, list)


def glu(m_fc1: str, h_gate: str, h_up: str) -> Rule:
    """megatron's SwiGLU fc1 is [gate; up] (its glu takes silu of the first half)."""
    return Rule((m_fc1,), (h_gate, h_up), lambda t: [torch.cat(t, 0)],
                lambda t: list(t[0].chunk(2, 0)))


def qkv(m_qkv: str, h_q: str, h_k: str, h_v: str, heads: int, groups: int, head_dim: int) -> Rule:
    """megatron's fused linear_qkv (weight or bias) holds, per query group, that group's query
    heads, then its key head, then its value head."""
    per_group = heads // groups

    def fuse(t):
        q, k, v = (x.reshape(groups, n * head_dim, *x.shape[1:])
                   for x, n in zip(t, (per_group, 1, 1)))
        return [torch.cat([q, k, v], 1).reshape(-1, *q.shape[2:])]

    def split(t):
        fused = t[0].reshape(groups, (per_group + 2) * head_dim, *t[0].shape[1:])
        q, k, v = fused.split([per_group * head_dim, head_dim, head_dim], 1)
        return [x.reshape(-1, *x.shape[2:]).contiguous() for x in (q, k, v)]

    return Rule((m_qkv,), (h_q, h_k, h_v), fuse, split)


def stacked_experts(m_prefix: str, h_prefix: str, num_experts: int) -> list[Rule]:
    """megatron's per-expert linear_fc1 / linear_fc2 <-> transformers' fused expert tensors
    gate_up_proj [E, 2I, H] (gate then up, as megatron's fc1) and down_proj [E, H, I]."""
    def rule(m_name, h_name):
        keys = tuple(f"{m_prefix}.local_experts.{e}.{m_name}.weight" for e in range(num_experts))
        return Rule(keys, (f"{h_prefix}.{h_name}",), lambda t: list(t[0].unbind(0)),
                    lambda t: [torch.stack(t, 0)])
    return [rule("linear_fc1", "gate_up_proj"), rule("linear_fc2", "down_proj")]


@dataclass(frozen=True)
class MoENames:
    """Where a HF MoE block keeps its parts (under model.layers.<i>.mlp)."""

    router: str = "gate.weight"
    experts: str = "experts"
    shared_expert: str | None = None       # a dense SwiGLU MLP: gate_proj / up_proj / down_proj
    shared_expert_gate: str | None = None  # sigmoid gate weight [1, H]


def dense_mlp_rules(m: str, h: str) -> list[Rule]:
    return [glu(f"{m}.linear_fc1.weight", f"{h}.gate_proj.weight", f"{h}.up_proj.weight"),
            same(f"{m}.linear_fc2.weight", f"{h}.down_proj.weight")]


def mlp_rules(m: str, h: str, is_moe: bool, num_experts: int, names: MoENames | None) -> list[Rule]:
    """A layer's MLP: dense SwiGLU, or router + routed experts (+ shared expert, its gate)."""
    if not is_moe:
        return dense_mlp_rules(m, h)
    rules = [same(f"{m}.router.weight", f"{h}.{names.router}"),
             *stacked_experts(f"{m}.experts", f"{h}.{names.experts}", num_experts)]
    if names.shared_expert:
        rules += dense_mlp_rules(f"{m}.shared_experts", f"{h}.{names.shared_expert}")
    if names.shared_expert_gate:
        rules.append(same(f"{m}.shared_experts.gate_weight", f"{h}.{names.shared_expert_gate}"))
    return rules


def gqa_attention_rules(m: str, h: str, args, bias: bool) -> list[Rule]:
    """megatron's SelfAttention <-> HF q/k/v/o_proj (Llama, Qwen2, Mixtral)."""
    dims = (args.num_attention_heads, args.num_query_groups or args.num_attention_heads,
            args.kv_channels)
    rules = [qkv(f"{m}.linear_qkv.weight", *(f"{h}.{p}_proj.weight" for p in "qkv"), *dims),
             same(f"{m}.linear_proj.weight", f"{h}.o_proj.weight")]
    if bias:
        rules.append(qkv(f"{m}.linear_qkv.bias", *(f"{h}.{p}_proj.bias" for p in "qkv"), *dims))
    return rules


@dataclass(frozen=True)
class HFFormat:
    """One HF architecture and the base preset it converts to.

    megatron_flags(hf_config) -> {dest: value} of Megatron flags (every field of the preset size
    ``size`` among them, so nothing of that size leaks in); hf_config(args) -> the HF config of a
    checkpoint's arguments; attention_rules(m_prefix, h_prefix, args) -> the softmax layer's rules.
    """

    architecture: str          # transformers class, e.g. "LlamaForCausalLM"
    base_model: str
    size: str
    megatron_flags: Callable
    hf_config: Callable
    attention_rules: Callable
    moe_names: MoENames | None = None
    qk_norm: bool = False  # per-head q / k RMSNorm (megatron's --qk-layernorm)


def _one_way(_):
    raise ValueError("a mixer initialised from attention has no way back to HF")


def mixers_from_attention_rules(layers: list[int], args, hf_config, shapes: dict) -> list[Rule]:
    """'L' layers' mixer q/k/v/o projections initialised from the HF attention of the same
    layer (linearising a pretrained softmax model; one way: HF holds no mixer). GQA's key and
    value heads are repeated to the mixer's heads as megatron pairs query heads with groups."""
    heads = hf_config.num_attention_heads
    groups = getattr(hf_config, "num_key_value_heads", None) or heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    rules = []
    for i in layers:
        for p in "qkvo":
            m = f"decoder.layers.{i}.self_attention.{p}_proj.weight"
            h = f"model.layers.{i}.self_attn.{p}_proj.weight"
            if m not in shapes:
                raise ValueError(f"--init-mixers-from-attention: the {args.la_module} mixer has no "
                                 f"{p}_proj to take {h}")
            repeat = heads // groups if p in "kv" and shapes[m][0] == heads * head_dim else 1

            def expand(t, repeat=repeat):
                t = t[0]
                if repeat > 1:
                    t = t.reshape(groups, -1, t.shape[-1]).repeat_interleave(repeat, 0)
                return [t.reshape(-1, t.shape[-1])]
            rules.append(Rule((m,), (h,), expand, _one_way))
    return rules


def model_rules(fmt: HFFormat, args, config) -> tuple[list[Rule], list[int]]:
    """(the rules of the whole model, the indices of 'L' layers, whose mixers HF lacks)."""
    from linear_moe.models.common import is_moe_layer

    rules = [same("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             same("decoder.final_layernorm.weight", "model.norm.weight")]
    if args.untie_embeddings_and_output_weights:
        rules.append(same("output_layer.weight", "lm_head.weight"))
    linear_layers = []
    for i, kind in enumerate(config.layer_type_list):
        m, h = f"decoder.layers.{i}", f"model.layers.{i}"
        rules += [same(f"{m}.input_layernorm.weight", f"{h}.input_layernorm.weight"),
                  same(f"{m}.pre_mlp_layernorm.weight", f"{h}.post_attention_layernorm.weight")]
        if kind == "N":
            rules += fmt.attention_rules(f"{m}.self_attention", f"{h}.self_attn", args)
        else:
            linear_layers.append(i)
        rules += mlp_rules(f"{m}.mlp", f"{h}.mlp", is_moe_layer(config, i),
                           config.num_moe_experts or 0, fmt.moe_names)
    return rules, linear_layers


def _torch_dtype(value) -> torch.dtype | None:
    """A HF config's dtype (a torch dtype, its name, or None)."""
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _megatron_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _hf_config_and_format(hf_dir: str):
    from transformers import AutoConfig

    from linear_moe.conversion import FORMATS

    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"{hf_dir!r} has no config.json; pass a HF model directory "
                                "(save_pretrained / a downloaded snapshot)")
    hf_config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    arch = (hf_config.architectures or [type(hf_config).__name__])[0]
    if arch not in FORMATS:
        raise ValueError(f"no converter for HF architecture {arch!r}; supported: "
                         f"{', '.join(FORMATS)}")
    return hf_config, FORMATS[arch]


def megatron_argv(fmt: HFFormat, hf_config, hf_dir: str, user_flags: list[str]) -> list[str]:
    """The flags that build our model of ``hf_config``: preset, HF shapes, then the user's (a
    --layer-type-list, --la-module, ... win over ours). The same flags train from the
    converted checkpoint."""
    from linear_moe.models import get_preset
    from linear_moe.models.common import args_to_argv

    flags = fmt.megatron_flags(hf_config)
    preset = get_preset(fmt.base_model).megatron_args(fmt.size)
    missing = set(get_preset(fmt.base_model).sizes[fmt.size]) - set(flags)
    assert not missing, f"{fmt.architecture}: flags {missing} would come from the preset size"
    # a flag cannot switch off what the preset sets (no --no-<flag> in megatron's parser)
    unset = [k for k, v in flags.items() if v in (False, None) and preset.get(k) not in (
        False, None)]
    if unset:
        raise ValueError(f"HF config gives {unset[0]}={flags[unset[0]]} but the {fmt.base_model} "
                         f"preset sets {preset[unset[0]]!r} and no flag unsets it: not supported")
    has_tokenizer = any(os.path.isfile(os.path.join(hf_dir, f))
                        for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
    tokenizer = (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir]
                 if has_tokenizer else ["--tokenizer-type", "NullTokenizer",
                                        "--vocab-size", str(hf_config.vocab_size - 1)])
    # the HF model as it is (all softmax) unless the user asks for a hybrid
    pattern = [] if "--layer-type-list" in user_flags else ["--layer-type-list", "N"]
    argv = (["--base-model", fmt.base_model, "--model-size", fmt.size] + args_to_argv(flags)
            + pattern
            + ["--padded-vocab-size", str(hf_config.vocab_size)] + tokenizer
            + list(user_flags))
    return argv


def _apply(rules: list[Rule], source: dict, to_megatron: bool) -> dict[str, torch.Tensor]:
    out = {}
    for rule in rules:
        src, dst = (rule.hf, rule.megatron) if to_megatron else (rule.megatron, rule.hf)
        fn = rule.to_megatron if to_megatron else rule.to_hf
        missing = [k for k in src if k not in source]
        if missing:
            raise KeyError(f"tensor {missing[0]!r} not found in the source model")
        for key, tensor in zip(dst, fn([source[k] for k in src])):
            out[key] = tensor
    return out


def hf_to_megatron(hf_dir: str, save_dir: str, user_flags: list[str] = (),
                   mixers_from_attention: bool = False) -> dict:
    """Convert the HF model in ``hf_dir`` into a megatron.training checkpoint in ``save_dir``
    ('release'); returns a report (flags to train from it, unused HF tensors, fresh tensors).
    mixers_from_attention: 'L' layers' q/k/v/o start from the HF attention's (else fresh)."""
    import megatron_patch  # noqa: F401  (typing.override for megatron.training on 3.11)
    from megatron.core import dist_checkpointing
    from megatron.training.checkpointing import (
        _build_sharded_state_dict_metadata,
        get_checkpoint_name,
        get_checkpoint_tracker_filename,
    )
    from transformers import AutoModelForCausalLM

    from linear_moe.inference import init_single_process
    from linear_moe.model_provider import build_standalone

    hf_config, fmt = _hf_config_and_format(hf_dir)
    if mixers_from_attention and fmt.base_model == "deepseek_v2":
        raise ValueError("--init-mixers-from-attention: MLA has no q/k/v projections to copy; "
                         "drop the flag")
    argv = megatron_argv(fmt, hf_config, hf_dir, user_flags)
    if os.path.exists(get_checkpoint_tracker_filename(save_dir)):
        raise FileExistsError(f"{save_dir!r} already holds a checkpoint; pass an empty --save "
                              "directory (nothing is overwritten)")
    # our model in the HF model's dtype (exact copies; half the memory of fp32 for bf16)
    dtype = _torch_dtype(getattr(hf_config, "dtype", None)) or torch.float32
    precision = {torch.bfloat16: ["--bf16"], torch.float16: ["--fp16"]}.get(dtype, [])
    init_single_process()
    model, config, args = build_standalone(
        argv + _BUILD_ONLY + precision + ["--use-cpu-initialization"], device="cpu")
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=dtype)
    hf_tensors = dict(hf_model.state_dict())
    rules, linear_layers = model_rules(fmt, args, config)
    ours = _megatron_tensors(model)
    if mixers_from_attention:
        rules += mixers_from_attention_rules(linear_layers, args, hf_config,
                                             {k: tuple(v.shape) for k, v in ours.items()})
    converted = set()
    with torch.no_grad():
        for rule in rules:  # one rule at a time: its fused copies are freed before the next
            for key, tensor in _apply([rule], hf_tensors, to_megatron=True).items():
                assert key in ours, f"a rule names {key}, which the model lacks"
                if ours[key].shape != tensor.shape:
                    fix = ("give the mixer the attention's dimensions (e.g. --la-expand-k 1, "
                           "--la-expand-v 1) or drop --init-mixers-from-attention"
                           if ".self_attention." in key and key.split(".")[2] in map(
                               str, linear_layers) else "the flags do not match the HF config")
                    raise ValueError(f"{key}: HF gives {tuple(tensor.shape)}, the model has "
                                     f"{tuple(ours[key].shape)}; {fix}")
                ours[key].copy_(tensor)
                converted.add(key)
    used = {k for r in rules for k in r.hf}
    # tied HF models list lm_head beside the embedding: the same tensor
    unused = sorted(k for k in hf_tensors if k not in used
                    and not (k == "lm_head.weight" and not args.untie_embeddings_and_output_weights))
    fresh = sorted(set(ours) - converted)
    del hf_model, hf_tensors

    path = get_checkpoint_name(save_dir, 0, release=True, return_base_dir=True)
    os.makedirs(path, exist_ok=True)
    metadata = _build_sharded_state_dict_metadata(args)
    state = {"model": model.sharded_state_dict(metadata=metadata), "args": args,
             "checkpoint_version": 3.0, "iteration": 0}
    dist_checkpointing.save(state, path, content_metadata=metadata)
    with open(get_checkpoint_tracker_filename(save_dir), "w") as f:
        f.write("release")
    report = {"hf_dir": os.path.abspath(hf_dir), "architecture": fmt.architecture,
              "mixers_from_attention": mixers_from_attention,
              "dtype": str(dtype).removeprefix("torch."),
              "layer_type_list": config.layer_type_list, "linear_layers": linear_layers,
              "train_flags": argv + ["--pretrained-checkpoint", os.path.abspath(save_dir)],
              "unused_hf_tensors": unused, "fresh_megatron_tensors": fresh}
    with open(os.path.join(save_dir, ARGS_FILE), "w") as f:
        json.dump(report, f, indent=1)
    return report


def _trained_dtype(load_dir: str, iteration: int | None) -> torch.dtype:
    """The dtype the checkpoint's run held its parameters in (its saved arguments)."""
    from megatron.core import dist_checkpointing

    from linear_moe.inference import checkpoint_dir

    saved = dist_checkpointing.load_common_state_dict(checkpoint_dir(load_dir, iteration))["args"]
    return saved.params_dtype


def megatron_to_hf(load_dir: str, hf_out: str, iteration: int | None = None,
                   dtype: torch.dtype | None = None) -> str:
    """Write the checkpoint of ``load_dir`` as a HF model (+ its tokenizer) into ``hf_out``;
    returns the architecture. Only all-softmax ('N') models have a HF class to go to."""
    from linear_moe.conversion import format_for_args
    from linear_moe.inference import load_checkpoint
    from linear_moe.model_provider import build_config

    if os.path.exists(os.path.join(hf_out, "config.json")):
        raise FileExistsError(f"{hf_out!r} already holds a HF model; pass an empty directory")
    out_dtype = dtype or _trained_dtype(load_dir, iteration)
    # loaded in the output dtype: the HF model then takes these tensors without copies
    model, args = load_checkpoint(load_dir, iteration, device="cpu", dtype=out_dtype)
    fmt = format_for_args(args)
    config = build_config(args)
    rules, linear_layers = model_rules(fmt, args, config)
    if linear_layers:
        raise ValueError(f"layers {linear_layers} of '{config.layer_type_list}' are linear "
                         f"mixers ({args.la_module}), which HF's {fmt.architecture} cannot hold; "
                         "only all-'N' models export to HF")
    ours = _megatron_tensors(model)
    unused = sorted(set(ours) - {k for r in rules for k in r.megatron})
    if unused:  # a part of the model the format does not know: refuse rather than drop it
        raise ValueError(f"{len(unused)} tensors have no HF counterpart in {fmt.architecture} "
                         f"(first: {unused[0]}); the model has options the HF class lacks")
    hf_tensors = _apply(rules, ours, to_megatron=False)
    if not args.untie_embeddings_and_output_weights:  # HF's state dict lists the tied head too
        hf_tensors["lm_head.weight"] = hf_tensors["model.embed_tokens.weight"]
    import transformers

    tokenizer = None
    tokenizer_dir = getattr(args, "tokenizer_model", None)
    if args.tokenizer_type == "HuggingFaceTokenizer" and tokenizer_dir and os.path.isdir(tokenizer_dir):
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    hf_config = fmt.hf_config(args)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(hf_config, name, getattr(tokenizer, name, None))
    hf_config.dtype = out_dtype
    with torch.device("meta"):
        hf_model = getattr(transformers, fmt.architecture)(hf_config)
    hf_model.load_state_dict(hf_tensors, strict=True, assign=True)
    hf_model.tie_weights()
    hf_model.save_pretrained(hf_out)
    if tokenizer is not None:
        tokenizer.save_pretrained(hf_out)
    else:
        print(f"linear_moe: the checkpoint names no HF tokenizer directory ({args.tokenizer_type},"
              f" {tokenizer_dir!r}); copy the tokenizer into {hf_out} yourself", flush=True)
    return fmt.architecture
