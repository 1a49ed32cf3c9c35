"""Result tables from finished run folders, with published numbers beside ours (docs/published-numbers.md).

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

**Cost-curve rows.** A row with ``source: cost_curve`` takes its cells from
the per-setting records ``experiments/cost_curve.py RUN_DIR`` writes into the
run folder (``RUN_DIR/cost_curve*/cost_curve.jsonl``) instead of
``final.json``: one record per run × sampling setting, selected by the run's
config plus ``cost.*`` keys of the record — ``cost.setting.<key>`` (the
setting as given, e.g. ``cost.setting.sampler: heun``), ``cost.settings.<key>``
(every resolved setting, e.g. ``cost.settings.grid: karras``) and its scalars
(``cost.fid_nfe``, ``cost.sample_nfe``, ``cost.label``, ...); the metrics are
record keys (``bpd``, ``fid``, ``kid``, ...). So columns can be sampling
budgets::

    columns:
      - {label: 10 NFE, select: {cost.fid_nfe: {in: [9, 10]}}}   # Heun 5 steps = 9 NFE
    rows:
      - {label: score Heun (EDM), source: cost_curve,
         select: {model.family: score, cost.setting.sampler: heun, cost.setting.grid: karras}}
      - {label: RealNVP, select: {model.family: flow}, keys: {bpd: test_bpd}}

A ``final.json`` row has one sampling setting, its own: column filters on
``cost.*`` keys do not apply to it, so its value appears in every column
whose other filters match (a discrete flow at its single network pass).
Records made before the run's last training iteration are skipped (with a
warning); a matching run without records is listed as unfinished.

**FID.** A run's metrics are its ``final.json``; where that has no ``fid``, the
JSON that ``experiments/fid.py`` prints, saved in the run folder as
``fid.json`` (``python experiments/fid.py RUN ... | tail -n 1 > RUN/fid.json``),
adds ``fid``, ``kid``, ``fid_num_samples`` and ``fid_nfe`` (its NFE per
sample) — only if it was computed at the run's final iteration.

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

from cnf.config import ConfigError, read_yaml

__all__ = [
    "STATUS_FOOTNOTES",
    "STATUS_MARKS",
    "Cell",
    "Metric",
    "RunFolder",
    "Table",
    "TableSpec",
    "TableSpecError",
    "build_table",
    "config_matches",
    "load_table_spec",
    "parse_table_spec",
    "read_cost_records",
    "scan_runs",
]

STATUS_MARKS = {"confirmed": "", "measured": "‡", "unverified": "†", "recalled": "†"}
FID_FILE = "fid.json"  # experiments/fid.py's JSON line, saved in a run folder
# fid.json key -> metric key it provides
FID_KEYS = {
    "fid": "fid",
    "kid": "kid",
    "num_samples": "fid_num_samples",
    "nfe_per_sample": "fid_nfe",
    "fid_data": "fid_data",  # the held-out test images' own FD: a reference row's floor
    "kid_data": "kid_data",
}
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
    source: str = "final"  # final | cost_curve


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


def _as_list(v: Any) -> list[Any]:
    if v is None:
        return []
    return list(v) if isinstance(v, list | tuple) else [v]


def _shorthands(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Expand the documented shorthands (a string metric, column or run pattern) to sections."""
    out = dict(raw)
    out["metrics"] = [
        {"key": m} if isinstance(m, str) else m for m in _as_list(raw.get("metrics", ["test_nll"]))
    ]
    column_key = raw.get("column_key", "data.name")
    out["columns"] = [
        {"label": c, "select": {column_key: c}} if isinstance(c, str) else c
        for c in _as_list(raw.get("columns"))
    ]
    if "rows" in raw and not isinstance(raw["rows"], list | tuple):
        raise _err("rows", "must be a non-empty list (methods)")
    rows = []
    for r in _as_list(raw.get("rows")):
        if isinstance(r, Mapping) and "runs" in r:
            r = {**r, "runs": _as_list(r["runs"])}
        rows.append(r)
    out["rows"] = rows
    out["notes"] = _as_list(raw.get("notes"))
    return out


def _select(v: Mapping[str, Any], where: str) -> dict[str, Any]:
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


