"""benchmarks/meta_iteration.py's paired_ratio: the float32 parity verdict from rounds run side by side."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def paired_ratio():
    spec = importlib.util.spec_from_file_location("meta_iteration_bench", ROOT / "benchmarks" / "meta_iteration.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module.paired_ratio


def test_a_constant_ratio_is_resolved_exactly(paired_ratio) -> None:
    out = paired_ratio([110.0, 220.0, 330.0], [100.0, 200.0, 300.0])
    assert out["pairs"] == 3
    assert out["ratio"] == pytest.approx(1.1) and out["low"] == pytest.approx(1.1) and out["high"] == pytest.approx(1.1)


def test_the_interval_is_students_t_on_the_log_ratios(paired_ratio) -> None:
    ours, theirs = [105.0, 96.0, 101.0, 99.0], [100.0, 100.0, 100.0, 100.0]
    logs = [math.log(a / b) for a, b in zip(ours, theirs, strict=True)]
    mean = sum(logs) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / 3)
    half = 3.182 * sd / 2  # t(0.975, 3 degrees of freedom) * sd / sqrt(4)
    out = paired_ratio(ours, theirs)
    assert out["ratio"] == pytest.approx(math.exp(mean))
    assert (out["low"], out["high"]) == (pytest.approx(math.exp(mean - half)), pytest.approx(math.exp(mean + half)))
    assert out["low"] < 1.0 < out["high"]  # a few % either way over 4 rounds: not told apart


def test_drift_shared_by_both_contenders_cancels(paired_ratio) -> None:
    """The machine slows down over the run; each round's pair shares it, so the ratio stays resolved."""
    drift = [1.0, 1.3, 0.8, 1.5, 1.1]
    out = paired_ratio([97.0 * d for d in drift], [100.0 * d for d in drift])
    assert out["high"] < 1.0 and out["ratio"] == pytest.approx(0.97)


def test_fewer_than_two_pairs_give_no_interval(paired_ratio) -> None:
    assert paired_ratio([100.0], [90.0]) is None
    assert paired_ratio([100.0, 101.0], [90.0]) is None  # pairs only where both have a round
