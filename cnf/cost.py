"""Likelihood against sampling cost (DESIGN.md §2, item 2).

Evaluate one trained model over a grid of *cost settings* — each a mapping
passed unchanged to ``model.evaluate(x, cost=...)`` and
``model.sample(n, cost=..., generator=...)`` of the shared
:class:`~cnf.models.base.GenerativeModel` interface, e.g.
``{"method": "dopri5", "rtol": 1e-3, "atol": 1e-3}`` or
``{"method": "rk4", "steps": 8}`` for ODE models, ``{"sampler": "em",
"steps": 20}`` for SDE models — and report, per setting:

* the test objective per sample in nats: the NLL when the model gives one
  (``EvalOutput.nll``), otherwise the NELBO (``EvalOutput.nelbo``, an upper
  bound on the NLL); the record says which under ``objective``. With its
  standard error, mean NFE per evaluation batch and wall time; plus the paired
  difference to the model's most expensive setting (its "reference"), whose
  standard error is small because the probes are shared;
* sample quality with the sampler's NFE and wall time: unbiased MMD² to
  held-out test data (kernel :data:`MMD_KERNEL`), and where the data density
  is known (8gaussians, checkerboard) the mean exact data log-density of the
  samples and the fraction of samples in the data's support.

**Common random numbers.** Before each setting the global RNG is forked and
seeded with ``seed`` (Hutchinson probes, dequantisation noise, SDE noise
drawn from it repeat exactly), and sampling gets a fresh
``torch.Generator`` seeded with ``seed`` (the same base noise). So settings —
and models of the same event shape — are compared on the same randomness, and
evaluating one setting twice gives identical numbers.

Example:
    >>> grid = parse_cost_grid("dopri5:tol=1e-3,1e-5;rk4:steps=4")
    >>> grid[0]
    {'method': 'dopri5', 'rtol': 0.001, 'atol': 0.001}
    >>> describe_setting(grid[2])
    'rk4 steps=4'
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cnf.config import ConfigError
from cnf.data import Dataset
from cnf.metrics import mean_stderr, mmd2_rbf
from cnf.models.base import GenerativeModel

__all__ = [
    "CostGridError",
    "GRID_SYNTAX",
    "MMD_BANDWIDTHS",
    "MMD_KERNEL",
    "check_cost_grid",
    "cost_curve",
    "cost_curve_markdown",
    "describe_setting",
    "evaluate_setting",
    "load_cost_grid",
    "normalize_cost_grid",
    "parse_cost_grid",
    "plot_cost_curve",
    "sample_quality",
    "sample_setting",
]

MMD_BANDWIDTHS: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0)
MMD_KERNEL = (
    "unbiased MMD^2, kernel k(a,b) = sum over s in {0.1, 0.5, 1, 2} of exp(-|a-b|^2 / (2 s^2))"
)
# Sample statistics are for low-dimensional data; images need FID (a later issue).
MAX_SAMPLE_STAT_DIM = 64

GRID_SYNTAX = """\
inline grid:  GROUP[;GROUP...]
  GROUP   = ITEM[:ITEM...]      one group expands to the Cartesian product of its lists
  ITEM    = METHOD              bare word (first item only): sets "method"
          | KEY=V1[,V2,...]     a setting key with one or more values
          | default             the model's own evaluation settings ({})
  tol=V   sets rtol=V and atol=V
  values: integers, floats (1e-3), true/false, or words
examples:
  "dopri5:tol=1e-1,1e-3,1e-5;rk4:steps=2,4,8"
  "dopri5:rtol=1e-3:atol=1e-5,1e-7"
  "default;euler:steps=1,2,4,8"
  "sampler=em:steps=10,20,50"      (SDE-based families)
