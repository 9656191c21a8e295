"""The DARTS-style searchable architecture: mixed ops, α as meta-parameters, derive for meta-test."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from metalearn.evaluate import evaluate, fine_tune
from metalearn.knowledge import (
    AdaptOnly,
    ArchitectureWeights,
    GaussianInit,
    InnerAdam,
    InnerSGD,
    MetaKnowledge,
    MomentumSGD,
    OptimizerMixture,
    ScaledInit,
    check_part,
    geometric_anneal,
    theta_parameters,
    with_architecture,
)
from metalearn.models import Conv4
from metalearn.models.searchable import DEFAULT_CANDIDATES, SEARCH_OPS, CellConvNet, MixedOp, SearchableConvNet, Zero
from metalearn.outer import meta_gradient, meta_loss
from metalearn.tasks import EpisodicTaskSet, TensorLabelledDataset
from metalearn.tasks.task import TaskBatch
from metalearn.train import meta_train

F64 = torch.float64


# ---------------------------------------------------------------- helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _net(cells=2, image_size=8, hidden=3, seed=0, alpha_scale=0.5, num_classes=3, dtype=F64) -> SearchableConvNet:
    """A searchable net whose weights and α come from an explicit generator."""
    model = SearchableConvNet(num_classes, hidden=hidden, cells=cells, image_size=image_size).to(dtype)
    g = _gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name == "stem.1.weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g, dtype=dtype))
            else:
                p.copy_(0.4 * torch.randn(p.shape, generator=g, dtype=dtype))
        alpha = model.architecture.logits
        alpha.copy_(alpha_scale * torch.randn(alpha.shape, generator=g, dtype=dtype))
    return model


def _batch(n_tasks=2, ways=3, shots=2, image_size=8, seed=1) -> TaskBatch:
    g = _gen(seed)

    def half():
        x = torch.randn(n_tasks, ways * shots, 1, image_size, image_size, generator=g, dtype=F64)
        y = torch.arange(ways).repeat_interleave(shots).expand(n_tasks, -1).clone()
        return x, y

    return TaskBatch(train=half(), val=half())


def _omega(model, optimizer=None, **kwargs) -> MetaKnowledge:
    return with_architecture(MetaKnowledge(model, optimizer=optimizer or InnerSGD(0.3), **kwargs))


def _grads(omega, batch, batching, steps=2, seed=0):
    omega.zero_grad(set_to_none=True)
    meta_gradient(omega, batch, steps, batching=batching, generator=_gen(seed))
    return {n: p.grad.clone() for n, p in omega.named_parameters() if p.grad is not None}


def _assert_loop_equals_vmap(omega, batch, steps=2, every_parameter=True):
    loop, vm = _grads(omega, batch, "loop", steps), _grads(omega, batch, "vmap", steps)
    assert set(loop) == set(vm)
    if every_parameter:
        assert set(loop) == {n for n, p in omega.named_parameters() if p.requires_grad}
    scale = max(g.abs().max().item() for g in loop.values())
    for n in loop:
        err = (loop[n] - vm[n]).abs().max().item()
        assert err <= 1e-10 * max(scale, 1.0), f"{n}: loop vs vmap differ by {err:.3g}"
    return loop


def _tiny_tasks(seed: int, length: int, image_size=8, classes=6, per_class=6, dtype=F64) -> EpisodicTaskSet:
    """3-way 2-shot 2-query tasks over random images (the inputs keep ``dtype``)."""
    g = _gen(100 + seed)
    inputs = torch.randn(classes * per_class, 1, image_size, image_size, generator=g, dtype=dtype)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return EpisodicTaskSet(TensorLabelledDataset(inputs, labels), ways=3, shots=2, queries=2, seed=seed, length=length)


def _extreme(model: SearchableConvNet, ops: list[str]) -> None:
    """Drives α to one-hot on ``ops``: logits +1e4 on the chosen op, -1e4 elsewhere."""
    arch = model.architecture
    with torch.no_grad():
        arch.logits.fill_(-1e4)
        for e, name in enumerate(ops):
            arch.logits[e, arch.candidates.index(name)] = 1e4


# ---------------------------------------------------------------- ops and shapes


def test_mixed_op_is_the_weighted_sum_of_its_candidates():
    op = MixedOp(3).to(F64)
    x = torch.randn(4, 3, 6, 6, generator=_gen(0), dtype=F64)
    w = torch.softmax(torch.randn(5, generator=_gen(1), dtype=F64), 0)
    expected = sum(w[i] * op.ops[name](x) for i, name in enumerate(DEFAULT_CANDIDATES))
    torch.testing.assert_close(op(x, w), expected, rtol=0, atol=1e-14)
    assert op.candidates == DEFAULT_CANDIDATES
    for i, name in enumerate(DEFAULT_CANDIDATES):  # an int runs that op alone
        assert torch.equal(op(x, i), op.ops[name](x))
    assert torch.equal(op(x, DEFAULT_CANDIDATES.index("zero")), torch.zeros_like(x))
    with pytest.raises(ValueError, match="weights of shape"):
        op(x, w[:3])


def test_mixed_op_stride_and_candidate_validation():
    op = MixedOp(2, ("conv3x3", "conv5x5", "maxpool3x3", "avgpool3x3", "zero"), stride=2)
    x = torch.randn(1, 2, 7, 7, generator=_gen(0))
    for i in range(5):
        assert op(x, i).shape == (1, 2, 4, 4)
    assert op(x, torch.full((5,), 0.2)).shape == (1, 2, 4, 4)
    with pytest.raises(ValueError, match="'skip' op is the identity"):
        MixedOp(2, ("skip",), stride=2)
    with pytest.raises(ValueError, match="unknown candidate ops"):
        MixedOp(2, ("conv3x3", "conv7x7"))
    with pytest.raises(ValueError, match="distinct"):
        MixedOp(2, ("skip", "skip"))
    with pytest.raises(TypeError, match="not a string"):
        MixedOp(2, "conv3x3")
    custom = MixedOp(2, ("conv1x1", "skip"), op_factories={**SEARCH_OPS, "conv1x1": lambda c, s: nn.Conv2d(c, c, 1)})
    assert custom(x, torch.tensor([0.5, 0.5])).shape == x.shape


def test_searchable_net_shapes_and_alpha_kept_out_of_theta():
    model = SearchableConvNet(num_classes=5, hidden=4, cells=3, image_size=16)
    assert model(torch.randn(6, 1, 16, 16)).shape == (6, 5)
    assert model.feature_size == 4 * 2 * 2
    assert model.architecture.logits.shape == (3, len(DEFAULT_CANDIDATES))
    # α are a registered submodule's parameters, and θ's filter leaves them out
    assert "architecture.logits" in dict(model.named_parameters())
    assert "architecture" in dict(model.named_children())
    names = list(theta_parameters(model))
    assert not any("logits" in n or "architecture" in n for n in names)
    assert "cells.2.op.ops.conv5x5.weight" in names
    assert all(p is not model.architecture.logits for p in theta_parameters(model).values())
    # α follow the model's dtype
    model.to(F64)
    assert model.architecture.logits.dtype == F64
    assert SearchableConvNet(0, hidden=4, cells=2, image_size=8)(torch.randn(2, 1, 8, 8)).shape == (2, 16)
    with pytest.raises(ValueError, match="too small"):
        SearchableConvNet(5, hidden=4, cells=4, image_size=8)
    with pytest.raises(ValueError, match="edges"):
        SearchableConvNet(5, cells=2, image_size=8, architecture=ArchitectureWeights(3, DEFAULT_CANDIDATES))


def test_architecture_weights_temperature_fix_and_state_dict():
    arch = ArchitectureWeights(2, ("conv3x3", "skip", "zero"), temperature=2.0, never_chosen=()).to(F64)
    with torch.no_grad():
        arch.logits.copy_(torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 3.0]], dtype=F64))
    torch.testing.assert_close(arch.weights(), torch.softmax(arch.logits / 2.0, -1), rtol=0, atol=0)
    assert [c.name for c in arch.chosen()] == ["skip", "zero"]
    arch.anneal = geometric_anneal(2.0, 0.5, 10)
    assert arch.set_outer_step(10) == pytest.approx(0.5) and arch.temperature == pytest.approx(0.5)

    assert arch.fix() == ["skip", "zero"] and arch.fixed == ["skip", "zero"]
    assert torch.equal(arch.weights(), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64))
    assert arch.edge_weights() == [1, 2]
    restored = ArchitectureWeights(2, ("conv3x3", "skip", "zero"), never_chosen=()).to(F64)
    restored.load_state_dict(arch.state_dict())
    assert restored.fixed == ["skip", "zero"] and restored.temperature == pytest.approx(0.5)
    arch.unfix()
    assert arch.fixed is None and len(arch.edge_weights()) == 2
    assert arch.fix(["conv3x3", "conv3x3"]) == ["conv3x3", "conv3x3"]
    with pytest.raises(ValueError, match="one op name per edge"):
        arch.fix(["skip"])
    with pytest.raises(ValueError, match="unknown ops"):
        arch.fix(["skip", "maxpool3x3"])
    with pytest.raises(ValueError, match="positive"):
        arch.set_temperature(0.0)


def test_the_zero_op_is_never_chosen_by_default():
    """DARTS derives without the zero op: a chain with a zero cell would output a constant."""
    arch = ArchitectureWeights(3, ("conv3x3", "skip", "zero"))
    assert arch.never_chosen == ("zero",)
    with torch.no_grad():
        arch.logits.copy_(torch.tensor([[0.0, 1.0, 5.0], [2.0, 0.0, 3.0], [0.0, 1.0, 0.5]]))
    chosen = arch.chosen()
    assert [c.name for c in chosen] == ["skip", "conv3x3", "skip"]
    assert chosen[0].weights["zero"] > 0.9  # its weight is still reported
    assert arch.fix() == ["skip", "conv3x3", "skip"]
    arch.unfix()
    assert arch.fix(["zero", "skip", "skip"]) == ["zero", "skip", "skip"]  # an explicit choice may name it
    assert ArchitectureWeights(1, ("conv3x3", "skip")).never_chosen == ()  # no zero among the candidates
    only_skip = ArchitectureWeights(1, ("conv3x3", "skip", "zero"), never_chosen=("conv3x3", "zero"))
    assert [c.name for c in only_skip.chosen()] == ["skip"]
    for bad in (("maxpool3x3",), ("conv3x3", "skip", "zero"), "zero"):
        with pytest.raises(ValueError, match="never_chosen"):
            ArchitectureWeights(1, ("conv3x3", "skip", "zero"), never_chosen=bad)


# ---------------------------------------------------------------- derive


@pytest.mark.parametrize(
    "ops",
    [
        ["conv5x5", "maxpool3x3", "skip", "zero"],
        ["conv3x3", "conv3x3", "conv5x5", "skip"],
        ["skip", "zero", "maxpool3x3", "conv3x3"],
    ],
)
def test_derived_net_equals_searchable_net_at_one_hot_alpha(ops):
    model = _net(cells=4, image_size=16)
    model.architecture.never_chosen = ()  # these cases derive the zero op too
    _extreme(model, ops)
    assert model.chosen_ops() == ops
    x = torch.randn(5, 1, 16, 16, generator=_gen(3), dtype=F64)
    derived = model.derive()
    assert isinstance(derived, CellConvNet) and derived.ops == tuple(ops)
    assert not any("logits" in n for n, _ in derived.named_parameters())
    assert torch.equal(derived(x), model(x))  # exact in float64

    # from another θ (e.g. fine-tuned): derive(params) and derive_params agree with functional_call
    g = _gen(4)
    theta = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g, dtype=F64) for n, p in model.named_parameters()}
    expected = functional_call(model, theta, (x,))
    assert torch.equal(model.derive(theta)(x), expected)
    assert torch.equal(functional_call(derived, model.derive_params(theta), (x,)), expected)

    state = model.derive_state()
    assert set(state) == {n for n, _ in derived.named_parameters()}
    for i, op in enumerate(ops):
        if op.startswith("conv"):
            assert state[f"cells.{i}.op.weight"] == f"cells.{i}.op.ops.{op}.weight"
    assert state["head.weight"] == "head.weight"
    # the derived net's parameters are fresh leaves, not the searchable model's tensors
    assert all(p.is_leaf and p.requires_grad for p in derived.parameters())
    with torch.no_grad():
        derived.head.weight.add_(1.0)
    assert not torch.equal(derived.head.weight, model.head.weight)


def test_fixed_architecture_runs_the_derived_function():
    model = _net(cells=2)
    x = torch.randn(4, 1, 8, 8, generator=_gen(2), dtype=F64)
    soft = model(x)
    ops = model.architecture.fix()
    assert torch.equal(model(x), model.derive()(x))
    assert not torch.equal(model(x), soft)
    assert model.chosen_ops() == ops
    with pytest.raises(ValueError, match="not candidates"):
        model.derive(ops=["conv3x3", "avgpool3x3"])
    with pytest.raises(KeyError, match="lacks"):
        model.derive_params({"head.weight": model.head.weight})


# ---------------------------------------------------------------- meta-gradients


def test_meta_knowledge_registers_alpha_as_meta_parameters():
    model = _net()
    plain = MetaKnowledge(model, optimizer=InnerSGD(0.3))
    assert any(p is model.architecture.logits for p in plain.parameters())  # registered on construction
    assert all(p is not model.architecture.logits for p in plain.model_params().values())  # but never θ
    omega = with_architecture(plain)
    assert omega is plain and omega.architecture is model.architecture
    names = dict(omega.named_parameters())
    assert names["architecture.logits"] is model.architecture.logits
    assert sum(p is model.architecture.logits for p in omega.parameters()) == 1  # once
    assert "architecture.logits" in omega.state_dict() and "architecture.fixed_index" in omega.state_dict()
    assert not any("logits" in n for n in omega.adapted_names + omega.static_names)  # never θ
    assert with_architecture(omega) is omega  # idempotent
    with pytest.raises(ValueError, match="no architecture weights"):
        with_architecture(MetaKnowledge(Conv4(3, hidden=4, image_size=16), optimizer=InnerSGD(0.1)))


def test_alpha_meta_gradient_loop_and_vmap_agree():
    omega = _omega(_net())
    grads = _assert_loop_equals_vmap(omega, _batch())
    g = grads["architecture.logits"]
    assert bool(torch.isfinite(g).all()) and bool((g != 0).all()), g


def test_alpha_meta_gradient_matches_finite_differences():
    omega = _omega(_net())
    batch = _batch()
    alpha = omega.architecture.logits

    def objective():
        return meta_loss(omega, batch, 2, batching="loop")

    (grad,) = torch.autograd.grad(objective(), [alpha])
    h = 1e-6
    for e, i in [(0, 0), (0, 3), (1, 2), (1, 4)]:
        with torch.no_grad():
            orig = alpha[e, i].item()
            alpha[e, i] = orig + h
            up = objective().item()
            alpha[e, i] = orig - h
            down = objective().item()
            alpha[e, i] = orig
        fd = (up - down) / (2 * h)
        an = grad[e, i].item()
        assert an != 0
        assert abs(fd - an) <= 1e-9 + 1e-5 * abs(an), f"α[{e},{i}]: autograd {an:.10g} vs FD {fd:.10g}"


def test_op_weights_may_stay_static_as_part_of_omega():
    """AdaptOnly("head"): op weights, stem and norms are meta-learned only; α still learned."""
    omega = _omega(_net(), adapt=AdaptOnly("head"))
    assert omega.adapted_names == ["head.weight", "head.bias"]
    assert "cells.0.op.ops.conv3x3.weight" in omega.static_names
    grads = _assert_loop_equals_vmap(omega, _batch())
    for name in ("architecture.logits", "model.cells.0.op.ops.conv5x5.weight", "model.stem.0.weight"):
        assert bool(torch.isfinite(grads[name]).all()) and grads[name].abs().max() > 0, name
    # the static op weights are passed through the inner loop unchanged
    x, y = _batch().train
    theta = fine_tune(omega, (x[0], y[0]), inner_steps=2).params
    assert torch.equal(theta["cells.1.op.ops.conv3x3.weight"], omega.model.cells[1].op.ops.conv3x3.weight)
    assert not torch.equal(theta["head.weight"], omega.model.head.weight)


def test_alpha_learned_with_an_init_that_redraws_theta():
    """ScaledInit keeps the model's weights out of ω; α (not θ) stay meta-parameters."""
    omega = _omega(_net(), init=ScaledInit())
    names = {n for n, p in omega.named_parameters() if p.requires_grad}
    assert "architecture.logits" in names and not any(n.startswith("model.") for n in names)
    # (ScaledInit's shifts of the bias-free convs are unused: no gradient, so not every parameter)
    grads = _assert_loop_equals_vmap(omega, _batch(), every_parameter=False)
    assert bool((grads["architecture.logits"] != 0).all())


