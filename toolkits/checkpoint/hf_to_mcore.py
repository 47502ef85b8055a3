"""Convert a HF transformers model into a Megatron checkpoint that linear_moe trains from.

    python toolkits/checkpoint/hf_to_mcore.py --hf-dir HF_MODEL --save CKPT [megatron flags]

Extra flags shape the model: e.g. `--layer-type-list LLLN... --la-module gla` keeps the HF
model's embeddings, norms, MLPs / experts and the 'N' layers' attention, and starts the 'L'
layers' mixers fresh (listed in the report), or with --init-mixers-from-attention their q/k/v/o
from the HF attention of their layer. CKPT gets a 'release' checkpoint (loads under any
TP / PP / EP) and linear_moe_convert.json with the flags to train from it
(`pretrain_linear_moe.py <train_flags> ...`). Supported: Llama, Qwen2, Qwen2-MoE, Mixtral,
DeepSeek-V2 (linear_moe.conversion.FORMATS).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json)")
    parser.add_argument("--save", required=True, help="empty directory for the checkpoint")
    parser.add_argument("--init-mixers-from-attention", action="store_true",
                        help="'L' layers' mixer q/k/v/o projections start from the HF attention "
                             "of their layer (GQA heads repeated); needs equal dimensions")
    args, megatron_flags = parser.parse_known_args(argv)
    from linear_moe.conversion.core import ARGS_FILE, hf_to_megatron

    report = hf_to_megatron(args.hf_dir, args.save, megatron_flags,
                            args.init_mixers_from_attention)
    print(f"linear_moe: {report['architecture']} -> {args.save} (release, "
          f"{report['dtype']}, layers '{report['layer_type_list']}')")
    if report["linear_layers"]:
        print(f"linear_moe: layers {report['linear_layers']} are linear mixers: their "
              f"{len(report['fresh_megatron_tensors'])} tensors start fresh and "
              f"{len(report['unused_hf_tensors'])} HF attention tensors are not used (listed in "
              f"{ARGS_FILE})")
    elif report["unused_hf_tensors"] or report["fresh_megatron_tensors"]:
        print(f"linear_moe: unused HF tensors {report['unused_hf_tensors']}, fresh tensors "
              f"{report['fresh_megatron_tensors']}")
    print("linear_moe: train from it with: pretrain_linear_moe.py "
          + " ".join(report["train_flags"]) + " <data, batch and schedule flags>")


if __name__ == "__main__":
    main()
