"""Pretraining through ``megatron.training.pretrain``: argument set-up, forward step, datasets.

``main()`` is what ``pretrain_linear_moe.py`` and ``linear-moe pretrain`` run. Without CUDA it
enables megatron_patch.cpu_support and adds its flags first, so the same command trains on CPU.
"""

from __future__ import annotations

import os
import sys
from functools import partial

import torch

import megatron_patch  # noqa: F401
from megatron_patch import cpu_support


def _prepare_argv(argv: list[str]) -> list[str]:
    from linear_moe.arguments import preset_argv

    # Order: CPU needs < preset < user flags (argparse keeps the last value).
    argv = preset_argv(argv)
    if not torch.cuda.is_available():
        argv = cpu_support.CPU_ARGS + argv
    return argv


def get_batch(data_iterator):
    """Tokens/labels/masks of one micro-batch: read on TP rank 0, broadcast over TP.

    No host synchronisation (--cuda-graph-impl full_iteration captures this): TP = 1 only moves
    the batch to the device, TP > 1 broadcasts at the fixed [micro-batch, seq-length] shape
    instead of megatron-core's broadcast_data, which first exchanges the sizes via the host.
    Under context parallelism each rank keeps its two chunks (megatron's layout); with
    --reset-attention-mask the packed documents come back as PackedSeqParams (found on the
    host, so validate_args refuses that with CUDA graphs), else None."""
    from megatron.core import mpu
    from megatron.training import get_args

    args = get_args()
    dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    dtypes = {"tokens": torch.int64, "labels": torch.int64, "loss_mask": torch.float32,
              "position_ids": torch.int64}
    shape = (args.micro_batch_size, args.seq_length)
    if mpu.get_tensor_model_parallel_rank() == 0:
        data = next(data_iterator)
        batch = {k: data[k].to(dev, dtype, non_blocking=True) for k, dtype in dtypes.items()}
        if batch["tokens"].shape != shape:
            raise ValueError(f"a micro-batch of shape {tuple(batch['tokens'].shape)} does not "
                             f"match --micro-batch-size x --seq-length {shape}; the dataset must "
                             "yield fixed-length samples")
    else:
        batch = {k: torch.empty(shape, dtype=dtype, device=dev) for k, dtype in dtypes.items()}
    if mpu.get_tensor_model_parallel_world_size() > 1:
        for key in dtypes:
            torch.distributed.broadcast(batch[key], mpu.get_tensor_model_parallel_src_rank(),
                                        group=mpu.get_tensor_model_parallel_group())
    if mpu.get_context_parallel_world_size() > 1:  # this rank's two chunks of the sequence
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False,
                                          cp_group=mpu.get_context_parallel_group())
    packed_seq_params = None
    if args.reset_attention_mask:  # the packed documents' borders (validate_args: CP = 1)
        from megatron.training import get_tokenizer

        from linear_moe.layers.documents import packed_documents

        packed_seq_params = packed_documents(batch["tokens"], get_tokenizer().eod)
    return (batch["tokens"], batch["labels"], batch["loss_mask"], batch["position_ids"],
            packed_seq_params)


def loss_func(loss_mask, output_tensor):
    """Sum of masked per-token losses and the token count; Megatron divides (per-token mean)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1)
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    report = torch.cat([loss.clone().detach().view(1), num_tokens.view(1).float()])
    return loss, num_tokens, {"lm loss": report}


def forward_step(data_iterator, model):
    from megatron.training import get_timers

    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask, position_ids, packed_seq_params = get_batch(data_iterator)
    timers("batch-generator").stop()
    # attention_mask=None: the softmax layers are causal (SDPA is_causal), the mixers are causal
    # by construction; packed documents (--reset-attention-mask) come as packed_seq_params.
    output = model(tokens, position_ids, None, labels=labels, packed_seq_params=packed_seq_params)
    return output, partial(loss_func, loss_mask)


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer, print_rank_0
    from megatron.training.utils import get_blend_and_blend_per_split

    args = get_args()
    if args.sft_data_path:
        return _sft_datasets(args, get_tokenizer(), train_val_test_num_samples)
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,
    )
    print_rank_0("> building train, validation, and test datasets for linear_moe ...")
    return BlendedMegatronDatasetBuilder(
        MockGPTDataset if args.mock_data else GPTDataset, train_val_test_num_samples,
        lambda: True, config).build()


train_valid_test_datasets_provider.is_distributed = True


def _sft_datasets(args, tokenizer, num_samples):
    from linear_moe.data.sft import SFTDataset

    train_n, valid_n, _ = num_samples
    build = lambda n, seed: SFTDataset(args.sft_data_path, tokenizer, args.seq_length, n,
                                       seed=seed, packing=args.sft_packing)
    return build(train_n, args.seed), (build(valid_n, args.seed + 1) if valid_n else None), None


def check_data_paths(args) -> None:
    """Missing dataset files fail here, in one line, before any model is built."""
    if args.sft_data_path:
        if not os.path.exists(args.sft_data_path):
            raise FileNotFoundError(f"SFT data file {args.sft_data_path} not found; fix "
                                    "--sft-data-path")
        return
    paths = [p for p in (args.data_path or []) if not _is_number(p)]
    for split in ("train_data_path", "valid_data_path", "test_data_path"):
        paths += [p for p in (getattr(args, split) or []) if not _is_number(p)]
    if not paths and not args.mock_data:
        raise ValueError("no training data: pass --data-path PREFIX (a Megatron indexed dataset, "
                         "see toolkits/data/preprocess_data.py) or --mock-data")
    for prefix in paths:
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise FileNotFoundError(
                    f"dataset file {prefix + ext} not found; build it with "
                    f"`python toolkits/data/preprocess_data.py --output-prefix ...` or fix "
                    f"--data-path")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def parse_args(argv: list[str]):
    """Megatron's argument parsing + linear_moe's checks, with the preset and CPU flags."""
    from megatron.training.arguments import parse_and_validate_args

    from linear_moe.arguments import add_args, validate_args

    if not torch.cuda.is_available():
        cpu_support.enable()
    saved = sys.argv
    sys.argv = [saved[0]] + _prepare_argv(argv)
    try:
        args = parse_and_validate_args(extra_args_provider=add_args)
    finally:
        sys.argv = saved
    validate_args(args)
    check_data_paths(args)
    return args


def _default_single_process_env() -> None:
    """Let `python pretrain_linear_moe.py ...` run as one process without torchrun."""
    if "WORLD_SIZE" in os.environ:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")


def check_only(argv: list[str]) -> int:
    """Parse and validate everything a launch would, print one line, build nothing."""
    try:
        parse_args(argv)
    except SystemExit as exc:  # argparse already printed its own error
        return int(exc.code or 2)
    except (ValueError, AssertionError, FileNotFoundError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"linear_moe: invalid settings: {reason}", file=sys.stderr)
        return 2
    print("linear_moe: settings ok", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> None:
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    from linear_moe.model_provider import model_provider

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--check-only" in argv:
        argv.remove("--check-only")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("RANK", "0")
        sys.exit(check_only(argv))
    _default_single_process_env()
    args = parse_args(argv)
    cfg = pretrain_cfg_container_from_args(args)
    pretrain(cfg, train_valid_test_datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=model_provider)


if __name__ == "__main__":
    main()
