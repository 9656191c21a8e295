"""The bad-input matrix: every input the library refuses, with the error it gives, and nothing done before it.

Each row builds a bad call in a fresh run folder, then asserts the exception type, a fragment
of its message, that no file of the run folder was created, removed or changed (listing and
mtimes), and that ω's state is unchanged. Rows cover the inputs refused since issue 9 (silent
no-op or wrong training before) and those refused well already (impossible episode sizes, bad
shapes, bad batching strings, non-finite losses, wrong types), so the table documents the
whole surface. Tiny MLPs and in-memory data: the whole file runs in a few seconds.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from metalearn.errors import CheckpointMismatchError, NonFiniteError
from metalearn.evaluate import evaluate, fine_tune
from metalearn.inner import adapt
from metalearn.knowledge import InnerSGD, MetaKnowledge
from metalearn.models import MLP
from metalearn.modes import Checkpointed
from metalearn.outer import meta_gradient, meta_loss, meta_step
from metalearn.tasks import (
    ClassAugmentation,
    EpisodicTaskSet,
    Rotate90,
    Sinusoid,
    Task,
    TaskBatch,
    TensorLabelledDataset,
    rotations,
    split_classes,
    stack_tasks,
)
from metalearn.train import describe_tasks, meta_train

WAYS = 3
FEATURES = 4


# -- tiny fixtures ---------------------------------------------------------------------------


def regression_omega() -> MetaKnowledge:
    torch.manual_seed(0)
    return MetaKnowledge(MLP((1, 6, 1)), optimizer=InnerSGD(0.1))


def classifier_omega(outputs: int = WAYS) -> MetaKnowledge:
    torch.manual_seed(0)
    return MetaKnowledge(MLP((FEATURES, 6, outputs)), optimizer=InnerSGD(0.1))


def adam(omega: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(omega.parameters(), lr=1e-2)


def regression_task(k: int = 3, y_shape: str = "column", dtype=torch.float32) -> Task:
    x = torch.linspace(-1, 1, 2 * k)[:, None]
    y = torch.sin(x) if y_shape == "column" else torch.sin(x)[:, 0]
    return Task(train=(x[:k], y[:k].to(dtype)), val=(x[k:], y[k:].to(dtype)))


def regression_batch(n: int = 2, **kwargs) -> TaskBatch:
    return stack_tasks([regression_task(**kwargs) for _ in range(n)])


def classification_task(train_labels=None, val_labels=None) -> Task:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(WAYS)
    y_train = labels if train_labels is None else torch.tensor(train_labels)
    y_val = labels if val_labels is None else torch.tensor(val_labels)
    return Task(
        train=(torch.randn(len(y_train), FEATURES, generator=g), y_train),
        val=(torch.randn(len(y_val), FEATURES, generator=g), y_val),
    )


def classification_batch(bad_task: int | None = None, train_labels=None, val_labels=None) -> TaskBatch:
    """Two tasks; task ``bad_task`` (if any) gets the given labels."""
    tasks = [
        classification_task(train_labels, val_labels) if i == bad_task else classification_task() for i in range(2)
    ]
    return stack_tasks(tasks)


def dataset(classes: int = 6, per_class: int = 5) -> TensorLabelledDataset:
    g = torch.Generator().manual_seed(0)
    return TensorLabelledDataset(
        torch.randn(classes * per_class, FEATURES, generator=g), torch.arange(classes).repeat(per_class)
    )


def sinusoid(**kwargs) -> Sinusoid:
    return Sinusoid(3, 3, seed=0, length=None, **kwargs)


def train_kwargs(run: Path, **overrides) -> dict:
    kw = dict(
        steps=2,
        inner_steps=1,
        meta_batch_size=2,
        log_path=run / "log.jsonl",
        checkpoint_dir=run / "ckpt",
        checkpoint_every=1,
        progress=False,
    )
    kw.update(overrides)
    return kw


def train(run: Path, omega=None, tasks=None, optimizer=None, **overrides) -> Callable[[], object]:
    """A `meta_train` call on the sinusoid with the run folder's log and checkpoints."""
    omega = regression_omega() if omega is None else omega
    tasks = sinusoid() if tasks is None else tasks
    optimizer = adam(omega) if optimizer is None else optimizer
    return lambda: meta_train(omega, tasks, optimizer, **train_kwargs(run, **overrides))


