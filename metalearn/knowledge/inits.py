r"""Learned initial distributions of θ: a Gaussian around the model's weights, and learned gains over a standard init.

Both are `InitPart`\ s: they return θ0 for every task of a batch with a leading task
dimension, drawing all the randomness up front from an explicit ``torch.Generator`` (so
the batch can then run under ``torch.func.vmap`` or as a loop with identical θ0).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from metalearn.knowledge.meta_knowledge import theta_parameters
from metalearn.knowledge.parts import InitPart, Params, param_key

__all__ = ["GaussianInit", "ScaledInit", "SCALED_INIT_SCHEMES"]

GAUSSIAN_MODES = ("sample", "mean")
SCALED_INIT_SCHEMES = ("kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal")
SCALED_INIT_GROUPS = ("layer", "network")


def _need_generator(generator: torch.Generator | None, who: str) -> torch.Generator:
    if generator is None:
        raise ValueError(
            f"{who} samples θ0 and needs an explicit torch.Generator: pass generator=torch.Generator().manual_seed(s) "
            "(to meta_gradient/meta_step/adapt); randomness is never taken from the global RNG"
        )
    return generator


def _draw(kind: str, shape: tuple[int, ...], like: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal or U(-1, 1) noise drawn on the generator's device, then moved to ``like``'s."""
    if kind == "normal":
        noise = torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device)
    else:
        noise = torch.rand(shape, generator=generator, dtype=like.dtype, device=generator.device) * 2 - 1
    return noise.to(like.device)


class GaussianInit(InitPart):
    r"""A learned Gaussian over θ0: per-parameter mean and scale, sampled by reparameterisation.

    .. math::

        \theta_0^{(i)} = \mu + \sigma \odot \epsilon^{(i)}, \qquad
        \sigma = \exp(\log\sigma), \qquad \epsilon^{(i)} \sim \mathcal{N}(0, I)

    μ is the model's own parameters (so they are meta-parameters, as in MAML) and
    ``log_scale`` holds one log σ per entry of every parameter (keys from `param_key`). The
    noise ε of all tasks is drawn at once from the generator before the batch runs, so the
    meta-gradient flows to μ and log σ exactly as for any differentiable function of them
    (the reparameterisation trick; Kingma & Welling, 2014). Learning a distribution over
    θ0 in this way is the idea behind probabilistic MAML variants (e.g. Finn et al., 2018;
    Yoon et al., 2018), here without their variational terms: just the expected val loss.

    Meta-test: ``mode="mean"`` (or the `mean_only` context) starts every task from μ, no
    generator needed — one adaptation per task. The alternative is to average over S
    samples: adapt from S draws of θ0 and average the S adapted models' predictions, at S
    times the adaptation (and prediction) cost; it estimates the expected performance
    under the learned distribution rather than the performance at its mean.

    Args:
        init_scale: initial σ for every entry (positive).
        mode: ``"sample"`` (draw θ0, needs a generator) or ``"mean"`` (θ0 = μ).

    Example:
        >>> omega = MetaKnowledge(MLP(), optimizer=InnerSGD(0.01), init=GaussianInit(init_scale=0.01))
        >>> opt, batch = torch.optim.Adam(omega.parameters()), Sinusoid(5, 5, seed=0).batch(range(4))
        >>> stats = meta_step(omega, opt, batch, inner_steps=1, generator=torch.Generator().manual_seed(0))
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    uses_model_parameters = True

    def __init__(self, init_scale: float = 0.01, mode: str = "sample") -> None:
        super().__init__()
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive (σ is stored as log σ), got {init_scale}")
        self.init_scale = float(init_scale)
        self.mode = mode  # checked by the setter
        self.log_scale = nn.ParameterDict()

    @property
    def mode(self) -> str:
        """``"sample"`` or ``"mean"``; settable (e.g. ``init.mode = "mean"`` for meta-test)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in GAUSSIAN_MODES:
            raise ValueError(f"GaussianInit mode must be one of {GAUSSIAN_MODES}, got {value!r}")
        self._mode = value

    @contextmanager
    def mean_only(self) -> Iterator[GaussianInit]:
        """Within the block θ0 = μ for every task (meta-test without sampling); the mode is restored after."""
        previous = self._mode
        self._mode = "mean"
        try:
            yield self
        finally:
            self._mode = previous

    def bind(self, model: nn.Module) -> None:
        for name, p in theta_parameters(model).items():  # θ's parameters (not α of a searchable model)
            self.log_scale[param_key(name)] = nn.Parameter(torch.full_like(p.detach(), math.log(self.init_scale)))

    def scale(self, name: str) -> Tensor:
        """σ of the named model parameter (differentiable)."""
        key = param_key(name)
        if key not in self.log_scale:
            raise KeyError(
                f"GaussianInit has no scale for parameter {name!r}: it was bound to a model without it. "
                "Build the MetaKnowledge with the model whose parameters you pass"
            )
        return self.log_scale[key].exp()

    def initial_params(
        self, model_params: Mapping[str, Tensor], n_tasks: int, generator: torch.Generator | None
    ) -> Params:
        if self._mode == "mean":
            return {name: mu.expand(n_tasks, *mu.shape) for name, mu in model_params.items()}
        generator = _need_generator(generator, "GaussianInit(mode='sample')")
        out = {}
        for name, mu in model_params.items():  # fixed order: the same seed gives the same θ0
            eps = _draw("normal", (n_tasks, *mu.shape), mu, generator)
            out[name] = mu + self.scale(name) * eps
        return out

    def extra_repr(self) -> str:
        return f"init_scale={self.init_scale}, mode={self._mode!r}"


