"""`linear-moe` console command.

    linear-moe mixers            the registered mixers, one per line, with support flags
    linear-moe pretrain ARGS     same as `python pretrain_linear_moe.py ARGS`
    linear-moe generate --load DIR --prompt TEXT [--max-new-tokens N]
                                 a checkpoint's greedy continuation of TEXT (linear_moe.inference)
"""

from __future__ import annotations

import argparse
import sys


def _print_mixers() -> None:
    from linear_moe.registry import registered_mixers

    for name, entry in registered_mixers().items():
        print(f"{name}\t{entry.support_flags()}\tmodes={','.join(entry.modes)}\t{entry.kernel}")


def _generate(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="linear-moe generate",
                                     description="greedy continuation of a prompt by a checkpoint")
    parser.add_argument("--load", required=True, help="the training run's --save directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--iteration", type=int, help="default: the latest saved")
    parser.add_argument("--tokenizer-model", help="HF tokenizer directory (default: the run's)")
    parser.add_argument("--device", help="default: cuda if present, else cpu")
    args = parser.parse_args(argv)
    from linear_moe.inference import CausalLM

    lm = CausalLM.from_checkpoint(args.load, args.iteration, args.tokenizer_model, args.device)
    context = lm.encode(args.prompt) or [lm.eod]
    print(args.prompt + lm.decode(lm.generate(context, args.max_new_tokens)), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="linear-moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["mixers", "pretrain", "generate"])
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "mixers":
        _print_mixers()
    elif args.command == "generate":
        _generate(argv[1:])
    else:
        from linear_moe.pretrain import main as pretrain_main

        pretrain_main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
