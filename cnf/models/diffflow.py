"""DiffFlow as a :class:`~cnf.models.base.GenerativeModel` (family ``diffflow``).

Forward SDE ``dx = f_θ(x,t)dt + g(t)dw`` from the data (``t = t_start``) to
the prior ``N(0, σ²I)`` (``t = t_end``), backward SDE with drift
``f_θ − g²s_φ``, both discretised on ``N`` steps (DESIGN.md §1.4;
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

An optional exact affine input map ``y = (x − input_shift)/input_scale``
(the released code standardises 2-D data and maps images to [−1, 1]) adds
``D·log(input_scale)`` to the NELBO so it stays in the data's units.

References:
    Zhang & Chen, "Diffusion Normalizing Flow", NeurIPS 2021, arXiv:2110.07579.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from cnf.diffflow.chain import BACKPROP_MODES, SAMPLERS, path_nelbo, run_backward
from cnf.diffflow.schedules import (
    BASE_DRIFTS,
    DIFFUSIONS,
    GRIDS,
    DiffusionSchedule,
    TimeGrid,
    build_diffusion,
)
from cnf.models.base import EvalOutput, GenerativeModel, LossOutput
from cnf.nets import ACTIVATIONS, LAYERS, TimeMLP

__all__ = [
    "DIFFFLOW_NETS",
    "DiffFlow",
    "DiffFlowSchema",
    "build_diffflow",
    "validate_diffflow",
]


# ------------------------------------------------------------------ schema
@dataclass
class GridSchema:
    """``model.grid``: see :class:`cnf.diffflow.schedules.TimeGrid`."""

    kind: str = "power"  # uniform | power
    t_start: float = 1e-3
    t_end: float = 0.05
    power: float = 0.9
    random: bool = True  # stratified random grid per training iteration (eval: fixed grid)


@dataclass
class DiffusionSchema:
    """``model.diffusion``: ``g(t)``; each name reads only its own keys."""

    name: str = "constant"  # constant | linear | geometric | vp
    value: float = 0.2  # constant
    start: float = 1.0  # linear, geometric: g at t_start
    end: float = 1.0  # linear, geometric: g at t_end
    beta_min: float = 0.1  # vp: g = sqrt(beta), beta linear in normalised time
    beta_max: float = 20.0


@dataclass
class NetSchema:
    """``model.drift_net`` / ``model.score_net``."""

    name: str = "mlp"  # mlp (TimeMLP on flattened x) | unet (cnf.diffusion.unet, when present)
    hidden_dims: list[int] = field(default_factory=lambda: [128, 128, 128])
    layer: str = "concatsquash"
    activation: str = "swish"
    zero_init: bool = True  # start at f = f_base, s = 0
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments (unet)


@dataclass
class DiffFlowSchema:
    """``model:`` section for ``family: diffflow``.

    ``progressive_steps``/``progressive_iters``: train with
    ``progressive_steps[k]`` steps up to iteration ``progressive_iters[k]``,
    then with ``steps`` (which is also the evaluation/sampling default).
    ``drift_lr``/``score_lr``: per-network learning rates (null: ``train.lr``);
    the cosine/warm-up schedule scales both.
    """

    family: str = "diffflow"
    steps: int = 30
    progressive_steps: list[int] = field(default_factory=list)
    progressive_iters: list[int] = field(default_factory=list)
    grid: GridSchema = field(default_factory=GridSchema)
    diffusion: DiffusionSchema = field(default_factory=DiffusionSchema)
    base_drift: str = "zero"  # zero | vp (f = −½ g(t)² x)
    freeze_drift: bool = False  # no learned drift: fixed-drift diffusion with f = f_base
    prior_std: float = 1.0
    input_shift: float = 0.0
    input_scale: float = 1.0
    normalizing_terms: bool = True  # D·Σ log(g_{i+1}/g_i); false = the released code's value
    backprop: str = "autograd"  # autograd | checkpointed
    sampler: str = "sde"  # default sampler: sde | ode
    drift_net: NetSchema = field(default_factory=NetSchema)
    score_net: NetSchema = field(default_factory=NetSchema)
    drift_lr: float | None = None
    score_lr: float | None = None


# ----------------------------------------------------------------- networks
class FlatTimeMLP(nn.Module):
    """:class:`~cnf.nets.TimeMLP` on flattened inputs: ``(t, x (B, *shape)) -> (B, *shape)``."""

    def __init__(self, event_shape: tuple[int, ...], cfg: Mapping[str, Any]):
        super().__init__()
        self.mlp = TimeMLP(
            math.prod(event_shape),
            tuple(cfg["hidden_dims"]),
            layer=cfg["layer"],
            activation=cfg["activation"],
            zero_init=cfg["zero_init"],
        )

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.mlp(t, x.flatten(1)).view_as(x)


def _unet(event_shape: tuple[int, ...], cfg: Mapping[str, Any]) -> nn.Module:
    """:class:`cnf.diffusion.unet.UNet` (its output starts at 0 whatever ``zero_init`` says).

    ``options`` go to its constructor; ``options.image_shape`` (C, H, W) is
    needed when the data are stored flattened (``data.flatten: true``).
    """
    from cnf.diffusion.unet import UNet

    options = dict(cfg["options"])
    image_shape = tuple(options.pop("image_shape", event_shape))
    if len(image_shape) != 3 or math.prod(image_shape) != math.prod(event_shape):
        raise ValueError(
            f"net 'unet' needs image data (C, H, W): set data.flatten=false or "
            f"options.image_shape; got event shape {event_shape}"
        )
    return UNet(image_shape, **options)


# name → (event_shape, net config) -> module with forward(t, x), t a (B,) or 0-dim tensor in [0, 1].
DIFFFLOW_NETS: dict[str, Callable[[tuple[int, ...], Mapping[str, Any]], nn.Module]] = {
    "mlp": FlatTimeMLP,
    "unet": _unet,
}


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
        steps: ``N`` at the end of training and by default at evaluation.
        progressive: ``(steps_list, iters_list)`` for training with fewer steps early.
        prior_std: ``σ``.
        input_shift, input_scale: Exact affine map of the data before the chain.
        normalizing_terms: Include ``D·Σ log(g_{i+1}/g_i)``.
        backprop: ``autograd`` or ``checkpointed``.
        sampler: Default sampler, ``sde`` or ``ode``.
        drift_lr, score_lr: Learning rates of the two networks (None: the base lr).

    The networks see the normalised time ``u = (t − t_start)/(t_end − t_start)``:
    the released 2-D interval [0.001, 0.05] is too narrow for a time input to
    be told apart by a network otherwise.

    Example:
        >>> from cnf.config import load_config
        >>> cfg = load_config("configs/diffflow/toy.yaml")  # doctest: +SKIP
        >>> model = build_diffflow(cfg["model"], (2,))  # doctest: +SKIP
        >>> x, stats = model.sample(16, cost={"steps": 10})  # doctest: +SKIP
    """

    def __init__(
        self,
        event_shape: tuple[int, ...],
        *,
        score_net: nn.Module,
        drift_net: nn.Module | None,
        grid: TimeGrid,
        diffusion: DiffusionSchedule,
        base_drift: str = "zero",
        steps: int = 30,
        random_grid: bool = True,
        progressive: tuple[tuple[int, ...], tuple[int, ...]] = ((), ()),
        prior_std: float = 1.0,
        input_shift: float = 0.0,
        input_scale: float = 1.0,
        normalizing_terms: bool = True,
        backprop: str = "autograd",
        sampler: str = "sde",
        drift_lr: float | None = None,
        score_lr: float | None = None,
    ):
        super().__init__()
        self.event_shape = tuple(event_shape)
        self.score_net, self.drift_net = score_net, drift_net
        self.grid, self.diffusion = grid, diffusion
        self.base_drift = BASE_DRIFTS[base_drift]
        self.steps, self.random_grid = steps, random_grid
        self.progressive = (tuple(progressive[0]), tuple(progressive[1]))
        self.prior_std = prior_std
        self.input_shift, self.input_scale = input_shift, input_scale
        self.normalizing_terms, self.backprop, self.sampler = normalizing_terms, backprop, sampler
        self.drift_lr, self.score_lr = drift_lr, score_lr
        self.train_steps = self.steps_at(0)
        self.nfe = 0  # network evaluations, counted by drift() and score()
        self._nfe_after_forward = 0

    # ------------------------------------------------------------ dynamics
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """``f(x, t) = f_base(x, g(t)) + drift_net(u, x)``; ``t`` 0-dim."""
        f = self.base_drift(x, self.diffusion(t))
        if self.drift_net is not None:
            self.nfe += 1
            f = f + self.drift_net(self.grid.normalise(t), x)
        return f

    def score(self, x: Tensor, t: Tensor) -> Tensor:
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

    def set_iteration(self, iteration: int) -> None:
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

    def _to_latent(self, x: Tensor) -> tuple[Tensor, float]:
        # Exact affine change of variables: −log p(x) = −log p(y) + D·log(scale).
        y = (x - self.input_shift) / self.input_scale
        return y, math.prod(self.event_shape) * math.log(self.input_scale)

    def nelbo(self, x: Tensor, *, steps: int, random_grid: bool = False) -> tuple[Tensor, dict]:
        """Path NELBO per sample ``(B,)`` in nats (an upper bound on ``−log p_B(x)``)."""
        y, logdet = self._to_latent(x)
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
        return out.nelbo + logdet, stats

    def training_loss(self, x: Tensor) -> LossOutput:
        start = self.nfe
        nelbo, stats = self.nelbo(x, steps=self.train_steps, random_grid=self.random_grid)
        loss = nelbo.mean()
        self._nfe_after_forward = self.nfe
        stats.update(
            nelbo=float(loss.detach()), steps=self.train_steps, nfe_forward=self.nfe - start
        )
        return LossOutput(loss, stats)

    def backward_stats(self) -> dict[str, float]:
        # The checkpointed backward pass re-evaluates the networks; autograd does not.
        return {"nfe_backward": self.nfe - self._nfe_after_forward}

    def _cost(self, cost: Mapping[str, Any] | None) -> tuple[int, str]:
        cost = dict(cost or {})
        unknown = set(cost) - {"steps", "sampler"}
        if unknown:
            raise ValueError(
                f"diffflow cost: unknown key(s) {', '.join(sorted(unknown))}; valid: sampler, steps"
            )
        steps = int(cost.get("steps", self.steps))
        sampler = cost.get("sampler", self.sampler)
        if steps < 1:
            raise ValueError(f"diffflow cost: steps must be >= 1, got {steps}")
        if sampler not in SAMPLERS:
            raise ValueError(
                f"diffflow cost: unknown sampler '{sampler}'; valid: {', '.join(SAMPLERS)}"
            )
        return steps, sampler

    @torch.no_grad()
    def evaluate(self, x: Tensor, *, cost: Mapping[str, Any] | None = None) -> EvalOutput:
        """NELBO per sample on the fixed ``steps``-step grid (``sampler`` does not change it)."""
        steps, _ = self._cost(cost)
        start = self.nfe
        nelbo, stats = self.nelbo(x, steps=steps)
        stats.update(nfe=self.nfe - start, steps=steps)
        return EvalOutput(nll=None, nelbo=nelbo, stats=stats)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        cost: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """``n`` samples from the backward chain (noise-free last step) or its ODE variant."""
        steps, sampler = self._cost(cost)
        start = self.nfe
        ts, gs = self._schedule(steps, random=False)

        def randn() -> Tensor:
            shape = (n, *self.event_shape)
            return torch.randn(shape, generator=generator, dtype=self.dtype, device=self.device)

        y = run_backward(
            self,
            self.prior_std * randn(),
            ts,
            gs,
            sampler=sampler,
            noise=lambda i: randn() if i > 0 else None,
        )
        x = y * self.input_scale + self.input_shift
        return x, {"nfe": self.nfe - start, "steps": steps}

    def default_cost_grid(self) -> list[dict[str, Any]]:
        return [{"steps": n} for n in (5, 10, 20, 30, 50, 100)]


