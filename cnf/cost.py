"""Likelihood against sampling cost (docs/methods.md §8).

Evaluate one trained model over a grid of *cost settings* — each a flat
mapping of setting keys, e.g. ``{"method": "dopri5", "rtol": 1e-3, "atol":
1e-3}`` or ``{"method": "rk4", "steps": 8}`` for ODE models, ``{"sampler":
"em", "steps": 20}`` for SDE models, turned **once** into the model's typed
settings (``model.with_settings``) and passed to ``model.evaluate`` and
``model.sample`` of the shared :class:`~cnf.models.base.GenerativeModel`
interface — and report, per setting:

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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from cnf.config import ConfigError
from cnf.data import Dataset
from cnf.evaluation import (
    MMD_KERNEL,
    draw_samples,
    evaluate_points,
    reference_points,
    sample_statistics,
    settings_record,
    summarize,
)
from cnf.metrics import mean_stderr
from cnf.models.base import GenerativeModel

__all__ = [
    "CostGridError",
    "GRID_SYNTAX",
    "check_cost_grid",
    "cost_curve",
    "describe_setting",
    "load_cost_grid",
    "normalize_cost_grid",
    "parse_cost_grid",
    "typed_grid",
]

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
        from omegaconf import OmegaConf

        from cnf.config import read_yaml

        raw = OmegaConf.to_container(
            read_yaml(path, what="grid file", error=CostGridError), resolve=True
        )
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
    word = next((k for k in ("method", "name") if k in s), None)  # the solver's name
    parts = [str(s.pop(word))] if word else []
    if "rtol" in s and "atol" in s and s["rtol"] == s["atol"]:
        parts.append(f"tol={_fmt_value(s.pop('rtol'))}")
        s.pop("atol")
    parts += [f"{k}={_fmt_value(v)}" for k, v in s.items()]
    return " ".join(parts)


def typed_grid(model: GenerativeModel, grid: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Each flat setting as the model's typed settings (the one place cost keys are parsed).

    Raises:
        CostGridError: a key the model does not have, or a value it rejects.
    """
    out = []
    for setting in grid:
        try:
            out.append(model.with_settings(setting))
        except (ValueError, TypeError) as e:
            raise CostGridError(
                f"cost setting '{describe_setting(setting)}' rejected by the "
                f"{type(model).__name__} model: {str(e).splitlines()[0]}"
            ) from None
    return out


def check_cost_grid(model: GenerativeModel, settings: Sequence[Any], data: Dataset) -> None:
    """Try every setting on two test points (evaluation and sampling) before any expensive work.

    This is also the warm-up, so the first timed setting pays no one-off costs.

    Raises:
        CostGridError: the model fails on a setting.
    """
    points = data.test[:2]
    for s in settings:
        try:
            evaluate_points(model, points, data, settings=s, batch_size=2, seed=0)
            draw_samples(model, 2, settings=s, seed=0)
        except (ValueError, TypeError, KeyError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CostGridError(
                f"cost setting rejected by the {type(model).__name__} model: {msg}"
            ) from None


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
        grid: Flat settings; default ``model.default_cost_grid()``.
        num_test: Test points for the NLL (default: all).
        num_samples: Samples per setting (0: no sampling).
        batch_size: Points per ``evaluate`` call.
        seed: Common-random-numbers seed.
        check: Try every setting on two points first (:func:`check_cost_grid`;
            also the warm-up before timing).
        progress: Called with one line per finished setting.

    Returns:
        One flat JSON-ready dict per setting (keys documented in
        ``experiments/cost_curve.py``): ``setting`` (as given), ``settings``
        (every resolved setting), ``label``, ``objective``, ``nll``/``nelbo``
        (+ ``_stderr``), ``eval_nfe``, ``eval_seconds``, ``ref_label``,
        ``objective_minus_ref`` (+ ``_stderr``), ``sample_nfe``,
        ``sample_seconds``, ``sample_mmd2``, ``sample_data_logp``,
        ``sample_support_fraction``, ``sample_finite_fraction``, ``floor``/``gap``
        (+ stderr) and ``entropy`` where the data density is known, and the
        sizes, seed, kernel and units.

    Raises:
        CostGridError: a setting the model rejects (checked before any timing).
    """
    grid = normalize_cost_grid(list(grid) if grid is not None else model.default_cost_grid())
    test = data.test if num_test is None else data.test[:num_test]
    if len(test) == 0:
        raise CostGridError("no test points to evaluate (num_test must be > 0)")
    typed = typed_grid(model, grid)
    if check:
        check_cost_grid(model, typed, data)
    reference = reference_points(data, num_samples) if num_samples > 0 else None

    records: list[dict[str, Any]] = []
    objectives: list[Tensor] = []
    for setting, settings in zip(grid, typed):
        ev = evaluate_points(model, test, data, settings=settings, batch_size=batch_size, seed=seed)
        objective = "nll" if ev.nll is not None else "nelbo"
        if getattr(ev, objective) is None:
            raise CostGridError(f"{type(model).__name__}.evaluate returned neither nll nor nelbo")
        rec: dict[str, Any] = {
            "setting": dict(setting),
            "label": describe_setting(setting),
            "objective": objective,
            "units": "nats per sample",
            "num_test": len(test),
            **settings_record(settings, num_points=len(test), batch_size=batch_size, seed=seed),
        }
        summary = summarize(ev, data)
        rec.update({k: v for k, v in summary.items() if k != "nfe"})
        rec["eval_nfe"] = ev.nfe
        rec["eval_seconds"] = ev.seconds
        objectives.append(getattr(ev, objective))
        if num_samples > 0:
            samples, nfe, seconds = draw_samples(model, num_samples, settings=settings, seed=seed)
            rec.update(
                num_samples=num_samples,
                sample_nfe=nfe,
                sample_seconds=seconds,
                mmd_kernel=MMD_KERNEL,
            )
            rec.update(sample_statistics(samples, data, reference=reference))
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
    nfe = rec.get("eval_nfe")
    line += f"  nfe {'—' if nfe is None else f'{nfe:g}'}  {rec['eval_seconds']:.2f}s"
    if "sample_seconds" in rec:
        snfe = rec.get("sample_nfe")
        line += f" | sample nfe {'—' if snfe is None else f'{snfe:g}'}"
        if "sample_mmd2" in rec:
            line += f"  mmd2 {rec['sample_mmd2']:.2e}"
        line += f"  {rec['sample_seconds']:.2f}s"
    return line
