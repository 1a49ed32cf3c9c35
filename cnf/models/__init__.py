"""Model families behind one interface, and their registry.

:data:`MODELS` maps ``model.family`` to a :class:`~cnf.models.base.Family`:
the builder that turns the family's typed config section (its schema lives
in :mod:`cnf.schema`) and the run's ``eval:`` section into a
:class:`~cnf.models.base.GenerativeModel`. Each family's module registers
itself with :func:`~cnf.models.base.register_family`, and importing this
package imports every module in it, so adding a family is one module here,
one schema in :mod:`cnf.schema` and one config file (ARCHITECTURE.md, "Adding a family").
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from cnf.models.base import (
    MODELS,
    EvalOutput,
    Family,
    GenerativeModel,
    LossOutput,
    SampleOutput,
    register_family,
)

# Every family module registers itself on import.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from cnf.models.diffflow import DiffFlow, DiffFlowSettings  # noqa: E402
from cnf.models.ffjord import FFJORD, ODESettings  # noqa: E402
from cnf.models.flow import FlowModel, FlowModelSettings  # noqa: E402
from cnf.models.fm import FlowMatchingModel  # noqa: E402
from cnf.models.indm import INDM, INDMSettings  # noqa: E402
from cnf.models.score import ScoreModel, ScoreSettings  # noqa: E402

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
    "register_family",
]


def build_model(cfg: Any, event_shape: tuple[int, ...]) -> GenerativeModel:
    """Build the model of a resolved run config (:func:`cnf.config.load_config`).

    A value the schema cannot check on its own (an option a builder rejects,
    e.g. an unknown coupling mask) is a one-line :class:`~cnf.config.ConfigError`.
    """
    from cnf.config import ConfigError, typed

    run = typed(cfg)
    try:
        return MODELS[run.model.family].build(run.model, tuple(event_shape), run.eval)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
