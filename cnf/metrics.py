"""Units and statistics for reporting: nats, bits/dim, standard errors, two-sample tests."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def mean_stderr(values: Tensor | np.ndarray) -> tuple[float, float]:
    """Mean and its standard error ``std / sqrt(n)`` (ddof = 1)."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("mean_stderr of an empty set")
    se = float(v.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return float(v.mean()), se


def probe_stderr(values: Tensor | np.ndarray) -> float:
    """Standard error, due to the probes alone, of the mean of ``K``-probe estimates.

    ``values[i, k]`` is probe ``k``'s estimate for point ``i``; the reported
    number is ``mean_i mean_k values[i, k]``. With probes independent across
    points and probes, its variance given the points is
    ``Σ_i Var_k / (K N²)``, estimated with the per-point sample variances
    (ddof = 1; ``N (K − 1)`` degrees of freedom). NaN for ``K < 2``.

    Args:
        values: ``(N, K)``.
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.dim() != 2 or v.shape[0] == 0:
        raise ValueError(f"probe_stderr needs an (N, K) array, got shape {tuple(v.shape)}")
    n, k = v.shape
    if k < 2:
        return float("nan")
    return float(v.var(dim=1, unbiased=True).sum().div(k).sqrt() / n)


def bits_per_dim(nll_nats: Tensor | float, dim: int, *, offset_bits: float = 8.0) -> Tensor | float:
    """Convert an NLL in nats of data scaled to [0, 1]^D into bits/dim of 8-bit data.

    ``bpd = nll / (D ln 2) + offset_bits``; ``offset_bits = log2(256) = 8``
    undoes the scaling of 256 grey levels to [0, 1] (7 for data in [−1, 1]).
    """
    return nll_nats / (dim * math.log(2.0)) + offset_bits


def mmd2_rbf(
    x: Tensor, y: Tensor, *, bandwidths: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0)
) -> float:
    """Unbiased MMD² between samples ``x`` (n, D) and ``y`` (m, D) with a sum of RBF kernels.

    ``k(a, b) = Σ_σ exp(−‖a − b‖² / (2σ²))`` over the stated standard
    deviations (the definition used for the torchcfm baseline in
    docs/published-numbers.md). Two samples of one distribution score
    ≈ 0 (the estimator is unbiased, so it can be slightly negative).
    """
    x = x.double()
    y = y.double()
    n, m = len(x), len(y)

    def k(a: Tensor, b: Tensor) -> Tensor:
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(sxx + syy - 2 * kxy.mean())
