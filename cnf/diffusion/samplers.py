"""Samplers for score models: reverse SDE (Euler–Maruyama, predictor–corrector, torchsde) and ODE.

Data at t = 0, noise at t = 1 (docs/methods.md §1, §4): every sampler starts from
``x_T ~ π`` at t = 1 and integrates back to the truncation time ε. Each is a
plain function of ``(score_fn, sde, x_T, options, *, generator)`` (k-diffusion
style) returning ``(x_ε, {"nfe": score evaluations, ...})``, so "sampler ×
steps" sweeps need no special cases. :data:`SCORE_SAMPLERS` names them.

Reverse-time SDE (Anderson 1982; Song et al. 2021, eq. 6)::

    dx = [f(t) x − g(t)² s(x, t)] dt + g(t) dw̄        (t from 1 down to ε)

* :func:`euler_maruyama` — ``x ← x − [f x − g² s] Δt + g √Δt z`` on a uniform
  grid; the last step adds no noise (it returns the step's mean: the noise
  of size ``g(ε)√Δt`` would only blur the samples).
* :func:`predictor_corrector` — before each predictor step, ``corrector_steps``
  Langevin steps ``x ← x + δ s + √(2δ) z`` targeting ``p_t``, with
  ``δ = 2 α (snr ‖z‖ / ‖s‖)²``, norms averaged over the batch (Song et al.
  2021, Alg. 4/5): ``α = 1`` for VE (Alg. 4) and ``α_i = 1 − β_i`` of the
  discretised VP chain (Alg. 5), ``≈ 1 − β(t_i) Δt`` (:func:`langevin_alpha`);
  sub-VP uses the VP rule, as Song et al.'s code does.
* :func:`probability_flow_sample` — ``dx/dt = f x − ½ g² s`` through
  :func:`cnf.solve.integrate` (adaptive tolerance or fixed steps).
* :func:`probability_flow_euler`, :func:`probability_flow_heun` — the same
  ODE by the few-step samplers of :mod:`cnf.diffusion.ode_samplers` on a
  ``uniform`` grid in t (1 → ε) or EDM's ``karras`` grid of noise levels
  (σ(1) → σ(ε) → 0, ρ = 7): N steps cost N and 2N − 1 evaluations.
* :func:`sdeint_sample` — the reverse SDE through ``torchsde.sdeint`` (any of
  its Itô methods; no noise-free last step).

References:
    Anderson, "Reverse-time diffusion equation models", 1982.
    Song et al., "Score-based generative modeling through SDEs", ICLR 2021.
    Karras et al., "Elucidating the design space of diffusion-based generative
    models", NeurIPS 2022 (the sampler-as-plain-function interface).
    Li et al., "Scalable gradients for stochastic differential equations", AISTATS 2020 (torchsde).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cnf.diffusion.likelihood import ProbabilityFlow
from cnf.diffusion.ode_samplers import (
    EDM_SIGMA_MAX,
    EDM_SIGMA_MIN,
    ODE_SAMPLERS,
    TIME_GRIDS,
    karras_range,
    sde_sampling_times,
    sde_sigma_field,
    sde_sigma_grid,
    sde_sigma_start,
)
from cnf.diffusion.score import ScoreFn
from cnf.diffusion.sde import LinearSDE, expand_as
from cnf.registry import Registry
from cnf.solve import SolverConfig, integrate

__all__ = [
    "SCORE_SAMPLERS",
    "SDE_METHODS",
    "SamplerOptions",
    "euler_maruyama",
    "langevin_alpha",
    "langevin_step",
    "predictor_corrector",
    "probability_flow_euler",
    "probability_flow_heun",
    "probability_flow_sample",
    "sdeint_sample",
    "time_grid",
]


SDE_METHODS: Registry[str] = Registry(
    "torchsde method", {"euler": "Euler–Maruyama", "milstein": "Milstein", "srk": "stochastic RK"}
)


@dataclass(frozen=True)
class SamplerOptions:
    """The options every sampler takes (each reads the ones it uses).

    Attributes:
        steps: Time steps of the SDE samplers (``em``, ``pc``, ``sdeint``) and
            of the fixed-grid ODE samplers (``euler``, ``heun``).
        grid: Time grid of ``euler`` and ``heun``: ``karras`` | ``uniform``.
        sigma_min, sigma_max: Noise-level range of the ``karras`` grid, clamped
            to the SDE's ``[σ(ε), σ(1)]`` (default EDM's ``[0.002, 80]``); below
            σ(1) the sampler starts at ``σ_max z``, as EDM's does
            (:func:`~cnf.diffusion.ode_samplers.sde_sigma_start`).
        solver: ODE solver of the ``ode`` sampler (fixed-step methods carry their steps).
        snr, corrector_steps: Langevin corrector of ``pc``.
        sde_method: torchsde method of ``sdeint``.
        eps: End time (None: the SDE's truncation time).
    """

    steps: int = 500
    solver: SolverConfig = SolverConfig()
    snr: float = 0.16
    corrector_steps: int = 1
    sde_method: str = "euler"
    eps: float | None = None
    grid: str = "karras"
    sigma_min: float = EDM_SIGMA_MIN
    sigma_max: float = EDM_SIGMA_MAX

    def __post_init__(self) -> None:
        TIME_GRIDS.check(self.grid, key="grid")
        karras_range(self.sigma_min, self.sigma_max, 0.0, math.inf)  # checks 0 < min < max
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.snr <= 0 or self.corrector_steps < 0:
            raise ValueError(
                f"need snr > 0 and corrector_steps >= 0, got {self.snr}, {self.corrector_steps}"
            )
        SDE_METHODS.check(self.sde_method, key="sde_method")


DEFAULT_OPTIONS = SamplerOptions()

# Every sampler: (score_fn, sde, x_T, options, *, generator) -> (x_ε, {"nfe": ...}).
Sampler = Callable[..., tuple[Tensor, dict[str, Any]]]


def time_grid(sde: LinearSDE, steps: int, *, eps: float | None = None, like: Tensor) -> Tensor:
    """Uniform grid ``1 = t_0 > t_1 > … > t_steps = ε`` as a ``(steps + 1,)`` tensor."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    eps = sde.eps if eps is None else eps
    return torch.linspace(sde.T, eps, steps + 1, dtype=like.dtype, device=like.device)


def _reverse_drift(score_fn: ScoreFn, sde: LinearSDE, x: Tensor, t: Tensor) -> Tensor:
    """``f x − g² s`` at one time ``t`` (0-dim), for the whole batch."""
    tb = t.expand(x.shape[0])
    return sde.drift(tb, x) - expand_as(sde.g2(tb), x) * score_fn(tb, x)


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


@torch.no_grad()
def euler_maruyama(
    score_fn: ScoreFn,
    sde: LinearSDE,
    x_T: Tensor,
    options: SamplerOptions = DEFAULT_OPTIONS,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Euler–Maruyama on the reverse SDE from 1 to ε, noise-free last step.

    Args:
        score_fn: ``(t, x) -> s`` with ``t`` ``(B,)``.
        sde: The forward SDE.
        x_T: Prior draws ``(B, *event)``.
        options: ``steps`` (= NFE) and ``eps`` (end time, default ``sde.eps``).
        generator: For the Brownian increments.

    Returns:
        ``(x_ε, {"nfe": steps})``.
    """
    steps = options.steps
    ts = time_grid(sde, steps, eps=options.eps, like=x_T)
    x = x_T
    for i in range(steps):
        t, dt = ts[i], ts[i] - ts[i + 1]
        x = x - _reverse_drift(score_fn, sde, x, t) * dt
        if i < steps - 1:
            x = x + sde.g(t) * dt.sqrt() * _noise(x, generator)
    return x, {"nfe": steps}


def langevin_alpha(sde: LinearSDE, t: Tensor, t_next: Tensor) -> Tensor:
    """The ``α_i`` of the Langevin step size at time ``t`` (grid step ``t -> t_next < t``).

    Song et al. (2021, Alg. 5) scale the corrector's step by ``α_i = 1 − β_i``,
    the per-step signal retention of the discretised VP chain
    ``x_i = √(1 − β_i) x_{i−1} + √β_i z`` (their code: ``1 − β(t)/N``, i.e.
    ``1 − β(t) Δt``), and use ``α = 1`` for VE (Alg. 4). Here ``α_i`` is the
    retention of the linear SDE over the grid step ending at ``t``,

        α_i = m(t)² / m(t_next)² = exp(−∫_{t_next}^{t} β),

    which is ``1 − β(t) Δt + O(Δt²)`` for VP (about 2e-4 apart at t = 1 with
    1000 steps) and stays in ``(0, 1]`` for any number of steps, where
    ``1 − β Δt`` turns negative once ``β Δt > 1`` (t = 1 with 20 steps or fewer). Sub-VP has VP's mean coefficient, so it gets the same
    ``α`` (Song et al.'s code treats it as VP too); for VE ``m = 1`` and
    ``α = 1``.

    Args:
        sde: The forward SDE.
        t, t_next: 0-dim times, ``t_next < t`` (the predictor's next time).

    Returns:
        0-dim ``α``.
    """
    m, m_next = sde.marginal(t)[0], sde.marginal(t_next)[0]
    return (m / m_next).pow(2)


@torch.no_grad()
def langevin_step(
    score_fn: ScoreFn,
    x: Tensor,
    t: Tensor,
    *,
    snr: float,
    alpha: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One Langevin step targeting ``p_t``, step size ``δ = 2 α (snr ‖z‖/‖s‖)²``.

    Args:
        score_fn: ``(t, x) -> s``.
        x: Current points ``(B, *event)``.
        t: 0-dim time.
        snr: Signal-to-noise ratio ``r``.
        alpha: ``α`` of Song et al. (2021, Alg. 4/5): 1 for VE,
            :func:`langevin_alpha` for VP and sub-VP.
        generator: For the noise ``z``.

    Returns:
        ``x + δ s + √(2δ) z``, shape of ``x``.
    """
    tb = t.expand(x.shape[0])
    grad = score_fn(tb, x)
    z = _noise(x, generator)
    b = x.shape[0]
    # ‖δ s‖ / ‖√(2δ) z‖ = snr √α with batch-averaged norms (Song et al. 2021,
    # Alg. 4/5). Per-sample norms would give points near a mode (‖s‖ ≈ 0) huge
    # steps, which in low dimension throws them far out.
    gnorm = grad.reshape(b, -1).norm(dim=1).mean().clamp_min(1e-12)
    znorm = z.reshape(b, -1).norm(dim=1).mean()
    delta = 2 * alpha * (snr * znorm / gnorm).pow(2)
    return x + delta * grad + (2 * delta).sqrt() * z


@torch.no_grad()
def predictor_corrector(
    score_fn: ScoreFn,
    sde: LinearSDE,
    x_T: Tensor,
    options: SamplerOptions = DEFAULT_OPTIONS,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Predictor–corrector sampling: Langevin corrector, then an Euler–Maruyama predictor step.

    The corrector's step size is ``δ = 2 α_i (snr ‖z‖/‖s‖)²`` with ``α_i`` from
    :func:`langevin_alpha`: 1 for VE (Song et al. 2021, Alg. 4), the VP chain's
    ``α_i = 1 − β_i ≈ 1 − β(t_i) Δt`` for VP (Alg. 5) and, following Song et
    al.'s code, for sub-VP.

    Options: ``steps``; ``snr``, the signal-to-noise ratio of the Langevin
    steps (0.16 in Song et al. for VE on CIFAR-10; smaller is gentler);
    ``corrector_steps``, Langevin steps per time step.

    Returns:
        ``(x_ε, {"nfe": steps · (1 + corrector_steps)})``.
    """
    steps, snr, corrector_steps = options.steps, options.snr, options.corrector_steps
    ts = time_grid(sde, steps, eps=options.eps, like=x_T)
    x = x_T
    for i in range(steps):
        t, dt = ts[i], ts[i] - ts[i + 1]
        alpha = langevin_alpha(sde, t, ts[i + 1])
        for _ in range(corrector_steps):
            x = langevin_step(score_fn, x, t, snr=snr, alpha=alpha, generator=generator)
        x = x - _reverse_drift(score_fn, sde, x, t) * dt
        if i < steps - 1:
            x = x + sde.g(t) * dt.sqrt() * _noise(x, generator)
    return x, {"nfe": steps * (1 + corrector_steps)}


@torch.no_grad()
def probability_flow_sample(
    score_fn: ScoreFn,
    sde: LinearSDE,
    x_T: Tensor,
    options: SamplerOptions = DEFAULT_OPTIONS,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Integrate the probability-flow ODE from 1 to ε with :func:`cnf.solve.integrate`.

    Options: ``solver``, adaptive (``dopri5`` + tolerances) or fixed-step
    (``euler``, ``rk4`` + steps). ``generator`` is unused (the ODE is
    deterministic).

    Returns:
        ``(x_ε, {"nfe": forward NFE, "solver": settings})``.
    """
    solver = options.solver
    eps = sde.eps if options.eps is None else options.eps
    field = ProbabilityFlow(score_fn, sde, t_min=eps)
    sol = integrate(field, x_T, t0=sde.T, t1=eps, solver=solver)
    return sol.z, {"nfe": sol.stats.nfe_forward, "solver": solver.describe()}


def _probability_flow_fixed_grid(method: str, doc: str) -> Sampler:
    """A sampler of the shared signature: ``method`` of ODE_SAMPLERS on the probability-flow ODE."""

    @torch.no_grad()
    def sample(
        score_fn: ScoreFn,
        sde: LinearSDE,
        x_T: Tensor,
        options: SamplerOptions = DEFAULT_OPTIONS,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        eps = sde.eps if options.eps is None else options.eps
        if options.grid == "karras":  # EDM: in σ on the rescaled state x̂ = x / m(t)
            sigmas = sde_sigma_grid(
                sde,
                options.steps,
                eps=eps,
                sigma_min=options.sigma_min,
                sigma_max=options.sigma_max,
                like=x_T,
            )
            field = sde_sigma_field(score_fn, sde, t_min=eps)
            x_hat = sde_sigma_start(sde, x_T, float(sigmas[0]))
            x, nfe = ODE_SAMPLERS[method](field, x_hat, sigmas)
        else:
            field = ProbabilityFlow(score_fn, sde, t_min=eps)
            times = sde_sampling_times(sde, options.grid, options.steps, eps=eps, like=x_T)
            x, nfe = ODE_SAMPLERS[method](field, x_T, times)
        return x, {"nfe": nfe, "grid": options.grid}

    sample.__name__ = sample.__qualname__ = f"probability_flow_{method}"
    sample.__doc__ = doc
    return sample


probability_flow_euler = _probability_flow_fixed_grid(
    "euler",
    """Euler's method on the probability-flow ODE over ``options.grid`` with ``options.steps`` steps.

    Returns:
        ``(x, {"nfe": steps, "grid": ...})``; ``generator`` is unused (deterministic).
    """,
)

probability_flow_heun = _probability_flow_fixed_grid(
    "heun",
    """Heun's second-order method (EDM Algorithm 1, no churn) on the probability-flow ODE.

    On the ``karras`` grid this is EDM's deterministic sampler for the
    model's SDE (docs/methods.md §4.4): the last step, from σ(ε) to σ = 0, is
    an Euler step, so the score is never evaluated below ε.

    Returns:
        ``(x, {"nfe": 2 · steps − 1, "grid": ...})``; ``generator`` is unused.
    """,
)


class _ReverseSDE(nn.Module):
    """The reverse SDE in torchsde's forward time ``τ = 1 − t`` (diagonal Itô noise)."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, score_fn: ScoreFn, sde: LinearSDE, shape: tuple[int, ...]):
        super().__init__()
        self.score_fn, self.sde, self.shape = score_fn, sde, shape
        self.nfe = 0

    def f(self, tau: Tensor, y: Tensor) -> Tensor:
        self.nfe += 1
        x = y.reshape(self.shape)
        t = (self.sde.T - tau).to(y).expand(x.shape[0])
        # dτ = −dt, so the drift changes sign; the noise term keeps its law.
        return -(self.sde.drift(t, x) - expand_as(self.sde.g2(t), x) * self.score_fn(t, x)).reshape(
            y.shape
        )

    def g(self, tau: Tensor, y: Tensor) -> Tensor:
        t = (self.sde.T - tau).to(y)
        return self.sde.g(t) * torch.ones_like(y)


@torch.no_grad()
def sdeint_sample(
    score_fn: ScoreFn,
    sde: LinearSDE,
    x_T: Tensor,
    options: SamplerOptions = DEFAULT_OPTIONS,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """The reverse SDE through ``torchsde.sdeint`` with ``steps`` fixed steps.

    Options: ``steps``; ``sde_method``, a torchsde Itô method for diagonal
    noise (``euler``, ``milstein``, ``srk``). ``generator`` seeds torchsde's
    Brownian interval (reproducible draws).

    Returns:
        ``(x_ε, {"nfe": drift evaluations})``.
    """
    import torchsde

    steps, method = options.steps, options.sde_method
    eps = sde.eps if options.eps is None else options.eps
    shape = tuple(x_T.shape)
    rsde = _ReverseSDE(score_fn, sde, shape)
    y0 = x_T.reshape(shape[0], -1)
    span = sde.T - eps
    ts = torch.tensor([0.0, span], dtype=x_T.dtype, device=x_T.device)
    entropy = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    bm = torchsde.BrownianInterval(
        t0=0.0, t1=span, size=y0.shape, dtype=x_T.dtype, device=x_T.device, entropy=entropy
    )
    ys = torchsde.sdeint(rsde, y0, ts, method=method, dt=span / steps, bm=bm)
    return ys[-1].reshape(shape), {"nfe": rsde.nfe}


SCORE_SAMPLERS: Registry[Sampler] = Registry(
    "sampler",
    {
        "em": euler_maruyama,
        "pc": predictor_corrector,
        "ode": probability_flow_sample,
        "euler": probability_flow_euler,
        "heun": probability_flow_heun,
        "sdeint": sdeint_sample,
    },
)
