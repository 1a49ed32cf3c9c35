"""FFJORD (+ RNODE) as a :class:`~cnf.models.base.GenerativeModel` (family ``ffjord``).

CNF blocks after the data preprocessing, and a standard-normal base:
``log p(x) = log N(z; 0, I) + logdet`` (docs/methods.md §3). Training loss
``−mean log p(x) + λ_K·mean ∫‖f‖²dt + λ_J·mean ∫‖εᵀ∂f/∂z‖²dt`` (RNODE), in
nats per sample, or divided by ``D ln 2`` (``model.loss_unit: bits_per_dim``,
bits/dim up to a constant: the unit of FFJORD's and RNODE's image scripts,
which their adjoint tolerances assume; see :data:`LOSS_UNITS`). Three architectures (``model.architecture``,
:data:`FFJORD_ARCHITECTURES`):

* ``mlp`` — ``num_blocks`` CNFs of :class:`~cnf.nets.TimeMLP` fields on
  vectors ``(D,)`` (optionally with moving batch norm between them);
* ``conv`` — ``num_blocks`` CNFs of :class:`~cnf.nets.TimeConvNet` fields on
  images ``(C, H, W)`` at one scale (FFJORD's single-scale image model);
* ``multiscale`` — FFJORD's ``ODENVP``
  (:func:`cnf.flows.multiscale.multiscale_cnf`): conv CNF blocks, squeezes and
  factor-outs; the factored-out halves are scored under N(0, I) with the rest.

Images come uniformly dequantised to ``[0, 1)``; ``model.preprocess`` holds
FFJORD's logit ``logit(α + (1 − 2α)x)`` (α = 1e-6; RNODE 1e-5 on MNIST, 0.05 on
CIFAR-10), whose log-determinant is part of ``log p(x)``; bits/dim follow in
:mod:`cnf.evaluation`.

**Evaluation with Hutchinson's estimator.** With ``K`` probes per solve the
log-determinant of every block is integrated once per probe (one batched VJP
per function evaluation), so :meth:`FFJORD.evaluate` returns the NLL per
probe too (``EvalOutput.nll_probes``) and the estimator's standard error is
reported apart from the test set's (``test_nll_probe_stderr``).

**RNODE's normalisation** (``regularizer_norm: per_dim``). The released RNODE
code minimises ``bits/dim + λ_K Σ_b ∫ ½‖f‖²/d_b dt + λ_J Σ_b ∫ ‖εᵀ∂f/∂z‖²/d_b dt``
with ``d_b`` the dimension of block ``b``'s state. Multiplied by ``D ln 2``
(a constant, to which Adam is blind) that is our nats objective with block
``b``'s integrals scaled by ``D ln 2/(2 d_b)`` (kinetic) and ``D ln 2/d_b``
(Jacobian), which is what ``per_dim`` does: λ_K = λ_J = 0.01 then mean what
they mean in the RNODE scripts. ``sum`` (the default) uses the integrals as
written.

References:
    Grathwohl et al., "FFJORD", ICLR 2019, arXiv:1810.01367.
    Finlay et al., "How to train your neural ODE", ICML 2020, arXiv:2002.02798.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    flow_log_prob_probes,
)
from cnf.flows.cnf import CNF
from cnf.flows.multiscale import multiscale_cnf
from cnf.flows.normalization import MovingBatchNorm
from cnf.flows.preprocess import Preprocess
from cnf.models.base import ChainModel, EvalOutput, LossOutput, SampleOutput, register_family
from cnf.nets import TimeConvNet, TimeMLP
from cnf.registry import Registry
from cnf.schema import FFJORDSchema, FlowMatchingSchema
from cnf.solve import SolverConfig

__all__ = [
    "FFJORD",
    "FFJORD_ARCHITECTURES",
    "LOSS_UNITS",
    "REGULARIZER_NORMS",
    "ODESettings",
    "build_ffjord",
]


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

    def flow_settings(
        self, dim: int, *, generator: torch.Generator | None = None, per_probe: bool = False
    ) -> FlowSettings:
        """The per-call flow settings (``per_probe``: one log-determinant per Hutchinson probe)."""
        divergence = self.divergence.build(dim, generator=generator, per_probe=per_probe)
        return FlowSettings(solver=self.solver, divergence=divergence)


class FFJORD(ChainModel):
    """Continuous normalizing flow with a standard-normal base (data at t = 0).

    Args:
        flow: The flow from the preprocessed data to the base (CNF blocks, batch
            norm, or the multi-scale architecture).
        event_shape: Shape of one sample.
        preprocess: The data bijection applied first (default: identity).
        settings: Default evaluation/sampling settings.
        kinetic_weight, jacobian_weight: RNODE weights λ_K, λ_J.
        loss_scale: Factor of the training objective (``model.loss_unit``):
            1 for nats per sample, ``1/(D ln 2)`` for bits per dimension.
    """

    Settings = ODESettings

    def __init__(
        self,
        flow: Flow,
        event_shape: tuple[int, ...],
        *,
        preprocess: Preprocess | None = None,
        settings: ODESettings | None = None,
        kinetic_weight: float = 0.0,
        jacobian_weight: float = 0.0,
        loss_scale: float = 1.0,
    ):
        super().__init__()
        self.flow = flow
        self.event_shape = tuple(event_shape)
        self.dim = int(torch.Size(self.event_shape).numel())
        self.preprocess = preprocess or Preprocess()
        self.settings = settings or ODESettings()
        self.base = DiagonalNormal()
        self.kinetic_weight, self.jacobian_weight = kinetic_weight, jacobian_weight
        self.loss_scale = float(loss_scale)

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
        if self.loss_scale != 1.0:
            loss = loss * self.loss_scale
        stats["nfe_forward"] = out.stats.nfe_forward
        if any(c.log_T is not None for c in self.cnfs):
            stats["T"] = sum(float(torch.as_tensor(c.T).detach()) for c in self.cnfs)
        solve = out.stats
        return LossOutput(loss, stats, lambda: {"nfe_backward": solve.nfe_backward})

    def _evaluate(self, x: Tensor, s: ODESettings) -> EvalOutput:
        logp, out = self.chain_log_prob(x, s.flow_settings(self.dim, per_probe=True))
        probes = flow_log_prob_probes(logp, out)
        return EvalOutput(
            nll=-logp,
            stats={"nfe": out.stats.nfe_forward},
            nll_probes=None if probes is None else -probes,
        )

    def _sample(self, n: int, s: ODESettings, generator: torch.Generator | None) -> SampleOutput:
        x, stats = self.chain_sample(n, FlowSettings(solver=s.solver), generator=generator)
        return SampleOutput(x, {"nfe": stats.nfe_forward})

    def default_cost_grid(self) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = [
            {"method": "dopri5", "rtol": tol, "atol": tol} for tol in (1e-1, 1e-2, 1e-3, 1e-5, 1e-7)
        ]
        grid += [{"method": "rk4", "steps": s} for s in (2, 4, 8, 16)]
        return grid


def field_network(
    dim: int, cfg: FFJORDSchema | FlowMatchingSchema, *, compile_trace: bool = False
) -> TimeMLP:
    """The vector field ``f(t, z)`` of a CNF family from its ``hidden_dims, layer, activation, zero_init``."""
    return TimeMLP(
        dim,
        tuple(cfg.hidden_dims),
        layer=cfg.layer,
        activation=cfg.activation,
        zero_init=cfg.zero_init,
        compile_trace=compile_trace,
    )


def _regularizer_scale(cfg: FFJORDSchema, block_dim: int, data_dim: int) -> dict[str, float]:
    """Factors of one block's RNODE integrals under ``cfg.regularizer_norm`` (module docstring)."""
    return REGULARIZER_NORMS[cfg.regularizer_norm](block_dim, data_dim)


