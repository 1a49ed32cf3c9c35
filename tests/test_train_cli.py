"""End to end through ``experiments/train.py`` and ``experiments/evaluate.py`` (subprocesses).

* a run folder describes itself: config.yaml, metrics.jsonl, a checkpoint
  that loads with ``weights_only=True`` and embeds the config, final.json;
* resuming reproduces the uninterrupted run (after a shorter run, and after
  SIGTERM);
* every bad input of issue 2 exits with code 2 and one ``error:`` line, no
  traceback, and leaves an existing run folder byte-identical;
* a non-finite loss stops training, names the iteration and keeps the last
  checkpoint;
* W&B's offline mode writes into the run folder and never stores the API key.

Runs are tiny (see ``TINY`` in conftest.py); independent runs are started two
at a time, which is what this 2-core machine can take.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    PYTHON,
    REPO,
    TINY,
    TOY_CONFIG,
    assert_clean_failure,
    run_evaluate,
    run_train,
    snapshot,
    subprocess_env,
)

from cnf.data.toy import toy_entropy

FINAL_KEYS = (
    "test_nll",
    "test_nll_stderr",
    "test_nfe",
    "train_seconds",
    "entropy",
    "floor",
    "gap",
    "gap_stderr",
)

# The run on a data file that the bad-input and NaN tests copy and rerun. A constant
# learning rate lets a rerun extend train.iters (a cosine schedule spans train.iters).
# The data are used as stored (data.standardize=false): the NaN test needs values that
# overflow float32 once squared, which standardisation would tame.
FILE_RUN = (
    *TINY,
    "train.iters=2",
    "train.schedule=constant",
    "data.name=file",
    "data.standardize=false",
)


def run_parallel(commands: Sequence[Sequence[str]], workers: int = 2) -> list[tuple[int, str, str]]:
    """``run_train(*overrides)`` for each list of overrides, ``workers`` at a time."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda c: run_train(*c), commands))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def read_final(run_dir: Path) -> dict:
    return json.loads((run_dir / "final.json").read_text())


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (for byte-identical comparisons)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def ok(result: tuple[int, str, str]) -> tuple[int, str, str]:
    rc, out, err = result
    assert rc == 0, f"exit code {rc}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
    return result


