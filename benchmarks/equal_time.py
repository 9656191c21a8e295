"""Accuracy at equal time: Omniglot 5-way 1-shot MAML meta-trained for the same wall-clock budget per precision.

Usage::

    python benchmarks/equal_time.py --root ../shared/data/omniglot --budget-minutes 60
    python benchmarks/equal_time.py --root ../shared/data/omniglot --budget-minutes 1 --test-tasks 100  # check

Protocol (that of ``examples/omniglot.py``, whose `build_tasks` it uses): the standard few-shot
split (1200 source characters, 100 of them held out, rotated by 0/90/180/270 as new classes;
the 423 target characters for meta-test), `maml` on the Conv-4 (inner SGD 0.4, 1 inner step,
second order), meta-batch 32, outer Adam 1e-3, seed 0. For each precision in ``--precisions``
(default ``float32,bf16``), in turn and in this one process: a fresh ω from the same seed,
meta-trained by `meta_train` with ``precision=`` until ``--budget-minutes`` of wall-clock time
have passed (checked after each step, no validation during training, no checkpoints), then
meta-tested in float32 (3 inner steps) on ``--test-tasks`` fixed target tasks. Printed per
precision: iterations reached, accuracy ± 95% CI; the last line is one JSON object.

Both runs share the machine's load at their own time: run it on a quiet machine, one thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metalearn import Conv4, evaluate, maml, meta_train  # noqa: E402
from metalearn.precision import PRECISIONS  # noqa: E402


def omniglot_example():
    """``examples/omniglot.py`` as a module (its `build_tasks` is the protocol's data)."""
    spec = importlib.util.spec_from_file_location("omniglot_example", ROOT / "examples" / "omniglot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, required=True, help="folder with images_background.zip, images_evaluation.zip")
    p.add_argument("--cache-dir", type=Path, default=None, help="decoded-image cache (default: in --root)")
    p.add_argument("--budget-minutes", type=float, required=True, help="wall-clock meta-training time per precision")
    p.add_argument("--precisions", default="float32,bf16", help="comma-separated, from " + ", ".join(PRECISIONS))
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    args.precisions = args.precisions.split(",")
    unknown = [x for x in args.precisions if x not in PRECISIONS]
    if unknown:
        p.error(f"--precisions: unknown {unknown}; choose from {', '.join(PRECISIONS)}")
    if args.budget_minutes <= 0:
        p.error("--budget-minutes must be positive")
    # the fields examples/omniglot.py's build_tasks reads: its standard protocol
    args.ways, args.shots, args.queries, args.n_source, args.n_val, args.val_tasks = 5, 1, 15, 1200, 100, 1
    return args


def run_one(args: argparse.Namespace, precision: str, source, target) -> dict:
    """One precision: meta-train for the budget, then meta-test; returns its figures."""
    torch.manual_seed(args.seed)
    omega = maml(Conv4(num_classes=args.ways), lr=0.4)
    outer = torch.optim.Adam(omega.parameters(), lr=1e-3)
    began = time.monotonic()
    deadline = began + 60 * args.budget_minutes

    def out_of_time(step, train_row, val_row) -> bool:
        return time.monotonic() > deadline

    result = meta_train(
        omega, source, outer, steps=10**9, inner_steps=1, meta_batch_size=args.meta_batch, seed=args.seed,
        precision=precision, progress=False, callback=out_of_time,
    )
    minutes = (time.monotonic() - began) / 60
    test = evaluate(omega, target, inner_steps=3)
    row = {
        "precision": precision,
        "iterations": result.steps,
        "train_minutes": minutes,
        "seconds_per_iteration": 60 * minutes / max(result.steps, 1),
        "final_meta_loss": result.history[-1]["meta_loss"] if result.history else None,
        "test_accuracy": test.mean,
        "ci95": test.ci95,
        "test_tasks": test.n,
    }
    print(f"{precision:>8}: {result.steps} iterations in {minutes:.1f} min "
          f"({row['seconds_per_iteration']:.2f} s each); "
          f"meta-test accuracy {100 * test.mean:.2f}% ± {100 * test.ci95:.2f}% over {test.n} target tasks", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    example = omniglot_example()
    source, _, target = example.build_tasks(args)  # target: --test-tasks fixed tasks of the 423 target characters
    print(f"budget {args.budget_minutes:g} min per precision, meta-batch {args.meta_batch}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    rows = [run_one(args, precision, source, target) for precision in args.precisions]
    report = {"benchmark": "equal_time", "budget_minutes": args.budget_minutes, "meta_batch": args.meta_batch,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "runs": rows}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
