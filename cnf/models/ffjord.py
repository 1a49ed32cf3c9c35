"""FFJORD (+ RNODE) as a :class:`~cnf.models.base.GenerativeModel`.

A stack of CNF blocks (optionally with moving batch norm between them) and a
standard-normal base: ``log p(x) = log N(z; 0, I) + logdet``. Training loss
``−mean log p(x) + λ_K·mean ∫‖f‖²dt + λ_J·mean ∫‖∂f/∂z‖_F²dt`` (RNODE).

References:
    Grathwohl et al., "FFJORD", ICLR 2019, arXiv:1810.01367.
    Finlay et al., "How to train your neural ODE", ICML 2020, arXiv:2002.02798.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cnf.divergence import DivergenceEstimator, build_divergence
from cnf.flows.base import Flow, SequentialFlow, standard_normal_logprob
from cnf.flows.cnf import CNF
from cnf.flows.normalization import MovingBatchNorm
from cnf.models.base import EvalOutput, GenerativeModel, LossOutput
from cnf.nets import TimeMLP
from cnf.solve import SolverConfig


@dataclass
class SolverSchema:
    """Config form of :class:`cnf.solve.SolverConfig`."""

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    steps: int = 0
    adjoint: bool = False
    seminorm: bool = False
    max_steps: int = 0


@dataclass
class FFJORDSchema:
    """``model:`` section for ``family: ffjord``."""

    family: str = "ffjord"
    hidden_dims: list[int] = field(default_factory=lambda: [64, 64, 64])
    layer: str = "concatsquash"
    activation: str = "tanh"
    zero_init: bool = True
    num_blocks: int = 1
    batch_norm: bool = False
    time_length: float = 1.0
    learn_time: bool = False
    divergence: str = "exact"  # training estimator: exact | hutchinson
    probe: str = "gaussian"  # gaussian | rademacher (Hutchinson only)
    num_probes: int = 1
    solver: SolverSchema = field(default_factory=lambda: SolverSchema(method="rk4", steps=8))
    kinetic: float = 0.0  # RNODE weight of ∫‖f‖² dt
    jacobian: float = 0.0  # RNODE weight of ∫‖∂f/∂z‖_F² dt


def solver_from(cfg: Mapping[str, Any]) -> SolverConfig:
    return SolverConfig(**{k: cfg[k] for k in SolverConfig.__dataclass_fields__ if k in cfg})


class FFJORD(GenerativeModel):
    """Continuous normalizing flow with a standard-normal base (data at t = 0)."""

    def __init__(
        self,
        flow: SequentialFlow,
        event_shape: tuple[int, ...],
        *,
        kinetic_weight: float = 0.0,
        jacobian_weight: float = 0.0,
    ):
        super().__init__()
        self.flow = flow
        self.event_shape = tuple(event_shape)
        self.kinetic_weight, self.jacobian_weight = kinetic_weight, jacobian_weight

    @property
    def cnfs(self) -> list[CNF]:
        return [m for m in self.flow.flows if isinstance(m, CNF)]

    def _nfe(self, attr: str) -> int:
        return sum(getattr(c.last_stats, attr) for c in self.cnfs if c.last_stats is not None)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` per sample in nats, shape ``(B,)``."""
        z, logdet = self.flow(x)
        return standard_normal_logprob(z) + logdet

    def training_loss(self, x: Tensor) -> LossOutput:
        nll = -self.log_prob(x).mean()
        loss = nll
        stats = {"nll": float(nll.detach())}
        regs = self.flow.regularization()
        for name, weight in (("kinetic", self.kinetic_weight), ("jacobian", self.jacobian_weight)):
            if name in regs:
                value = regs[name].mean()
                loss = loss + weight * value
                stats[name] = float(value.detach())
        stats["nfe_forward"] = self._nfe("nfe_forward")
        if any(c.log_T.requires_grad for c in self.cnfs):
            stats["T"] = float(sum(c.T for c in self.cnfs))
        return LossOutput(loss, stats)

    def backward_stats(self) -> dict[str, float]:
        return {"nfe_backward": self._nfe("nfe_backward")}

    def _override(
        self, cost: Mapping[str, Any] | None
    ) -> tuple[SolverConfig | None, DivergenceEstimator | None]:
        if not cost:
            return None, None
        cost = dict(cost)
        div = None
        if "divergence" in cost:
            div = build_divergence(
                cost.pop("divergence"),
                probe=cost.pop("probe", "rademacher"),
                num_probes=cost.pop("num_probes", 1),
                generator=cost.pop("generator", None),
            )
        solver = self.cnfs[0].eval_solver
        if cost:
            if "steps" in cost and "method" not in cost and not solver.fixed_step:
                raise ValueError("cost 'steps' needs a fixed-step 'method' (e.g. rk4, euler)")
            solver = solver.with_(**cost)
        return solver, div

    def _using(self, cost: Mapping[str, Any] | None):
        import contextlib

        solver, div = self._override(cost)
        stack = contextlib.ExitStack()
        for c in self.cnfs:
            stack.enter_context(c.using(solver=solver, divergence=div))
        return stack

    @torch.no_grad()
    def evaluate(self, x: Tensor, *, cost: Mapping[str, Any] | None = None) -> EvalOutput:
        was_training = self.training
        self.eval()
        try:
            with self._using(cost):
                nll = -self.log_prob(x)
                stats = {"nfe": self._nfe("nfe_forward")}
        finally:
            self.train(was_training)
        return EvalOutput(nll=nll, stats=stats)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        cost: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        was_training = self.training
        self.eval()
        try:
            with self._using(cost):
                z = torch.randn(
                    (n, *self.event_shape),
                    generator=generator,
                    dtype=self.dtype,
                    device=self.device,
                )
                x = self.flow.inverse(z)
                stats = {"nfe": self._nfe("nfe_forward")}
        finally:
            self.train(was_training)
        return x, stats

    @torch.no_grad()
    def trajectory(self, x: Tensor, times: Tensor) -> Tensor:
        """Trajectory of the first CNF block at ``times`` (single-block models)."""
        return self.cnfs[0].trajectory(x, times)

    def default_cost_grid(self) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = [
            {"method": "dopri5", "rtol": tol, "atol": tol} for tol in (1e-1, 1e-2, 1e-3, 1e-5, 1e-7)
        ]
        grid += [{"method": "rk4", "steps": s} for s in (2, 4, 8, 16)]
        return grid


