"""Counter-based random draws: every random number of a task is a pure function of where it sits.

A batched task set (`TaskSet.sample_batch`) takes its randomness from `TaskDraws` rather than
from a sequential `torch.Generator`. Task ``i`` of a set seeded with ``seed`` has the 64-bit key
``k = task_seed(seed, i)``, and word ``p`` of its stream ``s`` is

.. math:: w(k, s, p) = \\operatorname{mix}\\big(k + (s \\cdot 2^{32} + p + 1)\\,\\gamma \\bmod 2^{64}\\big),

the output number ``s * 2**32 + p`` of SplitMix64 (Steele, Lea & Flood, 2014, "Fast Splittable
Pseudorandom Number Generators") seeded with ``k``; ``mix`` is SplitMix64's bijective finalizer
and ``γ`` its odd increment. Each word depends on ``(seed, i, s, p)`` only, never on which other
tasks are drawn with it, so a whole batch of tasks is a few tensor operations over a
``[tasks, words]`` grid and gives bit for bit the tasks that drawing them one at a time gives.
On the CPU the words are computed with numpy's uint64 arithmetic (a few times cheaper per
operation than torch on small arrays); on another device with torch's int64 arithmetic with
wrap-around (two's complement, as torch does on CPU and CUDA), logical shifts written as an
arithmetic shift and a mask. Integer arithmetic is exact, so both give the same words (tested).

Streams separate the purposes of the draws (a function's parameters, its inputs, noise; an
episode's classes, its items), so changing the number of points of a task does not change its
function.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = ["TaskDraws", "mix64", "task_keys"]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_C1 = 0xBF58476D1CE4E5B9
_C2 = 0x94D049BB133111EB
#: the largest position of one stream (streams are 2**32 words apart)
MAX_WORDS = 1 << 32


def splitmix64(z: int) -> int:
    """One round of SplitMix64 on a Python int (Steele, Lea & Flood, 2014): a bijective 64-bit mixer."""
    z = (z + _GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _C1) & _MASK64
    z = ((z ^ (z >> 27)) * _C2) & _MASK64
    return z ^ (z >> 31)


def _signed(value: int) -> int:
    """The int64 whose two's-complement bits are ``value mod 2**64``."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_S_GAMMA, _S_C1, _S_C2 = _signed(_GAMMA), _signed(_C1), _signed(_C2)


def _xor_shift_(z: Tensor, shift: int) -> Tensor:
    """``z ^= z >>> shift`` in place (a logical shift: the arithmetic one, masked)."""
    z ^= (z >> shift) & ((1 << (64 - shift)) - 1)
    return z


def mix64(z: Tensor) -> Tensor:
    """SplitMix64's finalizer on an int64 tensor, in place (returns ``z``).

    Bit for bit the integer `splitmix64` without its increment, with the 64-bit words held as int64.
    """
    _xor_shift_(z, 30)
    z *= _S_C1
    _xor_shift_(z, 27)
    z *= _S_C2
    return _xor_shift_(z, 31)


_U30, _U27, _U31, _U_C1, _U_C2 = (np.uint64(v) for v in (30, 27, 31, _C1, _C2))
_U_MASK24 = np.uint64(0xFFFFFF)
_F_2M24 = np.float32(2.0**-24)


def _mix64_numpy(z: np.ndarray) -> np.ndarray:
    """`mix64` on a uint64 array, in place."""
    z ^= z >> _U30
    z *= _U_C1
    z ^= z >> _U27
    z *= _U_C2
    z ^= z >> _U31
    return z


def task_keys(seed: int, indices: Tensor) -> Tensor:
    """``task_seed(seed, i)`` for every ``i`` of the int64 tensor ``indices``, as int64 bits."""
    base = _signed(splitmix64(seed & _MASK64) + _GAMMA)
    z = indices.to(torch.int64) + base
    return mix64(z)


def _task_keys_numpy(seed: int, indices: np.ndarray) -> np.ndarray:
    base = np.uint64((splitmix64(seed & _MASK64) + _GAMMA) & _MASK64)
    return _mix64_numpy(indices.astype(np.int64).view(np.uint64) + base)


