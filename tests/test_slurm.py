"""Integration tests against the real local SLURM cluster (``make test-slurm``).

``make test-slurm`` brings the single-node cluster up (slurm/local/up.sh, as
root), runs ``pytest -m slurm tests`` and takes it down. Every wait here is
bounded; on a timeout the test fails with the job's state and log tail.

The main test submits the smoke sweep (2 runs) as a job array with
``experiments/sweep.py --slurm``, waits until each task runs and has written a
checkpoint, then forces a requeue: task 0 with ``scontrol requeue`` (SLURM
sends SIGTERM to the job), task 1 with USR1 to its batch script (the
pre-emption warning: the script forwards it, waits for the checkpoint and runs
``scontrol requeue`` itself). Both must restart, resume from their checkpoint
rather than from iteration 0, and finish with complete metrics.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, run_script, subprocess_env

from cnf.sweep import load_sweep, plan

pytestmark = pytest.mark.slurm

SMOKE = REPO / "configs" / "sweeps" / "smoke.yaml"
# Looks like a W&B key (40 characters); must never show up in a file or a log.
SENTINEL = "SENTINELf00dfeed0123456789abcdef01234567"
FINISH_TIMEOUT = 600  # s, the whole array, requeues included (about 1-2 min on a quiet machine)


def sh(*cmd: str, timeout: float = 20) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


@pytest.fixture(scope="module")
def cluster() -> None:
    if shutil.which("sbatch") is None:
        pytest.fail("sbatch not found: run `make test-slurm`, which brings up the local cluster")
    try:
        states = sh("sinfo", "-h", "-o", "%T").split()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.fail(f"the SLURM cluster does not answer ({e}); run `make test-slurm`")
    if not states or not all(s in ("idle", "mixed", "allocated", "completing") for s in states):
        pytest.fail(f"SLURM node not usable (state: {states}); run slurm/local/up.sh")


def task_states(job: str) -> dict[str, str]:
    """``{"<job>_<task>": state}`` for the array's tasks still known to squeue."""
    out = sh("squeue", "-h", "-r", "-j", job, "-o", "%i %T")
    return dict(line.split() for line in out.splitlines() if line.strip())


def _tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text().splitlines()[-n:]) if path.is_file() else "(no log)"


def test_job_array_requeue_resumes_from_checkpoint(cluster, tmp_path):
    env = subprocess_env(WANDB_API_KEY=SENTINEL)  # sbatch passes the environment on
    rc, out, err = run_script(
        "sweep.py", [str(SMOKE), "--slurm", "--runs-root", str(tmp_path)], env=env, timeout=180
    )
    assert rc == 0, out + err
    job = out.strip().splitlines()[-1]
    assert job.isdigit(), out
    runs = plan(load_sweep(SMOKE, runs_root=tmp_path))
    assert len(runs) == 2
    logs = {r.index: tmp_path / "smoke" / "logs" / f"{job}_{r.index}.out" for r in runs}
    how = {0: "scontrol requeue", 1: "USR1 to the batch script"}
    requeued: dict[int, float] = {}
    restart_delay: dict[int, float] = {}
    try:
        deadline = time.monotonic() + FINISH_TIMEOUT
        while True:
            states = task_states(job)
            for r in runs:
                tid = f"{job}_{r.index}"
                if (
                    r.index not in requeued
                    and states.get(tid) == "RUNNING"
                    and (r.run_dir / "ckpt.pt").is_file()
                    and not (r.run_dir / "final.json").exists()
                ):
                    if r.index == 0:
                        sh("scontrol", "requeue", tid)
                    else:
                        sh("scancel", "--signal=USR1", "--batch", tid)
                    requeued[r.index] = time.monotonic()
                if (
                    r.index in requeued
                    and r.index not in restart_delay
                    and "restart 1"
                    in (logs[r.index].read_text() if logs[r.index].is_file() else "")
                ):
                    restart_delay[r.index] = time.monotonic() - requeued[r.index]
            if not states:
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    f"job {job} not done after {FINISH_TIMEOUT} s: {states}\n"
                    + "\n".join(f"--- task {i}:\n{_tail(p)}" for i, p in logs.items())
                )
            time.sleep(1.0)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=20)
    print(f"restart delay after requeue (s): {restart_delay}")

    for r in runs:
        log = logs[r.index].read_text()
        assert r.index in requeued, f"task {r.index} finished before it could be requeued:\n{log}"
        final_path = r.run_dir / "final.json"
        assert final_path.is_file(), f"no final.json for task {r.index}:\n{_tail(logs[r.index])}"
        final = json.loads(final_path.read_text())
        assert final["iterations"] == 300
        for key in ("test_nll", "test_nll_stderr", "test_nfe", "sample_mmd2", "gap"):
            assert isinstance(final.get(key), float), (key, final)
        # Restarted once, resumed from its checkpoint (not iteration 0).
        assert "restart 0" in log and "restart 1" in log, log
        resumed = re.findall(r"resuming .* from iteration (\d+)", log)
        assert len(resumed) == 1 and int(resumed[0]) > 0, log
        signal_name = "SIGTERM" if r.index == 0 else "SIGUSR1"
        assert f"received {signal_name}: checkpoint saved at iteration {resumed[0]}" in log, (
            how,
            log,
        )
        if r.index == 1:
            assert f"requeueing {job}_1" in log
        # metrics.jsonl continues without a restart at 0 and without duplicates.
        iters = [
            json.loads(x)["iter"] for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        assert iters == list(range(10, 301, 10)), iters
        # The W&B run is resumed under the same id after the requeue.
        run_id = (r.run_dir / "wandb_id.txt").read_text().strip()
        offline = sorted((r.run_dir / "wandb").glob("offline-run-*"))
        assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline), offline

    # The API key reached the jobs (sbatch exports the environment) but no file or log.
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and SENTINEL.encode() in p.read_bytes()]
    assert not leaks, f"W&B API key written to {leaks}"


