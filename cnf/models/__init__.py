"""Model families behind one interface, and their registry.

:data:`MODELS` maps ``model.family`` to a :class:`Family`: the builder that
turns the family's typed config section (its schema lives in
:mod:`cnf.schema`) and the run's ``eval:`` section into a
:class:`~cnf.models.base.GenerativeModel`. Adding a family is one module
here, one schema in :mod:`cnf.schema` and one registry line (ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cnf.models.base import EvalOutput, GenerativeModel, LossOutput, SampleOutput
from cnf.models.diffflow import DiffFlow, DiffFlowSettings, build_diffflow
from cnf.models.ffjord import FFJORD, ODESettings, build_ffjord
from cnf.models.flow import FlowModel, FlowModelSettings, build_flow_model
from cnf.models.fm import FlowMatchingModel, build_flow_matching
from cnf.models.indm import INDM, INDMSettings, build_indm
from cnf.models.score import ScoreModel, ScoreSettings, build_score, score_settings
from cnf.registry import Registry

__all__ = [
    "FFJORD",
    "INDM",
    "MODELS",
    "DiffFlow",
    "DiffFlowSettings",
    "EvalOutput",
    "Family",
    "FlowMatchingModel",
    "FlowModel",
    "FlowModelSettings",
    "GenerativeModel",
    "INDMSettings",
    "LossOutput",
    "ODESettings",
    "SampleOutput",
    "ScoreModel",
    "ScoreSettings",
    "build_model",
]


def ode_settings(eval_cfg: Any) -> ODESettings:
    """The default solver and trace estimator of a CNF family, from the ``eval:`` section."""
    return ODESettings(solver=eval_cfg.solver.build(), divergence=eval_cfg.divergence.build())


@dataclass(frozen=True)
class Family:
    """How a family is built: ``build(model_section, event_shape, eval_section) -> model``."""

    build: Callable[[Any, tuple[int, ...], Any], GenerativeModel]
    vector_only: bool = False  # the family models flat vectors (data.flatten must stay true)


MODELS: Registry[Family] = Registry(
    "model family",
    {
        "ffjord": Family(lambda m, shape, ev: build_ffjord(m, shape, ode_settings(ev)), True),
        "fm": Family(lambda m, shape, ev: build_flow_matching(m, shape, ode_settings(ev))),
        "score": Family(lambda m, shape, ev: build_score(m, shape, score_settings(m, ev))),
        "diffflow": Family(lambda m, shape, ev: build_diffflow(m, shape)),
        "flow": Family(lambda m, shape, ev: build_flow_model(m, shape)),
        "indm": Family(build_indm),
    },
)


def build_model(cfg: Any, event_shape: tuple[int, ...]) -> GenerativeModel:
    """Build the model of a resolved run config (:func:`cnf.config.load_config`)."""
    from cnf.config import typed

    run = typed(cfg)
    return MODELS[run.model.family].build(run.model, tuple(event_shape), run.eval)
