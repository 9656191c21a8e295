"""`metalearn.plot`: learning curves from a run's JSONL log (``python -m metalearn.plot RUN_DIR``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalearn import MLP, Sinusoid, maml, meta_train
from metalearn.plot import _moving_average, draw_curves, find_log, plot_run, read_log

pytest.importorskip("matplotlib")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    omega = maml(MLP((1, 8, 1)), lr=0.01)
    meta_train(omega, Sinusoid(3, 3, seed=0, length=None), torch.optim.Adam(omega.parameters(), 1e-3),
               steps=6, inner_steps=2, meta_batch_size=2, progress=False, log_path=folder / "log.jsonl",
               val_tasks=Sinusoid(3, 5, seed=1, length=3), val_every=3)
    return folder


def test_plot_run_writes_a_png_beside_the_log(run_dir):
    from PIL import Image

    path = plot_run(run_dir)
    assert path == run_dir / "curves.png"
    with Image.open(path) as img:
        assert img.size == (1400, 700)
        assert len(img.convert("L").getcolors(maxcolors=1 << 16)) > 10  # drawn, not blank


def test_the_panels_hold_the_logged_values(run_dir):
    train, val = read_log(run_dir / "log.jsonl")
    fig = draw_curves(train, val, window=2)
    ax_loss, ax_val, ax_inner, ax_grad, ax_time, _ = fig.axes
    raw, smooth = ax_loss.lines[:2]
    assert list(raw.get_xdata()) == [r["step"] for r in train]
    assert list(raw.get_ydata()) == pytest.approx([r["meta_loss"] for r in train])
    assert list(smooth.get_ydata()) == pytest.approx(_moving_average([r["meta_loss"] for r in train], 2))
    assert list(ax_grad.lines[0].get_ydata()) == pytest.approx([r["grad_norm"] for r in train])
    assert list(ax_time.lines[0].get_ydata()) == pytest.approx([r["time"] for r in train])
    assert len(ax_inner.lines) == 2  # first and last inner loss
    val_line = [ln for ln in ax_val.lines if list(ln.get_xdata()) == [r["step"] for r in val]]
    assert val_line and list(val_line[0].get_ydata()) == pytest.approx([r["mean"] for r in val])
    assert "mse" in ax_val.get_title()


def test_moving_average_is_a_trailing_mean():
    assert _moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert _moving_average([2.0, 4.0], 5) == [2.0, 3.0]


def test_find_log_accepts_a_folder_or_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "log.jsonl").write_text("")
    assert find_log(tmp_path / "a") == tmp_path / "a" / "log.jsonl"
    assert find_log(tmp_path / "a" / "log.jsonl") == tmp_path / "a" / "log.jsonl"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "other.jsonl").write_text("")
    assert find_log(tmp_path / "b") == tmp_path / "b" / "other.jsonl"
    (tmp_path / "b" / "second.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="pass the log file itself"):
        find_log(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_log(tmp_path / "missing")


def test_read_log_skips_cut_lines_and_keeps_nan_as_gaps(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"kind": "train", "step": 1, "meta_loss": None}, {"kind": "train", "step": 0, "meta_loss": 2.0},
            {"kind": "val", "step": 1, "metric": "accuracy", "mean": 0.5, "ci95": 0.1}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')
    train, val = read_log(log)
    assert [r["step"] for r in train] == [0, 1] and len(val) == 1
    fig = draw_curves(train, val, window=1)
    assert list(fig.axes[0].lines[0].get_xdata()) == [0]  # the NaN step is a gap
    (tmp_path / "other.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match="no rows of a meta_train log"):
        read_log(tmp_path / "other.jsonl")


def test_bad_smooth_is_refused(run_dir):
    with pytest.raises(ValueError, match="smooth"):
        plot_run(run_dir, smooth=0)


def test_command_line(run_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    out = tmp_path / "c.png"
    proc = subprocess.run([sys.executable, "-m", "metalearn.plot", str(run_dir), "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0 and f"wrote {out}" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "metalearn.plot", str(tmp_path / "nothing")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
