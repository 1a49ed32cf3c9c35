"""Likelihood of a score model through its probability-flow ODE (a CNF).

Data at t = 0, noise at t = 1 (docs/methods.md §1, §4). The probability-flow ODE

    dx/dt = f(t) x − ½ g(t)² s_θ(x, t)

has the same marginals as the forward SDE when ``s_θ`` is the true score
(Song et al. 2021, §4.3). It is a CNF, so its log-likelihood comes from the
instantaneous change of variables through the library's one ODE solve
(:func:`cnf.flows.base.flow_log_prob` over a :class:`~cnf.flows.cnf.CNF`
block: any torchdiffeq solver, exact or Hutchinson divergence, NFE
reported), integrated **from ε to 1**:

    log p_ε(x) = log π(x(1)) + ∫_ε^1 tr(∂f_ODE/∂x) dt,        x(ε) = x.

This is the likelihood of the *ODE model*, not of the SDE model whose
bound is :func:`cnf.diffusion.score.nelbo`.

**The interval [0, ε]** (``correction``):

* ``"truncate"`` (default) — the data point is placed at t = ε: the NLL is
  ``−log p_ε(x)``, the exact log-density of the normalised model
  ``x = Φ_{1→ε}(x_1)``, ``x_1 ~ π``, whose samples are the ODE sampler's
  output at ε. With the true score ``p_ε = N(m_ε x_0, σ_ε²)``-smoothed data
  (σ_ε ≈ 1e-3 for VP at ε = 1e-5); the truncation is the only approximation
  (Song et al. 2021's reported NLLs use it).
* ``"perturb"`` — the Gaussian decoder of the NELBO: the model is
  ``x_0 | x_ε ~ N(x_ε/m_ε, (σ_ε/m_ε)² I)`` on top of the ODE model at ε, and
  with the variational posterior ``x_ε | x_0 ~ p_{0ε}`` the bound is

      −log p(x_0) ≤ E_{z}[ −log p_ε(m_ε x_0 + σ_ε z) ] − D log m_ε

  (the two Gaussian log-densities cancel up to their normalisers). One draw
  of ``z`` per point gives an unbiased estimate of this upper bound
  (Song et al. 2021a, App.; Kim et al. 2022).

References:
    Song et al., "Score-based generative modeling through SDEs", ICLR 2021.
    Song, Durkan, Murray & Ermon, "Maximum likelihood training of score-based
    diffusion models", NeurIPS 2021 (2021a).
    Kim et al., "Soft truncation: a universal training technique of score-based
    diffusion model for high precision score estimation", ICML 2022.
    Grathwohl et al., "FFJORD", ICLR 2019.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from cnf.diffusion.sde import LinearSDE, expand_as
from cnf.divergence import DivergenceEstimator, ExactDivergence
from cnf.flows.base import FlowSettings, flow_log_prob, flow_log_prob_probes
from cnf.flows.cnf import CNF
from cnf.registry import Registry
from cnf.solve import SolverConfig

__all__ = ["CORRECTIONS", "ProbabilityFlow", "probability_flow_cnf", "probability_flow_nll"]

CORRECTIONS: Registry[str] = Registry(
    "[0, ε] correction", {"truncate": "data at t = ε", "perturb": "Gaussian decoder bound"}
)


class ProbabilityFlow(nn.Module):
    """The vector field ``(t, x) -> f(t) x − ½ g(t)² s(t, x)`` of the probability-flow ODE.

    Args:
        score_fn: Score ``(t, x) -> s`` with ``t`` of shape ``(B,)`` (an
            ``nn.Module`` for adjoint gradients, e.g. :class:`ScoreNetwork`).
        sde: The forward SDE.
        t_min: Times below this are evaluated at ``t_min`` (default ``sde.eps``).

    torchdiffeq's adaptive solvers step past the end of the interval and
    interpolate back, so stages are evaluated slightly beyond ε (where σ(t)² < 0
    for t < 0 would give NaN) or beyond 1. The field is therefore continued
    constantly in t outside ``[t_min, T]``; inside it is unchanged.

    If ``score_fn`` has ``score_with_jacobian`` (vector data), the field gets
    ``forward_with_jacobian`` (``J[i, b, j] = ∂f_j/∂x_i``, shape ``(D, B, D)``)
    and :class:`~cnf.divergence.ExactDivergence` takes its trace and Frobenius
    norm from it, with no ``autograd.grad`` call.
    """

    def __init__(self, score_fn: Any, sde: LinearSDE, *, t_min: float | None = None):
        super().__init__()
        self.score_fn = score_fn
        self.sde = sde
        self.t_min = sde.eps if t_min is None else float(t_min)
        if getattr(score_fn, "has_jacobian", False):
            self.forward_with_jacobian = self._forward_with_jacobian

    def _t(self, t: Tensor | float, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).clamp(self.t_min, self.sde.T)
        return t.expand(x.shape[0]) if t.dim() == 0 else t

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        t = self._t(t, x)
        return self.sde.drift(t, x) - 0.5 * expand_as(self.sde.g2(t), x) * self.score_fn(t, x)

    def _forward_with_jacobian(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        t = self._t(t, x)
        s, js = self.score_fn.score_with_jacobian(t, x)
        g2 = self.sde.g2(t)
        field = self.sde.drift(t, x) - 0.5 * g2.reshape(-1, 1) * s
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).unsqueeze(1)
        jac = self.sde.f(t).reshape(1, -1, 1) * eye - 0.5 * g2.reshape(1, -1, 1) * js
        return field, jac


def probability_flow_nll(
    score_fn: Any,
    sde: LinearSDE,
    x: Tensor,
    *,
    solver: SolverConfig,
    divergence: DivergenceEstimator | None = None,
    eps: float | None = None,
    correction: str = "truncate",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Negative log-likelihood of ``x`` under the probability-flow ODE model, in nats.

    Args:
        score_fn: ``(t, x) -> s``.
        sde: The forward SDE (its prior is the base density at t = 1).
        x: Data ``(B, *event)``.
        solver: Solver settings (e.g. ``SolverConfig("dopri5", rtol=1e-5, atol=1e-5)``).
        divergence: Trace estimator (default exact).
        eps: Start time (default ``sde.eps``).
        correction: ``truncate`` | ``perturb`` (module docstring).
        generator: For the ``perturb`` noise.

    Returns:
        ``(nll (B,), stats)`` with ``stats = {"nfe": forward NFE, "z": x(1)}``
        and, for a ``per_probe`` Hutchinson estimator with ``K`` probes,
        ``stats["nll_probes"]`` ``(B, K)``: the NLL once per probe (``nll`` is
        their mean).
    """
    CORRECTIONS.check(correction)
    eps = sde.eps if eps is None else eps
    divergence = divergence or ExactDivergence()
    d = x[0].numel()
    x_eps, offset = x, 0.0
    if correction == "perturb":
        m, s = sde.marginal(torch.tensor(eps, dtype=torch.float64))
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_eps = float(m) * x + float(s) * z
        offset = -d * math.log(float(m))
    flow = probability_flow_cnf(score_fn, sde, eps=eps)
    logp, out = flow_log_prob(
        flow, sde.prior, x_eps, FlowSettings(solver=solver, divergence=divergence)
    )
    stats: dict[str, Any] = {"nfe": out.stats.nfe_forward, "z": out.z}
    probes = flow_log_prob_probes(logp, out)
    if probes is not None:
        stats["nll_probes"] = offset - probes
    return -logp + offset, stats


def probability_flow_cnf(score_fn: Any, sde: LinearSDE, *, eps: float | None = None) -> CNF:
    """The probability-flow ODE as a :class:`~cnf.flows.cnf.CNF` block on ``[ε, T]``."""
    eps = sde.eps if eps is None else eps
    return CNF(ProbabilityFlow(score_fn, sde, t_min=eps), t0=eps, time_length=sde.T - eps)
