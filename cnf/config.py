"""Run configs: OmegaConf YAML + dotted overrides, resolved into the schemas of :mod:`cnf.schema`.

``load_config(path, overrides)``:

1. reads the YAML (``_base_: other.yaml`` inherits from another file, relative
   to this one) and parses the ``key=value`` overrides;
2. moves keys of the previous release to their new place (:func:`migrate`,
   one warning naming them; kept for one release);
3. merges the overrides — changing a named choice's ``name`` starts its
   section afresh — into the structured schema of :class:`cnf.schema.Config`,
   with the model section chosen by ``model.family`` and every named choice's
   options schema chosen by its ``name``;
4. builds the typed objects (:func:`typed`), which validates every value and
   every name against its registry, and checks what depends on the data (an
   image set without ``data.path``, a vector-only family on image-shaped data).

Every failure is a :class:`ConfigError` with a one-line message naming the
key, the valid choices and, for a misspelt key, the nearest valid one — raised
before anything is built or written.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    ConfigTypeError,
    OmegaConfBaseException,
    ValidationError,
)

from cnf import schema
from cnf.registry import suggest

__all__ = [
    "ConfigError",
    "config_key_warning",
    "load_config",
    "migrate",
    "parse_overrides",
    "resolve",
    "to_dict",
    "typed",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line."""


class ConfigMigrationWarning(FutureWarning):
    """Keys of the previous release were moved to their new place."""


# ------------------------------------------------------------------- reading
def read_yaml(path: str | Path, *, what: str, error: type[Exception] = ConfigError) -> Any:
    """The YAML file at ``path`` (DictConfig or ListConfig), or a one-line ``error``.

    ``what`` names the file in the message: ``"<what> not found: <path>"`` or
    ``"<what> <path> is not valid YAML: <reason>"``.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return OmegaConf.load(path)
    except Exception as e:
        raise error(f"{what} {path} is not valid YAML: {_first_line(e)}") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: _base_ chain loops back to itself")
    cfg = read_yaml(path, what="config file")
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = cfg.pop("_base_", None)
    if base is not None:
        parent = _read_yaml(path.parent / str(base), (*seen, path.resolve()))
        cfg = OmegaConf.merge(parent, cfg)
    return cfg


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``["a.b=1", ...]`` → a config; a malformed item is one :class:`ConfigError` line."""
    items = []
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override '{o}' is not of the form dotted.key=value")
        key, _, value = o.partition("=")
        try:
            items.append(OmegaConf.from_dotlist([o]))
        except Exception as e:
            hint = ""
            if value.count("[") != value.count("]") or value.count("{") != value.count("}"):
                hint = " (unbalanced brackets; a list is written [64,64], quoted in the shell)"
            raise ConfigError(
                f"override '{o}': the value of '{key}' is not valid YAML{hint}: {_first_line(e)}"
            ) from None
    return OmegaConf.merge(*items) if items else OmegaConf.create({})


# ----------------------------------------------------------------- migration
def _move(node: DictConfig, old: str, new: str, moved: list[str], where: str) -> None:
    """Move ``node[old]`` to the dotted ``new`` inside ``node`` (if present)."""
    if old not in node:
        return
    value = node.pop(old)
    target = node
    parts = new.split(".")
    for p in parts[:-1]:
        if p not in target or not isinstance(target[p], DictConfig):
            target[p] = {}
        target = target[p]
    if parts[-1] not in target:
        target[parts[-1]] = value
    moved.append(f"{where}.{old} → {where}.{new}")


def _section(node: DictConfig, key: str) -> DictConfig:
    """``node[key]``, created as an empty section if absent (the node itself, not a copy)."""
    if key not in node or not isinstance(node[key], DictConfig):
        node[key] = {}
    return node[key]


def _name_section(node: DictConfig, key: str, moved: list[str], where: str) -> None:
    """A plain string choice ``key: vp`` becomes ``key: {name: vp}``."""
    if key in node and isinstance(node[key], str):
        node[key] = {"name": node[key]}
        moved.append(f"{where}.{key} → {where}.{key}.name")


