"""Invertible residual blocks (i-ResNet) and the residual-flow builder.

A residual block ``z = x + g(x)`` is invertible when ``Lip(g) < 1``
(:mod:`cnf.flows.lipschitz`): then ``x = z − g(x)`` is a contraction in ``x``
and the fixed-point iteration ``x_{k+1} = z − g(x_k)`` converges (Banach).
Its log-determinant comes from a :mod:`cnf.flows.logdet` estimator — the
block's own (training), or the one a call's
:class:`~cnf.flows.base.FlowSettings` chooses (evaluation: exact in low
dimension).

Blocks map data ``x`` (t = 0) to the base ``z`` (t = T) in ``forward``.

References:
    Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen, "Invertible residual
    networks", ICML 2019.
    Chen, Behrmann, Duvenaud & Jacobsen, "Residual flows for invertible
    generative modeling", NeurIPS 2019.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cnf.flows.base import DEFAULT_SETTINGS, Flow, FlowOutput, FlowSettings, SequentialFlow
from cnf.flows.glow import ActNorm
from cnf.flows.lipschitz import lipschitz_convnet, lipschitz_mlp, update_spectral_norm
from cnf.flows.logdet import LogDetEstimator, make_logdet_estimator

__all__ = ["FixedPointError", "LogDetOptions", "ResidualBlock", "resflow"]


class FixedPointError(RuntimeError):
    """The fixed-point inverse of a residual block did not reach its tolerance."""


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

    def transform(self, x: Tensor, settings: FlowSettings = DEFAULT_SETTINGS) -> FlowOutput:
        z, logdet = self._forward(x, settings.logdet or self.logdet_estimator)
        return FlowOutput(z, logdet)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._forward(x, self.logdet_estimator)

    def _forward(
        self,
        x: Tensor,
        estimator: LogDetEstimator,
        g: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(B, *event) -> (B, *event)``, logdet ``(B,)`` by ``estimator``.

        ``g`` replaces ``self.g`` for this call (a conditional block binds its
        conditioning input, :mod:`cnf.flows.global_latent`). Works under
        ``torch.no_grad()`` (the VJPs need a local graph, which is built and
        dropped here) but not under ``torch.inference_mode()``.
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
            gx = (self.g if g is None else g)(x_in)
            logdet = estimator(gx, x_in, create_graph=grad_enabled)
        z = x_in + gx
        if not grad_enabled:
            z, logdet = z.detach(), logdet.detach()
        return z, logdet

    @torch.no_grad()
    def inverse(
        self,
        z: Tensor,
        *,
        tol: float | None = None,
        max_iters: int | None = None,
        g: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Fixed-point inverse ``x_{k+1} = z - g(x_k)``, ``x_0 = z`` (not differentiable).

        ``g`` replaces ``self.g`` for this call, as in :meth:`_forward`.

        Raises:
            FixedPointError: if ``max|x_k + g(x_k) - z|`` is still above the
                tolerance after ``max_iters`` iterations.
        """
        tol = self.tol if tol is None else tol
        max_iters = self.max_iters if max_iters is None else max_iters
        g = self.g if g is None else g
        threshold = tol * max(1.0, float(z.abs().max()))
        x = z
        residual = float("inf")
        for _ in range(max_iters):
            x_next = z - g(x)
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


