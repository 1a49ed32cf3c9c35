"""Score-based diffusion (VP / sub-VP / VE SDEs) as a :class:`~cnf.models.base.GenerativeModel`.

Data at t = 0, noise at t = 1 (docs/methods.md §4). The model is a score
network ``s_θ(t, y)`` for a fixed linear SDE (:mod:`cnf.diffusion.sde`) on the
preprocessed, flattened data ``y`` (``model.preprocess``; e.g. ``scale 2,
shift −1`` puts [0, 1] images in [−1, 1]), whose log-determinant is added back
so likelihoods are densities of the data as the loader gives them:

* ``training_loss`` — weighted denoising score matching
  (:func:`cnf.diffusion.score.dsm_loss`); with likelihood weighting the
  statistics include the batch NELBO estimate in nats;
* ``evaluate`` — the NLL of the probability-flow ODE through the library's
  one likelihood path (:func:`cnf.diffusion.likelihood.probability_flow_nll`)
  **and** the NELBO of the SDE model (:func:`cnf.diffusion.score.nelbo`);
* ``sample`` — any sampler of :data:`cnf.diffusion.samplers.SCORE_SAMPLERS`.

Settings (:class:`ScoreSettings`): the ODE solver and trace estimator of the
likelihood (and of the ``ode`` sampler), the sampler and its options, the
NELBO's time samples and the [0, ε] correction.

References:
    Song et al., "Score-based generative modeling through SDEs", ICLR 2021.
    Song, Durkan, Murray & Ermon, "Maximum likelihood training of score-based
    diffusion models", NeurIPS 2021.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cnf.diffusion.likelihood import CORRECTIONS, probability_flow_nll
from cnf.diffusion.nets import IMAGE_NETS, SCORE_NETS, ScoreNetwork
from cnf.diffusion.ode_samplers import (
    EDM_SIGMA_MAX,
    EDM_SIGMA_MIN,
    TIME_GRIDS,
    few_step_settings,
    karras_range,
    route_sampler_keys,
)
from cnf.diffusion.samplers import SCORE_SAMPLERS, SDE_METHODS, SamplerOptions
from cnf.diffusion.score import decoder_constant, dsm_loss, nelbo, prior_kl
from cnf.diffusion.sde import SDES, LinearSDE
from cnf.divergence import DivergenceConfig
from cnf.flows.preprocess import Preprocess
from cnf.models.base import EvalOutput, GenerativeModel, LossOutput, SampleOutput, register_family
from cnf.schema import ScoreSchema, builder_options
from cnf.solve import SolverConfig

__all__ = [
    "ScoreModel",
    "ScoreSettings",
    "build_score",
    "build_score_network",
    "image_backbone",
]


@dataclass(frozen=True)
class ScoreSettings:
    """Evaluation and sampling settings of a score model.

    Attributes:
        solver: ODE solver of the probability-flow likelihood and of the ``ode`` sampler.
        divergence: Trace estimator of the likelihood.
        sampler: One of :data:`~cnf.diffusion.samplers.SCORE_SAMPLERS`.
        steps: Steps of the SDE samplers (``em``, ``pc``, ``sdeint``) and of
            the few-step ODE samplers (``euler``, ``heun``).
        grid: Time grid of ``euler`` and ``heun``: ``karras`` (EDM, ρ = 7) | ``uniform``.
        sigma_min, sigma_max: Noise-level range of the ``karras`` grid (EDM's
            0.002 and 80 by default), clamped to the SDE's; below σ(1) the
            sampler starts at ``σ_max z``, as EDM's does.
        snr, corrector_steps: The ``pc`` sampler's Langevin corrector.
        sde_method: The ``sdeint`` sampler's torchsde method.
        nelbo_samples: Time samples per point of the NELBO (0: no NELBO).
        correction: The [0, ε] handling of the likelihood, ``truncate`` | ``perturb``.
    """

    ALIASES = {"method": ("solver.name",)}
    # Fields that change samples only, never evaluate()'s numbers (cnf.cost reuses evaluations).
    SAMPLING_ONLY = frozenset(
        {
            "sampler",
            "steps",
            "grid",
            "sigma_min",
            "sigma_max",
            "snr",
            "corrector_steps",
            "sde_method",
        }
    )

    solver: SolverConfig = field(default_factory=SolverConfig)
    divergence: DivergenceConfig = field(default_factory=lambda: DivergenceConfig("exact"))
    sampler: str = "ode"
    steps: int = 500
    snr: float = 0.16
    corrector_steps: int = 1
    sde_method: str = "euler"
    nelbo_samples: int = 8
    correction: str = "truncate"
    grid: str = "karras"
    sigma_min: float = EDM_SIGMA_MIN
    sigma_max: float = EDM_SIGMA_MAX

    def __post_init__(self) -> None:
        SCORE_SAMPLERS.check(self.sampler, key="sampler")
        TIME_GRIDS.check(self.grid, key="grid")
        karras_range(self.sigma_min, self.sigma_max, 0.0, math.inf)  # checks 0 < min < max
        SDE_METHODS.check(self.sde_method, key="sde_method")
        CORRECTIONS.check(self.correction, key="correction")
        if self.nelbo_samples < 0:
            raise ValueError(f"nelbo_samples must be >= 0, got {self.nelbo_samples}")

    def route(self, changes: dict[str, Any]) -> dict[str, Any]:
        """ODE keys without a sampler select the ``ode`` sampler; its ``steps`` are the solver's."""
        return route_sampler_keys(changes, self.sampler)

    def sampler_options(self) -> SamplerOptions:
        return SamplerOptions(
            steps=self.steps,
            solver=self.solver,
            snr=self.snr,
            corrector_steps=self.corrector_steps,
            sde_method=self.sde_method,
            grid=self.grid,
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
        )


