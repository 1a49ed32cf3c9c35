"""INDM: implicit nonlinear diffusion — a linear diffusion in a flow-mapped latent space.

Data at t = 0, noise at t = 1 (docs/methods.md §1, §6). An invertible flow
``h_φ`` (any flow of :data:`cnf.flows.registry.FLOWS`, or ``identity``) maps
data ``x`` to a latent ``z = h_φ(x)``; a linear VP / sub-VP / VE SDE runs on
``z`` with a score network ``s_θ(z, t)`` there. By Itô's lemma the data-space
process ``x_t = h_φ^{-1}(z_t)`` is a nonlinear diffusion (Kim et al. 2022, §3).
Change of variables splits every likelihood quantity:

    NELBO(x) = −log|det ∂h_φ/∂x| + NELBO_latent(h_φ(x))
    NLL(x)   = −log|det ∂h_φ/∂x| + NLL_latent(h_φ(x))

with ``NELBO_latent`` the NELBO of the SDE model of :mod:`cnf.diffusion.score`
— prior KL + likelihood-weighted DSM + decoder constant, where the prior KL
depends on φ through z and so is part of the training loss — and
``NLL_latent`` the probability-flow ODE NLL of
:mod:`cnf.diffusion.likelihood` with the same [0, ε] handling as the score
model (``nll_correction``).

* ``training_loss`` — the per-sample NELBO in nats, averaged: flow and score
  network are trained jointly by one backward pass; :meth:`INDM.param_groups`
  gives the flow its own learning rate (Adam's state is per parameter, so one
  Adam with two groups is two independent optimisers sharing a schedule);
* ``evaluate`` — ``nll`` (probability-flow ODE) and ``nelbo`` (SDE model),
  both in nats of ``x``; residual-flow log-dets at evaluation follow
  ``settings.logdet`` (``model.eval_logdet``: exact up to ``exact_max_dim``
  dimensions, else a ``series_terms`` power series, or the flow's own
  unbiased roulette estimator; ``stats["flow_logdet_exact"]``). With the
  released code's global-latent flow (``model.flow.name: resflow_global``,
  :mod:`cnf.flows.global_latent`) the flow term is the single-sample
  variational bound ``log|det ∂h_φ/∂x| + log p(h) − log q(h | x)`` instead
  of the log-det, so both numbers are upper bounds and ``nll_is_bound`` says so;
* ``sample`` — latent reverse SDE (``em``), predictor–corrector (``pc``) or
  probability-flow ODE (``ode``) from ``z_1 ~ τ·π`` (τ the temperature),
  then ``x = h_φ^{-1}(z)``.

With the identity flow every step is literally the score model's computation
(:class:`cnf.models.score.ScoreModel`, same random draws in the same order):
the training loss equals the score model's reported ``nelbo`` statistic (its
DSM loss plus θ-independent closed forms, so the gradients agree) and the NLL
and NELBO are identical (``tests/test_indm.py``).

The preprocessing bijection (``model.preprocess``) is applied before the
flow, with its log-det added back.

References:
    Kim, Na, Kwon, Kim, Kang & Moon, "Maximum likelihood training of implicit
    nonlinear diffusion models", NeurIPS 2022, arXiv:2205.13699.
    Song, Durkan, Murray & Ermon, "Maximum likelihood training of score-based
    diffusion models", NeurIPS 2021.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from cnf.diffusion.score import decoder_constant, dsm_loss, prior_kl
from cnf.diffusion.sde import LinearSDE
from cnf.flows.base import DEFAULT_SETTINGS, Flow, FlowSettings
from cnf.flows.global_latent import is_variational
from cnf.flows.preprocess import Preprocess
from cnf.models.base import EvalOutput, GenerativeModel, LossOutput, SampleOutput, register_family
from cnf.models.flow import LogDetChoice, build_named_flow
from cnf.models.score import ScoreModel, ScoreSettings, build_score, score_settings
from cnf.schema import INDMSchema

__all__ = ["INDM", "INDMSettings", "build_indm"]


@dataclass(frozen=True)
class INDMSettings(ScoreSettings):
    """The latent score model's settings, the sampling temperature and the flow's evaluation log-det."""

    temperature: float = 1.0
    logdet: LogDetChoice = field(default_factory=LogDetChoice)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def latent(self) -> ScoreSettings:
        """The part the latent score model reads."""
        return ScoreSettings(**{f.name: getattr(self, f.name) for f in fields(ScoreSettings)})


class INDM(GenerativeModel):
    """Implicit nonlinear diffusion: flow ``h_φ`` + latent linear-SDE score model.

    Args:
        flow: Flow ``h_φ`` mapping ``(B, *event)`` to a latent of the same shape.
        latent: The latent score model (a :class:`ScoreModel` on the latent
            event shape with identity preprocessing); its weighting must be
            ``likelihood`` or ``likelihood_is`` (the loss is a NELBO).
        event_shape: Shape of one data sample.
        settings: Default evaluation and sampling settings.
        preprocess: The data bijection applied before the flow.
        flow_lr_scale: Flow learning rate relative to the base learning rate.

    Example:
        >>> from cnf.config import load_config  # doctest: +SKIP
        >>> model = build_model(load_config("configs/indm/toy.yaml"), (2,))  # doctest: +SKIP
        >>> x, stats = model.sample(4, model.with_settings(sampler="em", steps=10))  # doctest: +SKIP
    """

    Settings = INDMSettings

    def __init__(
        self,
        flow: Flow,
        latent: ScoreModel,
        event_shape: tuple[int, ...],
        *,
        settings: INDMSettings | None = None,
        preprocess: Preprocess | None = None,
        flow_lr_scale: float = 1.0,
    ):
        super().__init__()
        if latent.weighting not in ("likelihood", "likelihood_is"):
            raise ValueError(
                f"INDM trains on the NELBO: weighting must be likelihood or likelihood_is, "
                f"got '{latent.weighting}'"
            )
        if not latent.preprocess.is_identity:
            raise ValueError(
                "the latent score model must not preprocess (INDM does, before the flow)"
            )
        self.flow = flow
        self.latent = latent
        self.event_shape = tuple(event_shape)
        self.dim = int(torch.Size(self.event_shape).numel())
        self.settings = settings or INDMSettings()
        self.preprocess = preprocess or Preprocess()
        self.flow_lr_scale = float(flow_lr_scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # Before the restructure the latent score model was called ``diffusion``.
        for k in [k for k in state_dict if k.startswith(prefix + "diffusion.")]:
            state_dict[prefix + "latent." + k[len(prefix) + len("diffusion.") :]] = state_dict.pop(
                k
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def sde(self) -> LinearSDE:
        return self.latent.sde

    # ------------------------------------------------------------- optimiser
    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: the flow at ``flow_lr_scale × base_lr``, the score network at ``base_lr``."""
        groups = []
        flow_params = list(self.flow.parameters())
        if flow_params:
            groups.append(
                {"params": flow_params, "lr": base_lr * self.flow_lr_scale, "name": "flow"}
            )
        groups.append({"params": list(self.latent.parameters()), "lr": base_lr, "name": "score"})
        return groups

    # ------------------------------------------------------------- spaces
    def encode(self, x: Tensor, settings: FlowSettings = DEFAULT_SETTINGS) -> tuple[Tensor, Tensor]:
        """``z = h_φ(preprocess(x))`` and the log-det of both maps per sample."""
        y, logdet_pre = self.preprocess(x)
        out = self.flow.transform(y, settings)
        return out.z, out.logdet + logdet_pre

    def decode(self, z: Tensor) -> Tensor:
        """``x = preprocess^{-1}(h_φ^{-1}(z))`` for latents ``(B, *event)``."""
        return self.preprocess.inverse(self.flow.inverse(z))

    # ------------------------------------------------------------- training
    def training_loss(self, x: Tensor) -> LossOutput:
        """Mean per-sample NELBO in nats: −logdet + latent DSM (g² weighting) + prior KL + C."""
        z, logdet = self.encode(x)
        zf = z.reshape(z.shape[0], self.latent.dim)
        dsm = dsm_loss(self.latent.score, self.sde, zf, weighting=self.latent.weighting)
        prior = prior_kl(self.sde, zf)  # depends on φ through z: it stays in the loss
        latent = dsm + prior + decoder_constant(self.sde, self.latent.dim)
        loss = (latent - logdet).mean()
        stats = {
            "dsm": float(dsm.detach().mean()),
            "prior_kl": float(prior.detach().mean()),
            "flow_logdet": float(logdet.detach().mean()),
            "nelbo": float(loss.detach()),
        }
        return LossOutput(loss, stats)

    # ------------------------------------------------------------- evaluation
    def _evaluate(self, x: Tensor, s: INDMSettings) -> EvalOutput:
        """NLL (probability-flow ODE) and NELBO (SDE model) per sample, in nats of ``x``.

        Both are ``−log|det ∂h/∂x|`` plus the latent quantity of the score model.
        """
        estimator, exact = s.logdet.estimator(self.flow, self.dim)
        z, logdet = self.encode(x, FlowSettings(logdet=estimator))
        zf = z.reshape(z.shape[0], self.latent.dim)
        latent = self.latent.latent_terms(zf, s.latent())
        if not exact:
            # The per-probe NLLs carry the latent ODE's probe noise alone: only
            # when the flow's log-det is exact is that all of the estimator's noise.
            latent = replace(latent, nll_probes=None)
        stats = {
            **latent.stats,
            "flow_logdet": float(logdet.mean()),
            "flow_logdet_exact": 1.0 if exact else 0.0,
        }
        return replace(
            latent.minus_logdet(logdet), stats=stats, nll_is_bound=is_variational(self.flow)
        )

    # ------------------------------------------------------------- sampling
    def _sample(self, n: int, s: INDMSettings, generator: torch.Generator | None) -> SampleOutput:
        """Latent reverse SDE / PC / probability-flow ODE from ``τ·z_1``, then the inverse flow."""
        z0, stats = self.latent.sample_latent(
            n, s.latent(), temperature=s.temperature, generator=generator
        )
        x = self.decode(z0.reshape(n, *self.event_shape))
        return SampleOutput(x, stats)

    def default_cost_grid(self) -> list[dict[str, Any]]:
        return self.latent.default_cost_grid()


# ------------------------------------------------------------------ config
@register_family("indm", INDMSchema)
def build_indm(cfg: INDMSchema, event_shape: tuple[int, ...], eval_cfg: Any) -> INDM:
    """Build INDM from its typed ``model:`` section and the run's ``eval:`` section."""
    base = score_settings(cfg, eval_cfg)
    settings = INDMSettings(
        **{f.name: getattr(base, f.name) for f in fields(ScoreSettings)},
        temperature=cfg.temperature,
        logdet=LogDetChoice.from_schema(cfg.eval_logdet),
    )
    # The preprocessing is INDM's (before the flow); the latent model does not preprocess.
    latent = build_score(cfg, event_shape, base, preprocess=Preprocess())
    return INDM(
        build_named_flow(cfg.flow, event_shape),
        latent,
        event_shape,
        settings=settings,
        preprocess=cfg.preprocess.build(),
        flow_lr_scale=cfg.flow_lr_scale,
    )
