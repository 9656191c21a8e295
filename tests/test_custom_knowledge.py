"""The extension guide and its example: new parts pass the contract, broken ones are refused, the tutorial runs.

Covers ``examples/custom_knowledge.py`` (run end to end at its ``--smoke`` setting, and its
parts used directly) and ``docs/extending.md`` (every ``python`` block runs, every ``text``
block is output those blocks really print, every relative link points to a file).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from metalearn import MLP, MetaKnowledge, Sinusoid, meta_gradient, meta_train
from metalearn.knowledge import ContractError, check_part

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_knowledge.py"
GUIDE = ROOT / "docs" / "extending.md"
F64 = torch.float64


def _load_example():
    spec = importlib.util.spec_from_file_location("custom_knowledge_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


ck = _load_example()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the tutorial runs


def test_example_runs_at_its_smoke_setting(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    out = proc.stdout
    assert "LearnedLoss (module part) honours the part contract" in out
    assert "DecayingLayerLR (optimizer part) honours the part contract" in out
    assert "refused, as it should be -> InPlaceDecayingLayerLR breaks the part contract [pure]" in out
    assert "batching='auto' picks 'vmap'" in out
    gap = float(re.search(r"max difference (\S+) of the largest entry", out).group(1))
    assert gap < 1e-10
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in rows] == list(ck.METHODS)
    for row in rows:
        assert row["tasks"] == 50 and row["iterations"] == 20
        assert 0 < row["mse"] < 100 and row["ci95"] > 0
    assert "layers.4" in out and "learned loss: weight" in out  # what was learned is printed


# ---------------------------------------------------------------- the example's parts


def _learned_loss(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    loss = ck.LearnedLoss()
    with torch.no_grad():
        loss.logit.weight.normal_(0.0, 0.5, generator=_gen(seed))
    return loss


def test_the_example_parts_pass_check_part():
    output, target = torch.randn(2, 6, 1, generator=_gen(0), dtype=F64)
    report = check_part(_learned_loss(), inputs=(output, target), call=ck.loss_call)
    assert report.kind == "module"
    assert report.gradchecked == (
        "features.weight", "features.bias", "logit.weight", "logit.bias", "inputs[0]", "inputs[1]"
    )
    report = check_part(ck.DecayingLayerLR(lr=0.01, decay=0.8), steps=3)
    assert report.kind == "optimizer"
    assert {"log_lr.layer", "log_lr.head", "log_decay.layer", "log_decay.head"} <= set(report.gradchecked)


class ItemDecayingLayerLR(ck.DecayingLayerLR):
    """Broken: reads the learned step size as a Python float, so it never gets a meta-gradient."""

    def step(self, params, grads, state, step):
        return {n: p - self.step_size(n, step).item() * grads[n] for n, p in params.items()}, state


class StepCounter(ck.DecayingLayerLR):
    """Broken: counts steps on itself instead of using the `step` argument."""

    def __init__(self, lr: float) -> None:
        super().__init__(lr)
        self.calls = 0

    def step(self, params, grads, state, step):
        self.calls += 1
        return super().step(params, grads, state, self.calls - 1)


class NoisyLoss(nn.Module):
    """Broken: a loss that jitters the targets with torch's global generator."""

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        return (output - target - 0.01 * torch.randn_like(target)).square().mean()


class InPlaceLoss(nn.Module):
    """Broken: a loss that overwrites the model's output in place."""

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        return output.sub_(target).square().mean()


