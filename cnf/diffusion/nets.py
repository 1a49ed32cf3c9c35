"""Score networks: time embeddings, a time-conditioned MLP, output parameterisations.

Data at t = 0, noise at t = 1 (docs/methods.md §1, §4). A backbone ``net(t, x)``
(:func:`score_mlp` for vectors, :class:`cnf.diffusion.unet.UNet` and the
published networks of :mod:`cnf.diffusion.ncsnpp` for images; :data:`SCORE_NETS`)
predicts one of three targets, converted to the score ``s(t, x) ≈ ∇log p_t(x)``
with the kernel ``p_{0t}(x_t | x_0) = N(m x_0, σ² I)`` of the SDE:

* ``score`` — the network output *is* the score: ``s = out``;
* ``noise`` — ε-prediction (DDPM): ``x_t = m x_0 + σ ε``, ``s = −ε̂/σ``;
* ``data``  — x₀-prediction: ``s = (m x̂₀ − x)/σ²``.

All three are exact reparameterisations of the same function (Tweedie:
``E[x_0 | x_t] = (x_t + σ² ∇log p_t)/m``, ``E[ε | x_t] = −σ ∇log p_t``);
they differ in conditioning. :func:`output_to_score` and
:func:`score_to_output` convert between them; :class:`ScoreNetwork` wraps a
backbone and an SDE into the score function the losses, likelihoods and
samplers call.

References:
    Ho, Jain & Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020.
    Song et al., "Score-based generative modeling through SDEs", ICLR 2021.
    Tancik et al., "Fourier features let networks learn high frequency functions", NeurIPS 2020.
    Kingma et al., "Variational diffusion models", NeurIPS 2021.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from cnf.diffusion.sde import LinearSDE, expand_as
from cnf.nets import TimeMLP
from cnf.registry import Registry

__all__ = [
    "CONDITIONINGS",
    "PARAMETERIZATIONS",
    "TIME_EMBEDDINGS",
    "GaussianFourierEmbedding",
    "SCORE_NETS",
    "ScoreNetwork",
    "SinusoidalEmbedding",
    "build_time_embedding",
    "output_to_score",
    "score_to_output",
]

PARAMETERIZATIONS: Registry[str] = Registry(
    "parameterization", {"score": "s = out", "noise": "s = −ε̂/σ", "data": "s = (m x̂₀ − x)/σ²"}
)


def _per_sample_time(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as a ``(B,)`` tensor in ``x``'s dtype (a scalar is broadcast to the batch)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]) if t.dim() == 0 else t.reshape(x.shape[0])


# --------------------------------------------------------------- embeddings
class SinusoidalEmbedding(nn.Module):
    """Transformer-style ``[sin(ω_k s t), cos(ω_k s t)]`` with geometric ``ω_k``.

    Args:
        dim: Output width (even).
        scale: The highest angular frequency; 1000 with t as input is DDPM's
            embedding of its step index. Frequencies are geometric in
            ``[scale/max_period, scale]``.
        max_period: Ratio of the highest to the lowest frequency.
    """

    def __init__(self, dim: int, *, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs * scale, persistent=False)
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        """``t`` ``(B,)`` → ``(B, dim)``."""
        arg = t.reshape(-1, 1) * self.freqs.to(t.dtype)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features ``[sin(2π w t), cos(2π w t)]``, ``w ~ N(0, scale²)`` fixed.

    The frequencies are a (saved, untrained) buffer, so a checkpoint
    reproduces the network exactly.
    """

    def __init__(self, dim: int, *, scale: float = 16.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        self.register_buffer("w", torch.randn(dim // 2) * scale)
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        arg = 2 * math.pi * t.reshape(-1, 1) * self.w.to(t.dtype)
        return torch.cat([arg.sin(), arg.cos()], dim=1)


class IdentityEmbedding(nn.Module):
    """Raw time as a single feature."""

    def __init__(self, dim: int = 1, **_: float):
        super().__init__()
        self.dim = 1

    def forward(self, t: Tensor) -> Tensor:
        return t.reshape(-1, 1)


TIME_EMBEDDINGS: Registry[Callable[..., nn.Module]] = Registry(
    "time embedding",
    {
        "sinusoidal": SinusoidalEmbedding,
        "fourier": GaussianFourierEmbedding,
        "none": IdentityEmbedding,
    },
)


def build_time_embedding(name: str, dim: int, *, scale: float | None = None) -> nn.Module:
    """Registry lookup: ``sinusoidal`` | ``fourier`` | ``none`` (the raw input).

    ``scale``: the highest angular frequency of ``sinusoidal`` (default 1000) or
    the frequency std of ``fourier`` (default 16).
    """
    cls = TIME_EMBEDDINGS[name]
    if name == "none" or scale is None:
        return cls(dim)
    return cls(dim, scale=scale)


# ------------------------------------------------------------------ backbones
def score_mlp(
    dim: int,
    *,
    hidden_dims: Sequence[int] = (128, 128, 128),
    activation: str = "swish",
    time_embedding: str = "sinusoidal",
    embed_dim: int = 32,
    embed_scale: float | None = None,
) -> TimeMLP:
    """The score models' MLP backbone on flat vectors ``(B, D)``.

    ``h_{k+1} = act(W_k h_k + U_k e(c) + b_k)``, output ``W_L h_L + b_L``: a
    :class:`cnf.nets.TimeMLP` with ``add`` layers and the embedding ``e`` of
    the noise-level input shared by the layers. Every layer is affine in
    ``h`` with an additive time term, so the Jacobian propagates in forward
    mode — the exact divergence of the probability-flow ODE uses it.
    """
    return TimeMLP(
        dim,
        tuple(hidden_dims),
        layer="add",
        out_layer="ignore",
        activation=activation,
        time_embedding=time_embedding,
        embed_dim=embed_dim,
        embed_scale=embed_scale,
    )


# name → builder(shape, **options) of a backbone (c, x) -> output. ``image`` backbones
# take the image shape (C, H, W); the others the flat dimension D.
SCORE_NETS: Registry[Callable[..., nn.Module]] = Registry("score network", {"mlp": score_mlp})
IMAGE_NETS: set[str] = set()


def register_image_net(name: str, builder: Callable[..., nn.Module]) -> None:
    """Add a convolutional backbone ``builder(image_shape, **options)`` to :data:`SCORE_NETS`."""
    SCORE_NETS.register(name, builder)
    IMAGE_NETS.add(name)


# ---------------------------------------------------------- parameterisation
def _check_parameterization(name: str) -> None:
    PARAMETERIZATIONS.check(name)


def _output_coefficients(
    x: Tensor, t: Tensor, sde: LinearSDE, parameterization: str
) -> tuple[Tensor | float, Tensor | float]:
    """``(a, b)`` with ``output = a·s + b·x`` for the network kind.

    score: ``(1, 0)``; noise ``ε̂ = −σ s``: ``(−σ, 0)``; data ``x̂₀ = (x + σ² s)/m``:
    ``(σ²/m, 1/m)`` (Tweedie), with ``m, σ`` the kernel's mean factor and std at ``t``.
    """
    _check_parameterization(parameterization)
    if parameterization == "score":
        return 1.0, 0.0
    m, s = (expand_as(v, x) for v in sde.marginal(t))
    if parameterization == "noise":
        return -s, 0.0
    return s.pow(2) / m, 1.0 / m


def output_to_score(
    output: Tensor, x: Tensor, t: Tensor, sde: LinearSDE, parameterization: str
) -> Tensor:
    """Convert a network output to the score ``s(t, x)``.

    Args:
        output: Network prediction ``(B, *event)`` (score, ε̂ or x̂₀).
        x: The noisy input ``x_t`` ``(B, *event)``.
        t: Times, shape ``()`` or ``(B,)``.
    """
    a, b = _output_coefficients(x, t, sde, parameterization)
    return output if parameterization == "score" else (output - b * x) / a


def score_to_output(
    score: Tensor, x: Tensor, t: Tensor, sde: LinearSDE, parameterization: str
) -> Tensor:
    """Inverse of :func:`output_to_score`: the target a network of each kind should output."""
    a, b = _output_coefficients(x, t, sde, parameterization)
    return score if parameterization == "score" else a * score + b * x


CONDITIONINGS: Registry[str] = Registry(
    "noise-level conditioning", {"time": "c = t", "log_sigma": "c = log(σ(t)/m(t))"}
)


class ScoreNetwork(nn.Module):
    """The score function ``s(t, x)`` of a backbone in a given parameterisation.

    Args:
        net: Backbone ``(c, x) -> output`` with the noise-level input ``c`` of shape ``(B,)``.
        sde: The forward SDE (gives ``m(t)``, ``σ(t)`` for the conversions).
        parameterization: ``score`` | ``noise`` | ``data``.
        conditioning: What the backbone sees as ``c``: ``time`` (t itself) or
            ``log_sigma`` (``log(σ(t)/m(t))``, minus half the log signal-to-noise
            ratio; VDM/EDM-style). The latter spreads t ∈ [ε, 1], where σ spans
            3.5 decades for VP, evenly over the input (about [−5.8, 5.0] for VP),
            so smooth low-frequency embeddings resolve small noise levels — and
            the probability-flow ODE stays cheap for adaptive solvers.

    ``forward(t, x)`` accepts a scalar or ``(B,)`` ``t``. If the backbone has
    ``forward_with_jacobian``, so does this module (``score_with_jacobian``),
    since each conversion is affine in the output with time-only factors.
    """

    def __init__(
        self,
        net: nn.Module,
        sde: LinearSDE,
        parameterization: str = "noise",
        *,
        conditioning: str = "time",
    ):
        super().__init__()
        _check_parameterization(parameterization)
        CONDITIONINGS.check(conditioning)
        self.net = net
        self.sde = sde
        self.parameterization = parameterization
        self.conditioning = conditioning

    def noise_input(self, t: Tensor) -> Tensor:
        """The backbone's conditioning input ``c(t)``, shape ``(B,)``."""
        if self.conditioning == "time":
            return t
        m, s = self.sde.marginal(t)
        return torch.log(s / m)

    @property
    def has_jacobian(self) -> bool:
        return hasattr(self.net, "forward_with_jacobian")

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        t = _per_sample_time(t, x)
        out = self.net(self.noise_input(t), x)
        return output_to_score(out, x, t, self.sde, self.parameterization)

    def output(self, t: Tensor | float, x: Tensor) -> Tensor:
        """The raw backbone prediction (score, ε̂ or x̂₀)."""
        return self.net(self.noise_input(_per_sample_time(t, x)), x)

    def score_with_jacobian(self, t: Tensor | float, x: Tensor) -> tuple[Tensor, Tensor]:
        """Score and its Jacobian ``J[i, b, j] = ∂s_j/∂x_i`` for vector data ``(B, D)``."""
        t = _per_sample_time(t, x)
        out, jac = self.net.forward_with_jacobian(self.noise_input(t), x)
        score = output_to_score(out, x, t, self.sde, self.parameterization)
        if self.parameterization == "score":
            return score, jac
        m, s = self.sde.marginal(t)
        if self.parameterization == "noise":
            return score, -jac / s.reshape(1, -1, 1)
        # s = (m x̂₀ − x)/σ²: J_s = (m J_out − I)/σ².
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device).unsqueeze(1)
        jac = (m.reshape(1, -1, 1) * jac - eye) / s.pow(2).reshape(1, -1, 1)
        return score, jac