DDP_SWEEP = """
name: ddp_smoke
base: {base}
overrides:
  model.hidden_dims: [16, 16]
  train.iters: 200
  train.batch_size: 64
  train.log_every: 10
  train.ckpt_every: 20
  data.test_size: 500
  data.val_size: 100
  eval.num_samples: 200
  eval.plots: false
  eval.solver: {{method: dopri5, rtol: 1.0e-3, atol: 1.0e-3}}
  track.wandb: disabled
  device: cpu
axes:
  seed: [0]
slurm:
  nproc_per_node: 2
  cpus_per_task: 2
  time: "00:20:00"
  signal_grace: 30
"""


def test_ddp_task_under_srun_torchrun_requeues_and_resumes(cluster, tmp_path):
    """slurm/ddp.sbatch.tmpl: srun + torchrun with 2 gloo ranks, USR1 -> checkpoint -> requeue."""
    sweep_file = tmp_path / "ddp_smoke.yaml"
    sweep_file.write_text(DDP_SWEEP.format(base=REPO / "configs" / "ffjord" / "toy.yaml"))
    rc, out, err = run_script(
        "sweep.py", [str(sweep_file), "--slurm", "--runs-root", str(tmp_path / "runs")], timeout=180
    )
    assert rc == 0, out + err
    job = out.strip().splitlines()[-1]
    (run,) = plan(load_sweep(sweep_file, runs_root=tmp_path / "runs"))
    log = tmp_path / "runs" / "ddp_smoke" / "logs" / f"{job}_0.out"
    signalled = False
    try:
        deadline = time.monotonic() + FINISH_TIMEOUT
        while True:
            states = task_states(job)
            if (
                not signalled
                and states.get(f"{job}_0") == "RUNNING"
                and (run.run_dir / "ckpt.pt").is_file()
                and not (run.run_dir / "final.json").exists()
            ):
                sh("scancel", "--signal=USR1", "--batch", f"{job}_0")
                signalled = True
            if not states:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"job {job} not done after {FINISH_TIMEOUT} s: {states}\n{_tail(log)}")
            time.sleep(1.0)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=20)
    text = log.read_text()
    assert signalled, text
    assert "x 2 process(es)" in text and "data-parallel over 2 processes" in text
    resumed = re.findall(r"resuming .* from iteration (\d+)", text)
    assert len(resumed) == 1 and int(resumed[0]) > 0, text
    assert f"checkpoint saved at iteration {resumed[0]}" in text
    assert f"requeueing {job}_0" in text and "restart 1" in text
    final = json.loads((run.run_dir / "final.json").read_text())
    assert final["iterations"] == 200 and isinstance(final["test_nll"], float)
    iters = [
        json.loads(x)["iter"] for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert iters == list(range(10, 201, 10)), iters
