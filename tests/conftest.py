"""Shared test set-up: one thread, no network, helpers for end-to-end runs.

Every test runs single-threaded (``OMP_NUM_THREADS=1`` and
``torch.set_num_threads(1)``): on a small shared machine two threads are
slower than one, and results are reproducible. End-to-end tests start the
real entry points in a subprocess with :func:`run_train` / :func:`run_evaluate`
and always pass ``track.wandb=disabled`` (see :data:`TINY`) except the one
test that checks W&B's offline mode.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import hashlib
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TOY_CONFIG = "configs/ffjord/toy.yaml"

# Tiny settings for end-to-end runs: a small network, a small test set, no
# plots and no W&B. A test adds train.iters and run.dir.
TINY: tuple[str, ...] = (
    "data.test_size=200",
    "data.val_size=50",
    "eval.num_samples=200",
    "eval.batch_size=200",
    "model.hidden_dims=[16,16]",
    "eval.plots=false",
    "track.wandb=disabled",
)

RUN_FILES = ("config.yaml", "metrics.jsonl", "ckpt.pt", "final.json")


def build_family(
    family: str,
    model: dict | None = None,
    event_shape: tuple[int, ...] = (2,),
    *,
    eval: dict | None = None,  # noqa: A002 - the config section's name
    data: dict | None = None,
):
    """A model of ``family`` from a partial ``model:`` section (missing keys: the schema's).

    Goes through the config machinery (schemas, named choices, registries) and
    :func:`cnf.models.build_model`, as a training run does.
    """
    from omegaconf import OmegaConf

    from cnf.config import migrate, resolve
    from cnf.models import build_model

    if data is None:
        data = {"name": "digits", "flatten": len(event_shape) == 1} if len(event_shape) == 3 else {}
    raw = OmegaConf.create(
        {"model": {"family": family, **(model or {})}, "eval": eval or {}, "data": data}
    )
    return build_model(resolve(migrate(raw)), event_shape)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for entry points: one thread, no W&B key or mode inherited."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    env["WANDB_SILENT"] = "true"
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_script(
    script: str, args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600
) -> tuple[int, str, str]:
    """Run ``experiments/<script>`` from the repository root; returns ``(rc, stdout, stderr)``."""
    proc = subprocess.run(
        [PYTHON, f"experiments/{script}", *args],
        cwd=REPO,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


def run_train(
    *overrides: str,
    config: str = TOY_CONFIG,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> tuple[int, str, str]:
    """``python experiments/train.py --config CONFIG OVERRIDES...``."""
    return run_script("train.py", ["--config", config, *overrides], env=env, timeout=timeout)


def run_evaluate(
    run_dir: str | Path, *overrides: str, env: dict[str, str] | None = None, timeout: float = 600
) -> tuple[int, str, str]:
    """``python experiments/evaluate.py RUN_DIR OVERRIDES...``."""
    return run_script("evaluate.py", [str(run_dir), *overrides], env=env, timeout=timeout)


def snapshot(folder: Path, names: Sequence[str] = RUN_FILES) -> dict[str, str]:
    """SHA-256 of each named file in ``folder`` (files that do not exist are skipped)."""
    out = {}
    for name in names:
        p = folder / name
        if p.is_file():
            out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_clean_failure(rc: int, stderr: str, code: int = 2) -> str:
    """Exit ``code``, exactly one stderr line starting with ``error:``, no traceback; returns it."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == code, f"exit code {rc}, expected {code}; stderr:\n{stderr}"
    assert len(lines) == 1, f"expected one stderr line, got:\n{stderr}"
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


def load_experiment_module(name: str):
    """Import ``experiments/<name>.py`` (the entry points are scripts, not a package)."""
    import importlib.util

    sys.path.insert(0, str(REPO / "experiments"))  # their sibling imports (reporting, _cli)
    try:
        spec = importlib.util.spec_from_file_location(
            f"_experiment_{name}", REPO / "experiments" / f"{name}.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "experiments"))
    return module


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A fresh, not yet existing run folder."""
    return tmp_path / "run"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def maf_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MAF archive in the real file formats (``tests/maf_archive.py``), all five sets.

    Its loader cache goes to ``<archive>/.cnf_cache`` (``CNF_CACHE`` is unset for it).
    """
    from maf_archive import write_archive

    return write_archive(tmp_path_factory.mktemp("maf"))


class PlainField(torch.nn.Module):
    """A field without its forward-mode methods (``forward_with_jacobian``, ``forward_with_jvp``, …):
    the divergence estimators take the autograd (VJP) path."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(t, z)
