"""Every training config in ``configs/`` loads and trains for two iterations.

The list is built from the files found, so a new config is covered
automatically. ``configs/sweeps`` and ``configs/tables`` hold sweep and table
specifications, not training configs; any other file without a ``model``
section (or a ``_base_`` that could supply one) is skipped too. Runs are
in-process (through :class:`cnf.train.loop.Trainer`) with tiny evaluation
settings (image data sets that are not downloaded here get tiny random
stand-ins in their own file formats), and the checkpoint is re-opened with :func:`cnf.rundir.load_run`,
which must reproduce the final test metric exactly.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from cnf.config import load_config
from cnf.evaluation import evaluate_points, summarize
from cnf.rundir import load_run
from cnf.train.loop import Trainer

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
NOT_TRAINING = ("sweeps", "tables")

SMOKE = (
    "train.iters=2",
    "train.batch_size=16",  # paper-scale batches of image models take minutes on a CPU
    "train.log_every=1",
    "data.test_size=100",
    "data.val_size=50",
    "eval.num_samples=16",
    "eval.batch_size=64",
    "eval.plots=false",
    "eval.solver.rtol=1e-3",  # an untrained model's adaptive solve is costly at 1e-5
    "eval.solver.atol=1e-3",
    "track.wandb=disabled",
    "device=cpu",
)


TEST_ROWS = 64
# Tabular configs evaluate with the exact trace: D vector-Jacobian products per
# function evaluation (63 for BSDS300), so fewer rows keep the smoke run short.
TABULAR_TEST_ROWS = 8

# Paper configs: a probability-flow solve of a paper-size network at 1e-3 takes
# many CPU minutes, and their samplers take 1000 steps; the smoke run solves with
# one rk4 step and samples with 3 steps (the same code paths run).
PAPER_SMOKE = ("eval.solver.name=rk4", "eval.solver.steps=1")
PAPER_SAMPLING = {
    "score": ("model.sampler.steps=3",),
    "indm": ("model.sampler.steps=3",),
    "diffflow": ("model.steps=3",),
}
# 64×64 paper networks: the backward of a DDPM++ / residual-flow step at 64×64
# holds ~2 GiB per sample on a CPU, so their smoke run takes batches of 4.
PAPER_BATCH = {"celeba64": ("train.batch_size=4",)}
# INDM's residual flows take their log-det gradient in the forward pass in the smoke
# run (the same gradients, about half the memory: 21 GiB → 10 GiB for indm/cifar10);
# the paper-network configs set it themselves.
PAPER_MEMORY = {"indm": ("model.flow.logdet.grad_in_forward=true",)}


def write_fake_mnist(folder: Path) -> None:
    """Tiny random stand-ins for MNIST's IDX files (the real ones are not downloaded here)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 200), ("t10k", 16)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        header = bytes([0, 0, 0x08, 3]) + np.array([n, 28, 28], dtype=">i4").tobytes()
        (folder / f"{split}-images-idx3-ubyte").write_bytes(header + images.tobytes())