_SDE_KEYS = {
    "vp": ("beta_min", "beta_max", "eps"),
    "subvp": ("beta_min", "beta_max", "eps"),
    "ve": ("sigma_min", "sigma_max", "eps"),
}
_DIFFUSION_KEYS = {
    "constant": ("value",),
    "linear": ("start", "end"),
    "geometric": ("start", "end"),
    "vp": ("beta_min", "beta_max"),
}
_RESFLOW_LOGDET = {
    "n_series_terms": "n_terms",
    "n_exact_terms": "n_exact_terms",
    "roulette_distribution": "distribution",
    "geometric_p": "geometric_p",
    "poisson_rate": None,  # Poisson roulette is refused (infinite variance): the rate is unused
    "probe": "probe",
    "neumann_grad": "neumann_grad",
}


def _migrate_solver(node: Any, moved: list[str], where: str) -> None:
    if isinstance(node, DictConfig) and "method" in node:
        _move(node, "method", "name", moved, where)


def _migrate_flow(m: DictConfig, moved: list[str]) -> None:
    _name_section(m, "flow", moved, "model")
    if "flow_kwargs" in m:
        kwargs = m.pop("flow_kwargs") or {}
        if "flow" not in m or not isinstance(m["flow"], DictConfig):
            m["flow"] = {}
        for k, v in kwargs.items():
            m.flow[k] = v
        moved.append("model.flow_kwargs.* → model.flow.*")
    flow = m.get("flow")
    if isinstance(flow, DictConfig) and (
        isinstance(flow.get("logdet"), str) or any(k in flow for k in _RESFLOW_LOGDET)
    ):
        logdet = flow.pop("logdet", None)
        section = {"name": logdet} if isinstance(logdet, str) else dict(logdet or {})
        for old, new in _RESFLOW_LOGDET.items():
            if old in flow:
                value = flow.pop(old)
                if new is not None:
                    section[new] = value
        flow["logdet"] = section
        moved.append("model.flow.{logdet, n_*_terms, ...} → model.flow.logdet.*")


