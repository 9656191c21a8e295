"""MAML++ against MAML on Omniglot 5-way 1-shot (or an image-folder benchmark), each for the same budget.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/maml_pp_omniglot.py --minutes 60             # the figure
    OMP_NUM_THREADS=1 python benchmarks/maml_pp_omniglot.py --minutes 1 --test-tasks 50   # a check

Both methods meta-train the same Conv-4 (64 filters, batch statistics; same seed, same tasks) with
the same inner loop length (``--inner-steps`` 5, step size 0.1), meta-batch 8, Adam 0.001, second order,
as in MAML++'s Omniglot runs (Antoniou et al., 2019), on the standard split (1200 source characters x 4
rotations, 423 target characters; Vinyals et al., 2016):

* ``maml`` — `maml` (fixed SGD), `Unrolled`, a constant outer learning rate;
* ``maml++`` — `maml_plus_plus` (per-layer per-step step sizes, per-step norm weights and biases),
  `MultiStepLoss` (annealed multi-step loss over ``--anneal-epochs`` epochs of ``--steps-per-epoch``
  outer steps, first order for ``--first-order-epochs`` epochs) and ``CosineAnnealingLR`` on the outer
  learning rate from 0.001 to 1e-5 over ``--cosine-steps`` outer steps (default ``--iterations``), held at
  1e-5 after them.

Each run stops at ``--iterations`` or after ``--minutes`` of meta-training, whichever comes first, then
meta-tests on ``--test-tasks`` fixed target tasks (the same for both) with its own inner loop (accuracy ±
95% CI). The paper's epochs are 500 outer steps; a CPU hour is a few thousand steps, so the default epoch
here is 100 steps (10 annealing epochs = the first 1000 steps). The last line printed is one JSON object.

``--root`` holds ``images_background.zip`` and ``images_evaluation.zip`` (default: the project's
``../shared/data/omniglot``, see its SOURCE.md); the decoded images are cached in ``--cache-dir``.

``--image-folder ROOT`` runs the same comparison on a few-shot benchmark stored as image folders,
``ROOT/train/<class>/*.jpg`` and ``ROOT/test/<class>/*.jpg`` (e.g. mini-ImageNet in the Ravi & Larochelle
split: 64 and 20 classes of 600 images), read at 84x84 RGB, with the Conv-4 at ``--hidden`` 32 filters
(or ``--backbone resnet12``); docs/methods.md gives the mini-ImageNet protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metalearn import (  # noqa: E402
    ClassAugmentation,
    Conv4,
    EpisodicTaskSet,
    ImageFolderDataset,
    MultiStepLoss,
    Omniglot,
    ResNet12,
    evaluate,
    maml,
    maml_plus_plus,
    meta_train,
    rotations,
)

REPO = Path(__file__).resolve().parent.parent


def build_tasks(args: argparse.Namespace) -> tuple[EpisodicTaskSet, EpisodicTaskSet]:
    episode = dict(ways=5, shots=args.shots, queries=args.queries)
    if args.image_folder is not None:
        train = ImageFolderDataset(args.image_folder / "train", image_size=84)
        test = ImageFolderDataset(args.image_folder / "test", image_size=84)
        return (EpisodicTaskSet(train, **episode, seed=0, length=None),
                EpisodicTaskSet(test, **episode, seed=2, length=args.test_tasks))
    data = Omniglot(args.root, cache_dir=args.cache_dir)
    split = data.few_shot_split()
    rotated = ClassAugmentation(data, rotations((0, 90, 180, 270)))
    source = EpisodicTaskSet(rotated, **episode, classes=rotated.classes_of(split.source), seed=0, length=None)
    target = EpisodicTaskSet(data, **episode, classes=split.target, seed=2, length=args.test_tasks)
    return source, target


def cosine_then_constant(
    outer: torch.optim.Optimizer, steps: int, eta_min: float = 1e-5
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine annealing of the outer learning rate to ``eta_min`` over ``steps`` outer steps, then ``eta_min``
    (torch's ``CosineAnnealingLR`` rises again after ``T_max``; a run longer than ``steps`` must not)."""
    base = outer.param_groups[0]["lr"]

    def factor(step: int) -> float:
        done = min(step, steps) / steps
        return (eta_min + (base - eta_min) * 0.5 * (1 + math.cos(math.pi * done))) / base

    return torch.optim.lr_scheduler.LambdaLR(outer, factor)


