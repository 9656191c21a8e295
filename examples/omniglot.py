"""MAML (or ANIL, ProtoNets, Proto-MAML, iMAML, a DARTS search), 5-way 1-shot Omniglot, from the original archives.

Finn, Abbeel & Levine (2017), "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", section 5.2, with the standard few-shot split of Vinyals et al. (2016): 1200
source characters (augmented with rotations by 0/90/180/270 degrees as new classes, as in
Santoro et al., 2016) and 423 target characters. 100 of the 1200 are held out to validate on.

* ω: `maml` on the Conv-4 (64 filters, batch statistics), inner SGD step size 0.4 (``--method``
  picks another: ``fomaml``, ``anil``, ``protonet`` (0 inner steps), ``proto-maml``, ``imaml``,
  ``darts``);
* meta-training: 1 inner step, meta-batch 32, Adam lr 0.001, second order;
* meta-test: 3 inner steps on each of 600 fixed target tasks, accuracy ± 95% CI.

``imaml`` (Rajeswaran et al., 2019) takes the settings of the paper's Omniglot runs unless given (16
inner steps of size 0.1 on the proximal objective, 5 conjugate-gradient steps, the damping of its
reference code: ``(1 + 1)v + Hv/(λ + 10)``, i.e. ``Implicit(damping=λ + 20)``), except λ = 0.5 instead
of 2: on this Conv-4, λ = 2 holds φ so close to θ0 that iMAML barely learns (validation 58% vs 84% with
λ = 0.5 after 40 short outer steps, docs/results.md). It is validated and meta-tested on the same
proximal inner problem (16 steps).

``darts`` searches the architecture (Liu et al., 2019, inside MAML's bilevel problem as in
T-NAS, Lian et al., 2020): a `SearchableConvNet` with 4 cells (32 filters by default), each a
softmax mixture of conv 3x3, conv 5x5, max-pool 3x3, skip and zero whose logits α are
meta-parameters next to the weights' init (α with their own Adam step size, ``--arch-lr``,
0.01: DARTS's 3e-4 is meant for far longer searches). After meta-training it reports the chosen op of
every cell, meta-tests the mixture, and meta-tests the derived network (argmax ops but never zero, trained
weights) whose op names go to ``results.json``. DARTS's second stage, training the found network from
scratch, is ``--architecture OP,OP,OP,OP`` (those names) with any other method: a `CellConvNet` of those
ops in place of the Conv-4.

The run is limited by ``--iterations`` and by a wall-clock ``--budget-minutes``; it writes
checkpoints (and resumes from them when run again with the same ``--run-dir``), a JSONL log,
``curves.png`` (the learning curves, drawn by ``python -m metalearn.plot RUN_DIR``) and ``results.json``::

    python examples/omniglot.py --root path/to/omniglot --budget-minutes 60
    python examples/omniglot.py --root path/to/omniglot --smoke      # seconds (CI uses a fixture)
    torchrun --standalone --nproc_per_node=2 examples/omniglot.py --root path/to/omniglot  # 2 ranks

Under ``torchrun`` each rank adapts its share of every meta-batch and of the test tasks
(``docs/distributed.md``; on GPUs each rank takes ``cuda:LOCAL_RANK``); only rank 0 prints and
writes files.

``--root`` holds ``images_background.zip`` and ``images_evaluation.zip`` (or their extracted
folders); the decoded images are cached there (or in ``--cache-dir``) after the first load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from metalearn import (
    ClassAugmentation,
    Conv4,
    EpisodicTaskSet,
    Implicit,
    MetaKnowledge,
    Omniglot,
    anil,
    evaluate,
    maml,
    meta_train,
    rotations,
)
from metalearn.knowledge import proto_maml, protonet
from metalearn.models import SEARCH_OPS, CellConvNet, SearchableConvNet
from metalearn.plot import plot_run
from metalearn.tasks import split_classes

METHODS = ("maml", "fomaml", "anil", "protonet", "proto-maml", "imaml", "darts")

#: Per-method settings used where the command line leaves them out.
DEFAULTS = {
    "inner_lr": {"imaml": 0.1},
    "inner_steps": {"imaml": 16, "protonet": 0},
    "test_inner_steps": {"imaml": 16, "protonet": 0},
    "hidden": {"darts": 32},
}
FALLBACK = {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3, "hidden": 64}


def build_omega(
    method: str, ways: int, hidden: int, inner_lr: float, architecture: list[str] | None = None
) -> MetaKnowledge:
    """ω for ``method`` on a fresh Conv-4, a fresh network of the given cell ops, or the search space
    (the recipes are compositions of parts)."""
    if method == "darts":
        # α live on the searchable model; MetaKnowledge registers them as omega.architecture
        return maml(SearchableConvNet(num_classes=ways, hidden=hidden, cells=4, image_size=28), inner_lr)
    if architecture is not None:  # a found architecture, trained from scratch (DARTS's second stage)
        model = CellConvNet(num_classes=ways, ops=architecture, hidden=hidden, image_size=28)
    else:
        model = Conv4(num_classes=ways, hidden=hidden)
    if method == "anil":
        return anil(model, inner_lr)
    if method == "protonet":
        return protonet(model)
    if method == "proto-maml":
        return proto_maml(model, inner_lr)
    return maml(model, inner_lr)  # maml, fomaml (first order) and imaml (implicit meta-gradient)


def _chunk_size(text: str) -> int | str:
    return text if text == "auto" else int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="folder with the Omniglot archives")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/omniglot-<method>")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--n-source", type=int, default=1200, help="source characters (the rest are target)")
    p.add_argument("--n-val", type=int, default=100, help="source characters held out for validation")
    p.add_argument("--hidden", type=int, default=None, help="filters per layer (64; darts: 32)")
    p.add_argument("--iterations", type=int, default=60_000)
    p.add_argument("--budget-minutes", type=float, default=None, help="stop meta-training after this long")
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--inner-lr", type=float, default=None, help="inner SGD step size (0.4; imaml: 0.1)")
    p.add_argument("--inner-steps", type=int, default=None, help="meta-training inner steps (1; imaml: 16)")
    p.add_argument("--test-inner-steps", type=int, default=None, help="validation/meta-test steps (3; imaml: 16)")
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--arch-lr", type=float, default=0.01, help="darts: Adam step size of the mixing logits α")
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--val-tasks", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--test-tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", choices=METHODS, default="maml")
    p.add_argument(
        "--architecture", type=lambda s: s.split(","), default=None, metavar="OP,OP,...",
        help="train this network of the search space from scratch instead of the Conv-4: one op per cell, "
        "e.g. the derived_ops of a darts run's results.json (not with darts)",
    )
    p.add_argument("--imaml-lambda", type=float, default=0.5, help="iMAML's proximal strength λ (paper: 2)")
    p.add_argument("--imaml-cg-steps", type=int, default=5)
    p.add_argument("--imaml-damping", type=float, default=None,
                   help="δ in iMAML's (I + H/(λ + δ)) v = g system (default λ + 20, the reference code's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where ω and the tasks live (default: cuda when present, else cpu)")
    p.add_argument("--chunk-size", type=_chunk_size, default=None,
                   help="under vmap (the default on CUDA), tasks per chunk, or 'auto' (half the free GPU memory); "
                        "bounds the memory of a meta-batch (docs/gpu.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own, e.g. from OMP_NUM_THREADS)")
    p.add_argument("--smoke", action="store_true", help="tiny settings for CI")
    args = p.parse_args(argv)
    args.run_dir = args.run_dir or Path(f"runs/omniglot-{args.method}")
    for name, fallback in FALLBACK.items():
        if getattr(args, name) is None:
            setattr(args, name, DEFAULTS[name].get(args.method, fallback))
    if args.imaml_damping is None:
        args.imaml_damping = args.imaml_lambda + 20.0
    if args.architecture is not None:
        if args.method == "darts":
            p.error("--architecture trains a found network; darts searches one: leave one of them out")
        unknown = [op for op in args.architecture if op not in SEARCH_OPS]
        if unknown:
            p.error(f"--architecture: unknown ops {unknown}; known: {', '.join(SEARCH_OPS)}")
    if args.method == "protonet" and (args.inner_steps or args.test_inner_steps):
        p.error("protonet has no inner loop: leave --inner-steps and --test-inner-steps out (or 0)")
    if args.smoke:
        args.iterations, args.meta_batch, args.hidden = 4, 2, 8
        args.inner_steps, args.test_inner_steps = min(args.inner_steps, 2), min(args.test_inner_steps, 2)
        args.val_every = args.checkpoint_every = 2
        args.val_tasks, args.test_tasks = 4, 10
    return args


def start_ranks(args: argparse.Namespace) -> bool:
    """Joins torchrun's process group when launched by it (the GPU of ``LOCAL_RANK`` on CUDA);
    returns whether this process is the one that prints and writes (rank 0, or the only one)."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return True
    cuda = str(args.device).startswith("cuda")
    if cuda:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank() == 0


