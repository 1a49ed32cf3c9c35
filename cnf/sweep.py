"""Sweeps: a grid of training runs from one YAML file (pure logic, no launching).

A sweep file::

    name: ffjord_toy                    # also the sweep's folder and SLURM job name
    base: ../ffjord/toy.yaml            # training config (relative to this file or the repo)
    overrides: {train.iters: 2000}      # fixed dotted overrides (optional)
    axes:                               # dotted key -> list of values; `seed` is an axis too
      data.name: [8gaussians, checkerboard]
      model.kinetic: [0.0, 0.01]
      model.jacobian: [0.0, 0.01]
      seed: [0, 1, 2]
    zip: [[model.kinetic, model.jacobian]]  # axes that vary together (optional)
    runs_root: runs/sweeps              # runs go to <runs_root>/<name>/<digest>_s<seed>
    slurm: {partition: gpu, gpus: 1, cpus_per_task: 4, mem: 16G, time: "04:00:00"}

expands to the Cartesian product of the axes, where each ``zip`` group counts
as one axis whose lists are walked in step (above: 2 × 2 × 3 = 12 runs). Every
run gets a deterministic folder named by a readable digest of its axis values
(``data.name-checkerboard__model.jacobian-0.01__model.kinetic-0.01_s0``), so a
relaunched sweep finds its runs again: finished ones are skipped, partial ones
resume from their checkpoints.

:func:`load_sweep` validates the file (unknown keys, empty axes, zip groups,
SLURM resource formats) and :func:`plan` resolves every run's config with
:func:`cnf.config.load_config`, which rejects an axis on a key the base config
lacks and bad values. Every problem is a :class:`SweepError` with a one-line
message. :func:`render_sbatch` fills a template from ``slurm/``; every value
that reaches the script is shell-quoted, and the run's overrides never do:
each array task reads them from the JSON-lines manifest (:func:`manifest_text`,
line *i* = array task *i*).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import shlex
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Run",
    "SlurmSpec",
    "Sweep",
    "SweepError",
    "array_spec",
    "format_value",
    "load_sweep",
    "manifest_text",
    "plan",
    "render_sbatch",
    "run_name",
    "run_status",
]

SWEEP_KEYS = ("name", "base", "overrides", "axes", "zip", "runs_root", "slurm")
MAX_DIGEST = 100  # characters of the readable digest before it is cut and hashed
STATUSES = ("new", "partial", "running", "finished", "conflict")


class SweepError(ValueError):
    """A sweep file that cannot be used; the message is one line."""


# --------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """YAML 1.2-style scalars: ``1:00:00`` stays a string (YAML 1.1 reads it as
    the base-60 integer 3600, which would silently turn a SLURM time into 60
    hours), and ``1e-3`` is a float (as OmegaConf reads it)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if not tag.endswith((":int", ":float"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(0|[1-9][0-9_]*)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.load(path.read_text(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except OSError as e:
        raise SweepError(f"cannot read sweep file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise SweepError(f"sweep file {path} is not valid YAML: {str(e).splitlines()[0]}") from None


# -------------------------------------------------------------------- SLURM
_TIME_RE = re.compile(
    r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}|\d+-\d{1,2}:\d{1,2}"
    r"|\d+-\d{1,2}:\d{1,2}:\d{1,2}|UNLIMITED|INFINITE)$"
)
_MEM_RE = re.compile(r"^\d+[KMGT]?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SLURM_WORD_RE = re.compile(r"^[A-Za-z0-9_.,:+-]+$")  # partition / account / qos / gres
_EXTRA_RE = re.compile(r"^--[a-z][a-z0-9-]*(=.*)?$")


@dataclass(frozen=True)
class SlurmSpec:
    """The ``slurm:`` section: resources of every array task.

    ``gpus`` and ``nproc_per_node`` are per node. With more than one process
    per node or more than one node, each task is a data-parallel job
    (``slurm/ddp.sbatch.tmpl``: ``srun`` + ``torchrun``); otherwise one process
    per task (``slurm/array.sbatch.tmpl``). ``setup`` lines (``module load``,
    ``source venv/bin/activate``) are shell commands and go into the script as
    written; everything else is validated and quoted.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gres: str | None = None  # e.g. gpu:a100:1; default gpu:<gpus> when gpus > 0
    gpus: int = 0  # GPUs per node
    nproc_per_node: int | None = None  # training processes per node; default max(gpus, 1)
    nodes: int = 1
    cpus_per_task: int = 1  # CPUs per node-task (shared by its processes)
    mem: str | None = None  # per node, e.g. 16G or 4000M
    time: str | None = None  # e.g. 04:00:00 or 1-00:00:00
    array_throttle: int = 0  # at most this many tasks at once; 0 = no limit
    signal_grace: int = 120  # seconds before the time limit at which USR1 arrives
    setup: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()  # more sbatch options, e.g. "--constraint=a100"
    job_name: str | None = None  # default: the sweep name
    python: str | None = None  # interpreter on the nodes; default: the one running sweep.py
    template: str = "auto"  # auto | array | ddp

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or max(self.gpus, 1)

    @property
    def kind(self) -> str:
        """Which template: ``ddp`` for multi-process or multi-node tasks, else ``array``."""
        if self.template != "auto":
            return self.template
        return "ddp" if self.nodes > 1 or self.procs_per_node > 1 else "array"


def _parse_slurm(raw: Any, where: str) -> SlurmSpec:
    if raw is None:
        return SlurmSpec()
    if not isinstance(raw, Mapping):
        raise SweepError(f"{where}: slurm must be a mapping of resources")
    known = SlurmSpec.__dataclass_fields__
    for key in raw:
        if key not in known:
            raise SweepError(
                f"{where}: unknown key 'slurm.{key}'; valid: {', '.join(sorted(known))}"
            )
    kw: dict[str, Any] = {}

    def text(key: str, pattern: re.Pattern[str], hint: str) -> None:
        if raw.get(key) is None:
            return
        value = str(raw[key])
        if isinstance(raw[key], (bool, float)) or not pattern.match(value):
            raise SweepError(f"{where}: slurm.{key}: {raw[key]!r} is not {hint}")
        kw[key] = value

    def integer(key: str, low: int, high: int | None = None) -> None:
        if raw.get(key) is None:
            return
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SweepError(f"{where}: slurm.{key}: {value!r} is not an integer >= {low}")
        if high is not None and value > high:
            raise SweepError(f"{where}: slurm.{key}: {value!r} is larger than {high}")
        kw[key] = value

    def lines(key: str, pattern: re.Pattern[str] | None, hint: str) -> None:
        if raw.get(key) is None:
            return
        value = raw[key]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SweepError(f"{where}: slurm.{key} must be a list of strings")
        for v in value:
            if "\n" in v or "\r" in v or (pattern is not None and not pattern.match(v)):
                raise SweepError(f"{where}: slurm.{key}: {v!r} is not {hint}")
        kw[key] = tuple(value)

    word = "a SLURM name (letters, digits, _ . , : + -)"
    text("partition", _SLURM_WORD_RE, word)
    text("account", _SLURM_WORD_RE, word)
    text("qos", _SLURM_WORD_RE, word)
    text("gres", _SLURM_WORD_RE, "a SLURM gres such as gpu:1 or gpu:a100:2")
    text("job_name", _NAME_RE, "a job name (letters, digits, . _ -)")
    text(
        "time",
        _TIME_RE,
        "a SLURM time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS; quote it in YAML)",
    )
    text("mem", _MEM_RE, "a SLURM memory size such as 4000M or 16G")
    integer("gpus", 0)
    integer("nproc_per_node", 1)
    integer("nodes", 1)
    integer("cpus_per_task", 1)
    integer("array_throttle", 0)
    integer("signal_grace", 1, 65535)
    lines("setup", None, "a shell line")
    lines("extra", _EXTRA_RE, "an sbatch option such as --constraint=a100")
    if raw.get("python") is not None:
        if not isinstance(raw["python"], str) or not raw["python"].strip():
            raise SweepError(f"{where}: slurm.python must be the path of a Python interpreter")
        kw["python"] = raw["python"]
    if raw.get("template") is not None:
        if raw["template"] not in ("auto", "array", "ddp"):
            raise SweepError(
                f"{where}: slurm.template: unknown value {raw['template']!r}; valid: auto, array, ddp"
            )
        kw["template"] = raw["template"]
    spec = SlurmSpec(**kw)
    if spec.gres and spec.gpus:
        raise SweepError(f"{where}: give slurm.gres or slurm.gpus, not both")
    return spec


# -------------------------------------------------------------------- sweep
@dataclass(frozen=True)
class Sweep:
    """A validated sweep file (:func:`load_sweep`)."""

    name: str
    path: Path
    base: Path
    overrides: dict[str, Any]
    axes: dict[str, list[Any]]
    zip: tuple[tuple[str, ...], ...]
    runs_root: Path
    slurm: SlurmSpec = field(default_factory=SlurmSpec)

    @property
    def folder(self) -> Path:
        """Where the sweep's runs, logs, script and manifest go."""
        return self.runs_root / self.name


@dataclass(frozen=True)
class Run:
    """One expanded run: its axis values, every override, and its folder."""

    index: int
    name: str
    axis_values: dict[str, Any]
    overrides: tuple[str, ...]  # fixed + axis + tracking overrides (run.dir not included)
    run_dir: Path
    seed: int
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # resolved

    @property
    def train_overrides(self) -> list[str]:
        """The overrides for ``experiments/train.py``, ``run.dir`` last."""
        return [*self.overrides, f"run.dir={format_value(str(self.run_dir))}"]

    def describe(self) -> str:
        return " ".join(f"{k}={format_value(v)}" for k, v in self.axis_values.items())


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$", key):
        raise SweepError(f"{where}: {key!r} is not a dotted config key")
    if key == "run.dir" or key.startswith("run.dir."):
        raise SweepError(f"{where}: run.dir is chosen by the sweep; remove it")
    return key


def load_sweep(
    path: str | Path,
    *,
    search: Sequence[str | Path] = (),
    runs_root: str | Path | None = None,
) -> Sweep:
    """Read and validate a sweep file (not yet the run configs: see :func:`plan`).

    Args:
        path: The sweep YAML.
        search: More folders to look for ``base`` in, after the sweep file's
            own (e.g. the repository root).
        runs_root: Overrides the file's ``runs_root``.
    """
    path = Path(path)
    where = str(path)
    raw = _read_yaml(path)
    if not isinstance(raw, Mapping):
        raise SweepError(f"{where}: a sweep file holds a mapping (name, base, axes, ...)")
    for key in raw:
        if key not in SWEEP_KEYS:
            raise SweepError(f"{where}: unknown key '{key}'; valid: {', '.join(SWEEP_KEYS)}")
    for key in ("name", "base", "axes"):
        if raw.get(key) is None:
            raise SweepError(f"{where}: missing required key '{key}'")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SweepError(
            f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder)"
        )
    base = _find_base(raw["base"], path, search, where)

    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise SweepError(f"{where}: overrides must be a mapping of dotted keys to values")
    overrides = {_check_key(k, f"{where}: overrides"): v for k, v in overrides.items()}

    axes_raw = raw["axes"]
    if not isinstance(axes_raw, Mapping) or not axes_raw:
        raise SweepError(f"{where}: axes must be a non-empty mapping of dotted keys to lists")
    axes: dict[str, list[Any]] = {}
    for key, values in axes_raw.items():
        _check_key(key, f"{where}: axes")
        if not isinstance(values, list):
            raise SweepError(f"{where}: axes.{key} must be a list of values, got {values!r}")
        if not values:
            raise SweepError(f"{where}: axes.{key} is empty; give at least one value")
        if key in overrides:
            raise SweepError(f"{where}: '{key}' is both a fixed override and an axis")
        axes[key] = values

    groups: list[tuple[str, ...]] = []
    seen: set[str] = set()
    zip_raw = raw.get("zip") or []
    if not isinstance(zip_raw, list) or not all(isinstance(g, list) for g in zip_raw):
        raise SweepError(f"{where}: zip must be a list of lists of axis keys")
    for group in zip_raw:
        if len(group) < 2:
            raise SweepError(f"{where}: zip group {group} needs at least two axes")
        for key in group:
            if key not in axes:
                raise SweepError(f"{where}: zip group {group}: '{key}' is not an axis")
            if key in seen:
                raise SweepError(f"{where}: zip: axis '{key}' is in more than one group")
            seen.add(key)
        lengths = [len(axes[k]) for k in group]
        if len(set(lengths)) > 1:
            shown = ", ".join(f"{k} has {n}" for k, n in zip(group, lengths))
            raise SweepError(f"{where}: zip group axes must have equal lengths ({shown})")
        groups.append(tuple(group))

    root = runs_root if runs_root is not None else raw.get("runs_root", "runs/sweeps")
    if not isinstance(root, (str, Path)) or not str(root):
        raise SweepError(f"{where}: runs_root must be a folder path")
    return Sweep(
        name=name,
        path=path,
        base=base,
        overrides=dict(overrides),
        axes=axes,
        zip=tuple(groups),
        runs_root=Path(root),
        slurm=_parse_slurm(raw.get("slurm"), where),
    )


def _find_base(base: Any, path: Path, search: Sequence[str | Path], where: str) -> Path:
    if not isinstance(base, str) or not base:
        raise SweepError(f"{where}: base must be the path of a training config")
    candidates = [path.parent / base, *(Path(s) / base for s in search)]
    if Path(base).is_absolute():
        candidates = [Path(base)]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise SweepError(
        f"{where}: base config '{base}' not found (looked in: "
        + ", ".join(str(c.parent) for c in candidates)
        + ")"
    )


def expand(sweep: Sweep) -> list[dict[str, Any]]:
    """Axis values of every run, in a deterministic order (later axes vary fastest).

    A zip group takes the position of its first axis in the file.
    """
    grouped = {k: g for g in sweep.zip for k in g}
    factors: list[tuple[str, ...]] = []
    for key in sweep.axes:
        group = grouped.get(key, (key,))
        if group not in factors:
            factors.append(group)
    choices = [
        [dict(zip(group, vals)) for vals in zip(*(sweep.axes[k] for k in group))]
        for group in factors
    ]
    out = []
    for combo in itertools.product(*choices):
        values: dict[str, Any] = {}
        for part in combo:
            values.update(part)
        out.append({k: values[k] for k in sweep.axes})  # file order
    return out


# ------------------------------------------------------------- names/values
def format_value(value: Any) -> str:
    """A value as the right-hand side of a ``key=value`` override (parsed back as YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # Bare if OmegaConf reads it back as the same string (also inside a
        # list), else a double-quoted YAML (= JSON) string.
        ok = bool(value) and value == value.strip() and not set(value) & set(",[]{}#'\"")
        if ok:
            from omegaconf import OmegaConf

            try:
                ok = OmegaConf.from_dotlist([f"v={value}"]).v == value
            except Exception:
                ok = False
        return value if ok else json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    raise SweepError(f"cannot use value {value!r} of type {type(value).__name__} in an override")


def _token(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(_token(v) for v in value)
    if isinstance(value, bool) or value is None:
        return format_value(value)
    if isinstance(value, Mapping):
        return "-".join(f"{k}-{_token(v)}" for k, v in value.items())
    return str(value)


def _short_hash(values: Mapping[str, Any]) -> str:
    canon = json.dumps({k: values[k] for k in sorted(values)}, sort_keys=True, default=str)
    return hashlib.sha1(canon.encode()).hexdigest()[:8]


def run_name(axis_values: Mapping[str, Any], seed: int) -> str:
    """``<key-value>__<key-value>..._s<seed>``: keys sorted, seed as the suffix.

    Characters that do not belong in a folder name become ``-``; a digest longer
    than :data:`MAX_DIGEST` characters is cut and completed by a short hash of
    the values, so names stay unique and short.
    """
    values = {k: v for k, v in axis_values.items() if k != "seed"}
    parts = [f"{k}-{_token(values[k])}" for k in sorted(values)]
    digest = re.sub(r"[^A-Za-z0-9._+-]+", "-", "__".join(parts))
    if len(digest) > MAX_DIGEST:
        digest = digest[: MAX_DIGEST - 10].rstrip("-_.") + "-" + _short_hash(values)
    return f"{digest}_s{seed}" if digest else f"s{seed}"


# --------------------------------------------------------------------- plan
def plan(sweep: Sweep, *, absolute: bool = True) -> list[Run]:
    """Expand the sweep and resolve every run's config (validating keys and values).

    Every run gets the overrides ``track.group=<sweep name>`` and
    ``track.tags=[<base tags>, key=value, ...]`` so W&B groups and filters them.

    Raises:
        SweepError: a run's config does not resolve (unknown key, bad value),
            two runs are identical, or two runs would share a folder.
    """
    from cnf.config import ConfigError, load_config, to_dict

    root = sweep.folder.absolute() if absolute else sweep.folder
    fixed = [f"{k}={format_value(v)}" for k, v in sweep.overrides.items()]
    try:
        base_cfg = load_config(sweep.base, fixed)
    except ConfigError as e:
        raise SweepError(f"{sweep.path}: base {sweep.base} with overrides: {e}") from None
    base_tags = [str(t) for t in base_cfg.track.tags]
    runs: list[Run] = []
    for i, values in enumerate(expand(sweep)):
        axis = [f"{k}={format_value(v)}" for k, v in values.items()]
        tags = base_tags + [f"{k}={_token(v)}"[:64] for k, v in values.items()]
        track = [f"track.group={format_value(sweep.name)}", f"track.tags={format_value(tags)}"]
        overrides = (*fixed, *axis, *track)
        try:
            cfg = load_config(sweep.base, list(overrides))
        except ConfigError as e:
            raise SweepError(f"{sweep.path}: run {' '.join(axis)}: {e}") from None
        name = run_name(values, int(cfg.seed))
        runs.append(
            Run(i, name, dict(values), tuple(overrides), root / name, int(cfg.seed), to_dict(cfg))
        )
    _check_unique(sweep, runs)
    return runs


def _check_unique(sweep: Sweep, runs: list[Run]) -> None:
    by_values: dict[str, Run] = {}
    for r in runs:
        key = json.dumps(r.axis_values, sort_keys=True, default=str)
        if key in by_values:
            raise SweepError(
                f"{sweep.path}: runs {by_values[key].index} and {r.index} are identical ({r.describe()})"
            )
        by_values[key] = r
    by_name: dict[str, list[int]] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r.index)
    for idx in by_name.values():
        if len(idx) > 1:
            # Different values that read the same once made folder-safe: make
            # those names unique with a hash of the exact values.
            for i in idx:
                r = runs[i]
                stem, seed = r.name.rsplit("_s", 1)
                new = f"{stem}-{_short_hash(r.axis_values)}_s{seed}"
                runs[i] = Run(
                    r.index,
                    new,
                    r.axis_values,
                    r.overrides,
                    r.run_dir.parent / new,
                    r.seed,
                    r.config,
                )


def run_status(run: Run) -> str:
    """``finished`` (final.json), ``running`` (its lock is held), ``partial`` (a
    checkpoint), ``new``, or ``conflict`` (the folder holds a run with another config)."""
    from cnf.train.loop import CKPT_NAME, run_dir_locked

    d = run.run_dir
    if (d / "final.json").is_file():
        return "finished"
    if run_dir_locked(d):
        return "running"
    if (d / "config.yaml").is_file() and run.config:
        from omegaconf import OmegaConf

        from cnf.train.loop import config_differences

        try:
            old = OmegaConf.to_container(OmegaConf.load(d / "config.yaml"), resolve=True)
        except Exception:
            return "conflict"
        if config_differences(old, run.config):
            return "conflict"
    return "partial" if (d / CKPT_NAME).is_file() else "new"


# ------------------------------------------------------------ SLURM script
def manifest_text(runs: Sequence[Run], base: Path) -> str:
    """JSON lines, line *i* = array task *i*: ``config``, ``overrides``, ``run_dir``, ``name``."""
    lines = []
    for r in runs:
        entry = {
            "index": r.index,
            "name": r.name,
            "run_dir": str(r.run_dir),
            "config": str(base),
            "overrides": r.train_overrides,
        }
        lines.append(json.dumps(entry, sort_keys=True))
    return "".join(line + "\n" for line in lines)


def array_spec(indices: Sequence[int], throttle: int = 0) -> str:
    """``0-3,7,9-10%2``: ranges compressed, ``%throttle`` appended when > 0."""
    if not indices:
        raise SweepError("no runs to submit")
    idx = sorted(set(indices))
    parts, start, prev = [], idx[0], idx[0]
    for i in [*idx[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts) + (f"%{throttle}" if throttle else "")


class _Template(string.Template):
    # ``$`` belongs to the shell in these scripts; placeholders are @@{name}.
    delimiter = "@@"


def render_sbatch(
    template: str,
    sweep: Sweep,
    indices: Sequence[int],
    *,
    manifest: Path,
    workdir: Path,
    python: str,
    log_dir: Path,
) -> str:
    """Fill an sbatch template (``slurm/*.sbatch.tmpl``) for the array tasks ``indices``.

    Every value is passed through :func:`shlex.quote`, also in ``#SBATCH``
    lines (sbatch strips the quotes), except the sweep's ``setup`` lines, which
    are shell commands by design.
    """
    s = sweep.slurm
    q = shlex.quote
    opts: list[str] = []
    for key, flag in (
        ("partition", "--partition"),
        ("account", "--account"),
        ("qos", "--qos"),
        ("time", "--time"),
        ("mem", "--mem"),
    ):
        value = getattr(s, key)
        if value is not None:
            opts.append(f"#SBATCH {flag}={q(value)}")
    opts.append(f"#SBATCH --cpus-per-task={int(s.cpus_per_task)}")
    gres = s.gres or (f"gpu:{int(s.gpus)}" if s.gpus else None)
    if gres:
        opts.append(f"#SBATCH --gres={q(gres)}")
    for line in s.extra:
        flag, sep, value = line.partition("=")
        opts.append(f"#SBATCH {flag}{sep}{q(value)}" if sep else f"#SBATCH {flag}")
    mapping = {
        "sweep_name": q(sweep.name),
        "job_name": q(s.job_name or sweep.name),
        "array": q(array_spec(indices, s.array_throttle)),
        "log_file": q(str(log_dir / "%A_%a.out")),
        "signal": q(f"B:USR1@{int(s.signal_grace)}"),
        "nodes": str(int(s.nodes)),
        "nproc_per_node": str(int(s.procs_per_node)),
        "sbatch_options": "\n".join(opts),
        "setup": "\n".join(s.setup) if s.setup else "# (no setup lines)",
        "workdir": q(str(workdir)),
        "python": q(python),
        "manifest": q(str(manifest)),
    }
    try:
        return _Template(template).substitute(mapping)
    except (KeyError, ValueError) as e:
        raise SweepError(f"sbatch template: bad or unknown placeholder {e}") from None
