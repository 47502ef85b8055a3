"""A trained checkpoint as a model to score and sample from, in one process (evaluation).

``load_checkpoint(dir)`` rebuilds the model from the arguments megatron.training saved in the
checkpoint (no model flags to repeat) and loads its weights through megatron-core's dist
checkpointing, which reshards: a checkpoint saved under TP (tested: TP = 2 with sequence
parallelism) or PP / EP loads into this single-rank model. ``CausalLM`` wraps it with its
tokenizer: log-probabilities of tokens and greedy generation, one token per step with the
'L' mixers' recurrent states and the 'N' layers' KV cache (megatron-core's
StaticInferenceContext) where the mixer supports decoding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# One rank: dist checkpointing reshards whatever parallel layout the checkpoint was saved in.
_SINGLE_RANK = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                "expert_model_parallel_size": 1, "expert_tensor_parallel_size": 1,
                "context_parallel_size": 1, "virtual_pipeline_model_parallel_size": None,
                "sequence_parallel": False}


def checkpoint_dir(load_dir: str, iteration: int | None = None) -> str:
    """The checkpoint directory of ``load_dir`` (a --save directory): ``iteration``'s, or the one
    megatron.training's tracker file names (an iteration or 'release'), by megatron's naming."""
    import megatron_patch  # noqa: F401  (typing.override for megatron.training on 3.11)
    from megatron.training.checkpointing import (
        get_checkpoint_name,
        get_checkpoint_tracker_filename,
    )

    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"checkpoint directory {load_dir!r} not found; pass the --save "
                                "directory of a training run")
    release = False
    if iteration is None:
        tracker = get_checkpoint_tracker_filename(load_dir)
        if not os.path.isfile(tracker):
            raise FileNotFoundError(f"{load_dir!r} has no {os.path.basename(tracker)}; pass a "
                                    "--save directory of megatron.training or --iteration")
        with open(tracker) as f:
            text = f.read().strip()
        release = text == "release"
        if not (release or text.isdigit()):
            raise ValueError(f"{tracker} holds {text!r}, not an iteration; pass --iteration")
        iteration = 0 if release else int(text)
    path = get_checkpoint_name(load_dir, iteration, release, return_base_dir=True)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint {path!r}; pick an --iteration that was saved")
    return path


def init_single_process(seed: int = 1234) -> None:
    """Megatron's parallel state for this one process: NCCL on GPU 0, or gloo with
    megatron_patch.cpu_support without CUDA; an in-process store, so no port to pick.
    Idempotent (the benchmarks and evaluation share it)."""
    import megatron_patch  # noqa: F401  (typing.override for megatron on 3.11)
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel
    from megatron_patch import cpu_support

    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            cpu_support.enable()
        else:
            torch.cuda.set_device(0)
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(),
                                             rank=0, world_size=1)
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _inference_args(saved, device: torch.device, dtype: torch.dtype | None):
    """The checkpoint's training arguments, set for one rank on ``device`` in ``dtype``
    (default: bf16 / fp16 as trained on CUDA, fp32 on the CPU)."""
    import copy

    args = copy.copy(saved)
    for name, value in _SINGLE_RANK.items():
        setattr(args, name, value)
    if dtype is None:
        dtype = saved.params_dtype if device.type == "cuda" else torch.float32
    args.params_dtype, args.bf16, args.fp16 = dtype, dtype == torch.bfloat16, dtype == torch.float16
    if device.type != "cuda":  # a run trained on the GPU, loaded on the CPU
        from megatron_patch.cpu_support import CPU_FUSIONS_OFF

        for name in CPU_FUSIONS_OFF.values():
            setattr(args, name, False)
        args.use_cpu_initialization = True
    args.recompute_granularity = None  # nothing to recompute without a backward
    if getattr(args, "moe_expert_capacity_factor", None) is not None:
        # dropless: a request's scores must not depend on the others in its batch (or padding)
        print(f"linear_moe: evaluating without the run's --moe-expert-capacity-factor "
              f"{args.moe_expert_capacity_factor} (no token dropping)", flush=True)
        args.moe_expert_capacity_factor = None
        args.moe_pad_expert_input_to_capacity = False
    return args


def load_checkpoint(load_dir: str, iteration: int | None = None, device=None,
                    dtype: torch.dtype | None = None):
    """(model, args): the model of a megatron.training torch_dist checkpoint, its weights
    loaded, in eval mode on ``device`` (default: CUDA if present, else CPU)."""
    from megatron.core import dist_checkpointing

    from linear_moe.model_provider import build_config, build_model

    path = checkpoint_dir(load_dir, iteration)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    init_single_process()
    common = dist_checkpointing.load_common_state_dict(path)
    if "args" not in common:
        raise ValueError(f"{path!r} carries no training arguments; it must be saved by "
                         "megatron.training (pretrain_linear_moe.py --save)")
    args = _inference_args(common["args"], device, dtype)
    config = build_config(args)
    with torch.device(device):
        model = build_model(args, config)
    sharded = model.sharded_state_dict(metadata=common.get("content_metadata"))
    # fills the parameters in place; load_state_dict adds the non-tensor (_extra_state) entries,
    # as megatron.training's load_checkpoint does
    loaded = dist_checkpointing.load({"model": sharded}, path)
    model.load_state_dict(loaded["model"])
    return model.to(device).eval(), args


@dataclass
class CausalLM:
    """A loaded model and its tokenizer: token log-probabilities and greedy generation."""

    model: torch.nn.Module
    tokenizer: object  # a transformers tokenizer
    max_length: int
    device: torch.device

    @classmethod
    def from_checkpoint(cls, load_dir: str, iteration: int | None = None,
                        tokenizer_path: str | None = None, device=None,
                        dtype: torch.dtype | None = None) -> "CausalLM":
        """tokenizer_path: a HF tokenizer directory, default the one the run trained with."""
        model, args = load_checkpoint(load_dir, iteration, device, dtype)
        path = tokenizer_path or getattr(args, "tokenizer_model", None)
        if args.tokenizer_type != "HuggingFaceTokenizer" and tokenizer_path is None:
            raise ValueError(f"the run trained with --tokenizer-type {args.tokenizer_type}; pass "
                             "the HF tokenizer directory of its vocabulary (--tokenizer-model)")
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory {path!r} not found; pass "
                                    "--tokenizer-model with the run's HF tokenizer directory")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(model, tokenizer, args.seq_length, next(model.parameters()).device)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's ids; the model's padded vocabulary has unused ids above them."""
        return len(self.tokenizer)

    @property
    def eod(self) -> int:
        """The end-of-document id the data pipeline appended (the tokenizer's eos)."""
        return self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[b, s] token ids -> [b, s, padded vocab] fp32 next-token logits (causal: right
        padding leaves the logits of the real tokens unchanged)."""
        tokens = tokens.to(self.device)
        positions = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        return self._forward(tokens, positions).float()

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, **kwargs) -> torch.Tensor:
        from megatron_patch.cpu_support import cpu_scope

        with cpu_scope(self.device):  # a CPU model in a process with CUDA stays on the CPU
            return self.model(tokens, positions, None, **kwargs)

    def continuation_logprobs(self, pairs: list[tuple[list[int], list[int]]],
                              batch_size: int = 8) -> list[tuple[float, bool]]:
        """For each (context, continuation) of token ids: (sum of log p(continuation | context),
        whether greedy decoding produces the continuation). The context is cut from the left to
        fit max_length; a continuation needs at least one token of context (e.g. the eod)."""
        results = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            rows = []
            for context, continuation in chunk:
                if not continuation:
                    raise ValueError("an empty continuation has no log-probability")
                if len(continuation) > self.max_length:
                    raise ValueError(f"a continuation of {len(continuation)} tokens exceeds the "
                                     f"model's {self.max_length}; score it in windows "
                                     "(loglikelihood_rolling)")
                if not context:
                    raise ValueError("a continuation needs a context token; start it with the "
                                     "eod token")
                whole = (context + continuation)[-(self.max_length + 1):]
                rows.append((whole[:-1], len(continuation)))
            width = max(len(r) for r, _ in rows)
            tokens = torch.full((len(rows), width), self.eod, dtype=torch.long)
            for i, (row, _) in enumerate(rows):
                tokens[i, :len(row)] = torch.tensor(row)
            logprobs = torch.log_softmax(self.logits(tokens), -1)
            for i, ((row, n), (_, continuation)) in enumerate(zip(rows, chunk)):
                target = torch.tensor(continuation, device=logprobs.device)
                lp = logprobs[i, len(row) - n:len(row)]
                greedy = lp[:, :self.vocab_size].argmax(-1)
                results.append((lp.gather(-1, target[:, None]).sum().item(),
                                bool((greedy == target).all())))
        return results

    @property
    def decodes_incrementally(self) -> bool:
        """Whether every 'L' layer's mixer keeps a recurrent state for one-token steps (the 'N'
        layers keep megatron's KV cache)."""
        from linear_moe.registry import LINEAR, get_mixer

        config = self.model.config
        return (LINEAR not in config.layer_type_list
                or get_mixer(config.la_module).builder.decode_unsupported(config) is None)

    def generate(self, context: list[int], max_new_tokens: int,
                 stop: list[str] | None = None, incremental: bool | None = None) -> list[int]:
        """Greedy continuation of ``context``: up to max_new_tokens ids, ending before the eod
        or where the decoded text first contains a ``stop`` string. One forward of the context,
        then one token per step with the layers' states (megatron's StaticInferenceContext)
        where the mixer supports it and all fits in max_length; otherwise the last max_length
        tokens are run again for each new token. ``incremental`` forces one way (benchmarks)."""
        fits = len(context) + max_new_tokens <= self.max_length
        if incremental is None:
            incremental = self.decodes_incrementally and fits
        elif incremental and not (self.decodes_incrementally and fits):
            raise ValueError("incremental decoding needs a mixer that decodes and the context "
                             f"plus new tokens within {self.max_length}")
        step = self._cached_steps if incremental else self._rerun_steps
        new = []
        for token in step(list(context), max_new_tokens):
            if token == self.eod:
                break
            new.append(token)
            if stop and any(s in self.decode(new) for s in stop):
                break
        return new

    def _argmax(self, logits: torch.Tensor) -> int:
        return int(logits[0, -1, :self.vocab_size].argmax())

    def _rerun_steps(self, ids: list[int], count: int):
        for _ in range(count):
            token = self._argmax(self.logits(torch.tensor([ids[-self.max_length:]])))
            ids.append(token)
            yield token

    @torch.no_grad()
    def _cached_steps(self, ids: list[int], count: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        state = StaticInferenceContext(1, len(ids) + count)
        tokens = torch.tensor([ids], device=self.device)
        for _ in range(count):
            positions = torch.arange(state.sequence_len_offset,
                                     state.sequence_len_offset + tokens.shape[1],
                                     device=self.device)[None]
            # only the last position's logits (the context's materialize_only_last_token_logits)
            logits = self._forward(tokens, positions, inference_context=state)
            state.sequence_len_offset += tokens.shape[1]
            token = self._argmax(logits)
            yield token
            tokens = torch.tensor([[token]], device=self.device)