def parse_table_spec(raw: Any, *, default_name: str | None = None) -> TableSpec:
    """Validate a table spec given as plain data (see the module docstring).

    The spec is an OmegaConf structured config of :class:`cnf.schema.TableSpecSchema`
    (after the documented shorthands are expanded); references across its
    parts (a row's ``keys``, a reference's columns and metrics) are checked here.

    Args:
        raw: The spec mapping.
        default_name: Used when the spec has no ``name`` (e.g. the file stem).

    Raises:
        TableSpecError: one line naming the offending key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cnf.config import _format_omegaconf_error
    from cnf.schema import TableSpecSchema

    if not isinstance(raw, Mapping):
        raise _err("top level", f"must be a mapping, got {type(raw).__name__}")
    schema = OmegaConf.structured(TableSpecSchema)
    try:
        spec = OmegaConf.to_object(OmegaConf.merge(schema, _shorthands(raw)))
    except OmegaConfBaseException as e:
        raise TableSpecError(f"table spec: {_format_omegaconf_error(e)}") from None
    except ValueError as e:
        raise TableSpecError(f"table spec: {str(e).splitlines()[0]}") from None
    name = spec.name or default_name
    if not name or any(c in name for c in "/\\ ") or name.startswith("."):
        raise _err("name", f"{name!r} must be usable as a file name (no spaces or slashes)")
    title = spec.title or name
    caption = spec.caption or title
    metrics = tuple(
        Metric(m.key, m.label or m.key.replace("_", " "), m.decimals, m.better)
        for m in spec.metrics
    )
    if len({m.key for m in metrics}) != len(metrics):
        raise _err("metrics", "a metric key appears twice")
    metric_keys = {m.key for m in metrics}
    columns = tuple(
        Column(c.label, _select(c.select, f"columns[{i}].select"))
        for i, c in enumerate(spec.columns)
    )
    col_labels = [c.label for c in columns]
    if len(set(col_labels)) != len(col_labels):
        raise _err("columns", "a column label appears twice")
    rows = []
    for i, r in enumerate(spec.rows):
        where = f"rows[{i}]"
        patterns = ([f"sweeps/{r.sweep}"] if r.sweep else []) + list(r.runs)
        for p in patterns:
            if Path(p).is_absolute() or ".." in Path(p).parts:
                raise _err(f"{where}.runs", f"'{p}' must be a relative path under runs_root")
        for k in r.keys:
            if k not in metric_keys:
                raise _err(
                    f"{where}.keys", f"'{k}' is not one of the metrics ({', '.join(metric_keys)})"
                )
        if r.seeds is not None and not r.seeds:
            raise _err(f"{where}.seeds", "must be a non-empty list of integers")
        rows.append(
            Row(
                r.label,
                tuple(patterns),
                _select(r.select, f"{where}.select"),
                tuple(r.seeds) if r.seeds is not None else None,
                dict(r.keys),
                r.note,
                r.source,
            )
        )
    refs = []
    for i, ref in enumerate(spec.references):
        where = f"references[{i}]"
        values: dict[tuple[str, str], RefValue] = {}
        for col, cell in ref.values.items():
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
                    unknown = set(v) - {"value", "status", "note"}
                    if unknown:
                        raise _err(
                            f"{cwhere}.{mkey}",
                            f"unknown key '{sorted(unknown)[0]}'; valid: value, status, note",
                        )
                    status = v.get("status", ref.status)
                    if status not in STATUS_MARKS:
                        raise _err(f"{cwhere}.{mkey}.status", f"unknown status {status!r}")
                    values[(col, mkey)] = RefValue(
                        _number(v.get("value"), f"{cwhere}.{mkey}.value"), status, v.get("note")
                    )
                else:
                    values[(col, mkey)] = RefValue(_number(v, f"{cwhere}.{mkey}"), ref.status)
        for k in ref.from_runs:
            if k not in metric_keys:
                raise _err(f"{where}.from_runs", f"'{k}' is not one of the metrics")
        refs.append(
            Reference(ref.label, ref.status, ref.source, values, dict(ref.from_runs), ref.note)
        )
    return TableSpec(
        name,
        title,
        caption,
        spec.runs_root,
        metrics,
        columns,
        tuple(rows),
        tuple(refs),
        tuple(spec.notes),
    )


def load_table_spec(path: str | Path) -> TableSpec:
    """Read and validate a table spec file; its ``name`` defaults to the file stem.

    Raises:
        TableSpecError: missing file, invalid YAML or a malformed spec (one line).
    """
    path = Path(path)
    raw = OmegaConf.to_container(
        read_yaml(path, what="table spec", error=TableSpecError), resolve=True
    )
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
        final: ``final.json`` when the run is finished, else None (with the
            metrics of a current ``fid.json``, module docstring).
        problem: Why it is not finished (None when finished).
        warning: A one-line note on the folder (an unusable ``fid.json``).
    """

    path: Path
    config: dict[str, Any]
    final: dict[str, Any] | None
    problem: str | None = None
    warning: str | None = None

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