def test_gaussian_init_optimizer_mixture_and_searchable_net_meta_train_together():
    """The issue's combined ω: a learned init distribution, a learned choice of inner rule
    and a searchable architecture, meta-trained together; every meta-parameter moves."""
    model = _net(image_size=8)
    mixture = OptimizerMixture(
        {"sgd": InnerSGD(0.1), "momentum": MomentumSGD(0.1, momentum=0.5), "adam": InnerAdam(0.01, betas=(0.5, 0.6))}
    )
    omega = _omega(model, optimizer=mixture, init=GaussianInit(init_scale=0.05))
    groups = {n.split(".")[0] for n, _ in omega.named_parameters()}
    assert groups == {"model", "init", "optimizer", "architecture"}
    assert not any("architecture" in n or "logits" in n for n in omega.init.log_scale)  # α never sampled
    before = {n: p.detach().clone() for n, p in omega.named_parameters()}
    outer = torch.optim.Adam(omega.parameters(), lr=1e-3)
    tasks = _tiny_tasks(seed=0, length=8)
    result = meta_train(omega, tasks, outer, steps=3, inner_steps=2, meta_batch_size=2, progress=False, batching="loop")
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(r["meta_loss"])) for r in result.history)
    for name, p in omega.named_parameters():  # .grad is the last step's meta-gradient
        assert p.grad is not None, f"{name} received no meta-gradient"
        assert bool(torch.isfinite(p.grad).all()), name
        assert p.grad.abs().max() > 0, f"{name} received a zero meta-gradient"
        assert not torch.equal(p.detach(), before[name]), f"{name} was not updated"
    # the same meta-gradient on the vmap path (a sampled θ0, identical for both paths)
    batch = tasks.batch([0, 1])
    loop = _grads(omega, batch, "loop", seed=5)
    vm = _grads(omega, batch, "vmap", seed=5)
    scale = max(g.abs().max().item() for g in loop.values())
    for n in loop:
        assert (loop[n] - vm[n]).abs().max().item() <= 1e-10 * max(scale, 1.0), n


