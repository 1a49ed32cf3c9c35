"""The run folder: the one owner of its file names, lock, status, checkpoint and contents.

A run folder holds::

    config.yaml     the resolved config (written at start)
    metrics.jsonl   one line per logged iteration (the source of truth for tables)
    ckpt.pt         the last checkpoint: atomic, embeds the config, weights_only loadable
    best.pt         the best-validation weights (train.keep_best): atomic, weights_only loadable
    final.json      the final evaluation (written once training has finished)
    evals.jsonl     one line per later evaluation (experiments/evaluate.py), never rewritten
    wandb_id.txt    the W&B run id, so a requeued run continues the same W&B run
    .lock           held (POSIX record lock) by the process training in the folder

Training (:mod:`cnf.train.loop`), the evaluation scripts, sweeps and tables
reach a run folder only through :class:`RunDir` and :func:`load_run`.
"""

from __future__ import annotations

import fcntl
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from cnf.config import migrate, parse_overrides, resolve, to_dict
from cnf.train.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint

__all__ = [
    "DTYPES",
    "RESUMABLE_CHANGES",
    "EVAL_KEYS",
    "LoadedRun",
    "RunDir",
    "RunFolderError",
    "config_differences",
    "flatten_config",
    "load_run",
    "load_weights",
    "resolve_device",
]

# ``dtype:`` config values.
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Keys that may change when a run is resumed: they do not change what is trained.
RESUMABLE_CHANGES = (
    "train.iters",
    "train.log_every",
    "train.ckpt_every",
    "train.ckpt_minutes",
    "train.val_every",
    "eval",
    "track",
    "run",
    "device",
)

# Overrides ``experiments/evaluate.py`` accepts: they change the evaluation, never the model.
EVAL_KEYS = ("eval", "device", "data.test_size")


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (message is one line)."""


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ, ignoring :data:`RESUMABLE_CHANGES`."""
    a, b = flatten_config(old), flatten_config(new)
    return [
        key
        for key in sorted(set(a) | set(b))
        if not _under(key, RESUMABLE_CHANGES) and a.get(key, "<missing>") != b.get(key, "<missing>")
    ]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunFolderError(
            f"device={name} requested but CUDA is not available; valid here: auto, cpu"
        )
    return dev


