"""One ODE solve for every continuous-time model in the library.

:func:`integrate` carries ``z`` together with the optional log-determinant
and RNODE regulariser states through torchdiffeq, with four independent
choices (diffrax-style): the vector field, the divergence estimator, the
solver settings (:class:`SolverConfig`) and the gradient mode (backprop
through the solver or the adjoint). It serves the FFJORD CNF, the
probability-flow ODE of score models and flow-matching fields alike.

Time is handled by an affine reparameterisation: the solver always integrates
``s ∈ [0, 1]`` with ``t = t0 + (t1 − t0)·s``, so ``t0``/``t1`` may be tensors
that require grad (a learned end time ``T`` really receives its gradient,
with backprop and with the adjoint) and reverse solves (``t1 < t0``) need no
special casing. Augmented state (Chen et al. 2018; Grathwohl et al. 2019;
Finlay et al. 2020)::

    dz/dt      = f(t, z)
    dlogdet/dt = tr(∂f/∂z)             (so logdet = log|det ∂z(t1)/∂z(t0)|)
    dE/dt      = ‖f‖²                  (kinetic energy, integrated over |dt|)
    dJ/dt      = ‖∂f/∂z‖_F²  or  ‖εᵀ∂f/∂z‖²   (Jacobian Frobenius norm)

The state is a tuple of these parts, or, where the divergence estimator
offers a packed derivative (the exact trace of a compiled TimeMLP, backprop,
no regulariser), one tensor ``[z | logdet]`` (:class:`PackedDynamics`).

References:
    Chen et al., "Neural ordinary differential equations", NeurIPS 2018.
    Grathwohl et al., "FFJORD", ICLR 2019.
    Finlay et al., "How to train your neural ODE", ICML 2020.
    Kidger et al., "'Hey, that's not an ODE': faster ODE adjoints via seminorms", ICML 2021.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint
from torchdiffeq._impl.odeint import SOLVERS as _TORCHDIFFEQ_SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver

from cnf.divergence import DivergenceEstimator
from cnf.registry import Registry

FIXED_STEP_METHODS = frozenset(
    k for k, v in _TORCHDIFFEQ_SOLVERS.items() if issubclass(v, FixedGridODESolver)
)
ADAPTIVE_METHODS = frozenset(k for k in _TORCHDIFFEQ_SOLVERS if k not in FIXED_STEP_METHODS) - {
    "scipy_solver"
}
METHODS: Registry[str] = Registry(
    "solver method", {k: k for k in sorted(FIXED_STEP_METHODS | ADAPTIVE_METHODS)}
)


@dataclass(frozen=True)
class SolverConfig:
    """Solver settings for one solve.

    Attributes:
        name: Any torchdiffeq method (``dopri5``, ``rk4``, ``euler``, ...).
        rtol, atol: Tolerances of adaptive methods.
        steps: Number of steps over the interval for fixed-step methods.
        adjoint: Gradient by the adjoint method (O(1) memory) instead of
            backprop through the solver's operations.
        seminorm: With the adjoint, measure the backward error only on the
            state and its adjoint (Kidger et al. 2021): fewer backward steps.
        max_steps: Cap on the steps of an adaptive solve (0: torchdiffeq's).
    """

    # ``method`` is torchdiffeq's word for the solver name.
    ALIASES = {"method": ("name",)}

    name: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    steps: int = 0
    adjoint: bool = False
    seminorm: bool = False
    max_steps: int = 0

    def __post_init__(self) -> None:
        METHODS.check(self.name, key="name")
        if self.fixed_step and self.steps < 1:
            raise ValueError(f"fixed-step method '{self.name}' needs steps >= 1")
        if not self.fixed_step and (self.rtol <= 0 or self.atol <= 0):
            raise ValueError("adaptive solvers need rtol > 0 and atol > 0")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")

    @property
    def fixed_step(self) -> bool:
        return self.name in FIXED_STEP_METHODS

    def check_update(self, changes: dict[str, Any]) -> None:
        """``steps`` only means something for a fixed-step method (settings.update hook)."""
        name = METHODS.check(changes.get("name", self.name), key="solver")
        if "steps" in changes and name not in FIXED_STEP_METHODS:
            raise ValueError(
                f"solver steps={changes['steps']} needs a fixed-step method "
                f"({', '.join(sorted(FIXED_STEP_METHODS))}); '{name}' is adaptive"
            )

    def with_(self, **changes: Any) -> SolverConfig:
        """A copy with some fields changed (e.g. ``solver.with_(rtol=1e-3)``)."""
        return replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """The settings that matter for this method, for logs and tables."""
        d = asdict(self)
        if self.fixed_step:
            d.pop("rtol"), d.pop("atol"), d.pop("max_steps")
        else:
            d.pop("steps")
        if not self.adjoint:
            d.pop("seminorm")
        return d


class SolveStats:
    """Function evaluations of one or more solves, returned with their result.

    ``nfe_backward`` is final after ``backward()``: with backprop through the
    solver the backward pass re-evaluates nothing (it walks the recorded
    graph), so it is 0; with the adjoint it counts the evaluations of the
    backward solve. Statistics of several solves (the blocks of a stacked
    CNF) add up with ``+``.
    """

    def __init__(self, nfe_forward: int = 0, counters: tuple[Any, ...] = ()):
        self.nfe_forward = int(nfe_forward)
        self._counters = tuple(counters)

    @classmethod
    def of(cls, dynamics: AugmentedDynamics) -> SolveStats:
        """The statistics of the solve ``dynamics`` has just finished."""
        return cls(dynamics.nfe, (dynamics,))

    @property
    def nfe_backward(self) -> int:
        return sum(c.nfe for c in self._counters) - self.nfe_forward

    def __add__(self, other: SolveStats) -> SolveStats:
        return SolveStats(self.nfe_forward + other.nfe_forward, self._counters + other._counters)

    def as_dict(self) -> dict[str, Any]:
        return {"nfe_forward": self.nfe_forward, "nfe_backward": self.nfe_backward}


@dataclass
class ODESolution:
    """Result of :func:`integrate`.

    Attributes:
        z: State at ``t1``, shape ``(B, *event)``.
        logdet: ``log|det ∂z(t1)/∂z(t0)|`` per sample ``(B,)`` (None without divergence).
        regularizers: Per-sample integrals ``{"kinetic", "jacobian"}`` that were requested.
        trajectory: States at the requested times, ``(T, B, *event)``, or None.
        stats: NFE counters of this solve.
        logdet_probes: ``(B, K)``, one log-determinant per Hutchinson probe, for a
            ``per_probe`` estimator (``logdet`` is their mean); else None.
    """

    z: Tensor
    logdet: Tensor | None
    regularizers: dict[str, Tensor] = field(default_factory=dict)
    trajectory: Tensor | None = None
    stats: SolveStats = field(default_factory=SolveStats)
    logdet_probes: Tensor | None = None


class AugmentedDynamics(nn.Module):
    """Right-hand side of the augmented ODE in the solver's time ``s ∈ [0, 1]``.

    This runs at every function evaluation: keep it lean. The probe is drawn
    once, before the solve, and reused by every evaluation — forward and
    adjoint backward alike (the module lives for exactly one solve).
    """

    def __init__(
        self,
        field_fn: Callable[[Tensor, Tensor], Tensor],
        t0: Tensor,
        t1: Tensor,
        *,
        divergence: DivergenceEstimator | None,
        probe: Tensor | None,
        kinetic: bool,
        jacobian: bool,
    ):
        super().__init__()
        self.field = field_fn
        self.t0, self.t1 = t0, t1
        self.divergence = divergence
        self.probe = probe
        self.kinetic, self.jacobian = kinetic, jacobian
        self.nfe = 0

    def forward(self, s: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.nfe += 1
        z = state[0]
        span = self.t1 - self.t0
        t = self.t0 + span * s
        if self.divergence is None:
            f = self.field(t, z)
            out = [f * span]
        else:
            f, div, frob = self.divergence.evaluate(
                self.field, t, z, self.probe, frobenius=self.jacobian
            )
            out = [f * span, div * span]
        if self.kinetic or self.jacobian:
            # Regularisers integrate over |dt| so they are positive either way.
            dt = span.abs()
            if self.kinetic:
                out.append(f.pow(2).reshape(f.shape[0], -1).sum(1) * dt)
            if self.jacobian:
                out.append(frob * dt)
        return tuple(out)


def controller_norm(state: tuple[Tensor, ...]) -> Tensor:
    """Error norm of the step-size controller: the largest RMS over the state's parts, without grad.

    The same mixed norm torchdiffeq uses for tuple states (so step sizes and
    NFE are unchanged), computed on detached tensors: with backprop through an
    adaptive solver the step sizes are then constants of the recorded graph,
    as in diffrax's ``PIDController``. The gradient is that of the discretised
    solve at its accepted steps; without the detach autograd would also
    differentiate the controller's choice of step (an artefact of the
    discretisation, not of the ODE) and record and walk its operations.
    """
    return torch.stack([p.detach().pow(2).mean().sqrt() for p in state]).max()


class PackedDynamics(nn.Module):
    """The augmented ODE ``(z, logdet)`` as one tensor ``y = [z | logdet]`` ``(B, D + 1)``.

    For fields whose divergence estimator offers a packed derivative
    (:meth:`cnf.divergence.DivergenceEstimator.packed_derivative`: the
    exact trace of a compiled TimeMLP), which evaluates the time
    ``t0 + (t1 − t0)·s``, the field, its trace and the span scaling in one
    autograd node: torchdiffeq then splits and concatenates nothing.
    """

    def __init__(self, derivative: Callable[..., Tensor], t0: Tensor, t1: Tensor):
        super().__init__()
        self.derivative = derivative
        self.t0, self.span = t0.reshape(()), (t1 - t0).reshape(())
        self.nfe = 0

    def forward(self, s: Tensor, y: Tensor) -> Tensor:
        self.nfe += 1
        return self.derivative(y, s, self.t0, self.span)


def packed_controller_norm(y: Tensor) -> Tensor:
    """:func:`controller_norm` of a packed state ``[z | logdet]``: the same steps as the tuple."""
    return controller_norm((y[..., :-1], y[..., -1]))


def _uniform_grid(steps: int) -> Callable[[Any, Tensor, Tensor], Tensor]:
    """torchdiffeq grid constructor: ``steps`` equal steps from ``t[0]`` to ``t[-1]``."""

    def grid(func: Any, y0: Tensor, t: Tensor) -> Tensor:
        g = torch.linspace(0, 1, steps + 1, dtype=t.dtype, device=t.device)
        g = t[0] + (t[-1] - t[0]) * g
        g[0], g[-1] = t[0], t[-1]
        return g

    return grid


def integrate(
    field_fn: Callable[[Tensor, Tensor], Tensor],
    z0: Tensor,
    *,
    t0: float | Tensor = 0.0,
    t1: float | Tensor = 1.0,
    solver: SolverConfig,
    divergence: DivergenceEstimator | None = None,
    kinetic: bool = False,
    jacobian: bool = False,
    times: Tensor | None = None,
) -> ODESolution:
    """Integrate ``dz/dt = field_fn(t, z)`` from ``t0`` to ``t1``.

    Args:
        field_fn: The vector field ``(t, z) -> f``; an ``nn.Module`` when
            ``solver.adjoint`` (its parameters get adjoint gradients).
        z0: Initial state ``(B, *event)``.
        t0, t1: Interval; floats or 0-dim tensors (may require grad).
        solver: Method, tolerances or steps, gradient mode.
        divergence: Estimator for the log-determinant state (None: no logdet).
        kinetic, jacobian: Integrate RNODE's regularisers as extra states.
            ``jacobian`` needs a divergence estimator (it shares its VJP).
        times: Optional times in ``[t0, t1]``, ordered from ``t0`` to ``t1``,
            at which to return the trajectory of ``z``.

    Returns:
        An :class:`ODESolution`; ``logdet`` is ``log|det ∂z(t1)/∂z(t0)|``.
    """
    if jacobian and divergence is None:
        raise ValueError("the Jacobian regulariser needs a divergence estimator")
    t0 = torch.as_tensor(t0, dtype=z0.dtype, device=z0.device)
    t1 = torch.as_tensor(t1, dtype=z0.dtype, device=z0.device)
    batch = z0.shape[0]
    packed = None
    if divergence is not None and not (solver.adjoint or kinetic or jacobian):
        # (The adjoint keeps the tuple: its backward solve's norm is set per part.)
        packed = divergence.packed_derivative(field_fn, z0)
    probe = divergence.draw_probe(z0) if divergence is not None else None
    if packed is not None:
        dynamics = PackedDynamics(packed, t0, t1)
        state = [torch.cat([z0, z0.new_zeros(batch, 1)], dim=1)]
    else:
        dynamics = AugmentedDynamics(
            field_fn,
            t0,
            t1,
            divergence=divergence,
            probe=probe,
            kinetic=kinetic,
            jacobian=jacobian,
        )
        state = [z0]
        if divergence is not None:
            # A per-probe estimator integrates one log-determinant per probe: (B, K).
            per_probe = divergence.per_probe and probe is not None
            state.append(z0.new_zeros(batch, probe.shape[0]) if per_probe else z0.new_zeros(batch))
        state += [z0.new_zeros(batch) for _ in range(kinetic + jacobian)]

    s_grid = torch.tensor([0.0, 1.0], dtype=z0.dtype, device=z0.device)
    traj_index = None
    if times is not None:
        with torch.no_grad():
            s_req = ((times.to(z0) - t0) / (t1 - t0)).detach()
        # Round-off slack: T = exp(log_T) need not reproduce a configured 0.6 exactly.
        slack = 1e-6
        if (s_req < -slack).any() or (s_req > 1 + slack).any() or (s_req.diff() < 0).any():
            raise ValueError("times must lie in [t0, t1] and be ordered from t0 to t1")
        s_grid, traj_index = torch.unique(
            torch.cat([s_grid, s_req.clamp(0, 1)]), sorted=True, return_inverse=True
        )
        traj_index = traj_index[2:]

    kwargs: dict[str, Any] = {"method": solver.name}
    if solver.fixed_step:
        # Exactly `steps` equal steps: torchdiffeq's step_size grid can add a
        # zero-length step by round-off (e.g. 49 steps in float64), one step's NFE.
        kwargs["options"] = {"grid_constructor": _uniform_grid(solver.steps)}
    else:
        kwargs["rtol"], kwargs["atol"] = solver.rtol, solver.atol
        kwargs["options"] = {"max_num_steps": solver.max_steps} if solver.max_steps else {}
        if not solver.adjoint:
            kwargs["options"]["norm"] = (
                packed_controller_norm if packed is not None else controller_norm
            )

    if solver.adjoint:
        params = [p for p in dynamics.parameters() if p.requires_grad]
        params += [t for t in (t0, t1) if t.requires_grad]
        if solver.seminorm:
            # Keep the forward options (steps, max_num_steps) for the backward solve:
            # torchdiffeq copies them only when adjoint_options is not given.
            kwargs["adjoint_options"] = {**kwargs.get("options", {}), "norm": "seminorm"}
        out = odeint_adjoint(dynamics, tuple(state), s_grid, adjoint_params=tuple(params), **kwargs)
    elif packed is not None:
        y = odeint(dynamics, state[0], s_grid, **kwargs)
        out = (y[..., :-1], y[..., -1])
    else:
        out = odeint(dynamics, tuple(state), s_grid, **kwargs)

    stats = SolveStats.of(dynamics)
    zs = out[0]
    i = 1
    logdet = logdet_probes = None
    if divergence is not None:
        logdet = out[1][-1]
        if logdet.dim() == 2:
            logdet_probes, logdet = logdet, logdet.mean(dim=1)
        i = 2
    regs: dict[str, Tensor] = {}
    if kinetic:
        regs["kinetic"] = out[i][-1]
        i += 1
    if jacobian:
        regs["jacobian"] = out[i][-1]
    trajectory = zs[traj_index] if traj_index is not None else None
    return ODESolution(zs[-1], logdet, regs, trajectory, stats, logdet_probes)
