"""Flow matching: straight conditional paths, minibatch-OT pairing and reflow.

Time convention of the library (docs/methods.md §1): data ``x0`` at t = 0, noise
``x1 ~ N(0, I)`` at t = 1. A pair ``(x0, x1)`` drawn from a coupling defines
the straight conditional path and its velocity (docs/methods.md §7)::

    x_t = (1 − t) x0 + t x1 + σ ε,   ε ~ N(0, I)       (σ = 0: rectified flow)
    u   = x1 − x0

and a vector field ``v(t, x)`` is regressed on ``u`` at ``x_t`` with
``t ~ U[0, 1]`` (conditional flow matching, CFM). The minimiser is the
marginal field ``v*(t, x) = E[u | x_t = x]``, whose flow carries the data
distribution at t = 0 to the noise at t = 1, so the learned field is a CNF:
its likelihood and samples come from :func:`cnf.solve.integrate` like
FFJORD's.

Couplings (:data:`PAIRINGS`):

* ``rectified`` — the independent coupling (rectified flow / I-CFM): pairs
  as drawn. The conditional paths are straight but cross, so the marginal
  flow bends and few-step samplers are biased.
* ``ot`` — minibatch optimal transport (OT-CFM): within each batch the noise
  is re-assigned to the data by the exact OT plan for the squared Euclidean
  cost. With equal batch sizes and uniform weights the plan is a permutation
  (Birkhoff–von Neumann), found by POT's network simplex ``ot.emd`` or, as an
  alternative, by SciPy's ``linear_sum_assignment``. Paths cross less, the
  marginal flow is straighter and cheaper to integrate.

Reflow (Liu et al. 2023): integrate the current model from noise ``x1`` to
``x0 = ODE(x1)`` and retrain on these deterministic pairs; the new coupling's
conditional paths no longer cross in expectation, which straightens the flow
again. :func:`reflow_pairs` generates them and :func:`save_pairs` /
:func:`load_pairs` store them for ``model.reflow_pairs`` (see
``experiments/reflow.py`` for the two-stage procedure).

References:
    Lipman et al., "Flow matching for generative modeling", ICLR 2023, arXiv:2210.02747.
    Liu, Gong & Liu, "Flow straight and fast: learning to generate and transfer
    data with rectified flow", ICLR 2023, arXiv:2209.03003.
    Albergo & Vanden-Eijnden, "Building normalizing flows with stochastic
    interpolants", ICLR 2023, arXiv:2209.15571.
    Tong et al., "Improving and generalizing flow-based generative models with
    minibatch optimal transport", TMLR 2024, arXiv:2302.00482.
    Pooladian et al., "Multisample flow matching", ICML 2023, arXiv:2304.14772.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnf.registry import Registry
from cnf.solve import SolverConfig, SolveStats, integrate

__all__ = [
    "OT_SOLVERS",
    "PAIRINGS",
    "cfm_loss",
    "load_pairs",
    "ot_permutation",
    "pair_batch",
    "path_velocity",
    "reflow_pairs",
    "save_pairs",
    "straight_path",
    "transport_cost",
]

Field = Callable[[Tensor, Tensor], Tensor]


def _per_sample(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` broadcast against ``x`` of shape ``(B, *event)``: scalar or ``(B,)`` in."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def straight_path(
    x0: Tensor,
    x1: Tensor,
    t: Tensor | float,
    *,
    sigma: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """Point ``x_t = (1 − t) x0 + t x1 + σ ε`` of the conditional path.

    Args:
        x0: Data end (t = 0), ``(B, *event)``.
        x1: Noise end (t = 1), same shape.
        t: Scalar or per-sample times ``(B,)`` in ``[0, 1]``.
        sigma: Standard deviation of the path noise (constant in t, as in
            I-CFM/OT-CFM of Tong et al.); 0 gives the deterministic path.
        noise: The ``ε`` to use (drawn with ``torch.randn`` when None and σ > 0).
    """
    tt = _per_sample(t, x0)
    xt = (1 - tt) * x0 + tt * x1
    if sigma > 0:
        if noise is None:
            noise = torch.randn_like(x0)
        xt = xt + sigma * noise
    return xt


def path_velocity(x0: Tensor, x1: Tensor) -> Tensor:
    """Regression target ``u = d x_t / dt = x1 − x0`` (σ is constant in t, so it adds nothing)."""
    return x1 - x0


def transport_cost(x0: Tensor, x1: Tensor) -> Tensor:
    """Squared Euclidean distance ``‖x0 − x1‖²`` of each pair, shape ``(B,)``."""
    return (x0 - x1).pow(2).reshape(x0.shape[0], -1).sum(1)


def _cost_matrix(x0: Tensor, x1: Tensor) -> np.ndarray:
    a = x0.detach().reshape(x0.shape[0], -1).double().cpu()
    b = x1.detach().reshape(x1.shape[0], -1).double().cpu()
    return torch.cdist(a, b).pow(2).numpy()


def _emd_permutation(cost: np.ndarray) -> np.ndarray:
    import ot

    n = cost.shape[0]
    w = np.full(n, 1.0 / n)
    # Scaling the cost does not change the plan; it keeps the simplex's
    # reduced costs O(1). numItermax: POT's default (1e5) can stop early on
    # batches of a few hundred points and return a non-optimal plan.
    scale = cost.max() if cost.max() > 0 else 1.0
    plan = ot.emd(w, w, cost / scale, numItermax=10_000_000)
    perm = plan.argmax(axis=1)
    # The network simplex returns a vertex of the transport polytope — a
    # permutation for uniform weights. Should it ever return a fractional plan
    # (degenerate ties), fall back to the exact assignment of the same cost.
    if len(np.unique(perm)) != n:
        return _assignment_permutation(cost)
    return perm


def _assignment_permutation(cost: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(cost.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


OT_SOLVERS: Registry[Callable[[np.ndarray], np.ndarray]] = Registry(
    "OT solver", {"emd": _emd_permutation, "assignment": _assignment_permutation}
)


def ot_permutation(x0: Tensor, x1: Tensor, *, solver: str = "emd") -> Tensor:
    """Exact minibatch OT assignment for the squared Euclidean cost.

    Args:
        x0, x1: Two batches of the same size ``(B, *event)``.
        solver: ``emd`` (POT network simplex) or ``assignment``
            (``scipy.optimize.linear_sum_assignment``, Jonker–Volgenant).

    Returns:
        ``perm`` of shape ``(B,)`` (long, on ``x1``'s device) such that pairing
        ``x0[i]`` with ``x1[perm[i]]`` minimises ``Σ_i ‖x0[i] − x1[perm[i]]‖²``.
    """
    if x0.shape[0] != x1.shape[0]:
        raise ValueError(f"OT pairing needs equal batch sizes, got {x0.shape[0]} and {x1.shape[0]}")
    perm = OT_SOLVERS[solver](_cost_matrix(x0, x1))
    return torch.as_tensor(perm, dtype=torch.long, device=x1.device)


def _independent(x0: Tensor, x1: Tensor, **_: Any) -> tuple[Tensor, Tensor]:
    return x0, x1


def _minibatch_ot(x0: Tensor, x1: Tensor, *, ot_solver: str = "emd") -> tuple[Tensor, Tensor]:
    return x0, x1[ot_permutation(x0, x1, solver=ot_solver)]


PAIRINGS: Registry[Callable[..., tuple[Tensor, Tensor]]] = Registry(
    "pairing", {"rectified": _independent, "ot": _minibatch_ot}
)


def pair_batch(
    x0: Tensor, x1: Tensor, *, pairing: str = "rectified", ot_solver: str = "emd"
) -> tuple[Tensor, Tensor]:
    """Couple a data batch with a noise batch: returns ``(x0, x1')`` with ``x1'`` re-ordered.

    Args:
        pairing: ``rectified`` (independent: as drawn) or ``ot`` (minibatch OT).
        ot_solver: For ``ot``: ``emd`` or ``assignment`` (see :func:`ot_permutation`).
    """
    return PAIRINGS[pairing](x0, x1, ot_solver=ot_solver)


def cfm_loss(
    field: Field,
    x0: Tensor,
    x1: Tensor,
    *,
    sigma: float = 0.0,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Conditional flow-matching loss per pair, ``mean_d (v(t, x_t) − (x1 − x0))_d²``.

    The expectation over ``t ~ U[0, 1]`` and the pairs is minimised by the
    marginal field ``E[x1 − x0 | x_t]`` (Lipman et al. 2023, Thm. 2; Tong et
    al. 2024, Prop. 3.3). The mean over dimensions (not the sum) keeps the
    loss scale independent of D, like torchcfm's MSE.

    Args:
        field: ``v(t, x)`` taking per-sample times ``(B,)`` and ``x_t`` ``(B, *event)``.
        x0, x1: Paired data and noise, ``(B, *event)``.
        sigma: Path noise σ.
        t: Times ``(B,)``; drawn ``U[0, 1)`` when None.
        noise: Path noise ``ε`` (drawn when None and σ > 0).
        generator: For ``t`` and ``ε`` when they are drawn here.

    Returns:
        Per-pair loss, shape ``(B,)``.
    """
    batch = x0.shape[0]
    if t is None:
        t = torch.rand(batch, generator=generator, dtype=x0.dtype, device=x0.device)
    if sigma > 0 and noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    xt = straight_path(x0, x1, t, sigma=sigma, noise=noise)
    residual = field(t, xt) - path_velocity(x0, x1)
    return residual.pow(2).reshape(batch, -1).mean(1)


@torch.no_grad()
def reflow_pairs(
    field: Field,
    noise: Tensor,
    *,
    solver: SolverConfig,
    batch_size: int = 0,
) -> tuple[Tensor, Tensor, list[SolveStats]]:
    """Couple each noise point with the model's sample from it: ``x0 = ODE_{1→0}(x1)``.

    The pairs are exactly what the model's sampler produces: one
    :func:`cnf.solve.integrate` from t = 1 to t = 0 per batch with ``solver``.

    Args:
        field: The learned field ``v(t, x)`` on flat ``(B, D)`` states.
        noise: ``x1``, shape ``(N, D)``.
        solver: Solver of the sampling solve (an accurate one: reflow copies
            the solver's error into the next model).
        batch_size: Solve in chunks of this size (0: all at once).

    Returns:
        ``(x0, x1, stats)`` with ``x0``, ``x1`` of shape ``(N, D)`` and the
        statistics of each solve.
    """
    chunk = batch_size or noise.shape[0]
    xs, stats = [], []
    for i in range(0, noise.shape[0], chunk):
        sol = integrate(field, noise[i : i + chunk], t0=1.0, t1=0.0, solver=solver)
        xs.append(sol.z)
        stats.append(sol.stats)
    return torch.cat(xs), noise, stats


def save_pairs(path: str | Path, x0: Tensor, x1: Tensor, **meta: Any) -> None:
    """Store reflow pairs (and provenance ``meta``: source run, solver, ...) with ``torch.save``."""
    if x0.shape != x1.shape:
        raise ValueError(
            f"pairs must have equal shapes, got {tuple(x0.shape)} and {tuple(x1.shape)}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"x0": x0.detach().cpu(), "x1": x1.detach().cpu(), "meta": dict(meta)}, path)


def load_pairs(path: str | Path) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Read pairs written by :func:`save_pairs`; raises ``ValueError`` (one line) if unusable."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reflow pairs file not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read reflow pairs {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(blob, dict) or not {"x0", "x1"} <= set(blob):
        raise ValueError(f"reflow pairs {path}: expected a dict with keys x0, x1")
    x0, x1 = blob["x0"], blob["x1"]
    if x0.shape != x1.shape or x0.dim() < 2 or x0.shape[0] == 0:
        raise ValueError(f"reflow pairs {path}: bad shapes {tuple(x0.shape)} / {tuple(x1.shape)}")
    return x0, x1, dict(blob.get("meta", {}))
