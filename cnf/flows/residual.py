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


class _GradInForward(torch.autograd.Function):
    """The identity on a log-det value whose backward adds gradients taken in the forward pass.

    ``apply(logdet, n_inputs, grads, *targets)``: ``grads[i]`` is
    ``∂(sum_b logdet_b)/∂targets[i]``. The first ``n_inputs`` targets are
    per-sample inputs (sample ``b`` of the gradient belongs to ``logdet_b``
    alone), scaled per sample by ``∂L/∂logdet``; the rest are parameters,
    shared by every sample, so their stored sum is exact only when
    ``∂L/∂logdet`` is the same for every sample.
    """

    @staticmethod
    def forward(ctx, logdet, n_inputs, grads, *targets):  # noqa: ARG004 - targets link the graph
        ctx.n_inputs = n_inputs
        ctx.grads = grads
        return logdet.clone()

    @staticmethod
    def backward(ctx, grad_logdet):
        grads, n = ctx.grads, ctx.n_inputs
        ctx.grads = None
        out = [grad_logdet.reshape(-1, *[1] * (g.dim() - 1)) * g for g in grads[:n]]
        if len(grads) > n:
            w = grad_logdet[0]
            scale = float(grad_logdet.abs().max())
            if not torch.allclose(
                grad_logdet, w.expand_as(grad_logdet), rtol=1e-6, atol=1e-12 * scale
            ):
                raise RuntimeError(
                    "grad_in_forward needs a loss that weighs every sample's log-det equally "
                    "(a batch mean or sum); this loss weighs them differently: set "
                    "model.flow.logdet.grad_in_forward=false"
                )
            out.extend(w * g for g in grads[n:])
        return (None, None, None, *out)


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
        grad_in_forward: Take the log-det's gradient in the forward pass and
            free its double-backward graph there (Residual Flows'
            memory-efficient training): activation memory no longer grows with
            the number of series terms. Needs a loss that weighs every
            sample's log-det equally (a batch mean or sum); the gradients are
            those of the plain backward.

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
        grad_in_forward: bool = False,
    ):
        super().__init__()
        self.g = g
        self.logdet_estimator = make_logdet_estimator(logdet) if isinstance(logdet, str) else logdet
        self.tol = tol
        self.max_iters = max_iters
        self.n_power_iterations = n_power_iterations
        self.grad_in_forward = grad_in_forward

    def transform(self, x: Tensor, settings: FlowSettings = DEFAULT_SETTINGS) -> FlowOutput:
        z, logdet = self._forward(x, settings.logdet or self.logdet_estimator)
        return FlowOutput(z, logdet)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._forward(x, self.logdet_estimator)

    def _forward(
        self, x: Tensor, estimator: LogDetEstimator, cond: tuple[Tensor, ...] = ()
    ) -> tuple[Tensor, Tensor]:
        """``(B, *event) -> (B, *event)``, logdet ``(B,)`` by ``estimator``.

        ``cond`` are extra per-sample inputs of ``g``, called as ``g(x, *cond)``
        (a conditional block's global latent, :mod:`cnf.flows.global_latent`).
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
            # An alias, not x itself: the log-det's VJPs differentiate g in its x argument
            # only, never through a path from x into ``cond`` (h = encoder(x)).
            if grad_enabled and x.requires_grad:
                x_in = x.view_as(x)
            else:
                x_in = x.detach().requires_grad_(True)
            # Aliases again, so that a gradient taken with respect to them here
            # (grad_in_forward) is the direct one, not also through x's dependence on h.
            cond = tuple(c.view_as(c) if c.requires_grad else c for c in cond)
            gx = self.g(x_in, *cond)
            logdet = estimator(gx, x_in, create_graph=grad_enabled)
            if grad_enabled and self.grad_in_forward:
                logdet = self._gradient_now(logdet, x_in if x.requires_grad else None, cond)
        z = x_in + gx
        if not grad_enabled:
            z, logdet = z.detach(), logdet.detach()
        return z, logdet

    def _gradient_now(self, logdet: Tensor, x: Tensor | None, cond: tuple[Tensor, ...]) -> Tensor:
        """The log-det with its gradient taken now and its double-backward graph freed.

        The gradients of ``sum_b logdet_b`` with respect to ``x``, ``cond`` and
        the parameters of ``g`` are computed here; the returned log-det carries
        them into the backward pass scaled by ``∂L/∂logdet`` (per sample for the
        inputs, shared for the parameters), so the graph of the estimator's VJPs
        never lives until the loss's backward.
        """
        inputs = [t for t in cond if t.requires_grad]
        if x is not None:
            inputs.insert(0, x)
        params = [p for p in self.g.parameters() if p.requires_grad]
        targets = [*inputs, *params]
        if not targets or not logdet.requires_grad:
            return logdet
        grads = torch.autograd.grad(logdet.sum(), targets, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(targets, grads)]
        return _GradInForward.apply(logdet.detach(), len(inputs), grads, *targets)

    @torch.no_grad()
    def inverse(
        self,
        z: Tensor,
        *,
        tol: float | None = None,
        max_iters: int | None = None,
        cond: tuple[Tensor, ...] = (),
    ) -> Tensor:
        """Fixed-point inverse ``x_{k+1} = z - g(x_k, *cond)``, ``x_0 = z`` (not differentiable).

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
            x_next = z - self.g(x, *cond)
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
        grad_in_forward: The blocks take the log-det's gradient in the
            forward pass (:class:`ResidualBlock`): less memory, same gradients.
    """

    name: str = "roulette"
    n_terms: int = 10
    n_exact_terms: int = 2
    distribution: str = "geometric"
    geometric_p: float = 0.5
    probe: str = "gaussian"
    neumann_grad: bool = False
    grad_in_forward: bool = False

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

    def block_options(self) -> dict:
        """Keyword options of :class:`ResidualBlock` these settings give (one estimator, shared)."""
        return {"logdet": self.build(), "grad_in_forward": self.grad_in_forward}


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
    block = logdet.block_options()
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
        layers.append(ResidualBlock(g, tol=tol, max_iters=max_iters, **block))
    return SequentialFlow(layers)
