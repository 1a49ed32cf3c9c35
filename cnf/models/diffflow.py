"""DiffFlow as a :class:`~cnf.models.base.GenerativeModel` (family ``diffflow``).

Forward SDE ``dx = f_θ(x,t)dt + g(t)dw`` from the data (``t = t_start``) to
the prior ``N(0, σ²I)`` (``t = t_end``), backward SDE with drift
``f_θ − g²s_φ``, both discretised on ``N`` steps (docs/methods.md §5;
:mod:`cnf.diffflow.chain` holds the mathematics). The drift is
``f_θ = f_base + (learned residual network)``; ``freeze_drift`` drops the
residual, which turns the model into the fixed-drift diffusion with drift
``f_base`` (``zero``, or ``vp``: ``−½g²x``) and a learned score.

Training loss: the path NELBO per sample in nats. Evaluation:
``EvalOutput.nelbo`` — an **upper bound on the NLL** of the discretised
backward model ``p_B`` (every step Gaussian, the last one included), with
``nll = None``. Cost knobs (``evaluate``/``sample``): ``steps`` (``N``, may
differ from training) and ``sampler`` (``sde``: backward chain with a
noise-free last step; ``ode``: deterministic drift ``f − ½g²s``; the NELBO is
always the stochastic chain's). NFE = network evaluations (drift and score
count one each; a fixed drift is not a network).

The preprocessing bijection (``model.preprocess``; the released code
standardises 2-D data and maps images to [−1, 1]) comes first, and its
log-determinant is added back so the NELBO stays in the data's units.

References:
    Zhang & Chen, "Diffusion Normalizing Flow", NeurIPS 2021, arXiv:2110.07579.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cnf.diffflow.chain import DIFFFLOW_SAMPLERS, path_nelbo, run_backward
from cnf.diffflow.schedules import BASE_DRIFTS, DiffusionSchedule, TimeGrid, build_diffusion
from cnf.diffusion.nets import IMAGE_NETS
from cnf.flows.preprocess import Preprocess
from cnf.models.base import EvalOutput, GenerativeModel, LossOutput, SampleOutput, register_family
from cnf.models.score import image_backbone
from cnf.nets import TimeMLP
from cnf.registry import Registry
from cnf.schema import DiffFlowSchema, builder_options

__all__ = ["DIFFFLOW_NETS", "DiffFlow", "DiffFlowSettings", "build_diffflow"]


@dataclass(frozen=True)
class DiffFlowSettings:
    """Evaluation and sampling settings: the number of steps ``N`` and the sampler."""

    steps: int = 30
    sampler: str = "sde"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        DIFFFLOW_SAMPLERS.check(self.sampler, key="sampler")


# ----------------------------------------------------------------- networks
class FlatTimeMLP(nn.Module):
    """:class:`~cnf.nets.TimeMLP` on flattened inputs: ``(t, x (B, *shape)) -> (B, *shape)``."""

    def __init__(
        self,
        event_shape: tuple[int, ...],
        *,
        hidden_dims: Sequence[int] = (128, 128, 128),
        layer: str = "concatsquash",
        activation: str = "swish",
        zero_init: bool = True,
    ):
        super().__init__()
        self.mlp = TimeMLP(
            math.prod(event_shape),
            tuple(hidden_dims),
            layer=layer,
            activation=activation,
            zero_init=zero_init,
        )

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.mlp(t, x.flatten(1)).view_as(x)


# name → builder(event_shape, **options) of a module ``(u, x) -> (B, *shape)`` with the
# normalised time u ∈ [0, 1]. The image networks are the score models' backbones
# (unet, and the published ddpm / ddpmpp / ncsnpp of cnf.diffusion.ncsnpp; they
# start at 0 whatever zero_init says).
DIFFFLOW_NETS: Registry[Callable[..., nn.Module]] = Registry(
    "DiffFlow network",
    {
        "mlp": FlatTimeMLP,
        **{
            name: image_backbone(name, key="model.drift_net/score_net")
            for name in sorted(IMAGE_NETS)
        },
    },
)


# -------------------------------------------------------------------- model
class DiffFlow(GenerativeModel):
    """Diffusion normalizing flow (data at ``t_start``, prior ``N(0, σ²I)`` at ``t_end``).

    Args:
        event_shape: Shape of one sample.
        score_net: ``s_φ(u, y)`` with normalised time ``u ∈ [0, 1]``.
        drift_net: Learned residual of the drift; None = fixed drift ``f_base``.
        grid: Time grids; ``random_grid`` draws a stratified grid per training step.
        diffusion: ``g(t)``, a :class:`cnf.diffflow.schedules.DiffusionSchedule`.
        base_drift: One of :data:`cnf.diffflow.schedules.BASE_DRIFTS`.
        settings: Default ``N`` (also at the end of training) and sampler.
        progressive: ``(steps_list, iters_list)`` for training with fewer steps early.
        prior_std: ``σ``.
        preprocess: The data bijection applied before the chain.
        normalizing_terms: Include ``D·Σ log(g_{i+1}/g_i)``.
        backprop: ``autograd`` or ``checkpointed``.
        drift_lr, score_lr: Learning rates of the two networks (None: the base lr).

    The networks see the normalised time ``u = (t − t_start)/(t_end − t_start)``:
    the released 2-D interval [0.001, 0.05] is too narrow for a time input to
    be told apart by a network otherwise.

    Example:
        >>> from cnf.config import load_config
        >>> from cnf.models import build_model
        >>> model = build_model(load_config("configs/diffflow/toy.yaml"), (2,))  # doctest: +SKIP
        >>> x, stats = model.sample(16, model.with_settings(steps=10))  # doctest: +SKIP
    """

    Settings = DiffFlowSettings

    def __init__(
        self,
        event_shape: tuple[int, ...],
        *,
        score_net: nn.Module,
        drift_net: nn.Module | None,
        grid: TimeGrid,
        diffusion: DiffusionSchedule,
        base_drift: str = "zero",
        settings: DiffFlowSettings | None = None,
        random_grid: bool = True,
        progressive: tuple[tuple[int, ...], tuple[int, ...]] = ((), ()),
        prior_std: float = 1.0,
        preprocess: Preprocess | None = None,
        normalizing_terms: bool = True,
        backprop: str = "autograd",
        drift_lr: float | None = None,
        score_lr: float | None = None,
    ):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.score_net, self.drift_net = score_net, drift_net
        self.grid, self.diffusion = grid, diffusion
        self.base_drift = BASE_DRIFTS[base_drift]
        self.settings = settings or DiffFlowSettings()
        self.steps, self.random_grid = self.settings.steps, random_grid
        self.progressive = (tuple(progressive[0]), tuple(progressive[1]))
        self.prior_std = prior_std
        self.preprocess = preprocess or Preprocess()
        self.normalizing_terms, self.backprop = normalizing_terms, backprop
        self.drift_lr, self.score_lr = drift_lr, score_lr
        self.train_steps = self.steps_at(0)
        self.nfe = 0  # network evaluations, a running count kept by drift() and score()

    # ------------------------------------------------------------ dynamics
    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        """``f(x, t) = f_base(x, g(t)) + drift_net(u, x)``; ``t`` 0-dim."""
        f = self.base_drift(x, self.diffusion(t))
        if self.drift_net is not None:
            self.nfe += 1
            f = f + self.drift_net(self.grid.normalise(t), x)
        return f

    def score(self, t: Tensor, x: Tensor) -> Tensor:
        """``s(x, t) = score_net(u, x)``; ``t`` 0-dim."""
        self.nfe += 1
        return self.score_net(self.grid.normalise(t), x)

    # --------------------------------------------------------- training hooks
    def steps_at(self, iteration: int) -> int:
        """Training ``N`` at ``iteration`` (progressive schedule, then ``steps``)."""
        for n, until in zip(*self.progressive):
            if iteration <= until:
                return n
        return self.steps

    def set_iteration(self, iteration: int, planned: int | None = None) -> None:
        """Called by the Trainer before each step (progressive number of steps)."""
        self.train_steps = self.steps_at(iteration)

    def param_groups(self, base_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: drift and score with their own learning rates."""
        groups = []
        if self.drift_net is not None:
            lr = self.drift_lr if self.drift_lr is not None else base_lr
            groups.append({"params": list(self.drift_net.parameters()), "lr": lr, "name": "drift"})
        lr = self.score_lr if self.score_lr is not None else base_lr
        groups.append({"params": list(self.score_net.parameters()), "lr": lr, "name": "score"})
        return groups

    # ------------------------------------------------------------- the chain
    def _schedule(self, steps: int, *, random: bool) -> tuple[Tensor, Tensor]:
        ts = self.grid.times(steps, random=random, dtype=self.dtype, device=self.device)
        return ts, self.diffusion(ts)

    def nelbo(self, x: Tensor, *, steps: int, random_grid: bool = False) -> tuple[Tensor, dict]:
        """Path NELBO per sample ``(B,)`` in nats (an upper bound on ``−log p_B(x)``)."""
        # Exact change of variables: −log p(x) = −log p(y) − log|det ∂y/∂x|.
        y, logdet = self.preprocess(x)
        ts, gs = self._schedule(steps, random=random_grid)
        out = path_nelbo(
            self,
            y,
            ts,
            gs,
            prior_std=self.prior_std,
            normalizing_terms=self.normalizing_terms,
            backprop=self.backprop,
        )
        stats = {
            "prior": float(out.prior.detach().mean()),
            "path": float(out.steps.detach().mean()),
            "log_g": out.log_g,
        }
        return out.nelbo - logdet, stats

    def training_loss(self, x: Tensor) -> LossOutput:
        start = self.nfe
        nelbo, stats = self.nelbo(x, steps=self.train_steps, random_grid=self.random_grid)
        loss = nelbo.mean()
        after_forward = self.nfe
        stats.update(
            nelbo=float(loss.detach()), steps=self.train_steps, nfe_forward=self.nfe - start
        )
        # The checkpointed backward pass re-evaluates the networks; autograd does not.
        return LossOutput(loss, stats, lambda: {"nfe_backward": self.nfe - after_forward})

    def _evaluate(self, x: Tensor, s: DiffFlowSettings) -> EvalOutput:
        """NELBO per sample on the fixed ``steps``-step grid (``sampler`` does not change it)."""
        start = self.nfe
        nelbo, stats = self.nelbo(x, steps=s.steps)
        stats.update(nfe=self.nfe - start, steps=s.steps)
        return EvalOutput(nll=None, nelbo=nelbo, stats=stats)

    def _sample(
        self, n: int, s: DiffFlowSettings, generator: torch.Generator | None
    ) -> SampleOutput:
        """``n`` samples from the backward chain (noise-free last step) or its ODE variant."""
        start = self.nfe
        ts, gs = self._schedule(s.steps, random=False)

        def randn() -> Tensor:
            shape = (n, *self.event_shape)
            return torch.randn(shape, generator=generator, dtype=self.dtype, device=self.device)

        y = run_backward(
            self,
            self.prior_std * randn(),
            ts,
            gs,
            sampler=s.sampler,
            noise=lambda i: randn() if i > 0 else None,
        )
        x = self.preprocess.inverse(y)
        return SampleOutput(x, {"nfe": self.nfe - start, "steps": s.steps})

    def default_cost_grid(self) -> list[dict[str, Any]]:
        return [{"steps": n} for n in (5, 10, 20, 30, 50, 100)]


