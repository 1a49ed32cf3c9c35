"""The one data preprocessing bijection every family holds: affine map after an optional logit.

``y = scale · logit(α + (1 − 2α) x) + shift`` (the logit only when ``α > 0``,
for data in ``[0, 1]``; RealNVP §4.1, FFJORD, RNODE), with its
log-determinant. Every family puts it first in its data → base map
(``model.preprocess`` in configs), so every reported likelihood is a density
of the data *as the loader gives it*:

    log p(x) = log p(y) + log|det ∂y/∂x|,
    log|det ∂y/∂x| = D log|scale| + Σ_d [log(1 − 2α) − log s_d − log(1 − s_d)],  s = α + (1 − 2α) x.

Examples: ``scale = 2, shift = −1`` puts [0, 1] images in [−1, 1] (score SDEs,
INDM, DiffFlow); ``logit_alpha = 1e-6`` is FFJORD's image logit, 0.05 RealNVP's
and RNODE's on CIFAR-10.

References:
    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017, §4.1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cnf.flows.base import Flow, sum_except_batch

__all__ = ["Preprocess"]


class Preprocess(Flow):
    """``y = scale · logit_α(x) + shift`` on events of any shape.

    Args:
        logit_alpha: Boundary margin ``α ∈ [0, ½)``; 0 switches the logit off.
        scale: Non-zero scale of the affine part.
        shift: Shift of the affine part.

    Example:
        >>> pre = Preprocess(logit_alpha=0.05)
        >>> y, logdet = pre(torch.rand(4, 1, 8, 8))
        >>> x = pre.inverse(y)
    """

    def __init__(self, *, logit_alpha: float = 0.0, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        if not 0 <= logit_alpha < 0.5:
            raise ValueError(f"logit_alpha must be in [0, 0.5) (0 = off), got {logit_alpha}")
        if scale == 0:
            raise ValueError("preprocess scale must be non-zero")
        self.alpha = float(logit_alpha)
        self.scale, self.shift = float(scale), float(shift)

    @property
    def is_identity(self) -> bool:
        return self.alpha == 0 and self.scale == 1 and self.shift == 0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, *event) -> (B, *event)`` and ``log|det ∂y/∂x|`` ``(B,)``."""
        d = x[0].numel()
        logdet = x.new_full((x.shape[0],), d * math.log(abs(self.scale)))
        if self.alpha > 0:
            s = self.alpha + (1 - 2 * self.alpha) * x
            x = torch.log(s) - torch.log1p(-s)
            # log σ'(y) = log s + log(1 − s) = −softplus(−y) − softplus(y): stable for large |y|.
            log_ds_dy = -F.softplus(-x) - F.softplus(x)
            logdet = logdet + sum_except_batch(math.log(1 - 2 * self.alpha) - log_ds_dy)
        if self.scale != 1 or self.shift != 0:
            x = self.scale * x + self.shift
        return x, logdet

    def inverse(self, y: Tensor) -> Tensor:
        x = (y - self.shift) / self.scale if (self.scale != 1 or self.shift != 0) else y
        if self.alpha > 0:
            x = (torch.sigmoid(x) - self.alpha) / (1 - 2 * self.alpha)
        return x

    def extra_repr(self) -> str:
        return f"logit_alpha={self.alpha}, scale={self.scale}, shift={self.shift}"
