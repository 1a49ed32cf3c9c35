"""Lipschitz-constrained layers for invertible residual networks.

A residual block ``y = x + g(x)`` is invertible when ``Lip(g) < 1``
(:mod:`cnf.flows.residual`). Here ``Lip(g) < 1`` is enforced by spectral
normalisation of every linear/conv layer with a coefficient ``coeff < 1`` and
1-Lipschitz activations.

References:
    Miyato et al., "Spectral normalization for generative adversarial networks", ICLR 2018.
    Behrmann et al., "Invertible residual networks", ICML 2019, §3.
    Chen et al., "Residual flows for invertible generative modeling", NeurIPS 2019, §4.2.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnf.registry import Registry

__all__ = [
    "LIPSCHITZ_ACTIVATIONS",
    "LipSwish",
    "Sin",
    "SpectralNormConv2d",
    "SpectralNormLinear",
    "lipschitz_convnet",
    "lipschitz_mlp",
    "update_spectral_norm",
]


class _SpectralNorm(nn.Module, metaclass=ABCMeta):
    """Shared logic: persistent power-iteration vectors and the rescaled weight.

    The weight used is ``W / max(1, sigma / coeff)`` with ``sigma = u^T W v`` the
    power-iteration estimate of the largest singular value, so the layer's
    Lipschitz constant is at most ``coeff`` (i-ResNet, §3; the ``max`` leaves
    already-contractive layers untouched). ``u`` and ``v`` change only in
    :meth:`power_iteration`; a forward pass never updates them, so evaluation
    is deterministic and ``g`` stays the same function throughout one
    fixed-point inverse.

    The ``init_iters`` power iterations that make the bound hold from the
    start run lazily, before the first use of the weight (building a large
    image model stays instant); the ``initialised`` buffer records that they
    ran, so a model loaded from a checkpoint never repeats them.
    """

    weight: Tensor
    u: Tensor
    v: Tensor
    initialised: Tensor

    def __init__(self, coeff: float, init_iters: int):
        super().__init__()
        if not 0 < coeff:
            raise ValueError(f"coeff must be positive, got {coeff}")
        self.coeff = coeff
        self.init_iters = init_iters
        self.register_buffer("initialised", torch.tensor(False))
        # Python mirror of the buffer: reading a CUDA buffer in every forward
        # pass would synchronise with the device.
        self._ready = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Checkpoints written before the flag existed were initialised eagerly.
        state_dict.setdefault(prefix + "initialised", torch.tensor(True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = False  # re-read the loaded flag once

    @torch.no_grad()
    def _ensure_initialised(self) -> None:
        if self._ready:
            return
        self._ready = True
        if not bool(self.initialised):
            self.initialised.fill_(True)
            self.power_iteration(self.init_iters)

    @abstractmethod
    def _op(self, v: Tensor) -> Tensor:
        """The weight applied to ``v`` (``W v``)."""

    @abstractmethod
    def _op_t(self, u: Tensor) -> Tensor:
        """The transposed weight applied to ``u`` (``Wᵀ u``)."""

    @torch.no_grad()
    def power_iteration(self, num_iters: int = 1) -> None:
        """Refine ``u, v`` towards the top singular vectors of the current weight."""
        self._ensure_initialised()
        for _ in range(num_iters):
            v = F.normalize(self._op_t(self.u).flatten(), dim=0).view_as(self.v)
            u = F.normalize(self._op(v).flatten(), dim=0).view_as(self.u)
            self.v.copy_(v)
            self.u.copy_(u)

    def normalized_weight(self) -> Tensor:
        """The rescaled weight; differentiable through ``sigma`` (Miyato et al. 2018)."""
        self._ensure_initialised()
        # Clones: a later in-place power iteration must not invalidate this graph.
        u, v = self.u.clone(), self.v.clone()
        sigma = torch.sum(u * self._op(v))
        return self.weight / torch.clamp(sigma / self.coeff, min=1.0)


class SpectralNormLinear(_SpectralNorm):
    """Linear layer with spectral norm at most ``coeff``.

    Args:
        in_features: Input size.
        out_features: Output size.
        coeff: Bound on the operator norm of the weight.
        bias: Whether to add a bias (does not affect the Lipschitz constant).
        init_iters: Power iterations before first use, so the bound holds at once.

    Shapes:
        ``(B, in_features) -> (B, out_features)``.

    References:
        Behrmann et al. Invertible Residual Networks. ICML 2019, §3.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        coeff: float = 0.97,
        bias: bool = True,
        init_iters: int = 50,
    ):
        super().__init__(coeff, init_iters)
        layer = nn.Linear(in_features, out_features, bias=bias)  # reuse PyTorch's init
        self.weight = layer.weight
        self.bias = layer.bias
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(in_features), dim=0))

    def _op(self, v: Tensor) -> Tensor:
        return self.weight @ v

    def _op_t(self, u: Tensor) -> Tensor:
        return self.weight.T @ u

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)