# ------------------------------------------------------------- config glue
def _check(key: str, value: Any, valid: Any) -> None:
    if value not in valid:
        raise ValueError(f"{key}: unknown value '{value}'; valid: {', '.join(sorted(valid))}")


def validate_diffflow(m: Mapping[str, Any]) -> None:
    """Raise ``ValueError("model.key: message")`` for a bad ``model:`` section."""
    _check("model.base_drift", m["base_drift"], BASE_DRIFTS)
    _check("model.backprop", m["backprop"], BACKPROP_MODES)
    _check("model.sampler", m["sampler"], SAMPLERS)
    _check("model.grid.kind", m["grid"]["kind"], GRIDS)
    _check("model.diffusion.name", m["diffusion"]["name"], DIFFUSIONS)
    for net in ("drift_net", "score_net"):
        _check(f"model.{net}.name", m[net]["name"], DIFFFLOW_NETS)
        if m[net]["name"] == "mlp":
            _check(f"model.{net}.layer", m[net]["layer"], LAYERS)
            _check(f"model.{net}.activation", m[net]["activation"], ACTIVATIONS)
            if not m[net]["hidden_dims"] or any(h < 1 for h in m[net]["hidden_dims"]):
                raise ValueError(f"model.{net}.hidden_dims: needs one or more positive widths")
    if m["steps"] < 1:
        raise ValueError(f"model.steps: must be >= 1, got {m['steps']}")
    steps, iters = list(m["progressive_steps"]), list(m["progressive_iters"])
    if len(steps) != len(iters):
        raise ValueError("model.progressive_steps/progressive_iters: need the same length")
    if any(s < 1 for s in steps) or any(b <= a for a, b in zip(iters, iters[1:])):
        raise ValueError(
            "model.progressive_iters: must increase, and progressive_steps must be >= 1"
        )
    for key in ("prior_std", "input_scale"):
        if m[key] <= 0:
            raise ValueError(f"model.{key}: must be > 0, got {m[key]}")
    for key in ("drift_lr", "score_lr"):
        if m[key] is not None and m[key] <= 0:
            raise ValueError(f"model.{key}: must be > 0 (or null for train.lr), got {m[key]}")
    try:
        g = m["grid"]
        grid = TimeGrid(kind=g["kind"], t_start=g["t_start"], t_end=g["t_end"], power=g["power"])
        build_diffusion(m["diffusion"], grid)
    except ValueError as e:
        raise ValueError(f"model.grid/model.diffusion: {e}") from None


