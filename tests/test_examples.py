"""The examples are tutorials: each must run end to end at its tiny CI setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_task_sampling_example(tmp_path):
    out = run_example("task_sampling.py", "--smoke", "--out", str(tmp_path))
    assert "same tasks as indexing: True" in out
    assert "(disjoint)" in out


def test_sinusoid_example(tmp_path):
    out = run_example("sinusoid.py", "--smoke", "--no-progress", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in rows} == {"maml", "meta-sgd"}
    for row in rows:
        assert row["tasks"] == 20 and row["mse"] > 0 and row["ci95"] > 0
    assert "MSE" in out
    for row in rows:  # each run's JSONL log, one train row per outer step
        assert len(Path(row["log"]).read_text().splitlines()) == 20
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "fits.png").stat().st_size > 0


def test_omniglot_example_on_fixture(tmp_path):
    from omniglot_fixture import write_omniglot

    root = tmp_path / "omniglot"
    write_omniglot(root)  # 12 characters in the real layout
    run_dir = tmp_path / "run"
    args = ["--root", str(root), "--run-dir", str(run_dir), "--smoke", "--no-progress",
            "--ways", "2", "--n-source", "7", "--n-val", "2"]
    out = run_example("omniglot.py", *args)
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["iterations"] == 4 and summary["test_tasks"] == 10
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert "meta-test accuracy" in out
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())  # checkpoints were written
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pass
    else:  # the learning curves, drawn by metalearn.plot from the run's log
        assert (run_dir / "curves.png").stat().st_size > 0 and "curves.png" in out
    # a second run resumes from the last checkpoint instead of starting over
    out = run_example("omniglot.py", *args)
    assert json.loads((run_dir / "results.json").read_text())["iterations"] == 4


@pytest.mark.parametrize("method", ["fomaml", "anil", "protonet", "proto-maml", "imaml", "darts"])
def test_omniglot_example_methods_on_fixture(tmp_path, method):
    from omniglot_fixture import write_omniglot

    root = tmp_path / "omniglot"
    write_omniglot(root)
    run_dir = tmp_path / "run"
    run_example("omniglot.py", "--root", str(root), "--run-dir", str(run_dir), "--smoke", "--no-progress",
                "--ways", "2", "--n-source", "7", "--n-val", "2", "--method", method)
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["method"] == method and summary["iterations"] == 4
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    if method == "imaml":  # meta-tested on its proximal inner problem, with its own defaults
        assert summary["test_proximal_lambda"] == 0.5 and summary["test_inner_steps"] == 2  # (smoke: ≤ 2)
    if method == "darts":  # the search reports the derived network and meta-tests it and the mixture
        assert len(summary["derived_ops"]) == 4 and len(summary["alpha_weights"]) == 4
        assert 0.0 <= summary["mixture_test_accuracy"] <= 1.0
        assert (run_dir / "derived.pt").stat().st_size > 0


def test_omniglot_example_trains_a_found_architecture(tmp_path):
    from omniglot_fixture import write_omniglot

    root = tmp_path / "omniglot"
    write_omniglot(root)
    run_dir = tmp_path / "run"
    ops = "maxpool3x3,skip,conv3x3,conv5x5"
    run_example("omniglot.py", "--root", str(root), "--run-dir", str(run_dir), "--smoke", "--no-progress",
                "--ways", "2", "--n-source", "7", "--n-val", "2", "--architecture", ops)
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["architecture"] == ops.split(",") and summary["iterations"] == 4
    # the checkpoint holds the cell network's parameters (a conv 5x5 in cell 3), not the Conv-4's
    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    state = torch.load(last, weights_only=True)
    assert [tuple(v.shape) for k, v in state["omega"].items() if k.endswith("cells.3.op.weight")] == [(8, 8, 5, 5)]


@pytest.mark.parametrize("bad", [["--method", "darts", "--architecture", "conv3x3"],
                                 ["--architecture", "conv3x3,conv7x7"]])
def test_omniglot_example_refuses_bad_architecture(tmp_path, bad):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "omniglot.py"), "--root", str(tmp_path), *bad],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--architecture" in proc.stderr