class RunDir:
    """One run folder (see the module docstring for its files)."""

    CONFIG = "config.yaml"
    METRICS = "metrics.jsonl"
    CKPT = "ckpt.pt"
    BEST = "best.pt"
    FINAL = "final.json"
    EVALS = "evals.jsonl"
    WANDB_ID = "wandb_id.txt"
    LOCK = ".lock"
    OWN_FILES = (CONFIG, METRICS, CKPT, BEST, FINAL, EVALS, WANDB_ID)
    # What an atomic write leaves behind when killed mid-write (cnf.train.checkpoint).
    TEMP_RE = re.compile(r"^(" + "|".join(re.escape(n) for n in OWN_FILES) + r")\.[^/]+\.tmp$")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def ckpt_path(self) -> Path:
        return self.path / self.CKPT

    # ------------------------------------------------------------- contents
    def has_checkpoint(self) -> bool:
        return self.ckpt_path.is_file()

    def is_finished(self) -> bool:
        return self.file(self.FINAL).is_file()

    def read_config(self) -> dict[str, Any]:
        """The folder's ``config.yaml``, with keys of the previous release moved (plain data)."""
        raw = OmegaConf.load(self.file(self.CONFIG))
        return OmegaConf.to_container(migrate(raw, from_run=True), resolve=True)

    def read_final(self) -> dict[str, Any] | None:
        path = self.file(self.FINAL)
        return json.loads(path.read_text()) if path.is_file() else None

    def write_config(self, cfg: DictConfig) -> None:
        atomic_write_text(self.file(self.CONFIG), OmegaConf.to_yaml(cfg))

    def write_final(self, final: Mapping[str, Any]) -> None:
        atomic_write_text(self.file(self.FINAL), json.dumps(final, indent=2) + "\n")

    def append_eval(self, record: Mapping[str, Any]) -> None:
        """Add one evaluation to ``evals.jsonl`` (earlier ones are never rewritten)."""
        with open(self.file(self.EVALS), "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.ckpt_path, state)

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.ckpt_path, map_location=map_location)

    def has_best(self) -> bool:
        return self.file(self.BEST).is_file()

    def save_best(self, state: dict[str, Any]) -> None:
        """Replace ``best.pt`` atomically: ``{"weights", "iteration", "metric", "value"}``."""
        save_checkpoint(self.file(self.BEST), state)

    def load_best(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        return load_checkpoint(self.file(self.BEST), map_location=map_location)

    def read_wandb_id(self) -> str | None:
        path = self.file(self.WANDB_ID)
        return (path.read_text().strip() or None) if path.is_file() else None

    def write_wandb_id(self, run_id: str) -> None:
        atomic_write_text(self.file(self.WANDB_ID), run_id + "\n")

    def last_logged_iteration(self) -> int | None:
        try:
            with open(self.file(self.METRICS), "rb") as fh:
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

    # ------------------------------------------------------------- training
    def prepare(self, cfg: DictConfig) -> bool:
        """Check (never damage) the folder for a run of ``cfg``; True when it resumes.

        A new or empty folder is fine. A folder with a ``config.yaml`` resumes
        if its config matches up to :data:`RESUMABLE_CHANGES`. Anything else
        is a :class:`RunFolderError`. Nothing is written here.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunFolderError(
                f"run.dir {path} exists and is not a folder; choose another run.dir"
            )
        if not path.is_dir() or not any(
            p.name != self.LOCK and not self.TEMP_RE.match(p.name) for p in path.iterdir()
        ):
            return False
        if not self.file(self.CONFIG).is_file():
            raise RunFolderError(
                f"run.dir {path} is not empty and holds no config.yaml (not a cnf run); "
                "choose another run.dir"
            )
        try:
            old = self.read_config()
        except Exception:
            raise RunFolderError(f"run.dir {path}: config.yaml is unreadable") from None
        new = to_dict(cfg)
        old_train = old.get("train", {})
        old_iters = old_train.get("iters")
        t = cfg.train
        if (
            old_iters is not None
            and old_iters != t.iters
            and t.schedule != "constant"
            and not t.budget_seconds  # a budget run's schedule spans its own, stored count
        ):
            # A cosine schedule spans train.iters: changing it rewrites the learning
            # rates of iterations already done, so the run could not resume exactly.
            raise RunFolderError(
                f"run.dir {path} was trained with train.iters={old_iters}; "
                f"train.schedule={cfg.train.schedule} spans train.iters, so it cannot change "
                "on resume (use the same train.iters, or choose another run.dir)"
            )
        plateau = t.keep_best or t.lr_drop_after or t.early_stop_after
        if plateau and old_train.get("val_every", t.val_every) != t.val_every:
            # Validations decide the learning rate and the stop: their spacing is training.
            raise RunFolderError(
                f"run.dir {path} was trained with train.val_every={old_train['val_every']}; "
                "with train.lr_drop_after, early_stop_after or keep_best it cannot change "
                "on resume (use the same value, or choose another run.dir)"
            )
        diff = config_differences(old, new)
        if diff:
            shown = ", ".join(diff[:5]) + (" ..." if len(diff) > 5 else "")
            raise RunFolderError(
                f"run.dir {path} holds a run with a different config (differs at {shown}); "
                "choose another run.dir to start a new run"
            )
        return True

    def lock(self) -> Any:
        """Take the folder's lock and remove stale temporary files of killed writes.

        Returns the open lock file: keep it referenced for as long as the run
        trains. POSIX locks belong to the process, so taking it again in the
        same process succeeds.

        Raises:
            RunFolderError: another process holds the lock.
        """
        self.path.mkdir(parents=True, exist_ok=True)
        fh = open(self.file(self.LOCK), "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise RunFolderError(
                f"run.dir {self.path} is in use by another training process; "
                "wait for it to end (or stop it) before resuming this run"
            ) from None
        # Holding the lock, no other writer is alive: temporary files of our own
        # naming are litter of a killed write (each one the size of a checkpoint).
        for p in self.path.iterdir():
            if self.TEMP_RE.match(p.name):
                p.unlink(missing_ok=True)
        return fh  # the lock file stays empty: taking the lock changes nothing in the folder

    def is_locked(self) -> bool:
        """True if another live process trains here (on a file system with working locks).

        Not for the process that holds the lock: closing any descriptor of the
        file would release that process's POSIX lock.
        """
        lock = self.file(self.LOCK)
        if not lock.is_file():
            return False
        try:
            with open(lock, "a") as fh:
                fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.lockf(fh, fcntl.LOCK_UN)
        except OSError:
            return True
        return False

    def status(self, config: Mapping[str, Any] | None = None) -> str:
        """``finished`` | ``running`` | ``conflict`` (holds a run of another config) | ``partial`` | ``new``.

        ``config`` (a resolved config as plain data) is the run this folder
        should hold; without it the folder is not checked for a conflict.
        """
        if self.is_finished():
            return "finished"
        if self.is_locked():
            return "running"
        if config and self.file(self.CONFIG).is_file():
            try:
                if config_differences(self.read_config(), config):
                    return "conflict"
            except Exception:
                return "conflict"
        return "partial" if self.has_checkpoint() else "new"


# ----------------------------------------------------------------- loading
@dataclass
class LoadedRun:
    """A run folder opened for evaluation."""

    run_dir: Path
    cfg: DictConfig
    model: Any  # the evaluated weights (EMA when the run kept one), in eval mode
    data: Any
    iteration: int
    final: dict[str, Any] | None
    restored_iteration: int | None = None  # train.keep_best: the iteration of the weights


def check_eval_overrides(overrides: list[str]) -> None:
    """Only evaluation keys (:data:`EVAL_KEYS`) may change when a trained run is evaluated."""
    for o in overrides:
        key = o.partition("=")[0].strip()
        if not _under(key, EVAL_KEYS):
            raise RunFolderError(
                f"override '{o}': '{key}' is not an evaluation setting (it would change the "
                f"trained model or its data); allowed: eval.*, device, data.test_size"
            )


def load_run(
    run_dir: str | Path,
    overrides: list[str] = (),
    *,
    device: str | None = None,
    eval_only: bool = True,
) -> LoadedRun:
    """Load ``run_dir``'s checkpoint with its embedded config (plus evaluation ``overrides``).

    Args:
        run_dir: The run folder.
        overrides: ``dotted.key=value`` changes, e.g. ``eval.solver.rtol=1e-7``.
        device: Device to load on (default: the run's ``device``).
        eval_only: Refuse overrides outside :data:`EVAL_KEYS`.

    Raises:
        RunFolderError: not a run folder, no checkpoint yet, or a non-evaluation override.
    """
    from cnf.data import dataset_from_config
    from cnf.models import build_model

    folder = RunDir(run_dir)
    if not folder.path.is_dir():
        raise RunFolderError(f"run folder not found: {folder.path}")
    if not folder.has_checkpoint():
        raise RunFolderError(f"{folder.path} holds no checkpoint ({RunDir.CKPT}); train it first")
    if eval_only:
        check_eval_overrides(list(overrides))
    try:
        state = folder.load_checkpoint()
    except Exception as e:
        raise RunFolderError(f"cannot load {folder.ckpt_path}: {str(e).splitlines()[0]}") from None
    raw = migrate(OmegaConf.create(state["config"]), from_run=True)
    raw = OmegaConf.merge(raw, parse_overrides(list(overrides)))
    if device is not None:
        raw.device = device
    cfg = resolve(raw)
    data = dataset_from_config(cfg)
    model = build_model(cfg, data.event_shape)
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    restored = None
    if cfg.train.keep_best and folder.has_best():
        # What the run's test evaluation used: its best-validation weights.
        best = folder.load_best()
        weights, restored = best["weights"], int(best["iteration"])
    model.load_state_dict(weights)
    model = model.to(resolve_device(cfg.device), DTYPES[cfg.dtype]).eval()
    return LoadedRun(
        folder.path,
        cfg,
        model,
        data,
        int(state["iteration"]),
        folder.read_final(),
        restored,
    )


def load_weights(model: torch.nn.Module, source: str | Path, *, key: str) -> None:
    """Load another run's weights into ``model`` (its EMA weights when it kept them).

    Args:
        source: A run folder or a checkpoint file.
        key: The config key that named ``source`` (for the error message).
    """
    path = Path(source)
    if path.is_dir():
        path = path / RunDir.CKPT
    if not path.is_file():
        raise ValueError(f"{key}: no checkpoint at {path}")
    state = load_checkpoint(path)
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(
            f"{key}: {path} does not fit this model ({str(e).splitlines()[0]})"
        ) from None
