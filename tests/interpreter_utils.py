"""Run a script in a fresh Python with TRITON_INTERPRET=1: our Triton kernels on the CPU
(Triton's interpreter reads the variable at import, hence the separate process)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_in_triton_interpreter(script: str, timeout: int = 600) -> str:
    """The script's stdout; fails the test unless it exits 0 and prints a line starting 'ok'."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=timeout)
    ok = any(line.startswith("ok") for line in proc.stdout.splitlines())
    assert proc.returncode == 0 and ok, proc.stdout[-1000:] + proc.stderr[-3000:]
    return proc.stdout
