"""Data-parallel training: ``torchrun --nproc_per_node=2`` with gloo on CPU.

Two ranks train on the two halves of the same global batch (64 = 2 × 32) and
average their gradients; a single process trains on the whole batch. The
mathematics is the same, so the loss trajectories agree up to float32
summation order. Stated tolerance: relative 1e-4 on every logged loss over
40 iterations (observed: ~2e-7). Only rank 0 writes the run folder.

Gradients are all-reduced by DistributedDataParallel during the backward pass
(the ranks report a DDP-wrapped training step). For every config of
``DDP_CONFIGS`` — FFJORD, Glow and a residual flow (ActNorm initialises
collectively: the init uses the statistics pooled over ranks, i.e. those of
the global batch), FFJORD with validation-driven learning-rate drops and
early stopping (rank 0 validates, the value is broadcast), and a tiny
multi-scale image CNF (conv blocks, squeeze, factor-out, learned T) validated
by adaptive dopri5 on rank 0 — after training,
the state dicts the two ranks hold are identical (bit for bit), both ranks took
the same plateau decisions as the single process, and the loss trajectory
matches the single-process run on the same global batches to relative 1e-4
per logged loss over 20 iterations.

A SIGTERM to ``torchrun`` (what ``srun`` passes on when SLURM pre-empts a DDP
task) reaches every rank; the ranks agree on the iteration to stop at, rank 0
checkpoints, and the rerun ends exactly as the uninterrupted DDP run.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO, TINY, TOY_CONFIG, run_train, subprocess_env

from cnf.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

ITERS = 40
SETTINGS = (
    *TINY,
    f"train.iters={ITERS}",
    "train.batch_size=64",
    "train.log_every=1",
    "train.ckpt_every=100",
    "eval.solver.rtol=1e-3",
    "eval.solver.atol=1e-3",
    "device=cpu",
)
RTOL = 1e-4
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(run_dir: Path, **popen) -> subprocess.Popen:
    cmd = [
        *TORCHRUN,
        "experiments/train.py",
        "--config",
        TOY_CONFIG,
        *SETTINGS,
        f"run.dir={run_dir}",
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), text=True, **popen)


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]  # not validation lines


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun(run_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return run_dir, out


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, ddp_run):
    ddp_dir, out = ddp_run
    single = tmp_path / "single"
    rc, sout, err = run_train(*SETTINGS, f"run.dir={single}")
    assert rc == 0, sout + err

    assert out.count("data-parallel over 2 processes") == 1  # rank 0 prints, rank 1 does not
    a, b = losses(single), losses(ddp_dir)
    assert len(a) == len(b) == ITERS  # one writer: no duplicated lines
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    print(
        f"DDP vs single process: max relative loss difference {worst:.2e} over {ITERS} iterations"
    )
    assert worst <= RTOL
    fa = json.loads((single / "final.json").read_text())
    fb = json.loads((ddp_dir / "final.json").read_text())
    assert fb["iterations"] == ITERS
    assert abs(fa["test_nll"] - fb["test_nll"]) <= RTOL * abs(fa["test_nll"])
    assert not list(ddp_dir.glob("*.tmp"))


def test_sigterm_to_torchrun_checkpoints_all_ranks_and_resumes_exactly(tmp_path, ddp_run):
    ddp_dir, _ = ddp_run
    run_dir = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = torchrun(run_dir, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "DDP training did not start within 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    first = (tmp_path / "first.log").read_text()
    assert proc.returncode != 0
    assert "checkpoint saved at iteration" in first, first
    stopped = load_checkpoint(run_dir / "ckpt.pt")["iteration"]
    assert 5 <= stopped < ITERS, first

    proc = torchrun(run_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert f"from iteration {stopped}" in out
    assert losses(run_dir) == losses(ddp_dir)  # the same reductions: bit for bit
    ours = json.loads((run_dir / "final.json").read_text())
    ref = json.loads((ddp_dir / "final.json").read_text())
    assert abs(ours["test_nll"] - ref["test_nll"]) <= 1e-6


# Configs whose two-rank training must hold one model (bit for bit on every rank) and
# follow the single-process loss trajectory: name -> (config, overrides). ActNorm in
# every Glow step and residual block initialises collectively; the plateau case
# validates on rank 0 and broadcasts the value, so both ranks take the same
# learning-rate and stop decisions. Add a config here to cover it.
DDP_CONFIGS = {
    "ffjord": (TOY_CONFIG, ("model.hidden_dims=[16,16]",)),
    "glow": (
        "configs/flows/glow_toy.yaml",
        ("model.flow_kwargs.num_steps=3", "model.flow_kwargs.hidden_features=16"),
    ),
    "resflow": (
        "configs/flows/resflow_toy.yaml",
        ("model.flow_kwargs.num_blocks=2", "model.flow_kwargs.hidden_features=16"),
    ),
    "ffjord_plateau": (
        TOY_CONFIG,
        (
            "model.hidden_dims=[16,16]",
            "train.val_every=3",
            "train.lr_drop_after=[0]",
            "train.early_stop_after=3",
            "train.keep_best=true",
            "train.schedule=constant",
            "eval.solver.rtol=1e-3",
            "eval.solver.atol=1e-3",
        ),
    ),
    # A tiny multi-scale CNF on (1, 8, 8) digits (3 conv CNF blocks, a squeeze and
    # a factor-out, learned T): fixed-grid training with the exact trace, so the
    # two ranks' half-batches reproduce the single process; rank 0 validates
    # alone with the adaptive dopri5 (Hutchinson: cheap) on the unwrapped model
    # while rank 1 waits at the broadcast (a deadlock would time the test out).
    "ffjord_multiscale": (
        "configs/ffjord/digits.yaml",
        (
            "model.hidden_dims=[4]",
            "model.solver.name=rk4",
            "model.solver.steps=1",
            "model.divergence.name=exact",
            "train.val_every=10",
            "train.warmup_iters=0",
            "eval.solver.rtol=1e-3",
            "eval.solver.atol=1e-3",
            "eval.divergence.name=hutchinson",
        ),
    ),
}
DDP_ITERS = 20


@pytest.mark.parametrize("name", sorted(DDP_CONFIGS))
def test_ranks_hold_one_model_and_match_one_process(tmp_path, name):
    config, model_overrides = DDP_CONFIGS[name]
    settings = (
        *model_overrides,
        "data.test_size=200",
        "data.val_size=50",
        f"train.iters={DDP_ITERS}",
        "train.batch_size=64",
        "train.log_every=1",
        "train.ckpt_every=1000",
        "track.wandb=disabled",
        "device=cpu",
    )
    states, records, trajectories = {}, {}, {}
    for mode, launcher in (("ddp", TORCHRUN), ("single", [PYTHON])):
        out = tmp_path / mode
        cmd = [*launcher, "tests/ddp_worker.py", "--config", config, "--out", str(out)]
        cmd += [*settings, f"run.dir={out / 'run'}"]
        proc = subprocess.run(
            cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        states[mode] = [torch.load(p, weights_only=True) for p in sorted(out.glob("rank*.pt"))]
        records[mode] = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
        trajectories[mode] = losses(out / "run")
    rank0, rank1 = states["ddp"]
    assert rank0.keys() == rank1.keys()
    differ = [k for k in rank0 if not torch.equal(rank0[k], rank1[k])]
    assert not differ, f"{name}: ranks hold different {differ}"
    # Gradients went through DDP (bucketed all-reduce overlapping the backward pass).
    assert [r["step_module"] for r in records["ddp"]] == ["DistributedDataParallel"] * 2
    assert records["single"][0]["step_module"] == "TrainingLoss"
    a, b = trajectories["single"], trajectories["ddp"]
    assert len(a) == len(b) > 0
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    print(f"{name}: DDP vs single process: max relative loss difference {worst:.2e}")
    assert worst <= RTOL
    # The plateau decisions (validation on rank 0, broadcast) agree on both ranks
    # and with the single process.
    r0, r1 = records["ddp"]
    assert r0["plateau"]["validated_at"] == r1["plateau"]["validated_at"]
    assert (r0["plateau"]["drops"], r0["lr"], r0["iteration"]) == (
        r1["plateau"]["drops"],
        r1["lr"],
        r1["iteration"],
    )
    single = records["single"][0]
    assert (single["plateau"]["drops"], single["iteration"]) == (
        r0["plateau"]["drops"],
        r0["iteration"],
    )
    if "val_every" in " ".join(model_overrides):
        assert r0["plateau"]["validated_at"] is not None


def test_torchrun_is_available():
    assert shutil.which("torchrun", path=str(Path(PYTHON).parent)) is not None
