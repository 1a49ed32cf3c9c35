"""cnf — continuous normalizing flows and diffusion bridges.

One time convention for the whole library: data at t = 0, noise / base
distribution at t = T (T = 1 unless learned).
"""

from cnf.divergence import ExactDivergence, HutchinsonDivergence, build_divergence, sample_probe
from cnf.flows import CNF, Flow, MovingBatchNorm, SequentialFlow, build_flow
from cnf.models import MODELS, EvalOutput, GenerativeModel, LossOutput, build_model
from cnf.nets import ACTIVATIONS, LAYERS, TimeMLP
from cnf.solve import ODESolution, SolverConfig, integrate

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "CNF",
    "EvalOutput",
    "ExactDivergence",
    "Flow",
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
    "build_divergence",
    "build_flow",
    "build_model",
    "integrate",
    "sample_probe",
]
