"""FFJORD (+ RNODE) as a :class:`~cnf.models.base.GenerativeModel` (family ``ffjord``).

A stack of CNF blocks (optionally with moving batch norm between them) after
the data preprocessing, and a standard-normal base:
``log p(x) = log N(z; 0, I) + logdet`` (docs/methods.md §3). Training loss
``−mean log p(x) + λ_K·mean ∫‖f‖²dt + λ_J·mean ∫‖∂f/∂z‖_F²dt`` (RNODE).

References:
    Grathwohl et al., "FFJORD", ICLR 2019, arXiv:1810.01367.
    Finlay et al., "How to train your neural ODE", ICML 2020, arXiv:2002.02798.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cnf.divergence import DivergenceConfig
from cnf.flows.base import (
    DiagonalNormal,
    Flow,
    FlowSettings,
    SequentialFlow,
)
from cnf.flows.cnf import CNF
from cnf.flows.normalization import MovingBatchNorm
from cnf.flows.preprocess import Preprocess
from cnf.models.base import ChainModel, EvalOutput, LossOutput, SampleOutput, register_family
from cnf.nets import TimeMLP
from cnf.schema import FFJORDSchema, FlowMatchingSchema
from cnf.solve import SolverConfig

__all__ = ["FFJORD", "ODESettings", "build_ffjord"]


@dataclass(frozen=True)
class ODESettings:
    """Evaluation and sampling settings of a CNF: its solver and its trace estimator.

    Shared by every family whose likelihood is one ODE solve (FFJORD, flow matching).
    """

    solver: SolverConfig = field(default_factory=SolverConfig)
    divergence: DivergenceConfig = field(default_factory=lambda: DivergenceConfig("exact"))

    @classmethod
    def from_eval(cls, eval_cfg: Any) -> ODESettings:
        """The defaults of a run: the ``eval:`` section's solver and trace estimator."""
        return cls(solver=eval_cfg.solver.build(), divergence=eval_cfg.divergence.build())

    def flow_settings(self, dim: int, *, generator: torch.Generator | None = None) -> FlowSettings:
        return FlowSettings(
            solver=self.solver, divergence=self.divergence.build(dim, generator=generator)
        )


class FFJORD(ChainModel):
    """Continuous normalizing flow with a standard-normal base (data at t = 0).

    Args:
        flow: CNF blocks (and batch norm) from the preprocessed data to the base.
        event_shape: Shape of one sample.
        preprocess: The data bijection applied first (default: identity).
        settings: Default evaluation/sampling settings.
        kinetic_weight, jacobian_weight: RNODE weights λ_K, λ_J.
    """

    Settings = ODESettings

    def __init__(
        self,
        flow: SequentialFlow,
        event_shape: tuple[int, ...],
        *,
        preprocess: Preprocess | None = None,
        settings: ODESettings | None = None,
        kinetic_weight: float = 0.0,
        jacobian_weight: float = 0.0,
    ):
        super().__init__()
        self.flow = flow
        self.event_shape = tuple(event_shape)
        self.dim = int(torch.Size(self.event_shape).numel())
        self.preprocess = preprocess or Preprocess()
        self.settings = settings or ODESettings()
        self.base = DiagonalNormal()
        self.kinetic_weight, self.jacobian_weight = kinetic_weight, jacobian_weight

    @property
    def data_to_base(self) -> list[Flow]:
        """The flows from data to base, in order."""
        return [self.preprocess, self.flow]

    @property
    def cnfs(self) -> list[CNF]:
        return [m for m in self.flow.modules() if isinstance(m, CNF)]

    def log_prob(self, x: Tensor, settings: ODESettings | None = None) -> Tensor:
        """``log p(x)`` per sample ``(B,)`` in nats under ``settings`` (default: the model's)."""
        s = self._resolve(settings)
        return self.chain_log_prob(x, s.flow_settings(self.dim))[0]

    def training_loss(self, x: Tensor) -> LossOutput:
        regularize = self.kinetic_weight > 0 or self.jacobian_weight > 0
        settings = FlowSettings(regularize=regularize)
        logp, out = self.chain_log_prob(x, settings)
        nll = -logp.mean()
        loss = nll
        stats = {"nll": float(nll.detach())}
        for name, weight in (("kinetic", self.kinetic_weight), ("jacobian", self.jacobian_weight)):
            if name in out.regularizers:
                value = out.regularizers[name].mean()
                loss = loss + weight * value
                stats[name] = float(value.detach())
        stats["nfe_forward"] = out.stats.nfe_forward
        if any(c.log_T is not None for c in self.cnfs):
            stats["T"] = sum(float(torch.as_tensor(c.T).detach()) for c in self.cnfs)
        solve = out.stats
        return LossOutput(loss, stats, lambda: {"nfe_backward": solve.nfe_backward})

    def _evaluate(self, x: Tensor, s: ODESettings) -> EvalOutput:
        logp, out = self.chain_log_prob(x, s.flow_settings(self.dim))
        return EvalOutput(nll=-logp, stats={"nfe": out.stats.nfe_forward})

    def _sample(self, n: int, s: ODESettings, generator: torch.Generator | None) -> SampleOutput:
        x, stats = self.chain_sample(n, FlowSettings(solver=s.solver), generator=generator)
        return SampleOutput(x, {"nfe": stats.nfe_forward})

    def default_cost_grid(self) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = [
            {"method": "dopri5", "rtol": tol, "atol": tol} for tol in (1e-1, 1e-2, 1e-3, 1e-5, 1e-7)
        ]
        grid += [{"method": "rk4", "steps": s} for s in (2, 4, 8, 16)]
        return grid


def field_network(dim: int, cfg: FFJORDSchema | FlowMatchingSchema) -> TimeMLP:
    """The vector field ``f(t, z)`` of a CNF family from its ``hidden_dims, layer, activation, zero_init``."""
    return TimeMLP(
        dim,
        tuple(cfg.hidden_dims),
        layer=cfg.layer,
        activation=cfg.activation,
        zero_init=cfg.zero_init,
    )


def build_ffjord(cfg: FFJORDSchema, event_shape: tuple[int, ...], settings: ODESettings) -> FFJORD:
    """Build an FFJORD model for vectors of shape ``(D,)`` from its typed config section."""
    if len(event_shape) != 1:
        raise ValueError(f"ffjord models vectors; got event shape {event_shape}")
    dim = event_shape[0]
    solver = cfg.solver.build()
    divergence = cfg.divergence.build().build(dim)
    blocks: list[Flow] = []
    for i in range(cfg.num_blocks):
        if cfg.batch_norm and i == 0:
            blocks.append(MovingBatchNorm(dim))
        field_ = field_network(dim, cfg)
        blocks.append(
            CNF(
                field_,
                time_length=cfg.time_length,
                learn_time=cfg.learn_time,
                solver=solver,
                divergence=divergence,
                kinetic=cfg.kinetic > 0,
                jacobian=cfg.jacobian > 0,
            )
        )
        if cfg.batch_norm:
            blocks.append(MovingBatchNorm(dim))
    return FFJORD(
        SequentialFlow(blocks),
        event_shape,
        preprocess=cfg.preprocess.build(),
        settings=settings,
        kinetic_weight=cfg.kinetic,
        jacobian_weight=cfg.jacobian,
    )


@register_family("ffjord", FFJORDSchema, vector_only=True)
def _build(cfg: FFJORDSchema, event_shape: tuple[int, ...], eval_cfg: Any) -> FFJORD:
    return build_ffjord(cfg, event_shape, ODESettings.from_eval(eval_cfg))