@pytest.mark.parametrize(
    ("part", "rule"),
    [
        (ck.InPlaceDecayingLayerLR(lr=0.01), "pure"),
        (ItemDecayingLayerLR(lr=0.01), "differentiable"),
        (StepCounter(lr=0.01), "no hidden state"),
        (NoisyLoss(), "explicit randomness"),
        (InPlaceLoss(), "pure"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else v,
)
def test_broken_variants_are_refused_by_check_part(part, rule):
    kwargs = {}
    if not isinstance(part, ck.DecayingLayerLR):
        kwargs = {"inputs": tuple(torch.randn(2, 6, 1, generator=_gen(1), dtype=F64)), "call": ck.loss_call}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # .item() on a tensor that requires grad warns
        with pytest.raises(ContractError) as info:
            check_part(part, **kwargs)
    assert info.value.rule == rule, str(info.value)


def test_learned_loss_starts_as_mse_and_is_symmetric_in_the_residual():
    output, target = torch.randn(2, 7, 1, generator=_gen(2))
    assert torch.allclose(ck.LearnedLoss()(output, target), (output - target).square().mean())
    loss = _learned_loss(3)
    r = torch.randn(7, 1, generator=_gen(4))
    assert torch.allclose(loss.weight(r, target), loss.weight(-r, target))
    w = loss.weight(10 * r, 10 * target)
    assert bool(((w > 0) & (w < 2)).all())


def test_decaying_step_size_is_lr_times_decay_to_the_step():
    part = ck.DecayingLayerLR(lr=0.1, decay=0.5)
    omega = MetaKnowledge(MLP((1, 4, 1)), optimizer=part)
    assert sorted(part.log_lr) == ["layers:0", "layers:2"]  # one pair per layer, weight and bias share it
    params = {n: p.detach() for n, p in omega.model_params().items()}
    grads = {n: torch.ones_like(p) for n, p in params.items()}
    new, state = part.step(params, grads, {}, 2)
    assert state == {}
    for n, p in params.items():
        torch.testing.assert_close(new[n], p - 0.1 * 0.5**2)


def test_loop_and_vmap_agree_with_both_parts_second_and_first_order():
    torch.manual_seed(0)
    omega = MetaKnowledge(MLP((1, 8, 1)), optimizer=ck.DecayingLayerLR(0.02, decay=0.7), loss=_learned_loss()).double()
    batch = Sinusoid(5, 5, seed=0).batch(range(3)).to(F64)
    for first_order in (False, True):
        grads = {}
        for mode in ("loop", "vmap"):
            omega.zero_grad(set_to_none=True)
            meta_gradient(omega, batch, inner_steps=2, first_order=first_order, batching=mode)
            grads[mode] = {n: p.grad.clone() for n, p in omega.named_parameters()}
        assert grads["loop"].keys() == {n for n, _ in omega.named_parameters()}  # every part got a gradient
        scale = max(g.abs().max() for g in grads["loop"].values())
        assert scale > 0
        for n, g in grads["loop"].items():
            assert (g - grads["vmap"][n]).abs().max() < 1e-10 * scale, n
        assert grads["loop"]["loss.logit.weight"].abs().sum() > 0  # the learned loss is meta-learned


def test_the_new_parts_resume_bit_identically(tmp_path):
    def make():
        torch.manual_seed(0)
        omega = MetaKnowledge(MLP((1, 8, 1)), optimizer=ck.DecayingLayerLR(0.02), loss=ck.LearnedLoss(4))
        return omega, torch.optim.Adam(omega.parameters(), lr=1e-2)

    tasks = Sinusoid(5, 5, seed=0, length=None)
    settings = {"inner_steps": 2, "meta_batch_size": 2, "progress": False}
    whole, opt = make()
    meta_train(whole, tasks, opt, steps=4, **settings)
    first, opt = make()
    meta_train(first, tasks, opt, steps=2, checkpoint_dir=tmp_path, **settings)
    resumed, opt = make()
    result = meta_train(resumed, tasks, opt, steps=4, checkpoint_dir=tmp_path, **settings)
    assert result.resumed_from == 2
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------- the guide


def _blocks(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", text, flags=re.S)]


def test_guide_code_runs_and_its_shown_output_is_real():
    blocks = _blocks(GUIDE.read_text(encoding="utf-8"))
    code = [body for lang, body in blocks if lang == "python"]
    shown = [body for lang, body in blocks if lang == "text"]
    assert len(code) >= 8 and len(shown) >= 5
    namespace: dict = {"__name__": "extending_guide"}
    printed = io.StringIO()
    torch.manual_seed(0)
    with warnings.catch_warnings(), contextlib.redirect_stdout(printed):
        warnings.simplefilter("ignore")
        for i, body in enumerate(code):
            exec(compile(body, f"docs/extending.md python block {i}", "exec"), namespace)  # noqa: S102
    out = printed.getvalue()
    for block in shown:
        for line in block.splitlines():
            if line.strip():
                assert line in out, f"the guide shows {line!r}, but its code printed:\n{out}"


def test_guide_links_point_to_files_that_exist():
    text = GUIDE.read_text(encoding="utf-8")
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    links = re.findall(r"\]\(([^)#]+)\)", prose)
    assert links
    for link in links:
        assert not link.startswith("http"), link
        assert (GUIDE.parent / link).resolve().exists(), link
    for path in re.findall(r"`((?:metalearn|tests|examples|docs)/[\w/.]+\.(?:py|md))`", text):
        assert (ROOT / path).exists(), path
