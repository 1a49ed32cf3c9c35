"""Discrete normalizing flows trained by maximum likelihood (the ``flow`` family).

Data at t = 0, base N(0, I) at t = T (docs/methods.md §2). Any flow of
:data:`cnf.flows.registry.FLOWS` (``nice``, ``realnvp``, ``glow``, ``resflow``)
maps data ``x`` to ``z``; the model density is

    log p(x) = log N(z; 0, I) + log|det ∂z/∂x|.

* ``training_loss`` — the NLL in nats averaged over the batch; for a residual
  flow the log-det is the flow's training estimator (Russian roulette by
  default: unbiased, so the loss is an unbiased NLL estimate);
* ``evaluate`` — the NLL per sample. Exact for NICE, RealNVP and Glow. For a
  residual flow the log-det follows the settings' :class:`LogDetChoice`
  (``model.eval_logdet``): the brute-force Jacobian up to ``exact_max_dim``
  dimensions (exact), otherwise a long power series (``series_terms``
  terms, Hutchinson probe: an estimate) or the flow's own training
  estimator (``own``: Russian roulette, unbiased, cheap in high dimension);
  ``stats["flow_logdet_exact"]`` is 1 or 0 accordingly. ``resflow_global``
  (a global-latent residual flow, :mod:`cnf.flows.global_latent`) gives a
  single-sample variational bound instead, flagged ``nll_is_bound``;
* ``sample`` — ``x = f^{-1}(τ·ε)``, ``ε ~ N(0, I)``, τ the temperature.

The preprocessing bijection (``model.preprocess``: an optional logit for data
in [0, 1], then an affine map) comes first; its log-determinant is added back
so that likelihoods are densities of the data as the loader gives it.

**Settings** (:class:`FlowModelSettings`): ``temperature`` (sampling),
``logdet`` (``auto`` | ``exact`` | ``series`` | ``own``, residual flows) and ``series_terms``.

References:
    Dinh, Krueger & Bengio, "NICE", ICLR workshop 2015.
    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017.
    Kingma & Dhariwal, "Glow", NeurIPS 2018.
    Chen, Behrmann, Duvenaud & Jacobsen, "Residual flows for invertible
    generative modeling", NeurIPS 2019.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cnf.flows.base import (
    DiagonalNormal,
    Flow,
    FlowSettings,
)
from cnf.flows.global_latent import is_variational
from cnf.flows.logdet import ExactLogDet, LogDetEstimator, SeriesLogDet
from cnf.flows.preprocess import Preprocess
from cnf.flows.registry import FLOWS_OR_IDENTITY
from cnf.flows.residual import ResidualBlock
from cnf.models.base import ChainModel, EvalOutput, LossOutput, SampleOutput, register_family
from cnf.schema import EvalLogDetSchema, FlowSchema, builder_options

__all__ = ["FlowModel", "FlowModelSettings", "LogDetChoice", "build_flow_model", "build_named_flow"]

LOGDET_MODES = ("auto", "exact", "series", "own")


@dataclass(frozen=True)
class LogDetChoice:
    """How residual blocks compute their log-determinant at evaluation.

    Attributes:
        name: ``auto`` (``exact`` up to ``exact_max_dim`` dimensions, else
            ``series``), ``exact`` (brute-force Jacobian), ``series`` (a
            ``series_terms``-term power series with a Hutchinson probe: an
            estimate) or ``own`` (each block's training estimator: Russian
            roulette, unbiased and cheap in high dimension).
    """

    name: str = "auto"
    exact_max_dim: int = 16
    series_terms: int = 50

    def __post_init__(self) -> None:
        if self.name not in LOGDET_MODES:
            raise ValueError(f"unknown logdet mode '{self.name}'; valid: {', '.join(LOGDET_MODES)}")
        if self.series_terms < 1:
            raise ValueError(f"series_terms must be >= 1, got {self.series_terms}")

    @classmethod
    def from_schema(cls, section: EvalLogDetSchema) -> LogDetChoice:
        return cls(section.name, section.exact_max_dim, section.series_terms)

    def estimator(self, flow: nn.Module, dim: int) -> tuple[LogDetEstimator | None, bool]:
        """The estimator for ``flow``'s residual blocks and whether the log-det is exact.

        Returns ``(None, True)`` for flows without residual blocks (exact by
        construction) and ``(None, False)`` for ``own``.
        """
        if not any(isinstance(m, ResidualBlock) for m in flow.modules()):
            return None, True
        mode = self.name
        if mode == "auto":
            mode = "exact" if dim <= self.exact_max_dim else "series"
        if mode == "own":
            return None, False
        if mode == "exact":
            return ExactLogDet(), True
        return SeriesLogDet(n_terms=self.series_terms), False


@dataclass(frozen=True)
class FlowModelSettings:
    """Sampling temperature and the residual blocks' evaluation log-det."""

    ALIASES = {"series_terms": ("logdet.series_terms",)}

    temperature: float = 1.0
    logdet: LogDetChoice = field(default_factory=LogDetChoice)

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def route(self, changes: dict[str, Any]) -> dict[str, Any]:
        # ``logdet=exact`` names the mode (the section's ``name``).
        if isinstance(changes.get("logdet"), str):
            changes["logdet.name"] = changes.pop("logdet")
        return changes