# ----------------------------------------------------------- shared finished runs
def gaussian_blobs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2)) * 0.5 + rng.choice([-1.5, 1.5], size=(n, 1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two finished 2-iteration runs, trained side by side: 8gaussians, and a data file."""
    root = tmp_path_factory.mktemp("runs")
    good = root / "good.npy"
    np.save(good, gaussian_blobs(1000))
    toy, file = root / "toy", root / "file"
    results = run_parallel(
        [
            [*TINY, "train.iters=2", "train.log_every=1", f"run.dir={toy}"],
            [*FILE_RUN, f"data.path={good}", f"run.dir={file}"],
        ]
    )
    for r in results:
        ok(r)
    return {"toy": toy, "file": file, "good": good, "toy_stdout": results[0][1]}


def copy_run(src: Path, dst: Path, *, data_path: tuple[Path, Path] | None = None) -> Path:
    """Copy a run folder; ``data_path=(old, new)`` points its config.yaml at another data file."""
    shutil.copytree(src, dst)
    if data_path is not None:
        cfg = dst / "config.yaml"
        text = cfg.read_text()
        assert str(data_path[0]) in text
        cfg.write_text(text.replace(str(data_path[0]), str(data_path[1])))
    return dst


# ------------------------------------------------------------ the run folder
def test_run_folder_describes_itself(runs: dict[str, Path]) -> None:
    run_dir = runs["toy"]
    for name in ("config.yaml", "metrics.jsonl", "ckpt.pt", "final.json"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "wandb").exists()  # track.wandb=disabled

    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    assert cfg.train.iters == 2 and cfg.run.dir == str(run_dir)
    assert list(cfg.model.hidden_dims) == [16, 16] and cfg.data.name == "8gaussians"

    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["iter"] for r in records] == [1, 2]
    for r in records:
        for key in ("loss", "nfe_forward", "nfe_backward", "sec_per_iter"):
            assert key in r, (key, r)
        assert math.isfinite(r["loss"]) and r["nfe_forward"] > 0 and r["nfe_backward"] == 0
        assert r["sec_per_iter"] > 0

    final = read_final(run_dir)
    for key in FINAL_KEYS:
        assert key in final and math.isfinite(final[key]), key
    assert final["entropy"] == pytest.approx(toy_entropy("8gaussians")[0])
    # The paired gap: NLL minus the floor of the same test points (not the analytic entropy).
    assert final["gap"] == pytest.approx(final["test_nll"] - final["floor"])
    assert final["gap"] > -3 * final["gap_stderr"]
    assert final["eval"]["settings"]["solver.name"] == "dopri5"  # the settings that made it
    assert final["test_nfe"] > 0 and final["train_seconds"] > 0

    # The resolved config is printed first; the result last, with the floor beside it.
    out = runs["toy_stdout"]
    assert out.startswith("seed: 0") and "run folder:" in out
    assert "test NLL" in out and "floor" in out and "gap" in out


def test_checkpoint_loads_safely_and_embeds_config(runs: dict[str, Path]) -> None:
    state = torch.load(runs["toy"] / "ckpt.pt", map_location="cpu", weights_only=True)
    assert state["iteration"] == 2
    cfg = state["config"]
    assert isinstance(cfg, dict)
    assert cfg["train"]["iters"] == 2 and cfg["model"]["hidden_dims"] == [16, 16]
    assert cfg["data"]["name"] == "8gaussians" and cfg["model"]["family"] == "ffjord"
    assert any(isinstance(v, torch.Tensor) for v in state["model"].values())
    assert "optimizer" in state


def test_evaluate_reproduces_final_metrics(runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = copy_run(runs["toy"], tmp_path / "run")
    before = snapshot(run_dir)
    rc, out, err = ok(run_evaluate(run_dir))
    written = run_dir / "evals.jsonl"
    (ev,) = [json.loads(line) for line in written.read_text().splitlines()]
    final = read_final(run_dir)
    # Same weights, same evaluation seed and settings: the same number.
    assert ev["test_nll"] == pytest.approx(final["test_nll"], abs=1e-6)
    assert ev["gap"] == pytest.approx(final["gap"], abs=1e-6)
    assert ev["eval"]["settings"] == final["eval"]["settings"]
    assert f"{ev['test_nll']:.4f}"[:5] in out and "evals.jsonl" in out
    assert snapshot(run_dir) == before  # final.json and the checkpoint are left alone
    # Another evaluation with other settings is appended, never overwriting the first.
    ok(run_evaluate(run_dir, "eval.solver.rtol=1e-3", "eval.solver.atol=1e-3"))
    first, second = [json.loads(line) for line in written.read_text().splitlines()]
    assert first == ev and second["eval"]["settings"]["solver.rtol"] == 1e-3


def test_evaluate_missing_folder_is_one_line(tmp_path: Path) -> None:
    rc, _, err = run_evaluate(tmp_path / "nope")
    line = assert_clean_failure(rc, err)
    assert "nope" in line


# ------------------------------------------------------------------- resume
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_reproduces_uninterrupted_run(schedule: str, tmp_path: Path) -> None:
    """Run A: 6 iterations straight. Run B: 3 iterations, then the same command with 6."""
    common = [*TINY, "train.log_every=1", f"train.schedule={schedule}"]
    a, b = tmp_path / "a", tmp_path / "b"
    for r in run_parallel(
        [[*common, "train.iters=6", f"run.dir={a}"], [*common, "train.iters=3", f"run.dir={b}"]]
    ):
        ok(r)
    assert [r["iter"] for r in read_metrics(b)] == [1, 2, 3]
    rc, out, err = run_train(*common, "train.iters=6", f"run.dir={b}")
    if schedule == "cosine" and rc != 0:
        # The cosine schedule spans train.iters: a run may instead refuse to change it.
        line = assert_clean_failure(rc, err)
        assert "train.iters" in line
        return
    ok((rc, out, err))
    assert "resuming" in out
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["iter"] for r in mb] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "nfe_forward", "lr", "grad_norm"):
        assert [r[key] for r in mb] == [r[key] for r in ma], key
    fa, fb = read_final(a), read_final(b)
    assert fb["iterations"] == 6
    assert fb["test_nll"] == pytest.approx(fa["test_nll"], abs=1e-6)
    ca = torch.load(a / "ckpt.pt", weights_only=True)["model"]
    cb = torch.load(b / "ckpt.pt", weights_only=True)["model"]
    for k in ca:
        assert torch.equal(ca[k], cb[k]), k


@pytest.mark.slow
def test_resume_after_sigterm_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    iters = 300
    common = [
        "--config",
        TOY_CONFIG,
        *TINY,
        f"train.iters={iters}",
        "train.log_every=5",
        "train.ckpt_every=10",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    env = subprocess_env()
    cmd_b = [PYTHON, "experiments/train.py", *common, f"run.dir={b}"]
    with ThreadPoolExecutor(1) as pool:
        fut_a = pool.submit(run_train, *common[2:], f"run.dir={a}")
        proc = subprocess.Popen(
            cmd_b, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 300
        while not (b / "ckpt.pt").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        ok(fut_a.result())
    assert proc.returncode == 3, (proc.returncode, err[-3000:])
    assert "Traceback" not in err
    assert "interrupted" in out
    stopped_at = torch.load(b / "ckpt.pt", weights_only=True)["iteration"]
    assert 10 <= stopped_at < iters
    assert not (b / "final.json").exists()

    ok(run_train(*common[2:], f"run.dir={b}"))
    ma, mb = read_metrics(a), read_metrics(b)
    assert [r["iter"] for r in mb] == [r["iter"] for r in ma]
    assert [r["loss"] for r in mb] == [r["loss"] for r in ma]
    assert read_final(b)["test_nll"] == pytest.approx(read_final(a)["test_nll"], abs=1e-6)


# ---------------------------------------------------------------- bad input
def _npy(array: np.ndarray) -> Callable[[Path], None]:
    return lambda p: np.save(p, array)


def _text(text: str) -> Callable[[Path], None]:
    return lambda p: p.write_text(text)


def _with_nan() -> np.ndarray:
    x = gaussian_blobs(1000)
    x[123, 0] = np.nan
    return x


@dataclass(frozen=True)
class BadCase:
    overrides: tuple[str, ...] = ()
    words: tuple[str, ...] = ()  # must appear in the error line
    data: tuple[str, Callable[[Path], None] | None] | None = None  # (file name, writer)
    target: str = "copy"  # copy: an existing run folder; file: run.dir is a file; fresh
    slow: bool = False  # the same code path as a fast case (each costs a Python start-up)


BAD_CASES: dict[str, BadCase] = {
    "unknown-key": BadCase(("train.nosuch=1",), ("train.nosuch",)),
    "unknown-key-fresh-dir": BadCase(("nosuch=1",), ("nosuch",), target="fresh", slow=True),
    "wrong-type": BadCase(("train.iters=abc",), ("train.iters",)),
    "no-equals-sign": BadCase(("train.iters",), ("train.iters", "key=value"), slow=True),
    "unknown-dataset": BadCase(("data.name=nosuch",), ("data.name", "nosuch", "8gaussians")),
    "unknown-solver": BadCase(
        ("model.solver.name=nosuch",), ("model.solver.name", "nosuch", "dopri5"), slow=True
    ),
    "unknown-layer": BadCase(
        ("model.layer=nosuch",), ("model.layer", "nosuch", "concatsquash"), slow=True
    ),
    "unknown-activation": BadCase(
        ("model.activation=nosuch",), ("model.activation", "nosuch", "tanh"), slow=True
    ),
    "missing-data-file": BadCase(words=("not found", "missing.npy"), data=("missing.npy", None)),
    "data-1d": BadCase(
        words=("shape", "bad.npy"), data=("bad.npy", _npy(np.arange(1000.0))), slow=True
    ),
    "data-3d": BadCase(words=("shape", "bad.npy"), data=("bad.npy", _npy(np.zeros((1000, 2, 1))))),
    "data-nan": BadCase(words=("NaN", "bad.npy"), data=("bad.npy", _npy(_with_nan()))),
    "data-fewer-than-a-batch": BadCase(
        words=("batch_size", "bad.npy"), data=("bad.npy", _npy(gaussian_blobs(100)))
    ),
    "data-non-numeric-csv": BadCase(
        words=("bad.csv",), data=("bad.csv", _text("x,y\n1,2\na,b\n")), slow=True
    ),
    "data-empty-csv": BadCase(words=("bad.csv",), data=("bad.csv", _text("")), slow=True),
    "data-wrong-suffix": BadCase(
        words=("suffix", ".npy"), data=("bad.txt", _text("1,2\n")), slow=True
    ),
    "run-dir-is-a-file": BadCase(words=("not a folder",), target="file"),
    "run-dir-holds-another-run": BadCase(("seed=1",), ("different config", "seed")),
}


def _run_bad_cases(names: list[str], runs: dict[str, Path], root: Path) -> dict:
    jobs, state = [], {}
    for name in names:
        case = BAD_CASES[name]
        case_dir = root / name
        case_dir.mkdir()
        data_path = runs["good"]
        if case.data is not None:
            data_path = case_dir / case.data[0]
            if case.data[1] is not None:
                case.data[1](data_path)
        if case.target == "copy":
            # A finished run whose config matches the command, so the bad input
            # itself (not a config mismatch) is what must be reported.
            run_dir = copy_run(runs["file"], case_dir / "run", data_path=(runs["good"], data_path))
        elif case.target == "file":
            run_dir = case_dir / "run"
            run_dir.write_text("not a run folder\n")
        else:
            run_dir = case_dir / "run"
        before = tree(run_dir) if run_dir.is_dir() else None
        file_before = run_dir.read_bytes() if run_dir.is_file() else None
        state[name] = (run_dir, before, file_before)
        jobs.append([*FILE_RUN, f"data.path={data_path}", f"run.dir={run_dir}", *case.overrides])
    results = run_parallel(jobs)
    return {name: (*state[name], res) for name, res in zip(names, results)}


@pytest.fixture(scope="module")
def bad_result(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """``bad_result(name)``: the case's run, started together with the others of its speed."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            group = [n for n, c in BAD_CASES.items() if c.slow == BAD_CASES[name].slow]
            cache.update(_run_bad_cases(group, runs, tmp_path_factory.mktemp("bad")))
        return cache[name]

    return get


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.slow] if c.slow else []) for n, c in BAD_CASES.items()],
)
def test_bad_input_exits_2_with_one_line_and_touches_nothing(name: str, bad_result) -> None:
    case = BAD_CASES[name]
    run_dir, before, file_before, (rc, out, err) = bad_result(name)
    line = assert_clean_failure(rc, err)
    for word in case.words:
        assert word in line, (word, line)
    if case.target == "copy":
        after = tree(run_dir)
        assert set(after) == set(before)
        for key in ("config.yaml", "metrics.jsonl", "ckpt.pt", "final.json"):
            assert after[key] == before[key], key
        assert after == before
    elif case.target == "file":
        assert run_dir.read_bytes() == file_before
    else:
        assert not run_dir.exists()


