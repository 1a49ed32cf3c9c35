"""Glow building blocks: ActNorm, LU-parameterised invertible 1x1 convolution,
affine coupling with a sigmoid scale, squeeze, and the flow step combining them.

All layers map data ``x`` (t = 0) towards the base variable ``z`` (t = T) in
``forward`` and return ``log|det dz/dx|`` of shape ``(B,)``. Each works on
vectors ``(B, D)`` (where "channel" means feature and ``H * W = 1``) and on
images ``(B, C, H, W)``, except :class:`Invertible1x1ConvLU` and
:class:`Squeeze`, which are image-only.

References:
    Kingma, Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
    NeurIPS 2018.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cnf.flows.base import Flow, SequentialFlow
from cnf.flows.coupling import CouplingFlow, half_mask, image_channel_mask

__all__ = [
    "ActNorm",
    "GlowCoupling",
    "GlowStep",
    "Invertible1x1ConvLU",
    "InvertibleLinearLU",
    "Squeeze",
]


def _per_channel(p: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``(C,)`` parameter to broadcast against ``(B, C, *spatial)``."""
    return p.view(1, -1, *([1] * (x.dim() - 2)))


def _spatial_size(x: Tensor) -> int:
    return math.prod(x.shape[2:])


def _world_size() -> int:
    """Ranks in the default ``torch.distributed`` process group (1 without one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def _pooled_channel_moments(x: Tensor, dims: list[int]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and population variance over the batches of all ranks.

    Two passes, each one all-reduce (sum) in float64: counts and sums give the
    global mean, then the squared deviations from it give the variance (no
    cancellation, unlike ``E[x^2] - E[x]^2``). Shards may differ in size.

    Returns:
        ``(mean, var)``, each ``(C,)`` in ``x``'s dtype.
    """
    dist = torch.distributed
    xd = x.double()
    count = x.numel() / x.shape[1]
    head = torch.cat([xd.sum(dim=dims), xd.new_tensor([count])])
    dist.all_reduce(head)
    total = head[-1]
    mean = head[:-1] / total
    sq = (xd - _per_channel(mean, xd)).square().sum(dim=dims)
    dist.all_reduce(sq)
    return mean.to(x.dtype), (sq / total).to(x.dtype)


