"""Coupling layers: NICE (additive), RealNVP (affine) and their masks.

A coupling layer splits the input into a conditioning part ``x_A`` (left
unchanged) and a transformed part ``x_B``, and applies an elementwise
invertible map to ``x_B`` whose parameters are computed from ``x_A``:

    y_A = x_A,    y_B = tau(x_B; theta(x_A)).

The Jacobian is block triangular, so ``log|det dy/dx|`` is the sum of the
elementwise log-derivatives of ``tau``. Every flow here maps data ``x`` (t = 0)
to the base variable ``z`` (t = T) in ``forward``, the library-wide convention
of :mod:`cnf.flows.base`.

Masks are boolean tensors over the event shape with ``True`` marking the
conditioning part ``A``. Two ways of splitting are used, chosen from the mask:

* *index* split, along dimension 1: for vectors ``(B, D)`` and for image masks
  that are constant over space (channel masks). The conditioner sees only
  ``x_A`` and outputs parameters for ``x_B``, so no capacity is wasted.
* *masked* split, for spatial (checkerboard) image masks: the conditioner sees
  ``x * mask`` at full resolution (a conv net needs the spatial layout) and its
  outputs are used only where the mask is ``False`` (RealNVP, Dinh et al. 2017,
  §3.4).

References:
    Dinh, Krueger, Bengio. NICE: Non-linear Independent Components Estimation.
    ICLR workshop 2015. Dinh, Sohl-Dickstein, Bengio. Density estimation using
    Real NVP. ICLR 2017.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from cnf.flows.base import Flow, sum_except_batch

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "CouplingFlow",
    "DiagonalScaling",
    "checkerboard_mask",
    "conv_conditioner",
    "half_mask",
    "image_channel_mask",
    "image_checkerboard_mask",
    "mlp_conditioner",
]


# --------------------------------------------------------------------------- masks


def half_mask(dim: int, *, parity: int = 0) -> Tensor:
    """Alternating-halves mask for vectors: the first ``ceil(D/2)`` features condition.

    Args:
        dim: Number of features ``D >= 2``.
        parity: ``0`` or ``1``; ``1`` swaps the roles of the two halves, so that
            stacking couplings with alternating parity transforms every feature.

    Returns:
        Boolean tensor of shape ``(D,)``, ``True`` on the conditioning part.
        For ``D = 2`` each coupling transforms one coordinate given the other.
    """
    _check_dim(dim)
    mask = torch.arange(dim) < (dim + 1) // 2
    return mask if parity % 2 == 0 else ~mask


def checkerboard_mask(dim: int, *, parity: int = 0) -> Tensor:
    """Checkerboard (even/odd index) mask for vectors, shape ``(D,)``.

    Args:
        dim: Number of features ``D >= 2``.
        parity: ``0``: even indices condition; ``1``: odd indices condition.
    """
    _check_dim(dim)
    return torch.arange(dim) % 2 == parity % 2


def image_checkerboard_mask(shape: tuple[int, int, int], *, parity: int = 0) -> Tensor:
    """Spatial checkerboard mask for images, shape ``(C, H, W)``.

    Pixel ``(h, w)`` conditions when ``(h + w) % 2 == parity % 2``, for every
    channel (RealNVP's checkerboard pattern).
    """
    c, h, w = _check_image_shape(shape)
    if h * w < 2:
        raise ValueError(f"a checkerboard mask needs at least 2 pixels, got shape {shape}")
    board = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == parity % 2
    return board.expand(c, h, w).clone()


def image_channel_mask(shape: tuple[int, int, int], *, parity: int = 0) -> Tensor:
    """Channel mask for images, shape ``(C, H, W)``: the first ``ceil(C/2)`` channels condition.

    Args:
        shape: Event shape ``(C, H, W)`` with ``C >= 2``.
        parity: ``1`` swaps the two channel groups.
    """
    c, h, w = _check_image_shape(shape)
    if c < 2:
        raise ValueError(f"a channel mask needs at least 2 channels, got shape {shape}")
    mask = half_mask(c, parity=parity)
    return mask[:, None, None].expand(c, h, w).clone()


def _check_dim(dim: int) -> None:
    if dim < 2:
        raise ValueError(f"a coupling needs at least 2 features, got dim={dim}")


def _check_image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"expected an image event shape (C, H, W), got {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    return c, h, w


# --------------------------------------------------------------------- conditioners


def mlp_conditioner(
    in_features: int,
    out_features: int,
    *,
    hidden_features: int = 64,
    num_hidden_layers: int = 2,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """MLP ``(B, in) -> (B, out)`` whose last layer is zero-initialised.

    The zero last layer makes every coupling start as the identity (or, for
    Glow's sigmoid scale, as a constant rescaling), which keeps deep stacks
    well-conditioned at initialisation.
    """
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(num_hidden_layers):
        layers += [nn.Linear(width, hidden_features), activation()]
        width = hidden_features
    last = nn.Linear(width, out_features)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def conv_conditioner(
    in_channels: int,
    out_channels: int,
    *,
    hidden_channels: int = 64,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Glow-style conv net ``(B, C_in, H, W) -> (B, C_out, H, W)``.

    ``conv3x3 -> act -> conv1x1 -> act -> conv3x3`` with a zero-initialised last
    layer (Kingma & Dhariwal 2018, §3.3); padding keeps the spatial size.
    """
    last = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, 3, padding=1),
        activation(),
        nn.Conv2d(hidden_channels, hidden_channels, 1),
        activation(),
        last,
    )


