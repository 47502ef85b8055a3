"""Export a linear_moe Megatron checkpoint (any TP / PP / EP layout) as a HF transformers model.

    python toolkits/checkpoint/mcore_to_hf.py --load CKPT --hf-out HF_DIR [--iteration N]
        [--dtype bfloat16]

Only all-softmax ('N') models have a HF class to go to (Llama, Qwen2, Qwen2-MoE, Mixtral,
DeepSeek-V2 by --base-model and whether it has experts); a model with linear-mixer layers is
refused. The tokenizer of the run is saved beside the weights.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="the training run's --save directory")
    parser.add_argument("--hf-out", required=True, help="empty directory for the HF model")
    parser.add_argument("--iteration", type=int, help="default: the latest saved")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="default: the dtype the run trained in")
    args = parser.parse_args(argv)
    import torch

    from linear_moe.conversion.core import megatron_to_hf

    arch = megatron_to_hf(args.load, args.hf_out, args.iteration,
                          getattr(torch, args.dtype) if args.dtype else None)
    print(f"linear_moe: {args.load} -> {args.hf_out} ({arch})")


if __name__ == "__main__":
    main()
