"""Learning curves of a run, drawn from its JSONL log: ``python -m metalearn.plot RUN_DIR``.

Reads the log `meta_train` writes (``log_path=``; the examples put it at ``RUN_DIR/log.jsonl``)
and draws one PNG with a panel per quantity:

* meta-loss: the val-half loss after adaptation, per outer step (raw and a moving average);
* validation: the metric on the held-out tasks (mean ± 95% CI) and the meta-batch's own;
* inner loss: first and last inner step (how much adaptation gains);
* meta-gradient norm (before clipping), log scale;
* seconds per outer step (validation steps included in their own row, not here).

Needs matplotlib (``pip install matplotlib``, or the ``examples`` extra).

Examples::

    python -m metalearn.plot runs/omniglot-maml              # writes runs/omniglot-maml/curves.png
    python -m metalearn.plot runs/a/log.jsonl --out a.png --smooth 50
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["draw_curves", "find_log", "main", "plot_run", "read_log"]


def find_log(run: str | os.PathLike) -> Path:
    """The JSONL log of ``run``: the file itself, ``run/log.jsonl``, or the one ``*.jsonl`` in ``run``.

    Raises:
        FileNotFoundError: nothing of that name, or a folder without exactly one log (names the fix).
    """
    path = Path(run)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder (holding log.jsonl) or a .jsonl log")
    if (path / "log.jsonl").is_file():
        return path / "log.jsonl"
    logs = sorted(path.glob("*.jsonl"))
    if len(logs) == 1:
        return logs[0]
    found = ", ".join(p.name for p in logs) or "none"
    raise FileNotFoundError(
        f"{path} holds no log.jsonl and {len(logs)} other .jsonl files ({found}): pass the log file itself"
    )


def read_log(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The (train rows, val rows) of a JSONL log, in step order; lines cut short by a crash are skipped.

    Raises:
        ValueError: the file holds no rows of a metalearn log (names the file).
    """
    train: list[dict[str, Any]] = []
    val: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                continue
            (val if row.get("kind") == "val" else train).append(row)
    if not train and not val:
        raise ValueError(f"{path} holds no rows of a meta_train log (lines with a 'step'): is it the right file?")
    return sorted(train, key=lambda r: r["step"]), sorted(val, key=lambda r: r["step"])


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have a finite number under ``key`` (NaN is logged as null)."""
    steps, values = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _import_pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "metalearn.plot needs matplotlib: pip install matplotlib (or the project's 'examples' extra)"
        ) from err
    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    return plt


def draw_curves(
    train: Sequence[dict[str, Any]], val: Sequence[dict[str, Any]], window: int, *, source: str = ""
) -> Any:
    """The figure of `plot_run` (a matplotlib Figure) from a log's train and val rows.

    Args:
        train: the ``kind == "train"`` rows, in step order (`read_log`).
        val: the ``kind == "val"`` rows.
        window: the moving-average window of the noisy per-step curves.
        source: where the rows came from, printed in the figure's text panel.
    """
    plt = _import_pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    ax_loss, ax_val, ax_inner, ax_grad, ax_time, ax_free = axes.ravel()

    steps, loss = _series(train, "meta_loss")
    ax_loss.plot(steps, loss, lw=0.5, alpha=0.35, color="C0", label="per step")
    if loss:
        ax_loss.plot(steps, _moving_average(loss, window), lw=1.5, color="C0", label=f"mean of {window}")
        ax_loss.legend(fontsize=8)
    ax_loss.set_title("meta-loss (val half, after adaptation)")

    metric = str(val[0].get("metric", "metric")) if val else "metric"
    s, m = _series(train, "val_metric")
    if m:
        ax_val.plot(s, _moving_average(m, window), lw=0.8, alpha=0.6, color="C1", label="meta-batch")
    vs, vm = _series(val, "mean")
    if vm:
        ci = [r.get("ci95") or 0.0 for r in val if r.get("mean") is not None]
        ax_val.errorbar(vs, vm, yerr=ci, marker="o", ms=3, capsize=2, color="C3", label="validation tasks ± 95% CI")
    if m or vm:
        ax_val.legend(fontsize=8)
    ax_val.set_title(f"validation {metric}" if val else "meta-batch metric")

    for key, color, label in (("inner_loss_first", "C2", "first inner step"), ("inner_loss_last", "C4", "last")):
        s, v = _series(train, key)
        if v:
            ax_inner.plot(s, _moving_average(v, window), lw=1, color=color, label=label,
                          ls="-" if key == "inner_loss_first" else "--")
    if ax_inner.lines:
        ax_inner.legend(fontsize=8)
    ax_inner.set_title("inner loss (train half)")

    s, g = _series(train, "grad_norm")
    ax_grad.plot(s, g, lw=0.5, color="C5")
    if g and min(g) > 0:
        ax_grad.set_yscale("log")
    ax_grad.set_title("meta-gradient norm (before clipping)")

    s, t = _series(train, "time")
    ax_time.plot(s, t, lw=0.5, color="C7")
    ax_time.set_title("seconds per outer step")

    ax_free.axis("off")
    last = train[-1]["step"] + 1 if train else 0
    lines = [f"log: {source}", f"outer steps: {last}"]
    if vm:
        lines.append(f"last validation: {vm[-1]:.4g} ± {val[-1].get('ci95') or 0:.2g} ({metric}, step {vs[-1]})")
    if t:
        lines.append(f"median seconds per step: {sorted(t)[len(t) // 2]:.3g}")
    ax_free.text(0.0, 0.9, "\n".join(lines), va="top", fontsize=9, family="monospace", wrap=True)

    for ax in (ax_loss, ax_val, ax_inner, ax_grad, ax_time):
        ax.set_xlabel("outer step")
        ax.grid(alpha=0.3)
    return fig


def plot_run(
    run: str | os.PathLike, out: str | os.PathLike | None = None, *, smooth: int | None = None, title: str | None = None
) -> Path:
    """Draws the learning curves of a run's JSONL log into a PNG.

    Args:
        run: the run folder (holding ``log.jsonl``) or the log file.
        out: the PNG to write (default: ``curves.png`` beside the log).
        smooth: the moving-average window of the meta-loss (default: about 2% of the steps).
        title: the figure's title (default: the run folder's name).

    Returns:
        The PNG's path.

    Raises:
        FileNotFoundError, ValueError: no log, or a file that is not a metalearn log.
        ImportError: matplotlib is not installed.
    """
    if smooth is not None and (isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1):
        raise ValueError(f"smooth must be a window of at least 1 step (an int), got {smooth!r}")
    log = find_log(run)
    train, val = read_log(log)
    plt = _import_pyplot()
    out_path = Path(out) if out is not None else log.with_name("curves.png")
    window = smooth if smooth is not None else max(1, len(train) // 50)

    fig = draw_curves(train, val, window, source=str(log))
    fig.suptitle(title if title is not None else log.parent.name)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def main(argv: Sequence[str] | None = None) -> Path:
    """The command line: ``python -m metalearn.plot RUN_DIR [--out PNG] [--smooth N] [--title T]``."""
    parser = argparse.ArgumentParser(prog="python -m metalearn.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder holding log.jsonl, or a JSONL log")
    parser.add_argument("--out", default=None, help="the PNG (default: curves.png beside the log)")
    parser.add_argument("--smooth", type=int, default=None, help="moving-average window in steps")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run, args.out, smooth=args.smooth, title=args.title)
    except (FileNotFoundError, ValueError, ImportError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
