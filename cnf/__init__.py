"""cnf — continuous normalizing flows and diffusion bridges.

One time convention for the whole library: data at t = 0, noise / base
distribution at t = T (T = 1 unless learned). The mathematics each family
implements is in ``docs/methods.md`` (index: ``docs/README.md``); the layers,
who owns what and the family contract in ``ARCHITECTURE.md``.
"""

from cnf.data import DATASETS, Dataset, build_dataset
from cnf.diffusion import SCORE_SAMPLERS, SDES, build_sde
from cnf.divergence import (
    DivergenceConfig,
    ExactDivergence,
    HutchinsonDivergence,
    build_divergence,
    sample_probe,
)
from cnf.flows import (
    CNF,
    Flow,
    FlowSettings,
    MovingBatchNorm,
    Preprocess,
    SequentialFlow,
    build_flow,
    flow_log_prob,
)
from cnf.models import (
    INDM,
    MODELS,
    DiffFlow,
    EvalOutput,
    FlowMatchingModel,
    FlowModel,
    GenerativeModel,
    LossOutput,
    ODESettings,
    SampleOutput,
    ScoreModel,
    build_model,
)
from cnf.nets import ACTIVATIONS, CONV_LAYERS, LAYERS, TimeConvNet, TimeMLP
from cnf.solve import ODESolution, SolverConfig, SolveStats, integrate

__version__ = "0.2.0"

__all__ = [
    "ACTIVATIONS",
    "CNF",
    "CONV_LAYERS",
    "DATASETS",
    "Dataset",
    "DiffFlow",
    "DivergenceConfig",
    "EvalOutput",
    "ExactDivergence",
    "Flow",
    "FlowMatchingModel",
    "FlowModel",
    "FlowSettings",
    "GenerativeModel",
    "HutchinsonDivergence",
    "INDM",
    "LAYERS",
    "LossOutput",
    "MODELS",
    "MovingBatchNorm",
    "ODESettings",
    "ODESolution",
    "Preprocess",
    "SCORE_SAMPLERS",
    "SDES",
    "SampleOutput",
    "ScoreModel",
    "SequentialFlow",
    "SolveStats",
    "SolverConfig",
    "TimeConvNet",
    "TimeMLP",
    "build_dataset",
    "build_divergence",
    "build_flow",
    "build_model",
    "build_sde",
    "flow_log_prob",
    "integrate",
    "sample_probe",
]
