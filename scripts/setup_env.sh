#!/usr/bin/env bash
# Create .venv (if missing) and install linear_moe with its pinned stack into it. Idempotent: a
# stamp of this script + setup.py skips the work when nothing changed.
#
# Why the order: torch first (the user's build; here the local CPU wheel, so nothing pulls a
# multi-GB CUDA build), numpy/packaging before megatron-core (left to resolve, pip picked a
# numpy sdist), and megatron-core 0.19.2 with --ignore-requires-python on Python 3.11 (it declares
# >= 3.12 but runs on 3.11 with megatron_patch.python311; pip on 3.11 would otherwise pick 0.16).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp="$VENV/.linear_moe_stamp"
want=$(cat scripts/setup_env.sh setup.py | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" numpy packaging typing_extensions einops psutil
# megatron.core imports triton unconditionally; CUDA builds of torch bring their own.
"$VENV/bin/python" -c "import triton" 2>/dev/null || "${PIP[@]}" "triton==3.9.0"
if "$VENV/bin/python" -c "import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)"; then
    "${PIP[@]}" --no-deps megatron-core==0.19.2
else
    "${PIP[@]}" --no-deps --ignore-requires-python megatron-core==0.19.2
fi
"${PIP[@]}" -e ".[test]"
echo "$want" > "$stamp"
