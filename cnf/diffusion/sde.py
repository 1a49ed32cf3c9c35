"""Linear forward SDEs of score-based diffusion: VP, sub-VP and VE.

Time convention of the library (docs/methods.md §1): **data at t = 0, noise at
t = T = 1.** Every SDE here is linear (docs/methods.md §4)::

    dx = f(t) x dt + g(t) dw,        p_{0t}(x_t | x_0) = N(m(t) x_0, σ(t)² I)

with the mean coefficient ``m(t) = exp(∫_0^t f)`` and the kernel variance
solving ``dσ²/dt = 2 f σ² + g²`` from ``σ(0) = 0``:

=========  ========================  =========================  ======================  ==============
SDE        f(t)                      g(t)²                      m(t)                    σ(t)²
=========  ========================  =========================  ======================  ==============
VP         −β(t)/2                   β(t)                       e^{−B/2}                1 − e^{−B}
sub-VP     −β(t)/2                   β(t)(1 − e^{−2B})          e^{−B/2}                (1 − e^{−B})²
VE         0                         dσ_VE²/dt                  1                       σ_VE(t)² − σ_min²
=========  ========================  =========================  ======================  ==============

where ``β(t) = β_min + t(β_max − β_min)``, ``B(t) = ∫_0^t β`` and
``σ_VE(t) = σ_min (σ_max/σ_min)^t``. Priors: N(0, I) for VP and sub-VP,
N(0, σ_max² I) for VE. Training and likelihoods run on ``[ε, 1]`` with the
truncation time ``ε`` (default 1e-5) because the score blows up at t = 0.

**Importance sampling of t.** The likelihood weighting ``λ = g²`` of the
denoising objective ``½ ∫ g² E‖s − ∇log p_{0t}‖² dt`` puts most of its mass
near t = ε (``g²/σ² ~ 1/t``). Writing ``‖s − ∇log p_{0t}‖² = ‖σ s + z‖²/σ²``,
the variance is cut by drawing t with density ``q(t) ∝ g(t)²/σ(t)²`` on
``[ε, 1]`` (Song et al. 2021a, §5). For all three SDEs ``g²/σ²`` has an
elementary antiderivative ``Φ`` with an elementary inverse, so t is drawn
exactly by the inverse CDF (:meth:`LinearSDE.sample_importance_time`):

* VP:     ``Φ = log(e^{B} − 1)``                     (``d/dt = β / (1 − e^{−B})``)
* sub-VP: ``Φ = B + 2 log(1 − e^{−B})``              (``d/dt = β (1 + e^{−B}) / (1 − e^{−B})``)
* VE:     ``Φ = log((σ_max/σ_min)^{2t} − 1)``

Example:
    >>> sde = build_sde("vp")
    >>> m, std = sde.marginal(torch.tensor([0.5]))
    >>> t = sde.sample_importance_time(4)

References:
    Song et al., "Score-based generative modeling through stochastic differential
    equations", ICLR 2021, arXiv:2011.13456.
    Song, Durkan, Murray & Ermon, "Maximum likelihood training of score-based
    diffusion models", NeurIPS 2021, arXiv:2101.09258 (2021a).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from cnf.flows.base import DiagonalNormal
from cnf.registry import Registry

__all__ = ["SDES", "LinearSDE", "SubVPSDE", "VESDE", "VPSDE", "build_sde", "expand_as"]


def expand_as(c: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample coefficients ``(B,)`` to broadcast against ``x`` ``(B, *event)``.

    A 0-dim ``c`` (one time for the whole batch) is returned unchanged.
    """
    if c.dim() == 0:
        return c
    return c.reshape(-1, *([1] * (x.dim() - 1)))