@pytest.mark.slow
def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    rc, _, err = run_train(config=str(tmp_path / "nope.yaml"))
    line = assert_clean_failure(rc, err)
    assert "nope.yaml" in line


def test_non_finite_loss_stops_and_keeps_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    """Resume a finished 2-iteration run on data whose squares overflow float32: the loss at
    iteration 3 is infinite."""
    huge = tmp_path / "huge.npy"
    np.save(huge, gaussian_blobs(1000) * 1e30)  # finite in float32, z² is not
    run_dir = copy_run(runs["file"], tmp_path / "run", data_path=(runs["good"], huge))
    ckpt_before = (run_dir / "ckpt.pt").read_bytes()
    rc, out, err = run_train(*FILE_RUN, "train.iters=4", f"data.path={huge}", f"run.dir={run_dir}")
    line = assert_clean_failure(rc, err, code=1)
    assert "iteration 3" in line and "non-finite" in line
    assert "resuming" in out
    assert (run_dir / "ckpt.pt").read_bytes() == ckpt_before
    state = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# -------------------------------------------------------------------- W&B
def test_wandb_offline_mode_keeps_the_key_out_of_the_run_folder(tmp_path: Path) -> None:
    key = "abc123secret" + "0" * 28  # W&B keys are 40 characters
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if not o.startswith("track.wandb")]
    rc, out, err = ok(
        run_train(
            *overrides,
            "track.wandb=offline",
            "train.iters=2",
            f"run.dir={run_dir}",
            env=subprocess_env(WANDB_API_KEY=key),
        )
    )
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].is_dir()
    assert (run_dir / "final.json").is_file()
    leaks = [p for p in run_dir.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert key not in out and key not in err


# ----------------------------------------------------------------- plots
@pytest.mark.slow
def test_trained_density_integrates_to_one_and_plots_are_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [o for o in TINY if o not in ("eval.plots=false", "model.hidden_dims=[16,16]")]
    ok(run_train(*overrides, "train.iters=300", "eval.plots=true", f"run.dir={run_dir}"))
    for name in ("density.png", "samples.png"):
        data = (run_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000, name
    final = read_final(run_dir)
    assert abs(final["density_mass_on_grid"] - 1) < 0.05, final["density_mass_on_grid"]
    assert final["gap"] < 1.0  # it learned something in 300 iterations
