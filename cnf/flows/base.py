"""The flow interface shared by every invertible map in the library.

Convention (one for the whole library, see ``docs/methods.md`` §1): a flow maps
*data* ``x`` (t = 0) to the *base* variable ``z`` (t = T). ``forward`` is the
normalising direction and returns the log-determinant of its Jacobian, so that

    log p_X(x) = log p_Z(z) + logdet,   z, logdet = flow(x).

``inverse`` is the sampling direction. Flows stack with :class:`SequentialFlow`,
which adds the per-step log-determinants.

**Per-call settings and statistics.** Some blocks have choices that change
per call — a continuous block's solver and divergence estimator, a residual
block's log-det estimator — and produce statistics (function evaluations,
RNODE integrals). :meth:`Flow.transform` takes those choices as an explicit
:class:`FlowSettings` and returns a :class:`FlowOutput` holding ``z``, the
log-determinant, the solve statistics and the regularisers of *this* call:
nothing is stored on the module between calls. Blocks without choices ignore
the settings; composites pass them to every child and add the results up.
:func:`flow_log_prob` is the one likelihood path every family uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cnf.solve import SolverConfig, SolveStats

__all__ = [
    "DiagonalNormal",
    "Flow",
    "FlowOutput",
    "FlowSettings",
    "IdentityFlow",
    "Reshape",
    "SequentialFlow",
    "flow_log_prob",
    "flow_log_prob_probes",
    "flow_sample",
    "standard_normal_logprob",
    "sum_except_batch",
]


@dataclass(frozen=True)
class FlowSettings:
    """Per-call choices of the blocks of a flow (``None``: each block's own).

    Attributes:
        solver: Solver of every continuous block.
        divergence: Trace estimator of every continuous block (a
            :class:`~cnf.divergence.DivergenceEstimator`).
        logdet: Log-det estimator of every residual block (a
            :class:`~cnf.flows.logdet.LogDetEstimator`).
        regularize: Integrate the RNODE regularisers of continuous blocks that have them.
    """

    solver: SolverConfig | None = None
    divergence: Any = None
    logdet: Any = None
    regularize: bool = False


DEFAULT_SETTINGS = FlowSettings()


@dataclass
class FlowOutput:
    """Result of :meth:`Flow.transform`.

    Attributes:
        z: The transformed batch ``(B, *event)``.
        logdet: ``log|det ∂z/∂x|`` per sample ``(B,)``.
        stats: Function evaluations of the continuous blocks' solves.
        regularizers: Per-sample RNODE integrals ``{"kinetic", "jacobian"}`` (summed over blocks).
        logdet_probes: ``(B, K)``: the log-determinant once per Hutchinson probe
            when a call keeps them apart (``per_probe`` estimators; ``logdet``
            is their mean), else None. Blocks without probes add their exact
            log-determinant to every column.
    """

    z: Tensor
    logdet: Tensor
    stats: SolveStats = field(default_factory=SolveStats)
    regularizers: dict[str, Tensor] = field(default_factory=dict)
    logdet_probes: Tensor | None = None

    def then(self, other: FlowOutput) -> FlowOutput:
        """The composition: ``other`` applied to ``self.z``."""
        regs = dict(self.regularizers)
        for k, v in other.regularizers.items():
            regs[k] = regs[k] + v if k in regs else v
        probes = None
        if self.logdet_probes is not None or other.logdet_probes is not None:
            probes = _probe_columns(self) + _probe_columns(other)
        return FlowOutput(
            other.z, self.logdet + other.logdet, self.stats + other.stats, regs, probes
        )


def _probe_columns(out: FlowOutput) -> Tensor:
    """``(B, K)`` per-probe log-determinants, or ``(B, 1)`` (the exact one, broadcast)."""
    return out.logdet_probes if out.logdet_probes is not None else out.logdet[:, None]


class Flow(nn.Module):
    """An invertible map ``x -> z`` with a tractable log-determinant.

    Leaf flows implement :meth:`forward` and :meth:`inverse`; flows with
    per-call choices or statistics implement :meth:`transform` and
    :meth:`inverse_transform` instead (``forward``/``inverse`` then call them
    with the default settings). Shapes: ``x`` is ``(B, *event_shape)``;
    ``logdet`` is ``(B,)`` and equals ``log|det dz/dx|`` per sample.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if type(self).transform is Flow.transform:  # pragma: no cover - interface
            raise NotImplementedError(
                f"{type(self).__name__} implements neither forward nor transform"
            )
        out = self.transform(x)
        return out.z, out.logdet

    def inverse(self, z: Tensor) -> Tensor:
        if type(self).inverse_transform is Flow.inverse_transform:  # pragma: no cover - interface
            raise NotImplementedError(
                f"{type(self).__name__} implements neither inverse nor inverse_transform"
            )
        return self.inverse_transform(z)[0]

    def transform(self, x: Tensor, settings: FlowSettings = DEFAULT_SETTINGS) -> FlowOutput:
        """``forward`` with per-call settings, returning its statistics (default: none)."""
        z, logdet = self(x)
        return FlowOutput(z, logdet)

    def inverse_transform(
        self, z: Tensor, settings: FlowSettings = DEFAULT_SETTINGS
    ) -> tuple[Tensor, SolveStats]:
        """``inverse`` with per-call settings, and the statistics of its solves."""
        return self.inverse(z), SolveStats()


class SequentialFlow(Flow):
    """Composition ``f_K ∘ … ∘ f_1``; ``forward`` applies ``f_1`` first."""

    def __init__(self, flows: Iterable[Flow]):
        super().__init__()
        self.flows = nn.ModuleList(flows)

    def transform(self, x: Tensor, settings: FlowSettings = DEFAULT_SETTINGS) -> FlowOutput:
        return chain_transform(self.flows, x, settings)

    def inverse_transform(
        self, z: Tensor, settings: FlowSettings = DEFAULT_SETTINGS
    ) -> tuple[Tensor, SolveStats]:
        return chain_inverse(self.flows, z, settings)


class IdentityFlow(Flow):
    """``z = x`` with log-determinant 0 (INDM with this flow is a plain score model)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z


class Reshape(Flow):
    """``(B, *event_in) -> (B, *event_out)`` (same number of elements), log-determinant 0.

    Lets a family whose network works on flat vectors keep image-shaped data.
    """

    def __init__(self, event_in: tuple[int, ...], event_out: tuple[int, ...]):
        super().__init__()
        if math.prod(event_in) != math.prod(event_out):
            raise ValueError(f"cannot reshape {event_in} into {event_out}")
        self.event_in, self.event_out = tuple(event_in), tuple(event_out)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.reshape(x.shape[0], *self.event_out), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z.reshape(z.shape[0], *self.event_in)


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum a ``(B, ...)`` tensor over every dimension but the first."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def standard_normal_logprob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over all but the batch dimension, shape ``(B,)``."""
    d = z[0].numel()
    return -0.5 * sum_except_batch(z**2) - 0.5 * d * torch.log(
        torch.tensor(2 * torch.pi, dtype=z.dtype)
    )


class DiagonalNormal:
    """The base density ``N(0, std² I)`` on events of any shape (std 1: standard normal).

    Args:
        std: Standard deviation (VE diffusions use σ_max).
    """

    def __init__(self, std: float = 1.0):
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.std = float(std)

    def log_prob(self, z: Tensor) -> Tensor:
        """``log N(z; 0, std² I)`` per sample ``(B,)``."""
        if self.std == 1.0:
            return standard_normal_logprob(z)
        d = z[0].numel()
        s2 = self.std**2
        return -0.5 * d * math.log(2 * math.pi * s2) - 0.5 * sum_except_batch(z.pow(2)) / s2

    def sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> Tensor:
        """Draw ``shape = (n, *event)`` samples."""
        z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return z if self.std == 1.0 else z * self.std


def _flows(flow: Flow | Sequence[Flow | None]) -> Sequence[Flow]:
    return [flow] if isinstance(flow, Flow) else [f for f in flow if f is not None]


def chain_transform(
    flows: Iterable[Flow], x: Tensor, settings: FlowSettings = DEFAULT_SETTINGS
) -> FlowOutput:
    """``f_K ∘ … ∘ f_1 (x)`` with the summed log-determinants, statistics and regularisers."""
    out = FlowOutput(x, x.new_zeros(x.shape[0]))
    for f in flows:
        out = out.then(f.transform(out.z, settings))
    return out


def chain_inverse(
    flows: Sequence[Flow], z: Tensor, settings: FlowSettings = DEFAULT_SETTINGS
) -> tuple[Tensor, SolveStats]:
    """The inverse of :func:`chain_transform` (last flow first) and the solves' statistics."""
    stats = SolveStats()
    for f in reversed(flows):
        z, st = f.inverse_transform(z, settings)
        stats = stats + st
    return z, stats


def flow_log_prob(
    flow: Flow | Sequence[Flow],
    base: Any,
    x: Tensor,
    settings: FlowSettings = DEFAULT_SETTINGS,
) -> tuple[Tensor, FlowOutput]:
    """``log p(x) = log p_base(z) + logdet`` with ``z = flow(x)``: the library's one likelihood path.

    Args:
        flow: Data → base map: a :class:`Flow`, or flows applied in order
            (the preprocessing, then the model's flow).
        base: Base density with ``log_prob(z) -> (B,)`` (e.g. :class:`DiagonalNormal`).
        x: Data ``(B, *event)``.
        settings: Per-call solver / divergence / log-det choices.

    Returns:
        ``log p(x)`` per sample ``(B,)`` in nats, and the :class:`FlowOutput`.
    """
    out = chain_transform(_flows(flow), x, settings)
    return base.log_prob(out.z) + out.logdet, out


def flow_log_prob_probes(logp: Tensor, out: FlowOutput) -> Tensor | None:
    """``log p(x)`` once per Hutchinson probe ``(B, K)`` from :func:`flow_log_prob`'s result.

    The same ``z`` and base density, one log-determinant per probe (their
    mean gives ``logp``); None when the call kept no probes apart.
    """
    if out.logdet_probes is None:
        return None
    return (logp - out.logdet)[:, None] + out.logdet_probes


def flow_sample(
    flow: Flow | Sequence[Flow],
    base: Any,
    n: int,
    event_shape: tuple[int, ...],
    *,
    settings: FlowSettings = DEFAULT_SETTINGS,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, SolveStats]:
    """``x = flow^{-1}(τ z)``, ``z ~ base`` of shape ``(n, *event_shape)``, and the solves' statistics."""
    z = base.sample((n, *event_shape), generator=generator, dtype=dtype, device=device)
    if temperature != 1.0:
        z = temperature * z
    return chain_inverse(_flows(flow), z, settings)