def build_diffflow(cfg: Mapping[str, Any], event_shape: tuple[int, ...]) -> DiffFlow:
    """Build a :class:`DiffFlow` from its ``model:`` config section."""
    g = cfg["grid"]
    grid = TimeGrid(kind=g["kind"], t_start=g["t_start"], t_end=g["t_end"], power=g["power"])
    shape = tuple(event_shape)
    drift_net = None
    if not cfg["freeze_drift"]:
        drift_net = DIFFFLOW_NETS[cfg["drift_net"]["name"]](shape, cfg["drift_net"])
    return DiffFlow(
        shape,
        score_net=DIFFFLOW_NETS[cfg["score_net"]["name"]](shape, cfg["score_net"]),
        drift_net=drift_net,
        grid=grid,
        diffusion=build_diffusion(cfg["diffusion"], grid),
        base_drift=cfg["base_drift"],
        steps=cfg["steps"],
        random_grid=g["random"],
        progressive=(tuple(cfg["progressive_steps"]), tuple(cfg["progressive_iters"])),
        prior_std=cfg["prior_std"],
        input_shift=cfg["input_shift"],
        input_scale=cfg["input_scale"],
        normalizing_terms=cfg["normalizing_terms"],
        backprop=cfg["backprop"],
        sampler=cfg["sampler"],
        drift_lr=cfg["drift_lr"],
        score_lr=cfg["score_lr"],
    )