class ScoreModel(GenerativeModel):
    """A score network for a linear SDE (data at t = 0, noise at t = 1).

    Args:
        score: The score function (a :class:`~cnf.diffusion.nets.ScoreNetwork`).
        event_shape: Shape of one data sample.
        weighting: Training weighting (:data:`cnf.diffusion.score.WEIGHTINGS`).
        settings: Default evaluation and sampling settings.
        preprocess: The data bijection applied first (default: identity).
        nelbo_importance: Importance-sample the NELBO's times (default). ``False``
            draws them uniformly; the weight ``g²/σ² ~ 1/t`` would then give the
            estimate a variance ~ 1/ε, so :func:`~cnf.diffusion.score.nelbo`
            integrates the part that does not vanish at t = 0 exactly, which
            leaves a finite variance comparable to importance sampling's.

    Example:
        >>> from cnf.diffusion.nets import score_mlp
        >>> from cnf.diffusion.sde import VPSDE
        >>> model = ScoreModel(ScoreNetwork(score_mlp(2, hidden_dims=(32,)), VPSDE()), (2,))
        >>> out = model.training_loss(torch.randn(8, 2))
        >>> x, stats = model.sample(4, model.with_settings(sampler="em", steps=10))
    """

    Settings = ScoreSettings

    def __init__(
        self,
        score: ScoreNetwork,
        event_shape: tuple[int, ...],
        *,
        weighting: str = "likelihood_is",
        settings: ScoreSettings | None = None,
        preprocess: Preprocess | None = None,
        nelbo_importance: bool = True,
    ):
        super().__init__()
        self.score = score
        self.event_shape = tuple(event_shape)
        self.dim = int(torch.Size(self.event_shape).numel())
        self.weighting = weighting
        self.settings = settings or ScoreSettings()
        self.preprocess = preprocess or Preprocess()
        self.nelbo_importance = nelbo_importance

    @property
    def sde(self) -> LinearSDE:
        return self.score.sde

    # ------------------------------------------------------------- spaces
    def to_model(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data ``(B, *event)`` → model space ``(B, D)`` and the preprocessing log-det ``(B,)``."""
        y, logdet = self.preprocess(x)
        return y.reshape(y.shape[0], self.dim), logdet

    def to_data(self, y: Tensor) -> Tensor:
        return self.preprocess.inverse(y.reshape(y.shape[0], *self.event_shape))

    # ------------------------------------------------------------- training
    def training_loss(self, x: Tensor) -> LossOutput:
        y, logdet = self.to_model(x)
        per = dsm_loss(self.score, self.sde, y, weighting=self.weighting)
        loss = per.mean()
        stats = {"dsm": float(loss.detach())}
        if self.weighting != "variance":
            # The DSM term is the NELBO's score-matching term: add the closed-form rest.
            with torch.no_grad():
                bound = per + prior_kl(self.sde, y) + decoder_constant(self.sde, self.dim)
                stats["nelbo"] = float((bound - logdet).mean())
        return LossOutput(loss, stats)

    # ------------------------------------------------------------- evaluation
    def latent_terms(self, y: Tensor, settings: ScoreSettings) -> EvalOutput:
        """Probability-flow NLL and SDE NELBO of model-space points ``y`` ``(B, D)``, in nats of ``y``.

        With a Hutchinson trace the NLL comes once per probe as well
        (``nll_probes``, ``(B, K)``), so the estimator's standard error can be
        reported apart from the test set's.
        """
        nll, info = probability_flow_nll(
            self.score,
            self.sde,
            y,
            solver=settings.solver,
            divergence=settings.divergence.build(self.dim, per_probe=True),
            correction=settings.correction,
        )
        bound = None
        if settings.nelbo_samples > 0:
            bound = nelbo(
                self.score,
                self.sde,
                y,
                num_t=settings.nelbo_samples,
                importance=self.nelbo_importance,
                chunk=y.shape[0],
            )
        return EvalOutput(
            nll=nll,
            nelbo=bound,
            stats={"nfe": float(info["nfe"])},
            nll_probes=info.get("nll_probes"),
        )

    def _evaluate(self, x: Tensor, s: ScoreSettings) -> EvalOutput:
        """Probability-flow NLL and SDE NELBO per sample, in nats of ``x``."""
        y, logdet = self.to_model(x)
        return self.latent_terms(y, s).minus_logdet(logdet)

    # ------------------------------------------------------------- sampling
    def sample_latent(
        self,
        n: int,
        settings: ScoreSettings,
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Model-space samples ``(n, D)`` from ``x_1 ~ τ·π`` by the chosen sampler."""
        x_T = self.sde.prior.sample(
            (n, self.dim), generator=generator, dtype=self.dtype, device=self.device
        )
        if temperature != 1.0:
            x_T = temperature * x_T
        sampler = SCORE_SAMPLERS[settings.sampler]
        y, info = sampler(
            self.score, self.sde, x_T, settings.sampler_options(), generator=generator
        )
        return y, {"nfe": float(info["nfe"])}

    def _sample(self, n: int, s: ScoreSettings, generator: torch.Generator | None) -> SampleOutput:
        y, stats = self.sample_latent(n, s, generator=generator)
        return SampleOutput(self.to_data(y), stats)

    def default_cost_grid(self) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = [
            {"sampler": "ode", "method": "dopri5", "rtol": tol, "atol": tol}
            for tol in (1e-2, 1e-3, 1e-5)
        ]
        grid += [{"sampler": "ode", "method": "rk4", "steps": s} for s in (5, 20)]
        grid += [{"sampler": "em", "steps": s} for s in (10, 100, 1000)]
        grid += [{"sampler": "pc", "steps": s} for s in (10, 100)]
        return grid + few_step_settings()


# ------------------------------------------------------------------ config
def default_embed_scale(conditioning: str, embedding: str) -> float:
    """Embedding frequency scale suited to the range of the conditioning input.

    ``t ∈ [0, 1]`` needs high frequencies to tell t = 1e-4 from 1e-3 (DDPM's
    1000); ``log σ ∈ [−6, 5]`` needs only about one radian per unit, which
    keeps the field smooth in t for the ODE solver (EDM's choice).
    """
    if conditioning == "time":
        return 1000.0 if embedding == "sinusoidal" else 16.0
    return 1.0 if embedding == "sinusoidal" else 0.2


def image_shape_of(event_shape: tuple[int, ...], *, key: str) -> tuple[int, int, int]:
    """The ``(C, H, W)`` a convolutional network sees: the data's, or a square grey image."""
    if len(event_shape) == 3:
        return tuple(event_shape)  # type: ignore[return-value]
    d = math.prod(event_shape)
    side = math.isqrt(d)
    if side * side != d:
        raise ValueError(
            f"{key}: a convolutional network needs image data; event shape {event_shape} "
            "is not a square grey image (set data.flatten=false)"
        )
    return (1, side, side)


def image_backbone(name: str, *, key: str) -> Callable[..., torch.nn.Module]:
    """``build(event_shape, **options)``: the image backbone ``name`` of :data:`SCORE_NETS`.

    For families whose networks take ``(t, x)`` on data of any layout (DiffFlow's
    drift and score, flow matching's field): the network sees the data's
    ``(C, H, W)`` (:func:`image_shape_of`; ``key`` names the config key in errors).
    """
    builder = SCORE_NETS[name]

    @functools.wraps(builder)
    def build(event_shape: tuple[int, ...], **options: Any) -> torch.nn.Module:
        return builder(image_shape_of(tuple(event_shape), key=key), **options)

    return build


def build_score_network(
    section: Any, event_shape: tuple[int, ...], *, conditioning: str, key: str
) -> torch.nn.Module:
    """A backbone of :data:`~cnf.diffusion.nets.SCORE_NETS` from its typed ``{name, options}`` section."""
    options = builder_options(section)
    if "embed_scale" in options and options["embed_scale"] is None:
        options["embed_scale"] = default_embed_scale(
            conditioning, options.get("time_embedding", "sinusoidal")
        )
    if section.name in IMAGE_NETS:
        return SCORE_NETS[section.name](image_shape_of(event_shape, key=key), **options)
    return SCORE_NETS[section.name](math.prod(event_shape), **options)


def score_settings(cfg: ScoreSchema, eval_cfg: Any) -> ScoreSettings:
    """The default settings of a score (or INDM) model from its config and ``eval:`` section."""
    # model.sampler.{steps, snr, ...} are the settings of the same names.
    options = ("steps", "snr", "corrector_steps", "sde_method", "grid", "sigma_min", "sigma_max")
    return ScoreSettings(
        solver=eval_cfg.solver.build(),
        divergence=eval_cfg.divergence.build(),
        sampler=cfg.sampler.name,
        **{k: getattr(cfg.sampler, k) for k in options},
        nelbo_samples=cfg.nelbo_samples,
        correction=cfg.nll_correction,
    )


def build_score(
    cfg: ScoreSchema,
    event_shape: tuple[int, ...],
    settings: ScoreSettings,
    *,
    preprocess: Preprocess | None = None,
) -> ScoreModel:
    """Build a score model from its typed ``model:`` section (``preprocess`` overrides the section's)."""
    sde = SDES[cfg.sde.name](**builder_options(cfg.sde))
    net = build_score_network(
        cfg.net, tuple(event_shape), conditioning=cfg.conditioning, key="model.net"
    )
    return ScoreModel(
        ScoreNetwork(net, sde, cfg.parameterization, conditioning=cfg.conditioning),
        event_shape,
        weighting=cfg.weighting,
        settings=settings,
        preprocess=cfg.preprocess.build() if preprocess is None else preprocess,
        nelbo_importance=cfg.nelbo_importance,
    )


@register_family("score", ScoreSchema)
def _build(cfg: ScoreSchema, event_shape: tuple[int, ...], eval_cfg: Any) -> ScoreModel:
    return build_score(cfg, event_shape, score_settings(cfg, eval_cfg))