def write_fake_cifar10(folder: Path) -> None:
    """Tiny random stand-ins for CIFAR-10's python batches (protocol 2, like the originals)."""
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 40) for i in range(1, 6)] + [("test_batch", 16)]:
        blob = {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(blob, fh, protocol=2)


def write_fake_celeba64(folder: Path) -> None:
    """Tiny random stand-ins for the preprocessed CelebA-64 arrays."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 8)):
        np.save(folder / f"celeba64_{split}.npy", rng.integers(0, 256, (n, 64, 64, 3), np.uint8))


# The MAF tabular sets: the smoke run reads the small archive of the maf_archive
# fixture (the real file formats), validates at its last iteration and restores
# the best weights, as the paper configs do.
TABULAR = ("power", "gas", "hepmass", "miniboone", "bsds300")

# Data sets whose files are not in the repository: the smoke run uses fakes.
FAKE_DATA = {
    "mnist": write_fake_mnist,
    "cifar10": write_fake_cifar10,
    "celeba64": write_fake_celeba64,
}


def training_configs() -> list[Path]:
    return [
        p
        for p in sorted(CONFIG_ROOT.rglob("*.yaml"))
        if p.relative_to(CONFIG_ROOT).parts[0] not in NOT_TRAINING
    ]


def test_configs_are_found() -> None:
    assert CONFIG_ROOT / "ffjord" / "toy.yaml" in training_configs()


def data_name(path: Path) -> str | None:
    """``data.name`` of a config file, following its ``_base_`` chain."""
    raw = OmegaConf.load(path)
    name = OmegaConf.select(raw, "data.name")
    if name is None and "_base_" in raw:
        return data_name(path.parent / str(raw["_base_"]))
    return name


def _param(path: Path):
    # Cluster configs (full-size image data, faked here) come with paper-scale
    # U-Nets: two iterations take many CPU minutes, so they train only under
    # `pytest -m paper`; every run of the suite still loads, validates and
    # builds them (test_paper_config_builds).
    name = OmegaConf.select(OmegaConf.load(path), "data.name")
    marks = [pytest.mark.paper] if name in FAKE_DATA else []
    return pytest.param(path, marks=marks, id=str(path.relative_to(CONFIG_ROOT)))


def paper_configs() -> list[Path]:
    return [
        p
        for p in training_configs()
        if OmegaConf.select(OmegaConf.load(p), "data.name") in FAKE_DATA
    ]


@pytest.mark.parametrize("path", paper_configs(), ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_paper_config_builds(path: Path, tmp_path: Path) -> None:
    """Cluster configs resolve, their data loads (fake files) and their model builds."""
    from cnf.data import dataset_from_config
    from cnf.models import build_model

    name = OmegaConf.select(OmegaConf.load(path), "data.name")
    FAKE_DATA[name](tmp_path)
    cfg = load_config(path, [*SMOKE, f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path}"])
    data = dataset_from_config(cfg)
    model = build_model(cfg, data.event_shape)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("path", [_param(p) for p in training_configs()])
def test_config_trains_two_iterations(
    path: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    raw = OmegaConf.load(path)
    if "model" not in raw and "_base_" not in raw:
        pytest.skip(f"{path.name} has no model section (not a training config)")
    run_dir = tmp_path / "run"
    overrides = [*SMOKE, f"run.dir={run_dir}"]
    name = data_name(path)
    if name in FAKE_DATA and not OmegaConf.select(raw, "data.path"):
        FAKE_DATA[name](tmp_path)
        overrides.append(f"data.path={tmp_path}")
    if name in FAKE_DATA:
        overrides += [
            *PAPER_SMOKE,
            *PAPER_SAMPLING.get(str(OmegaConf.select(raw, "model.family")), ()),
            *PAPER_BATCH.get(name, ()),
            *PAPER_MEMORY.get(str(OmegaConf.select(raw, "model.family")), ()),
        ]
    if name in TABULAR:
        overrides.append(f"data.path={request.getfixturevalue('maf_archive')}")
    cfg = load_config(path, overrides)
    trainer = Trainer(cfg, progress=False, log=lambda _msg: None)
    # Fixed splits (digits, images, tabular) ignore data.test_size: evaluate on a slice.
    rows = TABULAR_TEST_ROWS if name in TABULAR else TEST_ROWS
    trainer.data.test = trainer.data.test[:rows]
    trainer.prepare()
    assert trainer.train() == "finished"
    final = trainer.final_metrics()
    assert final["iterations"] == 2

    for name in ("config.yaml", "metrics.jsonl", "ckpt.pt", "final.json"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    assert json.loads((run_dir / "final.json").read_text()) == json.loads(json.dumps(final))
    if cfg.train.keep_best:  # validated at its last iteration: the weights of iteration 2
        assert final["restored_iteration"] == 2 and (run_dir / "best.pt").is_file()

    key = "test_nll" if "test_nll" in final else "test_nelbo"
    assert key in final and math.isfinite(final[key]), final
    # The checkpoint alone (weights + embedded config) reproduces the final metric.
    run = load_run(run_dir)
    assert run.iteration == 2
    result = evaluate_points(
        run.model,
        run.data.test[:rows],
        run.data,
        batch_size=run.cfg.eval.batch_size,
        seed=run.cfg.eval.seed,
    )
    again = summarize(result, run.data, prefix="test_")
    assert again[key] == pytest.approx(final[key], rel=1e-6, abs=1e-6)