class ActNorm(Flow):
    """Per-channel affine normalisation ``y = (x + bias) * exp(log_scale)``.

    On the first ``forward`` in training mode the parameters are set from the
    batch so that every channel of the output has zero mean and unit variance
    (data-dependent initialisation, Glow §3.1). The ``initialized`` flag is a
    buffer, so a model restored from a ``state_dict`` is not re-initialised.
    A forward in eval mode before initialisation leaves the layer as the identity.

    Data-parallel training: when a ``torch.distributed`` process group with
    more than one rank is initialised, the initialisation is collective. Each
    rank holds a slice of the global batch; the mean and the (population)
    variance are pooled over all ranks, so every rank sets the same parameters,
    equal (up to summation order) to those a single process sets from the whole
    global batch. Data-parallel training averages gradients, not parameters, so
    a per-rank init would train a different model on every rank. Every rank
    must therefore run its first training-mode forward together (the first
    training step does); evaluation runs in eval mode and never initialises.

    Args:
        num_features: Channels ``C`` (images) or features ``D`` (vectors).
        eps: Added to the standard deviation at initialisation (constant inputs).

    Shapes:
        ``x``: ``(B, C)`` or ``(B, C, H, W)``; logdet ``(B,)`` equals
        ``H * W * sum(log_scale)``.

    References:
        Kingma, Dhariwal. Glow. NeurIPS 2018, §3.1.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set bias and log-scale from a batch ``x`` of shape ``(B, C, ...)``.

        Collective in a multi-rank process group (statistics of the union of the
        ranks' batches, see the class docstring).
        """
        dims = [d for d in range(x.dim()) if d != 1]
        if _world_size() > 1:
            mean, var = _pooled_channel_moments(x, dims)
            std = var.sqrt()
        else:
            mean = x.mean(dim=dims)
            # Population std, so the init batch is standardised exactly.
            std = x.std(dim=dims, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, ...) -> (B, C, ...)``, logdet ``(B,)``."""
        if self.training and not bool(self.initialized):
            self.initialize(x)
        y = (x + _per_channel(self.bias, x)) * torch.exp(_per_channel(self.log_scale, x))
        logdet = self.log_scale.sum() * _spatial_size(x)
        return y, logdet * x.new_ones(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        """``(B, C, ...) -> (B, C, ...)``."""
        return z * torch.exp(-_per_channel(self.log_scale, z)) - _per_channel(self.bias, z)

    def extra_repr(self) -> str:
        return f"{self.bias.shape[0]}, initialized={bool(self.initialized)}"


class InvertibleLinearLU(Flow):
    """Invertible linear map ``z = W x`` on features, with ``W`` in LU form.

    ``W = P L (U + diag(sign(s) * exp(log|s|)))``: ``P`` a fixed permutation,
    ``L`` unit lower-triangular, ``U`` strictly upper-triangular, ``sign(s)``
    fixed. The log-determinant is ``sum log|s|`` in O(C) instead of O(C^3), and
    the parameterisation can never become singular. Initialised from the LU
    decomposition of a random orthogonal matrix (QR of a Gaussian matrix).

    Args:
        num_features: Size ``D`` of the square matrix.
        generator: Optional RNG for the random initialisation.

    Shapes:
        ``x``: ``(B, D)``; logdet ``(B,)``.

    References:
        Kingma, Dhariwal. Glow. NeurIPS 2018, §3.2.
    """

    def __init__(self, num_features: int, *, generator: torch.Generator | None = None):
        super().__init__()
        w = torch.randn(num_features, num_features, generator=generator, dtype=torch.float64)
        q = torch.linalg.qr(w)[0]
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        dtype = torch.get_default_dtype()
        self.register_buffer("perm", p.to(dtype))
        self.register_buffer("sign_s", torch.sign(s).to(dtype))
        self.lower = nn.Parameter(torch.tril(lower, -1).to(dtype))
        self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
        self.log_abs_s = nn.Parameter(torch.log(torch.abs(s)).to(dtype))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        # tril/triu re-mask on every call: entries outside the triangle get no
        # gradient and never enter W, even if an optimiser's weight decay moves them.
        lower = torch.tril(self.lower, -1) + eye
        upper = torch.triu(self.upper, 1) + torch.diag(self.sign_s * torch.exp(self.log_abs_s))
        return lower, upper

    def weight(self) -> Tensor:
        """The assembled matrix ``W``, shape ``(D, D)``."""
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def inverse_weight(self) -> Tensor:
        """``W^{-1} = U^{-1} L^{-1} P^T`` by two triangular solves, shape ``(D, D)``."""
        lower, upper = self._factors()
        a = torch.linalg.solve_triangular(lower, self.perm.T, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, a, upper=True)

    def log_abs_det(self) -> Tensor:
        """``log|det W| = sum log|s|`` (a scalar)."""
        return self.log_abs_s.sum()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, D) -> (B, D)``, logdet ``(B,)``."""
        return F.linear(x, self.weight()), self.log_abs_det() * x.new_ones(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        """``(B, D) -> (B, D)``."""
        return F.linear(z, self.inverse_weight())


class Invertible1x1ConvLU(InvertibleLinearLU):
    """Invertible 1x1 convolution: the LU-parameterised ``W`` applied at every pixel.

    Args:
        num_channels: Channels ``C``.
        generator: Optional RNG for the random initialisation.

    Shapes:
        ``x``: ``(B, C, H, W)``; logdet ``(B,)`` equals ``H * W * sum log|s|``.

    References:
        Kingma, Dhariwal. Glow. NeurIPS 2018, §3.2.
    """

    def __init__(self, num_channels: int, *, generator: torch.Generator | None = None):
        super().__init__(num_channels, generator=generator)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W) -> (B, C, H, W)``, logdet ``(B,)``."""
        z = F.conv2d(x, self.weight()[:, :, None, None])
        return z, self.log_abs_det() * _spatial_size(x) * x.new_ones(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``."""
        return F.conv2d(z, self.inverse_weight()[:, :, None, None])


