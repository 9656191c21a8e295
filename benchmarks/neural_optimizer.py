"""The learned neural inner optimizer against Meta-SGD and learned Adam on sinusoid regression (short runs).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/neural_optimizer.py [--steps 500] [--inner-steps 5]

Each contender meta-trains a fresh 1-40-40-1 MLP (same seed, same tasks: meta-batch 25, K = 10 train and
10 val points, Adam 0.001 on every meta-parameter, second order) with its inner optimizer:

* ``maml`` — fixed SGD (the reference);
* ``meta-sgd`` — learned per-entry step sizes (Li et al., 2017);
* ``learned-adam`` — `InnerAdam` with learned lr, β1, β2 and ε (shared);
* ``neural`` — `NeuralOptimizer`: one small MLP (hidden 16) shared by every entry, mapping gradient,
  momentum, second-moment and step features to the update (Andrychowicz et al., 2016; Metz et al., 2022).

All start from the same step size ``--inner-lr``. Reported: the target MSE after adaptation on 200
fixed target tasks (100 val points each) before and after meta-training, the seconds of meta-training
and the number of meta-parameters the optimizer adds. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metalearn import (  # noqa: E402
    MLP,
    InnerAdam,
    InnerSGD,
    MetaKnowledge,
    MetaSGD,
    NeuralOptimizer,
    Sinusoid,
    evaluate,
    meta_train,
)

CONTENDERS = ("maml", "meta-sgd", "learned-adam", "neural")


def inner_optimizer(name: str, lr: float):
    if name == "maml":
        return InnerSGD(lr)
    if name == "meta-sgd":
        return MetaSGD(lr)
    if name == "learned-adam":
        return InnerAdam(lr, learn=("lr", "betas", "eps"))
    return NeuralOptimizer(lr, hidden=(16,))


def run(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    omega = MetaKnowledge(MLP((1, 40, 40, 1)), optimizer=inner_optimizer(name, args.inner_lr))
    added = sum(p.numel() for p in omega.optimizer.parameters())
    tasks = Sinusoid(10, 10, seed=0, length=None)
    target = Sinusoid(10, 100, seed=1, length=200)
    before = evaluate(omega, target, args.inner_steps)
    began = time.perf_counter()
    meta_train(omega, tasks, torch.optim.Adam(omega.parameters(), 1e-3), steps=args.steps,
               inner_steps=args.inner_steps, meta_batch_size=25, progress=False)
    seconds = time.perf_counter() - began
    after = evaluate(omega, target, args.inner_steps)
    print(f"{name:>13}: target MSE {before.mean:.3f} -> {after.mean:.3f} ± {after.ci95:.3f} after {args.steps} "
          f"outer steps ({seconds:.0f} s, {added} optimizer meta-parameters)", flush=True)
    return {"mse_before": before.mean, "mse_after": after.mean, "ci95": after.ci95, "seconds": seconds,
            "optimizer_meta_parameters": added}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    args = p.parse_args()
    torch.set_num_threads(1)
    figures = {name: run(name, args) for name in args.contenders}
    print(json.dumps({"benchmark": "neural_optimizer", **vars(args), "torch": torch.__version__, "results": figures}))


if __name__ == "__main__":
    main()