YAML grid file: a list of mappings, e.g.  - {method: dopri5, rtol: 1.0e-3, atol: 1.0e-3}"""


class CostGridError(ConfigError):
    """A cost grid that cannot be used (one-line message; the CLIs exit with code 2)."""


# --------------------------------------------------------------------- the grid
def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _check_key(key: str, where: str) -> None:
    if not key or not (key.replace("_", "a").replace(".", "a").isalnum()):
        raise CostGridError(f"{where}: bad setting key '{key}' (letters, digits, _ and . only)")


def parse_cost_grid(spec: str) -> list[dict[str, Any]]:
    """Parse the inline grid syntax (:data:`GRID_SYNTAX`) into a list of settings.

    Args:
        spec: e.g. ``"dopri5:tol=1e-1,1e-3;rk4:steps=2,4,8"``.

    Returns:
        One dict per setting, in the order written (later keys vary fastest).

    Raises:
        CostGridError: malformed spec (the message names the offending group).
    """
    if not spec or not spec.strip():
        raise CostGridError("grid spec is empty; e.g. --grid 'dopri5:tol=1e-3,1e-5;rk4:steps=4,8'")
    grid: list[dict[str, Any]] = []
    for gi, group in enumerate(spec.split(";")):
        group = group.strip()
        where = f"grid group {gi + 1} '{group}'"
        if not group:
            raise CostGridError(f"grid group {gi + 1} is empty (stray ';' in '{spec}')")
        fixed: dict[str, Any] = {}
        lists: list[tuple[str, list[Any]]] = []
        seen: set[str] = set()
        items = [i.strip() for i in group.split(":")]
        if items == ["default"]:
            grid.append({})
            continue
        for ii, item in enumerate(items):
            if not item:
                raise CostGridError(f"{where}: empty item (stray ':')")
            if any(c.isspace() for c in item):
                raise CostGridError(f"{where}: item '{item}' contains a space; separate with ':'")
            if "=" not in item:
                if ii != 0:
                    raise CostGridError(
                        f"{where}: '{item}' is not KEY=VALUES (a bare method name may only come first)"
                    )
                _check_key(item, where)
                fixed["method"], key = item, "method"
            else:
                key, _, values_text = item.partition("=")
                key = key.strip()
                _check_key(key, where)
                texts = [v.strip() for v in values_text.split(",")]
                if any(not v for v in texts):
                    raise CostGridError(f"{where}: '{item}' has an empty value")
                values = [_parse_value(v) for v in texts]
                keys = ("rtol", "atol") if key == "tol" else (key,)
                for k in keys:
                    if k in seen:
                        raise CostGridError(f"{where}: key '{k}' given twice")
                    seen.add(k)
                if len(values) == 1:
                    fixed.update({k: values[0] for k in keys})
                else:
                    lists.append((key, values))
            seen.add(key)
        for combo in itertools.product(*(vals for _, vals in lists)):
            setting = dict(fixed)
            for (key, _), value in zip(lists, combo):
                if key == "tol":
                    setting["rtol"] = setting["atol"] = value
                else:
                    setting[key] = value
            grid.append(setting)
    return normalize_cost_grid(grid)


def normalize_cost_grid(grid: Any, *, source: str = "grid") -> list[dict[str, Any]]:
    """Check a grid given as data (e.g. read from YAML): a non-empty list of flat mappings.

    String values that read as numbers or booleans are converted (YAML 1.1
    reads ``1e-3`` as a string). A mapping with a single ``grid`` key is
    accepted as a wrapper. Duplicate settings are an error.

    Raises:
        CostGridError: anything else.
    """
    if isinstance(grid, Mapping) and set(grid) == {"grid"}:
        grid = grid["grid"]
    if not isinstance(grid, list | tuple) or not grid:
        raise CostGridError(f"{source}: must be a non-empty list of settings (mappings)")
    out: list[dict[str, Any]] = []
    for i, setting in enumerate(grid):
        if setting is None:
            setting = {}
        if not isinstance(setting, Mapping):
            raise CostGridError(
                f"{source} entry {i + 1}: must be a mapping like {{method: rk4, steps: 8}}, "
                f"got {setting!r}"
            )
        clean: dict[str, Any] = {}
        for k, v in setting.items():
            _check_key(str(k), f"{source} entry {i + 1}")
            if isinstance(v, Mapping | list | tuple):
                raise CostGridError(f"{source} entry {i + 1}: value of '{k}' must be a scalar")
            clean[str(k)] = _parse_value(v) if isinstance(v, str) else v
        if clean in out:
            raise CostGridError(f"{source}: setting '{describe_setting(clean)}' appears twice")
        out.append(clean)
    return out


def load_cost_grid(text: str) -> list[dict[str, Any]]:
    """A grid from a YAML file (if ``text`` names a file or ends in .yaml/.yml) or inline syntax.

    Raises:
        CostGridError: missing or unreadable file, or a malformed grid.
    """
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise CostGridError(f"grid file not found: {path}")
        from omegaconf import OmegaConf

        try:
            raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CostGridError(f"grid file {path} is not valid YAML: {msg}") from None
        return normalize_cost_grid(raw, source=f"grid file {path}")
    return parse_cost_grid(text)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def describe_setting(setting: Mapping[str, Any]) -> str:
    """A short label: ``"dopri5 tol=1e-05"``, ``"rk4 steps=8"``, ``"default"``."""
    if not setting:
        return "default"
    s = dict(setting)
    parts = [str(s.pop("method"))] if "method" in s else []
    if "rtol" in s and "atol" in s and s["rtol"] == s["atol"]:
        parts.append(f"tol={_fmt_value(s.pop('rtol'))}")
        s.pop("atol")
    parts += [f"{k}={_fmt_value(v)}" for k, v in s.items()]
    return " ".join(parts)


def check_cost_grid(
    model: GenerativeModel, grid: Sequence[Mapping[str, Any]], x: np.ndarray | Tensor
) -> None:
    """Try every setting on two points (evaluation and sampling) before any expensive work.

    This is also the warm-up, so the first timed setting pays no one-off costs.

    Args:
        model: The model.
        grid: Its settings.
        x: A few data points ``(>=2, *event_shape)``; the first two are used.

    Raises:
        CostGridError: the model rejects a setting (unknown method, key, ...).
    """
    for setting in grid:
        try:
            with torch.random.fork_rng(devices=_rng_devices(model)):
                model.evaluate(_points(model, x), cost=setting)
                model.sample(2, cost=setting, generator=_generator(model, 0))
        except (ValueError, TypeError, KeyError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CostGridError(
                f"cost setting '{describe_setting(setting)}' rejected by the "
                f"{type(model).__name__} model: {msg}"
            ) from None


# ------------------------------------------------------------------ one setting
def _points(model: GenerativeModel, x: np.ndarray | Tensor, n: int = 2) -> Tensor:
    return torch.as_tensor(x[:n]).to(dtype=model.dtype, device=model.device)


def _rng_devices(model: GenerativeModel) -> list[torch.device]:
    return [model.device] if model.device.type == "cuda" else []


def _generator(model: GenerativeModel, seed: int) -> torch.Generator:
    return torch.Generator(device=model.device).manual_seed(seed)


@torch.no_grad()
def evaluate_setting(
    model: GenerativeModel,
    x: np.ndarray,
    *,
    cost: Mapping[str, Any] | None,
    batch_size: int,
    seed: int,
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Per-sample NLL / NELBO of ``x`` under one cost setting, with common random numbers.

    Args:
        model: Any :class:`GenerativeModel`.
        x: Test points ``(N, *event_shape)``.
        cost: The setting, passed to ``model.evaluate``.
        batch_size: Points per ``evaluate`` call.
        seed: The global RNG is forked and seeded with it first.
        transform: ``Dataset.eval_transform`` (image dequantisation), applied batch
            by batch with a numpy generator seeded from ``seed`` — the convention
            of :func:`cnf.train.loop.evaluate_split`, so the default setting
            reproduces ``final.json``.

    Returns:
        ``{"nll": (N,) float64 or None, "nelbo": (N,) or None, "nfe": mean NFE per
        batch or None, "seconds": wall time}``.
    """
    nll, nelbo, nfe = [], [], []
    transform_rng = np.random.default_rng([seed, 0x0DE9])
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            if transform is not None:
                xb = transform(xb, transform_rng)
            xb = torch.as_tensor(xb, dtype=model.dtype, device=model.device)
            out = model.evaluate(xb, cost=cost)
            if out.nll is not None:
                nll.append(out.nll.double().cpu())
            if out.nelbo is not None:
                nelbo.append(out.nelbo.double().cpu())
            if "nfe" in out.stats:
                nfe.append(float(out.stats["nfe"]))
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return {
        "nll": torch.cat(nll) if nll else None,
        "nelbo": torch.cat(nelbo) if nelbo else None,
        "nfe": float(np.mean(nfe)) if nfe else None,
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def sample_setting(
    model: GenerativeModel, n: int, *, cost: Mapping[str, Any] | None, seed: int
) -> tuple[np.ndarray, float | None, float]:
    """Draw ``n`` samples under one setting with common random numbers.

    The base noise comes from a ``torch.Generator`` seeded with ``seed``; the
    global RNG (used e.g. by SDE samplers) is forked and seeded with ``seed``.

    Returns:
        ``(samples (n, *event_shape) as float64 numpy, NFE or None, seconds)``.
    """
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=_rng_devices(model)):
        torch.manual_seed(seed)
        samples, stats = model.sample(n, cost=cost, generator=_generator(model, seed))
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - t0
    nfe = stats.get("nfe")
    return samples.detach().double().cpu().numpy(), None if nfe is None else float(nfe), seconds


