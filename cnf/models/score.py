"""Score-based diffusion (VP / sub-VP / VE SDEs) as a :class:`~cnf.models.base.GenerativeModel`.

Data at t = 0, noise at t = 1 (DESIGN.md §1.3). The model is a score network
``s_θ(t, x)`` for a fixed linear SDE (:mod:`cnf.diffusion.sde`):

* ``training_loss`` — weighted denoising score matching
  (:func:`cnf.diffusion.score.dsm_loss`); with likelihood weighting the
  statistics include the batch NELBO estimate in nats;
* ``evaluate`` — the NLL of the probability-flow ODE through
  :func:`cnf.solve.integrate` (:func:`cnf.diffusion.likelihood.probability_flow_nll`)
  **and** the NELBO of the SDE model (:func:`cnf.diffusion.score.nelbo`),
  both per sample in nats of the data as given;
* ``sample`` — any sampler of :data:`cnf.diffusion.samplers.SAMPLERS`.

The model works on flat vectors ``(B, D)`` internally (the U-Net reshapes to
its image shape itself). An optional fixed affine map ``y = data_scale·x +
data_shift`` (e.g. 2, −1 to put [0, 1] images in [−1, 1]) is applied before
the diffusion; its log-determinant ``D log|data_scale|`` is added back, so
likelihoods are always densities of the data as the loader gives them.

**Cost settings** (``evaluate``/``sample`` take the same mapping):

* ``sampler``: ``ode`` | ``em`` | ``pc`` | ``sdeint``; ``steps`` (SDE steps, or
  fixed-step ODE steps with ``sampler=ode``); ``snr``, ``corrector_steps``
  (``pc``), ``sde_method`` (``sdeint``);
* ODE solver keys ``method``, ``rtol``, ``atol``, ``steps``, ``adjoint``,
  ``max_steps`` (a setting with ``method``/``rtol``/``atol`` and no
  ``sampler`` means the ODE sampler);
* ``divergence``, ``probe``, ``num_probes`` (likelihood trace estimator),
  ``nelbo_samples`` (time samples per point of the NELBO; 0 = skip),
  ``correction`` (``truncate`` | ``perturb``, the [0, ε] handling).

References:
    Song et al., "Score-based generative modeling through SDEs", ICLR 2021.
    Song, Durkan, Murray & Ermon, "Maximum likelihood training of score-based
    diffusion models", NeurIPS 2021.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from cnf.diffusion.likelihood import CORRECTIONS, probability_flow_nll
from cnf.diffusion.nets import (
    CONDITIONINGS,
    PARAMETERIZATIONS,
    TIME_EMBEDDINGS,
    ScoreMLP,
    ScoreNetwork,
)
from cnf.diffusion.samplers import SAMPLERS
from cnf.diffusion.score import WEIGHTINGS, decoder_constant, dsm_loss, nelbo, prior_kl
from cnf.diffusion.sde import SDES, LinearSDE, build_sde
from cnf.diffusion.unet import UNet
from cnf.divergence import DivergenceEstimator, build_divergence
from cnf.models.base import EvalOutput, GenerativeModel, LossOutput
from cnf.nets import ACTIVATIONS
from cnf.solve import SolverConfig

__all__ = ["NETS", "ScoreModel", "ScoreSchema", "UNetSchema", "build_score", "validate_score"]

NETS = ("mlp", "unet")
SDE_METHODS = ("euler", "milstein", "srk")
_SOLVER_KEYS = frozenset(SolverConfig.__dataclass_fields__)
_DIVERGENCE_KEYS = frozenset({"divergence", "probe", "num_probes"})
_SAMPLER_KEYS = frozenset({"sampler", "snr", "corrector_steps", "sde_method"})
_EVAL_KEYS = frozenset({"nelbo_samples", "correction"})
COST_KEYS = _SOLVER_KEYS | _DIVERGENCE_KEYS | _SAMPLER_KEYS | _EVAL_KEYS


@dataclass
class UNetSchema:
    """``model.unet`` section (``net: unet``)."""

    channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attention: bool = True
    dropout: float = 0.0
    groups: int = 8
    image_shape: list[int] = field(default_factory=list)  # [] = from the data (C, H, W)


@dataclass
class ScoreSchema:
    """``model:`` section for ``family: score``."""

    family: str = "score"
    sde: str = "vp"  # vp | subvp | ve
    beta_min: float = 0.1  # vp, subvp
    beta_max: float = 20.0
    sigma_min: float = 0.01  # ve
    sigma_max: float = 50.0  # ve: ~ the largest pairwise data distance
    eps: float = 1e-5  # truncation time
    weighting: str = "likelihood_is"  # variance | likelihood | likelihood_is
    parameterization: str = "noise"  # score | noise | data
    net: str = "mlp"  # mlp | unet
    hidden_dims: list[int] = field(default_factory=lambda: [128, 128, 128])
    activation: str = "swish"
    conditioning: str = "log_sigma"  # the network's noise-level input: log_sigma | time
    time_embedding: str = "sinusoidal"  # sinusoidal | fourier | none
    embed_dim: int = 32
    embed_scale: float | None = None  # None: default_embed_scale(conditioning, time_embedding)
    unet: UNetSchema = field(default_factory=UNetSchema)
    data_scale: float = 1.0  # the diffusion sees data_scale·x + data_shift
    data_shift: float = 0.0
    nll_correction: str = "truncate"  # [0, ε]: truncate | perturb
    nelbo_samples: int = 8  # time samples per test point of the NELBO; 0 = no NELBO
    # NELBO with t ~ g²/σ² (else uniform t with the small-t term integrated
    # exactly: a cross-check, same expectation; see cnf.diffusion.score.nelbo)
    nelbo_importance: bool = True
    sampler: str = "ode"  # default sampler: ode | em | pc | sdeint
    sample_steps: int = 500  # em / pc / sdeint steps
    snr: float = 0.16  # pc: Langevin signal-to-noise ratio
    corrector_steps: int = 1  # pc: Langevin steps per time step
    sde_method: str = "euler"  # sdeint: torchsde method


class ScoreModel(GenerativeModel):
    """A score network for a linear SDE (data at t = 0, noise at t = 1).

    Args:
        score: The score function (a :class:`~cnf.diffusion.nets.ScoreNetwork`).
        event_shape: Shape of one data sample.
        weighting: Training weighting (:data:`cnf.diffusion.score.WEIGHTINGS`).
        eval_solver: Default solver of the probability-flow ODE.
        eval_divergence: Default trace estimator of the likelihood.
        data_scale, data_shift: The fixed affine map applied to the data.
        nll_correction: ``truncate`` | ``perturb``.
        nelbo_samples: Time samples per point of the evaluation NELBO (0: none).
        nelbo_importance: Importance-sample the NELBO's times (default). ``False``
            draws them uniformly; the weight ``g²/σ² ~ 1/t`` would then give the
            estimate a variance ~ 1/ε, so :func:`~cnf.diffusion.score.nelbo`
            integrates the part that does not vanish at t = 0 exactly, which
            leaves a finite variance comparable to importance sampling's.
        sampler, sample_steps, snr, corrector_steps, sde_method: Sampling defaults.

    Example:
        >>> model = build_score({"hidden_dims": [32, 32]}, (2,))
        >>> out = model.training_loss(torch.randn(8, 2))
        >>> x, stats = model.sample(4, cost={"sampler": "em", "steps": 10})
    """

    def __init__(
        self,
        score: ScoreNetwork,
        event_shape: tuple[int, ...],
        *,
        weighting: str = "likelihood_is",
        eval_solver: SolverConfig | None = None,
        eval_divergence: DivergenceEstimator | None = None,
        data_scale: float = 1.0,
        data_shift: float = 0.0,
        nll_correction: str = "truncate",
        nelbo_samples: int = 8,
        nelbo_importance: bool = True,
        sampler: str = "ode",
        sample_steps: int = 500,
        snr: float = 0.16,
        corrector_steps: int = 1,
        sde_method: str = "euler",
    ):
        super().__init__()
        self.score = score
        self.event_shape = tuple(event_shape)
        self.dim = int(torch.Size(self.event_shape).numel())
        self.weighting = weighting
        self.eval_solver = eval_solver or SolverConfig()
        self.eval_divergence = eval_divergence or build_divergence("exact")
        if data_scale == 0:
            raise ValueError("data_scale must be non-zero")
        self.data_scale, self.data_shift = float(data_scale), float(data_shift)
        self.nll_correction = nll_correction
        self.nelbo_samples, self.nelbo_importance = nelbo_samples, nelbo_importance
        self.sampler = sampler
        self.sample_steps, self.snr = sample_steps, snr
        self.corrector_steps, self.sde_method = corrector_steps, sde_method

    @property
    def sde(self) -> LinearSDE:
        return self.score.sde

    # ------------------------------------------------------------- spaces
    def _to_model(self, x: Tensor) -> Tensor:
        return (self.data_scale * x + self.data_shift).reshape(x.shape[0], self.dim)

    def _to_data(self, y: Tensor) -> Tensor:
        return ((y - self.data_shift) / self.data_scale).reshape(y.shape[0], *self.event_shape)

    @property
    def _log_scale(self) -> float:
        """``D log|a|``: log-det of the data map (subtracted from model-space NLLs)."""
        return self.dim * math.log(abs(self.data_scale))

    # ------------------------------------------------------------- training
    def training_loss(self, x: Tensor) -> LossOutput:
        y = self._to_model(x)
        per = dsm_loss(self.score, self.sde, y, weighting=self.weighting)
        loss = per.mean()
        stats = {"dsm": float(loss.detach())}
        if self.weighting != "variance":
            # The DSM term is the NELBO's score-matching term: add the closed-form rest.
            with torch.no_grad():
                bound = per + prior_kl(self.sde, y) + decoder_constant(self.sde, self.dim)
                stats["nelbo"] = float(bound.mean()) - self._log_scale
        return LossOutput(loss, stats)

    # ------------------------------------------------------------- cost knob
    def _settings(self, cost: Mapping[str, Any] | None) -> dict[str, Any]:
        """Resolve a cost mapping into solver, divergence, sampler and NELBO settings."""
        cost = dict(cost or {})
        unknown = set(cost) - COST_KEYS
        if unknown:
            raise ValueError(
                f"unknown cost key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(COST_KEYS))}"
            )
        ode_keys = {"method", "rtol", "atol", "adjoint", "max_steps", "seminorm"} & set(cost)
        sampler = cost.get("sampler") or ("ode" if ode_keys else self.sampler)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler '{sampler}'; valid: {', '.join(sorted(SAMPLERS))}")
        out: dict[str, Any] = {"sampler": sampler}
        solver_changes = {k: cost[k] for k in ode_keys}
        sde_steps = self.sample_steps
        if "steps" in cost:
            if sampler == "ode":
                solver_changes["steps"] = cost["steps"]
            else:
                sde_steps = int(cost["steps"])
        solver = self.eval_solver
        if solver_changes:
            if (
                "steps" in solver_changes
                and "method" not in solver_changes
                and not solver.fixed_step
            ):
                raise ValueError(
                    "cost 'steps' with the ODE needs a fixed-step 'method' (e.g. euler, rk4)"
                )
            solver = solver.with_(**solver_changes)
        out["solver"] = solver
        out["steps"] = sde_steps
        out["snr"] = float(cost.get("snr", self.snr))
        out["corrector_steps"] = int(cost.get("corrector_steps", self.corrector_steps))
        out["sde_method"] = cost.get("sde_method", self.sde_method)
        div = self.eval_divergence
        if "divergence" in cost:
            div = build_divergence(
                cost["divergence"],
                probe=cost.get("probe", "rademacher"),
                num_probes=int(cost.get("num_probes", 1)),
            )
        out["divergence"] = div
        out["nelbo_samples"] = int(cost.get("nelbo_samples", self.nelbo_samples))
        out["correction"] = cost.get("correction", self.nll_correction)
        if out["correction"] not in CORRECTIONS:
            raise ValueError(
                f"unknown correction '{out['correction']}'; valid: {', '.join(CORRECTIONS)}"
            )
        return out

    # ------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, x: Tensor, *, cost: Mapping[str, Any] | None = None) -> EvalOutput:
        """Probability-flow NLL and SDE NELBO per sample, in nats of ``x``."""
        st = self._settings(cost)
        was_training = self.training
        self.eval()
        try:
            y = self._to_model(x)
            nll, info = probability_flow_nll(
                self.score,
                self.sde,
                y,
                solver=st["solver"],
                divergence=st["divergence"],
                correction=st["correction"],
            )
            stats: dict[str, float] = {"nfe": float(info["nfe"])}
            bound = None
            if st["nelbo_samples"] > 0:
                bound = nelbo(
                    self.score,
                    self.sde,
                    y,
                    num_t=st["nelbo_samples"],
                    importance=self.nelbo_importance,
                    chunk=y.shape[0],
                )
                bound = bound - self._log_scale
        finally:
            self.train(was_training)
        return EvalOutput(nll=nll - self._log_scale, nelbo=bound, stats=stats)

    # ------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        cost: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        st = self._settings(cost)
        was_training = self.training
        self.eval()
        try:
            x_T = self.sde.prior_sample(
                (n, self.dim), generator=generator, dtype=self.dtype, device=self.device
            )
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
            y, info = SAMPLERS[name](self.score, self.sde, x_T, **kwargs)
        finally:
            self.train(was_training)
        return self._to_data(y), {"nfe": float(info["nfe"])}

    def default_cost_grid(self) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = [
            {"sampler": "ode", "method": "dopri5", "rtol": tol, "atol": tol}
            for tol in (1e-2, 1e-3, 1e-5)
        ]
        grid += [{"sampler": "ode", "method": "rk4", "steps": s} for s in (5, 20)]
        grid += [{"sampler": "em", "steps": s} for s in (10, 100, 1000)]
        grid += [{"sampler": "pc", "steps": s} for s in (10, 100)]
        return grid


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


def _image_shape(c: Mapping[str, Any], event_shape: tuple[int, ...]) -> tuple[int, int, int]:
    given = list(c["unet"]["image_shape"]) if c["unet"]["image_shape"] else []
    if given:
        shape = tuple(int(s) for s in given)
    elif len(event_shape) == 3:
        shape = tuple(event_shape)
    else:
        d = int(torch.Size(event_shape).numel())
        side = math.isqrt(d)
        if side * side != d:
            raise ValueError(
                f"model.unet.image_shape: cannot infer an image shape from event shape "
                f"{event_shape}; set it (e.g. [1, 8, 8]) or use data.flatten=false"
            )
        shape = (1, side, side)
    if math.prod(shape) != math.prod(event_shape):
        raise ValueError(f"model.unet.image_shape {shape} does not fit event shape {event_shape}")
    return shape  # type: ignore[return-value]


def build_score(
    cfg: Mapping[str, Any],
    event_shape: tuple[int, ...],
    *,
    eval_solver: SolverConfig | None = None,
    eval_divergence: DivergenceEstimator | None = None,
) -> ScoreModel:
    """Build a score model from its ``model:`` config section (missing keys: defaults)."""
    c = {**ScoreSchema().__dict__, **dict(cfg)}
    unet_cfg = c["unet"] if isinstance(c["unet"], Mapping) else asdict(c["unet"])
    c["unet"] = {**asdict(UNetSchema()), **dict(unet_cfg)}
    sde = build_sde(
        c["sde"],
        beta_min=c["beta_min"],
        beta_max=c["beta_max"],
        sigma_min=c["sigma_min"],
        sigma_max=c["sigma_max"],
        eps=c["eps"],
    )
    dim = int(torch.Size(tuple(event_shape)).numel())
    embed_scale = c["embed_scale"]
    if embed_scale is None:
        embed_scale = default_embed_scale(c["conditioning"], c["time_embedding"])
    if c["net"] == "mlp":
        net = ScoreMLP(
            dim,
            tuple(c["hidden_dims"]),
            activation=c["activation"],
            time_embedding=c["time_embedding"],
            embed_dim=c["embed_dim"],
            embed_scale=embed_scale,
        )
    elif c["net"] == "unet":
        u = c["unet"]
        net = UNet(
            _image_shape(c, tuple(event_shape)),
            channels=u["channels"],
            channel_mults=tuple(u["channel_mults"]),
            num_res_blocks=u["num_res_blocks"],
            attention=u["attention"],
            dropout=u["dropout"],
            groups=u["groups"],
            embed_scale=embed_scale,
        )
    else:
        raise ValueError(f"model.net: unknown value '{c['net']}'; valid: {', '.join(NETS)}")
    return ScoreModel(
        ScoreNetwork(net, sde, c["parameterization"], conditioning=c["conditioning"]),
        event_shape,
        weighting=c["weighting"],
        eval_solver=eval_solver,
        eval_divergence=eval_divergence,
        data_scale=c["data_scale"],
        data_shift=c["data_shift"],
        nll_correction=c["nll_correction"],
        nelbo_samples=c["nelbo_samples"],
        nelbo_importance=c["nelbo_importance"],
        sampler=c["sampler"],
        sample_steps=c["sample_steps"],
        snr=c["snr"],
        corrector_steps=c["corrector_steps"],
        sde_method=c["sde_method"],
    )


def _choice(key: str, value: str, valid: Any) -> None:
    if value not in valid:
        raise ValueError(f"{key}: unknown value '{value}'; valid: {', '.join(sorted(valid))}")


def validate_score(m: Mapping[str, Any]) -> None:
    """Check a ``family: score`` model section; raises ``ValueError("model.key: ...")``."""
    _choice("model.sde", m["sde"], SDES)
    _choice("model.weighting", m["weighting"], WEIGHTINGS)
    _choice("model.parameterization", m["parameterization"], PARAMETERIZATIONS)
    _choice("model.net", m["net"], NETS)
    _choice("model.activation", m["activation"], ACTIVATIONS)
    _choice("model.time_embedding", m["time_embedding"], TIME_EMBEDDINGS)
    _choice("model.conditioning", m["conditioning"], CONDITIONINGS)
    if m["embed_scale"] is not None and m["embed_scale"] <= 0:
        raise ValueError(f"model.embed_scale: must be > 0, got {m['embed_scale']}")
    _choice("model.sampler", m["sampler"], SAMPLERS)
    _choice("model.nll_correction", m["nll_correction"], CORRECTIONS)
    _choice("model.sde_method", m["sde_method"], SDE_METHODS)
    if not 0 < m["eps"] < 1:
        raise ValueError(f"model.eps: must lie in (0, 1), got {m['eps']}")
    if not 0 < m["beta_min"] <= m["beta_max"]:
        raise ValueError("model.beta_min/beta_max: need 0 < beta_min <= beta_max")
    if not 0 < m["sigma_min"] < m["sigma_max"]:
        raise ValueError("model.sigma_min/sigma_max: need 0 < sigma_min < sigma_max")
    if not m["hidden_dims"] or any(h < 1 for h in m["hidden_dims"]):
        raise ValueError("model.hidden_dims: needs one or more positive widths")
    if m["embed_dim"] < 2 or m["embed_dim"] % 2:
        raise ValueError(f"model.embed_dim: must be even and >= 2, got {m['embed_dim']}")
    if m["data_scale"] == 0:
        raise ValueError("model.data_scale: must be non-zero")
    if m["nelbo_samples"] < 0:
        raise ValueError(f"model.nelbo_samples: must be >= 0, got {m['nelbo_samples']}")
    if m["sample_steps"] < 1:
        raise ValueError(f"model.sample_steps: must be >= 1, got {m['sample_steps']}")
    if m["snr"] <= 0 or m["corrector_steps"] < 0:
        raise ValueError("model.snr/corrector_steps: need snr > 0 and corrector_steps >= 0")
    u = m["unet"]
    if u["channels"] < 1 or not u["channel_mults"] or any(k < 1 for k in u["channel_mults"]):
        raise ValueError("model.unet: channels and channel_mults must be positive")
    if u["num_res_blocks"] < 1 or u["groups"] < 1 or not 0 <= u["dropout"] < 1:
        raise ValueError("model.unet: need num_res_blocks >= 1, groups >= 1, 0 <= dropout < 1")
    if u["image_shape"] and len(u["image_shape"]) != 3:
        raise ValueError("model.unet.image_shape: must be [C, H, W] or empty")