# ------------------------------------------------------------- config
def build_diffflow(cfg: DiffFlowSchema, event_shape: tuple[int, ...]) -> DiffFlow:
    """Build a :class:`DiffFlow` from its typed ``model:`` config section."""
    g = cfg.grid
    grid = TimeGrid(name=g.name, t_start=g.t_start, t_end=g.t_end, power=g.power)
    shape = tuple(event_shape)
    drift_net = None
    if not cfg.freeze_drift:
        drift_net = DIFFFLOW_NETS[cfg.drift_net.name](shape, **builder_options(cfg.drift_net))
    return DiffFlow(
        shape,
        score_net=DIFFFLOW_NETS[cfg.score_net.name](shape, **builder_options(cfg.score_net)),
        drift_net=drift_net,
        grid=grid,
        diffusion=build_diffusion(cfg.diffusion.name, grid, **builder_options(cfg.diffusion)),
        base_drift=cfg.base_drift,
        settings=DiffFlowSettings(steps=cfg.steps, sampler=cfg.sampler),
        random_grid=g.random,
        progressive=(tuple(cfg.progressive_steps), tuple(cfg.progressive_iters)),
        prior_std=cfg.prior_std,
        preprocess=cfg.preprocess.build(),
        normalizing_terms=cfg.normalizing_terms,
        backprop=cfg.backprop,
        drift_lr=cfg.drift_lr,
        score_lr=cfg.score_lr,
    )


@register_family("diffflow", DiffFlowSchema)
def _build(cfg: DiffFlowSchema, event_shape: tuple[int, ...], eval_cfg: Any) -> DiffFlow:
    return build_diffflow(cfg, event_shape)