@dataclass(frozen=True)
class LogDetOptions:
    """The training log-det estimator of a residual flow: a named choice with its options.

    Attributes:
        name: ``roulette`` (unbiased), ``series`` (truncated) or ``exact``.
        n_terms: Terms of the ``series`` estimator.
        n_exact_terms, distribution, geometric_p, neumann_grad: Options of
            :class:`~cnf.flows.logdet.RouletteLogDet` (``geometric`` only: a
            Poisson number of terms has infinite variance).
        probe: Hutchinson probe, ``gaussian`` or ``rademacher``.
    """

    name: str = "roulette"
    n_terms: int = 10
    n_exact_terms: int = 2
    distribution: str = "geometric"
    geometric_p: float = 0.5
    probe: str = "gaussian"
    neumann_grad: bool = False

    def __post_init__(self) -> None:
        self.build()  # the estimator validates its options (and refuses Poisson roulette)

    def build(self) -> LogDetEstimator:
        if self.name == "series":
            return make_logdet_estimator("series", n_terms=self.n_terms, probe=self.probe)
        if self.name == "roulette":
            return make_logdet_estimator(
                "roulette",
                n_exact_terms=self.n_exact_terms,
                distribution=self.distribution,
                geometric_p=self.geometric_p,
                probe=self.probe,
                neumann_grad=self.neumann_grad,
            )
        return make_logdet_estimator(self.name)


def lipschitz_net(
    shape: tuple[int, ...],
    *,
    hidden_features: int,
    num_hidden_layers: int,
    hidden_channels: int,
    coeff: float,
    activation: str,
) -> nn.Module:
    """The residual branch ``g`` with Lip(g) < ``coeff``: an MLP on ``(D,)``, a convnet on ``(C, H, W)``."""
    if len(shape) == 1:
        return lipschitz_mlp(
            shape[0],
            hidden_features=hidden_features,
            num_hidden_layers=num_hidden_layers,
            coeff=coeff,
            activation=activation,
        )
    return lipschitz_convnet(
        shape,  # type: ignore[arg-type]
        hidden_channels=hidden_channels,
        coeff=coeff,
        activation=activation,
    )


def resflow(
    event_shape: tuple[int, ...],
    *,
    num_blocks: int = 4,
    hidden_features: int = 64,
    num_hidden_layers: int = 2,
    hidden_channels: int = 64,
    coeff: float = 0.97,
    activation: str = "lipswish",
    actnorm: bool = True,
    logdet: LogDetOptions = LogDetOptions(),  # noqa: B008 - frozen, so safe as a default
    tol: float = 1e-6,
    max_iters: int = 1000,
) -> SequentialFlow:
    """Residual flow: ``num_blocks`` × (ActNorm →) ResidualBlock, single scale.

    ``g`` is a Lipschitz MLP (``num_hidden_layers`` hidden layers of width
    ``hidden_features``) for vectors ``(D,)`` and the 3×3 → 1×1 → 3×3 Lipschitz
    conv net with ``hidden_channels`` channels for images ``(C, H, W)``.

    Args:
        event_shape: ``(D,)`` or ``(C, H, W)``.
        num_blocks: Residual blocks.
        hidden_features, num_hidden_layers: Width and depth of each MLP ``g`` (vectors).
        hidden_channels: Width of each conv ``g`` (images).
        coeff: Spectral-norm coefficient per layer (``< 1``).
        activation: ``lipswish``, ``elu`` or ``sin`` (:data:`~cnf.flows.lipschitz.LIPSCHITZ_ACTIVATIONS`).
        actnorm: ActNorm before every block (as in Residual Flows).
        logdet: The training log-det estimator.
        tol, max_iters: Fixed-point inverse options of :class:`ResidualBlock`.

    Returns:
        A :class:`~cnf.flows.base.SequentialFlow` on ``(B, *event_shape)``.
    """
    shape = tuple(int(s) for s in event_shape)
    if len(shape) not in (1, 3):
        raise ValueError(f"resflow needs event_shape (D,) or (C, H, W), got {shape}")
    est = logdet.build()
    layers: list[Flow] = []
    for _ in range(num_blocks):
        if actnorm:
            layers.append(ActNorm(shape[0]))
        g = lipschitz_net(
            shape,
            hidden_features=hidden_features,
            num_hidden_layers=num_hidden_layers,
            hidden_channels=hidden_channels,
            coeff=coeff,
            activation=activation,
        )
        layers.append(ResidualBlock(g, logdet=est, tol=tol, max_iters=max_iters))
    return SequentialFlow(layers)
