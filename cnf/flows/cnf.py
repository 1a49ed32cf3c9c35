"""FFJORD continuous normalizing flow behind the :class:`~cnf.flows.base.Flow` interface.

Data at t = 0, base at t = T (DESIGN.md §1): ``forward`` integrates
``dz/dt = f_θ(t, z)`` from 0 to T and returns ``logdet = ∫_0^T tr(∂f/∂z) dt``,
so ``log p(x) = log p_Z(z(T)) + logdet``; ``inverse`` integrates back from T
to 0 without the divergence. The end time can be learned: ``T = exp(log_T)``
enters the solve as a differentiable interval end (see :mod:`cnf.solve`), so
it really receives a gradient — unlike FFJORD's ``train_T``, which rebuilt
the time tensor with ``torch.tensor`` and cut the graph.

References:
    Grathwohl et al., "FFJORD: Free-form continuous dynamics for scalable
    reversible generative models", ICLR 2019, arXiv:1810.01367.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from cnf.divergence import DivergenceEstimator, ExactDivergence
from cnf.flows.base import Flow
from cnf.solve import ODESolution, SolverConfig, SolveStats, integrate


class CNF(Flow):
    """One CNF block.

    Args:
        field: Vector field module ``(t, z) -> dz/dt`` (e.g. :class:`cnf.nets.TimeMLP`).
        time_length: End time ``T`` (initial value if learned).
        learn_time: Learn ``T`` (parameterised as ``exp(log_T)``).
        solver: Solver settings used in training mode.
        eval_solver: Solver settings used in eval mode (default: ``solver``).
        divergence: Estimator used in training mode.
        eval_divergence: Estimator used in eval mode (default: ``divergence``).
        kinetic, jacobian: Integrate RNODE's regularisers in training mode.
    """

    def __init__(
        self,
        field: nn.Module,
        *,
        time_length: float = 1.0,
        learn_time: bool = False,
        solver: SolverConfig | None = None,
        eval_solver: SolverConfig | None = None,
        divergence: DivergenceEstimator | None = None,
        eval_divergence: DivergenceEstimator | None = None,
        kinetic: bool = False,
        jacobian: bool = False,
    ):
        super().__init__()
        if time_length <= 0:
            raise ValueError(f"time_length must be > 0, got {time_length}")
        self.field = field
        log_t = torch.tensor(math.log(time_length))
        if learn_time:
            self.log_T = nn.Parameter(log_t)
        else:
            self.register_buffer("log_T", log_t)
        self.solver = solver or SolverConfig()
        self.eval_solver = eval_solver or self.solver
        self.divergence = divergence or ExactDivergence()
        self.eval_divergence = eval_divergence or self.divergence
        self.kinetic, self.jacobian = kinetic, jacobian
        self.last_solution: ODESolution | None = None

    @property
    def T(self) -> Tensor:  # noqa: N802 - paper notation
        return self.log_T.exp()

    def _settings(self) -> tuple[SolverConfig, DivergenceEstimator]:
        if self.training:
            return self.solver, self.divergence
        return self.eval_solver, self.eval_divergence

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        solver, divergence = self._settings()
        sol = integrate(
            self.field,
            x,
            t0=0.0,
            t1=self.T.to(x.dtype),
            solver=solver,
            divergence=divergence,
            kinetic=self.training and self.kinetic,
            jacobian=self.training and self.jacobian,
        )
        self.last_solution = sol
        return sol.z, sol.logdet

    def inverse(self, z: Tensor) -> Tensor:
        solver, _ = self._settings()
        sol = integrate(self.field, z, t0=self.T.to(z.dtype), t1=0.0, solver=solver)
        self.last_solution = sol
        return sol.z

    def trajectory(self, x: Tensor, times: Tensor) -> Tensor:
        """States ``z(t)`` for ``t`` in ``times`` (within ``[0, T]``, increasing), ``(len(times), B, D)``."""
        solver, _ = self._settings()
        sol = integrate(self.field, x, t0=0.0, t1=self.T.to(x.dtype), solver=solver, times=times)
        self.last_solution = sol
        return sol.trajectory

    def regularization(self) -> dict[str, Tensor]:
        return dict(self.last_solution.regularizers) if self.last_solution else {}

    @property
    def last_stats(self) -> SolveStats | None:
        return self.last_solution.stats if self.last_solution else None

    @contextlib.contextmanager
    def using(
        self,
        *,
        solver: SolverConfig | None = None,
        divergence: DivergenceEstimator | None = None,
    ) -> Iterator[None]:
        """Temporarily replace the eval-mode solver and/or divergence estimator."""
        old = (self.eval_solver, self.eval_divergence)
        self.eval_solver = solver or self.eval_solver
        self.eval_divergence = divergence or self.eval_divergence
        try:
            yield
        finally:
            self.eval_solver, self.eval_divergence = old
