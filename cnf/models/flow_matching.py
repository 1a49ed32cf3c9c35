"""Flow matching (rectified flow, OT-CFM, reflow) as a :class:`~cnf.models.base.GenerativeModel`.

Training is simulation-free: the loss regresses a time-conditioned MLP
``v_θ(t, x)`` on the velocity ``x1 − x0`` of straight paths between data
``x0`` (t = 0) and noise ``x1 ~ N(0, I)`` (t = 1) — see
:mod:`cnf.diffusion.flow_matching`. The learned field is a CNF in the
library's convention (DESIGN.md §1.6), so everything else is FFJORD's code:

* ``evaluate`` integrates ``[z, logdet]`` from t = 0 (data) to t = 1 with
  :func:`cnf.solve.integrate` and the configured divergence estimator
  (exact in low dimension, Hutchinson for images):
  ``log p(x) = log N(z(1); 0, I) + ∫_0^1 ∇·v dt`` (+ the logit log-det);
* ``sample`` integrates ``z ~ N(0, I)`` from t = 1 back to t = 0.

Both take a ``cost`` mapping: ``method`` (any torchdiffeq method: ``euler``,
``midpoint``, ``rk4`` with ``steps``; ``dopri5`` with ``rtol``/``atol``) and,
for ``evaluate``, ``divergence`` (``exact`` | ``hutchinson``), ``probe``,
``num_probes``. NFE is reported by the solve.

Images are flattened inside the model (the MLP sees ``(B, D)``), so the model
accepts any event shape; reflow pairs live in this flat model space (after the
optional logit transform).

References:
    Lipman et al., "Flow matching for generative modeling", ICLR 2023.
    Liu, Gong & Liu, "Flow straight and fast", ICLR 2023.
    Tong et al., "Improving and generalizing flow-based generative models with
    minibatch optimal transport", TMLR 2024.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cnf.diffusion.flow_matching import (
    cfm_loss,
    load_pairs,
    pair_batch,
    reflow_pairs,
    transport_cost,
)
from cnf.divergence import DivergenceEstimator, build_divergence
from cnf.flows.base import standard_normal_logprob
from cnf.flows.logit import LogitTransform
from cnf.models.base import EvalOutput, GenerativeModel, LossOutput
from cnf.nets import TimeMLP
from cnf.solve import SolverConfig, integrate

__all__ = ["FlowMatchingModel", "FlowMatchingSchema", "build_flow_matching"]


@dataclass
class FlowMatchingSchema:
    """``model:`` section for ``family: fm``."""

    family: str = "fm"
    pairing: str = "rectified"  # rectified (independent coupling) | ot (minibatch OT-CFM)
    ot_solver: str = "emd"  # emd (POT network simplex) | assignment (scipy, Hungarian-type)
    sigma: float = 0.0  # path noise σ: x_t = (1−t)x0 + t x1 + σ ε
    hidden_dims: list[int] = field(default_factory=lambda: [64, 64, 64])
    layer: str = "concat"  # time conditioning of every layer (cnf.nets.LAYERS)
    activation: str = "selu"
    zero_init: bool = False
    logit_alpha: float = 0.0  # > 0: model y = logit(α + (1−2α)x) of data in [0, 1]
    reflow_pairs: str | None = None  # train on (x0, x1) pairs from experiments/reflow.py
    init_from: str | None = None  # run folder or checkpoint whose weights start training


class FlowMatchingModel(GenerativeModel):
    """A vector field trained by conditional flow matching; a CNF at evaluation.

    Args:
        field: ``v(t, x)`` on flat states ``(B, D)``; ``t`` scalar or ``(B,)``.
        event_shape: Shape of one data sample (flattened inside).
        pairing: ``rectified`` or ``ot`` (:data:`cnf.diffusion.flow_matching.PAIRINGS`).
        ot_solver: ``emd`` or ``assignment``.
        sigma: Path noise σ.
        eval_solver: Default solver of ``evaluate`` and ``sample``.
        eval_divergence: Default divergence estimator of ``evaluate``.
        logit_alpha: If > 0, the field models ``logit(α + (1 − 2α)x)``.

    Example:
        >>> model = build_flow_matching({"hidden_dims": [32, 32]}, (2,))
        >>> out = model.training_loss(torch.randn(8, 2))
        >>> x, stats = model.sample(4, cost={"method": "euler", "steps": 5})
    """

    def __init__(
        self,
        field: TimeMLP,
        event_shape: tuple[int, ...],
        *,
        pairing: str = "rectified",
        ot_solver: str = "emd",
        sigma: float = 0.0,
        eval_solver: SolverConfig | None = None,
        eval_divergence: DivergenceEstimator | None = None,
        logit_alpha: float = 0.0,
    ):
        super().__init__()
        self.field = field
        self.event_shape = tuple(event_shape)
        self.dim = int(torch.Size(self.event_shape).numel())
        self.pairing, self.ot_solver, self.sigma = pairing, ot_solver, float(sigma)
        self.eval_solver = eval_solver or SolverConfig()
        self.eval_divergence = eval_divergence or build_divergence("exact")
        self.logit = LogitTransform(logit_alpha) if logit_alpha > 0 else None
        # Reflow pairs are data, not weights: not saved in checkpoints (the
        # config names their file), but moved with the model by .to().
        self.register_buffer("pairs_x0", None, persistent=False)
        self.register_buffer("pairs_x1", None, persistent=False)

    # ------------------------------------------------------------- spaces
    def to_model_space(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data ``(B, *event)`` → flat model space ``(B, D)`` and the log-det of the map."""
        logdet = x.new_zeros(x.shape[0])
        if self.logit is not None:
            x, logdet = self.logit(x)
        return x.reshape(x.shape[0], self.dim), logdet

    def to_data_space(self, y: Tensor) -> Tensor:
        """Flat model space ``(B, D)`` → data ``(B, *event)``."""
        x = y.reshape(y.shape[0], *self.event_shape)
        return self.logit.inverse(x) if self.logit is not None else x

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
    def training_loss(self, x: Tensor) -> LossOutput:
        """CFM regression loss on a batch (mean over pairs and dimensions).

        With reflow pairs set, ``x`` only gives the batch size: the pairs are
        drawn from the stored set with the global RNG (seeded per iteration
        by the training loop, so runs stay reproducible and resumable).
        """
        batch = x.shape[0]
        if self.pairs_x0 is not None:
            idx = torch.randint(0, self.pairs_x0.shape[0], (batch,), device=self.pairs_x0.device)
            x0, x1 = self.pairs_x0[idx], self.pairs_x1[idx]
        else:
            x0, _ = self.to_model_space(x)
            x1 = torch.randn_like(x0)
            x0, x1 = pair_batch(x0, x1, pairing=self.pairing, ot_solver=self.ot_solver)
        loss = cfm_loss(self.field, x0, x1, sigma=self.sigma).mean()
        stats = {
            "cfm": float(loss.detach()),
            # Mean ‖x0 − x1‖² of the pairs: what OT pairing minimises.
            "transport_cost": float(transport_cost(x0, x1).mean()),
        }
        return LossOutput(loss, stats)

    # ------------------------------------------------------------- cost knob
    def _settings(self, cost: Mapping[str, Any] | None) -> tuple[SolverConfig, DivergenceEstimator]:
        solver, div = self.eval_solver, self.eval_divergence
        if not cost:
            return solver, div
        cost = dict(cost)
        if "divergence" in cost:
            div = build_divergence(
                cost.pop("divergence"),
                probe=cost.pop("probe", "rademacher"),
                num_probes=cost.pop("num_probes", 1),
                generator=cost.pop("generator", None),
            )
        for key in ("probe", "num_probes", "generator"):
            cost.pop(key, None)  # only meaningful with a divergence; sampling ignores them
        if cost:
            unknown = set(cost) - set(SolverConfig.__dataclass_fields__)
            if unknown:
                raise ValueError(
                    f"unknown cost key(s) {', '.join(sorted(unknown))}; valid: method, rtol, "
                    "atol, steps, adjoint, divergence, probe, num_probes"
                )
            if "steps" in cost and "method" not in cost and not solver.fixed_step:
                raise ValueError("cost 'steps' needs a fixed-step 'method' (e.g. euler, midpoint)")
            solver = solver.with_(**cost)
        return solver, div

    # ------------------------------------------------------------- likelihood
    def log_prob(
        self,
        x: Tensor,
        *,
        solver: SolverConfig | None = None,
        divergence: DivergenceEstimator | None = None,
    ) -> tuple[Tensor, int]:
        """``log p(x)`` per sample ``(B,)`` in nats and the NFE of the solve (t: 0 → 1)."""
        y, logdet_pre = self.to_model_space(x)
        sol = integrate(
            self.field,
            y,
            t0=0.0,
            t1=1.0,
            solver=solver or self.eval_solver,
            divergence=divergence or self.eval_divergence,
        )
        logp = standard_normal_logprob(sol.z) + sol.logdet + logdet_pre
        return logp, sol.stats.nfe_forward

    @torch.no_grad()
    def evaluate(self, x: Tensor, *, cost: Mapping[str, Any] | None = None) -> EvalOutput:
        solver, div = self._settings(cost)
        logp, nfe = self.log_prob(x, solver=solver, divergence=div)
        return EvalOutput(nll=-logp, stats={"nfe": nfe})

    # ------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        cost: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        solver, _ = self._settings(cost)
        z = torch.randn((n, self.dim), generator=generator, dtype=self.dtype, device=self.device)
        sol = integrate(self.field, z, t0=1.0, t1=0.0, solver=solver)
        return self.to_data_space(sol.z), {"nfe": sol.stats.nfe_forward}

    @torch.no_grad()
    def reflow_pairs(
        self,
        n: int,
        *,
        cost: Mapping[str, Any] | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 10_000,
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """``n`` pairs ``(x0 = ODE_{1→0}(x1), x1)`` in model space for the next reflow stage.

        Returns:
            ``x0``, ``x1`` of shape ``(n, D)`` and ``{"nfe": mean NFE per solve}``.
        """
        solver, _ = self._settings(cost)
        z = torch.randn((n, self.dim), generator=generator, dtype=self.dtype, device=self.device)
        x0, x1, stats = reflow_pairs(self.field, z, solver=solver, batch_size=batch_size)
        nfe = sum(s.nfe_forward for s in stats) / max(1, len(stats))
        return x0, x1, {"nfe": nfe}

    def default_cost_grid(self) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = [
            {"method": m, "steps": s} for m in ("euler", "midpoint") for s in (1, 2, 5, 10, 20)
        ]
        grid += [{"method": "dopri5", "rtol": tol, "atol": tol} for tol in (1e-2, 1e-3, 1e-4, 1e-5)]
        return grid


def _load_weights(model: FlowMatchingModel, source: str) -> None:
    """Start from another run's weights (its EMA weights when it kept them)."""
    path = Path(source)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise ValueError(f"model.init_from: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(
            f"model.init_from: {path} does not fit this model ({str(e).splitlines()[0]})"
        ) from None


def build_flow_matching(
    cfg: Mapping[str, Any],
    event_shape: tuple[int, ...],
    *,
    eval_solver: SolverConfig | None = None,
    eval_divergence: DivergenceEstimator | None = None,
) -> FlowMatchingModel:
    """Build a flow-matching model from its ``model:`` config section (missing keys: defaults)."""
    c = {**FlowMatchingSchema().__dict__, **dict(cfg)}
    dim = int(torch.Size(tuple(event_shape)).numel())
    net = TimeMLP(
        dim,
        tuple(c["hidden_dims"]),
        layer=c["layer"],
        activation=c["activation"],
        zero_init=c["zero_init"],
    )
    model = FlowMatchingModel(
        net,
        event_shape,
        pairing=c["pairing"],
        ot_solver=c["ot_solver"],
        sigma=c["sigma"],
        eval_solver=eval_solver,
        eval_divergence=eval_divergence,
        logit_alpha=c["logit_alpha"],
    )
    if c["init_from"]:
        _load_weights(model, c["init_from"])
    if c["reflow_pairs"]:
        x0, x1, _ = load_pairs(c["reflow_pairs"])
        model.set_reflow_pairs(x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1))
    return model