class LinearSDE(ABC):
    """A linear forward SDE ``dx = f(t) x dt + g(t) dw`` (data at t = 0, noise at t = 1).

    Subclasses give the scalar coefficients; this class derives the rest. All
    time arguments are tensors of shape ``()`` or ``(B,)``; coefficients come
    back with the same shape (use :func:`expand_as` to broadcast them).

    Args:
        eps: Truncation time ε: training, likelihoods and samplers use ``[ε, 1]``.
    """

    name: str = "linear"
    T: float = 1.0

    def __init__(self, *, eps: float = 1e-5):
        if not 0 < eps < self.T:
            raise ValueError(f"eps must lie in (0, {self.T}), got {eps}")
        self.eps = float(eps)

    # ------------------------------------------------------------ coefficients
    @abstractmethod
    def f(self, t: Tensor) -> Tensor:
        """Drift coefficient ``f(t)`` (the drift is ``f(t) x``)."""

    @abstractmethod
    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion coefficient ``g(t)²``."""

    @abstractmethod
    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean coefficient ``m(t)`` and std ``σ(t)`` of ``p_{0t}(x_t | x_0) = N(m x_0, σ² I)``."""

    @property
    @abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the prior ``π = N(0, prior_std² I)`` at t = 1."""

    @abstractmethod
    def _phi(self, t: Tensor) -> Tensor:
        """An antiderivative ``Φ(t)`` of ``g(t)²/σ(t)²``."""

    @abstractmethod
    def _phi_inverse(self, phi: Tensor) -> Tensor:
        """The inverse of :meth:`_phi`."""

    def g(self, t: Tensor) -> Tensor:
        """Diffusion coefficient ``g(t)``."""
        return self.g2(t).sqrt()

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        """Forward drift ``f(t) x``; ``x`` is ``(B, *event)``."""
        return expand_as(self.f(t), x) * x

    def mean_coef(self, t: Tensor) -> Tensor:
        return self.marginal(t)[0]

    def std(self, t: Tensor) -> Tensor:
        return self.marginal(t)[1]

    def perturb(self, t: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
        """``x_t = m(t) x_0 + σ(t) z`` for given standard-normal ``noise`` z."""
        m, s = self.marginal(t)
        return expand_as(m, x0) * x0 + expand_as(s, x0) * noise

    # ------------------------------------------------------------------- prior
    @property
    def prior(self) -> DiagonalNormal:
        """The prior ``π = N(0, prior_std² I)`` at t = 1: the base density of the ODE model."""
        return DiagonalNormal(self.prior_std)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """``log π(z)`` per sample, shape ``(B,)``."""
        return self.prior.log_prob(z)

    # ------------------------------------------------------------ time helpers
    def _time(self, t: float | Tensor, like: Tensor | None = None) -> Tensor:
        if like is not None:
            return torch.as_tensor(t, dtype=like.dtype, device=like.device)
        return torch.as_tensor(t, dtype=torch.get_default_dtype())

    def importance_normalizer(self, eps: float | None = None) -> float:
        """``Z = ∫_ε^1 g²/σ² dt``, the normaliser of the importance density of t."""
        eps = self.eps if eps is None else eps
        t = torch.tensor([eps, self.T], dtype=torch.float64)
        phi = self._phi(t)
        return float(phi[1] - phi[0])

    def importance_density(self, t: Tensor, eps: float | None = None) -> Tensor:
        """Density ``q(t) = g(t)²/(σ(t)² Z)`` on ``[ε, 1]``."""
        _, s = self.marginal(t)
        return self.g2(t) / s.pow(2) / self.importance_normalizer(eps)

    def sample_importance_time(
        self,
        n: int,
        *,
        eps: float | None = None,
        u: Tensor | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """Draw ``t ~ q(t) ∝ g(t)²/σ(t)²`` on ``[ε, 1]`` by the inverse CDF.

        Args:
            n: Number of times.
            eps: Lower end (default: the SDE's ε).
            u: Optional uniforms in [0, 1] of shape ``(n,)`` (e.g. stratified).
            generator: Optional generator for the uniforms.

        Returns:
            ``t`` of shape ``(n,)``. Computed in float64 (``Φ(ε)`` is ~−14 for
            VP while ``Φ(1)`` is ~10) and cast to ``dtype``.
        """
        eps = self.eps if eps is None else eps
        if u is None:
            u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        u = u.to(torch.float64)
        ends = self._phi(torch.tensor([eps, self.T], dtype=torch.float64, device=u.device))
        t = self._phi_inverse(ends[0] + u * (ends[1] - ends[0]))
        return t.clamp(eps, self.T).to(dtype or torch.get_default_dtype())

    def describe(self) -> dict[str, Any]:
        """``{"sde": name, <every constructor argument>: value}``, as in the config section."""
        params = inspect.signature(type(self).__init__).parameters
        return {"sde": self.name, **{k: getattr(self, k) for k in params if k != "self"}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "sde")
        return f"{type(self).__name__}({args})"


class _BetaSchedule(LinearSDE):
    """Shared linear β schedule of VP and sub-VP."""

    def __init__(self, *, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-5):
        super().__init__(eps=eps)
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integral_beta(self, t: Tensor) -> Tensor:
        """``B(t) = ∫_0^t β(s) ds``."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def _t_from_integral(self, b: Tensor) -> Tensor:
        # Root of ½(β_max − β_min) t² + β_min t − B = 0, in the form without
        # cancellation (and valid for β_max = β_min).
        db = self.beta_max - self.beta_min
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * db * b))

    def f(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    @property
    def prior_std(self) -> float:
        return 1.0


class VPSDE(_BetaSchedule):
    """Variance-preserving SDE (the continuous DDPM): ``dx = −½β x dt + √β dw``.

    Args:
        beta_min, beta_max: Linear schedule ``β(t) = β_min + t(β_max − β_min)`` (0.1, 20).
        eps: Truncation time.
    """

    name = "vp"

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t)

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        b = self.integral_beta(t)
        # −expm1(−B) = 1 − e^{−B} without cancellation at small t.
        return torch.exp(-0.5 * b), torch.sqrt(-torch.expm1(-b))

    def _phi(self, t: Tensor) -> Tensor:
        return torch.log(torch.expm1(self.integral_beta(t)))

    def _phi_inverse(self, phi: Tensor) -> Tensor:
        # e^{B} − 1 = e^{Φ}  ⇒  B = log(1 + e^{Φ}) (softplus, computed stably).
        return self._t_from_integral(torch.logaddexp(phi, torch.zeros_like(phi)))