# ------------------------------------------------------------------------ couplings


class CouplingFlow(Flow, metaclass=ABCMeta):
    """Base class of mask-based coupling layers.

    Subclasses set :attr:`num_params` (parameters per transformed element) and
    implement :meth:`_transform` / :meth:`_inverse_transform` on ``x_B``.

    Args:
        event_shape: ``(D,)`` for vectors or ``(C, H, W)`` for images.
        mask: Boolean mask over ``event_shape``, ``True`` on the conditioning
            part. Default: :func:`half_mask` for vectors,
            :func:`image_checkerboard_mask` for images, with ``parity``.
        parity: Used only to build the default mask.
        hidden_features: Width of the MLP conditioner (vectors).
        num_hidden_layers: Depth of the MLP conditioner (vectors).
        hidden_channels: Width of the conv conditioner (images).
        conditioner: Optional custom network. With an index split it maps
            ``(B, |A|, ...) -> (B, num_params * |B|, ...)`` along dimension 1;
            with a masked split ``(B, C, H, W) -> (B, num_params * C, H, W)``.
            Its last layer should be zero-initialised.
    """

    num_params: int = 1

    def __init__(
        self,
        event_shape: tuple[int, ...],
        *,
        mask: Tensor | None = None,
        parity: int = 0,
        hidden_features: int = 64,
        num_hidden_layers: int = 2,
        hidden_channels: int = 64,
        conditioner: nn.Module | None = None,
    ):
        super().__init__()
        event_shape = tuple(int(s) for s in event_shape)
        if len(event_shape) not in (1, 3):
            raise ValueError(f"event_shape must be (D,) or (C, H, W), got {event_shape}")
        if mask is None:
            if len(event_shape) == 1:
                mask = half_mask(event_shape[0], parity=parity)
            else:
                mask = image_checkerboard_mask(event_shape, parity=parity)  # type: ignore[arg-type]
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if tuple(mask.shape) != event_shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != event_shape {event_shape}")
        if bool(mask.all()) or not bool(mask.any()):
            raise ValueError("the mask must have both conditioning (True) and transformed entries")
        self.event_shape = event_shape
        self.register_buffer("mask", mask)

        # An index split is possible whenever the mask depends on dimension 1 only.
        per_dim1 = mask.reshape(mask.shape[0], -1)
        self.index_split = bool((per_dim1 == per_dim1[:, :1]).all())
        if self.index_split:
            sel = per_dim1[:, 0]
            idx_a = torch.nonzero(sel).flatten()
            idx_b = torch.nonzero(~sel).flatten()
            self.register_buffer("idx_a", idx_a)
            self.register_buffer("idx_b", idx_b)
            self.register_buffer("inv_perm", torch.argsort(torch.cat([idx_a, idx_b])))
            n_in, n_out = len(idx_a), len(idx_b)
        else:
            n_in = n_out = event_shape[0]
        self.trans_features = n_out

        if conditioner is None:
            if len(event_shape) == 1:
                conditioner = mlp_conditioner(
                    n_in,
                    self.num_params * n_out,
                    hidden_features=hidden_features,
                    num_hidden_layers=num_hidden_layers,
                )
            else:
                conditioner = conv_conditioner(
                    n_in, self.num_params * n_out, hidden_channels=hidden_channels
                )
        self.conditioner = conditioner

    # -- splitting ------------------------------------------------------------------

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.index_split:
            return x.index_select(1, self.idx_a), x.index_select(1, self.idx_b)
        return x * self.mask.to(x.dtype), x

    def _merge(self, x_a: Tensor, y_b: Tensor) -> Tensor:
        if self.index_split:
            return torch.cat([x_a, y_b], dim=1).index_select(1, self.inv_perm)
        # x_a equals x on the mask. `where`, not a masked sum: y_b is also computed
        # (and discarded) on conditioning pixels, where it must not leak inf/nan.
        return torch.where(self.mask, x_a, y_b)

    def _logdet(self, log_scale: Tensor) -> Tensor:
        if not self.index_split:
            log_scale = torch.where(self.mask, torch.zeros_like(log_scale), log_scale)
        return sum_except_batch(log_scale)

    def _params(self, x_a: Tensor) -> Tensor:
        """Conditioner output reshaped to ``(num_params, B, |B|, ...)``."""
        h = self.conditioner(x_a)
        return rearrange(h, "b (n c) ... -> n b c ...", n=self.num_params)

    # -- elementwise transform (subclasses) ---------------------------------------------

    @abstractmethod
    def _transform(self, x_b: Tensor, params: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(y_b, logdet_b or None)`` of the elementwise map given the conditioner's ``params``."""

    @abstractmethod
    def _inverse_transform(self, y_b: Tensor, params: Tensor) -> Tensor:
        """The inverse of :meth:`_transform` for the same ``params``."""

    # -- Flow API -------------------------------------------------------------------------

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalising direction ``x -> z``.

        Args:
            x: ``(B, *event_shape)``.

        Returns:
            ``z`` of the same shape and ``logdet`` of shape ``(B,)``.
        """
        x_a, x_b = self._split(x)
        y_b, log_scale = self._transform(x_b, self._params(x_a))
        y = self._merge(x_a, y_b)
        if log_scale is None:
            return y, x.new_zeros(x.shape[0])
        return y, self._logdet(log_scale)

    def inverse(self, z: Tensor) -> Tensor:
        """Sampling direction ``z -> x``, ``(B, *event_shape) -> (B, *event_shape)``."""
        z_a, z_b = self._split(z)
        return self._merge(z_a, self._inverse_transform(z_b, self._params(z_a)))

    def extra_repr(self) -> str:
        split = "index" if self.index_split else "masked"
        return f"event_shape={self.event_shape}, split={split}"


class AdditiveCoupling(CouplingFlow):
    """NICE additive coupling ``y_B = x_B + t(x_A)``, log-determinant 0.

    Volume preserving; NICE follows a stack of these with :class:`DiagonalScaling`.
    Arguments as in :class:`CouplingFlow`.

    Example:
        >>> flow = AdditiveCoupling((2,))
        >>> z, logdet = flow(torch.randn(8, 2))

    References:
        Dinh, Krueger, Bengio. NICE. ICLR workshop 2015, §3.2.
    """

    num_params = 1

    def _transform(self, x_b: Tensor, params: Tensor) -> tuple[Tensor, Tensor | None]:
        return x_b + params[0], None

    def _inverse_transform(self, y_b: Tensor, params: Tensor) -> Tensor:
        return y_b - params[0]


class AffineCoupling(CouplingFlow):
    """RealNVP affine coupling ``y_B = x_B * exp(s(x_A)) + t(x_A)``, logdet ``sum s``.

    The raw log-scale is squashed as ``s = scale * tanh(h)`` with a learned
    ``scale`` (one per transformed feature or channel, initialised to 1), which
    bounds ``|s|`` and keeps early training stable (RealNVP's reference code
    does the same). Arguments as in :class:`CouplingFlow`.

    Example:
        >>> flow = AffineCoupling((3, 8, 8), parity=1)
        >>> z, logdet = flow(torch.randn(4, 3, 8, 8))

    References:
        Dinh, Sohl-Dickstein, Bengio. Density estimation using Real NVP. ICLR 2017, §3.2.
    """

    num_params = 2

    def __init__(self, event_shape: tuple[int, ...], **kwargs: Any):
        super().__init__(event_shape, **kwargs)
        scale_shape = (self.trans_features,) + (1,) * (len(self.event_shape) - 1)
        self.scale = nn.Parameter(torch.ones(scale_shape))

    def _log_scale(self, h: Tensor) -> Tensor:
        return self.scale * torch.tanh(h)

    def _transform(self, x_b: Tensor, params: Tensor) -> tuple[Tensor, Tensor | None]:
        s = self._log_scale(params[0])
        return x_b * torch.exp(s) + params[1], s

    def _inverse_transform(self, y_b: Tensor, params: Tensor) -> Tensor:
        s = self._log_scale(params[0])
        return (y_b - params[1]) * torch.exp(-s)


class DiagonalScaling(Flow):
    """NICE's final learned diagonal scaling ``y = x * exp(log_scale)``.

    Args:
        event_shape: ``(D,)`` or ``(C, H, W)``.
        per_channel: For images, one log-scale per channel (shared over the
            ``H * W`` pixels, so the log-determinant is ``H * W * sum log_scale``)
            instead of one per element.

    References:
        Dinh, Krueger, Bengio. NICE. ICLR workshop 2015, §3.3.
    """

    def __init__(self, event_shape: tuple[int, ...], *, per_channel: bool = False):
        super().__init__()
        event_shape = tuple(int(s) for s in event_shape)
        self.event_shape = event_shape
        self.per_channel = per_channel and len(event_shape) > 1
        shape = (
            (event_shape[0],) + (1,) * (len(event_shape) - 1) if self.per_channel else event_shape
        )
        self.log_scale = nn.Parameter(torch.zeros(shape))
        # Number of elements that share each log-scale.
        self._repeats = math.prod(event_shape[1:]) if self.per_channel else 1

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, *event_shape) -> (B, *event_shape)``, logdet ``(B,)``."""
        logdet = self.log_scale.sum() * self._repeats
        return x * torch.exp(self.log_scale), logdet * x.new_ones(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        """``(B, *event_shape) -> (B, *event_shape)``."""
        return z * torch.exp(-self.log_scale)
