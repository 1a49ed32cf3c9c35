"""Open finished or interrupted run folders: config, model weights, data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cnf.config import parse_overrides, resolve
from cnf.data import Dataset, dataset_from_config
from cnf.models import GenerativeModel, build_model
from cnf.train.checkpoint import load_checkpoint
from cnf.train.loop import CKPT_NAME, DTYPES, RunFolderError, resolve_device


@dataclass
class LoadedRun:
    """A run folder opened for evaluation."""

    run_dir: Path
    cfg: DictConfig
    model: GenerativeModel  # the evaluated weights (EMA when the run kept one), in eval mode
    data: Dataset
    iteration: int
    final: dict[str, Any] | None


def load_run(
    run_dir: str | Path, overrides: list[str] = (), *, device: str | None = None
) -> LoadedRun:
    """Load ``run_dir``'s checkpoint with its embedded config (plus ``overrides``, e.g. ``eval.*``).

    Raises:
        RunFolderError: not a run folder, or no checkpoint yet.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CKPT_NAME
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder not found: {run_dir}")
    if not ckpt_path.is_file():
        raise RunFolderError(f"{run_dir} holds no checkpoint ({CKPT_NAME}); train it first")
    try:
        state = load_checkpoint(ckpt_path)
    except Exception as e:
        raise RunFolderError(f"cannot load {ckpt_path}: {str(e).splitlines()[0]}") from None
    raw = OmegaConf.merge(OmegaConf.create(state["config"]), parse_overrides(list(overrides)))
    if device is not None:
        raw.device = device
    cfg = resolve(raw)
    data = dataset_from_config(cfg)
    dtype = DTYPES[cfg.dtype]
    model = build_model(cfg, data.event_shape)
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    model.load_state_dict(weights)
    model = model.to(resolve_device(cfg.device), dtype).eval()
    final_path = run_dir / "final.json"
    final = json.loads(final_path.read_text()) if final_path.is_file() else None
    return LoadedRun(run_dir, cfg, model, data, int(state["iteration"]), final)
