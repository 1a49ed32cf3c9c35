"""Model families: a name → (config schema, validator, builder) registry."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnf.divergence import build_divergence
from cnf.models.base import EvalOutput, GenerativeModel, LossOutput
from cnf.models.diffflow import DiffFlow, DiffFlowSchema, build_diffflow, validate_diffflow
from cnf.models.ffjord import FFJORD, FFJORDSchema, SolverSchema, build_ffjord, solver_from
from cnf.models.flow import FlowModel, FlowSchema, build_flow_model, validate_flow
from cnf.models.flow_matching import FlowMatchingModel, FlowMatchingSchema, build_flow_matching
from cnf.models.indm import INDM, INDMSchema, build_indm, validate_indm
from cnf.models.score import ScoreModel, ScoreSchema, build_score, validate_score
from cnf.nets import ACTIVATIONS, LAYERS

__all__ = [
    "MODELS",
    "DiffFlow",
    "EvalOutput",
    "FFJORD",
    "FlowMatchingModel",
    "FlowModel",
    "INDM",
    "GenerativeModel",
    "LossOutput",
    "ModelSpec",
    "ScoreModel",
    "SolverSchema",
    "build_model",
    "solver_from",
]


@dataclass(frozen=True)
class ModelSpec:
    """How a family is configured and built.

    ``validate(model_cfg)`` raises ``ValueError("key: message")`` for bad
    choices before anything is built or written; ``build(cfg, event_shape)``
    receives the whole resolved config.
    """

    schema: type
    validate: Callable[[Mapping[str, Any]], None]
    build: Callable[[Mapping[str, Any], tuple[int, ...]], GenerativeModel]


def check_choice(key: str, value: str, valid: Any) -> None:
    if value not in valid:
        raise ValueError(f"{key}: unknown value '{value}'; valid: {', '.join(sorted(valid))}")


def check_solver(key: str, cfg: Mapping[str, Any]) -> None:
    try:
        solver_from(cfg)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None


def _validate_ffjord(m: Mapping[str, Any]) -> None:
    check_choice("model.layer", m["layer"], LAYERS)
    check_choice("model.activation", m["activation"], ACTIVATIONS)
    check_choice("model.divergence", m["divergence"], ("exact", "hutchinson"))
    check_choice("model.probe", m["probe"], ("gaussian", "rademacher"))
    check_solver("model.solver", m["solver"])
    if not m["hidden_dims"] or any(h < 1 for h in m["hidden_dims"]):
        raise ValueError("model.hidden_dims: needs one or more positive widths")
    if m["num_blocks"] < 1:
        raise ValueError("model.num_blocks: must be >= 1")
    if m["time_length"] <= 0:
        raise ValueError("model.time_length: must be > 0")
    if m["kinetic"] < 0 or m["jacobian"] < 0:
        raise ValueError("model.kinetic/model.jacobian: RNODE weights must be >= 0")


def eval_divergence_from(cfg: Mapping[str, Any], dim: int):
    ev = cfg["eval"]
    name = ev["divergence"]
    if name == "auto":
        name = "exact" if dim <= ev["exact_max_dim"] else "hutchinson"
    return build_divergence(name, probe=ev["probe"], num_probes=ev["num_probes"])


def _with_eval_settings(build: Callable[..., GenerativeModel]):
    """Adapt ``build(model_cfg, event_shape, *, eval_solver, eval_divergence)`` to a ModelSpec builder."""

    def builder(cfg: Mapping[str, Any], event_shape: tuple[int, ...]) -> GenerativeModel:
        dim = math.prod(event_shape)
        return build(
            cfg["model"],
            event_shape,
            eval_solver=solver_from(cfg["eval"]["solver"]),
            eval_divergence=eval_divergence_from(cfg, dim),
        )

    return builder


def _validate_fm(m: Mapping[str, Any]) -> None:
    from cnf.diffusion.flow_matching import OT_SOLVERS, PAIRINGS

    check_choice("model.pairing", m["pairing"], PAIRINGS)
    check_choice("model.ot_solver", m["ot_solver"], OT_SOLVERS)
    check_choice("model.layer", m["layer"], LAYERS)
    check_choice("model.activation", m["activation"], ACTIVATIONS)
    if not m["hidden_dims"] or any(h < 1 for h in m["hidden_dims"]):
        raise ValueError("model.hidden_dims: needs one or more positive widths")
    if m["sigma"] < 0:
        raise ValueError(f"model.sigma: must be >= 0, got {m['sigma']}")
    if not 0 <= m["logit_alpha"] < 0.5:
        raise ValueError(
            f"model.logit_alpha: must be in [0, 0.5) (0 = off), got {m['logit_alpha']}"
        )
    for key in ("reflow_pairs", "init_from"):
        if m[key] and not Path(m[key]).exists():
            raise ValueError(f"model.{key}: {m[key]} does not exist")


MODELS: dict[str, ModelSpec] = {
    "ffjord": ModelSpec(FFJORDSchema, _validate_ffjord, _with_eval_settings(build_ffjord)),
    "fm": ModelSpec(FlowMatchingSchema, _validate_fm, _with_eval_settings(build_flow_matching)),
    "score": ModelSpec(ScoreSchema, validate_score, _with_eval_settings(build_score)),
    "diffflow": ModelSpec(
        DiffFlowSchema, validate_diffflow, lambda cfg, shape: build_diffflow(cfg["model"], shape)
    ),
    "flow": ModelSpec(
        FlowSchema, validate_flow, lambda cfg, shape: build_flow_model(cfg["model"], shape)
    ),
    "indm": ModelSpec(INDMSchema, validate_indm, _with_eval_settings(build_indm)),
}


def build_model(cfg: Mapping[str, Any], event_shape: tuple[int, ...]) -> GenerativeModel:
    family = cfg["model"]["family"]
    if family not in MODELS:
        raise ValueError(
            f"model.family: unknown value '{family}'; valid: {', '.join(sorted(MODELS))}"
        )
    return MODELS[family].build(cfg, event_shape)
