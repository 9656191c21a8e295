"""MAML and Meta-SGD on sinusoid regression, with the protocol of the MAML paper.

Finn, Abbeel & Levine (2017), "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", section 5.1; Li, Zhou, Chen & Li (2017), "Meta-SGD: Learning to Learn Quickly for
Few-Shot Learning", Table 1.

* tasks: y = A sin(x - φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[-5, 5]; K train and K val points
  per meta-training task (the MAML protocol);
* model: a 1-40-40-1 ReLU MLP; inner loop: 1 step, step size 0.01 (learned per parameter for
  Meta-SGD, initialised at 0.01); outer loop: Adam, lr 0.001, meta-batch 25;
* meta-test: 600 fixed target tasks (a task set with another seed), 1 inner step on K points,
  MSE on 100 val points per task, mean ± 95% confidence interval.

Run::

    python examples/sinusoid.py                       # both methods, K = 5, 10, 20: ~2 min per run on one core
    python examples/sinusoid.py --iterations 70000    # the paper's budget, as in docs/results.md (~8 min per run)
    python examples/sinusoid.py --smoke               # seconds: the CI setting

It prints a table, writes ``results.json`` and ``fits.png`` (fits before and after
adaptation on a few target tasks) to ``--out``, and each run's JSONL log to
``--out/METHOD-KK/log.jsonl`` (draw its learning curves with ``python -m metalearn.plot
--out/METHOD-KK``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from metalearn import MLP, InnerSGD, MetaKnowledge, MetaSGD, Sinusoid, evaluate, fine_tune, maml, meta_sgd, meta_train
from metalearn.knowledge import GaussianInit, InnerAdam, MomentumSGD, OptimizerMixture


def gaussian_init(model: torch.nn.Module, lr: float) -> MetaKnowledge:
    """MAML with a learned Gaussian init: θ0 ~ N(μ, σ²) per parameter, μ and σ meta-learned."""
    return MetaKnowledge(model, optimizer=InnerSGD(lr), init=GaussianInit(init_scale=0.01))


def learned_adam(model: torch.nn.Module, lr: float) -> MetaKnowledge:
    """An inner Adam whose step size, betas and eps are meta-learned."""
    return MetaKnowledge(model, optimizer=InnerAdam(lr))


def optimizer_mixture(model: torch.nn.Module, lr: float) -> MetaKnowledge:
    """A learned choice among inner update rules (softmax weights over SGD, Meta-SGD, momentum, Adam)."""
    rules = {"sgd": InnerSGD(lr), "meta_sgd": MetaSGD(lr), "momentum": MomentumSGD(lr, 0.5), "adam": InnerAdam(lr)}
    return MetaKnowledge(model, optimizer=OptimizerMixture(rules))


METHODS = {
    "maml": maml,
    "meta-sgd": meta_sgd,
    "gaussian-init": gaussian_init,
    "learned-adam": learned_adam,
    "mixture": optimizer_mixture,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["maml", "meta-sgd"], choices=list(METHODS))
    p.add_argument("--shots", nargs="+", type=int, default=[5, 10, 20], help="K: train points per task")
    p.add_argument(
        "--iterations", type=int, default=15_000, help="outer steps per run (docs/results.md and the MAML paper: 70000)"
    )
    p.add_argument("--meta-batch", type=int, default=25)
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--meta-lr", type=float, default=0.001)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument("--eval-queries", type=int, default=100, help="val points per target task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/sinusoid"))
    p.add_argument("--smoke", action="store_true", help="tiny settings (CI): 20 iterations, 20 target tasks")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where ω and the tasks live (default: cuda when present, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own, e.g. from OMP_NUM_THREADS)")
    args = p.parse_args(argv)
    if args.smoke:
        args.iterations, args.eval_tasks, args.shots = 20, 20, [5]
    return args


def train_one(method: str, shots: int, args: argparse.Namespace) -> tuple[MetaKnowledge, dict]:
    torch.manual_seed(args.seed)  # the model's initial weights
    omega = METHODS[method](MLP((1, 40, 40, 1)), lr=args.inner_lr).to(args.device)
    source = Sinusoid(shots, shots, seed=args.seed, length=None)  # endless meta-training stream
    target = Sinusoid(shots, args.eval_queries, seed=10_000 + args.seed, length=args.eval_tasks)
    label = f"{method} K={shots}"
    log = args.out / f"{method}-K{shots}" / "log.jsonl"
    log.unlink(missing_ok=True)  # each run of the example starts afresh (no checkpoints to resume from)
    start = time.perf_counter()
    meta_train(
        omega,
        source,
        torch.optim.Adam(omega.parameters(), lr=args.meta_lr),
        steps=args.iterations,
        inner_steps=args.inner_steps,
        meta_batch_size=args.meta_batch,
        seed=args.seed,
        log_path=log,
        progress=False if args.no_progress else f"meta-train {label}",
    )
    seconds = time.perf_counter() - start
    if isinstance(omega.init, GaussianInit):
        omega.init.mode = "mean"  # meta-test from the learned mean (sampling would need S adaptations per task)
    result = evaluate(omega, target, inner_steps=args.inner_steps,
                      progress=False if args.no_progress else f"meta-test {label}")
    row = {
        "method": method,
        "shots": shots,
        "mse": result.mean,
        "ci95": result.ci95,
        "tasks": result.n,
        "iterations": args.iterations,
        "train_seconds": round(seconds, 1),
        "log": str(log),
    }
    if isinstance(omega.optimizer, OptimizerMixture):
        choice = omega.optimizer.chosen()
        row["chosen_rule"] = choice.name
        row["rule_weights"] = {k: round(v, 3) for k, v in choice.weights.items()}
    return omega, row


def plot_fits(models: dict[str, MetaKnowledge], shots: int, args: argparse.Namespace, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'torch-metalearn[examples]'): no plot")
        return False
    family = Sinusoid(shots, args.eval_queries, seed=10_000 + args.seed, length=args.eval_tasks)
    xs = torch.linspace(-5, 5, 200).unsqueeze(1).to(args.device)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
    for col, ax in enumerate(axes):
        task = family[col]
        ax.plot(xs.cpu(), family.function(family.function_of(col), xs.cpu()), "k", lw=2, label="true")
        ax.scatter(task.train[0], task.train[1], c="k", marker="^", zorder=5, label=f"{shots} train points")
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for (name, omega), color in zip(models.items(), colors, strict=False):
            with torch.no_grad():
                before = omega(omega.model_params(), xs).cpu()
            after = fine_tune(omega, task.train, inner_steps=args.inner_steps)(xs).cpu()  # θ* bound, no graph
            ax.plot(xs.cpu(), before, "--", color=color, alpha=0.6, label=f"{name}, before")
            ax.plot(xs.cpu(), after, color=color, label=f"{name}, after {args.inner_steps} step")
        ax.set_title(f"target task {col}")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, plotted = [], None
    for shots in args.shots:
        models = {}
        for method in args.methods:
            omega, row = train_one(method, shots, args)
            models[method] = omega
            rows.append(row)
            chosen = f", chose {row['chosen_rule']} {row['rule_weights']}" if "chosen_rule" in row else ""
            print(f"{method:13s} K={shots:<3d} MSE {row['mse']:.3f} ± {row['ci95']:.3f} "
                  f"({row['tasks']} tasks, {row['iterations']} iterations, {row['train_seconds']} s){chosen}",
                  flush=True)
        if plotted is None and plot_fits(models, shots, args, args.out / "fits.png"):
            plotted = args.out / "fits.png"
    print(f"\nmethod         K    MSE after {args.inner_steps} step(s) ({args.eval_tasks} target tasks, ± 95% CI)")
    for row in rows:
        print(f"{row['method']:13s} {row['shots']:3d}   {row['mse']:.3f} ± {row['ci95']:.3f}")
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {args.out / 'results.json'}" + (f" and {plotted}" if plotted else ""))
    return rows


if __name__ == "__main__":
    main()
