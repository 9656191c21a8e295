"""A softmax temperature that a part keeps as saved state and may anneal with the outer step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["AnnealedTemperature"]


class AnnealedTemperature(nn.Module):
    """Base for parts with a softmax temperature T (a mixture of rules, DARTS mixing weights).

    T is configuration, never a global: set it with `set_temperature`, or give ``anneal`` (a
    schedule ``outer_step -> T``, e.g. `metalearn.knowledge.geometric_anneal`), and
    `metalearn.train.meta_train` calls `set_outer_step` before each outer step. T is saved in
    the state dict (buffer ``temperature_saved``) so checkpoints and resume keep it; a Python
    mirror is what the forward reads (no device sync), refreshed after ``load_state_dict``.

    Args:
        temperature: initial T (> 0).
        anneal: optional schedule ``outer_step -> T``.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    temperature_saved: Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, temperature: float = 1.0, anneal: Callable[[int], float] | None = None) -> None:
        super().__init__()
        self.anneal = anneal
        self.register_buffer("temperature_saved", torch.tensor(1.0, dtype=torch.float64))
        self._temperature = 1.0
        self.set_temperature(temperature)
        self.register_load_state_dict_post_hook(AnnealedTemperature._restore_temperature)

    @property
    def temperature(self) -> float:
        """The current T."""
        return self._temperature

    def set_temperature(self, temperature: float) -> None:
        """Sets T (> 0) for what follows."""
        temperature = float(temperature)
        if not temperature > 0:
            raise ValueError(f"the {type(self).__name__} temperature must be positive, got {temperature}")
        self._temperature = temperature
        self.temperature_saved.fill_(temperature)

    def set_outer_step(self, outer_step: int) -> float:
        """Sets T from the ``anneal`` schedule at this outer step (no-op without one); returns T."""
        if self.anneal is not None:
            self.set_temperature(self.anneal(outer_step))
        return self._temperature

    @staticmethod
    def _restore_temperature(module: AnnealedTemperature, incompatible_keys: object) -> None:
        module._temperature = float(module.temperature_saved)