def _cnf_block(cfg: FFJORDSchema, field_: torch.nn.Module, block_dim: int, data_dim: int) -> CNF:
    """One CNF block with the training solver, trace estimator and regularisers of ``cfg``."""
    return CNF(
        field_,
        time_length=cfg.time_length,
        learn_time=cfg.learn_time,
        solver=cfg.solver.build(),
        divergence=cfg.divergence.build().build(block_dim),
        kinetic=cfg.kinetic > 0,
        jacobian=cfg.jacobian > 0,
        regularizer_scale=_regularizer_scale(cfg, block_dim, data_dim),
    )


def _mlp_flow(cfg: FFJORDSchema, event_shape: tuple[int, ...]) -> SequentialFlow:
    """``num_blocks`` MLP CNFs on vectors ``(D,)``, with moving batch norm if asked."""
    if len(event_shape) != 1:
        raise ValueError(f"architecture=mlp models vectors; got event shape {event_shape}")
    dim = event_shape[0]
    blocks: list[Flow] = []
    for i in range(cfg.num_blocks):
        if cfg.batch_norm and i == 0:
            blocks.append(MovingBatchNorm(dim))
        field_ = field_network(dim, cfg, compile_trace=cfg.compile)
        blocks.append(_cnf_block(cfg, field_, dim, dim))
        if cfg.batch_norm:
            blocks.append(MovingBatchNorm(dim))
    return SequentialFlow(blocks)