def build_tasks(
    args: argparse.Namespace, say=print
) -> tuple[EpisodicTaskSet, EpisodicTaskSet, EpisodicTaskSet]:
    data = Omniglot(args.root, cache_dir=args.cache_dir)
    split = data.few_shot_split(args.n_source)
    # hold out n_val source characters for validation; the rest, rotated, are the training classes
    held = split_classes(
        split.source, source=split.source[: len(split.source) - args.n_val], validation=None
    )
    train_chars, val_chars = held.source, held.target
    rotated = ClassAugmentation(data, rotations((0, 90, 180, 270)))
    episode = dict(ways=args.ways, shots=args.shots, queries=args.queries)
    source = EpisodicTaskSet(rotated, **episode, classes=rotated.classes_of(train_chars), seed=args.seed, length=None)
    val = EpisodicTaskSet(data, **episode, classes=val_chars, seed=args.seed + 1, length=args.val_tasks)
    target = EpisodicTaskSet(data, **episode, classes=split.target, seed=args.seed + 2, length=args.test_tasks)
    say(f"Omniglot: {len(train_chars)} source characters x 4 rotations, {len(val_chars)} validation, "
        f"{len(split.target)} target characters", flush=True)
    return source, val, target


def plot_curves(run_dir: Path) -> Path | None:
    """The run's learning curves (`metalearn.plot`) as ``curves.png``; None without matplotlib."""
    try:
        return plot_run(run_dir, run_dir / "curves.png", title=f"Omniglot: {run_dir.name}")
    except ImportError as err:
        print(f"{err}: no plot")
        return None


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    main_rank = start_ranks(args)
    say = print if main_rank else _quiet
    args.run_dir.mkdir(parents=True, exist_ok=True)
    source, val, target = build_tasks(args, say)
    torch.manual_seed(args.seed)
    omega = build_omega(args.method, args.ways, args.hidden, args.inner_lr, args.architecture).to(args.device)
    imaml = Implicit(args.imaml_lambda, args.imaml_cg_steps, args.imaml_damping) if args.method == "imaml" else None
    if args.method == "darts":  # α get their own (larger) step size: a short search must still move them
        alphas = {id(p) for p in omega.architecture.parameters()}
        groups = [{"params": [p for p in omega.parameters() if id(p) not in alphas]},
                  {"params": list(omega.architecture.parameters()), "lr": args.arch_lr}]
        outer = torch.optim.Adam(groups, lr=args.meta_lr)
    else:
        outer = torch.optim.Adam(omega.parameters(), lr=args.meta_lr)
    deadline = None if args.budget_minutes is None else time.monotonic() + 60 * args.budget_minutes

    def out_of_time(step, train_row, val_row):
        return deadline is not None and time.monotonic() > deadline

    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
              if k not in ("budget_minutes", "no_progress", "run_dir", "root", "cache_dir", "iterations",
                           "test_tasks", "device", "threads", "chunk_size")}  # device/threads: a resume warns
    # instead; chunk_size changes memory, not the run: a run may resume with smaller chunks
    start = time.monotonic()
    result = meta_train(
        omega, source, outer,
        steps=args.iterations, inner_steps=args.inner_steps, meta_batch_size=args.meta_batch,
        first_order=args.method == "fomaml", val_tasks=val, val_every=args.val_every,
        mode=imaml or "unrolled",
        val_inner_steps=args.test_inner_steps, log_path=args.run_dir / "log.jsonl",
        checkpoint_dir=args.run_dir / "checkpoints", checkpoint_every=args.checkpoint_every,
        seed=args.seed, config=config, progress=False if args.no_progress else f"meta-train {args.method}",
        callback=out_of_time,
        chunk_size=args.chunk_size,
    )
    train_minutes = (time.monotonic() - start) / 60
    proximal = None if imaml is None else imaml.lam  # iMAML's inner problem at meta-test too
    summary = {
        "method": args.method,
        "architecture": args.architecture or "conv4",
        "episode": f"{args.ways}-way {args.shots}-shot {args.queries}-query",
        "iterations": result.steps,
        "train_minutes_this_run": round(train_minutes, 1),
        "test_inner_steps": args.test_inner_steps,
        "test_proximal_lambda": proximal,
    }
    if args.method == "darts":
        choices = omega.architecture.chosen()
        for i, c in enumerate(choices):
            weights = ", ".join(f"{n} {w:.3f}" for n, w in c.weights.items())
            say(f"cell {i}: {c.name}  ({weights})")
        mixed = evaluate(omega, target, inner_steps=args.test_inner_steps,
                         progress=not args.no_progress and "meta-test (mixture)")
        summary["mixture_test_accuracy"], summary["mixture_ci95"] = mixed.mean, mixed.ci95
        summary["derived_ops"] = omega.architecture.fix()  # the derived network: argmax ops, trained weights
        summary["alpha_weights"] = [c.weights for c in choices]
        if main_rank:
            torch.save(omega.model.derive().state_dict(), args.run_dir / "derived.pt")
        say(f"mixture meta-test accuracy {100 * mixed.mean:.2f}% ± {100 * mixed.ci95:.2f}%; derived network "
              f"{summary['derived_ops']} (weights in {args.run_dir / 'derived.pt'})")
    test = evaluate(omega, target, inner_steps=args.test_inner_steps, mode=imaml,  # its proximal problem (or plain)
                    progress=not args.no_progress and f"meta-test {args.method}")
    summary.update(test_accuracy=test.mean, ci95=test.ci95, test_tasks=test.n)
    if dist.is_initialized():
        dist.destroy_process_group()
    if not main_rank:
        return summary  # rank 0 writes the results
    (args.run_dir / "results.json").write_text(json.dumps(summary, indent=2))
    plotted = plot_curves(args.run_dir)
    print(f"meta-test accuracy {100 * test.mean:.2f}% ± {100 * test.ci95:.2f}% over {test.n} target tasks "
          f"after {result.steps} iterations ({train_minutes:.1f} min this run)")
    print(f"wrote {args.run_dir / 'results.json'}" + (f" and {plotted}" if plotted else ""))
    return summary


def _quiet(*args, **kwargs) -> None:
    """print for ranks other than 0: nothing."""


if __name__ == "__main__":
    main()
