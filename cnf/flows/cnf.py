"""The continuous normalizing flow block (FFJORD) behind the :class:`~cnf.flows.base.Flow` interface.

Data at ``t0`` (0 unless a family truncates, as score models do at ε), base at
``t1 = T`` (docs/methods.md §1, §3): :meth:`CNF.transform` integrates
``dz/dt = f_θ(t, z)`` from ``t0`` to ``T`` and returns
``logdet = ∫ tr(∂f/∂z) dt``, so ``log p(x) = log p_Z(z(T)) + logdet``;
:meth:`CNF.inverse_transform` integrates back from ``T`` to ``t0`` without the
divergence. The solver and divergence estimator of a call come from its
:class:`~cnf.flows.base.FlowSettings` (default: the block's training
settings), and the call's statistics come back with its result.

The end time can be learned: ``t0 + exp(log_T)`` enters the solve as a
differentiable interval end (see :mod:`cnf.solve`), so it really receives a
gradient — unlike FFJORD's ``train_T``, which rebuilt the time tensor with
``torch.tensor`` and cut the graph.

This one block serves FFJORD, flow matching (the learned velocity field), the
probability-flow ODE of score models and INDM's latent: every ODE likelihood
in the library is :func:`cnf.flows.base.flow_log_prob` over a flow holding it.

References:
    Grathwohl et al., "FFJORD: Free-form continuous dynamics for scalable
    reversible generative models", ICLR 2019, arXiv:1810.01367.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from cnf.divergence import DivergenceEstimator, ExactDivergence
from cnf.flows.base import DEFAULT_SETTINGS, Flow, FlowOutput, FlowSettings
from cnf.solve import ODESolution, SolverConfig, SolveStats, integrate

__all__ = ["CNF"]


class CNF(Flow):
    """One CNF block on ``[t0, t0 + T]``.

    Args:
        field: Vector field module ``(t, z) -> dz/dt`` (e.g. :class:`cnf.nets.TimeMLP`).
        t0: Start time (the data end).
        time_length: Length ``T`` of the interval (its initial value if learned).
        learn_time: Learn ``T`` (as ``exp(log_T)``).
        solver: Solver of calls that do not choose one (training).
        divergence: Trace estimator of calls that do not choose one (training).
        kinetic, jacobian: The RNODE regularisers this block integrates when a
            call asks for them (``FlowSettings.regularize``).
        regularizer_scale: Factors applied to this block's regularisers
            (``{"kinetic": a, "jacobian": b}``; absent keys: 1), e.g. RNODE's
            normalisation by the block's dimension (:mod:`cnf.models.ffjord`).
    """

    def __init__(
        self,
        field: nn.Module,
        *,
        t0: float = 0.0,
        time_length: float = 1.0,
        learn_time: bool = False,
        solver: SolverConfig | None = None,
        divergence: DivergenceEstimator | None = None,
        kinetic: bool = False,
        jacobian: bool = False,
        regularizer_scale: Mapping[str, float] | None = None,
    ):
        super().__init__()
        if time_length <= 0:
            raise ValueError(f"time_length must be > 0, got {time_length}")
        self.field = field
        self.t0, self.time_length = float(t0), float(time_length)
        self.log_T = nn.Parameter(torch.tensor(math.log(time_length))) if learn_time else None
        self.solver = solver or SolverConfig()
        self.divergence = divergence or ExactDivergence()
        self.kinetic, self.jacobian = kinetic, jacobian
        self.regularizer_scale = dict(regularizer_scale or {})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Checkpoints before the restructure kept a fixed T as a log_T buffer.
        if self.log_T is None:
            state_dict.pop(prefix + "log_T", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def T(self) -> Tensor | float:  # noqa: N802 - paper notation
        """Length of the interval (a tensor when learned)."""
        return self.log_T.exp() if self.log_T is not None else self.time_length

    def _end(self, like: Tensor) -> Tensor | float:
        if self.log_T is None:
            return self.t0 + self.time_length
        return self.t0 + self.log_T.exp().to(like.dtype)

    def solve(
        self, x: Tensor, settings: FlowSettings = DEFAULT_SETTINGS, *, times: Tensor | None = None
    ) -> ODESolution:
        """Integrate ``[z, logdet, regularisers]`` from the data end to the base end."""
        regularize = settings.regularize
        return integrate(
            self.field,
            x,
            t0=self.t0,
            t1=self._end(x),
            solver=settings.solver or self.solver,
            divergence=settings.divergence or self.divergence,
            kinetic=regularize and self.kinetic,
            jacobian=regularize and self.jacobian,
            times=times,
        )

    def transform(self, x: Tensor, settings: FlowSettings = DEFAULT_SETTINGS) -> FlowOutput:
        sol = self.solve(x, settings)
        regs = {k: v * self.regularizer_scale.get(k, 1.0) for k, v in sol.regularizers.items()}
        return FlowOutput(sol.z, sol.logdet, sol.stats, regs, sol.logdet_probes)

    def inverse_transform(
        self, z: Tensor, settings: FlowSettings = DEFAULT_SETTINGS
    ) -> tuple[Tensor, SolveStats]:
        sol = integrate(
            self.field,
            z,
            t0=self._end(z),
            t1=self.t0,
            solver=settings.solver or self.solver,
        )
        return sol.z, sol.stats