def migrate(raw: DictConfig, *, from_run: bool = False, family: str | None = None) -> DictConfig:
    """Move the previous release's keys to their new places (a copy; one warning names them).

    Args:
        raw: An unresolved config (a file, overrides, or a run folder's ``config.yaml``).
        from_run: The config was written by a run of the previous release: keys
            whose default changed since keep their old value (``data.standardize``).
        family: The model family, for overrides that do not name it themselves.
    """
    raw = OmegaConf.create(OmegaConf.to_container(raw, resolve=False))
    moved: list[str] = []
    ev = raw.get("eval")
    if isinstance(ev, DictConfig):
        _migrate_solver(ev.get("solver"), moved, "eval.solver")
        _name_section(ev, "divergence", moved, "eval")
        for k in ("probe", "num_probes", "exact_max_dim"):
            _move(ev, k, f"divergence.{k}", moved, "eval")
    data = raw.get("data")
    if from_run and isinstance(data, DictConfig) and data.get("name") == "file":
        if "standardize" not in data:
            data["standardize"] = False
    m = raw.get("model")
    if not isinstance(m, DictConfig):
        if moved:
            _warn(moved)
        return raw
    family = m.get("family", family)
    _migrate_solver(m.get("solver"), moved, "model.solver")
    if family == "ffjord":
        _name_section(m, "divergence", moved, "model")
        for k in ("probe", "num_probes"):
            _move(m, k, f"divergence.{k}", moved, "model")
    if family == "fm":
        _name_section(m, "pairing", moved, "model")
        _move(m, "ot_solver", "pairing.ot_solver", moved, "model")
        _move(m, "logit_alpha", "preprocess.logit_alpha", moved, "model")
    if family in ("score", "indm"):
        if isinstance(m.get("sde"), str):
            name = m.sde
            m.sde = {"name": name}
            moved.append("model.sde → model.sde.name")
            for k in ("beta_min", "beta_max", "sigma_min", "sigma_max", "eps"):
                if k in m:
                    value = m.pop(k)
                    if k in _SDE_KEYS.get(name, ()):
                        m.sde[k] = value
                    moved.append(f"model.{k} → model.sde.{k}")
        elif any(k in m for k in ("beta_min", "beta_max", "sigma_min", "sigma_max", "eps")):
            for k in ("beta_min", "beta_max", "sigma_min", "sigma_max", "eps"):
                _move(m, k, f"sde.{k}", moved, "model")
        net_keys = ("hidden_dims", "activation", "time_embedding", "embed_dim", "embed_scale")
        if isinstance(m.get("net"), str) or any(k in m for k in (*net_keys, "unet")):
            _name_section(m, "net", moved, "model")
            name = m.get("net", {}).get("name", "mlp")
            unet = m.pop("unet", None)
            for k in net_keys:
                if k in m:
                    value = m.pop(k)
                    if name == "mlp" or (name == "unet" and k == "embed_scale"):
                        _section(m, "net")[k] = value
                    moved.append(f"model.{k} → model.net.{k}")
            if name == "unet" and unet:
                for k, v in unet.items():
                    if k != "image_shape" and k not in m.net:
                        m.net[k] = v
                moved.append("model.unet.* → model.net.*")
        _move(m, "data_scale", "preprocess.scale", moved, "model")
        _move(m, "data_shift", "preprocess.shift", moved, "model")
        _name_section(m, "sampler", moved, "model")
        _move(m, "sample_steps", "sampler.steps", moved, "model")
        for k in ("snr", "corrector_steps", "sde_method"):
            _move(m, k, f"sampler.{k}", moved, "model")
    if family in ("flow", "indm"):
        _migrate_flow(m, moved)
        prefix = "flow_logdet_" if family == "indm" else "logdet_"
        for k in ("exact_max_dim", "series_terms"):
            if prefix + k in m:
                value = m.pop(prefix + k)
                if k == "series_terms" and value == 0:
                    _section(m, "eval_logdet")["name"] = "own"
                else:
                    _section(m, "eval_logdet")[k] = value
                moved.append(f"model.{prefix}{k} → model.eval_logdet.{k}")
    if family == "flow":
        _move(m, "logit_alpha", "preprocess.logit_alpha", moved, "model")
        _move(m, "data_scale", "preprocess.scale", moved, "model")
        _move(m, "data_shift", "preprocess.shift", moved, "model")
    if family == "diffflow":
        if "input_shift" in m or "input_scale" in m:
            shift, scale = float(m.pop("input_shift", 0.0)), float(m.pop("input_scale", 1.0))
            pre = _section(m, "preprocess")
            pre["scale"], pre["shift"] = 1.0 / scale, -shift / scale
            moved.append("model.input_shift/input_scale → model.preprocess.{scale, shift}")
        if isinstance(m.get("grid"), DictConfig):
            _move(m.grid, "kind", "name", moved, "model.grid")
        diffusion = m.get("diffusion")
        if isinstance(diffusion, DictConfig) and diffusion.get("name") in _DIFFUSION_KEYS:
            keep = _DIFFUSION_KEYS[diffusion.name]
            for k in [k for k in diffusion if k != "name" and k not in keep]:
                diffusion.pop(k)
        for net in ("drift_net", "score_net"):
            section = m.get(net)
            if isinstance(section, DictConfig) and "options" in section:
                for k, v in (section.pop("options") or {}).items():
                    if k != "image_shape":
                        section[k] = v
                moved.append(f"model.{net}.options.* → model.{net}.*")
    if moved:
        _warn(moved)
    return raw


