"""Discrete normalizing flows trained by maximum likelihood (the ``flow`` family).

Data at t = 0, base N(0, I) at t = T (DESIGN.md §1.1). Any flow of
:data:`cnf.flows.registry.FLOWS` (``nice``, ``realnvp``, ``glow``, ``resflow``)
maps data ``x`` to ``z``; the model density is

    log p(x) = log N(z; 0, I) + log|det ∂z/∂x|.

* ``training_loss`` — the NLL in nats averaged over the batch; for a residual
  flow the log-det is the flow's training estimator (Russian roulette by
  default: unbiased, so the loss is an unbiased NLL estimate);
* ``evaluate`` — the NLL per sample. Exact for NICE, RealNVP and Glow. For a
  residual flow the log-det is computed by the brute-force Jacobian when the
  dimension is at most ``logdet_exact_max_dim`` (exact), otherwise by a long
  power series (``logdet_series_terms`` terms, Hutchinson probe: an
  estimate) or, with ``logdet_series_terms = 0``, by the flow's own training
  estimator (Russian roulette: unbiased, cheap in high dimension);
  ``stats["flow_logdet_exact"]`` is 1 or 0 accordingly;
* ``sample`` — ``x = f^{-1}(τ·ε)``, ``ε ~ N(0, I)``, τ the temperature.

Optional fixed preprocessing before the flow, whose log-determinant is added
back so that likelihoods are densities of the data as the loader gives it:
a logit map ``logit(α + (1 − 2α)x)`` for data in [0, 1] (``logit_alpha > 0``,
RealNVP §4.1) and an affine map ``data_scale·x + data_shift``.

**Cost settings** (``evaluate``/``sample``): ``temperature`` (sampling),
``logdet`` (``exact`` | ``series`` | ``own``, residual flows) and ``series_terms``.

References:
    Dinh, Krueger & Bengio, "NICE", ICLR workshop 2015.
    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017.
    Kingma & Dhariwal, "Glow", NeurIPS 2018.
    Chen, Behrmann, Duvenaud & Jacobsen, "Residual flows for invertible
    generative modeling", NeurIPS 2019.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cnf.flows.base import Flow, IdentityFlow, standard_normal_logprob
from cnf.flows.logit import LogitTransform
from cnf.flows.registry import FLOWS, build_flow
from cnf.flows.residual import (
    POISSON_REFUSED,
    ROULETTE_DISTRIBUTIONS,
    ExactLogDet,
    LogDetEstimator,
    ResidualBlock,
    SeriesLogDet,
)
from cnf.models.base import EvalOutput, GenerativeModel, LossOutput

__all__ = [
    "FlowModel",
    "FlowSchema",
    "Preprocess",
    "build_flow_model",
    "build_named_flow",
    "check_flow_section",
    "eval_logdet",
    "validate_flow",
]

COST_KEYS = frozenset({"temperature", "logdet", "series_terms"})
LOGDET_MODES = ("exact", "series", "own")


@dataclass
class FlowSchema:
    """``model:`` section for ``family: flow``."""

    family: str = "flow"
    flow: str = "realnvp"  # nice | realnvp | glow | resflow
    # Options of the flow's builder (cnf.flows.registry; e.g. num_layers, hidden_features).
    flow_kwargs: dict[str, Any] = field(default_factory=dict)
    logit_alpha: float = 0.0  # > 0: logit(α + (1 − 2α)x) first, for data in [0, 1]
    data_scale: float = 1.0  # then data_scale·x + data_shift
    data_shift: float = 0.0
    temperature: float = 1.0  # sampling: z ~ N(0, τ² I)
    logdet_exact_max_dim: int = 16  # resflow evaluation: exact log-det up to this dimension
    logdet_series_terms: int = 50  # ... else a power series with this many terms (0: own estimator)


# ------------------------------------------------------------------ helpers
class Preprocess(nn.Module):
    """Fixed map ``y = a·logit(α + (1 − 2α)x) + b`` (logit optional) with its log-det.

    Args:
        event_shape: Shape of one sample.
        logit_alpha: ``α``; 0 switches the logit off.
        data_scale, data_shift: ``a`` (non-zero) and ``b``.
    """

    def __init__(
        self,
        event_shape: tuple[int, ...],
        *,
        logit_alpha: float = 0.0,
        data_scale: float = 1.0,
        data_shift: float = 0.0,
    ):
        super().__init__()
        if data_scale == 0:
            raise ValueError("data_scale must be non-zero")
        self.logit = LogitTransform(logit_alpha) if logit_alpha > 0 else None
        self.scale, self.shift = float(data_scale), float(data_shift)
        dim = int(torch.Size(event_shape).numel())
        # The affine part's log-det is a constant; kept as a float so that with
        # the logit off the NLL is computed exactly as in the score model.
        self.log_scale = dim * math.log(abs(self.scale))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(B, *event) -> (B, *event)``; the logit's log-det ``(B,)`` or None."""
        logdet = None
        if self.logit is not None:
            x, logdet = self.logit(x)
        return self.scale * x + self.shift, logdet

    def inverse(self, y: Tensor) -> Tensor:
        x = (y - self.shift) / self.scale
        return self.logit.inverse(x) if self.logit is not None else x


