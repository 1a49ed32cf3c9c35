"""INDM's released flow: a residual flow conditioned on a global latent (a variational flow term).

The released INDM code (docs/methods.md §6) wraps its residual flow (§2.5)
in the global-latent conditioning of the Wolf code: an encoder gives a
Gaussian posterior ``q(h | x)`` over a latent ``h ∈ R^k`` (k = 64 there), a
small coupling flow gives its prior ``p(h)``, and ``h`` shifts the hidden
features of every residual block's network, ``z = f_h(x)``. The density of
``x`` under a base density ``p_Z`` is then a mixture over ``h``,

    p(x) = ∫ p(h) p_Z(f_h(x)) |det ∂f_h/∂x| dh,

with no closed form. It is trained and evaluated through the variational bound

    log p(x) ≥ E_q(h|x)[ log p_Z(f_h(x)) + log|det ∂f_h/∂x| + log p(h) − log q(h | x) ],

estimated with one reparameterised draw ``h = μ(x) + σ(x) ε`` per call
(``log|det| − KL(q ‖ p)`` in expectation over the draw of ``z``).

**Interface.** :meth:`GlobalLatentResidualFlow.transform` returns ``z = f_h(x)``
and, in the place of the log-determinant, the single-sample flow term
``log|det ∂f_h/∂x| + log p(h) − log q(h | x)``. Every family that adds a
flow's ``logdet`` to a base log-density (the ``flow`` family; INDM, whose
base is the latent diffusion) therefore gets an unbiased estimate of the
bound with no further code, and reports it as a bound
(``EvalOutput.nll_is_bound``, via :func:`is_variational`). The inverse draws
``h`` from the prior (the global RNG: evaluation and sampling seed it) and
inverts ``f_h`` by fixed-point iteration. :meth:`~GlobalLatentResidualFlow.transform_given`
and :meth:`~GlobalLatentResidualFlow.inverse_given` are the trunk for a given ``h``.

**Invertibility given h.** Each block is an invertible residual block of
:mod:`cnf.flows.residual`, ``z = x + g(x; h)``, whose network's interior
layers take their input plus a linear function of ``h`` (broadcast over
pixels). The shift does not depend on ``x``, so ``Lip_x(g) < 1`` still
holds, the fixed-point inverse converges for every ``h``, and the block's
log-det estimators (exact, series, roulette) apply unchanged.

Differences from the released code (which this module does not copy): the
convolutions are spectrally normalised by power iteration on the operator
(:mod:`cnf.flows.lipschitz`), not ∞-norm constrained; the encoder is a plain
strided conv net without batch normalisation; the prior is a RealNVP of
affine couplings (:func:`cnf.flows.multiscale.realnvp_vector`).

References:
    Kim, Na, Kwon, Lee, Kang & Moon, "Maximum likelihood training of implicit
    nonlinear diffusion models", NeurIPS 2022 (the released code's flow).
    Ma, Zhou & Hovy, "Decoupling global and local representations via
    invertible generative flows" (Wolf), ICLR 2021.
    Chen, Behrmann, Duvenaud & Jacobsen, "Residual flows for invertible
    generative modeling", NeurIPS 2019.
    Kingma & Welling, "Auto-encoding variational Bayes", ICLR 2014.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cnf.flows.base import (
    DEFAULT_SETTINGS,
    DiagonalNormal,
    Flow,
    FlowOutput,
    FlowSettings,
    standard_normal_logprob,
)
from cnf.flows.glow import ActNorm, Squeeze
from cnf.flows.lipschitz import (
    SpectralNormConv2d,
    SpectralNormLinear,
)
from cnf.flows.multiscale import realnvp_vector
from cnf.flows.residual import LogDetOptions, ResidualBlock, lipschitz_net
from cnf.solve import SolveStats

__all__ = [
    "ConditionalResidualBlock",
    "GaussianEncoder",
    "GlobalLatentResidualFlow",
    "GlobalShift",
    "global_latent_resflow",
    "is_variational",
]


def is_variational(flow: nn.Module) -> bool:
    """Whether ``flow`` (or a part of it) returns a variational flow term instead of a log-det.

    A family whose likelihood adds such a flow's ``logdet`` reports a bound
    (``EvalOutput.nll_is_bound``).
    """
    return any(isinstance(m, GlobalLatentResidualFlow) for m in flow.modules())


class GlobalShift(nn.Module):
    """``g(x; h)``: a Lipschitz network whose interior layers see their input shifted by ``A h + b``.

    Args:
        net: A :func:`~cnf.flows.lipschitz.lipschitz_mlp` or
            :func:`~cnf.flows.lipschitz.lipschitz_convnet` with at least three
            spectrally normalised layers; every one but the first and the last
            gets its own shift (the released code shifts the middle convolution's input).
        latent_dim: Size ``k`` of the global latent.

    Shapes:
        ``x``: ``(B, D)`` or ``(B, C, H, W)``; ``h``: ``(B, k)``; output shaped like ``x``.
    """

    def __init__(self, net: nn.Sequential, latent_dim: int):
        super().__init__()
        spectral = [
            i for i, m in enumerate(net) if isinstance(m, SpectralNormLinear | SpectralNormConv2d)
        ]
        if len(spectral) < 3:
            raise ValueError(
                "the global latent conditions the interior layers of g: it needs at least "
                f"3 layers, got {len(spectral)} (vectors: num_hidden_layers >= 2)"
            )
        self.net = net
        self.positions = tuple(spectral[1:-1])
        self.shifts = nn.ModuleList(
            nn.Linear(latent_dim, net[i].weight.shape[1]) for i in self.positions
        )

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        shifts = dict(zip(self.positions, self.shifts))
        for i, layer in enumerate(self.net):
            if i in shifts:
                a = shifts[i](h)
                x = x + a.reshape(*a.shape, *([1] * (x.dim() - 2)))
            x = layer(x)
        return x


class ConditionalResidualBlock(ResidualBlock):
    """Invertible residual block ``z = x + g(x; h)`` for a given global latent ``h``.

    Arguments as :class:`~cnf.flows.residual.ResidualBlock`, with ``g`` a
    :class:`GlobalShift`. ``Lip_x(g) < 1`` for every ``h``, so the block is
    invertible given ``h``; it is used through :meth:`transform_given` and
    :meth:`inverse_given` (calling it without ``h`` is an error).
    """

    def transform_given(
        self, x: Tensor, h: Tensor, settings: FlowSettings = DEFAULT_SETTINGS
    ) -> FlowOutput:
        """``z = x + g(x; h)`` and ``log|det ∂z/∂x|`` ``(B,)`` by the call's (or the block's) estimator."""
        z, logdet = self._forward(x, settings.logdet or self.logdet_estimator, (h,))
        return FlowOutput(z, logdet)

    def inverse_given(self, z: Tensor, h: Tensor) -> Tensor:
        """The fixed-point inverse of :meth:`transform_given` for the same ``h``."""
        return self.inverse(z, cond=(h,))

    def transform(self, x: Tensor, settings: FlowSettings = DEFAULT_SETTINGS) -> FlowOutput:
        raise TypeError("ConditionalResidualBlock needs its global latent: call transform_given")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise TypeError("ConditionalResidualBlock needs its global latent: call transform_given")


class GaussianEncoder(nn.Module):
    """``q(h | x) = N(μ(x), diag exp(log_var(x)))``.

    Images: per width in ``channels`` a 3×3 convolution and a stride-2 3×3
    convolution (ELU), then a 1×1 convolution to ``out_channels``, flattened.
    Vectors: an ELU MLP of widths ``features``. A zero-initialised linear head
    gives ``(μ, log_var)``, so ``q = N(0, I)`` at initialisation.

    Shapes:
        ``x``: ``(B, *event_shape)``; ``μ``, ``log_var``: ``(B, latent_dim)``.
    """

    def __init__(
        self,
        event_shape: tuple[int, ...],
        latent_dim: int,
        *,
        channels: Sequence[int] = (32, 64),
        out_channels: int = 8,
        features: Sequence[int] = (64, 64),
    ):
        super().__init__()
        layers: list[nn.Module] = []
        if len(event_shape) == 3:
            c, height, width = event_shape
            for w in channels:
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ELU()]
                layers += [nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ELU()]
                c, height, width = w, (height + 1) // 2, (width + 1) // 2
            layers += [nn.Conv2d(c, out_channels, 1), nn.ELU(), nn.Flatten()]
            size = out_channels * height * width
        else:
            size = event_shape[0]
            for w in features:
                layers += [nn.Linear(size, w), nn.ELU()]
                size = w
        head = nn.Linear(size, 2 * latent_dim)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.net = nn.Sequential(*layers, head)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ, log_var)``, each ``(B, latent_dim)``."""
        mu, log_var = self.net(x).chunk(2, dim=1)
        return mu, log_var


