"""The discretised DiffFlow chains, the path NELBO and its memory-saving gradient.

On a grid ``t_0 < … < t_N`` (data at ``t_0``, prior at ``t_N``; ``Δt_i =
t_{i+1} − t_i``, ``g_i = g(t_i)``, ``D`` = dimension) the two Markov chains
of docs/methods.md §5 are

* forward  ``p_F(x_{i+1} | x_i) = N(x_i + f(x_i, t_i)Δt_i, g_i² Δt_i I)``;
* backward ``p_B(x_i | x_{i+1}) = N(x_{i+1} − b(x_{i+1}, t_{i+1})Δt_i, g_{i+1}² Δt_i I)``
  with ``b = f − g² s`` and ``p_B(x_N) = N(0, σ² I)``.

The *backward model* is the joint ``p_B(x_{0:N}) = p_B(x_N) Π_i p_B(x_i | x_{i+1})``
— every step Gaussian, the last one (``x_1 → x_0``) included — and its
density at the data is the marginal ``p_B(x_0) = ∫ p_B(x_{0:N}) dx_{1:N}``.
With ``q(x_{1:N} | x_0) = Π_i p_F(x_{i+1} | x_i)``, Jensen's inequality gives
the path NELBO (per sample, nats)::

    −log p_B(x_0) ≤ E_q[ −log p_B(x_N) − Σ_i (log p_B(x_i|x_{i+1}) − log p_F(x_{i+1}|x_i)) ]
                 = E_q[ −log N(x_N; 0, σ²I) + Σ_i ½‖δ_i^B‖² − ½‖δ_i^F‖² + D·log(g_{i+1}/g_i) ]

with ``δ_i^F = (x_{i+1} − x_i − f(x_i,t_i)Δt_i)/(g_i√Δt_i)`` (the forward noise)
and ``δ_i^B = (x_i − x_{i+1} + b(x_{i+1},t_{i+1})Δt_i)/(g_{i+1}√Δt_i)`` (the
backward noise that reproduces the same step). The gap is
``KL(q(x_{1:N}|x_0) ‖ p_B(x_{1:N}|x_0))``. The log-ratio terms telescope to
``D·log(g_N/g_0)``: a constant that never changes a gradient, which is why the
released code can drop it — but its NELBO is then off by that constant
whenever ``g`` varies in time. Sampling with a noise-free last step (the
released code's and DDPM's convention) draws the *mean* of
``p_B(x_0|x_1)``, i.e. from a slightly different model than the one bounded.

**Well-definedness.** Every factor is a non-degenerate Gaussian as long as
``g > 0`` and ``σ > 0``, so ``q ≪ p_B`` and the bound is finite for any drift
and score. At ``g = 0`` the steps are Dirac masses and the path KL is
infinite unless the backward map inverts the forward one exactly. For small
``g`` and ``T`` (the released 2-D setup: ``∫g²dt ≈ 0.002``) the forward noise
cannot move the data towards the prior; only the drift can. A *fixed* drift
then leaves ``q(x_N) ≈ p_data`` and the NELBO is at least
``H(p_data) + KL(p_data ‖ N(0, σ²I))`` — the prior scale has to match the
data's (the released code standardises the data to unit variance and uses
``N(0, I)``; we keep the data in its own units, where NLLs are reported, and
set ``σ`` instead).

Gradients come from reparameterisation: ``x_{i+1} = x_i + fΔt + g√Δt ε_i``
with ``ε_i`` fixed, so ``δ_i^F = ε_i`` carries no gradient.
:func:`path_nelbo` back-propagates either through the whole graph
(``backprop="autograd"``, memory O(N·network activations)) or with
:class:`CheckpointedPathNELBO` (``"checkpointed"``: the paper's "stochastic
adjoint"; keeps the ``N + 1`` states only and recomputes one node's networks
at a time on the way back; memory O(N·state + one node's activations)).

References:
    Zhang & Chen, "Diffusion Normalizing Flow", NeurIPS 2021, arXiv:2110.07579,
    Eq. (8)–(11) (discretisation and loss) and §3.3 (stochastic adjoint).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from cnf.registry import Registry

__all__ = [
    "BACKPROP_MODES",
    "DIFFFLOW_SAMPLERS",
    "CheckpointedPathNELBO",
    "Dynamics",
    "PathNELBO",
    "backward_noise",
    "forward_noise",
    "forward_path",
    "gaussian_prior_nll",
    "path_nelbo",
    "run_backward",
]

BACKPROP_MODES: Registry[str] = Registry(
    "DiffFlow backprop mode",
    {"autograd": "through the stored graph", "checkpointed": "recompute each step"},
)
DIFFFLOW_SAMPLERS: Registry[str] = Registry(
    "DiffFlow sampler", {"sde": "backward SDE chain", "ode": "deterministic drift f − ½g²s"}
)


class Dynamics(Protocol):
    """The two fields of a DiffFlow; ``t`` is a 0-dim tensor (one time per batch)."""

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        """``f(x, t)``, same shape as ``x``."""

    def score(self, t: Tensor, x: Tensor) -> Tensor:
        """``s(x, t)``, same shape as ``x``."""


def _sumsq(x: Tensor) -> Tensor:
    """Per-sample ``‖x‖²`` over all but the batch dimension, shape ``(B,)``."""
    return x.flatten(1).pow(2).sum(1)


def gaussian_prior_nll(x: Tensor, std: float) -> Tensor:
    """``−log N(x; 0, std² I)`` per sample, shape ``(B,)``."""
    d = x[0].numel()
    return 0.5 * _sumsq(x) / std**2 + 0.5 * d * math.log(2 * math.pi * std**2)


def forward_noise(x: Tensor, x_next: Tensor, f: Tensor, g: Tensor, dt: Tensor) -> Tensor:
    """``δ^F = (x_{i+1} − x_i − f(x_i,t_i)Δt_i) / (g_i √Δt_i)``."""
    return (x_next - x - f * dt) / (g * dt.sqrt())


def backward_noise(
    x: Tensor, x_next: Tensor, f_next: Tensor, s_next: Tensor, g_next: Tensor, dt: Tensor
) -> Tensor:
    """``δ^B = (x_i − x_{i+1} + [f − g²s](x_{i+1}, t_{i+1}) Δt_i) / (g_{i+1} √Δt_i)`` (docs/methods.md §5)."""
    b_next = f_next - g_next * g_next * s_next
    return (x - x_next + b_next * dt) / (g_next * dt.sqrt())


@dataclass
class PathNELBO:
    """Per-sample pieces of the path NELBO, each ``(B,)`` in nats.

    Attributes:
        nelbo: ``prior + steps + log_g`` — an upper bound on ``−log p_B(x_0)``.
        prior: ``−log N(x_N; 0, σ² I)``.
        steps: ``Σ_i ½‖δ_i^B‖² − ½‖δ_i^F‖²``.
        log_g: ``D·Σ_i log(g_{i+1}/g_i)`` (a constant; 0 when not included or g constant).
    """

    nelbo: Tensor
    prior: Tensor
    steps: Tensor
    log_g: float


def _normalizing_constant(gs: Tensor, dim: int) -> float:
    # Σ_i D·log(g_{i+1}/g_i), written per step as in the loss (it telescopes to D·log(g_N/g_0)).
    return float(dim * torch.log(gs[1:] / gs[:-1]).sum())


def _forward_terms(
    dyn: Dynamics,
    x0: Tensor,
    ts: Tensor,
    gs: Tensor,
    *,
    prior_std: float,
    generator: torch.Generator | None,
    states: list[Tensor] | None = None,
    noises: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample the forward chain from ``x0`` and accumulate ``(prior, steps)`` per sample.

    Evaluates the drift once per node (``f(x_{i+1}, t_{i+1})`` serves both the
    backward noise of step ``i`` and the forward step ``i + 1``) and the score
    once per node after the first: ``N + 1`` drift and ``N`` score calls.
    Differentiable when run with grad enabled; appends the states and
    noises to the given lists if any.
    """
    x = x0
    f = dyn.drift(ts[0], x)
    steps = x0.new_zeros(x0.shape[0])
    if states is not None:
        states.append(x0)
    for i in range(len(ts) - 1):
        dt = ts[i + 1] - ts[i]
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_next = x + f * dt + gs[i] * dt.sqrt() * eps
        f_next = dyn.drift(ts[i + 1], x_next)
        s_next = dyn.score(ts[i + 1], x_next)
        d_b = backward_noise(x, x_next, f_next, s_next, gs[i + 1], dt)
        # −½‖δ^F‖² = −½‖ε‖²: with ε held fixed it carries no gradient.
        steps = steps + 0.5 * (_sumsq(d_b) - _sumsq(eps))
        x, f = x_next, f_next
        if states is not None:
            states.append(x)
        if noises is not None:
            noises.append(eps)
    return gaussian_prior_nll(x, prior_std), steps


