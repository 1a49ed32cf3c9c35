"""Invertible residual networks (i-ResNet) and Residual Flows.

A residual block ``y = x + g(x)`` is invertible when ``Lip(g) < 1``: then
``x = y - g(x)`` is a contraction in ``x`` and the fixed-point iteration
``x_{k+1} = y - g(x_k)`` converges (Banach). ``Lip(g) < 1`` is enforced by
spectral normalisation of every linear/conv layer with a coefficient
``coeff < 1`` and 1-Lipschitz activations. The log-determinant is

    log det(I + J_g) = sum_{k>=1} (-1)^{k+1} tr(J_g^k) / k,

with each trace estimated by Hutchinson, ``tr(A) = E[v^T A v]``, and
``v^T J_g^k`` computed as ``k`` vector-Jacobian products. Three estimators:
``exact`` (brute-force Jacobian, for low dimension and tests), ``series``
(fixed truncation, biased) and ``roulette`` (randomised truncation, unbiased;
geometric number of terms only, see :class:`RouletteLogDet`).

Blocks map data ``x`` (t = 0) to the base ``z`` (t = T) in ``forward``.

References:
    Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen. Invertible Residual Networks.
    ICML 2019. Chen, Behrmann, Duvenaud, Jacobsen. Residual Flows for Invertible
    Generative Modeling. NeurIPS 2019.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnf.flows.base import Flow, SequentialFlow, sum_except_batch
from cnf.flows.glow import ActNorm

__all__ = [
    "ACTIVATIONS",
    "LOGDET_ESTIMATORS",
    "POISSON_REFUSED",
    "ROULETTE_DISTRIBUTIONS",
    "ExactLogDet",
    "FixedPointError",
    "LipSwish",
    "LogDetEstimator",
    "ResidualBlock",
    "RouletteLogDet",
    "SeriesLogDet",
    "SpectralNormConv2d",
    "SpectralNormLinear",
    "lipschitz_convnet",
    "lipschitz_mlp",
    "make_logdet_estimator",
    "resflow_image",
    "resflow_vector",
    "update_spectral_norm",
]


class FixedPointError(RuntimeError):
    """The fixed-point inverse of a residual block did not reach its tolerance."""


# ------------------------------------------------------------ Lipschitz-constrained layers


class _SpectralNorm(nn.Module):
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

    def _op(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _op_t(self, u: Tensor) -> Tensor:
        raise NotImplementedError

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


ACTIVATIONS: dict[str, type[nn.Module]] = {"elu": nn.ELU, "lipswish": LipSwish}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]()


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
    (``"lipswish"`` or ``"elu"``).
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


# ------------------------------------------------------------------- log-det estimators


def _vjp(gx: Tensor, x: Tensor, w: Tensor, create_graph: bool) -> Tensor:
    """``w^T dg/dx`` per sample (samples are independent, so one call serves the batch)."""
    return torch.autograd.grad(gx, x, w, create_graph=create_graph, retain_graph=True)[0]


def _probe(x: Tensor, kind: str, generator: torch.Generator | None) -> Tensor:
    if kind == "gaussian":
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if kind == "rademacher":
        bits = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
        return (2 * bits - 1).to(x.dtype)
    raise ValueError(f"unknown probe {kind!r}; valid: gaussian, rademacher")


class LogDetEstimator:
    """Estimates ``log det(I + dg/dx)`` per sample from ``gx = g(x)`` and ``x``.

    ``__call__(gx, x, create_graph)`` returns shape ``(B,)``. ``x`` must require
    grad and ``gx`` must carry its graph. ``create_graph=True`` makes the
    estimate differentiable (training).
    """

    def __call__(self, gx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        raise NotImplementedError


class ExactLogDet(LogDetEstimator):
    """Brute-force Jacobian (``D`` vector-Jacobian products) and ``slogdet``; low dimension only."""

    def __call__(self, gx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        b = x.shape[0]
        d = x[0].numel()
        flat = gx.reshape(b, d)
        rows = [
            torch.autograd.grad(flat[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[
                0
            ]
            for i in range(d)
        ]
        jac = torch.stack([r.reshape(b, d) for r in rows], dim=1)  # (B, D_out, D_in)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        return torch.linalg.slogdet(eye + jac)[1]


class SeriesLogDet(LogDetEstimator):
    """Power series truncated at ``n_terms`` with a Hutchinson probe (biased, i-ResNet).

    Args:
        n_terms: Number of terms of the series.
        probe: ``"gaussian"`` or ``"rademacher"``.
        generator: Optional RNG on ``x``'s device, for reproducible probes.
    """

    def __init__(
        self,
        *,
        n_terms: int = 10,
        probe: str = "gaussian",
        generator: torch.Generator | None = None,
    ):
        if n_terms < 1:
            raise ValueError(f"n_terms must be >= 1, got {n_terms}")
        self.n_terms = n_terms
        self.probe = probe
        self.generator = generator

    def __call__(self, gx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        v = _probe(x, self.probe, self.generator)
        weights = x.new_ones(x.shape[0], self.n_terms)
        return _power_series(gx, x, v, weights, create_graph)


ROULETTE_DISTRIBUTIONS = ("geometric",)

POISSON_REFUSED = (
    "Russian roulette with a Poisson number of terms has infinite variance: "
    "P(N >= k) ~ lam^k e^-lam / k! makes the weights 1/P(N >= k) grow like k!/lam^k, "
    "faster than the series terms v^T J^k v / k shrink (like rho(J)^k), whatever lam; "
    "use the geometric distribution (finite variance when rho(J)^2 < 1 - geometric_p)"
)


class RouletteLogDet(LogDetEstimator):
    """Unbiased Russian-roulette estimator of Residual Flows.

    Per sample, ``N = n_exact_terms + M`` terms are computed, ``M`` drawn from a
    geometric distribution, ``P(M = m) = p (1-p)^m``; term ``k`` is divided by
    ``P(N >= k)`` (1 for the always-computed terms), so that

        E[ sum_{k<=N} (-1)^{k+1} v^T J^k v / (k P(N >= k)) ] = log det(I + J).

    Each sample draws its own ``N`` and probe, so the batch holds independent
    estimates.

    **Variance.** The second moment is at least ``sum_k E[(v^T J^k v)^2] /
    (k^2 P(N >= k))``, and ``E[(v^T J^k v)^2]`` decays like ``rho(J)^{2k}``
    (``rho`` the spectral radius, at most ``Lip(g)``). With the geometric
    distribution ``P(N >= k) = (1-p)^{k - n_exact_terms}``, so the variance is
    finite when ``rho(J)^2 < 1 - p``; ``Lip(g)^2 < 1 - p`` guarantees it
    (``Lip(g) < 0.707`` for the default ``p = 0.5``; a looser spectral-norm
    bound is usually still fine because ``rho(J)`` is well below ``Lip(g)``).
    A Poisson number of terms (offered by the Residual Flows code) is refused:
    its tail ``P(N >= k) ~ lam^k/k!`` decays faster than any geometric
    sequence, so the variance is infinite for every rate and every
    non-nilpotent ``J``, and neither the loss's noise nor a reported standard
    error would mean anything.

    Args:
        n_exact_terms: Terms always computed (lower variance, more cost).
        distribution: ``"geometric"`` (``"poisson"`` raises, see above).
        geometric_p: Success probability ``p`` of the geometric distribution.
        probe: ``"gaussian"`` or ``"rademacher"``.
        neumann_grad: Back-propagate the Neumann series for the gradient
            (Residual Flows, §3.2) instead of through the power series: the VJPs
            of the series are taken without a graph, so memory does not grow
            with ``N``. The value is the same estimate; the gradient is a
            different unbiased estimate of the gradient.
        generator: Optional RNG on ``x``'s device, for reproducible draws.

    Raises:
        ValueError: ``distribution="poisson"``, or an unknown distribution.

    References:
        Chen et al. Residual Flows. NeurIPS 2019, §3.1-3.2.
    """

    def __init__(
        self,
        *,
        n_exact_terms: int = 2,
        distribution: str = "geometric",
        geometric_p: float = 0.5,
        probe: str = "gaussian",
        neumann_grad: bool = False,
        generator: torch.Generator | None = None,
    ):
        if distribution == "poisson":
            raise ValueError(POISSON_REFUSED)
        if distribution not in ROULETTE_DISTRIBUTIONS:
            valid = ", ".join(ROULETTE_DISTRIBUTIONS)
            raise ValueError(f"unknown distribution {distribution!r}; valid: {valid}")
        if not 0 < geometric_p < 1:
            raise ValueError(f"geometric_p must be in (0, 1), got {geometric_p}")
        if n_exact_terms < 0:
            raise ValueError(f"n_exact_terms must be >= 0, got {n_exact_terms}")
        self.n_exact_terms = n_exact_terms
        self.distribution = distribution
        self.geometric_p = geometric_p
        self.probe = probe
        self.neumann_grad = neumann_grad
        self.generator = generator

    def _sample_extra(self, b: int, device: torch.device) -> Tensor:
        u = torch.rand(b, generator=self.generator, dtype=torch.float64, device=device)
        # Inverse CDF: P(M >= m) = (1-p)^m; log1p(-u) avoids log(0).
        return torch.floor(torch.log1p(-u) / math.log1p(-self.geometric_p)).long()

    def tail_probability(self, m: Tensor) -> Tensor:
        """``P(M >= m)`` of the random part ``M``, elementwise for an integer tensor ``m``."""
        m = m.to(torch.float64)
        tail = (1.0 - self.geometric_p) ** m.clamp(min=0)
        return torch.where(m <= 0, torch.ones_like(tail), tail)

    def __call__(self, gx: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        b = x.shape[0]
        v = _probe(x, self.probe, self.generator)
        n = self.n_exact_terms + self._sample_extra(b, x.device)  # (B,) terms per sample
        n_max = int(n.max())
        if n_max == 0:
            return x.new_zeros(b)
        k = torch.arange(1, n_max + 1, device=x.device)
        inv_tail = (1.0 / self.tail_probability(k - self.n_exact_terms)).to(x.dtype)
        active = k[None, :] <= n[:, None]
        # where, not a product: an inactive term must give 0 even if its 1/P underflows to inf.
        weights = torch.where(active, inv_tail[None, :], torch.zeros_like(inv_tail)[None, :])
        if self.neumann_grad and create_graph:
            return _neumann_series(gx, x, v, weights)
        return _power_series(gx, x, v, weights, create_graph)


def _power_series(gx: Tensor, x: Tensor, v: Tensor, weights: Tensor, create_graph: bool) -> Tensor:
    """``sum_k weights[:, k-1] (-1)^{k+1} v^T J^k v / k`` with ``w_k^T = v^T J^k`` by VJPs."""
    total = x.new_zeros(x.shape[0])
    w = v
    for k in range(1, weights.shape[1] + 1):
        w = _vjp(gx, x, w, create_graph)
        total = total + (-1) ** (k + 1) / k * weights[:, k - 1] * sum_except_batch(w * v)
    return total


def _neumann_series(gx: Tensor, x: Tensor, v: Tensor, weights: Tensor) -> Tensor:
    """Power-series value, with the gradient of Residual Flows' Neumann estimator.

    ``d/dtheta of term k`` is ``(-1)^{k+1} tr(J^{k-1} dJ)`` in expectation, so the
    gradient of the series is that of the surrogate ``s = n^T J v`` with the
    constant ``n^T = sum_k weights_k (-1)^{k+1} v^T J^{k-1}``. The series VJPs
    run without a graph; only the surrogate's single VJP keeps one.
    """
    value = x.new_zeros(x.shape[0])
    n_terms = weights.shape[1]
    w = v
    neumann = weights[:, :1].reshape(-1, *[1] * (v.dim() - 1)) * v
    for k in range(1, n_terms + 1):
        w = _vjp(gx, x, w, create_graph=False).detach()
        value = value + (-1) ** (k + 1) / k * weights[:, k - 1] * sum_except_batch(w * v)
        if k < n_terms:
            wk = weights[:, k].reshape(-1, *[1] * (v.dim() - 1))
            neumann = neumann + (-1) ** k * wk * w
    surrogate = sum_except_batch(_vjp(gx, x, neumann.detach(), create_graph=True) * v)
    return value.detach() + surrogate - surrogate.detach()


LOGDET_ESTIMATORS: dict[str, type[LogDetEstimator]] = {
    "exact": ExactLogDet,
    "roulette": RouletteLogDet,
    "series": SeriesLogDet,
}


def make_logdet_estimator(name: str, **kwargs) -> LogDetEstimator:
    """Build a log-det estimator by name (``exact``, ``series``, ``roulette``)."""
    if name not in LOGDET_ESTIMATORS:
        valid = ", ".join(sorted(LOGDET_ESTIMATORS))
        raise ValueError(f"unknown logdet estimator {name!r}; valid: {valid}")
    return LOGDET_ESTIMATORS[name](**kwargs)


# ------------------------------------------------------------------------ residual block


class ResidualBlock(Flow):
    """Invertible residual block ``z = x + g(x)`` with ``Lip(g) < 1``.

    Args:
        g: Contractive network, e.g. :func:`lipschitz_mlp` or
            :func:`lipschitz_convnet`; maps ``(B, *event) -> (B, *event)``.
        logdet: A :class:`LogDetEstimator` or its name (``"exact"``, ``"series"``,
            ``"roulette"``; built with default options).
        tol: Fixed-point tolerance on ``max|x + g(x) - y|``, relative to
            ``max(1, max|y|)``.
        max_iters: Cap on fixed-point iterations in :meth:`inverse`.
        n_power_iterations: Power iterations per training-mode forward pass.

    Shapes:
        ``x``: ``(B, *event)``; logdet ``(B,)``.

    Example:
        >>> block = ResidualBlock(lipschitz_mlp(2, coeff=0.9), logdet="exact")
        >>> z, logdet = block(torch.randn(16, 2))
        >>> x = block.inverse(z)

    References:
        Behrmann et al. Invertible Residual Networks. ICML 2019.
        Chen et al. Residual Flows. NeurIPS 2019.
    """

    def __init__(
        self,
        g: nn.Module,
        *,
        logdet: LogDetEstimator | str = "roulette",
        tol: float = 1e-6,
        max_iters: int = 1000,
        n_power_iterations: int = 1,
    ):
        super().__init__()
        self.g = g
        self.logdet_estimator = make_logdet_estimator(logdet) if isinstance(logdet, str) else logdet
        self.tol = tol
        self.max_iters = max_iters
        self.n_power_iterations = n_power_iterations

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, *event) -> (B, *event)``, logdet ``(B,)``.

        Works under ``torch.no_grad()`` (the VJPs need a local graph, which is
        built and dropped here) but not under ``torch.inference_mode()``.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "ResidualBlock needs autograd for its log-determinant; evaluate under "
                "torch.no_grad() instead of torch.inference_mode()"
            )
        if self.training and self.n_power_iterations > 0:
            update_spectral_norm(self.g, self.n_power_iterations)
        grad_enabled = torch.is_grad_enabled()
        with torch.enable_grad():
            x_in = x if (grad_enabled and x.requires_grad) else x.detach().requires_grad_(True)
            gx = self.g(x_in)
            logdet = self.logdet_estimator(gx, x_in, create_graph=grad_enabled)
        z = x_in + gx
        if not grad_enabled:
            z, logdet = z.detach(), logdet.detach()
        return z, logdet

    @torch.no_grad()
    def inverse(
        self, z: Tensor, *, tol: float | None = None, max_iters: int | None = None
    ) -> Tensor:
        """Fixed-point inverse ``x_{k+1} = z - g(x_k)``, ``x_0 = z`` (not differentiable).

        Raises:
            FixedPointError: if ``max|x_k + g(x_k) - z|`` is still above the
                tolerance after ``max_iters`` iterations.
        """
        tol = self.tol if tol is None else tol
        max_iters = self.max_iters if max_iters is None else max_iters
        threshold = tol * max(1.0, float(z.abs().max()))
        x = z
        residual = float("inf")
        for _ in range(max_iters):
            x_next = z - self.g(x)
            # x_next - x = z - (x + g(x)): the forward residual at the current iterate.
            residual = float((x_next - x).abs().max())
            x = x_next
            if residual <= threshold:
                return x
        raise FixedPointError(
            f"ResidualBlock inverse did not converge: residual max|x + g(x) - y| = "
            f"{residual:.3e} > tol = {tol:.1e} (x max(1, max|y|) = {threshold:.3e}) after "
            f"max_iters = {max_iters} iterations. Raise the flow option `max_iters` or loosen "
            f"`tol`, or lower the Lipschitz coefficient `coeff` so that g contracts faster."
        )


# ---------------------------------------------------------------------------- builders


def _estimator_from_options(
    logdet: str,
    *,
    n_series_terms: int,
    n_exact_terms: int,
    roulette_distribution: str,
    geometric_p: float,
    probe: str,
    neumann_grad: bool,
) -> LogDetEstimator:
    if logdet == "exact":
        return ExactLogDet()
    if logdet == "series":
        return SeriesLogDet(n_terms=n_series_terms, probe=probe)
    if logdet == "roulette":
        return RouletteLogDet(
            n_exact_terms=n_exact_terms,
            distribution=roulette_distribution,
            geometric_p=geometric_p,
            probe=probe,
            neumann_grad=neumann_grad,
        )
    return make_logdet_estimator(logdet)  # raises the listing error


def resflow_vector(
    dim: int,
    *,
    num_blocks: int = 4,
    hidden_features: int = 64,
    num_hidden_layers: int = 2,
    coeff: float = 0.97,
    activation: str = "lipswish",
    actnorm: bool = True,
    logdet: str = "roulette",
    n_series_terms: int = 10,
    n_exact_terms: int = 2,
    roulette_distribution: str = "geometric",
    geometric_p: float = 0.5,
    probe: str = "gaussian",
    neumann_grad: bool = False,
    tol: float = 1e-6,
    max_iters: int = 1000,
) -> SequentialFlow:
    """Residual flow for vectors: ``num_blocks`` x (ActNorm ->) ResidualBlock(MLP).

    Args:
        dim: Number of features ``D``.
        num_blocks: Residual blocks.
        hidden_features: Width of each ``g``.
        num_hidden_layers: Hidden layers of each ``g``.
        coeff: Spectral-norm coefficient per layer (``< 1``).
        activation: ``"lipswish"`` or ``"elu"``.
        actnorm: ActNorm before every block (as in Residual Flows).
        logdet: ``"exact"``, ``"series"`` or ``"roulette"``.
        n_series_terms: Terms of the ``series`` estimator.
        n_exact_terms, roulette_distribution, geometric_p, neumann_grad:
            Options of :class:`RouletteLogDet` (``roulette_distribution`` must be
            ``"geometric"``: a Poisson one has infinite variance).
        probe: Hutchinson probe, ``"gaussian"`` or ``"rademacher"``.
        tol, max_iters: Fixed-point inverse options of :class:`ResidualBlock`.

    Returns:
        A :class:`~cnf.flows.base.SequentialFlow` on ``(B, D)``.

    References:
        Chen et al. Residual Flows. NeurIPS 2019.
    """
    est = _estimator_from_options(
        logdet,
        n_series_terms=n_series_terms,
        n_exact_terms=n_exact_terms,
        roulette_distribution=roulette_distribution,
        geometric_p=geometric_p,
        probe=probe,
        neumann_grad=neumann_grad,
    )
    layers: list[Flow] = []
    for _ in range(num_blocks):
        if actnorm:
            layers.append(ActNorm(dim))
        g = lipschitz_mlp(
            dim,
            hidden_features=hidden_features,
            num_hidden_layers=num_hidden_layers,
            coeff=coeff,
            activation=activation,
        )
        layers.append(ResidualBlock(g, logdet=est, tol=tol, max_iters=max_iters))
    return SequentialFlow(layers)


def resflow_image(
    event_shape: tuple[int, int, int],
    *,
    num_blocks: int = 4,
    hidden_channels: int = 64,
    coeff: float = 0.97,
    activation: str = "lipswish",
    actnorm: bool = True,
    logdet: str = "roulette",
    n_series_terms: int = 10,
    n_exact_terms: int = 2,
    roulette_distribution: str = "geometric",
    geometric_p: float = 0.5,
    probe: str = "gaussian",
    neumann_grad: bool = False,
    tol: float = 1e-6,
    max_iters: int = 1000,
) -> SequentialFlow:
    """Single-scale residual flow for images: ``num_blocks`` x (ActNorm ->) ResidualBlock(conv).

    Arguments as in :func:`resflow_vector`, with ``hidden_channels`` the width
    of each conv net :func:`lipschitz_convnet`.

    Returns:
        A :class:`~cnf.flows.base.SequentialFlow` on ``(B, C, H, W)``.

    References:
        Chen et al. Residual Flows. NeurIPS 2019.
    """
    if len(event_shape) != 3:
        raise ValueError(f"resflow_image needs event_shape (C, H, W), got {tuple(event_shape)}")
    shape = tuple(int(s) for s in event_shape)
    est = _estimator_from_options(
        logdet,
        n_series_terms=n_series_terms,
        n_exact_terms=n_exact_terms,
        roulette_distribution=roulette_distribution,
        geometric_p=geometric_p,
        probe=probe,
        neumann_grad=neumann_grad,
    )
    layers: list[Flow] = []
    for _ in range(num_blocks):
        if actnorm:
            layers.append(ActNorm(shape[0]))
        g = lipschitz_convnet(
            shape,  # type: ignore[arg-type]
            hidden_channels=hidden_channels,
            coeff=coeff,
            activation=activation,
        )
        layers.append(ResidualBlock(g, logdet=est, tol=tol, max_iters=max_iters))
    return SequentialFlow(layers)