@lru_cache(maxsize=256)
def _offsets(stream: int, n: int, device: torch.device) -> Tensor:
    """``(stream * 2**32 + p + 1) * γ mod 2**64`` for ``p < n``, as int64 (treated as read-only)."""
    counters = torch.arange(n, dtype=torch.int64, device=device) + (stream * MAX_WORDS + 1)
    return counters * _S_GAMMA


@lru_cache(maxsize=256)
def _offsets_numpy(stream: int, n: int) -> np.ndarray:
    offsets = _offsets(stream, n, torch.device("cpu")).numpy().view(np.uint64)
    offsets.setflags(write=False)
    return offsets


class TaskDraws:
    """The random words of a batch of tasks, by stream and position (see the module docstring).

    Args:
        keys: int64 tensor ``[n_tasks]`` of task keys (``task_seed(seed, i)`` as int64 bits);
            the draws are made on its device.

    Every method returns a tensor with the task dimension first, ``[n_tasks, *shape]``, on the
    keys' device; position ``p`` of a stream is element ``p`` of ``shape`` in row-major order.
    """

    def __init__(self, keys: Tensor) -> None:
        if not isinstance(keys, Tensor) or keys.dtype != torch.int64 or keys.ndim != 1:
            raise ValueError(f"keys must be a 1-D int64 tensor, got {keys!r}")
        self.keys = keys
        self._numpy = keys.device.type == "cpu"
        self._keys_np = keys.numpy().view(np.uint64) if self._numpy else None

    @classmethod
    def of(
        cls, seed: int, indices: Iterable[int] | Tensor, device: torch.device | str | None = None, *, numpy: bool = True
    ) -> TaskDraws:
        """The draws of tasks ``indices`` of a set seeded with ``seed``, made on ``device``
        (``numpy=False`` makes CPU draws with torch's arithmetic instead, to check one against the other)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cpu" and numpy and not isinstance(indices, Tensor):
            if isinstance(indices, range):
                array = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
            else:
                array = np.asarray(list(indices), dtype=np.int64)
            draws = cls(torch.from_numpy(_task_keys_numpy(seed, array.reshape(-1)).view(np.int64)))
        else:
            if isinstance(indices, Tensor):
                index = indices.to(device=device, dtype=torch.int64)
            elif isinstance(indices, range):
                index = torch.arange(indices.start, indices.stop, indices.step, dtype=torch.int64, device=device)
            else:
                index = torch.tensor(list(indices), dtype=torch.int64, device=device)
            draws = cls(task_keys(seed, index.reshape(-1)))
        if not numpy:
            draws._numpy, draws._keys_np = False, None
        return draws

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def device(self) -> torch.device:
        """Where the draws are made."""
        return self.keys.device

    def _words(self, stream: int, shape: tuple[int, ...]) -> np.ndarray | Tensor:
        n = math.prod(shape)
        if not 0 <= stream < MAX_WORDS or n > MAX_WORDS:
            raise ValueError(f"stream {stream} with {n} words is outside the counter space (2**32 words each)")
        if self._keys_np is not None:
            return _mix64_numpy(self._keys_np[:, None] + _offsets_numpy(stream, n)).reshape(len(self), *shape)
        z = self.keys[:, None] + _offsets(stream, n, self.device)
        return mix64(z).view(len(self), *shape)

    @property
    def uses_numpy(self) -> bool:
        """Whether the words are computed with numpy (CPU draws; see `numpy_words`)."""
        return self._keys_np is not None

    def numpy_words(self, stream: int, shape: tuple[int, ...]) -> np.ndarray:
        """`words` as a uint64 numpy array ``[n_tasks, *shape]`` (CPU draws made with numpy only:
        see `uses_numpy`), for a caller that does its own integer arithmetic on the host."""
        if self._keys_np is None:
            raise ValueError("numpy_words needs draws made with numpy (CPU keys, numpy=True)")
        w = self._words(stream, shape)
        assert isinstance(w, np.ndarray)
        return w

    def words(self, stream: int, shape: tuple[int, ...]) -> Tensor:
        """Raw 64-bit words (int64 bits) ``[n_tasks, *shape]`` of ``stream``."""
        w = self._words(stream, shape)
        return torch.from_numpy(w.view(np.int64)) if isinstance(w, np.ndarray) else w

    def uniform(
        self,
        stream: int,
        shape: tuple[int, ...],
        low: float | tuple[float, ...] | list[float] = 0.0,
        high: float | tuple[float, ...] | list[float] = 1.0,
    ) -> Tensor:
        """float32 ``U[low, high)`` ``[n_tasks, *shape]``: the top 24 bits of each word times ``2**-24``
        (as ``torch.rand`` makes its floats), then ``low + (high - low) * u`` in float32.

        ``low`` and ``high`` are numbers, or tuples/lists of one per element of the last dimension of ``shape``
        (e.g. the ranges of a function's parameters, drawn in one go).
        """
        words = self._words(stream, shape)
        affine = _affine(
            tuple(low) if isinstance(low, (tuple, list)) else (low,),
            tuple(high) if isinstance(high, (tuple, list)) else (high,),
        )
        if isinstance(words, np.ndarray):
            unit = _unit_numpy(words, 40)
            if affine is not None:
                unit *= affine[0]
                unit += affine[1]
            return torch.from_numpy(unit)
        u = _unit(words, 40)
        if affine is not None:
            u.mul_(torch.tensor(affine[0], device=u.device)).add_(torch.tensor(affine[1], device=u.device))
        return u

    def normal(self, stream: int, shape: tuple[int, ...]) -> Tensor:
        r"""float32 standard normal ``[n_tasks, *shape]`` by Box-Muller from one word each:
        :math:`\sqrt{-2 \ln(1 - u_1)} \cos(2\pi u_2)` with ``u_1``, ``u_2`` two 24-bit parts of the word."""
        w = self._words(stream, shape)
        u1, u2 = _unit(w, 40), _unit(w, 16)
        radius = torch.log1p(u1.neg_()).mul_(-2.0).sqrt_()
        return radius.mul_(torch.cos(u2.mul_(2 * math.pi)))

    def integers(self, stream: int, shape: tuple[int, ...], high: int | Tensor) -> Tensor:
        """int64 uniform on ``[0, high)`` ``[n_tasks, *shape]`` (``high`` broadcasts; modulo bias
        below ``high / 2**63``): the low 63 bits of each word modulo ``high``."""
        w = self.words(stream, shape)
        w &= (1 << 63) - 1
        return torch.remainder(w, high)


@lru_cache(maxsize=256)
def _affine(low: tuple[float, ...], high: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """float32 ``(high - low, low)`` for `TaskDraws.uniform`, or ``None`` for ``U[0, 1)`` (read-only)."""
    lows = np.asarray(low, dtype=np.float64)
    scales, lows32 = (np.asarray(high, dtype=np.float64) - lows).astype(np.float32), lows.astype(np.float32)
    if (lows32 == 0).all() and (scales == 1).all():
        return None
    scales.setflags(write=False)
    lows32.setflags(write=False)
    return scales, lows32


def _unit_numpy(words: np.ndarray, shift: int) -> np.ndarray:
    """The 24 bits of uint64 ``words`` from bit ``shift`` as float32 in ``[0, 1)`` (exact)."""
    bits = words >> np.uint64(shift)  # a new array: ``words`` stays as it is
    bits &= _U_MASK24
    unit = bits.astype(np.float32)
    unit *= _F_2M24
    return unit


def _unit(words: np.ndarray | Tensor, shift: int) -> Tensor:
    """The 24 bits of ``words`` from bit ``shift`` as a float32 tensor in ``[0, 1)`` (exact)."""
    if isinstance(words, np.ndarray):
        return torch.from_numpy(_unit_numpy(words, shift))
    return ((words >> shift) & 0xFFFFFF).to(torch.float32).mul_(2.0**-24)
