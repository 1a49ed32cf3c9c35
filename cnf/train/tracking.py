"""Experiment tracking behind one small interface.

:class:`JsonlTracker` appends to the run folder's ``metrics.jsonl`` — the
source of truth for tables (wandb 0.31 cannot read offline runs back).
:class:`WandbTracker` mirrors the same records to Weights & Biases; wandb is
imported only when it is used, so the library imports without it. The mode
is chosen explicitly (``offline`` | ``online`` | ``disabled``): with no mode
and no key wandb raises, and with a key but no network it hangs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from cnf.registry import Registry

WANDB_MODES: Registry[str] = Registry(
    "W&B mode",
    {"offline": "write locally, sync later", "online": "stream (needs a key)", "disabled": "off"},
)


class Tracker(Protocol):
    def log(self, record: dict[str, Any], step: int) -> None: ...

    def finish(self) -> None: ...


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class JsonlTracker:
    """One JSON object per line: ``{"iter": step, ...record}``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def log(self, record: dict[str, Any], step: int) -> None:
        line = json.dumps({"iter": step, **{k: _clean(v) for k, v in record.items()}})
        with open(self.path, "a") as fh:
            fh.write(line + "\n")

    def finish(self) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (they are regenerated when a run resumes)."""
        if not self.path.exists():
            return
        from cnf.train.checkpoint import atomic_write_text

        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("iter", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))


def wandb_mode(requested: str) -> str:
    """``online`` only makes sense with a key; without one fall back to ``offline``."""
    if requested == "online" and not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
        return "offline"
    return requested


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class WandbTracker:
    """Mirror records to W&B. The run id is kept by the caller for ``resume="allow"``."""

    def __init__(
        self,
        *,
        run_dir: str | Path,
        mode: str,
        project: str,
        config: dict[str, Any],
        run_id: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        system_metrics: bool = True,
    ):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            dir=str(run_dir),
            mode=mode,
            project=project,
            entity=entity,
            group=group,
            name=name,
            tags=tags or None,
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            # The system-metrics sampler is a separate process: on a small CPU
            # machine it takes a noticeable share of the cores.
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=not system_metrics),
        )
        self.run_id = self.run.id if self.run is not None else run_id

    def log(self, record: dict[str, Any], step: int) -> None:
        self.run.log(record, step=step)

    def log_images(self, images: dict[str, str | Path], step: int) -> None:
        self.run.log({k: self._wandb.Image(str(v)) for k, v in images.items()}, step=step)

    def summary(self, record: dict[str, Any]) -> None:
        for k, v in record.items():
            self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()


class MultiTracker:
    def __init__(self, *trackers: Any):
        self.trackers = [t for t in trackers if t is not None]

    def log(self, record: dict[str, Any], step: int) -> None:
        for t in self.trackers:
            t.log(record, step)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()
