"""benchmarks/gpu.py runs end to end at its CPU smoke setting and reports what it claims to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_runs_on_the_cpu_at_quick_sizes() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick", "--rounds", "1"],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["quick"] is True
    for workload in ("sinusoid", "conv4"):
        row = summary["correctness"][workload]
        measured = {k: v for k, v in row.items() if isinstance(v, float)}
        assert {"loop", "vmap", "vmap+chunk2"} <= {k.split("/")[0] for k in measured}
        assert all(v < 1e-12 for v in measured.values()), row  # float64, the same meta-gradient
    assert set(summary["figures"]) == {"sinusoid-1step", "omniglot-1step", "omniglot-5step", "miniimagenet-5step"}
    for row in summary["figures"].values():
        assert "vmap+graph" not in row  # CUDA graphs need a CUDA device
        for name in ("loop", "vmap", "higher"):
            key = next(k for k in row if k.split("/")[0] == name)
            assert row[key]["ms"] > 0 and row[key]["peak_mib"] >= 0
        chunked = next(r for k, r in row.items() if "+chunk" in k)
        assert chunked["ms"] > 0
    sweep = summary["chunk_sweep"]["by_chunk_size"]
    assert list(sweep) == ["4", "2", "1"] and all(r["ms"] > 0 for r in sweep.values())
    assert sweep["1"]["peak_mib"] < sweep["4"]["peak_mib"]  # chunks lower the peak (profiler's CPU allocations)
