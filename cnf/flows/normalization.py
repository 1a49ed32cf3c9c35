"""Invertible moving batch normalisation (used between CNF blocks, FFJORD §4).

Training mode normalises with the batch statistics and updates running
averages; eval mode (and :meth:`inverse`) uses the running averages, so a
trained model is a fixed bijection. ``logdet = Σ_d [log γ_d − ½ log(σ²_d + eps)]``.

References:
    Dinh et al., "Density estimation using Real NVP", ICLR 2017 (batch norm as a bijection).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cnf.flows.base import Flow


class MovingBatchNorm(Flow):
    """Batch norm over the feature dimension of ``(B, D)`` inputs, as a flow.

    Args:
        dim: Feature dimension ``D``.
        eps: Added to the variance.
        momentum: Weight of the new batch in the running averages.
        affine: Learn a scale ``exp(log_gamma)`` and shift ``beta``.

    Data-parallel training (:mod:`cnf.train.distributed`): the batch statistics
    are those of each rank's slice of the global batch (as ``nn.BatchNorm1d``
    without ``SyncBatchNorm``), so the training objective is not the
    single-process one on the same global batch. The ranks still hold one
    model: gradients and the running averages are averaged over ranks after
    every step (the averaged ``running_var`` omits the between-slice variance).
    """

    def __init__(self, dim: int, *, eps: float = 1e-4, momentum: float = 0.1, affine: bool = True):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        if affine:
            self.log_gamma = nn.Parameter(torch.zeros(dim))
            self.beta = nn.Parameter(torch.zeros(dim))
        else:
            self.register_buffer("log_gamma", torch.zeros(dim))
            self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            mean = x.mean(0)
            var = x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        log_scale = self.log_gamma - 0.5 * torch.log(var + self.eps)
        z = (x - mean) * log_scale.exp() + self.beta
        return z, log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        log_scale = self.log_gamma - 0.5 * torch.log(self.running_var + self.eps)
        return (z - self.beta) * torch.exp(-log_scale) + self.running_mean