def under(context: Callable[[], object], call: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with context():
            return call()

    return run


# -- the cases -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad input: ``make(run)`` returns ``(ω or None, the failing call)``; nothing before it counts."""

    id: str
    make: Callable[[Path], tuple[nn.Module | None, Callable[[], object]]]
    error: type[BaseException]
    match: str


def _train_case(id: str, error, match: str, **overrides) -> Case:
    def make(run: Path):
        omega = overrides.pop("omega", None) or regression_omega()
        return omega, train(run, omega=omega, **overrides)

    return Case(id, make, error, match)


def _with_omega(build_omega, call) -> Callable[[Path], tuple]:
    def make(run: Path):
        omega = build_omega()
        return omega, lambda: call(omega)

    return make


def _foreign_optimizer(run: Path):
    omega = regression_omega()
    return omega, train(run, omega=omega, optimizer=adam(regression_omega()))


def _extra_tensor_optimizer(run: Path):
    omega = regression_omega()
    stray = nn.Parameter(torch.zeros(3))
    return omega, train(run, omega=omega, optimizer=torch.optim.Adam([*omega.parameters(), stray], lr=1e-2))


def _checkpoint_then(tasks_before, tasks_after, **overrides):
    """A run folder holding a checkpoint of a run on ``tasks_before``; then a resume on ``tasks_after``."""

    def make(run: Path):
        omega = classifier_omega()
        train(run, omega=omega, tasks=tasks_before, steps=1, meta_batch_size=1)()  # variable ways: one task a step
        fresh = classifier_omega()
        return fresh, train(run, omega=fresh, tasks=tasks_after, meta_batch_size=1, **overrides)

    return make


def _log_without_checkpoint(run: Path):
    (run / "log.jsonl").write_text('{"kind": "train", "step": 0}\n')
    omega = regression_omega()
    return omega, train(run, omega=omega)


def _log_dir(run: Path):
    (run / "logs").mkdir()
    omega = regression_omega()
    return omega, train(run, omega=omega, log_path=run / "logs")


def _log_under_file(run: Path):
    omega = regression_omega()
    return omega, train(run, omega=omega, log_path=run / "keep.txt" / "log.jsonl")


def _mixed_size_folder(run: Path):
    image = pytest.importorskip("PIL.Image")
    from metalearn.tasks import ImageFolderDataset

    for name, size in (("a", (6, 4)), ("b", (6, 4)), ("c", (5, 5))):
        (run / "images" / name).mkdir(parents=True)
        image.new("RGB", size).save(run / "images" / name / "img0.png")
    return None, lambda: ImageFolderDataset(run / "images")


def _vw(ways) -> EpisodicTaskSet:
    return EpisodicTaskSet(dataset(), ways, 1, 1, seed=0, length=None)


def _nan_tasks() -> list[Task]:
    task = regression_task()
    x, y = task.train
    return [Task(train=(x, y * float("nan")), val=task.val)]


def _rotation_of_non_square():
    data = TensorLabelledDataset(torch.zeros(4, 1, 4, 6), torch.tensor([0, 0, 1, 1]))
    return ClassAugmentation(data, rotations((0, 90)))


def _empty_batch() -> TaskBatch:
    batch = regression_batch()
    return TaskBatch(train=tuple(t[:0] for t in batch.train), val=tuple(t[:0] for t in batch.val))


def _reg(call):
    return _with_omega(regression_omega, call)


def _cls(call, outputs: int = WAYS):
    return _with_omega(lambda: classifier_omega(outputs), call)


def _no_omega(call):
    return lambda run: (None, call)


CASES = [
    # meta_train: inputs that trained nothing, or the wrong way, before issue 9
    Case("train/no_grad", lambda run: (None, under(torch.no_grad, train(run))), RuntimeError, "no_grad"),
    Case(
        "train/inference_mode",
        lambda run: (None, under(torch.inference_mode, train(run))),
        RuntimeError,
        "inference_mode",
    ),
    _train_case("train/clip-negative", ValueError, "clip_grad_norm must be a positive", clip_grad_norm=-1.0),
    _train_case("train/clip-zero", ValueError, "clip_grad_norm must be a positive", clip_grad_norm=0.0),
    _train_case("train/clip-nan", ValueError, "got nan", clip_grad_norm=math.nan),
    _train_case("train/clip-inf", ValueError, "got inf", clip_grad_norm=math.inf),
    _train_case("train/clip-string", TypeError, "clip_grad_norm must be a positive number", clip_grad_norm="1"),
    Case("train/optimizer-of-another-omega", _foreign_optimizer, ValueError, "none of ω's"),
    Case("train/optimizer-with-stray-tensor", _extra_tensor_optimizer, ValueError, "not parameters of ω"),
    _train_case("train/optimizer-not-an-optimizer", TypeError, "torch.optim.Optimizer", optimizer=[1.0]),
    _train_case("train/seed-float", TypeError, "seed must be an int", seed=1.5),
    _train_case("train/seed-bool", TypeError, "seed must be an int", seed=True),
    _train_case("train/empty-task-list", ValueError, "tasks is empty", tasks=[]),
    _train_case("train/empty-val-tasks", ValueError, "val_tasks is empty", val_tasks=[]),
    _train_case("train/tasks-a-taskbatch", TypeError, "list\\(batch\\)", tasks=regression_batch()),
    _train_case("train/tasks-list-of-tensors", TypeError, "not a Task", tasks=[torch.zeros(2)]),
    Case("train/log-path-a-folder", _log_dir, IsADirectoryError, "is a folder"),
    Case("train/log-path-under-a-file", _log_under_file, NotADirectoryError, "is a file"),
    _train_case("train/omega-a-module", TypeError, "MetaKnowledge", omega=MLP((1, 6, 1)), optimizer=[]),
    _train_case("train/regression-target-broadcasts", ValueError, "broadcast", tasks=[regression_task(y_shape="flat")]),
    _train_case("train/val-inner-steps-negative", ValueError, "val_inner_steps", val_inner_steps=-1),
    _train_case("train/config-not-json", TypeError, "JSON-serialisable", config={"pool": {1, 2}}),
    Case(
        "train/resume-other-variable-ways",
        _checkpoint_then(_vw((2, 3)), _vw((2, 4)), steps=3),
        CheckpointMismatchError,
        "another configuration",
    ),
    Case(
        "train/resume-other-class-pool",
        _checkpoint_then(
            EpisodicTaskSet(dataset(), WAYS, 1, 1, classes=[0, 1, 2, 3], seed=0, length=None),
            EpisodicTaskSet(dataset(), WAYS, 1, 1, classes=[0, 1, 2, 4], seed=0, length=None),
            steps=3,
        ),
        CheckpointMismatchError,
        "another configuration",
    ),
    # meta_train: refused well before issue 9 (kept here so the table is the whole surface)
    _train_case("train/steps-negative", ValueError, "steps must be an int of at least 0", steps=-1),
    _train_case("train/inner-steps-negative", ValueError, "inner_steps must be", inner_steps=-1),
    _train_case("train/meta-batch-zero", ValueError, "meta_batch_size must be", meta_batch_size=0),
    _train_case("train/batching-typo", ValueError, "batching must be one of", batching="vamp"),
    _train_case("train/mode-unknown", ValueError, "mode must be one of", mode="maml"),
    _train_case("train/nan-in-data", NonFiniteError, "non-finite", tasks=_nan_tasks()),
    Case("train/log-of-another-run", _log_without_checkpoint, FileExistsError, "already holds a log"),
    Case(
        "train/resume-false-with-checkpoints",
        _checkpoint_then(_vw(2), _vw(2), resume=False),
        FileExistsError,
        "resume=False",
    ),
    # meta_step / meta_gradient / meta_loss
    Case(
        "step/no_grad",
        _reg(lambda o: under(torch.no_grad, lambda: meta_step(o, adam(o), regression_batch(), 1))()),
        RuntimeError,
        "no_grad",
    ),
    Case(
        "step/inference_mode",
        _reg(lambda o: under(torch.inference_mode, lambda: meta_step(o, adam(o), regression_batch(), 1))()),
        RuntimeError,
        "inference_mode",
    ),
    Case(
        "step/clip-negative",
        _reg(lambda o: meta_step(o, adam(o), regression_batch(), 1, clip_grad_norm=-1)),
        ValueError,
        "would zero or reverse",
    ),
    Case(
        "step/clip-nan",
        _reg(lambda o: meta_step(o, adam(o), regression_batch(), 1, clip_grad_norm=math.nan)),
        ValueError,
        "clip_grad_norm",
    ),
    Case(
        "step/optimizer-of-another-omega",
        _reg(lambda o: meta_step(o, adam(regression_omega()), regression_batch(), 1)),
        ValueError,
        "none of ω's",
    ),
    Case(
        "step/steps-negative", _reg(lambda o: meta_step(o, adam(o), regression_batch(), -1)), ValueError, "at least 0"
    ),
    Case(
        "step/steps-float",
        _reg(lambda o: meta_step(o, adam(o), regression_batch(), 1.0)),
        TypeError,
        "int number of steps",
    ),
    Case(
        "step/batching-typo",
        _reg(lambda o: meta_step(o, adam(o), regression_batch(), 1, batching="Loop")),
        ValueError,
        "batching must be one of",
    ),
    Case(
        "step/nan-loss",
        _reg(lambda o: meta_step(o, adam(o), stack_tasks(_nan_tasks()), 1)),
        NonFiniteError,
        "non-finite",
    ),
    Case(
        "gradient/no_grad",
        _reg(lambda o: under(torch.no_grad, lambda: meta_gradient(o, regression_batch(), 1))()),
        RuntimeError,
        "no_grad",
    ),
    Case("gradient/steps-negative", _reg(lambda o: meta_gradient(o, regression_batch(), -2)), ValueError, "at least 0"),
    Case("gradient/empty-batch", _reg(lambda o: meta_gradient(o, _empty_batch(), 1)), ValueError, "0 tasks"),
    Case(
        "gradient/batch-a-list",
        _reg(lambda o: meta_gradient(o, [regression_task()], 1)),
        TypeError,
        "must be a TaskBatch",
    ),
    *[
        Case(
            f"gradient/{path}/regression-target-broadcasts",
            _reg(lambda o, path=path: meta_gradient(o, regression_batch(y_shape="flat"), 1, batching=path)),
            ValueError,
            r"\[K, K\]",
        )
        for path in ("loop", "vmap")
    ],
    *[
        Case(
            f"gradient/{path}/integer-regression-targets",
            _reg(lambda o, path=path: meta_gradient(o, regression_batch(dtype=torch.int64), 1, batching=path)),
            ValueError,
            "cast the targets to float",
        )
        for path in ("loop", "vmap")
    ],
    *[
        Case(
            f"gradient/{path}/label-beyond-head",
            _cls(
                lambda o, path=path: meta_gradient(o, classification_batch(1, val_labels=[0, 1, 5]), 1, batching=path)
            ),
            ValueError,
            "task 1 has val label 5, but ω's model has 3 outputs",
        )
        for path in ("loop", "vmap")
    ],
    Case(
        "gradient/ignore-index-label",
        _cls(lambda o: meta_gradient(o, classification_batch(1, train_labels=[0, -100, 2]), 1)),
        ValueError,
        "task 1 has train label -100 .*ignore index",
    ),
    Case(
        "gradient/negative-label",
        _cls(lambda o: meta_gradient(o, classification_batch(0, val_labels=[0, -3, 2]), 1)),
        ValueError,
        "task 0 has val label -3",
    ),
    Case(
        "gradient/label-shape",
        _cls(
            lambda o: meta_gradient(
                o,
                stack_tasks(
                    [
                        Task(
                            train=(torch.zeros(3, FEATURES), torch.zeros(3, 1, dtype=torch.int64)),
                            val=(torch.zeros(3, FEATURES), torch.zeros(3, 1, dtype=torch.int64)),
                        )
                    ]
                ),
                1,
            )
        ),
        ValueError,
        "one label per example",
    ),
    Case(
        "gradient/bool-targets",
        _cls(
            lambda o: meta_gradient(
                o,
                classification_batch(0, val_labels=[0, 1, 1]).__class__(
                    train=classification_batch().train,
                    val=(classification_batch().val[0], torch.ones(2, 3, dtype=torch.bool)),
                ),
                1,
            )
        ),
        TypeError,
        "torch.bool",
    ),
    Case(
        "gradient/implicit-under-vmap",
        _reg(lambda o: meta_gradient(o, regression_batch(), 1, mode="implicit", batching="vmap")),
        ValueError,
        "runs as a loop",
    ),
    Case("loss/steps-negative", _reg(lambda o: meta_loss(o, regression_batch(), -1)), ValueError, "at least 0"),
    # adapt / fine_tune / evaluate
    Case("adapt/steps-negative", _reg(lambda o: adapt(o, regression_task().train, -1)), ValueError, "at least 0"),
    Case(
        "adapt/label-beyond-head",
        _cls(lambda o: adapt(o, classification_task(train_labels=[0, 1, 7]).train, 1)),
        ValueError,
        "label 7, but ω's model has 3 outputs",
    ),
    Case(
        "fine_tune/steps-negative", _reg(lambda o: fine_tune(o, regression_task().train, -3)), ValueError, "at least 0"
    ),
    Case("evaluate/steps-negative", _reg(lambda o: evaluate(o, [regression_task()], -1)), ValueError, "at least 0"),
    Case(
        "evaluate/seed-float",
        _reg(lambda o: evaluate(o, [regression_task()], 1, seed=0.5)),
        TypeError,
        "seed must be an int",
    ),
    Case("evaluate/no-tasks", _reg(lambda o: evaluate(o, [], 1)), ValueError, "at least one task"),
    Case(
        "evaluate/batch-size-zero",
        _reg(lambda o: evaluate(o, [regression_task()], 1, batch_size=0)),
        ValueError,
        "batch_size must be at least 1",
    ),
    Case(
        "evaluate/ignore-index-label",
        _cls(lambda o: evaluate(o, [classification_task(), classification_task(val_labels=[0, 1, -100])], 1)),
        ValueError,
        "task 1 has val label -100",
    ),
    Case(
        "evaluate/mode-unknown",
        _reg(lambda o: evaluate(o, [regression_task()], 1, mode="imaml")),
        ValueError,
        "imaml",
    ),
    # tasks and data
    Case(
        "episodes/more-ways-than-classes",
        _no_omega(lambda: EpisodicTaskSet(dataset(), 7, 1, 1)),
        ValueError,
        "the pool has 6",
    ),
    Case(
        "episodes/more-shots-than-examples",
        _no_omega(lambda: EpisodicTaskSet(dataset(), 2, 4, 2)),
        ValueError,
        "need 6 examples per class",
    ),
    Case(
        "episodes/ways-range-reversed",
        _no_omega(lambda: EpisodicTaskSet(dataset(), (3, 2), 1, 1)),
        ValueError,
        "low > high",
    ),
    Case("episodes/ways-a-string", _no_omega(lambda: EpisodicTaskSet(dataset(), "5", 1, 1)), TypeError, "ways must be"),
    Case(
        "episodes/seed-bool",
        _no_omega(lambda: EpisodicTaskSet(dataset(), 2, 1, 1, seed=True)),
        TypeError,
        "seed must be an int",
    ),
    Case(
        "episodes/not-a-labelled-dataset",
        _no_omega(lambda: EpisodicTaskSet([1, 2], 2, 1, 1)),
        TypeError,
        "LabelledDataset",
    ),
    Case("tasks/length-zero", _no_omega(lambda: Sinusoid(3, 3, length=0)), ValueError, "length must be"),
    Case("tasks/shots-zero", _no_omega(lambda: Sinusoid(0, 3)), ValueError, "shots must be"),
    Case(
        "task/x-y-counts-differ",
        _no_omega(
            lambda: Task(train=(torch.zeros(3, 1), torch.zeros(2, 1)), val=(torch.zeros(1, 1), torch.zeros(1, 1)))
        ),
        ValueError,
        "x has 3 examples but y has 2",
    ),
    Case(
        "task/train-not-a-pair",
        _no_omega(lambda: Task(train=[torch.zeros(1)], val=(torch.zeros(1), torch.zeros(1)))),
        TypeError,
        "must be a pair",
    ),
    Case("stack/no-tasks", _no_omega(lambda: stack_tasks([])), ValueError, "at least one task"),
    Case(
        "stack/shapes-differ",
        _no_omega(lambda: stack_tasks([regression_task(3), regression_task(4)])),
        ValueError,
        "only same-shaped tasks stack",
    ),
    Case(
        "dataset/float-labels",
        _no_omega(lambda: TensorLabelledDataset(torch.zeros(2, 1), torch.zeros(2))),
        TypeError,
        "labels.long()",
    ),
    Case("split/fractions-sum", _no_omega(lambda: split_classes(torch.arange(10), (0.5, 0.4))), ValueError, "sum to 1"),
    Case("images/mixed-sizes", _mixed_size_folder, ValueError, r"2 different sizes .*image_size=\(4, 6\)"),
    Case(
        "augment/rotation-of-non-square",
        _no_omega(_rotation_of_non_square),
        ValueError,
        "Rotate90\\(k=1\\) cannot augment item 0",
    ),
    Case(
        "augment/rotate-non-square-batch",
        _no_omega(lambda: Rotate90(1)(torch.zeros(2, 1, 4, 6))),
        ValueError,
        "Resize the images to a square",
    ),
    Case("mode/checkpointed-segment-zero", _no_omega(lambda: Checkpointed(segment=0)), ValueError, "at least 1"),
]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder``: a file with its size and mtime (ns), a folder by its name alone.

    A folder's own mtime is left out: `meta_train` locks a checkpoint folder with a lock file
    it removes again, which touches the folder but leaves every file in it as it was.
    """
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[str(Path(root, name).relative_to(folder))] = (-1, 0)
        for name in files:
            st = Path(root, name).stat()
            out[str(Path(root, name).relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


def _state(omega: nn.Module | None) -> dict[str, torch.Tensor]:
    return {} if omega is None else {k: v.detach().clone() for k, v in omega.state_dict().items()}


def test_the_matrix_is_large_enough_and_ids_unique() -> None:
    assert len(CASES) >= 45
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_before_any_work(case: Case, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("a file of the run folder that must stay as it is")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the missing-parameter warning of a deliberately bad optimizer
        omega, call = case.make(run)
    before_files, before_state = _snapshot(run), _state(omega)
    grads_before = None if omega is None else [p.grad for p in omega.parameters()]
    with pytest.raises(case.error, match=case.match):
        call()
    assert _snapshot(run) == before_files, "a file of the run folder was written or changed"
    after = _state(omega)
    assert after.keys() == before_state.keys()
    for name, value in before_state.items():
        assert torch.equal(after[name], value), f"ω's {name} changed"
    if grads_before is not None and case.error is not NonFiniteError:
        assert all(p.grad is None for p in omega.parameters()), "ω's gradients were touched"


# -- the rest of the surface that is not a refusal ---------------------------------------------


def test_optimizer_missing_an_omega_parameter_warns_naming_it() -> None:
    omega = MetaKnowledge(MLP((1, 6, 1)), optimizer=InnerSGD(0.1))
    partial = torch.optim.SGD([omega.model.layers[0].weight, omega.model.layers[0].bias], lr=0.1)
    with pytest.warns(
        UserWarning, match=r"does not hold 2 trainable ω parameter\(s\): model.layers.2.weight, model.layers.2.bias"
    ):
        meta_step(omega, partial, regression_batch(), 1)


def test_frozen_parameters_left_out_of_the_optimizer_do_not_warn() -> None:
    omega = MetaKnowledge(MLP((1, 6, 1)), optimizer=InnerSGD(0.1))
    omega.model.layers[0].weight.requires_grad_(False)
    params = [p for p in omega.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        meta_step(omega, torch.optim.SGD(params, lr=0.1), regression_batch(), 1)


def test_labels_in_range_and_a_larger_head_are_accepted() -> None:
    # 3-way labels on a 5-output head are legitimate (wasteful, not wrong): no error on either path
    for path in ("loop", "vmap"):
        omega = classifier_omega(outputs=5)
        stats = meta_gradient(omega, classification_batch(), 1, batching=path)
        assert math.isfinite(stats.meta_loss)


def _description(tasks) -> dict:
    return describe_tasks(tasks)


@pytest.mark.parametrize(
    "make_other",
    [
        lambda: EpisodicTaskSet(dataset(), (2, 4), 1, 1, seed=0, length=None),  # another ways range
        lambda: EpisodicTaskSet(dataset(), (2, 3), (1, 2), 1, seed=0, length=None),  # another shots range
        lambda: EpisodicTaskSet(dataset(), (2, 3), 1, 2, seed=0, length=None),  # another queries
        lambda: EpisodicTaskSet(dataset(), (2, 3), 1, 1, seed=1, length=None),  # another seed
        lambda: EpisodicTaskSet(dataset(), (2, 3), 1, 1, seed=0, length=100),  # a length
        lambda: EpisodicTaskSet(dataset(), (2, 3), 1, 1, classes=range(5), seed=0, length=None),  # another pool
        lambda: EpisodicTaskSet(dataset(per_class=6), (2, 3), 1, 1, seed=0, length=None),  # other data
        lambda: EpisodicTaskSet(
            ClassAugmentation(dataset(), [Rotate90(0), Rotate90(2)]), (2, 3), 1, 1, seed=0, length=None
        ),  # augmented
    ],
    ids=["ways", "shots", "queries", "seed", "length", "pool", "data", "augmentation"],
)
def test_task_description_changes_with_every_setting_that_changes_the_tasks(make_other) -> None:
    base = _description(EpisodicTaskSet(dataset(), (2, 3), 1, 1, seed=0, length=None))
    assert _description(EpisodicTaskSet(dataset(), (2, 3), 1, 1, seed=0, length=None)) == base  # stable
    assert _description(make_other()) != base


def test_regression_description_covers_the_family_ranges() -> None:
    base = _description(sinusoid())
    assert _description(sinusoid()) == base
    assert _description(sinusoid(amplitude=(0.1, 4.0))) != base
    assert _description(sinusoid(noise_std=0.1)) != base


def test_a_list_of_tasks_is_described_by_its_contents() -> None:
    a = [regression_task(), regression_task()]
    b = [regression_task(), Task(train=(a[0].train[0], a[0].train[1] + 1), val=a[0].val)]
    assert _description(a) == _description(list(a))
    assert _description(a) != _description(b)


def test_resume_with_the_same_task_set_still_works(tmp_path: Path) -> None:
    omega = classifier_omega()
    meta_train(omega, _vw(WAYS), adam(omega), **train_kwargs(tmp_path, steps=1))
    again = classifier_omega()
    result = meta_train(again, _vw(WAYS), adam(again), **train_kwargs(tmp_path, steps=2))
    assert result.resumed_from == 1 and result.steps == 2


def test_a_failing_first_step_leaves_no_log(tmp_path: Path) -> None:
    # the log is created by its first line: a run refused at step 0 leaves no empty file behind
    omega = regression_omega()
    with pytest.raises(NonFiniteError):
        meta_train(omega, _nan_tasks(), adam(omega), **train_kwargs(tmp_path))
    assert not (tmp_path / "log.jsonl").exists()
