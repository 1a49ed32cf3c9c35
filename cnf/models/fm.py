"""Flow matching (rectified flow, OT-CFM, reflow) as a :class:`~cnf.models.base.GenerativeModel`.

Training is simulation-free: the loss regresses a time-conditioned MLP
``v_θ(t, x)`` on the velocity ``x1 − x0`` of straight paths between data
``x0`` (t = 0) and noise ``x1 ~ N(0, I)`` (t = 1) — see
:mod:`cnf.diffusion.flow_matching`. The learned field is a CNF in the
library's convention (docs/methods.md §7), so everything else is FFJORD's code:

* ``evaluate`` integrates ``[z, logdet]`` from t = 0 (data) to t = 1 through
  the library's one likelihood path (:func:`cnf.flows.base.flow_log_prob`
  over the preprocessing and a :class:`~cnf.flows.cnf.CNF` holding the field):
  ``log p(x) = log N(z(1); 0, I) + ∫_0^1 ∇·v dt`` (+ the preprocessing log-det);
* ``sample`` integrates ``z ~ N(0, I)`` from t = 1 back to t = 0.

Both take :class:`FlowMatchingSettings`: the solver (any torchdiffeq
method: ``euler``, ``midpoint``, ``rk4`` with ``steps``; ``dopri5`` with
``rtol``/``atol``) and the divergence estimator of ``evaluate``, and the
sampler: ``ode`` (the solver) or one of the few-step samplers of
:mod:`cnf.diffusion.ode_samplers` — ``euler`` / ``heun`` with ``steps`` on a
``uniform`` grid in t or EDM's ``karras`` grid (σ = t/(1 − t) over [0.002, 80],
first point at t = 1; docs/methods.md §7). NFE is reported by the solve or
counted by the sampler (Heun: 2N − 1).

Images are flattened inside the model (the MLP sees ``(B, D)``), so the model
accepts any event shape; reflow pairs live in this flat model space (after the
preprocessing). ``model.net`` (:data:`FM_NETS`) replaces the MLP by an image
backbone of the score models (``ddpm``, ``ddpmpp``, ``ncsnpp``, ``unet``; data
kept as ``(C, H, W)``), which takes the flat states and reshapes them.

References:
    Lipman et al., "Flow matching for generative modeling", ICLR 2023.
    Liu, Gong & Liu, "Flow straight and fast", ICLR 2023.
    Tong et al., "Improving and generalizing flow-based generative models with
    minibatch optimal transport", TMLR 2024.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cnf.diffusion import flow_matching, ode_samplers
from cnf.diffusion.nets import IMAGE_NETS
from cnf.flows.base import DiagonalNormal, Flow, FlowSettings, Reshape
from cnf.flows.cnf import CNF
from cnf.flows.preprocess import Preprocess
from cnf.models.base import ChainModel, EvalOutput, LossOutput, SampleOutput, register_family
from cnf.models.ffjord import ODESettings, field_network
from cnf.models.score import image_backbone
from cnf.registry import Registry
from cnf.schema import FlowMatchingSchema, builder_options

__all__ = ["FM_NETS", "FlowMatchingModel", "FlowMatchingSettings", "build_flow_matching"]


@dataclass(frozen=True)
class FlowMatchingSettings(ODESettings):
    """The CNF's solver and trace estimator, and the sampler.

    Attributes:
        sampler: ``ode`` (the solver, as ``evaluate``) | ``euler`` | ``heun``
            (:data:`~cnf.diffusion.ode_samplers.ODE_SAMPLERS`).
        steps: Steps of ``euler`` / ``heun`` (a bare ``steps`` key under
            ``ode`` sets ``solver.steps``).
        grid: Their time grid: ``karras`` | ``uniform``.
        sigma_min, sigma_max: Noise-level range of the ``karras`` grid
            (EDM's 0.002 and 80 by default); its first point is t = 1.
    """

    SAMPLING_ONLY = frozenset({"sampler", "steps", "grid", "sigma_min", "sigma_max"})

    sampler: str = ode_samplers.SOLVER_SAMPLER
    steps: int = 10
    grid: str = "karras"
    sigma_min: float = ode_samplers.EDM_SIGMA_MIN
    sigma_max: float = ode_samplers.EDM_SIGMA_MAX

    def __post_init__(self) -> None:
        if self.sampler != ode_samplers.SOLVER_SAMPLER:
            ode_samplers.ODE_SAMPLERS.check(self.sampler, key="sampler")
        ode_samplers.TIME_GRIDS.check(self.grid, key="grid")
        ode_samplers.karras_range(self.sigma_min, self.sigma_max, 0.0, math.inf)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def route(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Solver keys select ``ode``; under ``ode`` a bare ``steps`` is the solver's."""
        return ode_samplers.route_sampler_keys(changes, self.sampler)


def _section_mlp(event_shape: tuple[int, ...]) -> None:
    """The model section's own MLP (``hidden_dims``, ``layer``, ``activation``, ``zero_init``)."""
    return None


# model.net.name → builder(event_shape, **options) of the field v(t, x) on flat states;
# ``mlp`` is the section's TimeMLP.
FM_NETS: Registry[Callable[..., nn.Module | None]] = Registry(
    "flow-matching network",
    {
        "mlp": _section_mlp,
        **{name: image_backbone(name, key="model.net") for name in sorted(IMAGE_NETS)},
    },
)


class FlowMatchingModel(ChainModel):
    """A vector field trained by conditional flow matching; a CNF at evaluation.

    Args:
        field: ``v(t, x)`` on flat states ``(B, D)``; ``t`` scalar or ``(B,)``.
        event_shape: Shape of one data sample (flattened inside).
        pairing: ``rectified`` or ``ot`` (:data:`cnf.diffusion.flow_matching.PAIRINGS`).
        ot_solver: ``emd`` or ``assignment``.
        sigma: Path noise σ.
        settings: Default solver and divergence estimator of ``evaluate`` and ``sample``.
        preprocess: The data bijection applied first (e.g. a logit for images).

    Example:
        >>> from cnf.nets import TimeMLP
        >>> model = FlowMatchingModel(TimeMLP(2, (32, 32)), (2,))
        >>> out = model.training_loss(torch.randn(8, 2))
        >>> x, stats = model.sample(4, model.with_settings(method="euler", steps=5))
    """

    Settings = FlowMatchingSettings

    def __init__(
        self,
        field: nn.Module,
        event_shape: tuple[int, ...],
        *,
        pairing: str = "rectified",
        ot_solver: str = "emd",
        sigma: float = 0.0,
        settings: FlowMatchingSettings | None = None,
        preprocess: Preprocess | None = None,
        ml_fraction: float = 0.0,
        ml_settings: FlowSettings | None = None,
        ml_lr_scale: float = 1.0,
    ):
        super().__init__()
        if not 0 <= ml_fraction < 1:
            raise ValueError(f"ml_fraction must be in [0, 1), got {ml_fraction}")
        self.ml_fraction = float(ml_fraction)
        self.ml_settings = ml_settings or FlowSettings()
        self.ml_lr_scale = float(ml_lr_scale)
        self.ml_phase = False  # set by set_iteration: train by maximum likelihood now
        self.event_shape = tuple(event_shape)
        self.dim = int(torch.Size(self.event_shape).numel())
        self.pairing, self.ot_solver, self.sigma = pairing, ot_solver, float(sigma)
        self.settings = settings or FlowMatchingSettings()
        self.preprocess = preprocess or Preprocess()
        self.flatten = Reshape(self.event_shape, (self.dim,))
        # The learned field is a CNF from data (t = 0) to noise (t = 1).
        self.cnf = CNF(field, time_length=1.0)
        self.base = DiagonalNormal()
        # Reflow pairs are data, not weights: not saved in checkpoints (the
        # config names their file), but moved with the model by .to().
        self.register_buffer("pairs_x0", None, persistent=False)
        self.register_buffer("pairs_x1", None, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        for k in [k for k in state_dict if k.startswith(prefix + "field.")]:  # before cnf.field
            state_dict[prefix + "cnf." + k[len(prefix) :]] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def field(self) -> nn.Module:
        return self.cnf.field

    @property
    def data_to_base(self) -> list[Flow]:
        """The flows from data to base, in order: preprocessing, flatten, the CNF."""
        return [self.preprocess, self.flatten, self.cnf]

    @property
    def base_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    # ------------------------------------------------------------- spaces
    def to_model_space(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data ``(B, *event)`` → flat model space ``(B, D)`` and the log-det of the map."""
        y, logdet = self.preprocess(x)
        return y.reshape(y.shape[0], self.dim), logdet

    def to_data_space(self, y: Tensor) -> Tensor:
        """Flat model space ``(B, D)`` → data ``(B, *event)``."""
        return self.preprocess.inverse(y.reshape(y.shape[0], *self.event_shape))

    def set_reflow_pairs(self, x0: Tensor, x1: Tensor) -> None:
        """Train on these ``(x0, x1)`` pairs (model space, ``(N, D)``) instead of fresh couplings."""
        if x0.shape != x1.shape or x0.dim() != 2 or x0.shape[1] != self.dim:
            raise ValueError(
                f"reflow pairs must both have shape (N, {self.dim}), "
                f"got {tuple(x0.shape)} and {tuple(x1.shape)}"
            )
        self.pairs_x0 = x0.to(self.device, self.dtype)
        self.pairs_x1 = x1.to(self.device, self.dtype)

    # ------------------------------------------------------------- training
    def ml_start(self, planned: int) -> int:
        """The last iteration before the maximum-likelihood phase (of ``planned``)."""
        return round((1 - self.ml_fraction) * planned)

    def set_iteration(self, iteration: int, planned: int | None = None) -> None:
        """Called by the Trainer before each step: the last ``ml_fraction`` of the
        ``planned`` iterations (once the count is known) are maximum-likelihood ones."""
        self.ml_phase = (
            self.ml_fraction > 0 and planned is not None and iteration > self.ml_start(planned)
        )

    def lr_phase(self, planned: int) -> tuple[int, float] | None:
        """``(first optimiser step, learning-rate scale)`` of the maximum-likelihood
        phase, where the Trainer starts the schedule afresh (None: one phase)."""
        if self.ml_fraction == 0:
            return None
        return self.ml_start(planned), self.ml_lr_scale

    def training_loss(self, x: Tensor) -> LossOutput:
        """CFM regression loss on a batch (mean over pairs and dimensions); in the
        maximum-likelihood phase (:meth:`set_iteration`) the mean NLL ``−log p(x)``
        through ``ml_settings``' solve, back-propagated through the solver.

        With reflow pairs set, ``x`` only gives the batch size: the pairs are
        drawn from the stored set with the global RNG (seeded per iteration
        by the training loop, so runs stay reproducible and resumable).
        """
        if self.ml_phase:
            logp, out = self.chain_log_prob(x, self.ml_settings)
            nll = -logp.mean()
            stats = {"nll": float(nll.detach()), "nfe_forward": out.stats.nfe_forward}
            return LossOutput(nll, stats)
        batch = x.shape[0]
        if self.pairs_x0 is not None:
            idx = torch.randint(0, self.pairs_x0.shape[0], (batch,), device=self.pairs_x0.device)
            x0, x1 = self.pairs_x0[idx], self.pairs_x1[idx]
        else:
            x0, _ = self.to_model_space(x)
            x1 = torch.randn_like(x0)
            x0, x1 = flow_matching.pair_batch(
                x0, x1, pairing=self.pairing, ot_solver=self.ot_solver
            )
        loss = flow_matching.cfm_loss(self.field, x0, x1, sigma=self.sigma).mean()
        stats = {
            "cfm": float(loss.detach()),
            # Mean ‖x0 − x1‖² of the pairs: what OT pairing minimises.
            "transport_cost": float(flow_matching.transport_cost(x0, x1).mean()),
        }
        return LossOutput(loss, stats)

    # ------------------------------------------------------------- likelihood
    def log_prob(self, x: Tensor, settings: ODESettings | None = None) -> tuple[Tensor, int]:
        """``log p(x)`` per sample ``(B,)`` in nats and the NFE of the solve (t: 0 → 1)."""
        s = self._resolve(settings)
        logp, out = self.chain_log_prob(x, s.flow_settings(self.dim))
        return logp, out.stats.nfe_forward

    def _evaluate(self, x: Tensor, s: ODESettings) -> EvalOutput:
        logp, nfe = self.log_prob(x, s)
        return EvalOutput(nll=-logp, stats={"nfe": nfe})

    # ------------------------------------------------------------- sampling
    def _sample(
        self, n: int, s: FlowMatchingSettings, generator: torch.Generator | None
    ) -> SampleOutput:
        if s.sampler == ode_samplers.SOLVER_SAMPLER:
            x, stats = self.chain_sample(n, FlowSettings(solver=s.solver), generator=generator)
            return SampleOutput(x, {"nfe": stats.nfe_forward})
        # The base noise of chain_sample, then the few-step sampler from t = 1 to t = 0.
        z = self.base.sample(
            (n, self.dim), generator=generator, dtype=self.dtype, device=self.device
        )
        times = ode_samplers.fm_sampling_times(
            s.grid, s.steps, sigma_min=s.sigma_min, sigma_max=s.sigma_max, like=z
        )
        y, nfe = ode_samplers.ODE_SAMPLERS[s.sampler](self.field, z, times)
        return SampleOutput(self.to_data_space(y), {"nfe": nfe})

    @torch.no_grad()
    def reflow_pairs(
        self,
        n: int,
        settings: ODESettings | None = None,
        *,
        generator: torch.Generator | None = None,
        batch_size: int = 10_000,
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """``n`` pairs ``(x0 = ODE_{1→0}(x1), x1)`` in model space for the next reflow stage.

        Returns:
            ``x0``, ``x1`` of shape ``(n, D)`` and ``{"nfe": mean NFE per solve}``.
        """
        s = self._resolve(settings)
        if s.sampler != ode_samplers.SOLVER_SAMPLER:
            raise ValueError(
                f"reflow pairs come from the solver (sampler=ode), got sampler={s.sampler}"
            )
        z = torch.randn((n, self.dim), generator=generator, dtype=self.dtype, device=self.device)
        x0, x1, stats = flow_matching.reflow_pairs(
            self.field, z, solver=s.solver, batch_size=batch_size
        )
        nfe = sum(st.nfe_forward for st in stats) / max(1, len(stats))
        return x0, x1, {"nfe": nfe}

    def default_cost_grid(self) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = [
            {"method": m, "steps": s} for m in ("euler", "midpoint") for s in (1, 2, 5, 10, 20)
        ]
        grid += [{"method": "dopri5", "rtol": tol, "atol": tol} for tol in (1e-2, 1e-3, 1e-4, 1e-5)]
        return grid + ode_samplers.few_step_settings()


def build_flow_matching(
    cfg: FlowMatchingSchema, event_shape: tuple[int, ...], settings: ODESettings
) -> FlowMatchingModel:
    """Build a flow-matching model from its typed ``model:`` config section."""
    dim = int(torch.Size(tuple(event_shape)).numel())
    net = FM_NETS[cfg.net.name](tuple(event_shape), **builder_options(cfg.net))
    if net is None:
        net = field_network(dim, cfg)
    if not isinstance(settings, FlowMatchingSettings):
        settings = FlowMatchingSettings(solver=settings.solver, divergence=settings.divergence)
    model = FlowMatchingModel(
        net,
        event_shape,
        pairing=cfg.pairing.name,
        ot_solver=cfg.pairing.ot_solver,
        sigma=cfg.sigma,
        settings=settings,
        preprocess=cfg.preprocess.build(),
        ml_fraction=cfg.ml_fraction,
        ml_lr_scale=cfg.ml_lr_scale,
        ml_settings=FlowSettings(
            solver=cfg.ml_solver.build(), divergence=cfg.ml_divergence.build().build(dim)
        ),
    )
    if cfg.init_from:
        from cnf.rundir import load_weights

        load_weights(model, cfg.init_from, key="model.init_from")
    if cfg.reflow_pairs:
        x0, x1, _ = flow_matching.load_pairs(cfg.reflow_pairs)
        model.set_reflow_pairs(x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1))
    return model


@register_family("fm", FlowMatchingSchema)
def _build(
    cfg: FlowMatchingSchema, event_shape: tuple[int, ...], eval_cfg: Any
) -> FlowMatchingModel:
    return build_flow_matching(cfg, event_shape, FlowMatchingSettings.from_eval(eval_cfg))