def _conv_block_factory(
    cfg: FFJORDSchema, event_shape: tuple[int, ...]
) -> Callable[[tuple[int, int, int]], CNF]:
    """``shape -> CNF`` with a fresh :class:`~cnf.nets.TimeConvNet` field for states of ``shape``."""
    if len(event_shape) != 3:
        raise ValueError(
            f"architecture={cfg.architecture} models images (C, H, W); got event shape {event_shape}"
        )
    data_dim = math.prod(event_shape)

    def block(shape: tuple[int, int, int]) -> CNF:
        field_ = TimeConvNet(
            shape[0],
            tuple(cfg.hidden_dims),
            layer=cfg.layer,
            activation=cfg.activation,
            zero_init=cfg.zero_init,
        )
        return _cnf_block(cfg, field_, math.prod(shape), data_dim)

    return block


def _conv_flow(cfg: FFJORDSchema, event_shape: tuple[int, ...]) -> SequentialFlow:
    """``num_blocks`` conv CNFs on the whole image (FFJORD's single-scale image model)."""
    block = _conv_block_factory(cfg, event_shape)
    return SequentialFlow(block(tuple(event_shape)) for _ in range(cfg.num_blocks))


def _multiscale_flow(cfg: FFJORDSchema, event_shape: tuple[int, ...]) -> Flow:
    """FFJORD's multi-scale CNF (``ODENVP``) of conv CNF blocks."""
    block = _conv_block_factory(cfg, event_shape)
    return multiscale_cnf(
        tuple(event_shape), block, num_blocks=cfg.num_blocks, num_scales=cfg.num_scales
    )


#: ``model.architecture`` -> ``(model section, event shape) -> the flow from data to base``.
FFJORD_ARCHITECTURES: Registry[Callable[[FFJORDSchema, tuple[int, ...]], Flow]] = Registry(
    "FFJORD architecture",
    {"mlp": _mlp_flow, "conv": _conv_flow, "multiscale": _multiscale_flow},
)

#: ``model.regularizer_norm`` -> ``(block dimension, data dimension) -> factors of its integrals``.
REGULARIZER_NORMS: Registry[Callable[[int, int], dict[str, float]]] = Registry(
    "regularizer normalisation",
    {
        "sum": lambda block_dim, data_dim: {},
        "per_dim": lambda block_dim, data_dim: {
            "kinetic": data_dim * math.log(2.0) / (2 * block_dim),
            "jacobian": data_dim * math.log(2.0) / block_dim,
        },
    },
)


#: ``model.loss_unit`` -> ``data dimension -> factor of the training objective``.
#: Adam hardly sees a constant factor, but the adjoint does: its backward
#: solve controls the error of the adjoint state with an absolute tolerance,
#: and in nats per image that state is ``D ln 2`` times larger than in the
#: bits/dim the FFJORD and RNODE image scripts minimise, so it takes more
#: steps (MNIST model at initialisation: 368 backward NFE against 206).
LOSS_UNITS: Registry[Callable[[int], float]] = Registry(
    "training loss unit",
    {"nats": lambda dim: 1.0, "bits_per_dim": lambda dim: 1.0 / (dim * math.log(2.0))},
)


def build_ffjord(cfg: FFJORDSchema, event_shape: tuple[int, ...], settings: ODESettings) -> FFJORD:
    """Build an FFJORD model from its typed config section (``cfg.architecture`` picks the flow)."""
    flow = FFJORD_ARCHITECTURES[cfg.architecture](cfg, tuple(event_shape))
    return FFJORD(
        flow,
        event_shape,
        preprocess=cfg.preprocess.build(),
        settings=settings,
        kinetic_weight=cfg.kinetic,
        jacobian_weight=cfg.jacobian,
        loss_scale=LOSS_UNITS[cfg.loss_unit](int(torch.Size(event_shape).numel())),
    )


def _check_data(cfg: FFJORDSchema, kind: str) -> str | None:
    """A one-line problem when the architecture does not fit the data layout."""
    if cfg.architecture == "mlp" and kind == "image":
        return (
            "data.flatten: family 'ffjord' with model.architecture=mlp models flat vectors; set "
            "data.flatten=true, or model.architecture=multiscale (or conv) for (C, H, W) images"
        )
    if cfg.architecture != "mlp" and kind != "image":
        return (
            f"model.architecture: {cfg.architecture} needs images kept as (C, H, W) "
            "(an image data set with data.flatten=false); use architecture=mlp for vectors"
        )
    return None


@register_family("ffjord", FFJORDSchema, check_data=_check_data)
def _build(cfg: FFJORDSchema, event_shape: tuple[int, ...], eval_cfg: Any) -> FFJORD:
    return build_ffjord(cfg, event_shape, ODESettings.from_eval(eval_cfg))
