"""Prototype heads as ω: ProtoNets (zero steps) and Proto-MAML through the ordinary adapt/evaluate API."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metalearn import evaluate, meta_train
from metalearn.inner import adapt
from metalearn.knowledge import InnerSGD, MetaKnowledge, PointInit, PrototypeInit, maml, proto_maml, protonet
from metalearn.knowledge.heads import prototype_head
from metalearn.models import Conv4
from metalearn.outer import meta_gradient, meta_loss
from metalearn.tasks import EpisodicTaskSet, Task, TaskBatch, TensorLabelledDataset

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 3


def _model(seed: int = 0, ways: int = WAYS) -> Conv4:
    torch.manual_seed(seed)  # model construction only; every test draws data from explicit generators
    return Conv4(num_classes=ways, in_channels=1, hidden=4, image_size=16).double()


def _labels(tasks: int, per_class: int, gen: torch.Generator) -> torch.Tensor:
    base = torch.arange(WAYS).repeat_interleave(per_class)
    return torch.stack([base[torch.randperm(base.numel(), generator=gen)] for _ in range(tasks)])


def _batch(seed: int = 0, tasks: int = TASKS) -> TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    x_tr = torch.randn(tasks, WAYS * SHOTS, 1, 16, 16, generator=gen, dtype=torch.float64)
    x_val = torch.randn(tasks, WAYS * QUERIES, 1, 16, 16, generator=gen, dtype=torch.float64)
    return TaskBatch(train=(x_tr, _labels(tasks, SHOTS, gen)), val=(x_val, _labels(tasks, QUERIES, gen)))


def _tasks(batch: TaskBatch) -> list[Task]:
    (x_tr, y_tr), (x_val, y_val) = batch.train, batch.val
    return [Task(train=(x_tr[i], y_tr[i]), val=(x_val[i], y_val[i])) for i in range(len(batch))]


def _embed(omega: MetaKnowledge, x: torch.Tensor) -> torch.Tensor:
    body = {n[len("features."):]: p for n, p in omega.model_params().items() if n.startswith("features.")}
    return functional_call(omega.model.features, body, (x,))


def _grads(omega: MetaKnowledge) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in omega.named_parameters() if p.grad is not None}


def test_zero_steps_is_the_protonet_classifier():
    omega = protonet(_model())
    batch = _batch()
    for i, task in enumerate(_tasks(batch)):
        params = adapt(omega, task.train, inner_steps=0).params
        logits = omega(params, task.val[0])
        f_val, f_train = _embed(omega, task.val[0]), _embed(omega, task.train[0])
        prototypes = torch.stack([f_train[task.train[1] == k].mean(0) for k in range(WAYS)])
        sq_dist = torch.cdist(f_val, prototypes).square()
        # exactly -||f - c_k||² up to the per-example constant ||f||², so the same softmax
        torch.testing.assert_close(logits, -sq_dist + f_val.square().sum(-1, keepdim=True), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(logits.softmax(-1), (-sq_dist).softmax(-1), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(logits.softmax(-1)[0], torch.full((WAYS,), 1 / WAYS, dtype=torch.float64)), i


def test_prototype_head_matches_class_means():
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 6, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 0, 1, 1, 0]])
    w, b = prototype_head(emb, y, 3)
    for t in range(2):
        for k in range(3):
            c = emb[t][y[t] == k].mean(0)
            torch.testing.assert_close(w[t, k], 2 * c)
            torch.testing.assert_close(b[t, k], -c.square().sum())


def test_model_head_is_not_a_meta_parameter_and_is_unused():
    omega = protonet(_model())
    head = omega.model.head
    assert not head.weight.requires_grad and not head.bias.requires_grad
    batch = _batch()
    before = omega.initial_params(TASKS, None, train=batch.train)
    with torch.no_grad():
        head.weight.add_(1.0)
        head.bias.sub_(2.0)
    after = omega.initial_params(TASKS, None, train=batch.train)
    for n in before:
        torch.testing.assert_close(before[n], after[n], rtol=0, atol=0)
    meta_gradient(omega, batch, inner_steps=0, batching="loop")
    assert head.weight.grad is None and head.bias.grad is None
    assert all(p.grad is not None for n, p in omega.model.named_parameters() if n.startswith("features."))


def _directional_fd_check(omega: MetaKnowledge, batch: TaskBatch, steps: int, seed: int) -> None:
    omega.zero_grad(set_to_none=True)
    meta_gradient(omega, batch, steps, batching="loop")
    params = [p for p in omega.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    scale = torch.cat([g.flatten() for g in grads]).abs().max()
    gen = torch.Generator().manual_seed(seed)
    eps = 1e-6
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        norm = torch.sqrt(sum(d.square().sum() for d in direction))
        direction = [d / norm for d in direction]  # a unit step: batch norm on few examples is strongly curved
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(eps * d)
            plus = float(meta_loss(omega, batch, steps, batching="loop"))
            for p, d in zip(params, direction, strict=True):
                p.sub_(2 * eps * d)
            minus = float(meta_loss(omega, batch, steps, batching="loop"))
            for p, d in zip(params, direction, strict=True):
                p.add_(eps * d)
        numeric = (plus - minus) / (2 * eps)
        analytic = float(sum((g * d).sum() for g, d in zip(grads, direction, strict=True)))
        assert abs(numeric - analytic) <= 1e-5 * float(scale), (numeric, analytic)


def test_protonet_meta_gradient_matches_finite_differences():
    omega = protonet(_model(1))
    batch = _batch(2)
    _directional_fd_check(omega, batch, steps=0, seed=3)
    body = [p.grad for n, p in omega.model.named_parameters() if n.startswith("features.0.")]
    assert all(g is not None and float(g.abs().max()) > 0 for g in body)  # flows through the prototypes


def test_proto_maml_meta_gradient_matches_finite_differences():
    omega = proto_maml(_model(2), lr=0.1)
    _directional_fd_check(omega, _batch(4), steps=1, seed=5)


@pytest.mark.parametrize("make, steps", [(protonet, 0), (lambda m: proto_maml(m, 0.1), 2),
                                         (lambda m: proto_maml(m, 0.1, adapt_all=False), 2)])
def test_loop_and_vmap_meta_gradients_agree(make, steps):
    batch = _batch(6)
    results = {}
    for batching in ("loop", "vmap"):
        omega = make(_model(3))
        stats = meta_gradient(omega, batch, steps, batching=batching)
        results[batching] = (stats.meta_loss, _grads(omega))
    (loss_l, g_l), (loss_v, g_v) = results["loop"], results["vmap"]
    assert abs(loss_l - loss_v) <= 1e-10
    assert g_l.keys() == g_v.keys() and g_l
    scale = max(float(g.abs().max()) for g in g_l.values())
    for n in g_l:
        assert float((g_l[n] - g_v[n]).abs().max()) <= 1e-10 * max(scale, 1.0), n


def test_embedding_loop_and_vmap_give_the_same_theta0():
    batch = _batch(7)
    thetas = []
    for batching in ("vmap", "loop"):
        omega = MetaKnowledge(_model(4), optimizer=InnerSGD(0.1), init=PrototypeInit(batching=batching))
        thetas.append(omega.initial_params(TASKS, None, train=batch.train))
    for n in thetas[0]:
        torch.testing.assert_close(thetas[0][n], thetas[1][n], rtol=0, atol=1e-10)
    # batch norm statistics are per task: task 0's head does not depend on task 1's inputs
    other = _batch(8)
    mixed = (torch.cat([batch.train[0][:1], other.train[0][1:]]), torch.cat([batch.train[1][:1], other.train[1][1:]]))
    theta = omega.initial_params(TASKS, None, train=mixed)
    torch.testing.assert_close(theta["head.weight"][0], thetas[1]["head.weight"][0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [0, 3])
def test_evaluate_zero_and_k_steps(steps):
    omega = proto_maml(_model(5), lr=0.1)
    tasks = _tasks(_batch(9, tasks=4))
    loop = evaluate(omega, tasks, steps, batch_size=3, batching="loop")
    vmapped = evaluate(omega, tasks, steps, batch_size=3, batching="vmap")
    assert loop.n == 4 and loop.metric == "accuracy"
    torch.testing.assert_close(loop.per_task_loss, vmapped.per_task_loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(loop.per_task, vmapped.per_task)
    if steps == 0:  # nearest-prototype accuracy, computed by hand
        for i, task in enumerate(tasks):
            f_val, f_train = _embed(omega, task.val[0]), _embed(omega, task.train[0])
            prototypes = torch.stack([f_train[task.train[1] == k].mean(0) for k in range(WAYS)])
            pred = torch.cdist(f_val, prototypes).argmin(-1)
            assert float(loop.per_task[i]) == pytest.approx(float((pred == task.val[1]).double().mean()))


def test_meta_train_protonet_runs_and_improves():
    gen = torch.Generator().manual_seed(10)
    classes, per_class = 12, 8
    means = 2 * torch.randn(classes, 1, 16, 16, generator=gen, dtype=torch.float64)
    inputs = means.repeat_interleave(per_class, 0) + torch.randn(classes * per_class, 1, 16, 16, generator=gen,
                                                                 dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(per_class)
    tasks = EpisodicTaskSet(TensorLabelledDataset(inputs, labels), WAYS, SHOTS, QUERIES, seed=0, length=64)
    omega = protonet(_model(6))
    opt = torch.optim.Adam([p for p in omega.parameters() if p.requires_grad], lr=1e-2)
    held_out = [tasks[i] for i in range(8)]
    before = evaluate(omega, held_out, 0)
    result = meta_train(omega, tasks, opt, steps=12, inner_steps=0, meta_batch_size=4, progress=False,
                        val_every=1000)
    after = evaluate(omega, held_out, 0)
    losses = [row["meta_loss"] for row in result.history]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert float(after.per_task_loss.mean()) < float(before.per_task_loss.mean())


def test_errors_tell_the_fix():
    omega = protonet(_model())
    batch = _batch()
    with pytest.raises(ValueError, match="train=\\(x, y\\)"):
        omega.initial_params(TASKS, None)
    x, y = batch.train
    with pytest.raises(ValueError, match="num_classes"):
        omega.initial_params(TASKS, None, train=(x, y + 1))
    with pytest.raises(ValueError, match="no train example of classes \\[2\\]"):
        omega.initial_params(TASKS, None, train=(x, y.clamp(max=1)))
    with pytest.raises(ValueError, match="leading task dimension"):
        omega.initial_params(TASKS + 1, None, train=(x, y))

    class NoFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="features"):
        MetaKnowledge(NoFeatures(), optimizer=InnerSGD(0.1), init=PrototypeInit())
    with pytest.raises(ValueError, match="nn.Linear with a bias"):
        MetaKnowledge(Conv4(num_classes=0, hidden=2, image_size=16), optimizer=InnerSGD(0.1), init=PrototypeInit())


def test_other_inits_are_called_without_train():
    calls = []

    class Recording(PointInit):
        def initial_params(self, model_params, n_tasks, generator):  # the old signature, unchanged
            calls.append(n_tasks)
            return super().initial_params(model_params, n_tasks, generator)

    omega = MetaKnowledge(_model(), optimizer=InnerSGD(0.1), init=Recording())
    batch = _batch()
    for batching in ("loop", "vmap"):
        meta_gradient(omega, batch, inner_steps=1, batching=batching)
    evaluate(omega, _tasks(batch), 1, batching="vmap")
    assert calls == [TASKS, TASKS, 1, 1, 1]
    assert maml(_model(), lr=0.1).init.uses_train_data is False


def test_prototype_init_honours_the_part_contract_on_conv4():
    from metalearn.knowledge import check_part

    batch = _batch(11, tasks=2)
    report = check_part(PrototypeInit(), model=_model(), inputs=batch.train)
    assert "model.features.0.weight" in report.gradchecked
    with pytest.raises(TypeError, match="inputs=\\(x, y\\)"):
        check_part(PrototypeInit(), model=_model())


def test_fine_tune_and_checkpointed_mode_use_the_prototypes():
    from metalearn import fine_tune

    omega = proto_maml(_model(7), lr=0.1)
    batch = _batch(12)
    task = _tasks(batch)[0]
    params = fine_tune(omega, task.train, inner_steps=0).params
    f_train = _embed(omega, task.train[0])
    prototypes = torch.stack([f_train[task.train[1] == k].mean(0) for k in range(WAYS)])
    torch.testing.assert_close(params["head.weight"], 2 * prototypes.detach(), rtol=1e-10, atol=1e-12)
    meta_gradient(omega, batch, inner_steps=2, batching="loop")
    unrolled = _grads(omega)
    omega.zero_grad(set_to_none=True)
    meta_gradient(omega, batch, inner_steps=2, mode="checkpointed")
    for n, g in _grads(omega).items():
        torch.testing.assert_close(g, unrolled[n], rtol=1e-8, atol=1e-10)
