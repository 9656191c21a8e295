"""The lean step: two host reads per meta-step, settings checked once, checks still exact on the slow path."""

from __future__ import annotations

import pytest
import torch

from metalearn.errors import NonFiniteError
from metalearn.knowledge.recipes import maml
from metalearn.models import MLP
from metalearn.outer import MetaStep, _non_finite_grad, meta_gradient, meta_step
from metalearn.tasks.task import TaskBatch
from metalearn.train.loop import _check_omega_finite


def _batch(n: int = 3, k: int = 5) -> TaskBatch:
    g = torch.Generator().manual_seed(2)
    x = lambda: torch.rand(n, k, 1, generator=g) * 4 - 2  # noqa: E731
    y = lambda: torch.randn(n, k, 1, generator=g)  # noqa: E731
    return TaskBatch(train=(x(), y()), val=(x(), y()))


def _omega():
    torch.manual_seed(0)
    return maml(MLP((1, 8, 1)), lr=0.1)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_a_meta_step_reads_the_host_twice_at_most(batching: str, monkeypatch: pytest.MonkeyPatch) -> None:
    omega = _omega()
    step = MetaStep(omega, torch.optim.SGD(omega.parameters(), lr=1e-3), 2, batching=batching)  # Adam reads .item()
    step(_batch())  # warm
    reads = []
    tolist, item, to_bool = torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append("tolist") or tolist(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append("item") or item(t))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append("bool") or to_bool(t))
    step(_batch())
    # one .tolist for stats, grad norm and its finiteness; one bool: the mode's fused check of the losses
    assert reads.count("tolist") == 1 and reads.count("item") == 0
    assert len(reads) <= 2, reads


def test_meta_step_object_gives_meta_steps_result() -> None:
    a, b = _omega(), _omega()
    row_a = meta_step(a, torch.optim.Adam(a.parameters(), lr=1e-2), _batch(), 2)
    row_b = MetaStep(b, torch.optim.Adam(b.parameters(), lr=1e-2), 2)(_batch())
    assert row_a == row_b
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_meta_step_object_refuses_bad_settings_when_built() -> None:
    omega = _omega()
    other = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="none of ω's"):
        MetaStep(omega, torch.optim.SGD(other.parameters(), lr=0.1), 1)
    with pytest.raises(ValueError, match="clip_grad_norm"):
        MetaStep(omega, torch.optim.SGD(omega.parameters(), lr=0.1), 1, clip_grad_norm=0.0)
    with pytest.raises(ValueError, match="runs as a loop"):
        MetaStep(omega, torch.optim.SGD(omega.parameters(), lr=0.1), 1, mode="implicit", batching="vmap")


def test_a_gradient_norm_that_overflows_with_finite_entries_is_not_an_error() -> None:
    omega = _omega()
    weight = omega.model.layers[0].weight
    weight.grad = torch.full_like(weight, 1e30)  # finite entries ...
    assert not bool(torch.isfinite(torch.linalg.vector_norm(weight.grad)))  # ... whose norm overflows
    assert _non_finite_grad(omega) is None
    weight.grad[0, 0] = float("nan")
    assert _non_finite_grad(omega) == "model.layers.0.weight"


def test_a_nan_meta_gradient_still_names_the_parameter() -> None:
    omega = _omega()
    batch = _batch()
    bad = TaskBatch(train=batch.train, val=(batch.val[0], batch.val[1] + 3e38))  # Inf losses on the way
    before = [p.detach().clone() for p in omega.parameters()]
    with pytest.raises(NonFiniteError):
        meta_step(omega, torch.optim.SGD(omega.parameters(), lr=0.1), bad, 1)
    assert all(torch.equal(p, b) for p, b in zip(omega.parameters(), before, strict=True))


