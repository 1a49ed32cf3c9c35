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
    slurm: {partition: gpu, gpus: 1, cpus_per_task: 4, mem: 16G, time: "04:00:00"}  # slurm/launch.py

expands to the Cartesian product of the axes, where each ``zip`` group counts
as one axis whose lists are walked in step (above: 2 × 2 × 3 = 12 runs).
``base`` may also be a list of training configs, and a file name may name an
axis in braces, filled in per run: ``../ffjord/{data.name}.yaml`` picks each
data set's own config (for settings that differ by more than a few keys).
The runs are then every base × the axes' product, each folder name starting
with its base's label (``<folder>-<stem>``, or ``<folder>`` for a template)::

    base: [../ffjord/{data.name}.yaml, ../flows/glow_tabular.yaml]
    axes: {data.name: [power, gas], seed: [0]}     # 2 bases x 2 sets = 4 runs

``base_overrides`` gives one listed base more fixed overrides, applied after
``overrides`` (so they may change one of them for that base alone; not an
axis), keyed by the base as the file lists it::

    base_overrides:
      ../score/vp_digits.yaml: {eval.divergence.name: hutchinson}

Every run gets a deterministic folder named by a readable digest of its axis values
(``data.name-checkerboard__model.jacobian-0.01__model.kinetic-0.01_s0``), so a
relaunched sweep finds its runs again: finished ones are skipped, partial ones
resume from their checkpoints.

:func:`load_sweep` validates the file against :class:`cnf.schema.SweepSchema`
(unknown keys, empty axes, zip groups) and :func:`plan` resolves every run's
config with :func:`cnf.config.load_config`, which rejects an axis on a key
the base config lacks and bad values. Every problem is a :class:`SweepError`
with a one-line message. The JSON-lines manifest (:func:`manifest_text`, line
*i* = run *i*) is what a launcher reads; SLURM lives outside the library, in
``slurm/launch.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Run",
    "Sweep",
    "SweepError",
    "format_value",
    "load_sweep",
    "manifest_text",
    "plan",
    "base_label",
    "fill_base",
    "run_base",
    "run_name",
    "run_status",
]

MAX_DIGEST = 100  # characters of the readable digest before it is cut and hashed
STATUSES = ("new", "partial", "running", "finished", "conflict")


class SweepError(ValueError):
    """A sweep file that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file (:func:`load_sweep`)."""

    name: str
    path: Path
    base: Path  # the first base
    overrides: dict[str, Any]
    axes: dict[str, list[Any]]
    zip: tuple[tuple[str, ...], ...]
    runs_root: Path
    slurm: dict[str, Any] = field(default_factory=dict)  # validated by slurm/launch.py
    bases: tuple[str, ...] = ()  # absolute base templates, when the file lists several
    # absolute base template -> its own fixed overrides (``base_overrides``)
    base_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

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
    base: Path | None = None  # its training config, when the sweep lists several

    @property
    def train_overrides(self) -> list[str]:
        """The overrides for ``experiments/train.py``, ``run.dir`` last."""
        return [*self.overrides, f"run.dir={format_value(str(self.run_dir))}"]

    def describe(self) -> str:
        axes = " ".join(f"{k}={format_value(v)}" for k, v in self.axis_values.items())
        return f"{base_label(self.base)} {axes}" if self.base is not None else axes


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

    The file is an OmegaConf structured config of :class:`cnf.schema.SweepSchema`
    (unknown keys and wrong types are errors); its ``slurm:`` section is left
    to the SLURM launcher (``slurm/launch.py``).

    Args:
        path: The sweep YAML.
        search: More folders to look for ``base`` in, after the sweep file's
            own (e.g. the repository root).
        runs_root: Overrides the file's ``runs_root``.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cnf.config import ConfigError, _format_omegaconf_error, read_yaml
    from cnf.schema import SweepSchema

    path = Path(path)
    where = str(path)
    raw = read_yaml(path, what="sweep file", error=SweepError)
    if not isinstance(raw, Mapping):
        raise SweepError(f"{where}: a sweep file holds a mapping (name, base, axes, ...)")
    root_schema = OmegaConf.structured(SweepSchema)
    try:
        merged = OmegaConf.merge(root_schema, raw)
        spec = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise SweepError(f"{where}: {_format_omegaconf_error(e, root_schema)}") from None
    except (ValueError, ConfigError) as e:
        raise SweepError(f"{where}: {str(e).splitlines()[0]}") from None
    overrides = {_check_key(k, f"{where}: overrides"): v for k, v in spec.overrides.items()}
    axes: dict[str, list[Any]] = {}
    for key, values in spec.axes.items():
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
    for group in spec.zip:
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
    bases = _find_bases(spec.base, axes, path, search, where)
    listed = spec.base if isinstance(spec.base, list) else [spec.base]
    per_base: dict[str, dict[str, Any]] = {}
    for written, extra in spec.base_overrides.items():
        if written not in listed:
            raise SweepError(
                f"{where}: base_overrides: '{written}' is not a listed base; "
                f"valid: {', '.join(map(str, listed))}"
            )
        if not isinstance(extra, Mapping):
            raise SweepError(f"{where}: base_overrides.{written} must map dotted keys to values")
        checked = {_check_key(k, f"{where}: base_overrides.{written}"): v for k, v in extra.items()}
        for key in checked:
            if key in axes:
                raise SweepError(f"{where}: '{key}' is both a base override and an axis")
        per_base[bases[listed.index(written)]] = checked
    return Sweep(
        name=spec.name,
        path=path,
        base=fill_base(bases[0], {k: v[0] for k, v in axes.items()}),
        bases=bases if len(bases) > 1 or _PLACEHOLDER.search(bases[0]) else (),
        overrides=dict(overrides),
        axes=axes,
        zip=tuple(groups),
        runs_root=Path(runs_root if runs_root is not None else spec.runs_root),
        slurm=dict(spec.slurm),
        base_overrides=per_base,
    )


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


