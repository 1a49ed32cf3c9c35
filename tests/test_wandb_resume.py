"""W&B around pre-emption and failures: the run id survives a restart, the API key is
never written, and no W&B failure (no route to the server, a failing call) stops training.

The mode is chosen by the config (``online`` without a key becomes
``offline``); the run id is written to ``RUN_DIR/wandb_id.txt`` as soon as the
run starts (and kept in the checkpoint) and reused with ``resume="allow"``.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
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


FAKE_KEY = "c0ffee42" * 5  # 40 hex characters, the shape of a W&B API key


@pytest.mark.slow
def test_online_without_a_route_falls_back_to_offline_and_training_finishes(tmp_path):
    """A key but no network (closed port): one warning, offline run, exit 0, key in no file."""
    run_dir = tmp_path / "run"
    home = tmp_path / "home"  # no ~/.netrc of the machine running the tests
    home.mkdir()
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        env = subprocess_env(
            WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=f"http://127.0.0.1:{port}", HOME=str(home)
        )
        settings = [
            *[s for s in TINY if not s.startswith("track.wandb")],
            "track.wandb=online",
            "track.init_timeout=5",
            "train.iters=20",
            "train.batch_size=64",
            f"run.dir={run_dir}",
        ]
        rc, out, err = run_train(*settings, env=env, timeout=300)
    assert rc == 0, out + err
    assert "Traceback" not in err, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1 and "online init failed" in warnings[0], err
    print(warnings[0])
    assert json.loads((run_dir / "final.json").read_text())["iterations"] == 20
    assert (run_dir / "ckpt.pt").is_file()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, sorted((run_dir / "wandb").iterdir())
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert offline[0].name.endswith(f"-{run_id}")
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert FAKE_KEY not in out + err


def test_a_failing_wandb_call_warns_once_and_disables_wandb(monkeypatch):
    """Any exception from wandb after init: one warning, W&B off, later calls are no-ops."""
    import types

    from cnf.train.tracking import WandbTracker

    calls = []

    class BrokenRun:
        id = "abc123"
        summary: dict = {}

        def log(self, record, step):
            calls.append(step)
            raise ConnectionError(f"lost the server (key {FAKE_KEY})")

        def finish(self):
            raise AssertionError("finish must not be called once W&B is disabled")

    fake = types.SimpleNamespace(init=lambda **kw: BrokenRun(), Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    warned = []
    tracker = WandbTracker(run_dir=".", mode="online", project="p", config={}, warn=warned.append)
    assert tracker.enabled and tracker.run_id == "abc123"
    for step in range(3):
        tracker.log({"loss": 1.0}, step)
    tracker.summary({"x": 1})
    tracker.finish()
    assert calls == [0]  # disabled after the first failure
    assert len(warned) == 1 and "log failed" in warned[0] and "disabled" in warned[0], warned
    assert FAKE_KEY not in warned[0]


def test_online_init_error_falls_back_to_offline_with_one_warning(monkeypatch):
    import types

    from cnf.train.tracking import WandbTracker

    modes, settings = [], []

    class Run:
        id = "off1"

    def init(**kw):
        modes.append(kw["mode"])
        settings.append(kw["settings"])
        if kw["mode"] == "online":
            raise RuntimeError("Timed out while retrying: connection refused")
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, Settings=dict))
    warned = []
    tracker = WandbTracker(
        run_dir="rd", mode="online", project="p", config={}, init_timeout=7, warn=warned.append
    )
    assert modes == ["online", "offline"] and tracker.mode == "offline" and tracker.enabled
    assert settings[0]["init_timeout"] == 7.0
    assert len(warned) == 1 and "logging offline" in warned[0], warned
