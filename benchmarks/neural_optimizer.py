"""The learned neural inner optimizer against Meta-SGD and learned Adam, on sinusoid regression and on
Omniglot 5-way 1-shot (short runs, the same number of outer steps for every contender).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/neural_optimizer.py [--steps 500] [--inner-steps 5]
    OMP_NUM_THREADS=1 python benchmarks/neural_optimizer.py --workload omniglot --root ../shared/data/omniglot

Sinusoid: each contender meta-trains a fresh 1-40-40-1 MLP (same seed, same tasks: meta-batch 25, K = 10
train and 10 val points, Adam 0.001 on every meta-parameter, second order) with its inner optimizer.
Omniglot: a fresh Conv-4 (``--hidden`` filters, batch statistics) on the standard split of
``examples/omniglot.py`` (1100 source characters x 4 rotations; the 423 target characters for meta-test),
5-way 1-shot 15-query, meta-batch ``--meta-batch``, Adam 0.001, second order. The contenders:

* ``maml`` — fixed SGD (the reference);
* ``meta-sgd`` — learned per-entry step sizes (Li et al., 2017);
* ``learned-adam`` — `InnerAdam` with learned lr, β1, β2 and ε (shared);
* ``neural`` — `NeuralOptimizer`: one small MLP (hidden 16) shared by every entry, mapping gradient,
  momentum, second-moment and step features to the update (Andrychowicz et al., 2016; Metz et al., 2022).

All start from the same step size ``--inner-lr`` (default 0.01 on sinusoid, 0.1 on Omniglot). Reported:
the target score after adaptation (sinusoid: MSE on 200 fixed target tasks of 100 val points; Omniglot:
accuracy on ``--test-tasks`` fixed target episodes) before and after meta-training, ± 95% CI, the seconds
of meta-training and the number of meta-parameters the optimizer adds. The last line printed is one JSON
object.
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
    Conv4,
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
REPO = Path(__file__).resolve().parent.parent
#: per-workload defaults (sinusoid, Omniglot) of the settings left unset
DEFAULTS = {"steps": (500, 300), "inner_steps": (5, 3), "inner_lr": (0.01, 0.1), "meta_batch": (25, 8)}


def inner_optimizer(name: str, lr: float):
    if name == "maml":
        return InnerSGD(lr)
    if name == "meta-sgd":
        return MetaSGD(lr)
    if name == "learned-adam":
        return InnerAdam(lr, learn=("lr", "betas", "eps"))
    return NeuralOptimizer(lr, hidden=(16,))


def omniglot_tasks(args: argparse.Namespace):
    """The source and target episodes of `examples/omniglot.py`'s standard protocol (5-way 1-shot 15-query)."""
    from equal_time import omniglot_example  # the loader of examples/omniglot.py, in this folder

    args.ways, args.shots, args.queries, args.n_source, args.n_val, args.val_tasks = 5, 1, 15, 1200, 100, 1
    args.seed = 0
    source, _, target = omniglot_example().build_tasks(args)
    return source, target


def run(name: str, args: argparse.Namespace, tasks, target) -> dict:
    torch.manual_seed(0)
    sinusoid = args.workload == "sinusoid"
    model = MLP((1, 40, 40, 1)) if sinusoid else Conv4(5, hidden=args.hidden)
    omega = MetaKnowledge(model, optimizer=inner_optimizer(name, args.inner_lr))
    added = sum(p.numel() for p in omega.optimizer.parameters())
    before = evaluate(omega, target, args.inner_steps)
    began = time.perf_counter()
    meta_train(omega, tasks, torch.optim.Adam(omega.parameters(), 1e-3), steps=args.steps,
               inner_steps=args.inner_steps, meta_batch_size=args.meta_batch, progress=False)
    seconds = time.perf_counter() - began
    after = evaluate(omega, target, args.inner_steps)
    what, scale = ("MSE", 1.0) if sinusoid else ("accuracy %", 100.0)
    print(f"{name:>13}: target {what} {scale * before.mean:.3f} -> {scale * after.mean:.3f} ± "
          f"{scale * after.ci95:.3f} after {args.steps} outer steps ({seconds:.0f} s, {added} optimizer "
          "meta-parameters)", flush=True)
    key = "mse" if sinusoid else "accuracy"
    return {f"{key}_before": before.mean, f"{key}_after": after.mean, "ci95": after.ci95, "seconds": seconds,
            "optimizer_meta_parameters": added}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=["sinusoid", "omniglot"], default="sinusoid")
    p.add_argument("--steps", type=int, default=None, help="outer steps (default 500 sinusoid, 300 Omniglot)")
    p.add_argument("--inner-steps", type=int, default=None, help="default 5 sinusoid, 3 Omniglot")
    p.add_argument("--inner-lr", type=float, default=None, help="default 0.01 sinusoid, 0.1 Omniglot")
    p.add_argument("--meta-batch", type=int, default=None, help="default 25 sinusoid, 8 Omniglot")
    p.add_argument("--hidden", type=int, default=32, help="Conv-4 filters (Omniglot)")
    p.add_argument("--test-tasks", type=int, default=300, help="Omniglot target episodes")
    p.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "omniglot",
                   help="folder with images_background.zip, images_evaluation.zip (Omniglot)")
    p.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "omniglot-cache")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    args = p.parse_args()
    sinusoid = args.workload == "sinusoid"
    for name, (for_sinusoid, for_omniglot) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, for_sinusoid if sinusoid else for_omniglot)
    torch.set_num_threads(1)
    if sinusoid:
        tasks, target = Sinusoid(10, 10, seed=0, length=None), Sinusoid(10, 100, seed=1, length=200)
    else:
        tasks, target = omniglot_tasks(args)
    figures = {name: run(name, args, tasks, target) for name in args.contenders}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(json.dumps({"benchmark": "neural_optimizer", **settings, "torch": torch.__version__, "results": figures}))


if __name__ == "__main__":
    main()