# ---------------------------------------------------------------- search, derive, evaluate


def test_search_then_derive_then_evaluate():
    model = _net(hidden=4, alpha_scale=0.0, dtype=torch.float32)
    omega = _omega(model, optimizer=InnerSGD(0.3))
    outer = torch.optim.Adam(omega.parameters(), lr=0.05)
    source = _tiny_tasks(seed=1, length=16, dtype=torch.float32)
    target = _tiny_tasks(seed=2, length=6, dtype=torch.float32)
    alpha0 = model.architecture.logits.detach().clone()
    meta_train(omega, source, outer, steps=4, inner_steps=1, meta_batch_size=4, progress=False)
    assert not torch.equal(model.architecture.logits, alpha0)  # the search moved α
    ops = model.chosen_ops()
    assert len(ops) == 2 and all(o in DEFAULT_CANDIDATES for o in ops)

    # meta-test the derived plain network (weights carried over) ...
    derived = MetaKnowledge(model.derive(), optimizer=InnerSGD(0.3))
    ev_derived = evaluate(derived, target, inner_steps=2, batch_size=3)
    assert ev_derived.n == 6 and 0.0 <= ev_derived.mean <= 1.0
    # ... or the searchable ω itself with its choice fixed: the same function, the same results
    model.architecture.fix()
    ev_fixed = evaluate(omega, target, inner_steps=2, batch_size=3)
    assert torch.equal(ev_fixed.per_task_loss, ev_derived.per_task_loss)
    assert torch.equal(ev_fixed.per_task, ev_derived.per_task)


