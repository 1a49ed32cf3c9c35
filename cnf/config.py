"""Configs: OmegaConf YAML + dotted command-line overrides, validated against schemas.

``load_config(path, overrides)``:

1. reads the YAML (a ``_base_: other.yaml`` key inherits from another file,
   relative to this one), merges the ``key=value`` overrides;
2. merges the result into the structured schema of :class:`Config` with the
   model section's schema chosen by ``model.family`` — unknown keys and wrong
   types are errors;
3. checks every name against its registry (datasets, solvers, layers, ...).

Every failure is a :class:`ConfigError` with a one-line message naming the key
and, for names, the valid choices — raised before anything is built or written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from cnf.models import MODELS, SolverSchema, check_choice, check_solver


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line."""


@dataclass
class DataSchema:
    name: str = "8gaussians"
    path: str | None = None  # data.name=file: a .npy or .csv file of samples (N, D)
    test_size: int = 5000  # toy data: held-out samples (fixed across seeds)
    val_size: int = 1000
    flatten: bool = True  # image data: event shape (C*H*W,) for MLPs; false keeps (C, H, W)


@dataclass
class TrainSchema:
    iters: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine
    warmup_iters: int = 0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    ema: float = 0.0  # EMA decay of the evaluated weights; 0 = off
    log_every: int = 10
    ckpt_every: int = 500  # iterations between checkpoints
    ckpt_minutes: float = 10.0  # also checkpoint on this wall-clock timer; 0 = off
    val_every: int = 0  # validation NLL every N iterations; 0 = off


@dataclass
class EvalSchema:
    solver: SolverSchema = field(default_factory=SolverSchema)  # dopri5, 1e-5
    divergence: str = "auto"  # auto (exact when dim <= exact_max_dim) | exact | hutchinson
    exact_max_dim: int = 16
    probe: str = "rademacher"
    num_probes: int = 1
    batch_size: int = 5000
    num_samples: int = 5000  # samples drawn for plots and sample statistics
    seed: int = 1234  # probes and base noise at evaluation: common across runs and settings
    plots: bool = True


@dataclass
class RunSchema:
    dir: str | None = None  # default: runs/<family>_<data.name>_s<seed>


@dataclass
class TrackSchema:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "cnf"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    system_metrics: bool = True  # W&B's CPU/GPU/memory sampler (a separate process)
    init_timeout: float = 30.0  # seconds for an online W&B init; then offline (one warning)


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"  # float32 | float64
    data: DataSchema = field(default_factory=DataSchema)
    model: Any = None
    train: TrainSchema = field(default_factory=TrainSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    run: RunSchema = field(default_factory=RunSchema)
    track: TrackSchema = field(default_factory=TrackSchema)


WANDB_MODES = ("offline", "online", "disabled")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config {path}: _base_ chain loops back to itself")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError(
            f"config file {path} is not valid YAML: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    base = cfg.pop("_base_", None)
    if base is not None:
        parent = _read_yaml(path.parent / str(base), (*seen, path.resolve()))
        cfg = OmegaConf.merge(parent, cfg)
    return cfg


def _format_omegaconf_error(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    if isinstance(e, ConfigKeyError):
        return f"unknown config key '{key}'"
    if isinstance(e, ValidationError):
        return f"config key '{key}': {msg}"
    return f"config error at '{key}': {msg}"


def parse_overrides(overrides: list[str]) -> DictConfig:
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override '{o}' is not of the form dotted.key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides: {str(e).splitlines()[0]}") from None


def resolve(raw: DictConfig) -> DictConfig:
    """Merge a raw config into the schemas, validate names, fill defaults."""
    family = OmegaConf.select(raw, "model.family")
    if family is None:
        raise ConfigError(f"config needs model.family; valid: {', '.join(sorted(MODELS))}")
    if family not in MODELS:
        raise ConfigError(
            f"model.family: unknown value '{family}'; valid: {', '.join(sorted(MODELS))}"
        )
    schema = OmegaConf.structured(Config)
    schema.model = OmegaConf.structured(MODELS[family].schema)
    try:
        cfg = OmegaConf.merge(schema, raw)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_format_omegaconf_error(e)) from None
    if cfg.run.dir is None:
        cfg.run.dir = f"runs/{family}_{cfg.data.name}_s{cfg.seed}"
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> DictConfig:
    """Read, merge and validate a config; raises :class:`ConfigError`."""
    raw = _read_yaml(Path(path))
    raw = OmegaConf.merge(raw, parse_overrides(list(overrides)))
    return resolve(raw)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """A plain, resolved dict (for checkpoints, which load with weights_only=True)."""
    return OmegaConf.to_container(cfg, resolve=True)


def validate(cfg: DictConfig) -> None:
    from cnf.data import DATASETS

    try:
        check_choice("data.name", cfg.data.name, DATASETS)
        check_choice("device", cfg.device.split(":")[0], ("auto", "cpu", "cuda", "mps"))
        check_choice("dtype", cfg.dtype, ("float32", "float64"))
        check_choice("train.optimizer", cfg.train.optimizer, ("adam", "adamw"))
        check_choice("train.schedule", cfg.train.schedule, ("constant", "cosine"))
        check_choice("eval.divergence", cfg.eval.divergence, ("auto", "exact", "hutchinson"))
        check_choice("eval.probe", cfg.eval.probe, ("gaussian", "rademacher"))
        check_choice("track.wandb", cfg.track.wandb, WANDB_MODES)
        check_solver("eval.solver", cfg.eval.solver)
        positive = {
            "train.batch_size": cfg.train.batch_size,
            "train.lr": cfg.train.lr,
            "train.log_every": cfg.train.log_every,
            "train.ckpt_every": cfg.train.ckpt_every,
            "eval.batch_size": cfg.eval.batch_size,
            "eval.num_probes": cfg.eval.num_probes,
            "data.test_size": cfg.data.test_size,
            "data.val_size": cfg.data.val_size,
            "track.init_timeout": cfg.track.init_timeout,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ValueError(f"{key}: must be > 0, got {value}")
        for key, value in {
            "train.iters": cfg.train.iters,
            "train.grad_clip": cfg.train.grad_clip,
            "train.ckpt_minutes": cfg.train.ckpt_minutes,
            "train.warmup_iters": cfg.train.warmup_iters,
            "eval.num_samples": cfg.eval.num_samples,
        }.items():
            if value < 0:
                raise ValueError(f"{key}: must be >= 0, got {value}")
        if not 0 <= cfg.train.ema < 1:
            raise ValueError(f"train.ema: must be in [0, 1), got {cfg.train.ema}")
        if cfg.data.name == "file" and not cfg.data.path:
            raise ValueError("data.path: data.name=file needs data.path=<file.npy|file.csv>")
        if cfg.data.name in ("mnist", "cifar10") and not cfg.data.path:
            raise ValueError(f"data.path: data.name={cfg.data.name} needs data.path=<directory>")
        MODELS[cfg.model.family].validate(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