def _residual_blocks(flow: nn.Module) -> list[ResidualBlock]:
    return [m for m in flow.modules() if isinstance(m, ResidualBlock)]


@contextlib.contextmanager
def eval_logdet(
    flow: nn.Module,
    dim: int,
    *,
    mode: str | None = None,
    exact_max_dim: int = 16,
    series_terms: int = 50,
) -> Iterator[bool | None]:
    """Temporarily give every residual block an evaluation log-det estimator.

    Args:
        flow: A flow; blocks other than :class:`ResidualBlock` are untouched.
        dim: Dimension of the data (decides ``exact`` vs ``series`` when ``mode`` is None).
        mode: ``exact`` (brute-force Jacobian) | ``series`` | ``own`` (keep
            each block's training estimator) | None (automatic: ``exact`` up to
            ``exact_max_dim``, else ``series``, or ``own`` if ``series_terms`` is 0).
        exact_max_dim: Largest dimension for the automatic ``exact`` choice.
        series_terms: Terms of the power series (Hutchinson probe).

    Yields:
        True if the log-det is exact, False if estimated, None if the flow has
        no residual blocks (then it is exact by construction).
    """
    blocks = _residual_blocks(flow)
    if not blocks:
        yield None
        return
    mode = mode or ("exact" if dim <= exact_max_dim else "series" if series_terms > 0 else "own")
    if mode not in LOGDET_MODES:
        raise ValueError(f"unknown logdet mode '{mode}'; valid: {', '.join(LOGDET_MODES)}")
    if mode == "own":
        yield False
        return
    est: LogDetEstimator = ExactLogDet() if mode == "exact" else SeriesLogDet(n_terms=series_terms)
    old = [b.logdet_estimator for b in blocks]
    for b in blocks:
        b.logdet_estimator = est
    try:
        yield mode == "exact"
    finally:
        for b, e in zip(blocks, old):
            b.logdet_estimator = e


def build_named_flow(name: str, event_shape: tuple[int, ...], kwargs: Mapping[str, Any]) -> Flow:
    """A registry flow, or :class:`IdentityFlow` for ``identity`` (which takes no options)."""
    if name == "identity":
        if kwargs:
            raise ValueError(f"the identity flow takes no options, got {', '.join(kwargs)}")
        return IdentityFlow()
    return build_flow(name, event_shape=tuple(event_shape), **dict(kwargs))


# ------------------------------------------------------------------ the model
class FlowModel(GenerativeModel):
    """A discrete flow with a standard-normal base, trained by maximum likelihood.

    Args:
        flow: A :class:`~cnf.flows.base.Flow` mapping ``(B, *event)`` to ``z`` of the same shape.
        event_shape: Shape of one data sample.
        preprocess: Fixed map applied before the flow (default: identity).
        temperature: Default sampling temperature.
        logdet_exact_max_dim, logdet_series_terms: Residual-flow evaluation (module docstring).

    Example:
        >>> model = FlowModel(build_flow("realnvp", event_shape=(2,)), (2,))
        >>> nll = model.evaluate(torch.randn(8, 2)).nll
        >>> x, _ = model.sample(4)
    """

    def __init__(
        self,
        flow: Flow,
        event_shape: tuple[int, ...],
        *,
        preprocess: Preprocess | None = None,
        temperature: float = 1.0,
        logdet_exact_max_dim: int = 16,
        logdet_series_terms: int = 50,
    ):
        super().__init__()
        self.flow = flow
        self.event_shape = tuple(event_shape)
        self.dim = int(torch.Size(self.event_shape).numel())
        self.preprocess = preprocess or Preprocess(self.event_shape)
        self.temperature = float(temperature)
        self.logdet_exact_max_dim = logdet_exact_max_dim
        self.logdet_series_terms = logdet_series_terms

    def log_prob(self, x: Tensor) -> Tensor:
        """``log p(x)`` per sample ``(B,)`` in nats (the flow's current log-det estimator)."""
        y, pre_logdet = self.preprocess(x)
        z, logdet = self.flow(y)
        if pre_logdet is not None:
            logdet = logdet + pre_logdet
        return standard_normal_logprob(z) + logdet + self.preprocess.log_scale

    def training_loss(self, x: Tensor) -> LossOutput:
        nll = -self.log_prob(x)
        loss = nll.mean()
        return LossOutput(loss, {"nll": float(loss.detach())})

    def _check_cost(self, cost: Mapping[str, Any] | None) -> dict[str, Any]:
        cost = dict(cost or {})
        unknown = set(cost) - COST_KEYS
        if unknown:
            raise ValueError(
                f"unknown cost key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(COST_KEYS))}"
            )
        return cost

    @torch.no_grad()
    def evaluate(self, x: Tensor, *, cost: Mapping[str, Any] | None = None) -> EvalOutput:
        """Exact NLL per sample in nats (residual flows: see the module docstring)."""
        cost = self._check_cost(cost)
        was_training = self.training
        self.eval()
        try:
            with eval_logdet(
                self.flow,
                self.dim,
                mode=cost.get("logdet"),
                exact_max_dim=self.logdet_exact_max_dim,
                series_terms=int(cost.get("series_terms", self.logdet_series_terms)),
            ) as exact:
                nll = -self.log_prob(x)
        finally:
            self.train(was_training)
        stats = {"flow_logdet_exact": 1.0 if exact in (None, True) else 0.0}
        return EvalOutput(nll=nll, stats=stats)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        cost: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """``x = f^{-1}(τ ε)``; residual flows invert by fixed-point iteration."""
        cost = self._check_cost(cost)
        tau = float(cost.get("temperature", self.temperature))
        was_training = self.training
        self.eval()
        try:
            eps = torch.randn(
                (n, *self.event_shape), generator=generator, dtype=self.dtype, device=self.device
            )
            x = self.preprocess.inverse(self.flow.inverse(tau * eps))
        finally:
            self.train(was_training)
        return x, {"nfe": 0.0}

    def default_cost_grid(self) -> list[dict[str, Any]]:
        if _residual_blocks(self.flow):
            return [{"logdet": "exact"}, {"logdet": "series", "series_terms": 50}]
        return [{}]


