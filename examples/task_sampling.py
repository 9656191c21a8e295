"""Task sampling tutorial: class-disjoint pools, seeded task sets, (train, val) pairs.

Builds task sets the way meta-learning uses them — D_source for meta-training, D_target for
meta-testing — from a built-in regression family and from a small labelled dataset, and
prints (and, with matplotlib, plots) a few tasks::

    python examples/task_sampling.py            # prints, writes outputs/task_sampling/tasks.png
    python examples/task_sampling.py --smoke    # the CI setting (no plot)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from metalearn import EpisodicTaskSet, Sinusoid, TensorLabelledDataset, split_classes, stack_tasks
from metalearn.tasks import Harmonics, Linear


def regression_tour() -> None:
    print("== Regression task families ==")
    for family in (Sinusoid(shots=5, queries=10, seed=0), Linear(5, 10, seed=0), Harmonics(5, 10, seed=0)):
        task = family[0]
        params = {k: [round(v, 3) for v in t.reshape(-1).tolist()] for k, t in family.function_of(0).items()}
        print(f"{type(family).__name__:10s} task 0: train x {tuple(task.train[0].shape)}, val x "
              f"{tuple(task.val[0].shape)}, function {params}")
    sines = Sinusoid(shots=5, queries=10, seed=0)
    assert torch.equal(sines[3].train[0], Sinusoid(5, 10, seed=0)[3].train[0])  # task i is fixed by (seed, i)
    print("task 3 is identical when the task set is rebuilt with the same seed")


def episodic_tour() -> None:
    print("\n== N-way K-shot episodes from a labelled dataset ==")
    # A toy dataset: 40 classes, 20 examples each, 8x8 'images' whose pixels encode their class.
    labels = torch.arange(40).repeat_interleave(20)
    inputs = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 8, 8) + 0.01 * torch.randn(800, 1, 8, 8)
    dataset = TensorLabelledDataset(inputs, labels)

    split = split_classes(dataset, (0.6, 0.2, 0.2), generator=torch.Generator().manual_seed(0))
    print(f"class pools: {len(split.source)} source, {len(split.validation)} validation, "
          f"{len(split.target)} target (disjoint)")
    source = EpisodicTaskSet(dataset, ways=5, shots=1, queries=15, classes=split.source, seed=0, length=None)
    target = EpisodicTaskSet(dataset, ways=5, shots=1, queries=15, classes=split.target, seed=1, length=600)
    task = target[0]
    print(f"target task 0: train x {tuple(task.train[0].shape)} y {task.train[1].tolist()}, "
          f"val x {tuple(task.val[0].shape)}")
    print(f"dataset classes behind labels 0..4: {task.train[0][:, 0, 0, 0].round().long().tolist()}")

    batch = source.batch(range(4))
    print(f"a meta-batch of 4 source tasks: train x {tuple(batch.train[0].shape)} (leading task dimension)")
    loader = DataLoader(target, batch_size=8, collate_fn=stack_tasks)
    first = next(iter(loader))
    print(f"through a DataLoader: {len(first)} tasks per batch, same tasks as indexing: "
          f"{torch.equal(first.train[0][0], target[0].train[0])}")
    variable = EpisodicTaskSet(dataset, ways=(3, 5), shots=(1, 3), queries=5, classes=split.source, seed=0)
    print("variable-way/shot episodes:", [tuple(variable[i].train[0].shape[:1]) for i in range(5)])


def plot(path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'torch-metalearn[examples]'): no plot")
        return
    family = Sinusoid(shots=10, queries=50, seed=0)
    xs = torch.linspace(-5, 5, 200).unsqueeze(1)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3), sharey=True)
    for i, ax in enumerate(axes):
        task = family[i]
        ax.plot(xs, family.function(family.function_of(i), xs), "k", lw=1)
        ax.scatter(task.val[0], task.val[1], s=8, c="tab:gray", label="val")
        ax.scatter(task.train[0], task.train[1], c="tab:red", marker="^", label="train")
        ax.set_title(f"sinusoid task {i}")
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/task_sampling"))
    parser.add_argument("--smoke", action="store_true", help="no plot (CI)")
    args = parser.parse_args(argv)
    regression_tour()
    episodic_tour()
    if not args.smoke:
        plot(args.out / "tasks.png")


if __name__ == "__main__":
    main()
