#!/usr/bin/env python
"""Tokenize .jsonl/.jsonl.gz files into a Megatron indexed dataset.

Thin CLI over ``linear_moe.data.preprocess.preprocess_jsonl``.  Writes
``<output-prefix>_<json-key>_document.bin/.idx`` and prints that data prefix
(the value for Megatron's ``--data-path``) on stdout.

Example::

    python toolkits/data/preprocess_data.py --input my.jsonl.gz --output-prefix data/my
    # -> data/my_text_document(.bin/.idx); train with
    #    --data-path data/my_text_document --tokenizer-type HuggingFaceTokenizer \
    #    --tokenizer-model linear_moe/data/default_tokenizer
"""

import argparse
import contextlib
import os
import sys

# Allow running from a source checkout without installing the package.
_REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from linear_moe.data.default_corpus import default_tokenizer_path  # noqa: E402
from linear_moe.data.preprocess import preprocess_jsonl  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl or .jsonl.gz file(s)")
    parser.add_argument("--output-prefix", required=True,
                        help="writes <prefix>_<json-key>_document.bin/.idx")
    parser.add_argument("--tokenizer-path", default=default_tokenizer_path(),
                        help="local HF tokenizer directory (default: the shipped tokenizer)")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                        help="append the EOD (eos) token to every document (default: on)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            prefix = preprocess_jsonl(args.input, args.output_prefix, args.tokenizer_path,
                                      json_key=args.json_key, append_eod=args.append_eod,
                                      workers=args.workers)
    except (OSError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 1
    print(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
