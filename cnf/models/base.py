"""The one interface every model family implements (ARCHITECTURE.md, "The family contract").

Train, evaluate, the likelihood-vs-cost tool and the tables only ever call:

* :meth:`GenerativeModel.training_loss` — a scalar loss on a batch with its
  statistics (NFE, regulariser values, ...);
* :meth:`GenerativeModel.evaluate` — per-sample NLL and/or NELBO in nats with
  statistics, under a typed ``settings`` object (default: the model's own);
* :meth:`GenerativeModel.sample` — samples under ``settings``, reporting NFE.

Each family declares its evaluation and sampling knobs as one frozen
dataclass, ``Settings`` (solver, divergence, sampler, steps, ...), and holds
its defaults in ``self.settings``; :meth:`GenerativeModel.with_settings`
turns flat command-line keys (``method=rk4``, ``steps=8``) into a new typed
object through :func:`cnf.settings.update` — the one parser of cost keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from cnf.flows.base import (
    DEFAULT_SETTINGS,
    Flow,
    FlowOutput,
    FlowSettings,
    flow_log_prob,
    flow_sample,
)
from cnf.registry import Registry
from cnf.settings import update
from cnf.solve import SolveStats

__all__ = [
    "MODELS",
    "ChainModel",
    "EvalOutput",
    "Family",
    "GenerativeModel",
    "LossOutput",
    "SampleOutput",
    "register_family",
]


@dataclass
class LossOutput:
    """A training loss and its statistics (plain floats, ready to log).

    ``after_backward`` gives the statistics known only once ``loss.backward()``
    has run (the adjoint's backward NFE); None when there are none.
    """

    loss: Tensor
    stats: dict[str, float] = field(default_factory=dict)
    after_backward: Callable[[], dict[str, float]] | None = None


@dataclass
class EvalOutput:
    """Per-sample evaluation in nats.

    Attributes:
        nll: Negative log-likelihood per sample ``(B,)`` (None if the model has none).
        nelbo: Negative ELBO per sample ``(B,)`` — an upper bound on the NLL.
        stats: e.g. ``{"nfe": ...}``.
        nll_probes: ``(B, K)`` when ``nll`` is a Hutchinson estimate: the NLL
            once per probe (``nll`` is their mean), from which
            :func:`cnf.evaluation.summarize` gives the estimator's standard error.
        nll_is_bound: ``nll`` is itself an upper bound (a single-sample
            estimate of one), not the model's NLL: a variational flow term,
            e.g. INDM's released global-latent flow (:mod:`cnf.flows.global_latent`).
    """

    nll: Tensor | None = None
    nelbo: Tensor | None = None
    stats: dict[str, float] = field(default_factory=dict)
    nll_probes: Tensor | None = None
    nll_is_bound: bool = False

    def minus_logdet(self, logdet: Tensor) -> EvalOutput:
        """The same evaluation seen through a bijection with ``log|det|`` ``logdet`` ``(B,)``.

        Every per-sample NLL term (``nll``, ``nelbo``, ``nll_probes``) loses
        ``logdet``: the change of variables from the model's space to the data's.
        """

        def shift(v: Tensor | None) -> Tensor | None:
            return None if v is None else v - (logdet if v.dim() == 1 else logdet[:, None])

        return replace(
            self, nll=shift(self.nll), nelbo=shift(self.nelbo), nll_probes=shift(self.nll_probes)
        )


class SampleOutput(NamedTuple):
    """Samples ``(n, *event_shape)`` and the statistics of the sampler (``{"nfe": ...}``).

    A named tuple: ``x, stats = model.sample(n)`` works.
    """

    x: Tensor
    stats: dict[str, float]


class GenerativeModel(nn.Module):
    """Base class of every family.

    Attributes:
        event_shape: Shape of one sample.
        settings: The family's default evaluation/sampling settings (a frozen
            dataclass of type ``Settings``).
    """

    Settings: ClassVar[type]
    event_shape: tuple[int, ...]
    settings: Any

    def training_loss(self, x: Tensor) -> LossOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def evaluate(self, x: Tensor, settings: Any = None) -> EvalOutput:
        """Per-sample NLL and/or NELBO of ``x`` in nats, in eval mode without gradients.

        ``settings``: None (the model's own), a ``Settings`` object, or a
        mapping of flat/dotted keys (validated by :meth:`with_settings`).
        """
        s = self._resolve(settings)
        with self.evaluating():
            return self._evaluate(x, s)

    def sample(
        self, n: int, settings: Any = None, *, generator: torch.Generator | None = None
    ) -> SampleOutput:
        """``n`` samples under ``settings`` (as in :meth:`evaluate`) with the sampler's NFE."""
        s = self._resolve(settings)
        with self.evaluating():
            return self._sample(n, s, generator)

    # What a family implements: called with resolved settings, in eval mode, without gradients.
    def _evaluate(self, x: Tensor, settings: Any) -> EvalOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def _sample(
        self, n: int, settings: Any, generator: torch.Generator | None
    ) -> SampleOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def with_settings(self, changes: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        """This model's settings with flat or dotted keys changed (validated, typed)."""
        return update(self.settings, changes, **kwargs)

    def default_cost_grid(self) -> list[dict[str, Any]]:
        """Flat settings the likelihood-vs-cost tool sweeps by default."""
        return [{}]

    def _resolve(self, settings: Any) -> Any:
        if settings is None:
            return self.settings
        if isinstance(settings, Mapping):
            return self.with_settings(settings)
        if not isinstance(settings, self.Settings):
            raise TypeError(
                f"{type(self).__name__} takes {self.Settings.__name__} settings, "
                f"got {type(settings).__name__}"
            )
        return settings

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Eval mode and no gradients for the duration, restoring the mode after."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class ChainModel(GenerativeModel):
    """A family whose density is one chain of flows from data to a base distribution.

    Subclasses define ``data_to_base`` (the flows, in order), ``base`` and
    ``base_shape`` (the shape one base sample has; default ``event_shape``);
    the likelihood and the sampler then go through :func:`cnf.flows.base.flow_log_prob`
    and :func:`~cnf.flows.base.flow_sample`, the library's one likelihood path.
    """

    base: Any

    @property
    def data_to_base(self) -> list[Flow]:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def base_shape(self) -> tuple[int, ...]:
        return self.event_shape

    def chain_log_prob(
        self, x: Tensor, settings: FlowSettings = DEFAULT_SETTINGS
    ) -> tuple[Tensor, FlowOutput]:
        """``log p(x)`` per sample in nats and the chain's output (solve statistics, regularisers)."""
        return flow_log_prob(self.data_to_base, self.base, x, settings)

    def chain_sample(
        self,
        n: int,
        settings: FlowSettings = DEFAULT_SETTINGS,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, SolveStats]:
        """``x = chain^{-1}(τ z)``, ``z ~ base``, and the statistics of the inverse solves."""
        return flow_sample(
            self.data_to_base,
            self.base,
            n,
            self.base_shape,
            settings=settings,
            temperature=temperature,
            generator=generator,
            dtype=self.dtype,
            device=self.device,
        )


# ---------------------------------------------------------------- the registry
@dataclass(frozen=True)
class Family:
    """A registered family: its builder, its config schema and its data constraint.

    ``build(model_section, event_shape, eval_section)`` receives the typed
    ``model:`` section (an instance of ``schema``) and the run's ``eval:``
    section and returns a :class:`GenerativeModel`. ``check_data(model_section,
    kind)`` (optional) returns a one-line problem, or None, for data of kind
    ``image`` (kept as ``(C, H, W)``) or ``vector``, when that depends on the
    model's options.
    """

    build: Callable[[Any, tuple[int, ...], Any], GenerativeModel]
    schema: type
    vector_only: bool = False  # the family models flat vectors (data.flatten must stay true)
    check_data: Callable[[Any, str], str | None] | None = None


#: ``model.family`` -> :class:`Family`. Each family's module registers itself
#: with :func:`register_family`; :mod:`cnf.models` imports every module of the
#: package, so a new family is one new module (plus its schema and a config).
MODELS: Registry[Family] = Registry("model family")


def register_family(
    name: str,
    schema: type,
    *,
    vector_only: bool = False,
    check_data: Callable[[Any, str], str | None] | None = None,
) -> Callable[[Callable[..., GenerativeModel]], Callable[..., GenerativeModel]]:
    """Decorator: register ``build(model_section, event_shape, eval_section)`` as family ``name``."""

    def decorator(build: Callable[..., GenerativeModel]) -> Callable[..., GenerativeModel]:
        MODELS.register(name, Family(build, schema, vector_only, check_data))
        return build

    return decorator