def build_named_flow(section: Any, event_shape: tuple[int, ...]) -> Flow:
    """A flow of :data:`cnf.flows.registry.FLOWS_OR_IDENTITY` from its typed ``{name, options}`` section."""
    return FLOWS_OR_IDENTITY[section.name](tuple(event_shape), **builder_options(section))


# ------------------------------------------------------------------ the model
class FlowModel(ChainModel):
    """A discrete flow with a standard-normal base, trained by maximum likelihood.

    Args:
        flow: A :class:`~cnf.flows.base.Flow` mapping ``(B, *event)`` to ``z`` of the same shape.
        event_shape: Shape of one data sample.
        preprocess: The data bijection applied before the flow (default: identity).
        settings: Default sampling temperature and evaluation log-det.

    Example:
        >>> from cnf.flows.registry import build_flow
        >>> model = FlowModel(build_flow("realnvp", event_shape=(2,)), (2,))
        >>> nll = model.evaluate(torch.randn(8, 2)).nll
        >>> x, _ = model.sample(4)
    """

    Settings = FlowModelSettings

    def __init__(
        self,
        flow: Flow,
        event_shape: tuple[int, ...],
        *,
        preprocess: Preprocess | None = None,
        settings: FlowModelSettings | None = None,
    ):
        super().__init__()
        self.flow = flow
        self.event_shape = tuple(event_shape)
        self.dim = int(torch.Size(self.event_shape).numel())
        self.preprocess = preprocess or Preprocess()
        self.settings = settings or FlowModelSettings()
        self.base = DiagonalNormal()

    @property
    def data_to_base(self) -> list[Flow]:
        return [self.preprocess, self.flow]

    def log_prob(self, x: Tensor, settings: FlowSettings = FlowSettings()) -> Tensor:  # noqa: B008
        """``log p(x)`` per sample ``(B,)`` in nats (the blocks' own log-det estimators by default)."""
        return self.chain_log_prob(x, settings)[0]

    def training_loss(self, x: Tensor) -> LossOutput:
        nll = -self.log_prob(x)
        loss = nll.mean()
        return LossOutput(loss, {"nll": float(loss.detach())})

    def _evaluate(self, x: Tensor, s: FlowModelSettings) -> EvalOutput:
        """NLL per sample in nats (residual flows: see :class:`LogDetChoice`)."""
        estimator, exact = s.logdet.estimator(self.flow, self.dim)
        nll = -self.log_prob(x, FlowSettings(logdet=estimator))
        return EvalOutput(
            nll=nll,
            stats={"flow_logdet_exact": 1.0 if exact else 0.0},
            nll_is_bound=is_variational(self.flow),
        )

    def _sample(
        self, n: int, s: FlowModelSettings, generator: torch.Generator | None
    ) -> SampleOutput:
        """``x = f^{-1}(τ ε)``; residual flows invert by fixed-point iteration."""
        x, _ = self.chain_sample(n, temperature=s.temperature, generator=generator)
        return SampleOutput(x, {"nfe": 0.0})

    def default_cost_grid(self) -> list[dict[str, Any]]:
        if any(isinstance(m, ResidualBlock) for m in self.flow.modules()):
            return [{"logdet": "exact"}, {"logdet": "series", "series_terms": 50}]
        return [{}]


# ------------------------------------------------------------------ config
def build_flow_model(cfg: FlowSchema, event_shape: tuple[int, ...]) -> FlowModel:
    """Build a flow model from its typed ``model:`` config section."""
    return FlowModel(
        build_named_flow(cfg.flow, event_shape),
        event_shape,
        preprocess=cfg.preprocess.build(),
        settings=FlowModelSettings(cfg.temperature, LogDetChoice.from_schema(cfg.eval_logdet)),
    )


@register_family("flow", FlowSchema)
def _build(cfg: FlowSchema, event_shape: tuple[int, ...], eval_cfg: Any) -> FlowModel:
    return build_flow_model(cfg, event_shape)
