"""Time grids, diffusion schedules g(t) and fixed base drifts for DiffFlow.

Convention (docs/methods.md §1): data at ``t = t_start`` (≈ 0), prior at
``t = t_end = T``. A grid is ``t_0 = t_start < t_1 < … < t_N = t_end``.

Every schedule is written in the *normalised* time
``u = (t − t_start) / (t_end − t_start) ∈ [0, 1]``, so ``start``/``end``
values are the values at the two ends of the grid whatever the interval —
the released 2-D setup lives on ``[0.001, 0.05]``, images on ``[1e-4, 0.1]``
and a VP-like diffusion on ``[0.001, 1]``; for the VP schedule on
``[≈0, 1]`` ``u ≈ t`` and ``β(u)`` is the β(t) of docs/methods.md §4.

References:
    Zhang & Chen, "Diffusion Normalizing Flow", NeurIPS 2021, arXiv:2110.07579
    (§3: the discretisation; released code: power-0.9 grid on [0.001, 0.05],
    constant g = 0.2, stratified random grids during training).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cnf.registry import Registry

__all__ = [
    "BASE_DRIFTS",
    "DIFFUSIONS",
    "GRIDS",
    "DiffusionSchedule",
    "TimeGrid",
    "build_diffusion",
]


# --------------------------------------------------------------------- grids
def _uniform_warp(power: float) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    return (lambda t: t), (lambda v: v)


def _power_warp(power: float) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    return (lambda t: t.pow(power)), (lambda v: v.pow(1.0 / power))


# name → (power ↦ (warp, unwarp)): the grid is uniform in warp(t).
GRIDS: Registry[Callable[[float], tuple[Callable, Callable]]] = Registry(
    "time grid", {"uniform": _uniform_warp, "power": _power_warp}
)


@dataclass(frozen=True)
class TimeGrid:
    """A family of time grids on ``[t_start, t_end]``, one per number of steps.

    ``name="uniform"`` spaces ``t`` evenly; ``name="power"`` spaces ``t**power``
    evenly (the released 2-D default is ``power = 0.9`` on ``[0.001, 0.05]``:
    slightly finer steps near the data). ``random=True`` asks for a
    *stratified* random grid (the released code's ``ExpTimer.rand``): the end
    points stay fixed and the ``N − 1`` interior points are drawn one per
    stratum of ``N − 1`` equal cells of the warped interval. Consecutive
    points may come arbitrarily close; nothing in the path NELBO is singular
    as ``Δt → 0`` (the step terms are O(√Δt) there).

    Args:
        name: One of :data:`GRIDS`.
        t_start: Time of the data end, ``> 0`` for ``power`` grids.
        t_end: Time of the prior end ``T``.
        power: Exponent of the ``power`` grid.
    """

    name: str = "power"
    t_start: float = 1e-3
    t_end: float = 0.05
    power: float = 0.9

    def __post_init__(self) -> None:
        GRIDS.check(self.name)
        if not 0 <= self.t_start < self.t_end:
            raise ValueError(
                f"time grid needs 0 <= t_start < t_end, got [{self.t_start}, {self.t_end}]"
            )
        if self.name == "power" and (self.power <= 0 or (self.t_start == 0 and self.power < 1)):
            raise ValueError("power grid needs power > 0 (and t_start > 0 when power < 1)")

    def normalise(self, t: Tensor) -> Tensor:
        """``u = (t − t_start) / (t_end − t_start)``: the time the networks see."""
        return (t - self.t_start) / (self.t_end - self.t_start)

    def times(
        self,
        steps: int,
        *,
        random: bool = False,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """The grid ``t_0 < … < t_N`` of ``steps = N`` steps, shape ``(N + 1,)``."""
        if steps < 1:
            raise ValueError(f"a time grid needs >= 1 step, got {steps}")
        warp, unwarp = GRIDS[self.name](self.power)
        # Built in float64 so that grids agree across dtypes up to the final cast.
        ends = warp(torch.tensor([self.t_start, self.t_end], dtype=torch.float64))
        a, b = float(ends[0]), float(ends[1])
        if random and steps > 1:
            cells = torch.linspace(a, b, steps, dtype=torch.float64)
            r = torch.rand(steps - 1, generator=generator, dtype=torch.float64)
            inner = cells[:-1] + r * (cells[1:] - cells[:-1])
            v = torch.cat([cells[:1], inner, cells[-1:]])
        else:
            v = torch.linspace(a, b, steps + 1, dtype=torch.float64)
        t = unwarp(v)
        t[0], t[-1] = self.t_start, self.t_end  # exact end points despite the warp round trip
        return t.to(dtype=dtype, device=device)


# ----------------------------------------------------------------- diffusion
class DiffusionSchedule(ABC):
    """``g(t) > 0`` on the grid's interval, as a function of normalised time ``u``.

    Subclasses implement :meth:`of_u`. ``g`` must stay strictly positive: the
    Gaussian step densities, hence the path NELBO, are undefined at ``g = 0``.
    """

    name = "base"

    def __init__(self, grid: TimeGrid):
        self.grid = grid

    @abstractmethod
    def of_u(self, u: Tensor) -> Tensor:
        """``g`` at normalised times ``u`` in [0, 1]."""

    def __call__(self, t: Tensor) -> Tensor:
        return self.of_u(self.grid.normalise(t))

    def is_constant(self) -> bool:
        return False


class ConstantDiffusion(DiffusionSchedule):
    """``g = value`` (the released code: 0.2 for 2-D data, 1.0 for images)."""

    name = "constant"

    def __init__(self, grid: TimeGrid, *, value: float = 0.2):
        super().__init__(grid)
        self.value = value

    def of_u(self, u: Tensor) -> Tensor:
        return torch.full_like(u, self.value)

    def is_constant(self) -> bool:
        return True


class LinearDiffusion(DiffusionSchedule):
    """``g(u) = start + (end − start)·u``."""

    name = "linear"

    def __init__(self, grid: TimeGrid, *, start: float = 1.0, end: float = 1.0):
        super().__init__(grid)
        self.start, self.end = start, end

    def of_u(self, u: Tensor) -> Tensor:
        return self.start + (self.end - self.start) * u


class GeometricDiffusion(LinearDiffusion):
    """``g(u) = start·(end/start)^u`` (VE-like: log g linear in time)."""

    name = "geometric"

    def of_u(self, u: Tensor) -> Tensor:
        return self.start * torch.exp(u * math.log(self.end / self.start))


class VPDiffusion(DiffusionSchedule):
    """``g(u) = √β(u)``, ``β(u) = β_min + u(β_max − β_min)`` (docs/methods.md §4, VP)."""

    name = "vp"

    def __init__(self, grid: TimeGrid, *, beta_min: float = 0.1, beta_max: float = 20.0):
        super().__init__(grid)
        self.beta_min, self.beta_max = beta_min, beta_max

    def of_u(self, u: Tensor) -> Tensor:
        return torch.sqrt(self.beta_min + (self.beta_max - self.beta_min) * u)


DIFFUSIONS: Registry[type[DiffusionSchedule]] = Registry(
    "diffusion schedule",
    {
        "constant": ConstantDiffusion,
        "linear": LinearDiffusion,
        "geometric": GeometricDiffusion,
        "vp": VPDiffusion,
    },
)


def build_diffusion(name: str, grid: TimeGrid, **options: float) -> DiffusionSchedule:
    """Build ``g(t)`` by name with its own options (e.g. ``value`` for ``constant``).

    Raises:
        ValueError: unknown name (listing the valid ones), an option the
            schedule does not take, or a schedule that is not strictly
            positive on the grid.
    """
    cls = DIFFUSIONS[name]
    try:
        sched = cls(grid, **{k: float(v) for k, v in options.items()})
    except TypeError as e:
        raise ValueError(f"diffusion '{name}': {e}") from None
    ends = sched.of_u(torch.tensor([0.0, 1.0], dtype=torch.float64))
    # Every schedule here is monotone in u, so the end points bound it.
    if not bool((ends > 0).all()):
        raise ValueError(
            f"diffusion '{name}' must be > 0 on the whole grid (the path KL is "
            f"undefined at g = 0); got g = {ends[0]:.3g} .. {ends[1]:.3g}"
        )
    return sched


# --------------------------------------------------------------- base drifts
def _zero_drift(x: Tensor, g: Tensor) -> Tensor:
    return torch.zeros_like(x)


def _vp_drift(x: Tensor, g: Tensor) -> Tensor:
    # f = −½β x with β = g²: the linear drift that makes x → N(0, I) for the VP
    # schedule (docs/methods.md §4); for other schedules still a valid fixed drift.
    return -0.5 * g * g * x


# name → f_base(x, g(t)); the model's drift is f_base + (learned residual).
BASE_DRIFTS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry(
    "base drift", {"zero": _zero_drift, "vp": _vp_drift}
)
