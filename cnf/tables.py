"""Result tables from finished run folders, with published numbers beside ours (DESIGN.md §2, item 4).

A *table spec* (YAML under ``configs/tables/``, read by ``experiments/tables.py``)
names the table, its metric columns, the data-set columns, the method rows and
the reference rows. Runs are matched on their **resolved config**
(``config.yaml`` in the run folder), never on folder names: a row selects runs
whose config matches a set of dotted ``key: value`` filters, a column adds its
own filters (usually ``data.name``). Each cell aggregates the finished runs
(``final.json``) over seeds as mean ± std (n shown).

Spec format (every key but ``name``, ``rows`` and ``columns`` optional)::

    name: ffjord_toy                      # output file stem
    title: FFJORD on 2-D toy data
    caption: ...                          # LaTeX caption (default: title)
    runs_root: runs                       # patterns below are relative to it
    metrics:                              # final.json keys; a string is {key: <it>}
      - {key: test_nll, label: test NLL, decimals: 3, better: lower}
      - gap
    column_key: data.name                 # used by plain-string columns
    columns:
      - 8gaussians                        # = {label: 8gaussians, select: {data.name: 8gaussians}}
      - {label: checker, select: {data.name: checkerboard}}
    rows:
      - label: FFJORD
        sweep: ffjord_toy                 # = runs: sweeps/ffjord_toy (folders below it)
        runs: [other/*]                   # glob(s) under runs_root (default: all runs)
        select: {model.family: ffjord, model.kinetic: 0.0}   # a value {in: [a, b]} = any of
        seeds: [0, 1, 2]                  # expected seeds: absent ones are listed as missing
        keys: {test_nll: test_nelbo}      # read another final.json key for a metric
        note: reports the NELBO, an upper bound on the NLL
    references:
      - label: FFJORD (paper)
        status: confirmed                 # confirmed | measured (‡) | unverified (†) | recalled (†)
        source: Grathwohl et al. 2019, Table 2
        values:                           # per column label: a number (first metric),
          8gaussians: 3.067               #   or {metric: number | {value, status, note}}
          checker: {test_nll: 3.47, gap: {value: 0.0, status: measured}}
        from_runs: {test_nll: entropy}    # take a metric from the column's runs' final.json

Numbers whose status is ``unverified`` (or ``recalled``) carry a † and a
footnote, ``measured`` ones a ‡; missing cells show "—".

Example:
    >>> spec = parse_table_spec({"name": "t", "columns": ["8gaussians"],
    ...                          "rows": [{"label": "FFJORD", "select": {"model.family": "ffjord"}}]})
    >>> spec.metrics[0].key
    'test_nll'
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from cnf.config import ConfigError

__all__ = [
    "STATUS_MARKS",
    "Metric",
    "RunFolder",
    "Table",
    "TableSpec",
    "TableSpecError",
    "build_table",
    "config_matches",
    "load_table_spec",
    "parse_table_spec",
    "render_latex",
    "render_markdown",
    "scan_runs",
]

STATUS_MARKS = {"confirmed": "", "measured": "‡", "unverified": "†", "recalled": "†"}
STATUS_FOOTNOTES = {
    "†": "† unverified: a published number not yet checked against the paper; do not cite it as is.",
    "‡": "‡ measured on this machine (not a published number).",
}
_MISSING = object()


class TableSpecError(ConfigError):
    """A table spec that cannot be used (one-line message; the CLI exits with code 2)."""


# ------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    decimals: int = 3
    better: str | None = None  # lower | higher | None: bold the best of our rows


@dataclass(frozen=True)
class Column:
    label: str
    select: dict[str, Any]


@dataclass(frozen=True)
class Row:
    label: str
    patterns: tuple[str, ...]
    select: dict[str, Any]
    seeds: tuple[int, ...] | None = None
    keys: dict[str, str] = field(default_factory=dict)
    note: str | None = None


@dataclass(frozen=True)
class RefValue:
    value: float
    status: str
    note: str | None = None


@dataclass(frozen=True)
class Reference:
    label: str
    status: str
    source: str | None
    values: dict[tuple[str, str], RefValue]  # (column label, metric key) -> value
    from_runs: dict[str, str]  # metric key -> final.json key
    note: str | None = None


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    caption: str
    runs_root: str
    metrics: tuple[Metric, ...]
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    references: tuple[Reference, ...]
    notes: tuple[str, ...] = ()


def _err(where: str, msg: str) -> TableSpecError:
    return TableSpecError(f"table spec {where}: {msg}")


def _mapping(v: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(v, Mapping):
        raise _err(where, f"must be a mapping, got {type(v).__name__}")
    return v


def _keys(d: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise _err(where, f"unknown key '{unknown[0]}'; valid: {', '.join(allowed)}")


def _str(v: Any, where: str, *, optional: bool = False) -> str | None:
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v.strip():
        raise _err(where, f"must be a non-empty string, got {v!r}")
    return v


def _str_list(v: Any, where: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list | tuple) or not v:
        raise _err(where, "must be a string or a non-empty list of strings")
    return tuple(_str(x, f"{where}[{i}]") for i, x in enumerate(v))


def _select(v: Any, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    v = _mapping(v, where)
    out = {}
    for k, val in v.items():
        if not isinstance(k, str) or not k or any(not p for p in k.split(".")):
            raise _err(where, f"bad dotted key {k!r}")
        if isinstance(val, Mapping):
            if set(val) != {"in"} or not isinstance(val["in"], list | tuple) or not val["in"]:
                raise _err(f"{where}.{k}", "a mapping value must be {in: [values ...]}")
        out[k] = val
    return out


def _number(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _err(where, f"must be a number, got {v!r}")
    return float(v)


def _status(v: Any, where: str) -> str:
    if v not in STATUS_MARKS:
        raise _err(where, f"unknown status {v!r}; valid: {', '.join(STATUS_MARKS)}")
    return v


def _metric(v: Any, where: str) -> Metric:
    if isinstance(v, str):
        v = {"key": v}
    v = _mapping(v, where)
    _keys(v, ("key", "label", "decimals", "better"), where)
    key = _str(v.get("key"), f"{where}.key")
    decimals = v.get("decimals", 3)
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 8:
        raise _err(f"{where}.decimals", f"must be an integer in 0..8, got {decimals!r}")
    better = v.get("better")
    if better not in (None, "lower", "higher"):
        raise _err(f"{where}.better", f"must be lower, higher or null, got {better!r}")
    label = _str(v.get("label", key.replace("_", " ")), f"{where}.label")
    return Metric(key, label, decimals, better)


def parse_table_spec(raw: Any, *, default_name: str | None = None) -> TableSpec:
    """Validate a table spec given as plain data (see the module docstring).

    Args:
        raw: The spec mapping.
        default_name: Used when the spec has no ``name`` (e.g. the file stem).

    Raises:
        TableSpecError: one line naming the offending key.
    """
    raw = _mapping(raw, "top level")
    _keys(
        raw,
        (
            "name",
            "title",
            "caption",
            "runs_root",
            "metrics",
            "column_key",
            "columns",
            "rows",
            "references",
            "notes",
        ),
        "top level",
    )
    name = raw.get("name", default_name)
    name = _str(name, "name")
    if any(c in name for c in "/\\ ") or name.startswith("."):
        raise _err("name", f"'{name}' must be usable as a file name (no spaces or slashes)")
    title = _str(raw.get("title", name), "title")
    caption = _str(raw.get("caption", title), "caption")
    runs_root = _str(raw.get("runs_root", "runs"), "runs_root")

    metrics_raw = raw.get("metrics", ["test_nll"])
    if isinstance(metrics_raw, str | Mapping):
        metrics_raw = [metrics_raw]
    if not isinstance(metrics_raw, list) or not metrics_raw:
        raise _err("metrics", "must be a non-empty list")
    metrics = tuple(_metric(m, f"metrics[{i}]") for i, m in enumerate(metrics_raw))
    if len({m.key for m in metrics}) != len(metrics):
        raise _err("metrics", "a metric key appears twice")
    metric_keys = {m.key for m in metrics}

    column_key = _str(raw.get("column_key", "data.name"), "column_key")
    cols_raw = raw.get("columns")
    if not isinstance(cols_raw, list) or not cols_raw:
        raise _err("columns", "must be a non-empty list (data sets)")
    columns = []
    for i, c in enumerate(cols_raw):
        where = f"columns[{i}]"
        if isinstance(c, str):
            columns.append(Column(c, {column_key: c}))
            continue
        c = _mapping(c, where)
        _keys(c, ("label", "select"), where)
        columns.append(
            Column(
                _str(c.get("label"), f"{where}.label"), _select(c.get("select"), f"{where}.select")
            )
        )
    col_labels = [c.label for c in columns]
    if len(set(col_labels)) != len(col_labels):
        raise _err("columns", "a column label appears twice")

    rows_raw = raw.get("rows")
    if not isinstance(rows_raw, list) or not rows_raw:
        raise _err("rows", "must be a non-empty list (methods)")
    rows = []
    for i, r in enumerate(rows_raw):
        where = f"rows[{i}]"
        r = _mapping(r, where)
        _keys(r, ("label", "runs", "sweep", "select", "seeds", "keys", "note"), where)
        patterns: list[str] = []
        if r.get("sweep") is not None:
            patterns.append(f"sweeps/{_str(r['sweep'], f'{where}.sweep')}")
        if r.get("runs") is not None:
            patterns += _str_list(r["runs"], f"{where}.runs")
        for p in patterns:
            if Path(p).is_absolute() or ".." in Path(p).parts:
                raise _err(f"{where}.runs", f"'{p}' must be a relative path under runs_root")
        seeds = r.get("seeds")
        if seeds is not None:
            if (
                not isinstance(seeds, list | tuple)
                or not seeds
                or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
            ):
                raise _err(f"{where}.seeds", "must be a non-empty list of integers")
            seeds = tuple(seeds)
        keys = dict(_mapping(r.get("keys") or {}, f"{where}.keys"))
        for k, v in keys.items():
            if k not in metric_keys:
                raise _err(
                    f"{where}.keys", f"'{k}' is not one of the metrics ({', '.join(metric_keys)})"
                )
            _str(v, f"{where}.keys.{k}")
        rows.append(
            Row(
                _str(r.get("label"), f"{where}.label"),
                tuple(patterns),
                _select(r.get("select"), f"{where}.select"),
                seeds,
                keys,
                _str(r.get("note"), f"{where}.note", optional=True),
            )
        )

    refs = []
    for i, ref in enumerate(raw.get("references") or []):
        where = f"references[{i}]"
        ref = _mapping(ref, where)
        _keys(ref, ("label", "status", "source", "values", "from_runs", "note"), where)
        status = _status(ref.get("status"), f"{where}.status")
        values: dict[tuple[str, str], RefValue] = {}
        for col, cell in _mapping(ref.get("values") or {}, f"{where}.values").items():
            cwhere = f"{where}.values.{col}"
            if col not in col_labels:
                raise _err(cwhere, f"'{col}' is not a column; columns: {', '.join(col_labels)}")
            if not isinstance(cell, Mapping):
                cell = {metrics[0].key: cell}
            for mkey, v in cell.items():
                if mkey not in metric_keys:
                    raise _err(
                        f"{cwhere}.{mkey}", f"not one of the metrics ({', '.join(metric_keys)})"
                    )
                if isinstance(v, Mapping):
                    _keys(v, ("value", "status", "note"), f"{cwhere}.{mkey}")
                    values[(col, mkey)] = RefValue(
                        _number(v.get("value"), f"{cwhere}.{mkey}.value"),
                        _status(v.get("status", status), f"{cwhere}.{mkey}.status"),
                        _str(v.get("note"), f"{cwhere}.{mkey}.note", optional=True),
                    )
                else:
                    values[(col, mkey)] = RefValue(_number(v, f"{cwhere}.{mkey}"), status)
        from_runs = dict(_mapping(ref.get("from_runs") or {}, f"{where}.from_runs"))
        for k, v in from_runs.items():
            if k not in metric_keys:
                raise _err(f"{where}.from_runs", f"'{k}' is not one of the metrics")
            _str(v, f"{where}.from_runs.{k}")
        if not values and not from_runs:
            raise _err(where, "needs values or from_runs")
        refs.append(
            Reference(
                _str(ref.get("label"), f"{where}.label"),
                status,
                _str(ref.get("source"), f"{where}.source", optional=True),
                values,
                from_runs,
                _str(ref.get("note"), f"{where}.note", optional=True),
            )
        )
    notes = raw.get("notes")
    notes = () if notes is None or notes == [] else _str_list(notes, "notes")
    return TableSpec(
        name,
        title,
        caption,
        runs_root,
        metrics,
        tuple(columns),
        tuple(rows),
        tuple(refs),
        tuple(notes),
    )


def load_table_spec(path: str | Path) -> TableSpec:
    """Read and validate a table spec file; its ``name`` defaults to the file stem.

    Raises:
        TableSpecError: missing file, invalid YAML or a malformed spec (one line).
    """
    path = Path(path)
    if not path.is_file():
        raise TableSpecError(f"table spec not found: {path}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TableSpecError(f"table spec {path} is not valid YAML: {msg}") from None
    try:
        return parse_table_spec(raw, default_name=path.stem)
    except TableSpecError as e:
        raise TableSpecError(f"{path}: {e}") from None


# ------------------------------------------------------------------ run folders
@dataclass
class RunFolder:
    """One run folder as the table sees it.

    Attributes:
        path: The folder.
        config: Its resolved ``config.yaml`` as plain data.
        final: ``final.json`` when the run is finished, else None.
        problem: Why it is not finished (None when finished).
    """

    path: Path
    config: dict[str, Any]
    final: dict[str, Any] | None
    problem: str | None = None

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or (isinstance(a, bool) and isinstance(b, bool) and a == b)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0) or a == b
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def config_matches(config: Mapping[str, Any], select: Mapping[str, Any]) -> bool:
    """Whether a resolved config has every ``dotted.key: value`` of ``select``.

    Numbers compare by value (``0 == 0.0``); ``{in: [a, b]}`` matches any of them;
    a key the config lacks never matches.
    """
    for key, want in select.items():
        have = _lookup(config, key)
        if have is _MISSING:
            return False
        options = want["in"] if isinstance(want, Mapping) else [want]
        if not any(_equal(have, w) for w in options):
            return False
    return True


def _last_logged_iteration(path: Path) -> int | None:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 8192))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["iter"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def read_run_folder(path: Path) -> RunFolder | str:
    """A :class:`RunFolder`, or a one-line reason why ``path`` cannot be read as one."""
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"), resolve=True)
    except Exception as e:
        return f"{path}: config.yaml unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if not isinstance(cfg, dict):
        return f"{path}: config.yaml is not a mapping"
    iters = _lookup(cfg, "train.iters")
    final_path = path / "final.json"
    if not final_path.is_file():
        last = _last_logged_iteration(path / "metrics.jsonl")
        progress = f"; last logged iteration {last}" if last is not None else ""
        of = f" of {iters}" if last is not None and isinstance(iters, int) else ""
        return RunFolder(path, cfg, None, f"no final.json{progress}{of}")
    try:
        final = json.loads(final_path.read_text())
        if not isinstance(final, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        return RunFolder(path, cfg, None, f"final.json unreadable ({str(e).splitlines()[0]})")
    done = final.get("iterations")
    if isinstance(done, int) and isinstance(iters, int) and done < iters:
        return RunFolder(path, cfg, None, f"final.json is from iteration {done} of {iters} (stale)")
    return RunFolder(path, cfg, final)


def scan_runs(root: Path, patterns: Sequence[str] = ()) -> tuple[list[RunFolder], list[str]]:
    """Run folders (folders holding a ``config.yaml``) under ``root``.

    Args:
        root: The runs root.
        patterns: Globs relative to ``root``; a matched folder that is not itself a
            run is searched recursively. Empty: every run below ``root``.

    Returns:
        ``(runs sorted by path, one-line warnings about unreadable folders)``.
    """
    candidates: set[Path] = set()
    for pattern in patterns or ("",):
        matched = [root] if pattern == "" else sorted(root.glob(pattern))
        for m in matched:
            if not m.is_dir():
                continue
            if (m / "config.yaml").is_file():
                candidates.add(m)
            else:
                candidates.update(p.parent for p in m.rglob("config.yaml"))
    runs, warnings = [], []
    for path in sorted(candidates):
        r = read_run_folder(path)
        if isinstance(r, RunFolder):
            runs.append(r)
        else:
            warnings.append(r)
    return runs, warnings


# ---------------------------------------------------------------------- table
@dataclass
class Cell:
    """One entry: ours (mean, std, n) or a reference value (mean, mark)."""

    mean: float | None = None
    std: float | None = None
    n: int = 0
    mark: str = ""
    bold: bool = False


@dataclass
class Table:
    """A built table: cells keyed by ``(row label, column label, metric key)``."""

    spec: TableSpec
    rows: list[str]
    ref_rows: list[str]
    cells: dict[tuple[str, str, str], Cell]
    missing: list[str]
    unfinished: list[str]
    warnings: list[str]
    footnotes: list[str]


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _describe_select(select: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v['in'] if isinstance(v, Mapping) else v}" for k, v in select.items())


def build_table(spec: TableSpec, runs_root: str | Path | None = None) -> Table:
    """Collect the runs of every row × column and aggregate them over seeds.

    Never raises for missing or unfinished runs: they are listed in
    ``Table.missing`` / ``Table.unfinished``, and their cells show "—".
    """
    root = Path(runs_root if runs_root is not None else spec.runs_root)
    missing: list[str] = []
    unfinished: list[str] = []
    warnings: list[str] = []
    if not root.is_dir():
        warnings.append(f"runs root {root} does not exist")
    cells: dict[tuple[str, str, str], Cell] = {}
    scanned: dict[tuple[str, ...], list[RunFolder]] = {}
    column_runs: dict[str, list[RunFolder]] = {c.label: [] for c in spec.columns}
    select_keys_seen: set[str] = set()
    all_configs: list[dict[str, Any]] = []

    for row in spec.rows:
        if row.patterns not in scanned:
            runs, warns = scan_runs(root, row.patterns) if root.is_dir() else ([], [])
            scanned[row.patterns] = runs
            warnings += [w for w in warns if w not in warnings]
            all_configs += [r.config for r in runs]
        runs = scanned[row.patterns]
        where = ", ".join(str(root / p) for p in row.patterns) if row.patterns else str(root)
        for col in spec.columns:
            select = {**row.select, **col.select}
            matched = [r for r in runs if config_matches(r.config, select)]
            finished = [r for r in matched if r.final is not None]
            column_runs[col.label] += finished
            for r in matched:
                if r.final is None:
                    unfinished.append(f"{row.label} × {col.label}: {r.path} ({r.problem})")
            if not matched:
                missing.append(
                    f"{row.label} × {col.label}: no run folder under {where} "
                    f"matches {{{_describe_select(select)}}}"
                )
            elif row.seeds is not None:
                have = {r.seed for r in matched}
                absent = [s for s in row.seeds if s not in have]
                if absent:
                    missing.append(
                        f"{row.label} × {col.label}: no run folder for seed(s) "
                        f"{', '.join(map(str, absent))}"
                    )
            seeds = [r.seed for r in finished]
            dups = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
            if dups:
                paths = [str(r.path) for r in finished if r.seed in dups]
                warnings.append(
                    f"{row.label} × {col.label}: seed(s) {', '.join(map(str, dups))} "
                    f"counted more than once ({', '.join(paths)})"
                )
            for m in spec.metrics:
                key = row.keys.get(m.key, m.key)
                vals = [r.final.get(key) for r in finished]
                good = [float(v) for v in vals if _finite(v)]
                # A metric no run of the row has (a NELBO for a flow) is just "—";
                # one that only some seeds lack points at a broken run.
                if good and len(good) < len(finished):
                    warnings.append(
                        f"{row.label} × {col.label}: '{key}' absent or not finite in "
                        f"{len(finished) - len(good)} of {len(finished)} finished runs"
                    )
                cell = Cell(n=len(good))
                if good:
                    cell.mean = float(np.mean(good))
                    cell.std = float(np.std(good, ddof=1)) if len(good) > 1 else None
                cells[(row.label, col.label, m.key)] = cell
        select_keys_seen |= set(row.select)
    for col in spec.columns:
        select_keys_seen |= set(col.select)
    for key in sorted(select_keys_seen):
        if all_configs and all(_lookup(c, key) is _MISSING for c in all_configs):
            warnings.append(f"select key '{key}' is absent from every run's config.yaml (a typo?)")

    for m in spec.metrics:
        if m.better is None:
            continue
        for col in spec.columns:
            ours = [cells[(r.label, col.label, m.key)] for r in spec.rows]
            means = [c.mean for c in ours if c.mean is not None]
            if len(means) > 1:
                best = min(means) if m.better == "lower" else max(means)
                for c in ours:
                    c.bold = c.mean == best

    marks_used: set[str] = set()
    footnotes: list[str] = []
    for ref in spec.references:
        for col in spec.columns:
            for m in spec.metrics:
                rv = ref.values.get((col.label, m.key))
                cell = Cell()
                if rv is not None:
                    cell = Cell(mean=rv.value, n=0, mark=STATUS_MARKS[rv.status])
                    if rv.note:
                        footnotes.append(f"{ref.label}, {col.label}, {m.label}: {rv.note}")
                if m.key in ref.from_runs:
                    key = ref.from_runs[m.key]
                    vals = [r.final.get(key) for r in column_runs[col.label]]
                    good = [float(v) for v in vals if _finite(v)]
                    if good:
                        cell = Cell(mean=float(np.mean(good)), mark=STATUS_MARKS[ref.status])
                        if max(good) - min(good) > 1e-6 * max(1.0, abs(cell.mean)):
                            warnings.append(
                                f"reference '{ref.label}' × {col.label}: '{key}' differs "
                                f"between runs ({min(good):.6g} … {max(good):.6g}); mean shown"
                            )
                if cell.mean is not None:
                    marks_used.add(cell.mark)
                cells[(ref.label, col.label, m.key)] = cell
        if ref.source or ref.note:
            text = f"{ref.label}: " + "; ".join(x for x in (ref.source, ref.note) if x)
            if ref.from_runs:
                keys = ", ".join(f"{k} = final.json '{v}'" for k, v in ref.from_runs.items())
                text += f" ({keys} of the column's runs)"
            footnotes.append(text)
    for row in spec.rows:
        if row.note:
            footnotes.append(f"{row.label}: {row.note}")
    footnotes = [STATUS_FOOTNOTES[m] for m in ("†", "‡") if m in marks_used] + footnotes
    footnotes += list(spec.notes)
    return Table(
        spec,
        [r.label for r in spec.rows],
        [r.label for r in spec.references],
        cells,
        missing,
        unfinished,
        warnings,
        footnotes,
    )


# -------------------------------------------------------------------- render
def _fmt(v: float, decimals: int) -> str:
    s = f"{v:.{decimals}f}"
    return s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.000"


def _cell_md(cell: Cell, m: Metric, ours: bool) -> str:
    if cell.mean is None:
        return "—"
    text = _fmt(cell.mean, m.decimals)
    if ours:
        if cell.std is not None:
            text += f" ± {_fmt(cell.std, m.decimals)}"
        text = f"**{text}**" if cell.bold else text
        return f"{text} (n={cell.n})"
    return text + cell.mark


def _headers(table: Table) -> list[tuple[str, str, Metric]]:
    return [(c.label, m.key, m) for c in table.spec.columns for m in table.spec.metrics]


def _status_lines(table: Table) -> list[str]:
    lines = []
    for title, items in (
        ("missing (no run folder)", table.missing),
        ("unfinished (no usable final.json)", table.unfinished),
        ("warnings", table.warnings),
    ):
        if items:
            lines.append(f"{title}:")
            lines += [f"  - {x}" for x in items]
    return lines


def render_markdown(table: Table) -> str:
    """The table in markdown, its footnotes, and the status of the runs."""
    spec = table.spec
    multi = len(spec.metrics) > 1
    heads = _headers(table)
    header = ["method"] + [f"{c} {m.label}" if multi else c for c, _, m in heads]
    lines = [f"### {spec.title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|---" + "|---:" * len(heads) + "|")
    for label, ours in [(r, True) for r in table.rows] + [(r, False) for r in table.ref_rows]:
        cells = [_cell_md(table.cells[(label, c, k)], m, ours) for c, k, m in heads]
        lines.append("| " + " | ".join([label] + cells) + " |")
    lines.append("")
    lines.append(
        "Our rows: mean ± std over seeds (n = finished runs; no ± when n = 1); "
        "— = no finished run or no reference."
    )
    lines += [f"- {f}" for f in table.footnotes]
    status = _status_lines(table)
    if status:
        lines += ["", "Run status:", ""] + status
    else:
        lines += ["", "Run status: every selected run is finished."]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "†": r"$^\dagger$",
    "‡": r"$^\ddagger$",
    "—": "---",
    "×": r"$\times$",
    "²": r"$^2$",
    "Δ": r"$\Delta$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and map the few non-ASCII symbols the tables use."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def _cell_tex(cell: Cell, m: Metric, ours: bool) -> str:
    if cell.mean is None:
        return "---"
    # One math group per cell: "$a$$^\dagger$" would open display math.
    text = _fmt(cell.mean, m.decimals)
    if not ours:
        mark = {"†": r"^\dagger", "‡": r"^\ddagger"}.get(cell.mark, "")
        return f"${text}{mark}$"
    if cell.std is not None:
        text += rf" \pm {_fmt(cell.std, m.decimals)}"
    if cell.bold:
        text = rf"\mathbf{{{text}}}"
    return f"${text}$" + rf" {{\scriptsize({cell.n})}}"


def render_latex(table: Table) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
    spec = table.spec
    nm, nc = len(spec.metrics), len(spec.columns)
    heads = _headers(table)
    lines = [
        f"% generated by experiments/tables.py from the table spec '{spec.name}'",
        r"% needs \usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(spec.caption)}}}",
        rf"\label{{tab:{spec.name}}}",
        r"\begin{tabular}{l" + ("".join(" " + "r" * nm for _ in range(nc))) + "}",
        r"\toprule",
    ]
    if nm > 1:
        groups = " & ".join(
            rf"\multicolumn{{{nm}}}{{c}}{{{latex_escape(c.label)}}}" for c in spec.columns
        )
        lines.append(f" & {groups} \\\\")
        lines.append(
            "".join(rf"\cmidrule(lr){{{2 + i * nm}-{1 + (i + 1) * nm}}}" for i in range(nc))
        )
        lines.append("Method & " + " & ".join(latex_escape(m.label) for _, _, m in heads) + r" \\")
    else:
        lines.append("Method & " + " & ".join(latex_escape(c) for c, _, _ in heads) + r" \\")
    lines.append(r"\midrule")
    for label in table.rows:
        cells = [_cell_tex(table.cells[(label, c, k)], m, True) for c, k, m in heads]
        lines.append(" & ".join([latex_escape(label)] + cells) + r" \\")
    if table.ref_rows:
        lines.append(r"\midrule")
        for label in table.ref_rows:
            cells = [_cell_tex(table.cells[(label, c, k)], m, False) for c, k, m in heads]
            lines.append(" & ".join([latex_escape(label)] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = ["Ours: mean $\\pm$ std over seeds, number of finished runs in parentheses."] + [
        latex_escape(f) for f in table.footnotes
    ]
    lines.append(r"\par\smallskip{\footnotesize " + r" \\ ".join(notes) + "}")
    lines.append(r"\end{table}")
    for x in table.missing:
        lines.append(f"% missing: {x}")
    for x in table.unfinished:
        lines.append(f"% unfinished: {x}")
    return "\n".join(lines) + "\n"