class SubVPSDE(_BetaSchedule):
    """Sub-VP SDE: VP drift with ``g² = β(1 − e^{−2B})``; kernel variance ``(1 − e^{−B})²``.

    Its kernel variance is below VP's at every t (hence the name) and it
    gave Song et al. (2021) their best likelihoods.
    """

    name = "subvp"

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t) * -torch.expm1(-2 * self.integral_beta(t))

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        b = self.integral_beta(t)
        return torch.exp(-0.5 * b), -torch.expm1(-b)

    def _phi(self, t: Tensor) -> Tensor:
        b = self.integral_beta(t)
        return b + 2 * torch.log(-torch.expm1(-b))

    def _phi_inverse(self, phi: Tensor) -> Tensor:
        # Φ = 2 log(2 sinh(B/2))  ⇒  B = 2 asinh(e^{Φ/2} / 2).
        return self._t_from_integral(2 * torch.asinh(0.5 * torch.exp(0.5 * phi)))


class VESDE(LinearSDE):
    """Variance-exploding SDE (continuous NCSN): ``dx = √(dσ²/dt) dw``.

    ``σ_VE(t) = σ_min (σ_max/σ_min)^t``; the kernel is ``N(x_0, (σ_VE(t)² − σ_min²) I)``
    (the exact variance of the SDE started at t = 0); prior ``N(0, σ_max² I)``.

    Args:
        sigma_min: 0.01 in Song et al.
        sigma_max: About the largest pairwise data distance: 50 for 32×32
            images, ~4–8 for the 2-D toy data.
    """

    name = "ve"

    def __init__(self, *, sigma_min: float = 0.01, sigma_max: float = 50.0, eps: float = 1e-5):
        super().__init__(eps=eps)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(sigma_max / sigma_min)

    def f(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def g2(self, t: Tensor) -> Tensor:
        # d/dt σ_min² r^{2t} = 2 log r · σ_min² r^{2t}.
        return 2 * self._log_ratio * self.sigma_min**2 * torch.exp(2 * self._log_ratio * t)

    def marginal(self, t: Tensor) -> tuple[Tensor, Tensor]:
        var = self.sigma_min**2 * torch.expm1(2 * self._log_ratio * t)
        return torch.ones_like(t), var.sqrt()

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def _phi(self, t: Tensor) -> Tensor:
        return torch.log(torch.expm1(2 * self._log_ratio * t))

    def _phi_inverse(self, phi: Tensor) -> Tensor:
        return torch.logaddexp(phi, torch.zeros_like(phi)) / (2 * self._log_ratio)


SDES: Registry[type[LinearSDE]] = Registry("SDE", {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE})


def build_sde(name: str, **options: float) -> LinearSDE:
    """Build a registered SDE with its own options (``beta_*`` for VP/sub-VP, ``sigma_*`` for VE).

    Example:
        >>> build_sde("ve", sigma_max=4.0).sigma_max
        4.0
    """
    cls = SDES[name]
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"SDE '{name}': {e}") from None
