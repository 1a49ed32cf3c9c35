"""Few-step ODE samplers over a velocity field, and the time grids they step on.

A sampler is a plain function of ``(field, x, times)`` (k-diffusion style):
``field(t, x)`` is the ODE's right-hand side ``dx/dt`` with ``t`` a ``(B,)``
tensor (one time, repeated for the batch, in ``x``'s dtype and device; a field
that wants a scalar reads ``t[0]``), ``x`` the ``(B, *event)`` state at
``times[0]`` and ``times`` a 1-D grid, decreasing (noise → data, the
library's sampling direction: data at t = 0, noise at t = 1) or increasing.
Each returns ``(x at times[-1], nfe)`` with the exact number of field
evaluations, so "sampler × steps" sweeps need no special cases
(:data:`ODE_SAMPLERS`):

* :func:`euler` — ``x ← x + h f(t, x)``: N steps, N evaluations, first order.
* :func:`heun` — Heun's method (explicit trapezoidal rule, EDM Algorithm 1
  without churn): an Euler predictor and a trapezoidal corrector, second
  order. As in EDM the last step skips the correction — the last grid point
  is usually the data end (σ = 0, or t = 0 of a diffusion) where the field
  may be singular — so N steps cost ``2N − 1`` evaluations
  (``last_correction=True``: 2N; the method stays second order either way,
  since one Euler step adds only an O(h²) error).

Neither function turns off autograd: wrap sampling in ``torch.no_grad()``.

**Time grids.** :func:`uniform_grid` is uniform in the model's own time.
:func:`karras_grid` is EDM's schedule of noise levels σ (Karras et al. 2022,
eq. 5), dense near the data. A σ grid becomes a time grid of a model through
the model's *EDM noise level* — the noise-to-signal ratio of its marginal
``x_t = m(t) (x_0 + σ z)``:

* a linear SDE of :mod:`cnf.diffusion.sde` with kernel ``N(m(t) x_0, s(t)² I)``:
  ``σ(t) = s(t)/m(t)`` (:func:`sde_time_to_sigma`), inverted in closed form by
  :func:`sigma_to_sde_time`: VP ``σ² = e^{B} − 1``; sub-VP ``σ = 2 sinh(B/2)``
  (``B = ∫_0^t β``); VE ``σ² = σ_min²((σ_max/σ_min)^{2t} − 1)``;
* the straight path of flow matching, ``x_t = (1 − t) x_0 + t x_1``
  (= ``(1 − t)(x_0 + σ x_1)``): ``σ(t) = t/(1 − t)``, ``t = σ/(1 + σ)``
  (:func:`fm_time_to_sigma`, :func:`sigma_to_fm_time`).

On the ``uniform`` grid the samplers step in the model's time ``t``. On the
``karras`` grid a linear SDE's probability-flow ODE is solved in EDM's
variables (:func:`sde_sigma_field`): the noise level σ as time and the
rescaled state ``x̂ = x/m(t)``, where ``dx̂/dσ = −σ ∇ log p(x̂; σ)`` is nearly
straight (for ε-prediction it is ``ε̂`` itself: Euler there is DDIM) — EDM's
Algorithm 1 for a model trained under VP, sub-VP or VE. Flow matching's path
is straight already; it steps in t on both grids.

**In the families.** :func:`sampling_times` builds a model's grid by name
(``uniform`` | ``karras``); score models and INDM's latent
(:data:`cnf.diffusion.samplers.SCORE_SAMPLERS` ``euler``/``heun``) and flow
matching (``sampler=euler|heun``) step the Karras grid over EDM's
``[0.002, 80]`` (the keys ``sigma_min``, ``sigma_max``), clamped to the
model's ``[σ(ε), σ(1)]``; a score model starts at ``x̂ = σ_max z`` as in EDM
(:func:`sde_sigma_start`), flow matching at its prior t = 1 with the first
point moved there (:func:`sampling_times`). The flat keys ``sampler``,
``steps``, ``grid``, ``sigma_min`` and ``sigma_max`` select them, routed by
:func:`route_sampler_keys` (docs/methods.md §4.4, §7).

Example:
    >>> x1 = torch.randn(16, 2)
    >>> times = sigma_to_fm_time(karras_grid(8, 0.002, 80.0))
    >>> x0, nfe = heun(lambda t, x: -x, x1, times)   # nfe == 15

References:
    Karras, Aittala, Aila & Laine, "Elucidating the design space of diffusion-based
    generative models", NeurIPS 2022, arXiv:2206.00364 (eq. 5, Algorithm 1).
    Song et al., "Score-based generative modeling through stochastic differential
    equations", ICLR 2021 (the probability-flow ODE).
    Liu, Gong & Liu, "Flow straight and fast", ICLR 2023 (the straight path).
    Crowson, k-diffusion (github.com/crowsonkb/k-diffusion): samplers as plain functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cnf.diffusion.sde import VESDE, VPSDE, LinearSDE, SubVPSDE
from cnf.registry import Registry

__all__ = [
    "EDM_SIGMA_MAX",
    "EDM_SIGMA_MIN",
    "ODE_SAMPLERS",
    "SOLVER_KEYS",
    "SOLVER_SAMPLER",
    "TIME_GRIDS",
    "VelocityField",
    "euler",
    "few_step_settings",
    "fm_sampling_times",
    "fm_time_to_sigma",
    "heun",
    "karras_grid",
    "karras_range",
    "route_sampler_keys",
    "sampling_times",
    "sde_sampling_times",
    "sde_sigma_field",
    "sde_sigma_grid",
    "sde_sigma_start",
    "sde_time_to_sigma",
    "sigma_to_fm_time",
    "sigma_to_sde_time",
    "uniform_grid",
]

VelocityField = Callable[[Tensor, Tensor], Tensor]
"""``(t, x) -> dx/dt`` with ``t`` of shape ``(B,)`` and ``x``, ``dx/dt`` of shape ``(B, *event)``."""


def _check_times(times: Tensor, x: Tensor) -> Tensor:
    times = torch.as_tensor(times)
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError(
            f"times must be a 1-D grid of at least 2 points, got shape {tuple(times.shape)}"
        )
    steps = times[1:] - times[:-1]
    if not (bool((steps > 0).all()) or bool((steps < 0).all())):
        raise ValueError("times must be strictly increasing or strictly decreasing")
    return times.to(dtype=x.dtype, device=x.device)


def _at(t: Tensor, x: Tensor) -> Tensor:
    return t.expand(x.shape[0])


def euler(field: VelocityField, x: Tensor, times: Tensor) -> tuple[Tensor, int]:
    """Euler's method on ``dx/dt = field(t, x)`` over the grid ``times``.

    Args:
        field: ``(t (B,), x) -> dx/dt``.
        x: State at ``times[0]``, ``(B, *event)``.
        times: 1-D grid of N + 1 points, strictly monotone.

    Returns:
        ``(x at times[-1], N)``: N steps cost N evaluations.
    """
    times = _check_times(times, x)
    for i in range(times.numel() - 1):
        x = x + (times[i + 1] - times[i]) * field(_at(times[i], x), x)
    return x, times.numel() - 1


def heun(
    field: VelocityField, x: Tensor, times: Tensor, *, last_correction: bool = False
) -> tuple[Tensor, int]:
    """Heun's second-order method (EDM Algorithm 1, deterministic) over the grid ``times``.

    Each step ``h = t_{i+1} − t_i``: ``d = f(t_i, x)``, ``x̃ = x + h d``, then
    ``x ← x + h (d + f(t_{i+1}, x̃)) / 2``. The last step stops at the Euler
    predictor unless ``last_correction`` (EDM: no correction into σ = 0).

    Args:
        field: ``(t (B,), x) -> dx/dt``.
        x: State at ``times[0]``, ``(B, *event)``.
        times: 1-D grid of N + 1 points, strictly monotone.
        last_correction: Also correct the last step (the field is then
            evaluated at ``times[-1]``).

    Returns:
        ``(x at times[-1], nfe)`` with ``nfe = 2N − 1`` (``2N`` with ``last_correction``).
    """
    times = _check_times(times, x)
    n = times.numel() - 1
    nfe = 0
    for i in range(n):
        h = times[i + 1] - times[i]
        d = field(_at(times[i], x), x)
        x_pred = x + h * d
        nfe += 1
        if i == n - 1 and not last_correction:
            x = x_pred
        else:
            x = x + 0.5 * h * (d + field(_at(times[i + 1], x_pred), x_pred))
            nfe += 1
    return x, nfe


ODE_SAMPLERS: Registry[Callable[..., tuple[Tensor, int]]] = Registry(
    "ODE sampler", {"euler": euler, "heun": heun}
)


# ------------------------------------------------------------------ time grids
def uniform_grid(
    n: int, t_start: float, t_end: float, *, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``n`` uniform steps from ``t_start`` to ``t_end``: a ``(n + 1,)`` tensor (either direction)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if t_start == t_end:
        raise ValueError(f"t_start and t_end must differ, got {t_start}")
    return torch.linspace(t_start, t_end, n + 1, dtype=dtype)


def karras_grid(
    n: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    *,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """EDM's noise levels for ``n`` steps (Karras et al. 2022, eq. 5), then σ = 0.

    ``σ_i = (σ_max^{1/ρ} + i/(n−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ`` for
    ``i = 0 … n−1`` and ``σ_n = 0``: ``n + 1`` strictly decreasing values from
    ``σ_max`` through ``σ_min`` to 0 (``n = 1``: ``[σ_max, 0]``). ρ = 7 is EDM's
    choice; ρ = 1 is uniform in σ.

    Returns:
        ``(n + 1,)`` tensor.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ramp = (
        torch.linspace(0, 1, n, dtype=torch.float64)
        if n > 1
        else torch.zeros(1, dtype=torch.float64)
    )
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    # Exact endpoints (the power of a root can be off by an ulp).
    sigmas[0] = sigma_max
    if n > 1:
        sigmas[-1] = sigma_min
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)


TIME_GRIDS: Registry[Callable[..., Tensor]] = Registry(
    "time grid", {"uniform": uniform_grid, "karras": karras_grid}
)


# ----------------------------------------------------- σ ↔ model time
def sde_time_to_sigma(sde: LinearSDE, t: Tensor) -> Tensor:
    """EDM noise level ``σ(t) = s(t)/m(t)`` of a linear SDE's kernel ``N(m x_0, s² I)``."""
    m, s = sde.marginal(torch.as_tensor(t))
    return s / m


# VP and sub-VP invert B(t) = ∫_0^t β with the SDE's own stable root (_t_from_integral).
def _vp_time(sde: VPSDE, sigma: Tensor) -> Tensor:
    # σ² = (1 − e^{−B}) / e^{−B} = e^{B} − 1  ⇒  B = log(1 + σ²).
    return sde._t_from_integral(torch.log1p(sigma**2))


def _subvp_time(sde: SubVPSDE, sigma: Tensor) -> Tensor:
    # σ = (1 − e^{−B}) e^{B/2} = 2 sinh(B/2)  ⇒  B = 2 asinh(σ/2).
    return sde._t_from_integral(2 * torch.asinh(sigma / 2))


def _ve_time(sde: VESDE, sigma: Tensor) -> Tensor:
    # σ² = σ_min² (r^{2t} − 1), r = σ_max/σ_min  ⇒  t = log(1 + σ²/σ_min²) / (2 log r).
    return torch.log1p((sigma / sde.sigma_min) ** 2) / (2 * math.log(sde.sigma_max / sde.sigma_min))


_SIGMA_TO_TIME: dict[type, Callable[[LinearSDE, Tensor], Tensor]] = {
    VPSDE: _vp_time,
    SubVPSDE: _subvp_time,
    VESDE: _ve_time,
}


def sigma_to_sde_time(sde: LinearSDE, sigma: Tensor) -> Tensor:
    """The time ``t`` at which the SDE's noise level ``s(t)/m(t)`` is ``sigma`` (closed form).

    Exact inverse of :func:`sde_time_to_sigma` for VP, sub-VP and VE; σ = 0
    maps to t = 0. Noise levels beyond ``σ(1)`` give times beyond 1 (the SDE's
    coefficients extend past T): clamp the grid's ``sigma_max`` to
    ``sde_time_to_sigma(sde, 1)`` to start at the prior.

    Raises:
        ValueError: an SDE class without a closed-form inverse here.
    """
    for cls in type(sde).__mro__:
        if cls in _SIGMA_TO_TIME:
            return _SIGMA_TO_TIME[cls](sde, torch.as_tensor(sigma))
    valid = ", ".join(c.__name__ for c in _SIGMA_TO_TIME)
    raise ValueError(f"no σ → t conversion for {type(sde).__name__}; valid: {valid}")


def fm_time_to_sigma(t: Tensor) -> Tensor:
    """EDM noise level ``t/(1 − t)`` of the straight path ``x_t = (1 − t) x_0 + t x_1``."""
    t = torch.as_tensor(t)
    return t / (1 - t)


def sigma_to_fm_time(sigma: Tensor) -> Tensor:
    """Time ``σ/(1 + σ)`` of the straight path at noise level σ (σ = 0 → t = 0, σ → ∞ → t → 1)."""
    sigma = torch.as_tensor(sigma)
    return sigma / (1 + sigma)


def sde_sigma_field(
    score_fn: Callable[[Tensor, Tensor], Tensor], sde: LinearSDE, *, t_min: float
) -> VelocityField:
    """A linear SDE's probability-flow ODE in EDM's variables: ``dx̂/dσ`` with ``x = m(t) x̂``.

    With the kernel ``N(m x_0, s² I)`` and ``σ = s/m``, ``x̂ = x/m`` is ``x_0``
    plus noise of std σ, so ``dx̂/dσ = −σ ∇_x̂ log p(x̂; σ) = −σ m s_θ(t, m x̂)``
    at ``t = t(σ)`` (:func:`sigma_to_sde_time`, clamped to ``t_min``: the score
    is never asked below ε). Start at ``x̂ = x_T / m(T)``; at σ = 0, ``m = 1``
    and ``x̂`` is the sample.

    Args:
        score_fn: ``(t (B,), x) -> ∇_x log p_t(x)``.
        sde: The model's linear SDE.
        t_min: Smallest time the score is evaluated at.
    """

    def field(sigma: Tensor, x_hat: Tensor) -> Tensor:
        t = sigma_to_sde_time(sde, sigma).clamp(min=t_min)
        m = sde.marginal(t)[0].reshape(-1, *[1] * (x_hat.dim() - 1))
        return -sigma.reshape(m.shape) * m * score_fn(t, m * x_hat)

    return field


EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0
"""EDM's noise-level range (Karras et al. 2022, §5): the Karras grid's default range in every family."""


def _sde_sigma_range(sde: LinearSDE, eps: float) -> tuple[float, float]:
    """``(σ(ε), σ(T))``: the noise levels of a linear SDE's sampling ends."""
    with torch.no_grad():
        ends = sde_time_to_sigma(sde, torch.tensor([eps, sde.T], dtype=torch.float64))
    return float(ends[0]), float(ends[1])


def karras_range(
    sigma_min: float, sigma_max: float, model_min: float, model_max: float
) -> tuple[float, float]:
    """The Karras grid's range: ``[sigma_min, sigma_max]`` clamped to the model's ``[model_min, model_max]``.

    As EDM's sampler does for a network trained on a narrower range (its
    ``max(σ_min, net.σ_min)``, ``min(σ_max, net.σ_max)``).

    Raises:
        ValueError: ``sigma_min >= sigma_max``, or a clamped range that is empty.
    """
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    lo, hi = max(sigma_min, model_min), min(sigma_max, model_max)
    if not lo < hi:
        raise ValueError(
            f"sigma_min={sigma_min}, sigma_max={sigma_max} leave nothing of the model's noise "
            f"range [{model_min:.4g}, {model_max:.4g}]"
        )
    return lo, hi


def sde_sigma_grid(
    sde: LinearSDE,
    steps: int,
    *,
    eps: float | None = None,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    like: Tensor,
) -> Tensor:
    """A linear SDE's Karras grid in σ (``steps + 1`` points): EDM's sampler grid.

    The Karras points over :func:`karras_range` of ``[sigma_min, sigma_max]``
    and the model's ``[σ(ε), σ(T)]``, then 0. Below σ(T) the sampler starts,
    as EDM's does, at ``x̂ = grid[0] · z`` with the prior's standard noise z
    (:func:`sde_sigma_start`): at that noise level the data is a point.
    """
    model_min, model_max = _sde_sigma_range(sde, sde.eps if eps is None else eps)
    lo, hi = karras_range(sigma_min, sigma_max, model_min, model_max)
    return karras_grid(steps, lo, hi).to(dtype=like.dtype, device=like.device)


def sde_sigma_start(sde: LinearSDE, x_T: Tensor, sigma_start: float) -> Tensor:
    """The EDM state ``x̂`` at noise level ``sigma_start`` ≤ σ(T) from the prior's draw ``x_T``.

    ``x̂ = σ_start · x_T / s(T)``: the prior's standard noise scaled to
    ``sigma_start``, EDM's ``σ_max · z`` (the data's own spread and mean are
    dropped, as there). At ``sigma_start = σ(T)`` it is ``x_T / m(T)``
    exactly, the prior itself in EDM's variables.
    """
    std_T = float(sde.marginal(torch.tensor(sde.T, dtype=torch.float64))[1])
    return x_T * (sigma_start / std_T)


# ------------------------------------------------ a model's fixed sampling grid
def sampling_times(
    grid: str,
    steps: int,
    *,
    t_start: float,
    t_end: float,
    sigma_min: float,
    sigma_max: float,
    sigma_to_time: Callable[[Tensor], Tensor],
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``steps + 1`` times a fixed-grid sampler visits, from the noise end to the data end.

    * ``uniform`` — uniform in the model's time from ``t_start`` to ``t_end``;
    * ``karras`` — :func:`karras_grid` ``(steps, sigma_min, sigma_max)`` (ρ = 7)
      mapped to the model's time by ``sigma_to_time``, with the first point
      set to ``t_start`` (the prior's time, where σ may be infinite, as for
      flow matching) and the last at σ = 0, the data end — as in EDM, whose
      last step is an Euler step from ``sigma_min`` to 0 (docs/methods.md §4.4).

    Args:
        grid: A name of :data:`TIME_GRIDS`.
        steps: Number of steps N (≥ 1).
        t_start, t_end: Noise and data ends of the uniform grid (e.g. 1 and ε).
        sigma_min, sigma_max: Noise-level range of the Karras grid.
        sigma_to_time: The model's map σ → t (:func:`sigma_to_sde_time`, :func:`sigma_to_fm_time`).
        dtype, device: Of the returned ``(N + 1,)`` tensor.
    """
    TIME_GRIDS.check(grid, key="grid")
    if grid == "uniform":
        times = uniform_grid(steps, t_start, t_end)
    else:
        times = sigma_to_time(karras_grid(steps, sigma_min, sigma_max)).to(torch.float64)
        times[0] = t_start
    return times.to(dtype=dtype, device=device)


def sde_sampling_times(
    sde: LinearSDE,
    grid: str,
    steps: int,
    *,
    eps: float | None = None,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    like: Tensor,
) -> Tensor:
    """A linear SDE's probability-flow grid in t: uniform 1 → ε, or the Karras points in t.

    The Karras points are :func:`sde_sigma_grid`'s mapped to t, with the first
    moved to T (:func:`sampling_times`) — a grid in t for a sampler that steps
    in t from the prior; the SDE samplers' ``karras`` grid steps in σ instead.
    """
    eps = sde.eps if eps is None else eps
    model_min, model_max = _sde_sigma_range(sde, eps)
    if grid == "karras":
        sigma_min, sigma_max = karras_range(sigma_min, sigma_max, model_min, model_max)
    return sampling_times(
        grid,
        steps,
        t_start=sde.T,
        t_end=eps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        sigma_to_time=lambda sigma: sigma_to_sde_time(sde, sigma),
        dtype=like.dtype,
        device=like.device,
    )


def fm_sampling_times(
    grid: str,
    steps: int,
    *,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    like: Tensor,
) -> Tensor:
    """Flow matching's grid from t = 1 to 0: uniform, or Karras over ``[sigma_min, sigma_max]``, first point t = 1."""
    if grid == "karras":
        karras_range(sigma_min, sigma_max, 0.0, math.inf)
    return sampling_times(
        grid,
        steps,
        t_start=1.0,
        t_end=0.0,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        sigma_to_time=sigma_to_fm_time,
        dtype=like.dtype,
        device=like.device,
    )


# ------------------------------------------------ flat keys of the samplers
SOLVER_SAMPLER = "ode"
"""The sampler name that means "the ODE through :func:`cnf.solve.integrate` with the solver settings"."""

SOLVER_KEYS = frozenset(
    {"method", "name", "solver.name", "rtol", "atol", "tol", "adjoint", "max_steps", "seminorm"}
)
"""Flat keys that only make sense for the solver: given without a sampler, they select it."""


def route_sampler_keys(changes: dict[str, Any], sampler: str) -> dict[str, Any]:
    """Flat setting keys of a family whose samplers are the solver (``ode``) and :data:`ODE_SAMPLERS`.

    Solver keys (:data:`SOLVER_KEYS`) without ``sampler`` select ``ode``;
    under ``ode`` a bare ``steps`` is the solver's (``solver.steps``),
    otherwise the fixed-grid sampler's. A ``Settings.route`` hook
    (:func:`cnf.settings.update`) for score models, INDM and flow matching.

    Args:
        changes: The flat changes (modified and returned).
        sampler: The settings' current sampler.
    """
    if "sampler" not in changes and SOLVER_KEYS & set(changes):
        changes["sampler"] = SOLVER_SAMPLER
    if changes.get("sampler", sampler) == SOLVER_SAMPLER and "steps" in changes:
        changes["solver.steps"] = changes.pop("steps")
    return changes


def few_step_settings(
    heun_steps: tuple[int, ...] = (5, 10, 25, 50), euler_steps: tuple[int, ...] = (10, 20, 50, 100)
) -> list[dict[str, Any]]:
    """Named cost settings of the few-step samplers, on both grids, at matching NFE.

    Heun with N steps costs 2N − 1 evaluations, so the defaults compare Heun
    at 9, 19, 49, 99 NFE with Euler at 10, 20, 50, 100 (docs/methods.md §8.4).
    Part of the default cost grid of every family that samples by an ODE.
    """
    return [
        {"sampler": sampler, "grid": grid, "steps": n}
        for sampler, steps in (("heun", heun_steps), ("euler", euler_steps))
        for grid in ("karras", "uniform")
        for n in steps
    ]
