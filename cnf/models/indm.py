"""INDM: implicit nonlinear diffusion — a linear diffusion in a flow-mapped latent space.

Data at t = 0, noise at t = 1 (DESIGN.md §1, §1.5). An invertible flow
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
  both in nats of ``x``; residual-flow log-dets at evaluation are exact up to
  ``flow_logdet_exact_max_dim`` dimensions, else a ``flow_logdet_series_terms``
  power series, or the flow's own unbiased roulette estimator if that is 0
  (``stats["flow_logdet_exact"]``);
* ``sample`` — latent reverse SDE (``em``), predictor–corrector (``pc``) or
  probability-flow ODE (``ode``) from ``z_1 ~ τ·π`` (τ the temperature),
  then ``x = h_φ^{-1}(z)``.

With the identity flow every step is literally the score model's computation
(:class:`cnf.models.score.ScoreModel`, same random draws in the same order):
the training loss equals the score model's reported ``nelbo`` statistic (its
DSM loss plus θ-independent closed forms, so the gradients agree) and the NLL
and NELBO are identical (``tests/test_indm.py``).

The fixed affine map ``y = data_scale·x + data_shift`` of the score model is
applied before the flow, with its log-det added back.

References:
    Kim, Na, Kwon, Kim, Kang & Moon, "Maximum likelihood training of implicit
    nonlinear diffusion models", NeurIPS 2022, arXiv:2205.13699.
    Song, Durkan, Murray & Ermon, "Maximum likelihood training of score-based
    diffusion models", NeurIPS 2021.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from cnf.diffusion.samplers import SAMPLERS
from cnf.diffusion.score import decoder_constant, dsm_loss, prior_kl
from cnf.diffusion.sde import LinearSDE
from cnf.divergence import DivergenceEstimator
from cnf.flows.base import Flow
from cnf.models.base import EvalOutput, GenerativeModel, LossOutput
from cnf.models.flow import build_named_flow, check_flow_section, eval_logdet
from cnf.models.score import ScoreModel, ScoreSchema, build_score, validate_score
from cnf.solve import SolverConfig

__all__ = ["INDM", "INDMSchema", "build_indm", "validate_indm"]

_OWN_COST_KEYS = frozenset({"temperature", "logdet", "series_terms"})
_INDM_KEYS = (
    "flow",
    "flow_kwargs",
    "flow_lr_scale",
    "temperature",
    "flow_logdet_exact_max_dim",
    "flow_logdet_series_terms",
)


@dataclass
class INDMSchema(ScoreSchema):
    """``model:`` section for ``family: indm``: the score model's keys plus the flow's."""

    family: str = "indm"
    flow: str = "resflow"  # identity | nice | realnvp | glow | resflow
    flow_kwargs: dict[str, Any] = field(default_factory=dict)  # the flow builder's options
    flow_lr_scale: float = 1.0  # flow learning rate = flow_lr_scale × train.lr
    temperature: float = 1.0  # sampling: z_1 ~ N(0, (τ·prior_std)² I)
    flow_logdet_exact_max_dim: int = 16  # resflow evaluation: exact log-det up to this dim
    flow_logdet_series_terms: int = 50  # ... else a power series of this length (0: own estimator)


class INDM(GenerativeModel):
    """Implicit nonlinear diffusion: flow ``h_φ`` + latent linear-SDE score model.

    Args:
        flow: Flow ``h_φ`` mapping ``(B, *event)`` to a latent of the same shape.
        diffusion: The latent score model (a :class:`ScoreModel` on the latent
            event shape with ``data_scale = 1``, ``data_shift = 0``); its
            weighting must be ``likelihood`` or ``likelihood_is`` (the loss is a NELBO).
        event_shape: Shape of one data sample.
        data_scale, data_shift: Fixed affine map before the flow.
        flow_lr_scale: Flow learning rate relative to the base learning rate.
        temperature: Default sampling temperature.
        flow_logdet_exact_max_dim, flow_logdet_series_terms: Residual-flow evaluation.

    Example:
        >>> model = build_indm({"flow": "realnvp", "hidden_dims": [32]}, (2,))
        >>> loss = model.training_loss(torch.randn(8, 2)).loss
        >>> x, stats = model.sample(4, cost={"sampler": "em", "steps": 10})
    """

    def __init__(
        self,
        flow: Flow,
        diffusion: ScoreModel,
        event_shape: tuple[int, ...],
        *,
        data_scale: float = 1.0,
        data_shift: float = 0.0,
        flow_lr_scale: float = 1.0,
        temperature: float = 1.0,
        flow_logdet_exact_max_dim: int = 16,
        flow_logdet_series_terms: int = 50,
    ):
        super().__init__()
        if diffusion.weighting not in ("likelihood", "likelihood_is"):
            raise ValueError(
                f"INDM trains on the NELBO: weighting must be likelihood or likelihood_is, "
                f"got '{diffusion.weighting}'"
            )
        if diffusion.data_scale != 1.0 or diffusion.data_shift != 0.0:
            raise ValueError("the latent score model must not rescale (INDM applies data_scale)")
        if data_scale == 0:
            raise ValueError("data_scale must be non-zero")
        self.flow = flow
        self.diffusion = diffusion
        self.event_shape = tuple(event_shape)
        self.dim = int(torch.Size(self.event_shape).numel())
        self.data_scale, self.data_shift = float(data_scale), float(data_shift)
        self.flow_lr_scale = float(flow_lr_scale)
        self.temperature = float(temperature)
        self.flow_logdet_exact_max_dim = flow_logdet_exact_max_dim
        self.flow_logdet_series_terms = flow_logdet_series_terms

    @property
    def sde(self) -> LinearSDE:
        return self.diffusion.sde

    @property
    def _log_scale(self) -> float:
        """``D log|a|``: the fixed affine map's log-det (a Python float, as in the score model)."""
        return self.diffusion.dim * math.log(abs(self.data_scale))

    # ------------------------------------------------------------- optimiser
    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: the flow at ``flow_lr_scale × base_lr``, the score network at ``base_lr``."""
        groups = []
        flow_params = list(self.flow.parameters())
        if flow_params:
            groups.append(
                {"params": flow_params, "lr": base_lr * self.flow_lr_scale, "name": "flow"}
            )
        groups.append({"params": list(self.diffusion.parameters()), "lr": base_lr, "name": "score"})
        return groups

    # ------------------------------------------------------------- spaces
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``z = h_φ(a x + b)`` and ``log|det ∂h_φ/∂y|`` per sample (without the affine's)."""
        y = self.data_scale * x + self.data_shift
        return self.flow(y)

    def decode(self, z: Tensor) -> Tensor:
        """``x = (h_φ^{-1}(z) − b) / a`` for latents ``(B, *event)``."""
        return (self.flow.inverse(z) - self.data_shift) / self.data_scale

    # ------------------------------------------------------------- training
    def training_loss(self, x: Tensor) -> LossOutput:
        """Mean per-sample NELBO in nats: −logdet + latent DSM (g² weighting) + prior KL + C."""
        z, logdet = self.encode(x)
        zf = z.reshape(z.shape[0], self.diffusion.dim)
        dsm = dsm_loss(self.diffusion.score, self.sde, zf, weighting=self.diffusion.weighting)
        prior = prior_kl(self.sde, zf)  # depends on φ through z: it stays in the loss
        latent = dsm + prior + decoder_constant(self.sde, self.diffusion.dim)
        loss = (latent - logdet).mean() - self._log_scale
        stats = {
            "dsm": float(dsm.detach().mean()),
            "prior_kl": float(prior.detach().mean()),
            "flow_logdet": float(logdet.detach().mean()),
            "nelbo": float(loss.detach()),
        }
        return LossOutput(loss, stats)

    # ------------------------------------------------------------- evaluation
    def _split_cost(self, cost: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        cost = dict(cost or {})
        own = {k: cost.pop(k) for k in list(cost) if k in _OWN_COST_KEYS}
        return own, cost

    @torch.no_grad()
    def evaluate(self, x: Tensor, *, cost: Mapping[str, Any] | None = None) -> EvalOutput:
        """NLL (probability-flow ODE) and NELBO (SDE model) per sample, in nats of ``x``.

        Both are ``−log|det ∂h/∂x|`` plus the latent quantity of the score model.
        """
        own, rest = self._split_cost(cost)
        was_training = self.training
        self.eval()
        try:
            with eval_logdet(
                self.flow,
                self.dim,
                mode=own.get("logdet"),
                exact_max_dim=self.flow_logdet_exact_max_dim,
                series_terms=int(own.get("series_terms", self.flow_logdet_series_terms)),
            ) as exact:
                z, logdet = self.encode(x)
            latent = self.diffusion.evaluate(z, cost=rest)
        finally:
            self.train(was_training)
        nll = latent.nll - logdet - self._log_scale
        nelbo = None if latent.nelbo is None else latent.nelbo - logdet - self._log_scale
        stats = {
            **latent.stats,
            "flow_logdet": float(logdet.mean()),
            "flow_logdet_exact": 1.0 if exact in (None, True) else 0.0,
        }
        return EvalOutput(nll=nll, nelbo=nelbo, stats=stats)

    # ------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        cost: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Latent reverse SDE / PC / probability-flow ODE from ``τ·z_1``, then the inverse flow."""
        own, rest = self._split_cost(cost)
        tau = float(own.get("temperature", self.temperature))
        st = self.diffusion._settings(rest)  # the score model's own resolution of the cost knob
        was_training = self.training
        self.eval()
        try:
            z1 = self.sde.prior_sample(
                (n, self.diffusion.dim), generator=generator, dtype=self.dtype, device=self.device
            )
            if tau != 1.0:
                z1 = tau * z1
            name = st["sampler"]
            kwargs: dict[str, Any] = {"generator": generator}
            if name == "ode":
                kwargs["solver"] = st["solver"]
            else:
                kwargs["steps"] = st["steps"]
            if name == "pc":
                kwargs.update(snr=st["snr"], corrector_steps=st["corrector_steps"])
            if name == "sdeint":
                kwargs["method"] = st["sde_method"]
            z0, info = SAMPLERS[name](self.diffusion.score, self.sde, z1, **kwargs)
            x = self.decode(z0.reshape(n, *self.event_shape))
        finally:
            self.train(was_training)
        return x, {"nfe": float(info["nfe"])}

    def default_cost_grid(self) -> list[dict[str, Any]]:
        return self.diffusion.default_cost_grid()


# ------------------------------------------------------------------ config
def build_indm(
    cfg: Mapping[str, Any],
    event_shape: tuple[int, ...],
    *,
    eval_solver: SolverConfig | None = None,
    eval_divergence: DivergenceEstimator | None = None,
) -> INDM:
    """Build INDM from its ``model:`` config section (missing keys: defaults)."""
    c = {**INDMSchema().__dict__, **dict(cfg)}
    score_cfg = {k: v for k, v in c.items() if k not in _INDM_KEYS}
    # The affine map is INDM's (before the flow); the latent model does not rescale.
    score_cfg.update(family="score", data_scale=1.0, data_shift=0.0)
    diffusion = build_score(
        score_cfg, event_shape, eval_solver=eval_solver, eval_divergence=eval_divergence
    )
    flow = build_named_flow(c["flow"], event_shape, dict(c["flow_kwargs"] or {}))
    return INDM(
        flow,
        diffusion,
        event_shape,
        data_scale=c["data_scale"],
        data_shift=c["data_shift"],
        flow_lr_scale=c["flow_lr_scale"],
        temperature=c["temperature"],
        flow_logdet_exact_max_dim=c["flow_logdet_exact_max_dim"],
        flow_logdet_series_terms=c["flow_logdet_series_terms"],
    )


def validate_indm(m: Mapping[str, Any]) -> None:
    """Check a ``family: indm`` model section; raises ``ValueError("model.key: ...")``."""
    validate_score(m)
    check_flow_section(m, allow_identity=True)
    if m["weighting"] not in ("likelihood", "likelihood_is"):
        raise ValueError(
            f"model.weighting: INDM trains on the NELBO, so it needs likelihood or "
            f"likelihood_is, got '{m['weighting']}'"
        )
    if m["flow_lr_scale"] <= 0:
        raise ValueError(f"model.flow_lr_scale: must be > 0, got {m['flow_lr_scale']}")
    if m["temperature"] <= 0:
        raise ValueError(f"model.temperature: must be > 0, got {m['temperature']}")
    if m["flow_logdet_exact_max_dim"] < 0 or m["flow_logdet_series_terms"] < 0:
        raise ValueError("model.flow_logdet_exact_max_dim/flow_logdet_series_terms: must be >= 0")