def _warn(moved: list[str]) -> None:
    warnings.warn(
        "config keys of the previous release moved (the old names work for one more "
        f"release): {'; '.join(dict.fromkeys(moved))}",
        ConfigMigrationWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------- named choices
def _data_kind(raw: DictConfig) -> str:
    """``image`` when the data keep their (C, H, W) shape, else ``vector``."""
    from cnf.data import DATASETS, dataset_kind

    name = OmegaConf.select(raw, "data.name", default="8gaussians")
    flatten = OmegaConf.select(raw, "data.flatten", default=True)
    if name not in DATASETS:
        return "vector"
    return dataset_kind(name, flatten=bool(flatten))


def _choice_schema(registry: str, name: str, kind: str) -> type:
    from cnf import choices

    reg = getattr(choices, registry)
    if registry.startswith("FLOWS"):
        builder = reg[name].builder(kind)
    else:
        builder = reg[name]
    return schema.options_schema(registry.lower(), name, builder)


def _install_choices(node: DictConfig, cls: type, raw: Any, kind: str, path: str) -> None:
    """Give every named-choice field of ``node`` (schema ``cls``) the schema its name selects."""
    for f in dataclasses.fields(cls):
        sub_raw = raw.get(f.name) if isinstance(raw, DictConfig) else None
        registry = f.metadata.get(schema.CHOICES)
        if registry is not None:
            default = f.default_factory()["name"]  # type: ignore[misc]
            name = sub_raw.get("name", default) if isinstance(sub_raw, DictConfig) else default
            if isinstance(sub_raw, str):
                raise ConfigError(
                    f"{path}{f.name}: write the choice as a section, {f.name}: {{name: {sub_raw}}}"
                )
            from cnf import choices

            reg = getattr(choices, registry)
            try:
                reg.check(name, key=f"{path}{f.name}.name")
            except ValueError as e:
                raise ConfigError(str(e)) from None
            defaults = {k: v for k, v in f.default_factory().items() if k != "name"}  # type: ignore[misc]
            if name != default:
                defaults = {}
            try:
                sub_schema = _choice_schema(registry, name, kind)
            except ValueError as e:
                raise ConfigError(f"{path}{f.name}: {e}") from None
            node[f.name] = OmegaConf.merge(OmegaConf.structured(sub_schema), defaults)
        elif f.name in _section_types(cls):
            _install_choices(
                node[f.name], _section_types(cls)[f.name], sub_raw, kind, f"{path}{f.name}."
            )


@functools.cache
def _section_types(cls: type) -> dict[str, type]:
    """The nested-dataclass fields of a schema, with their (resolved) types."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if isinstance(hints.get(f.name), type) and dataclasses.is_dataclass(hints[f.name])
    }


def _choice_paths(cls: type, prefix: str) -> set[str]:
    """Dotted paths of the named-choice fields of a schema (recursively)."""
    paths = {prefix + f.name for f in dataclasses.fields(cls) if schema.CHOICES in f.metadata}
    for name, sub in _section_types(cls).items():
        paths |= _choice_paths(sub, f"{prefix}{name}.")
    return paths


def _merge_overrides(base: DictConfig, over: DictConfig) -> DictConfig:
    """``base`` updated by ``over``; a named choice whose ``name`` changes starts afresh."""
    from cnf.models import MODELS

    family = OmegaConf.select(over, "model.family") or OmegaConf.select(base, "model.family")
    cls = MODELS[family].schema if family in MODELS else None
    out = OmegaConf.merge(base, over)
    for path in _choice_paths(cls, "model.") if cls is not None else ():
        new = OmegaConf.select(over, path)
        old = OmegaConf.select(base, path)
        if (
            isinstance(new, DictConfig)
            and isinstance(old, DictConfig)
            and "name" in new
            and new.name != old.get("name")
        ):
            OmegaConf.update(out, path, new, merge=False)
    return out


# ------------------------------------------------------------------ resolving
_TYPE_WORDS = {
    "Integer": "an integer",
    "Float": "a number",
    "Boolean": "true or false",
    "String": "a string",
}


def _valid_keys(root: DictConfig, full_key: str) -> list[str]:
    parent = full_key.rsplit(".", 1)[0] if "." in full_key else ""
    node = OmegaConf.select(root, parent) if parent else root
    if not isinstance(node, DictConfig):
        return []
    return [f"{parent}.{k}" if parent else str(k) for k in node.keys()]


def _format_omegaconf_error(e: OmegaConfBaseException, root: DictConfig | None = None) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = _first_line(e)
    if isinstance(e, ConfigKeyError) or "Key '" in msg and "not in" in msg:
        valid = _valid_keys(root, key) if root is not None else []
        hint = suggest(key, valid) if valid else ""
        return f"unknown config key '{key}'{hint}"
    m = re.match(r"Value '(.*)' of type '(\w+)' could not be converted to (\w+)", msg)
    if m:
        return f"config key '{key}' must be {_TYPE_WORDS.get(m.group(3), m.group(3))}, got '{m.group(1)}'"
    if isinstance(e, ValidationError | ConfigTypeError):
        return f"config key '{key}': {msg}"
    return f"config error at '{key}': {msg}"


def _build_root(raw: DictConfig) -> DictConfig:
    family = OmegaConf.select(raw, "model.family")
    from cnf.models import MODELS

    if family is None:
        raise ConfigError(f"config needs model.family; valid: {', '.join(sorted(MODELS))}")
    if family not in MODELS:
        raise ConfigError(
            f"model.family: unknown value '{family}'; valid: {', '.join(sorted(MODELS))}"
            + suggest(str(family), MODELS)
        )
    root = OmegaConf.structured(schema.Config)
    model_cls = MODELS[family].schema
    root.model = OmegaConf.structured(model_cls)
    _install_choices(root.model, model_cls, raw.get("model"), _data_kind(raw), "model.")
    return root


def resolve(raw: DictConfig) -> DictConfig:
    """Merge a (migrated) raw config into the schemas, validate it, fill defaults; read-only."""
    root = _build_root(raw)
    try:
        cfg = OmegaConf.merge(root, raw)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_format_omegaconf_error(e, root)) from None
    if cfg.run.dir is None:
        cfg.run.dir = f"runs/{cfg.model.family}_{cfg.data.name}_s{cfg.seed}"
    run = typed(cfg)
    _check_data(run)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check_data(run: schema.Config) -> None:
    from cnf.data import dataset_kind, dataset_needs_path
    from cnf.models import MODELS

    if dataset_needs_path(run.data.name) and not run.data.path:
        what = "<file.npy|file.csv>" if run.data.name == "file" else "<directory>"
        raise ConfigError(f"data.path: data.name={run.data.name} needs data.path={what}")
    family = MODELS[run.model.family]
    kind = dataset_kind(run.data.name, flatten=run.data.flatten)
    if family.vector_only and kind == "image":
        raise ConfigError(
            f"data.flatten: family '{run.model.family}' models flat vectors; "
            f"data.name={run.data.name} needs data.flatten=true"
        )
    problem = family.check_data(run.model, kind) if family.check_data is not None else None
    if problem:
        raise ConfigError(problem)


def load_config(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Read, migrate, merge and validate a config; raises :class:`ConfigError`."""
    raw = migrate(_read_yaml(Path(path)))
    over = migrate(parse_overrides(list(overrides)), family=OmegaConf.select(raw, "model.family"))
    return resolve(_merge_overrides(raw, over))


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """A plain, resolved dict (for checkpoints, which load with weights_only=True)."""
    return OmegaConf.to_container(cfg, resolve=True)


# ------------------------------------------------------------------ typed view
def _instantiate(node: Any, path: str) -> Any:
    if isinstance(node, DictConfig):
        obj_type = OmegaConf.get_type(node)
        values = {k: _instantiate(node[k], f"{path}{k}.") for k in node.keys()}
        if obj_type is None or not dataclasses.is_dataclass(obj_type):
            return values
        try:
            return obj_type(**values)
        except (ValueError, TypeError) as e:
            where = path.rstrip(".")
            msg = _first_line(e)
            field_name = msg.split(":", 1)[0]
            names = {f.name for f in dataclasses.fields(obj_type)}
            if field_name in names:
                return _raise(f"{path}{msg}")
            return _raise(f"{where}: {msg}" if where else msg)
    if isinstance(node, ListConfig):
        return [_instantiate(v, path) for v in node]
    return node


def _raise(message: str) -> Any:
    raise ConfigError(message)


def typed(cfg: DictConfig | Mapping[str, Any]) -> schema.Config:
    """The resolved config as typed dataclasses (what builders receive); validates every section."""
    if not isinstance(cfg, DictConfig):
        cfg = resolve(migrate(OmegaConf.create(dict(cfg)), from_run=True))
    return _instantiate(cfg, "")


def config_key_warning(message: str) -> str:
    """The one-line form of a :class:`ConfigMigrationWarning` for command lines."""
    return f"warning: {message}"