class CheckpointedPathNELBO(torch.autograd.Function):
    """Path NELBO per sample whose backward pass recomputes one node at a time.

    Forward: runs the chain without a graph and keeps only the states
    ``x_0..x_N`` (no noise: given ``x_i`` and ``x_{i+1}`` a step is
    determined). Backward, for ``j = N … 0``, rebuilds the networks at node
    ``j`` — ``f(x_j,t_j)`` and ``s(x_j,t_j)`` — and differentiates the local
    scalar::

        S_j = ⟨a_{j+1}, f(x_j,t_j)⟩Δt_j                      (forward step j; j < N)
            + Σ_b w_b ½‖δ^B_{j−1}(x_{j−1}, x_j)‖²             (backward step j−1; j ≥ 1)
            + Σ_b w_b (−log N(x_N; 0, σ²I))                   (prior; j = N)

    where ``a_{j+1} = dL/dx_{j+1}`` is the adjoint carried down and ``w`` the
    incoming per-sample gradient. Then ``a_j = ∂S_j/∂x_j + a_{j+1} + c_j``
    (``x_{j+1}`` depends on ``x_j`` through the identity too; ``c_j = ∂S_{j+1}/∂x_j``
    is δ^B_j's dependence on its first argument, obtained at node ``j + 1``), and
    the parameter gradients are the sum of ``∂S_j/∂θ`` — exactly the chain rule
    of the full graph, reordered node by node, so the result equals plain
    autograd's up to rounding.

    Call through :func:`path_nelbo`; inputs are
    ``(dyn, ts, gs, prior_std, generator, params, x0, *params)``.
    """

    @staticmethod
    def forward(ctx, dyn, ts, gs, prior_std, generator, params, x0, *flat_params):
        states: list[Tensor] = []
        prior, steps = _forward_terms(
            dyn, x0, ts, gs, prior_std=prior_std, generator=generator, states=states
        )
        ctx.dyn, ctx.prior_std, ctx.params = dyn, prior_std, tuple(params)
        ctx.save_for_backward(ts, gs, *states)
        ctx.mark_non_differentiable(prior)
        return prior + steps, prior

    @staticmethod
    def backward(ctx, grad_nelbo, _grad_prior):
        ts, gs, *states = ctx.saved_tensors
        dyn, params = ctx.dyn, ctx.params
        n = len(states) - 1
        w = grad_nelbo
        param_grads: list[Tensor | None] = [None] * len(params)
        a_next: Tensor | None = None  # dL/dx_{j+1}
        c_next: Tensor | None = None  # ∂S_{j+1}/∂x_j (δ^B_j's first argument)
        for j in range(n, -1, -1):
            with torch.enable_grad():
                x_j = states[j].detach().requires_grad_(True)
                inputs = [x_j]
                f_j = dyn.drift(ts[j], x_j)
                local = x_j.new_zeros(())
                if j < n:
                    local = local + (a_next * f_j).sum() * (ts[j + 1] - ts[j])
                if j >= 1:
                    x_prev = states[j - 1].detach().requires_grad_(True)
                    inputs.append(x_prev)
                    s_j = dyn.score(ts[j], x_j)
                    d_b = backward_noise(x_prev, x_j, f_j, s_j, gs[j], ts[j] - ts[j - 1])
                    local = local + (w * 0.5 * _sumsq(d_b)).sum()
                if j == n:
                    local = local + (w * gaussian_prior_nll(x_j, ctx.prior_std)).sum()
                if local.requires_grad:
                    grads = torch.autograd.grad(local, inputs + list(params), allow_unused=True)
                else:  # fixed zero drift at x_0: nothing at this node depends on x_0 or θ
                    grads = (None,) * (len(inputs) + len(params))
            g_x = grads[0] if grads[0] is not None else torch.zeros_like(x_j)
            a_j = g_x.detach()
            if j < n:
                a_j = a_j + a_next + c_next
            c_next = grads[1] if j >= 1 else None  # δ^B is linear in x_{j−1}: never None
            for k, gp in enumerate(grads[len(inputs) :]):
                if gp is not None:
                    param_grads[k] = gp if param_grads[k] is None else param_grads[k] + gp
            a_next = a_j
        return (None, None, None, None, None, None, a_next, *param_grads)


