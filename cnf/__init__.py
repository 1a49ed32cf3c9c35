"""cnf — continuous normalizing flows and diffusion bridges.

One time convention for the whole library: data at t = 0, noise / base
distribution at t = T (T = 1 unless learned).
"""

from cnf.cost import cost_curve, parse_cost_grid
from cnf.data import DATASETS, Dataset, build_dataset
from cnf.diffusion import SAMPLERS, SDES, build_sde
from cnf.divergence import ExactDivergence, HutchinsonDivergence, build_divergence, sample_probe
from cnf.flows import CNF, Flow, MovingBatchNorm, SequentialFlow, build_flow
from cnf.models import MODELS, EvalOutput, GenerativeModel, LossOutput, build_model
from cnf.models.diffflow import DiffFlow
from cnf.models.flow import FlowModel
from cnf.models.flow_matching import FlowMatchingModel
from cnf.models.indm import INDM
from cnf.models.score import ScoreModel
from cnf.nets import ACTIVATIONS, LAYERS, TimeMLP
from cnf.solve import ODESolution, SolverConfig, integrate
from cnf.tables import build_table, load_table_spec

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "CNF",
    "DATASETS",
    "Dataset",
    "DiffFlow",
    "EvalOutput",
    "ExactDivergence",
    "Flow",
    "FlowMatchingModel",
    "FlowModel",
    "GenerativeModel",
    "HutchinsonDivergence",
    "INDM",
    "LAYERS",
    "LossOutput",
    "MODELS",
    "MovingBatchNorm",
    "ODESolution",
    "SAMPLERS",
    "SDES",
    "ScoreModel",
    "SequentialFlow",
    "SolverConfig",
    "TimeMLP",
    "build_dataset",
    "build_divergence",
    "build_flow",
    "build_model",
    "build_sde",
    "build_table",
    "cost_curve",
    "integrate",
    "load_table_spec",
    "parse_cost_grid",
    "sample_probe",
]
