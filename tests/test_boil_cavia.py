"""BOIL (adapt the body, freeze the head) and CAVIA (adapt only context parameters, reset to 0 per task)."""

from __future__ import annotations

import pytest
import torch
from fd_check import fd_check
from reference import image_task_batch, sine_task_batch
from torch import nn

from metalearn.evaluate import fine_tune
from metalearn.inner import adapt
from metalearn.knowledge import (
    AdaptExcept,
    ConcatContext,
    ContextInit,
    InnerSGD,
    MetaKnowledge,
    boil,
    cavia,
    check_part,
)
from metalearn.models import MLP, Conv4
from metalearn.outer import meta_gradient, meta_loss
from metalearn.tasks.task import TaskBatch

F64 = torch.float64




def _cavia(num_context: int = 3, seed: int = 0) -> MetaKnowledge:
    torch.manual_seed(seed)
    return cavia(ConcatContext(MLP((1 + num_context, 8, 1)), num_context).to(F64), lr=0.5)


def _grads(omega: MetaKnowledge, batch: TaskBatch, steps: int, batching: str) -> dict[str, torch.Tensor]:
    omega.zero_grad(set_to_none=True)
    meta_gradient(omega, batch, steps, batching=batching)
    return {n: p.grad.clone() for n, p in omega.named_parameters() if p.grad is not None}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    scale = max(g.abs().max().item() for g in a.values())
    for n in a:
        assert (a[n] - b[n]).abs().max().item() <= 1e-10 * max(scale, 1.0), n


# ---------------------------------------------------------------- BOIL


def test_boil_adapts_the_body_and_freezes_the_head() -> None:
    torch.manual_seed(0)
    omega = boil(Conv4(3, hidden=3, image_size=16).to(F64), lr=0.3)
    assert omega.static_names == ["head.weight", "head.bias"]
    assert "features.0.weight" in omega.adapted_names
    batch = image_task_batch(n_tasks=1)
    adapted = adapt(omega, (batch.train[0][0], batch.train[1][0]), inner_steps=2)
    model = omega.model_params()
    assert torch.equal(adapted.params["head.weight"], model["head.weight"])  # an inner step size of 0
    assert not torch.equal(adapted.params["features.0.weight"], model["features.0.weight"])


def test_boil_meta_gradient_reaches_the_head_and_matches_finite_differences() -> None:
    torch.manual_seed(1)
    omega = boil(Conv4(3, hidden=3, image_size=16).to(F64), lr=0.3)
    batch = image_task_batch(n_tasks=2)
    loop, vm = _grads(omega, batch, 2, "loop"), _grads(omega, batch, 2, "vmap")
    _assert_close(loop, vm)
    assert loop["model.head.weight"].abs().max() > 0
    names = ["model.head.weight", "model.features.0.weight"]
    fd_check(omega, lambda: meta_loss(omega, batch, 2, batching="loop"), names)


def test_adapt_except_checks_its_patterns() -> None:
    names = ["features.0.weight", "head.weight", "head.bias"]
    assert AdaptExcept("head").select(names) == ["features.0.weight"]
    assert AdaptExcept("head.*", "features.0.weight").select(names + ["features.1.bias"]) == ["features.1.bias"]
    with pytest.raises(ValueError, match="matches none"):
        AdaptExcept("classifier").select(names)
    with pytest.raises(ValueError, match="nothing would adapt"):
        AdaptExcept("*").select(names)
    check_part(AdaptExcept("head"), inputs=names)


# ---------------------------------------------------------------- CAVIA


def test_cavia_adapts_only_the_context_from_zero_for_every_task() -> None:
    omega = _cavia()
    assert omega.adapted_names == ["context"]
    assert "model.context" not in {n for n, p in omega.named_parameters() if p.requires_grad}
    theta0 = omega.initial_params(4, None)
    assert torch.equal(theta0["context"], torch.zeros(4, 3, dtype=F64))
    with torch.no_grad():
        omega.model.context.fill_(7.0)  # whatever the template holds, φ0 is 0
    assert torch.equal(omega.initial_params(2, None)["context"], torch.zeros(2, 3, dtype=F64))
    batch = sine_task_batch(n_tasks=1)
    adapted = fine_tune(omega, (batch.train[0][0], batch.train[1][0]), inner_steps=3)
    assert adapted.params["context"].abs().max() > 0
    for name in omega.static_names:
        assert torch.equal(adapted.params[name], omega.model_params()[name])  # the body never adapts


def test_cavia_meta_gradient_loop_equals_vmap_and_finite_differences() -> None:
    omega = _cavia()
    batch = sine_task_batch()
    loop, vm = _grads(omega, batch, 2, "loop"), _grads(omega, batch, 2, "vmap")
    _assert_close(loop, vm)
    assert "model.context" not in loop
    assert set(loop) == {n for n, p in omega.named_parameters() if p.requires_grad}  # the body: meta-learned
    fd_check(omega, lambda: meta_loss(omega, batch, 2, batching="loop"), sorted(loop)[:2], entries=3)


def test_concat_context_appends_the_context_to_features_and_channels() -> None:
    model = ConcatContext(nn.Identity(), 2)
    with torch.no_grad():
        model.context.copy_(torch.tensor([3.0, 4.0]))
    x = torch.zeros(5, 1)
    assert torch.equal(model(x), torch.tensor([[0.0, 3.0, 4.0]]).expand(5, 3))
    images = model(torch.zeros(2, 1, 4, 4))
    assert images.shape == (2, 3, 4, 4) and torch.equal(images[:, 2], torch.full((2, 4, 4), 4.0))
    with pytest.raises(ValueError, match="num_context"):
        ConcatContext(nn.Identity(), 0)


def test_context_init_honours_the_contract_and_names_missing_parameters() -> None:
    model = ConcatContext(MLP((3, 4, 1)), 2).to(F64)
    report = check_part(ContextInit(), model=model)
    assert "differentiable" in report.rules
    with pytest.raises(ValueError, match="ConcatContext"):
        MetaKnowledge(MLP((1, 4, 1)), optimizer=InnerSGD(0.1), init=ContextInit())