class GlobalLatentResidualFlow(Flow):
    """A residual flow conditioned on a global latent ``h ~ q(h | x)``; see the module docstring.

    Args:
        encoder: The posterior ``q(h | x)`` (:class:`GaussianEncoder`).
        prior: A flow ``h -> u`` with ``u ~ N(0, I)``: the prior ``p(h)``.
        layers: The trunk: :class:`ConditionalResidualBlock` s, ActNorms and
            squeezes, applied in order.
        latent_dim: Size ``k`` of ``h``.
        num_squeezes: Squeezes in ``layers``; undone at the end so ``z`` has ``x``'s shape.

    Shapes:
        ``x``, ``z``: ``(B, *event)``; ``h``: ``(B, k)``; logdet ``(B,)``.

    Example:
        >>> flow = global_latent_resflow((2,), num_blocks=2, latent_dim=4)
        >>> z, bound = flow(torch.randn(8, 2))   # bound: log|det| + log p(h) − log q(h|x)
        >>> x = flow.inverse(z)                   # a fresh h from the prior: not a round trip
    """

    def __init__(
        self,
        encoder: GaussianEncoder,
        prior: Flow,
        layers: Sequence[Flow],
        *,
        latent_dim: int,
        num_squeezes: int = 0,
    ):
        super().__init__()
        self.encoder = encoder
        self.prior = prior
        self.layers = nn.ModuleList(layers)
        self.latent_dim = int(latent_dim)
        self.num_squeezes = int(num_squeezes)
        self._squeeze = Squeeze(2)
        self._base = DiagonalNormal()

    # ------------------------------------------------------------- the latent
    def sample_posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``h = μ(x) + σ(x) ε`` (reparameterised, global RNG) and ``log q(h | x)`` ``(B,)``."""
        mu, log_var = self.encoder(x)
        eps = torch.randn_like(mu)
        h = mu + torch.exp(0.5 * log_var) * eps
        return h, standard_normal_logprob(eps) - 0.5 * log_var.sum(dim=1)

    def posterior_log_prob(self, x: Tensor, h: Tensor) -> Tensor:
        """``log q(h | x)`` ``(B,)`` for given ``h`` ``(B, k)``."""
        mu, log_var = self.encoder(x)
        return standard_normal_logprob((h - mu) * torch.exp(-0.5 * log_var)) - 0.5 * log_var.sum(
            dim=1
        )

    def prior_log_prob(self, h: Tensor) -> Tensor:
        """``log p(h)`` ``(B,)`` through the prior flow."""
        u, logdet = self.prior(h)
        return self._base.log_prob(u) + logdet

    def sample_prior(
        self,
        n: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``n`` draws of ``h ~ p(h)``, ``(n, k)``."""
        u = self._base.sample((n, self.latent_dim), generator=generator, dtype=dtype, device=device)
        return self.prior.inverse(u)

    # ------------------------------------------------------------- the trunk
    def transform_given(
        self, x: Tensor, h: Tensor, settings: FlowSettings = DEFAULT_SETTINGS
    ) -> FlowOutput:
        """``z = f_h(x)`` and ``log|det ∂f_h/∂x|`` ``(B,)`` for a given latent ``h``."""
        out = FlowOutput(x, x.new_zeros(x.shape[0]))
        for layer in self.layers:
            if isinstance(layer, ConditionalResidualBlock):
                out = out.then(layer.transform_given(out.z, h, settings))
            else:
                out = out.then(layer.transform(out.z, settings))
        for _ in range(self.num_squeezes):
            out.z = self._squeeze.inverse(out.z)
        return out

    def inverse_given(
        self, z: Tensor, h: Tensor, settings: FlowSettings = DEFAULT_SETTINGS
    ) -> tuple[Tensor, SolveStats]:
        """``x = f_h^{-1}(z)`` (fixed-point inverses) for a given latent ``h``."""
        for _ in range(self.num_squeezes):
            z = self._squeeze(z)[0]
        stats = SolveStats()
        for layer in reversed(self.layers):
            if isinstance(layer, ConditionalResidualBlock):
                z = layer.inverse_given(z, h)
            else:
                z, st = layer.inverse_transform(z, settings)
                stats = stats + st
        return z, stats

    # ------------------------------------------------------------- Flow API
    def transform(self, x: Tensor, settings: FlowSettings = DEFAULT_SETTINGS) -> FlowOutput:
        """``z = f_h(x)``, ``h ~ q(h | x)``, and the flow term ``log|det| + log p(h) − log q(h | x)``."""
        h, log_q = self.sample_posterior(x)
        out = self.transform_given(x, h, settings)
        out.logdet = out.logdet + self.prior_log_prob(h) - log_q
        return out

    def inverse_transform(
        self, z: Tensor, settings: FlowSettings = DEFAULT_SETTINGS
    ) -> tuple[Tensor, SolveStats]:
        """``x = f_h^{-1}(z)`` with ``h ~ p(h)`` drawn from the global RNG."""
        h = self.sample_prior(z.shape[0], dtype=z.dtype, device=z.device)
        return self.inverse_given(z, h, settings)


