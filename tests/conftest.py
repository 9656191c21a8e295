"""Shared pytest setup: tests marked ``cuda`` run only where a CUDA device is visible (skipped elsewhere); the
``batched_calls`` fixture of the task-batched tests."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def batched_calls(monkeypatch) -> list[int]:
    """Counts the runs of the task-batched backward (`metalearn.task_batched`; the unrolled mode's vmap
    path imports it): the tests of that path check it ran, or did not."""
    import metalearn.modes.unrolled as unrolled

    calls: list[int] = []
    real = unrolled.task_batched_backward

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(unrolled, "task_batched_backward", counted)
    return calls