# ---------------------------------------------------------------- part contract


def test_architecture_weights_honour_the_part_contract():
    op = MixedOp(2, ("conv3x3", "maxpool3x3", "skip", "zero")).to(F64)
    with torch.no_grad():
        op.ops.conv3x3.weight.copy_(torch.randn(op.ops.conv3x3.weight.shape, generator=_gen(0), dtype=F64))
    arch = ArchitectureWeights(1, op.candidates, temperature=0.7)
    with torch.no_grad():
        arch.logits.copy_(torch.randn(1, 4, generator=_gen(1)))

    def call(part, inputs, generator):
        return op(inputs[0], part.edge_weights()[0])

    x = torch.randn(2, 2, 4, 4, generator=_gen(2), dtype=F64)
    report = check_part(arch, call=call, inputs=(x,))
    assert report.gradchecked[0] == "logits" and "inputs[0]" in report.gradchecked
    assert isinstance(op.ops.zero, Zero)


# ---------------------------------------------------------------- registered α: dtype, order, checkpoints


@pytest.mark.parametrize("init", [None, "scaled"])
def test_registered_alpha_keeps_omega_order_keys_and_loads(init):
    """α are the model's registered submodule but ω lists them once, last, as ``architecture.*`` (as before)."""
    kwargs = {"init": ScaledInit()} if init else {}
    omega = _omega(_net(), **kwargs)
    names = [n for n, _ in omega.named_parameters()]
    assert names[-1] == "architecture.logits" and not any(n.startswith("model.architecture") for n in names)
    keys = list(omega.state_dict())
    assert not any(k.startswith("model.architecture") for k in keys)
    assert {"architecture.logits", "architecture.fixed_index", "architecture.temperature_saved"} <= set(keys)
    assert not any(n.startswith("model.architecture") for n, _ in omega.named_buffers())
    with torch.no_grad():
        omega.architecture.logits.normal_()
    omega.architecture.fix()
    other = _omega(_net(), **kwargs)
    other.load_state_dict(omega.state_dict())  # strict
    assert torch.equal(other.model.architecture.logits, omega.architecture.logits)
    assert other.architecture.fixed == omega.architecture.fixed
    omega.double()  # no _apply override needed: α are reached as a submodule
    assert omega.architecture.logits.dtype == F64 and omega.model.architecture is omega.architecture