def build_ffjord(
    cfg: Mapping[str, Any],
    event_shape: tuple[int, ...],
    *,
    eval_solver: SolverConfig,
    eval_divergence: DivergenceEstimator,
) -> FFJORD:
    """Build an FFJORD model for vectors of shape ``(D,)`` from its config section."""
    if len(event_shape) != 1:
        raise ValueError(f"ffjord models vectors; got event shape {event_shape}")
    dim = event_shape[0]
    solver = solver_from(cfg["solver"])
    divergence = build_divergence(
        cfg["divergence"], probe=cfg["probe"], num_probes=cfg["num_probes"]
    )
    blocks: list[Flow] = []
    for i in range(cfg["num_blocks"]):
        if cfg["batch_norm"] and i == 0:
            blocks.append(MovingBatchNorm(dim))
        field = TimeMLP(
            dim,
            tuple(cfg["hidden_dims"]),
            layer=cfg["layer"],
            activation=cfg["activation"],
            zero_init=cfg["zero_init"],
        )
        blocks.append(
            CNF(
                field,
                time_length=cfg["time_length"],
                learn_time=cfg["learn_time"],
                solver=solver,
                eval_solver=eval_solver,
                divergence=divergence,
                eval_divergence=eval_divergence,
                kinetic=cfg["kinetic"] > 0,
                jacobian=cfg["jacobian"] > 0,
            )
        )
        if cfg["batch_norm"]:
            blocks.append(MovingBatchNorm(dim))
    return FFJORD(
        SequentialFlow(blocks),
        event_shape,
        kinetic_weight=cfg["kinetic"],
        jacobian_weight=cfg["jacobian"],
    )