def fill_base(template: str, axis_values: Mapping[str, Any]) -> Path:
    """A base template with its ``{axis}`` placeholders replaced by the run's values."""
    return Path(_PLACEHOLDER.sub(lambda m: str(axis_values[m.group(1)]), template))


def _find_bases(
    listed: Any, axes: Mapping[str, list[Any]], path: Path, search: Sequence[str | Path], where: str
) -> tuple[str, ...]:
    """Every base as an absolute template; each file it can name must exist."""
    listed = listed if isinstance(listed, list) else [listed]
    if not listed:
        raise SweepError(f"{where}: base must be a training config or a non-empty list of them")
    out: list[str] = []
    for base in listed:
        if not isinstance(base, str):
            raise SweepError(f"{where}: base must be the path of a training config, got {base!r}")
        keys = _PLACEHOLDER.findall(base)
        if _PLACEHOLDER.search(str(Path(base).parent)):
            raise SweepError(f"{where}: base {base}: an axis may only be named in the file name")
        for key in keys:
            if key not in axes:
                raise SweepError(f"{where}: base {base}: {{{key}}} is not an axis")
        combos = [dict(zip(keys, v)) for v in itertools.product(*(axes[k] for k in keys))]
        found = [_find_base(str(fill_base(base, c)), path, search, where) for c in combos]
        out.append(str(found[0].parent / Path(base).name) if keys else str(found[0]))
    if len(set(out)) < len(out):
        raise SweepError(f"{where}: base lists a config twice")
    return tuple(out)


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


def base_label(base: str | Path) -> str:
    """``<folder>-<stem>`` of a config (``rnode/power.yaml`` → ``rnode-power``); ``<folder>`` of a template."""
    base = Path(base)
    return base.parent.name if _PLACEHOLDER.search(base.name) else f"{base.parent.name}-{base.stem}"


def run_name(axis_values: Mapping[str, Any], seed: int, *, prefix: str = "") -> str:
    """``[<prefix>__]<key-value>__<key-value>..._s<seed>``: keys sorted, seed as the suffix.

    Characters that do not belong in a folder name become ``-``; a digest longer
    than :data:`MAX_DIGEST` characters is cut and completed by a short hash of
    the values, so names stay unique and short.
    """
    values = {k: v for k, v in axis_values.items() if k != "seed"}
    parts = [prefix] if prefix else []
    parts += [f"{k}-{_token(values[k])}" for k in sorted(values)]
    digest = re.sub(r"[^A-Za-z0-9._+-]+", "-", "__".join(parts))
    if len(digest) > MAX_DIGEST:
        digest = digest[: MAX_DIGEST - 10].rstrip("-_.") + "-" + _short_hash(values)
    return f"{digest}_s{seed}" if digest else f"s{seed}"


