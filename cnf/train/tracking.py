"""Experiment tracking behind one small interface.

:class:`JsonlTracker` appends to the run folder's ``metrics.jsonl`` — the
source of truth for tables (wandb 0.31 cannot read offline runs back).
:class:`WandbTracker` mirrors the same records to Weights & Biases; wandb is
imported only when it is used, so the library imports without it. The mode
is chosen explicitly (``offline`` | ``online`` | ``disabled``): with no mode
and no key wandb raises. With a key but no network an online init gives up
after ``init_timeout`` seconds and the run logs offline; no W&B failure stops
training (see :class:`WandbTracker`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable
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


def _warn_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def redact(text: str) -> str:
    """``text`` with the W&B API key (``$WANDB_API_KEY``, any 40-hex run) masked."""
    key = os.environ.get("WANDB_API_KEY")
    if key:
        text = text.replace(key, "<redacted>")
    return _HEX_KEY.sub("<redacted>", text)


_HEX_KEY = re.compile(r"\b[0-9a-fA-F]{40}\b")


def _reason(exc: BaseException) -> str:
    """One short line naming an exception (first line of its message, key redacted)."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return redact(text)[:300]


class WandbTracker:
    """Mirror records to W&B; a W&B failure never stops or changes training.

    ``metrics.jsonl`` (:class:`JsonlTracker`) is the source of truth; this is a
    mirror. Therefore:

    * an online init that fails or does not connect within ``init_timeout``
      seconds (a compute node with a key but no route out) falls back to an
      offline run in ``run_dir/wandb`` (sync it later with ``wandb sync``),
      with one warning line;
    * any other exception from wandb (init, log, images, summary, finish) is
      one warning line, after which W&B is disabled for the rest of the run
      and every method is a no-op.

    Warnings go through ``warn`` (default: ``warning: ...`` on stderr) and never
    contain the API key. The run id is kept by the caller for ``resume="allow"``.
    """

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
        init_timeout: float = 30.0,
        warn: Callable[[str], None] = _warn_stderr,
    ):
        self._warn = warn
        self.run: Any = None
        self.run_id = run_id
        self.mode = "disabled"
        try:
            import wandb
        except Exception as e:  # not installed, or broken
            self._disable(e, "import")
            return
        self._wandb = wandb

        def init(m: str) -> Any:
            return wandb.init(
                dir=str(run_dir),
                mode=m,
                project=project,
                entity=entity,
                group=group,
                name=name,
                tags=tags or None,
                config=config,
                id=run_id,
                resume="allow" if run_id else None,
                # The system-metrics sampler is a separate process: on a small CPU
                # machine it takes a noticeable share of the cores. init_timeout
                # bounds the wait for the server (wandb's default is 90 s).
                settings=wandb.Settings(
                    silent=True,
                    console="off",
                    x_disable_stats=not system_metrics,
                    init_timeout=float(init_timeout),
                ),
            )

        try:
            self.run = init(mode)
            self.mode = mode
        except Exception as e:
            if mode != "online":
                self._disable(e, "init")
                return
            self._warn(
                f"W&B: online init failed ({_reason(e)}); logging offline to "
                f"{Path(run_dir) / 'wandb'} instead (upload later with `wandb sync`)"
            )
            try:
                self.run = init("offline")
                self.mode = "offline"
            except Exception as e2:
                self._disable(e2, "offline init")
                return
        if self.run is not None:
            self.run_id = self.run.id

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def _disable(self, exc: BaseException, where: str) -> None:
        """Warn once, drop the run: every later call is a no-op."""
        if self.mode == "failed":
            return
        self._warn(
            f"W&B: {where} failed ({_reason(exc)}); W&B is disabled for the rest of this run "
            "(metrics.jsonl is complete)"
        )
        self.run = None
        self.mode = "failed"

    def _guard(self, where: str, fn: Callable[[], Any]) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as e:
            self._disable(e, where)

    def log(self, record: dict[str, Any], step: int) -> None:
        self._guard("log", lambda: self.run.log(record, step=step))

    def log_images(self, images: dict[str, str | Path], step: int) -> None:
        self._guard(
            "log_images",
            lambda: self.run.log(
                {k: self._wandb.Image(str(v)) for k, v in images.items()}, step=step
            ),
        )

    def summary(self, record: dict[str, Any]) -> None:
        def write() -> None:
            for k, v in record.items():
                self.run.summary[k] = v

        self._guard("summary", write)

    def finish(self) -> None:
        self._guard("finish", self.run.finish if self.run is not None else lambda: None)
        self.run = None


class MultiTracker:
    def __init__(self, *trackers: Any):
        self.trackers = [t for t in trackers if t is not None]

    def log(self, record: dict[str, Any], step: int) -> None:
        for t in self.trackers:
            t.log(record, step)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()