class SpectralNormConv2d(_SpectralNorm):
    """Stride-1 'same' convolution whose operator norm is at most ``coeff``.

    The power iteration runs on the convolution operator itself (``conv2d``
    and its adjoint ``conv_transpose2d`` on an input of the given spatial
    size), not on the reshaped kernel matrix, whose norm can underestimate the
    operator norm of a k x k convolution by up to a factor k (Gouk et al. 2018;
    i-ResNet, §3).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Odd kernel size (padding ``kernel_size // 2``).
        input_size: Spatial size ``(H, W)`` on which the norm is computed.
        coeff: Bound on the operator norm.
        bias: Whether to add a bias.
        init_iters: Power iterations before first use.

    Shapes:
        ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.

    References:
        Behrmann et al. Invertible Residual Networks. ICML 2019, §3.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        input_size: tuple[int, int],
        coeff: float = 0.97,
        bias: bool = True,
        init_iters: int = 50,
    ):
        super().__init__(coeff, init_iters)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.padding = kernel_size // 2
        layer = nn.Conv2d(in_channels, out_channels, kernel_size, padding=self.padding, bias=bias)
        self.weight = layer.weight
        self.bias = layer.bias
        h, w = input_size
        self.register_buffer(
            "u", F.normalize(torch.randn(out_channels * h * w), dim=0).view(out_channels, h, w)
        )
        self.register_buffer(
            "v", F.normalize(torch.randn(in_channels * h * w), dim=0).view(in_channels, h, w)
        )

    def _op(self, v: Tensor) -> Tensor:
        return F.conv2d(v[None], self.weight, padding=self.padding)[0]

    def _op_t(self, u: Tensor) -> Tensor:
        return F.conv_transpose2d(u[None], self.weight, padding=self.padding)[0]

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=self.padding)


def _spectral_layers(module: nn.Module) -> Iterator[_SpectralNorm]:
    return (m for m in module.modules() if isinstance(m, _SpectralNorm))


def update_spectral_norm(module: nn.Module, num_iters: int = 1) -> None:
    """Run ``num_iters`` power iterations in every spectrally normalised layer of ``module``.

    Call it after changing weights outside training (loading, perturbing) so
    that the Lipschitz bound is tight again; :class:`ResidualBlock` calls it
    once per forward pass in training mode.
    """
    for layer in _spectral_layers(module):
        layer.power_iteration(num_iters)


class LipSwish(nn.Module):
    """``x * sigmoid(beta x) / 1.1``, 1-Lipschitz for every ``beta >= 0``.

    The derivative of ``x sigmoid(beta x)`` is at most 1.0998 whatever ``beta``,
    hence the division by 1.1. ``beta = softplus(param)`` is learned.

    References:
        Chen et al. Residual Flows. NeurIPS 2019, §4.2.
    """

    def __init__(self):
        super().__init__()
        self.beta_param = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        beta = F.softplus(self.beta_param)
        return x * torch.sigmoid(beta * x) / 1.1


class Sin(nn.Module):
    """``sin(x)``: 1-Lipschitz (``|cos| <= 1``); INDM's released residual flows use it."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x)


LIPSCHITZ_ACTIVATIONS: Registry[type[nn.Module]] = Registry(
    "1-Lipschitz activation", {"elu": nn.ELU, "lipswish": LipSwish, "sin": Sin}
)


def _activation(name: str) -> nn.Module:
    return LIPSCHITZ_ACTIVATIONS[name]()


def lipschitz_mlp(
    features: int,
    *,
    hidden_features: int = 64,
    num_hidden_layers: int = 2,
    coeff: float = 0.97,
    activation: str = "lipswish",
) -> nn.Sequential:
    """MLP ``(B, D) -> (B, D)`` with ``Lip <= coeff ** (num_hidden_layers + 1)``.

    Spectrally normalised linear layers and 1-Lipschitz activations
    (a name of :data:`LIPSCHITZ_ACTIVATIONS`).
    """
    layers: list[nn.Module] = []
    width = features
    for _ in range(num_hidden_layers):
        layers += [SpectralNormLinear(width, hidden_features, coeff=coeff), _activation(activation)]
        width = hidden_features
    layers.append(SpectralNormLinear(width, features, coeff=coeff))
    return nn.Sequential(*layers)


def lipschitz_convnet(
    event_shape: tuple[int, int, int],
    *,
    hidden_channels: int = 64,
    coeff: float = 0.97,
    activation: str = "lipswish",
) -> nn.Sequential:
    """Conv net ``(B, C, H, W) -> (B, C, H, W)``: 3x3 -> act -> 1x1 -> act -> 3x3.

    Each convolution has operator norm at most ``coeff`` on ``H x W`` inputs, so
    ``Lip <= coeff ** 3``.
    """
    c, h, w = event_shape
    size = (h, w)
    return nn.Sequential(
        SpectralNormConv2d(c, hidden_channels, 3, input_size=size, coeff=coeff),
        _activation(activation),
        SpectralNormConv2d(hidden_channels, hidden_channels, 1, input_size=size, coeff=coeff),
        _activation(activation),
        SpectralNormConv2d(hidden_channels, c, 3, input_size=size, coeff=coeff),
    )