def _config_value(config: Mapping[str, Any], dotted: str, want: Any) -> Any:
    """The value a select key compares: a named choice ``{name: vp, ...}`` compares by its name."""
    have = _lookup(config, dotted)
    if isinstance(have, Mapping) and "name" in have and not isinstance(want, Mapping):
        return have["name"]
    return have


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
        have = _config_value(config, key, want)
        if have is _MISSING:
            return False
        options = want["in"] if isinstance(want, Mapping) else [want]
        if not any(_equal(have, w) for w in options):
            return False
    return True


def read_run_folder(path: Path) -> RunFolder | str:
    """A :class:`RunFolder`, or a one-line reason why ``path`` cannot be read as one."""
    from cnf.rundir import RunDir

    folder = RunDir(path)
    try:
        cfg = folder.read_config()
    except Exception as e:
        return f"{path}: config.yaml unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    if not isinstance(cfg, dict):
        return f"{path}: config.yaml is not a mapping"
    iters = _lookup(cfg, "train.iters")
    if not folder.is_finished():
        last = folder.last_logged_iteration()
        progress = f"; last logged iteration {last}" if last is not None else ""
        of = f" of {iters}" if last is not None and isinstance(iters, int) else ""
        return RunFolder(path, cfg, None, f"no final.json{progress}{of}")
    try:
        final = folder.read_final()
        if not isinstance(final, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        return RunFolder(path, cfg, None, f"final.json unreadable ({str(e).splitlines()[0]})")
    done = final.get("iterations")
    if final.get("stop_reason") == "early_stopping":
        iters = done  # ended by its validation rule, not by the count
    elif isinstance(final.get("budget_iters"), int):
        iters = final["budget_iters"]  # a budget run's count, fixed once and stored
    if isinstance(done, int) and isinstance(iters, int) and done < iters:
        return RunFolder(path, cfg, None, f"final.json is from iteration {done} of {iters} (stale)")
    return RunFolder(path, cfg, final, warning=_add_fid_file(path, final))


def _add_fid_file(path: Path, final: dict[str, Any]) -> str | None:
    """Add the metrics of ``path/fid.json`` to ``final`` (if it has no ``fid``); a warning or None."""
    file = path / FID_FILE
    if "fid" in final or not file.is_file():
        return None
    try:
        fid = json.loads(file.read_text())
        if not isinstance(fid, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        return f"{file}: unreadable ({str(e).splitlines()[0]}); its FID is not shown"
    if fid.get("iteration") != final.get("iterations"):
        return (
            f"{file}: computed at iteration {fid.get('iteration')}, the run ended at "
            f"{final.get('iterations')}; its FID is not shown (rerun experiments/fid.py)"
        )
    final.update({key: fid[k] for k, key in FID_KEYS.items() if k in fid and key not in final})
    return None


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"solver.name": "rk4"}`` → ``{"solver": {"name": "rk4"}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = str(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


COST_RECORDS = "cost_curve*/cost_curve.jsonl"
"""Where ``experiments/cost_curve.py RUN_DIR`` leaves its records, relative to the run folder."""


def read_cost_records(run: RunFolder) -> tuple[list[RunFolder], list[str]]:
    """A finished run's cost-curve records, each as a :class:`RunFolder` whose ``final`` is the record.

    The record's config is the run's plus ``cost``: the record's scalars,
    ``setting`` (as given) and ``settings`` (nested). Records of another run
    folder (a multi-run ``--out`` inside this one) are ignored; records made
    before the run's last iteration are skipped with a warning.

    Returns:
        ``(records, one-line warnings)``.
    """
    out: list[RunFolder] = []
    warnings: list[str] = []
    done = (run.final or {}).get("iterations")
    for path in sorted(run.path.glob(COST_RECORDS)):
        try:
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            warnings.append(f"{path}: unreadable ({str(e).splitlines()[0]})")
            continue
        stale = 0
        for rec in lines:
            if not isinstance(rec, dict) or Path(str(rec.get("run_dir", ""))).name != run.path.name:
                continue
            it = rec.get("iteration")
            if isinstance(done, int) and isinstance(it, int) and it < done:
                stale += 1
                continue
            cost = {k: v for k, v in rec.items() if not isinstance(v, Mapping | list)}
            cost["setting"] = _nested(rec.get("setting") or {})
            cost["settings"] = _nested(rec.get("settings") or {})
            out.append(RunFolder(run.path, {**run.config, "cost": cost}, rec))
        if stale:
            warnings.append(
                f"{path}: {stale} records are from an iteration before {done} (stale; skipped)"
            )
    return out, warnings


# Config values that legitimately differ between the runs a cell aggregates.
_VARYING = (
    "cost",  # the sampling settings of cost-curve records: the columns and rows select on them
    "seed",
    "run",
    "track",
    "device",
    "eval.plots",
    "train.log_every",
    "train.ckpt_every",
    "train.ckpt_minutes",
)


def _cell_config_differences(runs: Sequence[RunFolder], select: Mapping[str, Any]) -> list[str]:
    """``key (a, b)`` for every config value the runs of one cell disagree on, outside ``select``."""
    from cnf.rundir import flatten_config

    if len(runs) < 2:
        return []
    flat = [flatten_config(r.config) for r in runs]
    out = []
    for key in sorted(set().union(*flat)):
        if key in select or any(key == p or key.startswith(p + ".") for p in _VARYING):
            continue
        values = {json.dumps(f.get(key, "<missing>"), sort_keys=True, default=str) for f in flat}
        if len(values) > 1:
            out.append(f"{key} ({', '.join(sorted(values))})")
    return out


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
            if r.warning:
                warnings.append(r.warning)
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
    records: dict[Path, list[RunFolder]] = {}
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
            # Run folders match on the config; cost-curve records also on their cost.* keys.
            config_select = {k: v for k, v in select.items() if not k.startswith("cost.")}
            matched = [r for r in runs if config_matches(r.config, config_select)]
            for r in matched:
                if r.final is None:
                    unfinished.append(f"{row.label} × {col.label}: {r.path} ({r.problem})")
            finished = [r for r in matched if r.final is not None]
            if row.source == "cost_curve":
                per_run = []
                for r in finished:
                    if r.path not in records:
                        records[r.path], warns = read_cost_records(r)
                        warnings += [w for w in warns if w not in warnings]
                    if not records[r.path]:
                        unfinished.append(
                            f"{row.label} × {col.label}: {r.path} (no cost-curve records; "
                            f"run experiments/cost_curve.py {r.path})"
                        )
                    per_run += [q for q in records[r.path] if config_matches(q.config, select)]
                if finished and not per_run and any(records[r.path] for r in finished):
                    missing.append(
                        f"{row.label} × {col.label}: no cost-curve record of the "
                        f"{len(finished)} matching runs matches {{{_describe_select(select)}}}"
                    )
                finished = per_run
            column_runs[col.label] += finished
            differ = _cell_config_differences(finished, select)
            if differ:
                warnings.append(
                    f"{row.label} × {col.label}: the {len(finished)} runs differ in "
                    + "; ".join(differ[:4])
                    + (" ..." if len(differ) > 4 else "")
                    + " (the table does not select on these; the caption may not describe every run)"
                )
            if not matched:
                missing.append(
                    f"{row.label} × {col.label}: no run folder under {where} "
                    f"matches {{{_describe_select(config_select)}}}"
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
    for key in sorted(k for k in select_keys_seen if not k.startswith("cost.")):
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