class GlowCoupling(CouplingFlow):
    """Glow's affine coupling ``y_B = (x_B + t(x_A)) * sigmoid(h(x_A) + 2)``.

    The sigmoid bounds the scale in (0, 1), and the ``+ 2`` starts it near 0.88
    so the layer begins close to the identity (Glow's reference code); the
    log-determinant is ``sum log sigmoid(h + 2)``. The default mask splits
    channels (images) or features (vectors) in halves; the invertible 1x1
    convolution that precedes it in a :class:`GlowStep` mixes the halves.
    Other arguments as in :class:`~cnf.flows.coupling.CouplingFlow`.

    References:
        Kingma, Dhariwal. Glow. NeurIPS 2018, §3.3 and Table 1.
    """

    num_params = 2

    def __init__(
        self,
        event_shape: tuple[int, ...],
        *,
        mask: Tensor | None = None,
        parity: int = 0,
        **kwargs: Any,
    ):
        if mask is None:
            if len(event_shape) == 1:
                mask = half_mask(int(event_shape[0]), parity=parity)
            else:
                mask = image_channel_mask(tuple(event_shape), parity=parity)  # type: ignore[arg-type]
        super().__init__(event_shape, mask=mask, **kwargs)

    def _transform(self, x_b: Tensor, params: Tensor) -> tuple[Tensor, Tensor | None]:
        h = params[1] + 2.0
        return (x_b + params[0]) * torch.sigmoid(h), F.logsigmoid(h)

    def _inverse_transform(self, y_b: Tensor, params: Tensor) -> Tensor:
        return y_b / torch.sigmoid(params[1] + 2.0) - params[0]


class Squeeze(Flow):
    """Space-to-depth ``(B, C, H, W) -> (B, C f^2, H/f, W/f)``, log-determinant 0.

    Each ``f x f`` spatial block becomes ``f^2`` channels (channel index
    ``c * f^2 + p * f + q`` for offset ``(p, q)``), so convolutions afterwards
    see a coarser grid with more channels.

    Args:
        factor: Block size ``f`` (2 in RealNVP and Glow).

    References:
        Dinh, Sohl-Dickstein, Bengio. Real NVP. ICLR 2017, §3.6.
    """

    def __init__(self, factor: int = 2):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W) -> (B, C f^2, H/f, W/f)``, logdet zeros ``(B,)``."""
        if x.dim() != 4 or x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(
                f"Squeeze(factor={self.factor}) needs (B, C, H, W) with H, W divisible by "
                f"{self.factor}, got {tuple(x.shape)}"
            )
        z = rearrange(x, "b c (h p) (w q) -> b (c p q) h w", p=self.factor, q=self.factor)
        return z, x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        """``(B, C f^2, H/f, W/f) -> (B, C, H, W)``."""
        return rearrange(z, "b (c p q) h w -> b c (h p) (w q)", p=self.factor, q=self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class GlowStep(SequentialFlow):
    """One Glow step of flow: ActNorm -> invertible LU linear map -> GlowCoupling.

    Args:
        event_shape: ``(D,)`` (uses :class:`InvertibleLinearLU` and an MLP
            conditioner) or ``(C, H, W)`` (uses :class:`Invertible1x1ConvLU` and
            a conv conditioner); needs ``D >= 2`` or ``C >= 2``.
        hidden_channels: Width of the conv conditioner (images).
        hidden_features: Width of the MLP conditioner (vectors).
        num_hidden_layers: Depth of the MLP conditioner (vectors).
        parity: Which half the coupling conditions on.

    References:
        Kingma, Dhariwal. Glow. NeurIPS 2018, Fig. 2a.
    """

    def __init__(
        self,
        event_shape: tuple[int, ...],
        *,
        hidden_channels: int = 64,
        hidden_features: int = 64,
        num_hidden_layers: int = 2,
        parity: int = 0,
    ):
        event_shape = tuple(int(s) for s in event_shape)
        c = event_shape[0]
        lu: Flow = Invertible1x1ConvLU(c) if len(event_shape) == 3 else InvertibleLinearLU(c)
        coupling = GlowCoupling(
            event_shape,
            parity=parity,
            hidden_channels=hidden_channels,
            hidden_features=hidden_features,
            num_hidden_layers=num_hidden_layers,
        )
        super().__init__([ActNorm(c), lu, coupling])
