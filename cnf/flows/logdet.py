"""Log-determinant estimators of invertible residual blocks ``y = x + g(x)``.

    log det(I + J_g) = Σ_{k≥1} (−1)^{k+1} tr(J_g^k) / k,

each trace estimated by Hutchinson, ``tr(A) = E[vᵀAv]``, with ``vᵀJ_g^k``
computed as ``k`` vector–Jacobian products. Three estimators: ``exact``
(brute-force Jacobian from one batched VJP, for low dimension and tests),
``series`` (fixed truncation, biased; i-ResNet) and ``roulette`` (randomised
truncation, unbiased; Residual Flows). Probes and the batched Jacobian are
the CNF divergence's (:mod:`cnf.divergence`).

References:
    Behrmann et al., "Invertible residual networks", ICML 2019.
    Chen et al., "Residual flows for invertible generative modeling", NeurIPS 2019, §3.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from cnf.divergence import jacobian_rows, sample_probe
from cnf.flows.base import sum_except_batch
from cnf.registry import Registry

__all__ = [
    "LOGDET_ESTIMATORS",
    "POISSON_REFUSED",
    "ROULETTE_DISTRIBUTIONS",
    "ExactLogDet",
    "LogDetEstimator",
    "RouletteLogDet",
    "SeriesLogDet",
    "make_logdet_estimator",
]


def _vjp(gx: Tensor, x: Tensor, w: Tensor, create_graph: bool) -> Tensor:
    """``w^T dg/dx`` per sample (samples are independent, so one call serves the batch)."""
    return torch.autograd.grad(gx, x, w, create_graph=create_graph, retain_graph=True)[0]


def _probe(x: Tensor, kind: str, generator: torch.Generator | None) -> Tensor:
    return sample_probe(tuple(x.shape), kind, dtype=x.dtype, device=x.device, generator=generator)


class LogDetEstimator(ABC):
    """Estimates ``log det(I + dg/dx)`` per sample from ``gx = g(x)`` and ``x``.

    ``__call__(gx, x, create_graph)`` returns shape ``(B,)``. ``x`` must require
    grad and ``gx`` must carry its graph. ``create_graph=True`` makes the
    estimate differentiable (training).
    """

    @abstractmethod
    def __call__(self, gx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        """``log det(I + dg/dx)`` per sample, ``(B,)``."""


class ExactLogDet(LogDetEstimator):
    """Brute-force Jacobian (``D`` vector-Jacobian products) and ``slogdet``; low dimension only."""

    def __call__(self, gx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        rows = jacobian_rows(gx, x, create_graph=create_graph, retain_graph=True)
        jac = rows.transpose(0, 1)  # (B, D_out, D_in)
        eye = torch.eye(jac.shape[-1], dtype=x.dtype, device=x.device)
        return torch.linalg.slogdet(eye + jac)[1]


class SeriesLogDet(LogDetEstimator):
    """Power series truncated at ``n_terms`` with a Hutchinson probe (biased, i-ResNet).

    Args:
        n_terms: Number of terms of the series.
        probe: ``"gaussian"`` or ``"rademacher"``.
        generator: Optional RNG on ``x``'s device, for reproducible probes.
    """

    def __init__(
        self,
        *,
        n_terms: int = 10,
        probe: str = "gaussian",
        generator: torch.Generator | None = None,
    ):
        if n_terms < 1:
            raise ValueError(f"n_terms must be >= 1, got {n_terms}")
        self.n_terms = n_terms
        self.probe = probe
        self.generator = generator

    def __call__(self, gx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        v = _probe(x, self.probe, self.generator)
        weights = x.new_ones(x.shape[0], self.n_terms)
        return _power_series(gx, x, v, weights, create_graph)


ROULETTE_DISTRIBUTIONS = ("geometric",)

POISSON_REFUSED = (
    "Russian roulette with a Poisson number of terms has infinite variance: "
    "P(N >= k) ~ lam^k e^-lam / k! makes the weights 1/P(N >= k) grow like k!/lam^k, "
    "faster than the series terms v^T J^k v / k shrink (like rho(J)^k), whatever lam; "
    "use the geometric distribution (finite variance when rho(J)^2 < 1 - geometric_p)"
)


class RouletteLogDet(LogDetEstimator):
    """Unbiased Russian-roulette estimator of Residual Flows.

    Per sample, ``N = n_exact_terms + M`` terms are computed, ``M`` drawn from a
    geometric distribution, ``P(M = m) = p (1-p)^m``; term ``k`` is divided by
    ``P(N >= k)`` (1 for the always-computed terms), so that

        E[ sum_{k<=N} (-1)^{k+1} v^T J^k v / (k P(N >= k)) ] = log det(I + J).

    Each sample draws its own ``N`` and probe, so the batch holds independent
    estimates.

    **Variance.** The second moment is at least ``sum_k E[(v^T J^k v)^2] /
    (k^2 P(N >= k))``, and ``E[(v^T J^k v)^2]`` decays like ``rho(J)^{2k}``
    (``rho`` the spectral radius, at most ``Lip(g)``). With the geometric
    distribution ``P(N >= k) = (1-p)^{k - n_exact_terms}``, so the variance is
    finite when ``rho(J)^2 < 1 - p``; ``Lip(g)^2 < 1 - p`` guarantees it
    (``Lip(g) < 0.707`` for the default ``p = 0.5``; a looser spectral-norm
    bound is usually still fine because ``rho(J)`` is well below ``Lip(g)``).
    A Poisson number of terms (offered by the Residual Flows code) is refused:
    its tail ``P(N >= k) ~ lam^k/k!`` decays faster than any geometric
    sequence, so the variance is infinite for every rate and every
    non-nilpotent ``J``, and neither the loss's noise nor a reported standard
    error would mean anything.

    Args:
        n_exact_terms: Terms always computed (lower variance, more cost).
        distribution: ``"geometric"`` (``"poisson"`` raises, see above).
        geometric_p: Success probability ``p`` of the geometric distribution.
        probe: ``"gaussian"`` or ``"rademacher"``.
        neumann_grad: Back-propagate the Neumann series for the gradient
            (Residual Flows, §3.2) instead of through the power series: the VJPs
            of the series are taken without a graph, so memory does not grow
            with ``N``. The value is the same estimate; the gradient is a
            different unbiased estimate of the gradient.
        generator: Optional RNG on ``x``'s device, for reproducible draws.

    Raises:
        ValueError: ``distribution="poisson"``, or an unknown distribution.

    References:
        Chen et al. Residual Flows. NeurIPS 2019, §3.1-3.2.
    """

    def __init__(
        self,
        *,
        n_exact_terms: int = 2,
        distribution: str = "geometric",
        geometric_p: float = 0.5,
        probe: str = "gaussian",
        neumann_grad: bool = False,
        generator: torch.Generator | None = None,
    ):
        if distribution == "poisson":
            raise ValueError(POISSON_REFUSED)
        if distribution not in ROULETTE_DISTRIBUTIONS:
            valid = ", ".join(ROULETTE_DISTRIBUTIONS)
            raise ValueError(f"unknown distribution {distribution!r}; valid: {valid}")
        if not 0 < geometric_p < 1:
            raise ValueError(f"geometric_p must be in (0, 1), got {geometric_p}")
        if n_exact_terms < 0:
            raise ValueError(f"n_exact_terms must be >= 0, got {n_exact_terms}")
        self.n_exact_terms = n_exact_terms
        self.distribution = distribution
        self.geometric_p = geometric_p
        self.probe = probe
        self.neumann_grad = neumann_grad
        self.generator = generator

    def _sample_extra(self, b: int, device: torch.device) -> Tensor:
        u = torch.rand(b, generator=self.generator, dtype=torch.float64, device=device)
        # Inverse CDF: P(M >= m) = (1-p)^m; log1p(-u) avoids log(0).
        return torch.floor(torch.log1p(-u) / math.log1p(-self.geometric_p)).long()

    def tail_probability(self, m: Tensor) -> Tensor:
        """``P(M >= m)`` of the random part ``M``, elementwise for an integer tensor ``m``."""
        m = m.to(torch.float64)
        tail = (1.0 - self.geometric_p) ** m.clamp(min=0)
        return torch.where(m <= 0, torch.ones_like(tail), tail)

    def __call__(self, gx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        b = x.shape[0]
        v = _probe(x, self.probe, self.generator)
        n = self.n_exact_terms + self._sample_extra(b, x.device)  # (B,) terms per sample
        n_max = int(n.max())
        if n_max == 0:
            return x.new_zeros(b)
        k = torch.arange(1, n_max + 1, device=x.device)
        inv_tail = (1.0 / self.tail_probability(k - self.n_exact_terms)).to(x.dtype)
        active = k[None, :] <= n[:, None]
        # where, not a product: an inactive term must give 0 even if its 1/P underflows to inf.
        weights = torch.where(active, inv_tail[None, :], torch.zeros_like(inv_tail)[None, :])
        if self.neumann_grad and create_graph:
            return _neumann_series(gx, x, v, weights)
        return _power_series(gx, x, v, weights, create_graph)


def _power_series(gx: Tensor, x: Tensor, v: Tensor, weights: Tensor, create_graph: bool) -> Tensor:
    """``sum_k weights[:, k-1] (-1)^{k+1} v^T J^k v / k`` with ``w_k^T = v^T J^k`` by VJPs."""
    total = x.new_zeros(x.shape[0])
    w = v
    for k in range(1, weights.shape[1] + 1):
        w = _vjp(gx, x, w, create_graph)
        total = total + (-1) ** (k + 1) / k * weights[:, k - 1] * sum_except_batch(w * v)
    return total


def _neumann_series(gx: Tensor, x: Tensor, v: Tensor, weights: Tensor) -> Tensor:
    """Power-series value, with the gradient of Residual Flows' Neumann estimator.

    ``d/dtheta of term k`` is ``(-1)^{k+1} tr(J^{k-1} dJ)`` in expectation, so the
    gradient of the series is that of the surrogate ``s = n^T J v`` with the
    constant ``n^T = sum_k weights_k (-1)^{k+1} v^T J^{k-1}``. The series VJPs
    run without a graph; only the surrogate's single VJP keeps one.
    """
    value = x.new_zeros(x.shape[0])
    n_terms = weights.shape[1]
    w = v
    neumann = weights[:, :1].reshape(-1, *[1] * (v.dim() - 1)) * v
    for k in range(1, n_terms + 1):
        w = _vjp(gx, x, w, create_graph=False).detach()
        value = value + (-1) ** (k + 1) / k * weights[:, k - 1] * sum_except_batch(w * v)
        if k < n_terms:
            wk = weights[:, k].reshape(-1, *[1] * (v.dim() - 1))
            neumann = neumann + (-1) ** k * wk * w
    surrogate = sum_except_batch(_vjp(gx, x, neumann.detach(), create_graph=True) * v)
    return value.detach() + surrogate - surrogate.detach()


LOGDET_ESTIMATORS: Registry[type[LogDetEstimator]] = Registry(
    "log-det estimator",
    {"exact": ExactLogDet, "roulette": RouletteLogDet, "series": SeriesLogDet},
)


def make_logdet_estimator(name: str, **kwargs: Any) -> LogDetEstimator:
    """Build a log-det estimator by name (``exact``, ``series``, ``roulette``)."""
    return LOGDET_ESTIMATORS[name](**kwargs)