def sample_quality(
    samples: np.ndarray,
    reference: np.ndarray,
    *,
    log_density: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
    """Two-sample and exact-density statistics of samples from a low-dimensional model.

    Args:
        samples: Model samples ``(n, *event_shape)``.
        reference: Held-out data ``(m, *event_shape)`` for the MMD².
        log_density: The exact data log-density, if known (``-inf`` off the support).

    Returns:
        ``sample_finite_fraction``; ``sample_mmd2`` (:data:`MMD_KERNEL`, on the
        finite samples); with ``log_density``: ``sample_support_fraction`` (of all
        samples; non-finite ones count as outside) and ``sample_data_logp`` (mean
        over the samples inside the support). Empty for data of dimension > 64.
    """
    n = len(samples)
    flat = samples.reshape(n, -1)
    dim = flat.shape[1]
    out: dict[str, float] = {}
    if dim > MAX_SAMPLE_STAT_DIM or n == 0:
        return out
    finite = np.isfinite(flat).all(axis=1)
    out["sample_finite_fraction"] = float(finite.mean())
    s = flat[finite]
    if len(s) > 1 and len(reference) > 1:
        out["sample_mmd2"] = mmd2_rbf(
            torch.as_tensor(s),
            torch.as_tensor(reference.reshape(len(reference), -1)),
            bandwidths=MMD_BANDWIDTHS,
        )
    if log_density is not None:
        lp = np.full(n, -np.inf)
        if len(s):
            lp[finite] = log_density(s.reshape(-1, *samples.shape[1:]))
        inside = np.isfinite(lp)
        out["sample_support_fraction"] = float(inside.mean())
        if inside.any():
            out["sample_data_logp"] = float(lp[inside].mean())
    return out


# --------------------------------------------------------------------- the grid
def cost_curve(
    model: GenerativeModel,
    data: Dataset,
    *,
    grid: Sequence[Mapping[str, Any]] | None = None,
    num_test: int | None = None,
    num_samples: int = 2000,
    batch_size: int = 5000,
    seed: int = 1234,
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` over a grid of cost settings (see the module docstring).

    Args:
        model: A trained model (any family).
        data: Its data set; the objective uses ``data.test[:num_test]``, the MMD²
            ``data.test[:num_samples]`` (held-out, identical for every setting
            and model of that data set).
        grid: Settings; default ``model.default_cost_grid()``.
        num_test: Test points for the NLL (default: all).
        num_samples: Samples per setting (0: no sampling).
        batch_size: Points per ``evaluate`` call.
        seed: Common-random-numbers seed.
        check: Try every setting on two points first (:func:`check_cost_grid`;
            also the warm-up before timing).
        progress: Called with one line per finished setting.

    Returns:
        One flat JSON-ready dict per setting (keys documented in
        ``experiments/cost_curve.py``): ``setting``, ``label``, ``objective``,
        ``nll``/``nelbo`` (+ ``_stderr``), ``eval_nfe``, ``eval_seconds``,
        ``ref_label``, ``objective_minus_ref`` (+ ``_stderr``), ``sample_nfe``,
        ``sample_seconds``, ``sample_mmd2``, ``sample_data_logp``,
        ``sample_support_fraction``, ``sample_finite_fraction``, ``entropy``/``gap``
        where the data entropy is known, and the sizes, seed, kernel and units.

    Raises:
        CostGridError: a setting the model rejects (checked before any timing).
    """
    grid = normalize_cost_grid(list(grid) if grid is not None else model.default_cost_grid())
    test = data.test if num_test is None else data.test[:num_test]
    if len(test) == 0:
        raise CostGridError("no test points to evaluate (num_test must be > 0)")
    transform = getattr(data, "eval_transform", None)
    reference = data.test[:num_samples] if num_samples > 0 else data.test[:0]
    if transform is not None:  # image levels -> the model's scale, as in sample_statistics
        reference = transform(reference, np.random.default_rng(0))
    if check:
        check_cost_grid(
            model,
            grid,
            test if transform is None else transform(test[:2], np.random.default_rng(0)),
        )
    bpd_offset = getattr(data, "bpd_offset", None)

    records: list[dict[str, Any]] = []
    objectives: list[Tensor] = []
    for setting in grid:
        ev = evaluate_setting(
            model, test, cost=setting, batch_size=batch_size, seed=seed, transform=transform
        )
        objective = "nll" if ev["nll"] is not None else "nelbo"
        if ev[objective] is None:
            raise CostGridError(f"{type(model).__name__}.evaluate returned neither nll nor nelbo")
        rec: dict[str, Any] = {
            "setting": dict(setting),
            "label": describe_setting(setting),
            "objective": objective,
            "units": "nats per sample",
            "num_test": len(test),
            "seed": seed,
        }
        for name in ("nll", "nelbo"):
            if ev[name] is not None:
                rec[name], rec[f"{name}_stderr"] = mean_stderr(ev[name])
        if bpd_offset is not None:
            # bits/dim of data scaled to [0, 1) from 2**offset levels (DESIGN.md §1.2).
            scale = data.dim * math.log(2.0)
            rec["bpd"] = rec[objective] / scale + bpd_offset
            rec["bpd_stderr"] = rec[f"{objective}_stderr"] / scale
            rec["bpd_convention"] = (
                f"bits/dim = {objective} / (D ln 2) + {bpd_offset:g}, D = {data.dim}"
            )
        rec["eval_nfe"] = ev["nfe"]
        rec["eval_seconds"] = ev["seconds"]
        if objective == "nll" and data.entropy is not None:
            rec["entropy"] = data.entropy[0]
            rec["gap"] = rec["nll"] - data.entropy[0]
        objectives.append(ev[objective])
        if num_samples > 0:
            samples, nfe, seconds = sample_setting(model, num_samples, cost=setting, seed=seed)
            rec.update(
                num_samples=num_samples,
                sample_nfe=nfe,
                sample_seconds=seconds,
                mmd_kernel=MMD_KERNEL,
            )
            rec.update(sample_quality(samples, reference, log_density=data.log_density))
        records.append(rec)
        if progress is not None:
            progress(_progress_line(rec))

    # Paired difference to the most expensive setting: with shared probes the
    # per-sample differences isolate the solver/discretisation error.
    nfes = [r["eval_nfe"] if r["eval_nfe"] is not None else -math.inf for r in records]
    ref = int(np.argmax(nfes))
    for rec, values in zip(records, objectives):
        diff = values - objectives[ref]
        rec["ref_label"] = records[ref]["label"]
        rec["objective_minus_ref"], rec["objective_minus_ref_stderr"] = mean_stderr(diff)
    return records


def _progress_line(rec: Mapping[str, Any]) -> str:
    obj = rec["objective"]
    line = f"{rec['label']:>22}: {obj} {rec[obj]:.4f} ± {rec[f'{obj}_stderr']:.4f}"
    line += f"  nfe {_num(rec.get('eval_nfe'), 0)}  {rec['eval_seconds']:.2f}s"
    if "sample_seconds" in rec:
        line += f" | sample nfe {_num(rec.get('sample_nfe'), 0)}"
        if "sample_mmd2" in rec:
            line += f"  mmd2 {rec['sample_mmd2']:.2e}"
        line += f"  {rec['sample_seconds']:.2f}s"
    return line


# ---------------------------------------------------------------------- outputs
def _num(v: Any, digits: int = 3, *, sci: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if sci:
        return f"{v:.2e}"
    if digits == 0:
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"
    return f"{v:.{digits}f}"


def _nelbo_cell(r: Mapping[str, Any]) -> str:
    if r["objective"] != "nll" or r.get("nelbo") is None:
        return "—"
    return f"{r['nelbo']:.4f} ± {r['nelbo_stderr']:.4f}"


def cost_curve_markdown(records: Iterable[Mapping[str, Any]]) -> str:
    """A markdown table of cost-curve records (each with ``model`` added by the caller)."""
    records = list(records)
    with_bpd = any("bpd" in r for r in records)
    # Models with an NLL and a bound (score SDEs, INDM) also show the NELBO.
    with_nelbo = any(r["objective"] == "nll" and r.get("nelbo") is not None for r in records)
    head = (
        "| model | setting | objective | value (nats) | Δ vs ref | "
        + ("NELBO (nats) | " if with_nelbo else "")
        + ("bits/dim | " if with_bpd else "")
        + "eval NFE | eval s | MMD² | data log p | in support | sample NFE | sample s |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in records:
        obj = r["objective"]
        value = f"{r[obj]:.4f} ± {r[f'{obj}_stderr']:.4f}"
        if r["label"] == r.get("ref_label"):
            delta = "ref"
        else:
            d = r["objective_minus_ref"]
            d = 0.0 if abs(d) < 5e-5 else d  # no "-0.0000"
            delta = f"{d:+.4f} ± {r['objective_minus_ref_stderr']:.4f}"
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r.get("model", "")),
                    r["label"],
                    obj.upper(),
                    value,
                    delta,
                    *([_nelbo_cell(r)] if with_nelbo else []),
                    *([_num(r.get("bpd"), 4)] if with_bpd else []),
                    _num(r.get("eval_nfe"), 0),
                    _num(r.get("eval_seconds"), 2),
                    _num(r.get("sample_mmd2"), sci=True),
                    _num(r.get("sample_data_logp"), 3),
                    _num(r.get("sample_support_fraction"), 3),
                    _num(r.get("sample_nfe"), 0),
                    _num(r.get("sample_seconds"), 2),
                ]
            )
            + " |"
        )
    notes = [
        "",
        "Objective per test point in nats: NLL = exact or Hutchinson-estimated negative "
        "log-likelihood; NELBO = negative ELBO (an upper bound on the NLL). Δ vs ref: paired "
        "mean difference to the model's most expensive setting (same probes), ± its "
        "standard error. eval NFE: mean function evaluations per evaluation batch; eval s / "
        "sample s: wall time of the whole evaluation / sampling.",
        f"Sample quality: {MMD_KERNEL}, model samples vs held-out test data; "
        "data log p = mean exact data log-density of the samples inside the support; "
        "in support = fraction of samples where the data density is positive "
        "(— where the density is unknown).",
    ]
    conventions = sorted({r["bpd_convention"] for r in records if "bpd_convention" in r})
    notes += [f"Bits/dim: {c}." for c in conventions]
    first = records[0] if records else {}
    if first:
        notes.append(
            f"Common random numbers: seed {first.get('seed')} for every setting and model; "
            f"{first.get('num_test')} test points, {first.get('num_samples', 0)} samples."
        )
    return "\n".join(lines + notes) + "\n"


def plot_cost_curve(
    records: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = ""
) -> None:
    """Two panels per data set, log-x: objective vs evaluation NFE, MMD² vs sampling NFE.

    One row of panels per data set (``record["dataset"]``), one colour per
    model (``record["model"]``), one line per model and solver family
    (``method``/``sampler`` of the setting), points sorted by NFE. The data
    entropy (the best possible NLL) is drawn as a dashed line where known.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(dict.fromkeys(str(r.get("model", "")) for r in records))
    groups = list(dict.fromkeys(_group(r["setting"]) for r in records))
    datasets = list(dict.fromkeys(r.get("dataset") for r in records))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ("-", "v"), ("--", "P")]
    fig, axes = plt.subplots(
        len(datasets), 2, figsize=(11, 0.6 + 3.6 * len(datasets)), dpi=120, squeeze=False
    )
    seen: dict[str, Any] = {}  # legend entries, one per model x group over all rows
    for row, dataset in enumerate(datasets):
        ax_l, ax_s = axes[row]
        rows = [r for r in records if r.get("dataset") == dataset]
        objectives = sorted({r["objective"] for r in rows})
        for mi, model in enumerate(models):
            for gi, group in enumerate(groups):
                pts = [r for r in rows if str(r.get("model", "")) == model]
                pts = [r for r in pts if _group(r["setting"]) == group]
                if not pts:
                    continue
                ls, marker = styles[gi % len(styles)]
                color = colors[mi % len(colors)]
                label = f"{model} · {group}" if len(groups) > 1 else model
                ev = sorted(
                    (r for r in pts if r.get("eval_nfe") is not None), key=lambda r: r["eval_nfe"]
                )
                if ev:
                    seen[label] = ax_l.errorbar(
                        [r["eval_nfe"] for r in ev],
                        [r[r["objective"]] for r in ev],
                        yerr=[r[f"{r['objective']}_stderr"] for r in ev],
                        color=color,
                        ls=ls,
                        marker=marker,
                        ms=4,
                        capsize=2,
                    )
                sq = sorted(
                    (r for r in pts if r.get("sample_nfe") is not None and "sample_mmd2" in r),
                    key=lambda r: r["sample_nfe"],
                )
                if sq:
                    (line,) = ax_s.plot(
                        [r["sample_nfe"] for r in sq],
                        [r["sample_mmd2"] for r in sq],
                        color=color,
                        ls=ls,
                        marker=marker,
                        ms=4,
                    )
                    seen.setdefault(label, line)
        floors = {r["entropy"] for r in rows if r.get("entropy") is not None}
        for h in sorted(floors):
            ax_l.axhline(h, color="grey", ls="--", lw=0.8)
            ax_l.annotate(
                "entropy (floor)",
                (0.01, h),
                xycoords=("axes fraction", "data"),
                fontsize=7,
                color="grey",
                va="bottom",
            )
        where = f"{dataset}: " if dataset else ""
        ax_l.set_xscale("log")
        ax_l.set_xlabel("NFE (evaluation, per batch)")
        ax_l.set_ylabel(" / ".join(o.upper() for o in objectives) + " (nats, test)")
        ax_l.set_title(f"{where}likelihood vs cost", fontsize=10)
        ax_s.set_xscale("log")
        ticks = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        for ax in (ax_l, ax_s):
            ax.xaxis.set_major_formatter(ticks)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.grid(alpha=0.3, which="both")
        # Unbiased MMD² can be slightly negative: symlog keeps zero and small values visible.
        ax_s.set_yscale("symlog", linthresh=1e-4)
        ax_s.axhline(0.0, color="grey", lw=0.6)
        ax_s.set_xlabel("NFE (sampling)")
        ax_s.set_ylabel("MMD² to test data")
        ax_s.set_title(f"{where}sample quality vs cost (RBF σ = 0.1, 0.5, 1, 2)", fontsize=10)
    if seen:
        fig.legend(
            list(seen.values()), list(seen), loc="lower center", ncol=min(4, len(seen)), fontsize=7
        )
    if title:
        fig.suptitle(title, fontsize=10)
    legend_rows = (len(seen) + 3) // 4
    fig.tight_layout(
        rect=(0, min(0.4, (0.02 + 0.025 * legend_rows) * 2 / len(datasets) ** 0.5), 1, 1)
    )
    fig.savefig(path)
    plt.close(fig)


def _group(setting: Mapping[str, Any]) -> str:
    for key in ("method", "sampler"):
        if key in setting:
            return str(setting[key])
    return "default" if not setting else "other"
