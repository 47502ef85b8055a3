"""The benchmark scripts run end to end at toy sizes on the CPU (numbers only count on the GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script,expected_rows", [("layer_bench.py", None), ("e2e_bench.py", 10)])
def test_benchmark_smoke(script, expected_rows, tmp_path):
    from linear_moe.registry import registered_mixers

    out = tmp_path / "result"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--toy",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    rows = result["rows"]
    assert len(rows) == (expected_rows or len(registered_mixers()))
    assert result["environment"]["device"].startswith("cpu")
    ratio = "overhead" if script == "layer_bench.py" else "speedup_vs_N"
    assert all(row[ratio] > 0 for row in rows)
    assert (tmp_path / "result.md").read_text().count("\n|") >= len(rows)
