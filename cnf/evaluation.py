"""Evaluation: held-out NLL / NELBO, the paired entropy gap, bits/dim, sample statistics.

The one place every evaluated number comes from — training's ``final.json``,
``experiments/evaluate.py``, the likelihood-vs-cost tool and the tables'
definitions all call these functions, so a number means the same thing
wherever it is printed.

**Common random numbers.** :func:`evaluate_points` forks the global RNG and
seeds it with ``seed`` (Hutchinson probes, SDE noise), and dequantises image
batches with a numpy generator seeded from ``seed`` in order, so the noise
does not depend on the batch size; two evaluations with the same settings
give identical numbers, and different settings or models are compared on
the same randomness.

**The entropy gap** (docs/methods.md §8). Where the data density ``p`` is
known (8gaussians, checkerboard) the evaluation reports, on the *same* test
points ``x_i``:

* ``floor`` = mean ``−log p(x_i)``: what the true density itself would score
  on these points (≈ the entropy ``H``, up to the test set's own noise);
* ``gap`` = mean ``(log p(x_i) − log q(x_i))`` = ``test_nll − floor``, the Monte
  Carlo estimate of ``KL(p ‖ q)``, with its **paired** standard error
  ``gap_stderr`` (the test points' own noise cancels);
* ``entropy`` = the analytic ``H``, kept separately.

Reported NLLs are in nats of the data as stored: a data set's
``nll_offset`` (the log-determinant of its standardisation) is added.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnf.metrics import bits_per_dim, mean_stderr, mmd2_rbf, probe_stderr
from cnf.settings import describe

__all__ = [
    "MAX_SAMPLE_STAT_DIM",
    "MMD_BANDWIDTHS",
    "MMD_KERNEL",
    "PointEvaluation",
    "draw_samples",
    "evaluate_points",
    "sample_statistics",
    "settings_record",
    "summarize",
]

MMD_BANDWIDTHS: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0)
MMD_KERNEL = (
    "unbiased MMD^2, kernel k(a,b) = sum over s in {0.1, 0.5, 1, 2} of exp(-|a-b|^2 / (2 s^2))"
)
# Two-sample statistics on raw coordinates are for low-dimensional data; images use FID/KID.
MAX_SAMPLE_STAT_DIM = 64


@dataclass
class PointEvaluation:
    """Per-point results of one evaluation.

    Attributes:
        nll, nelbo: ``(N,)`` float64 in nats of the data as stored (None if the model has none).
        data_nll: ``(N,)`` ``−log p_data`` of the same points, where the data density is known.
        nfe: Mean function evaluations per evaluation batch (None for models without a solve).
        seconds: Wall time.
        num_points, batch_size, seed: What was evaluated, and how.
        nll_probes: ``(N, K)`` when the NLL is a Hutchinson estimate: the NLL
            once per probe (``nll`` is the row mean), else None.
        nll_is_bound: The model's ``nll`` is an upper bound (``EvalOutput.nll_is_bound``).
    """

    nll: Tensor | None
    nelbo: Tensor | None
    data_nll: Tensor | None
    nfe: float | None
    seconds: float
    num_points: int
    batch_size: int
    seed: int
    nll_probes: Tensor | None = None
    nll_is_bound: bool = False


def _rng_devices(model: Any) -> list[torch.device]:
    return [model.device] if model.device.type == "cuda" else []


@torch.no_grad()
def evaluate_points(
    model: Any,
    x: np.ndarray,
    data: Any,
    *,
    settings: Any = None,
    batch_size: int,
    seed: int,
) -> PointEvaluation:
    """Per-point NLL / NELBO of ``x`` (held-out points of ``data``) under ``settings``.

    Args:
        model: Any :class:`~cnf.models.base.GenerativeModel`.
        x: Held-out points as the data set stores them ``(N, *event_shape)``
            (image data: integer levels, dequantised here).
        data: The :class:`~cnf.data.Dataset` they come from (its
            ``eval_transform``, ``nll_offset`` and ``log_density``).
        settings: The model's typed settings (None: its defaults).
        batch_size: Points per ``evaluate`` call.
        seed: Common-random-numbers seed (module docstring).
    """
    nll, nelbo, nfe, nll_probes = [], [], [], []
    nll_is_bound = False
    transform = data.eval_transform
    transform_rng = np.random.default_rng([seed, 0x0DE9])
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            if transform is not None:
                xb = transform(xb, transform_rng)
            xb = torch.as_tensor(xb, dtype=model.dtype, device=model.device)
            out = model.evaluate(xb, settings)
            if out.nll is not None:
                nll.append(out.nll.double().cpu())
                nll_is_bound = nll_is_bound or out.nll_is_bound
            if out.nelbo is not None:
                nelbo.append(out.nelbo.double().cpu())
            if out.nll_probes is not None:
                nll_probes.append(out.nll_probes.double().cpu())
            if "nfe" in out.stats:
                nfe.append(float(out.stats["nfe"]))
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - t0
    offset = float(getattr(data, "nll_offset", 0.0))
    data_nll = None
    if data.log_density is not None and transform is None:
        data_nll = -torch.as_tensor(data.log_density(np.asarray(x)), dtype=torch.float64)
    return PointEvaluation(
        nll=torch.cat(nll) + offset if nll else None,
        nelbo=torch.cat(nelbo) + offset if nelbo else None,
        data_nll=data_nll,
        nfe=float(np.mean(nfe)) if nfe else None,
        seconds=seconds,
        num_points=len(x),
        batch_size=batch_size,
        seed=seed,
        nll_probes=torch.cat(nll_probes) + offset if nll_probes else None,
        nll_is_bound=nll_is_bound,
    )


def summarize(result: PointEvaluation, data: Any, *, prefix: str = "") -> dict[str, Any]:
    """Means, standard errors, the paired gap to the data's floor, and bits/dim.

    Keys (``prefix`` on the model's own numbers, e.g. ``test_``): ``{p}nll``,
    ``{p}nll_stderr``, ``{p}nelbo``, ``{p}nelbo_stderr``, ``{p}nfe``; where the
    data density is known ``floor``, ``floor_stderr``, ``gap``, ``gap_stderr``
    (NLL − log-density of the same points, paired), ``nelbo_gap`` (+ stderr:
    a bound on the KL, not the KL), ``entropy`` and ``entropy_stderr``; for
    image data ``{p}bpd`` (+ stderr, ``{p}nelbo_bpd`` when both exist) and
    ``bpd_convention``; ``nll_offset`` when the data were standardised;
    ``{p}nll_is_bound: true`` when the model's NLL is itself an upper bound.

    When the NLL is a Hutchinson estimate with ``K`` probes per point
    (``result.nll_probes``): ``{p}nll_probes`` = K and, for K ≥ 2,
    ``{p}nll_probe_stderr`` (and ``{p}bpd_probe_stderr``), the standard error
    of ``{p}nll`` due to the probes alone (:func:`cnf.metrics.probe_stderr`).
    ``{p}nll_stderr`` is the standard error over the test points, which
    includes that noise (each point has its own probes); the two are reported
    apart so that neither is mistaken for the other.
    """
    out: dict[str, Any] = {}
    for name in ("nll", "nelbo"):
        values = getattr(result, name)
        if values is not None:
            out[f"{prefix}{name}"], out[f"{prefix}{name}_stderr"] = mean_stderr(values)
    if result.nll_probes is not None:
        out[f"{prefix}nll_probes"] = int(result.nll_probes.shape[1])
        se = probe_stderr(result.nll_probes)
        if se == se:  # K >= 2
            out[f"{prefix}nll_probe_stderr"] = se
    if result.nll is not None and result.nll_is_bound:
        out[f"{prefix}nll_is_bound"] = True
    if result.nfe is not None:
        out[f"{prefix}nfe"] = result.nfe
    if result.data_nll is not None and (result.nll is not None or result.nelbo is not None):
        out["floor"], out["floor_stderr"] = mean_stderr(result.data_nll)
        if result.nll is not None:
            out["gap"], out["gap_stderr"] = mean_stderr(result.nll - result.data_nll)
        if result.nelbo is not None:  # NELBO − floor ≥ KL(data ‖ model): a bound, not the gap
            out["nelbo_gap"], out["nelbo_gap_stderr"] = mean_stderr(result.nelbo - result.data_nll)
    if data.entropy is not None and (result.nll is not None or result.nelbo is not None):
        out["entropy"], out["entropy_stderr"] = data.entropy
    offset = float(getattr(data, "nll_offset", 0.0))
    if offset:
        out["nll_offset"] = offset
    out.update(_bpd(out, data, prefix=prefix, nll_is_bound=result.nll_is_bound))
    return out


def _bpd(
    metrics: Mapping[str, Any], data: Any, *, prefix: str, nll_is_bound: bool = False
) -> dict[str, Any]:
    """Bits/dim of image data from ``{prefix}nll`` (else ``{prefix}nelbo``) in nats."""
    offset = data.bpd_offset
    if offset is None:
        return {}
    out: dict[str, Any] = {}
    for name in ("nll", "nelbo"):
        if f"{prefix}{name}" not in metrics:
            continue
        key = (
            f"{prefix}bpd"
            if name == "nll" or f"{prefix}nll" not in metrics
            else f"{prefix}nelbo_bpd"
        )
        out[key] = bits_per_dim(metrics[f"{prefix}{name}"], data.dim, offset_bits=offset)
        out[f"{key}_stderr"] = metrics[f"{prefix}{name}_stderr"] / (data.dim * math.log(2.0))
        if f"{prefix}{name}_probe_stderr" in metrics:
            out[f"{key}_probe_stderr"] = metrics[f"{prefix}{name}_probe_stderr"] / (
                data.dim * math.log(2.0)
            )
    if out:
        source = "nll" if f"{prefix}nll" in metrics else "nelbo (an upper bound)"
        if source == "nll" and nll_is_bound:
            source = "nll (an upper bound: the model's flow term is variational)"
        out["bpd_convention"] = (
            f"bits/dim = {source} / (D ln 2) + log2({data.num_levels}), D = {data.dim}; "
            f"uniform dequantisation x = (pixel + u) / {data.num_levels}, u ~ U[0,1), "
            "seeded fresh noise per evaluation"
        )
    return out


# ------------------------------------------------------------------ samples
@torch.no_grad()
def draw_samples(
    model: Any, n: int, *, settings: Any = None, seed: int
) -> tuple[np.ndarray, float | None, float]:
    """``n`` samples under ``settings`` with common random numbers.

    The base noise comes from a ``torch.Generator`` seeded with ``seed``; the
    global RNG (used e.g. by SDE samplers) is forked and seeded with ``seed``.

    Returns:
        ``(samples (n, *event_shape) as float64 numpy, NFE or None, seconds)``.
    """
    t0 = time.perf_counter()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)
        out = model.sample(n, settings, generator=generator)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    nfe = out.stats.get("nfe")
    return (
        out.x.detach().double().cpu().numpy(),
        None if nfe is None else float(nfe),
        time.perf_counter() - t0,
    )


def reference_points(data: Any, n: int) -> np.ndarray:
    """Held-out test points on the model's scale (images dequantised with a fixed seed)."""
    reference = data.test[:n]
    if data.eval_transform is not None:
        reference = data.eval_transform(reference, np.random.default_rng(0))
    return np.asarray(reference, dtype=np.float64)


def sample_statistics(
    samples: np.ndarray,
    data: Any,
    *,
    reference: np.ndarray | None = None,
    max_points: int = 5000,
) -> dict[str, float]:
    """Two-sample and exact-density statistics of model samples (low-dimensional data).

    Args:
        samples: Model samples ``(n, *event_shape)`` on the model's scale.
        data: The data set (held-out points, exact log-density when known).
        reference: Held-out points for the MMD² (default: the first
            ``max_points`` test points, :func:`reference_points`).
        max_points: Samples and reference points used at most.

    Returns:
        ``sample_finite_fraction``; ``sample_mmd2`` (:data:`MMD_KERNEL`, on the
        finite samples); with a known density ``sample_support_fraction`` (of
        all samples; non-finite ones count as outside) and ``sample_data_logp``
        (mean over the samples inside the support). Empty above
        :data:`MAX_SAMPLE_STAT_DIM` dimensions.
    """
    samples = np.asarray(samples)[:max_points]
    n = len(samples)
    flat = samples.reshape(n, -1)
    out: dict[str, float] = {}
    if n == 0 or flat.shape[1] > MAX_SAMPLE_STAT_DIM:
        return out
    if reference is None:
        reference = reference_points(data, max_points)
    finite = np.isfinite(flat).all(axis=1)
    out["sample_finite_fraction"] = float(finite.mean())
    s = flat[finite]
    if len(s) > 1 and len(reference) > 1:
        out["sample_mmd2"] = mmd2_rbf(
            torch.as_tensor(s),
            torch.as_tensor(reference.reshape(len(reference), -1)),
            bandwidths=MMD_BANDWIDTHS,
        )
    if data.log_density is not None and data.eval_transform is None:
        lp = np.full(n, -np.inf)
        if len(s):
            lp[finite] = data.log_density(s.reshape(-1, *samples.shape[1:]))
        inside = np.isfinite(lp)
        out["sample_support_fraction"] = float(inside.mean())
        if inside.any():
            out["sample_data_logp"] = float(lp[inside].mean())
    return out


def settings_record(
    settings: Any, *, num_points: int, batch_size: int, seed: int, **extra: Any
) -> dict[str, Any]:
    """The provenance every evaluation result carries: the full settings and what was evaluated."""
    record: dict[str, Any] = {"settings": describe(settings) if settings is not None else {}}
    record.update(num_points=num_points, batch_size=batch_size, seed=seed, **extra)
    return record