# ------------------------------------------------------------------ config
def build_flow_model(cfg: Mapping[str, Any], event_shape: tuple[int, ...]) -> FlowModel:
    """Build a flow model from its ``model:`` config section (missing keys: defaults)."""
    c = {**FlowSchema().__dict__, **dict(cfg)}
    flow = build_named_flow(c["flow"], event_shape, dict(c["flow_kwargs"] or {}))
    pre = Preprocess(
        tuple(event_shape),
        logit_alpha=c["logit_alpha"],
        data_scale=c["data_scale"],
        data_shift=c["data_shift"],
    )
    return FlowModel(
        flow,
        event_shape,
        preprocess=pre,
        temperature=c["temperature"],
        logdet_exact_max_dim=c["logdet_exact_max_dim"],
        logdet_series_terms=c["logdet_series_terms"],
    )


def check_flow_section(m: Mapping[str, Any], *, allow_identity: bool = False) -> None:
    """Check ``model.flow`` and the option names in ``model.flow_kwargs``."""
    valid = sorted(FLOWS) + (["identity"] if allow_identity else [])
    if m["flow"] not in valid:
        raise ValueError(f"model.flow: unknown value '{m['flow']}'; valid: {', '.join(valid)}")
    kwargs = dict(m["flow_kwargs"] or {})
    if m["flow"] == "identity":
        if kwargs:
            raise ValueError("model.flow_kwargs: the identity flow takes no options")
    else:
        # Building on a dummy shape would be costly; check the option names instead.
        import inspect

        builder = FLOWS[m["flow"]]
        options = set()
        for fn in (builder.vector, builder.image):
            if fn is not None:
                options |= set(list(inspect.signature(fn).parameters)[1:])
        unknown = sorted(set(kwargs) - options)
        if unknown:
            raise ValueError(
                f"model.flow_kwargs: unknown option(s) {', '.join(unknown)} for flow "
                f"'{m['flow']}'; valid: {', '.join(sorted(options))}"
            )
        dist = kwargs.get("roulette_distribution", "geometric")
        if dist == "poisson":
            raise ValueError(f"model.flow_kwargs.roulette_distribution: {POISSON_REFUSED}")
        if dist not in ROULETTE_DISTRIBUTIONS:
            raise ValueError(
                f"model.flow_kwargs.roulette_distribution: unknown value '{dist}'; "
                f"valid: {', '.join(ROULETTE_DISTRIBUTIONS)}"
            )


def validate_flow(m: Mapping[str, Any]) -> None:
    """Check a ``family: flow`` model section; raises ``ValueError("model.key: ...")``."""
    check_flow_section(m)
    if not 0 <= m["logit_alpha"] < 0.5:
        raise ValueError(
            f"model.logit_alpha: must be in [0, 0.5) (0 = off), got {m['logit_alpha']}"
        )
    if m["data_scale"] == 0:
        raise ValueError("model.data_scale: must be non-zero")
    if m["temperature"] <= 0:
        raise ValueError(f"model.temperature: must be > 0, got {m['temperature']}")
    if m["logdet_exact_max_dim"] < 0 or m["logdet_series_terms"] < 0:
        raise ValueError("model.logdet_exact_max_dim/logdet_series_terms: must be >= 0")
