"""W&B around pre-emption: the run id survives a restart, and the API key is never written.

The mode is chosen by the config (``online`` without a key becomes
``offline``); the run id is written to ``RUN_DIR/wandb_id.txt`` as soon as the
run starts (and kept in the checkpoint) and reused with ``resume="allow"``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from conftest import PYTHON, REPO, TINY, TOY_CONFIG, run_train, subprocess_env

from cnf.train.checkpoint import load_checkpoint
from cnf.train.tracking import wandb_mode

SENTINEL = "SENTINELc0ffee0123456789abcdef0123456789"  # 40 characters, like a key


def test_online_without_a_key_falls_back_to_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert wandb_mode("online") == "offline"
    assert wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    assert wandb_mode("online") == "online"


@pytest.mark.slow
def test_wandb_id_is_reused_after_a_restart_and_the_key_never_written(tmp_path):
    run_dir = tmp_path / "run"
    settings = [
        *[s for s in TINY if not s.startswith("track.wandb")],
        "track.wandb=offline",
        "track.group=g",
        "track.tags=[a=1,seed=0]",
        "train.iters=80",
        "train.batch_size=64",
        "train.log_every=5",
        "train.ckpt_every=1000",  # no periodic checkpoint before the signal
        f"run.dir={run_dir}",
    ]
    env = subprocess_env(WANDB_API_KEY=SENTINEL)
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [PYTHON, "experiments/train.py", "--config", TOY_CONFIG, *settings],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "wandb_id.txt").is_file():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "training did not start within 180 s"
            time.sleep(0.05)
        run_id = (run_dir / "wandb_id.txt").read_text().strip()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert load_checkpoint(run_dir / "ckpt.pt")["wandb_id"] == run_id

    rc, out, err = run_train(*settings, env=env)
    assert rc == 0, out + err
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline), offline
    assert json.loads((run_dir / "final.json").read_text())["iterations"] == 80
    # The key was in the environment of both processes but is in no file and no output.
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and SENTINEL.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert SENTINEL not in out + err
