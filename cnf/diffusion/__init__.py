"""Diffusion machinery and simulation-free CNF training (DESIGN.md §1.3, §1.6).

Time convention: data at t = 0, noise at t = 1.
"""

from cnf.diffusion.flow_matching import (
    OT_SOLVERS,
    PAIRINGS,
    cfm_loss,
    load_pairs,
    ot_permutation,
    pair_batch,
    path_velocity,
    reflow_pairs,
    save_pairs,
    straight_path,
    transport_cost,
)
from cnf.diffusion.likelihood import CORRECTIONS, ProbabilityFlow, probability_flow_nll
from cnf.diffusion.nets import (
    PARAMETERIZATIONS,
    TIME_EMBEDDINGS,
    ScoreMLP,
    ScoreNetwork,
    output_to_score,
    score_to_output,
)
from cnf.diffusion.samplers import (
    SAMPLERS,
    euler_maruyama,
    predictor_corrector,
    probability_flow_sample,
    sdeint_sample,
)
from cnf.diffusion.score import WEIGHTINGS, decoder_constant, dsm_loss, nelbo, prior_kl
from cnf.diffusion.sde import SDES, VESDE, VPSDE, LinearSDE, SubVPSDE, build_sde
from cnf.diffusion.unet import UNet

__all__ = [
    "CORRECTIONS",
    "LinearSDE",
    "PARAMETERIZATIONS",
    "ProbabilityFlow",
    "SAMPLERS",
    "SDES",
    "ScoreMLP",
    "ScoreNetwork",
    "SubVPSDE",
    "TIME_EMBEDDINGS",
    "UNet",
    "VESDE",
    "VPSDE",
    "WEIGHTINGS",
    "build_sde",
    "decoder_constant",
    "dsm_loss",
    "euler_maruyama",
    "nelbo",
    "output_to_score",
    "predictor_corrector",
    "prior_kl",
    "probability_flow_nll",
    "probability_flow_sample",
    "score_to_output",
    "sdeint_sample",
    "OT_SOLVERS",
    "PAIRINGS",
    "cfm_loss",
    "load_pairs",
    "ot_permutation",
    "pair_batch",
    "path_velocity",
    "reflow_pairs",
    "save_pairs",
    "straight_path",
    "transport_cost",
]