def test_soft_choice_single_and_rows():
    from metalearn.knowledge import SoftChoice

    one = SoftChoice(["sgd", "adam"], temperature=2.0)
    assert one.logits.shape == (2,) and one.fixed_index.shape == ()
    torch.testing.assert_close(one.probabilities(), torch.full((2,), 0.5))
    assert one.fix("adam") == "adam" and one.fixed == "adam"
    assert one.weights().tolist() == [0.0, 1.0] and one.chosen().name == "adam"
    state = one.state_dict()
    fresh = SoftChoice(["sgd", "adam"])
    fresh.load_state_dict(state)
    assert fresh.fixed == "adam" and fresh.temperature == 2.0
    one.unfix()
    assert one.fixed is None
    rows = SoftChoice(["a", "b", "zero"], rows=2, never_chosen=("zero",))
    with torch.no_grad():
        rows.logits[0] = torch.tensor([0.0, 1.0, 5.0])
    assert rows.chosen_indices() == [1, 0]  # the argmax skips never_chosen
    assert rows.fix() == ["b", "a"] and rows.fix(["zero", "a"]) == ["zero", "a"]
    with pytest.raises(ValueError, match="one name per row"):
        rows.fix(["a"])
    with pytest.raises(ValueError, match="unknown candidates"):
        one.fix("rmsprop")
    with pytest.raises(ValueError, match="distinct"):
        SoftChoice(["a", "a"])