def test_fused_omega_check_names_the_bad_parameter_and_ignores_norm_overflow() -> None:
    omega = _omega()
    with torch.no_grad():
        omega.model.layers[0].weight.fill_(1e30)  # finite, but its squared norm overflows float32
    assert not bool(torch.isfinite(torch.linalg.vector_norm(omega.model.layers[0].weight)))
    _check_omega_finite(omega, 3)
    with torch.no_grad():
        omega.model.layers[0].bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"outer step 3: ω parameter\(s\) \['model.layers.0.bias'\]") as info:
        _check_omega_finite(omega, 3, list(omega.parameters()))
    assert info.value.step == 3


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_a_nan_already_in_omega_is_named_instead_of_task_0s_data(batching: str) -> None:
    # an ω made NaN by an earlier outer step makes task 0's first inner loss NaN: the error names ω
    omega = _omega()
    with torch.no_grad():
        omega.model.layers[2].weight[0, 3] = float("nan")
    before = [p.detach().clone() for p in omega.parameters()]
    step = MetaStep(omega, torch.optim.SGD(omega.parameters(), lr=0.1), 1, batching=batching)
    named = r"ω parameter\(s\) \[.model.layers.2.weight.\] already hold NaN/Inf"
    with pytest.raises(NonFiniteError, match=named) as info:
        step(_batch())
    assert isinstance(info.value.__cause__, NonFiniteError) and "task 0" in str(info.value.__cause__)
    for p, b in zip(omega.parameters(), before, strict=True):  # ω not stepped
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(NonFiniteError, match="already hold NaN/Inf"):
        meta_gradient(omega, _batch(), 1, batching=batching)


def test_a_nan_in_the_data_still_names_the_task_when_omega_is_finite() -> None:
    omega = _omega()
    bad = _batch()
    bad.train[0][2, 1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="task 2") as info:
        meta_step(omega, torch.optim.SGD(omega.parameters(), lr=0.1), bad, 1)
    assert "ω parameter" not in str(info.value)


@pytest.mark.slow
def test_meta_iteration_benchmark_quick_smoke_run() -> None:
    # the side-by-side benchmark runs end to end and its last line is the JSON report (no timing asserted)
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "meta_iteration.py"), "--quick", "--only", "sinusoid"],
        capture_output=True, text=True, env=env, check=False, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    sinusoid = report["workloads"]["sinusoid"]
    expected = {"metalearn auto", "metalearn meta_train", "floor torch.func", "metalearn bf16"}
    assert expected <= set(sinusoid["contenders"])
    assert all(value < 1e-5 for value in sinusoid["grad_agreement_vs_auto"].values())
    assert "learn2learn" in sinusoid["not_measured"] and sinusoid["targets"]


def test_set_outer_step_reaches_hooks_on_classes_and_instances_only() -> None:
    from metalearn.train.loop import set_outer_step

    seen: list[tuple[str, int]] = []

    class Scheduled(torch.nn.Module):
        def set_outer_step(self, step: int) -> None:
            seen.append(("class", step))

    model = torch.nn.Sequential(torch.nn.Linear(1, 4), Scheduled(), torch.nn.Linear(4, 1))
    model[2].set_outer_step = lambda step: seen.append(("instance", step))  # a hook set on one module
    set_outer_step(maml(model, lr=0.1), 7)
    assert sorted(seen) == [("class", 7), ("instance", 7)]


def test_random_layers_reads_the_flag_on_classes_and_instances() -> None:
    from metalearn.mapping import choose_batching, random_layers

    class Noisy(torch.nn.Module):
        random_in_training = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    flagged = torch.nn.Identity()
    flagged.random_in_training = True
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), Noisy(), flagged, torch.nn.Dropout(0.0), torch.nn.Linear(4, 1))
    assert random_layers(model) == ["1", "2"]  # a dropout of p=0 draws nothing
    assert choose_batching(maml(model, lr=0.1), torch.device("cpu")) == "loop"
    model.eval()
    assert random_layers(model) == [] and choose_batching(maml(model, lr=0.1), torch.device("cpu")) == "vmap"


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_a_regression_step_reports_its_val_mse_as_the_metric(batching: str) -> None:
    omega = _omega()
    row = meta_step(omega, torch.optim.SGD(omega.parameters(), lr=0.0), _batch(), 2, batching=batching)
    assert row["val_metric"] == row["meta_loss"]  # the MSE is the val loss, read off it
