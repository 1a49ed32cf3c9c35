"""cnf — continuous normalizing flows and diffusion bridges.

One time convention for the whole library: data at t = 0, noise / base
distribution at t = T (T = 1 unless learned).
"""

from cnf.cost import cost_curve, parse_cost_grid
from cnf.data import DATASETS, Dataset, build_dataset
from cnf.divergence import ExactDivergence, HutchinsonDivergence, build_divergence, sample_probe
from cnf.flows import CNF, Flow, MovingBatchNorm, SequentialFlow, build_flow
from cnf.models import MODELS, EvalOutput, GenerativeModel, LossOutput, build_model
from cnf.models.diffflow import DiffFlow
from cnf.models.flow_matching import FlowMatchingModel
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
    "GenerativeModel",
    "HutchinsonDivergence",
    "LAYERS",
    "LossOutput",
    "MODELS",
    "MovingBatchNorm",
    "ODESolution",
    "SequentialFlow",
    "SolverConfig",
    "TimeMLP",
    "build_dataset",
    "build_divergence",
    "build_flow",
    "build_model",
    "build_table",
    "cost_curve",
    "integrate",
    "load_table_spec",
    "parse_cost_grid",
    "sample_probe",
]