# --------------------------------------------------------------------- plan
def plan(sweep: Sweep, *, absolute: bool = True) -> list[Run]:
    """Expand the sweep and resolve every run's config (validating keys and values).

    A run's overrides are the fixed ones, its base's ``base_overrides``, its
    axis values and the tracking ones. Every run gets the overrides ``track.group=<sweep name>`` and
    ``track.tags=[<base tags>, key=value, ...]`` so W&B groups and filters them.

    Raises:
        SweepError: a run's config does not resolve (unknown key, bad value),
            two runs are identical, or two runs would share a folder.
    """
    from cnf.config import ConfigError, load_config, to_dict

    root = sweep.folder.absolute() if absolute else sweep.folder
    runs: list[Run] = []
    tags_of: dict[Path, list[str]] = {}
    for template in sweep.bases or (str(sweep.base),):
        label = base_label(template) if sweep.bases else ""
        # The sweep's fixed overrides, then this base's own (``base_overrides``), in order:
        # a base override of a mapping merges into the fixed one, not replaces it.
        given = [*sweep.overrides.items(), *sweep.base_overrides.get(template, {}).items()]
        fixed = [f"{k}={format_value(v)}" for k, v in given]
        for values in expand(sweep):
            base = fill_base(template, values)
            if base not in tags_of:
                try:
                    base_cfg = load_config(base, fixed)
                except ConfigError as e:
                    raise SweepError(f"{sweep.path}: base {base} with overrides: {e}") from None
                tags_of[base] = [str(t) for t in base_cfg.track.tags]
            base_tags = tags_of[base] + ([f"base={label}"] if label else [])
            axis = [f"{k}={format_value(v)}" for k, v in values.items()]
            tags = base_tags + [f"{k}={_token(v)}"[:64] for k, v in values.items()]
            track = [f"track.group={format_value(sweep.name)}", f"track.tags={format_value(tags)}"]
            overrides = (*fixed, *axis, *track)
            try:
                cfg = load_config(base, list(overrides))
            except ConfigError as e:
                where = f"{label} " if label else ""
                raise SweepError(f"{sweep.path}: run {where}{' '.join(axis)}: {e}") from None
            name = run_name(values, int(cfg.seed), prefix=label)
            runs.append(
                Run(
                    len(runs),
                    name,
                    dict(values),
                    tuple(overrides),
                    root / name,
                    int(cfg.seed),
                    to_dict(cfg),
                    base if label else None,
                )
            )
    _check_unique(sweep, runs)
    return runs


def _check_unique(sweep: Sweep, runs: list[Run]) -> None:
    by_values: dict[str, Run] = {}
    for r in runs:
        key = json.dumps([str(r.base), r.axis_values], sort_keys=True, default=str)
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
                    r.base,
                )


def run_base(run: Run, base: Path) -> Path:
    """The training config of ``run``: its own, or the sweep's single ``base``."""
    return run.base if run.base is not None else base


def run_status(run: Run) -> str:
    """``finished`` | ``running`` | ``partial`` | ``new`` | ``conflict`` (:meth:`cnf.rundir.RunDir.status`)."""
    from cnf.rundir import RunDir

    return RunDir(run.run_dir).status(run.config)


# --------------------------------------------------------------- manifest
def manifest_text(runs: Sequence[Run], base: Path) -> str:
    """JSON lines, line *i* = array task *i*: ``config``, ``overrides``, ``run_dir``, ``name``.

    ``config`` is the run's own base when the sweep lists several, else ``base``.
    """
    lines = []
    for r in runs:
        entry = {
            "index": r.index,
            "name": r.name,
            "run_dir": str(r.run_dir),
            "config": str(run_base(r, base)),
            "overrides": r.train_overrides,
        }
        lines.append(json.dumps(entry, sort_keys=True))
    return "".join(line + "\n" for line in lines)
