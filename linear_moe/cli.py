"""`linear-moe` console command.

    linear-moe mixers            the registered mixers, one per line, with support flags
    linear-moe pretrain ARGS     same as `python pretrain_linear_moe.py ARGS`
"""

from __future__ import annotations

import argparse
import sys


def _print_mixers() -> None:
    from linear_moe.registry import registered_mixers

    for name, entry in registered_mixers().items():
        print(f"{name}\t{entry.support_flags()}\tmodes={','.join(entry.modes)}\t{entry.kernel}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="linear-moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["mixers", "pretrain"])
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "mixers":
        _print_mixers()
    else:
        from linear_moe.pretrain import main as pretrain_main

        pretrain_main(argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
