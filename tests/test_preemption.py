"""Pre-emption safety: signals at a random moment, and SIGKILL during a checkpoint write.

* A local training run stopped with SIGTERM or SIGUSR1 at a random moment
  checkpoints, exits with code 3, and — rerun with the same command — ends
  with exactly the metrics of an uninterrupted run (same seed, CPU): every
  logged loss identical, test NLL equal to 1e-6. Also with validation-driven
  training (the ``plateau`` variant: validation every 10 iterations,
  learning-rate drops and early stopping on a hair trigger, best weights kept):
  the best value, the counters and the drops live in the checkpoint, so every
  validation line, the restored iteration and the best weights match too.
* ``save_checkpoint`` killed with SIGKILL in the middle of writing leaves the
  previous checkpoint loadable (``weights_only=True``) and unchanged.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, REPO, TINY, TOY_CONFIG, run_train, subprocess_env

from cnf.train.checkpoint import load_checkpoint, save_checkpoint

# Small and quick: 3-20 s of training on one core. Checkpoints every 50
# iterations, so a signal mostly lands between two periodic checkpoints.
SETTINGS = (
    *TINY,
    "train.iters=150",
    "train.batch_size=64",
    "train.log_every=5",
    "train.ckpt_every=50",
    "eval.solver.rtol=1e-4",
    "eval.solver.atol=1e-4",
)
TIMING_KEYS = {"sec_per_iter", "train_seconds", "eval_seconds"}
VARIANTS = {
    "plain": SETTINGS,
    "plateau": (
        *SETTINGS,
        "train.val_every=10",
        "train.lr_drop_after=[0,1]",
        "train.early_stop_after=2",
        "train.keep_best=true",
        "train.lr=0.03",  # high enough to plateau: two drops, then a stop at iteration 130
    ),
}


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in lines]


def logged_iteration(metrics: Path) -> int:
    """The last iteration in a metrics log being written (0 before the first line)."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("iter", 0))
        except ValueError:  # a line still being written
            continue
    return 0


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs of each variant, trained when a test first asks for one."""
    cache: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, variant: str) -> Path:
            run_dir = tmp_path_factory.mktemp(f"reference-{variant}") / "run"
            rc, out, err = run_train(*VARIANTS[variant], f"run.dir={run_dir}")
            assert rc == 0, out + err
            self[variant] = run_dir
            return run_dir

    return Lazy(cache)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "variant"),
    [(signal.SIGTERM, "plain"), (signal.SIGUSR1, "plain"), (signal.SIGUSR1, "plateau")],
    ids=["TERM", "USR1", "USR1-plateau"],
)
def test_signal_at_random_moment_then_resume_is_exact(tmp_path, references, sig, variant):
    reference = references[variant]
    settings = VARIANTS[variant]
    run_dir = tmp_path / "run"
    cmd = [PYTHON, "experiments/train.py", "--config", TOY_CONFIG, *settings, f"run.dir={run_dir}"]
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        # Signal once the metrics log reaches a random iteration (reproducible per
        # signal), not after a random number of seconds: 150 iterations take
        # 2.6 s on one fast core, so a clock could land after training ends.
        target = random.Random(int(sig)).randrange(10, 125, 5)
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while logged_iteration(metrics) < target and proc.poll() is None:
            assert time.monotonic() < deadline, f"training did not reach {target} within 180 s"
            time.sleep(0.01)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    first = (tmp_path / "first.log").read_text()
    assert rc == 3, first
    assert f"received {sig.name}: checkpoint saved at iteration" in first
    stopped_at = int(first.split("checkpoint saved at iteration ")[1].split()[0])
    assert 0 < stopped_at < 150
    assert load_checkpoint(run_dir / "ckpt.pt")["iteration"] == stopped_at

    rc, out, err = run_train(*settings, f"run.dir={run_dir}")
    assert rc == 0, out + err
    assert f"from iteration {stopped_at}" in out
    assert _records(run_dir) == _records(reference)  # every loss, NFE, grad norm, lr, val NLL
    ours = json.loads((run_dir / "final.json").read_text())
    ref = json.loads((reference / "final.json").read_text())
    assert ours["iterations"] == ref["iterations"]
    assert abs(ours["test_nll"] - ref["test_nll"]) <= 1e-6
    if variant == "plain":
        assert ours["iterations"] == 150
        return
    print(
        f"plateau run: {ours['stop_reason']} at {ours['iterations']}, {ours['lr_drops']} lr "
        f"drops, best at {ours['restored_iteration']}"
    )
    assert ours["lr_drops"] > 0  # the state under test was exercised
    for key in ("stop_reason", "lr_drops", "best_val", "restored_iteration", "restored_val_nll"):
        assert ours[key] == ref[key], key
    a, b = load_checkpoint(run_dir / "best.pt"), load_checkpoint(reference / "best.pt")
    assert a["iteration"] == b["iteration"]
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


# ------------------------------------------------------- SIGKILL mid-write
_WRITER = textwrap.dedent(
    """
    import io, os, sys, time
    import torch
    import cnf.train.checkpoint as ck

    path, slow = sys.argv[1], sys.argv[2] == "slow"
    if slow:
        # Every write to the temporary checkpoint file takes a while, so the
        # parent can kill this process while the file is half written.
        class SlowFile(io.FileIO):
            def write(self, b):
                n = super().write(b)
                time.sleep(0.02)
                return n

        ck.os.fdopen = lambda fd, mode: SlowFile(fd, "wb")
    state = {"w": [torch.full((256, 1024), float(i)) for i in range(200)], "iteration": 2}
    print("writing", flush=True)
    ck.save_checkpoint(path, state)
    print("done", flush=True)
    """
)


def _old_state() -> dict:
    torch.manual_seed(0)
    return {"model": {"w": torch.randn(64, 64)}, "iteration": 1, "config": {"seed": 0}}


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path):
    path = tmp_path / "ckpt.pt"
    old = _old_state()
    save_checkpoint(path, old)
    old_bytes = path.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), "slow"],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        # Kill once a good part (but not all, ~200 MB) of the new file is written.
        deadline = time.monotonic() + 120
        while True:
            assert time.monotonic() < deadline, "the writer made no progress"
            tmp = _tmp_files(tmp_path)
            if tmp and tmp[0].stat().st_size > 20 * 2**20:
                break
            assert proc.poll() is None, "the writer finished before it could be killed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert _tmp_files(tmp_path), "the half-written file should be the stray .tmp"
    assert path.read_bytes() == old_bytes
    loaded = load_checkpoint(path)  # weights_only=True
    assert loaded["iteration"] == 1 and torch.equal(loaded["model"]["w"], old["model"]["w"])
    # The next save replaces the old checkpoint and leaves the stray file alone.
    save_checkpoint(path, {"iteration": 3})
    assert load_checkpoint(path)["iteration"] == 3


@pytest.mark.slow
def test_sigkill_at_random_moments_never_breaks_the_checkpoint(tmp_path):
    """Unmodified writer, killed at random times: the file is always the old or the new state."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _old_state())
    old_bytes = path.read_bytes()
    rng = random.Random(0)
    outcomes = []
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path), "fast"],
            cwd=REPO,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(rng.uniform(0.0, 2.0))  # about the length of one save
        proc.kill()
        proc.wait(timeout=30)
        state = load_checkpoint(path)
        if state["iteration"] == 1:
            assert path.read_bytes() == old_bytes
            outcomes.append("old")
        else:
            assert state["iteration"] == 2 and len(state["w"]) == 200
            assert torch.equal(state["w"][-1], torch.full((256, 1024), 199.0))
            outcomes.append("new")
            save_checkpoint(path, _old_state())  # back to the old state for the next round
            old_bytes = path.read_bytes()
    print("outcomes:", outcomes)