def _layer_of(name: str) -> str:
    return name.rpartition(".")[0]


def _fans(shape: torch.Size) -> tuple[int, int]:
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


class ScaledInit(InitPart):
    r"""A standard init drawn afresh for every task, times a learned gain per layer.

    For a weight W of a Linear/Conv layer ``l`` (any parameter with two or more dimensions;
    fans from its shape as torch computes them, ``fan_in = shape[1] * prod(shape[2:])``):

    .. math::

        W^{(i)}_0 = g_l \cdot \mathrm{scheme}(\text{fan}_\text{in}, \text{fan}_\text{out}), \qquad
        g_l = \exp(\log g_l)

    with ``kaiming_uniform`` U(-b, b), b = gain·√(3 / fan_in); ``kaiming_normal``
    N(0, gain²/fan_in) (He et al., 2015; gain from ``nn.init.calculate_gain(nonlinearity)``);
    ``xavier_uniform`` U(-b, b), b = √(6 / (fan_in + fan_out)); ``xavier_normal``
    N(0, 2/(fan_in + fan_out)) (Glorot & Bengio, 2010).

    Other parameters:

    * biases (names ending in ``bias``) start at a learned per-layer shift s_l (initially
      0) broadcast over the vector: ``b0 = s_l`` — no noise, as in the usual zero-bias init;
    * other 1-D or 0-D weights (e.g. a norm layer's scale) start at ``g_l`` (initially 1).

    The model's own weights are not used (``uses_model_parameters = False``: `MetaKnowledge`
    filters them out of ω's parameters and state dict, though the model stays its registered
    submodule); only their names, shapes, dtype and device. The meta-parameters
    are two scalars per layer, independent of the layer's width, so a learned
    ``ScaledInit`` ("how to initialise") applies to any model with the same layer names
    whatever its sizes: call ``initial_params(other_model.named_parameters(), ...)`` or load
    its state dict into a ``ScaledInit`` bound to the other model.

    Args:
        scheme: one of `SCALED_INIT_SCHEMES`.
        per: ``"layer"`` (one gain and shift per module, keyed by its name) or
            ``"network"`` (one of each for the whole model).
        init_gain: initial learned gain (positive; stored as its log).
        nonlinearity: for the Kaiming schemes, passed to ``nn.init.calculate_gain``.
    """

    native_norm_free = True  # calls no fused norm itself: `metalearn.exact_norms.norm_free`

    uses_model_parameters = False
    ROOT = "<model>"  # key of parameters owned by the top-level module, and of per="network"

    def __init__(
        self,
        scheme: str = "kaiming_uniform",
        per: str = "layer",
        init_gain: float = 1.0,
        nonlinearity: str = "relu",
    ) -> None:
        super().__init__()
        if scheme not in SCALED_INIT_SCHEMES:
            raise ValueError(f"ScaledInit scheme must be one of {SCALED_INIT_SCHEMES}, got {scheme!r}")
        if per not in SCALED_INIT_GROUPS:
            raise ValueError(f"ScaledInit per must be one of {SCALED_INIT_GROUPS}, got {per!r}")
        if not init_gain > 0:
            raise ValueError(f"init_gain must be positive (stored as log gain), got {init_gain}")
        self.scheme = scheme
        self.per = per
        self.init_gain = float(init_gain)
        self.nonlinearity = nonlinearity
        kaiming = scheme.startswith("kaiming")
        # a str: torch's Literal type names every nonlinearity, and calculate_gain refuses an unknown one
        self._activation_gain = nn.init.calculate_gain(nonlinearity) if kaiming else 1.0  # type: ignore[arg-type]
        self.log_gain = nn.ParameterDict()
        self.shift = nn.ParameterDict()

    def group(self, name: str) -> str:
        """The ParameterDict key of the layer (or network) that parameter ``name`` belongs to."""
        layer = _layer_of(name) if self.per == "layer" else ""
        return param_key(layer) if layer else self.ROOT

    def bind(self, model: nn.Module) -> None:
        for name, p in theta_parameters(model).items():  # θ's parameters (not α of a searchable model)
            key = self.group(name)
            if key not in self.log_gain:
                log_gain = torch.tensor(math.log(self.init_gain), dtype=p.dtype, device=p.device)
                self.log_gain[key] = nn.Parameter(log_gain)
                self.shift[key] = nn.Parameter(torch.zeros((), dtype=p.dtype, device=p.device))

    def gain(self, name: str) -> Tensor:
        """The learned gain g_l of the layer that owns parameter ``name`` (differentiable)."""
        return self.log_gain[self._key(name)].exp()

    def _key(self, name: str) -> str:
        key = self.group(name)
        if key not in self.log_gain:
            raise KeyError(
                f"ScaledInit has no gain for the layer of parameter {name!r} (key {key!r}); it knows "
                f"{list(self.log_gain)}. Use a model with the same layer names as the one it was bound to"
            )
        return key

    def standard_std(self, shape: torch.Size) -> float:
        """The standard deviation of the (gain-1) scheme for a weight of this shape."""
        fan_in, fan_out = _fans(shape)
        if self.scheme.startswith("kaiming"):
            return self._activation_gain / math.sqrt(fan_in)
        return math.sqrt(2.0 / (fan_in + fan_out))

    def initial_params(
        self, model_params: Mapping[str, Tensor], n_tasks: int, generator: torch.Generator | None
    ) -> Params:
        generator = _need_generator(generator, f"ScaledInit({self.scheme!r})")
        out = {}
        for name, p in model_params.items():  # fixed order: the same seed gives the same θ0
            key = self._key(name)
            if p.ndim >= 2:
                uniform = self.scheme.endswith("uniform")
                # U(-1, 1) has std 1/√3: scale its bound so both kinds have std standard_std
                bound = self.standard_std(p.shape) * (math.sqrt(3.0) if uniform else 1.0)
                noise = _draw("uniform" if uniform else "normal", (n_tasks, *p.shape), p, generator)
                out[name] = self.log_gain[key].exp() * (bound * noise)
            elif name.endswith("bias"):
                out[name] = self.shift[key].expand(n_tasks, *p.shape)
            else:
                out[name] = self.log_gain[key].exp().expand(n_tasks, *p.shape)
        return out

    def extra_repr(self) -> str:
        return (
            f"scheme={self.scheme!r}, per={self.per!r}, init_gain={self.init_gain}, "
            f"nonlinearity={self.nonlinearity!r}"
        )
