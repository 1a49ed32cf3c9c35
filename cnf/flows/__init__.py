"""Invertible flows behind one interface: ``z, logdet = flow(x)``; ``x = flow.inverse(z)``."""

from cnf.flows.base import (
    DiagonalNormal,
    Flow,
    FlowOutput,
    FlowSettings,
    IdentityFlow,
    Reshape,
    SequentialFlow,
    flow_log_prob,
    flow_sample,
    standard_normal_logprob,
    sum_except_batch,
)
from cnf.flows.cnf import CNF
from cnf.flows.normalization import MovingBatchNorm
from cnf.flows.preprocess import Preprocess
from cnf.flows.registry import FLOWS, build_flow

__all__ = [
    "CNF",
    "FLOWS",
    "DiagonalNormal",
    "Flow",
    "FlowOutput",
    "FlowSettings",
    "IdentityFlow",
    "MovingBatchNorm",
    "Preprocess",
    "Reshape",
    "SequentialFlow",
    "build_flow",
    "flow_log_prob",
    "flow_sample",
    "standard_normal_logprob",
    "sum_except_batch",
]