def run(method: str, args: argparse.Namespace, source: EpisodicTaskSet, target: EpisodicTaskSet) -> dict:
    torch.manual_seed(0)
    channels, size = (3, 84) if args.image_folder is not None else (1, 28)
    if args.backbone == "resnet12":
        model = ResNet12(5, in_channels=channels, image_size=size)
    else:
        model = Conv4(5, in_channels=channels, hidden=args.hidden, image_size=size)
    plus = method == "maml++"
    omega = maml_plus_plus(model, args.inner_lr, args.inner_steps) if plus else maml(model, args.inner_lr)
    omega = omega.to(args.device)
    outer = torch.optim.Adam(omega.parameters(), lr=1e-3)
    scheduler = cosine_then_constant(outer, args.cosine_steps or args.iterations) if plus else None
    mode = (
        MultiStepLoss(args.anneal_epochs, args.steps_per_epoch, args.first_order_epochs) if plus else "unrolled"
    )
    deadline = time.monotonic() + 60 * args.minutes

    def out_of_time(step, row, val_row) -> bool:
        return time.monotonic() > deadline

    began = time.perf_counter()
    result = meta_train(
        omega, source, outer, steps=args.iterations, inner_steps=args.inner_steps, meta_batch_size=args.meta_batch,
        mode=mode, scheduler=scheduler, callback=out_of_time, progress=False, batching=args.batching,
    )
    seconds = time.perf_counter() - began
    test = evaluate(omega, target, args.inner_steps, batching=args.batching)
    print(f"{method:>7}: {result.steps} outer steps in {seconds:.0f} s; target accuracy "
          f"{100 * test.mean:.2f} ± {100 * test.ci95:.2f}% ({len(target)} tasks)", flush=True)
    return {"outer_steps": result.steps, "seconds": seconds, "accuracy": test.mean, "ci95": test.ci95}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "omniglot")
    p.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "omniglot-cache")
    p.add_argument("--image-folder", type=Path, default=None, help="ROOT with train/ and test/ class folders")
    p.add_argument("--backbone", choices=["conv4", "resnet12"], default="conv4")
    p.add_argument("--hidden", type=int, default=None, help="Conv-4 filters (default 64; 32 with --image-folder)")
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batching", choices=["auto", "loop", "vmap"], default="auto",
                   help="auto: the per-task loop for these conv nets on CPU, vmap on CUDA")
    p.add_argument("--minutes", type=float, default=60.0, help="meta-training budget of each method")
    p.add_argument("--iterations", type=int, default=4000, help="most outer steps")
    p.add_argument("--cosine-steps", type=int, default=None, help="MAML++'s cosine length (default --iterations)")
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--steps-per-epoch", type=int, default=100)
    p.add_argument("--anneal-epochs", type=int, default=10)
    p.add_argument("--first-order-epochs", type=int, default=0)
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--methods", nargs="+", default=["maml", "maml++"], choices=["maml", "maml++"])
    args = p.parse_args()
    if args.hidden is None:
        args.hidden = 32 if args.image_folder is not None else 64
    if args.image_folder is not None:
        missing = [str(args.image_folder / s) for s in ("train", "test") if not (args.image_folder / s).is_dir()]
        if missing:
            p.error(f"--image-folder needs the class folders {missing}")
    elif not (args.root / "images_background.zip").exists() and not (args.root / "images_background").exists():
        p.error(f"--root {args.root} holds no images_background(.zip); see ../shared/data/omniglot/SOURCE.md")
    if args.minutes <= 0:
        p.error(f"--minutes must be positive, got {args.minutes}")
    torch.set_num_threads(1)
    source, target = build_tasks(args)
    figures = {m: run(m, args, source, target) for m in args.methods}
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(json.dumps({"benchmark": "maml_pp_omniglot", **settings, "torch": torch.__version__, "results": figures}))


if __name__ == "__main__":
    main()