def path_nelbo(
    dyn: Dynamics,
    x0: Tensor,
    ts: Tensor,
    gs: Tensor,
    *,
    prior_std: float = 1.0,
    normalizing_terms: bool = True,
    backprop: str = "autograd",
    params: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> PathNELBO:
    """The path NELBO of a single forward trajectory per sample (module docstring).

    Args:
        dyn: Drift and score.
        x0: Data ``(B, *event_shape)`` at ``t_0``.
        ts: Grid ``(N + 1,)``, increasing, in ``x0``'s dtype.
        gs: ``g(t_i)`` on the grid, ``(N + 1,)``, all > 0.
        prior_std: ``σ`` of the prior ``N(0, σ² I)``.
        normalizing_terms: Include ``D·Σ log(g_{i+1}/g_i)``; False reproduces
            the released code's value (equal when g is constant).
        backprop: ``autograd`` or ``checkpointed`` (see :class:`CheckpointedPathNELBO`).
        params: The tensors ``dyn`` uses whose gradients ``checkpointed`` must
            return (default: ``dyn.parameters()`` when ``dyn`` is a module).
        generator: Source of the forward noise.

    Returns:
        :class:`PathNELBO`, per sample. Run under ``torch.no_grad()`` for
        evaluation (either mode then computes the same forward pass).
    """
    BACKPROP_MODES.check(backprop)
    if backprop == "checkpointed" and torch.is_grad_enabled():
        if params is None:
            params = dyn.parameters() if isinstance(dyn, torch.nn.Module) else ()
        params = [p for p in params if p.requires_grad]
        body, prior = CheckpointedPathNELBO.apply(
            dyn, ts, gs, prior_std, generator, params, x0, *params
        )
        steps = (body - prior).detach()
    else:
        prior, steps = _forward_terms(dyn, x0, ts, gs, prior_std=prior_std, generator=generator)
        body = prior + steps
    log_g = _normalizing_constant(gs, x0[0].numel()) if normalizing_terms else 0.0
    return PathNELBO(nelbo=body + log_g, prior=prior, steps=steps, log_g=log_g)


def forward_path(
    dyn: Dynamics,
    x0: Tensor,
    ts: Tensor,
    gs: Tensor,
    *,
    generator: torch.Generator | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Sample the forward chain: states ``[x_0..x_N]`` and noises ``[δ^F_0..δ^F_{N−1}]``."""
    states: list[Tensor] = []
    noises: list[Tensor] = []
    _forward_terms(
        dyn, x0, ts, gs, prior_std=1.0, generator=generator, states=states, noises=noises
    )
    return states, noises


def run_backward(
    dyn: Dynamics,
    x_n: Tensor,
    ts: Tensor,
    gs: Tensor,
    *,
    sampler: str = "sde",
    noise: Callable[[int], Tensor | None] | Sequence[Tensor | None] | None = None,
) -> Tensor:
    """Run the backward chain from ``x_N`` (at ``t_N``) to ``x_0`` (at ``t_0``).

    ``sde``: ``x_i = x_{i+1} − [f − g²s](x_{i+1}, t_{i+1})Δt_i + g_{i+1}√Δt_i δ_i``
    with ``δ_i = noise(i)`` (or ``noise[i]``); ``None`` means a noise-free step.
    ``ode``: the deterministic variant ``x_i = x_{i+1} − [f − ½g²s]Δt_i``
    (Euler steps of the probability-flow ODE of the continuous model).

    Args:
        noise: Per-step backward noise, indexed by ``i``; ignored by ``ode``.

    Returns:
        ``x_0``, same shape as ``x_n``.
    """
    DIFFFLOW_SAMPLERS.check(sampler)
    get = noise if callable(noise) else (lambda i: None if noise is None else noise[i])
    x = x_n
    for i in range(len(ts) - 2, -1, -1):
        t, g = ts[i + 1], gs[i + 1]
        dt = t - ts[i]
        f, s = dyn.drift(t, x), dyn.score(t, x)
        if sampler == "ode":
            x = x - (f - 0.5 * g * g * s) * dt
            continue
        x = x - (f - g * g * s) * dt
        d = get(i)
        if d is not None:
            x = x + g * dt.sqrt() * d
    return x