def global_latent_resflow(
    event_shape: tuple[int, ...],
    *,
    num_scales: int = 1,
    num_blocks: int = 4,
    hidden_features: int = 64,
    num_hidden_layers: int = 2,
    hidden_channels: int = 64,
    coeff: float = 0.97,
    activation: str = "lipswish",
    actnorm: bool = False,
    logdet: LogDetOptions = LogDetOptions(),  # noqa: B008 - frozen, so safe as a default
    tol: float = 1e-6,
    max_iters: int = 1000,
    latent_dim: int = 64,
    encoder_channels: Sequence[int] = (32, 64),
    encoder_out_channels: int = 8,
    encoder_features: Sequence[int] = (64, 64),
    prior_layers: int = 4,
    prior_hidden_features: int = 64,
) -> GlobalLatentResidualFlow:
    """The global-latent residual flow (``resflow_global``) for vectors ``(D,)`` or images ``(C, H, W)``.

    Images: ``num_scales`` scales of ``num_blocks`` conditional residual
    blocks each (3×3 → 1×1 → 3×3 Lipschitz conv nets of width
    ``hidden_channels``), a 2×2 squeeze between scales, undone at the end
    (the released CIFAR-10 flow: 2 scales × 16 blocks, width 512, coeff 0.98,
    ``sin``, no ActNorm). Vectors: ``num_blocks`` blocks of Lipschitz MLPs.

    Args:
        event_shape: ``(D,)`` or ``(C, H, W)``.
        num_scales: Scales (images; H and W divisible by ``2**(num_scales − 1)``).
        num_blocks: Residual blocks per scale.
        hidden_features, num_hidden_layers: Each MLP ``g`` (vectors; ≥ 2 hidden layers).
        hidden_channels: Width of each conv ``g`` (images).
        coeff, activation: Spectral-norm coefficient and 1-Lipschitz activation.
        actnorm: ActNorm before every block.
        logdet: The blocks' training log-det estimator.
        tol, max_iters: Fixed-point inverse options.
        latent_dim: Size ``k`` of the global latent (≥ 2; 64 released).
        encoder_channels, encoder_out_channels: The conv encoder (images).
        encoder_features: The MLP encoder (vectors).
        prior_layers, prior_hidden_features: The RealNVP prior on ``h``.

    Returns:
        A :class:`GlobalLatentResidualFlow`.
    """
    shape = tuple(int(s) for s in event_shape)
    if len(shape) not in (1, 3):
        raise ValueError(f"resflow_global needs event_shape (D,) or (C, H, W), got {shape}")
    if latent_dim < 2:
        raise ValueError(
            f"latent_dim must be >= 2 (the prior is a coupling flow), got {latent_dim}"
        )
    if num_scales < 1 or (len(shape) == 1 and num_scales != 1):
        raise ValueError(f"num_scales must be 1 for vectors and >= 1 for images, got {num_scales}")
    if len(shape) == 3 and (shape[1] % 2 ** (num_scales - 1) or shape[2] % 2 ** (num_scales - 1)):
        raise ValueError(
            f"image size {shape[1]}x{shape[2]} not divisible by 2**(num_scales - 1) = "
            f"{2 ** (num_scales - 1)}"
        )
    block = logdet.block_options()
    layers: list[Flow] = []
    for scale in range(num_scales):
        if scale:
            layers.append(Squeeze(2))
            shape = (4 * shape[0], shape[1] // 2, shape[2] // 2)
        for _ in range(num_blocks):
            if actnorm:
                layers.append(ActNorm(shape[0]))
            net = lipschitz_net(
                shape,
                hidden_features=hidden_features,
                num_hidden_layers=num_hidden_layers,
                hidden_channels=hidden_channels,
                coeff=coeff,
                activation=activation,
            )
            g = GlobalShift(net, latent_dim)
            layers.append(ConditionalResidualBlock(g, tol=tol, max_iters=max_iters, **block))
    encoder = GaussianEncoder(
        tuple(int(s) for s in event_shape),
        latent_dim,
        channels=tuple(encoder_channels),
        out_channels=encoder_out_channels,
        features=tuple(encoder_features),
    )
    prior = realnvp_vector(
        latent_dim, num_layers=prior_layers, hidden_features=prior_hidden_features
    )
    return GlobalLatentResidualFlow(
        encoder, prior, layers, latent_dim=latent_dim, num_squeezes=num_scales - 1
    )
