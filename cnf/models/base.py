"""The one interface every model family shares (DESIGN.md §3).

Train, evaluate, the likelihood-vs-cost tool and the tables only ever call:

* :meth:`GenerativeModel.training_loss` — a scalar loss on a batch with its
  statistics (NFE, regulariser values, ...);
* :meth:`GenerativeModel.evaluate` — per-sample NLL and/or NELBO in nats with
  statistics; a ``cost`` mapping changes the solver/steps for this call;
* :meth:`GenerativeModel.sample` — samples with a cost knob, reporting NFE.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class LossOutput:
    """A training loss and its statistics (plain floats, ready to log)."""

    loss: Tensor
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalOutput:
    """Per-sample evaluation in nats.

    Attributes:
        nll: Negative log-likelihood per sample ``(B,)`` (None if the model has none).
        nelbo: Negative ELBO per sample ``(B,)`` — an upper bound on the NLL.
        stats: e.g. ``{"nfe": ...}``.
    """

    nll: Tensor | None = None
    nelbo: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)


class GenerativeModel(nn.Module):
    """Base class of every family. ``event_shape`` is the shape of one sample."""

    event_shape: tuple[int, ...]

    def training_loss(self, x: Tensor) -> LossOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def backward_stats(self) -> dict[str, float]:
        """Statistics known only after ``loss.backward()`` (e.g. adjoint NFE)."""
        return {}

    def evaluate(
        self, x: Tensor, *, cost: Mapping[str, Any] | None = None
    ) -> EvalOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def sample(
        self,
        n: int,
        *,
        cost: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:  # pragma: no cover - interface
        raise NotImplementedError

    def default_cost_grid(self) -> list[dict[str, Any]]:
        """Settings the likelihood-vs-cost tool sweeps by default."""
        return [{}]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype
