"""Diffusion machinery and simulation-free CNF training (docs/methods.md §4, §7).

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
from cnf.diffusion.likelihood import (
    CORRECTIONS,
    ProbabilityFlow,
    probability_flow_cnf,
    probability_flow_nll,
)
from cnf.diffusion.ncsnpp import NCSNpp, ddpm_unet, ddpmpp, ncsnpp  # registers them
from cnf.diffusion.nets import (
    PARAMETERIZATIONS,
    SCORE_NETS,
    TIME_EMBEDDINGS,
    ScoreNetwork,
    build_time_embedding,
    output_to_score,
    score_mlp,
    score_to_output,
)
from cnf.diffusion.samplers import (
    SCORE_SAMPLERS,
    SamplerOptions,
    euler_maruyama,
    predictor_corrector,
    probability_flow_sample,
    sdeint_sample,
)
from cnf.diffusion.score import WEIGHTINGS, decoder_constant, dsm_loss, nelbo, prior_kl
from cnf.diffusion.sde import SDES, VESDE, VPSDE, LinearSDE, SubVPSDE, build_sde
from cnf.diffusion.unet import UNet  # registers the "unet" score network

__all__ = [
    "CORRECTIONS",
    "LinearSDE",
    "NCSNpp",
    "OT_SOLVERS",
    "PAIRINGS",
    "PARAMETERIZATIONS",
    "ProbabilityFlow",
    "SCORE_NETS",
    "SCORE_SAMPLERS",
    "SDES",
    "SamplerOptions",
    "ScoreNetwork",
    "SubVPSDE",
    "TIME_EMBEDDINGS",
    "UNet",
    "VESDE",
    "VPSDE",
    "WEIGHTINGS",
    "build_sde",
    "build_time_embedding",
    "cfm_loss",
    "ddpm_unet",
    "ddpmpp",
    "decoder_constant",
    "dsm_loss",
    "euler_maruyama",
    "load_pairs",
    "ncsnpp",
    "nelbo",
    "ot_permutation",
    "output_to_score",
    "pair_batch",
    "path_velocity",
    "predictor_corrector",
    "prior_kl",
    "probability_flow_cnf",
    "probability_flow_nll",
    "probability_flow_sample",
    "reflow_pairs",
    "save_pairs",
    "score_mlp",
    "score_to_output",
    "sdeint_sample",
    "straight_path",
    "transport_cost",
]
