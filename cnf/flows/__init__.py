"""Invertible flows behind one interface: ``z, logdet = flow(x)``; ``x = flow.inverse(z)``."""

from cnf.flows.base import (
    Flow,
    IdentityFlow,
    SequentialFlow,
    standard_normal_logprob,
    sum_except_batch,
)
from cnf.flows.cnf import CNF
from cnf.flows.logit import LogitTransform
from cnf.flows.normalization import MovingBatchNorm
from cnf.flows.registry import FLOWS, build_flow

__all__ = [
    "CNF",
    "FLOWS",
    "Flow",
    "IdentityFlow",
    "LogitTransform",
    "MovingBatchNorm",
    "SequentialFlow",
    "build_flow",
    "standard_normal_logprob",
    "sum_except_batch",
]
