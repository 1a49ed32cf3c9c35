"""The index of every named choice: one registry per kind, validated by the config schemas.

A config value such as ``model.sde.name: vp`` or ``train.optimizer: adam`` is
checked against the registry named here (:mod:`cnf.schema` looks them up
lazily), so configs never carry their own lists of valid names. Each
registry lives in the module that implements the choice; this module only
gathers them.
"""

from __future__ import annotations

from cnf.data import DATASETS
from cnf.diffflow.chain import BACKPROP_MODES, DIFFFLOW_SAMPLERS
from cnf.diffflow.schedules import BASE_DRIFTS, DIFFUSIONS, GRIDS
from cnf.diffusion.flow_matching import OT_SOLVERS, PAIRINGS
from cnf.diffusion.likelihood import CORRECTIONS
from cnf.diffusion.nets import CONDITIONINGS, PARAMETERIZATIONS, SCORE_NETS, TIME_EMBEDDINGS
from cnf.diffusion.ode_samplers import TIME_GRIDS
from cnf.diffusion.samplers import SCORE_SAMPLERS, SDE_METHODS
from cnf.diffusion.score import WEIGHTINGS
from cnf.diffusion.sde import SDES
from cnf.divergence import DIVERGENCES, PROBES
from cnf.flows.registry import FLOWS, FLOWS_OR_IDENTITY
from cnf.models import MODELS
from cnf.models.diffflow import DIFFFLOW_NETS
from cnf.models.ffjord import FFJORD_ARCHITECTURES, LOSS_UNITS, REGULARIZER_NORMS
from cnf.models.fm import FM_NETS
from cnf.nets import ACTIVATIONS, CONV_LAYERS, LAYERS
from cnf.registry import Registry
from cnf.solve import METHODS
from cnf.train.loop import OPTIMIZERS, SCHEDULES
from cnf.train.tracking import WANDB_MODES

DEVICES: Registry[str] = Registry(
    "device", {"auto": "cuda when available", "cpu": "cpu", "cuda": "cuda[:N]", "mps": "Apple GPU"}
)
DTYPES: Registry[str] = Registry("dtype", {"float32": "float32", "float64": "float64"})

__all__ = [
    "ACTIVATIONS",
    "BACKPROP_MODES",
    "BASE_DRIFTS",
    "CONDITIONINGS",
    "CONV_LAYERS",
    "CORRECTIONS",
    "DATASETS",
    "DEVICES",
    "DIFFFLOW_NETS",
    "DIFFFLOW_SAMPLERS",
    "DIFFUSIONS",
    "DIVERGENCES",
    "DTYPES",
    "FFJORD_ARCHITECTURES",
    "FLOWS",
    "FLOWS_OR_IDENTITY",
    "FM_NETS",
    "GRIDS",
    "LAYERS",
    "LOSS_UNITS",
    "METHODS",
    "MODELS",
    "OPTIMIZERS",
    "OT_SOLVERS",
    "PAIRINGS",
    "PARAMETERIZATIONS",
    "PROBES",
    "REGULARIZER_NORMS",
    "SCHEDULES",
    "SCORE_NETS",
    "SCORE_SAMPLERS",
    "SDES",
    "SDE_METHODS",
    "TIME_EMBEDDINGS",
    "TIME_GRIDS",
    "WANDB_MODES",
    "WEIGHTINGS",
]
