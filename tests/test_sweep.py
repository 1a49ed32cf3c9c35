"""Sweep files: expansion, run-folder names, validation, sbatch rendering, local runs.

Fast tests call :mod:`cnf.sweep` directly; the slow ones run
``experiments/sweep.py`` end to end (``--dry-run`` on every shipped sweep,
malformed files, and ``--local --jobs 2`` on the smoke sweep twice).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, assert_clean_failure, run_script, subprocess_env
from omegaconf import OmegaConf

from cnf.rundir import RunDir, RunFolderError
from cnf.sweep import (
    Run,
    SweepError,
    expand,
    format_value,
    load_sweep,
    manifest_text,
    plan,
    run_name,
    run_status,
)
from slurm.launch import array_spec, check_time_quoted, parse_slurm, render_sbatch

SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
BASE = REPO / "configs" / "ffjord" / "toy.yaml"


def load_checked(path: Path, **kwargs):
    """What ``experiments/sweep.py`` does first: the file, its SLURM section, its runs."""
    check_time_quoted(path.read_text(), str(path))
    sweep = load_sweep(path, **kwargs)
    return sweep, parse_slurm(sweep.slurm, str(path))


def write_sweep(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text.replace("@BASE@", str(BASE)))
    return p


GOOD = """
name: t
base: @BASE@
axes:
  data.name: [8gaussians, checkerboard]
  model.kinetic: [0.0, 0.01]
  model.jacobian: [0.0, 0.01]
  seed: [0, 1, 2]
zip: [[model.kinetic, model.jacobian]]
"""


# ------------------------------------------------------------------ fast
def test_run_name_is_a_readable_sorted_digest():
    assert (
        run_name({"model.kinetic": 0.01, "data.name": "checkerboard", "seed": 0}, 0)
        == "data.name-checkerboard__model.kinetic-0.01_s0"
    )
    assert run_name({"model.hidden_dims": [16, 16]}, 3) == "model.hidden_dims-16x16_s3"
    assert run_name({"seed": 1}, 1) == "s1"
    assert run_name({"data.path": "/a b/c.npy"}, 0) == "data.path--a-b-c.npy_s0"


def test_long_names_are_cut_and_hashed_deterministically():
    a = {f"model.key{i}": "x" * 20 for i in range(8)}
    b = dict(a, **{"model.key7": "y" * 20})
    na, nb = run_name(a, 0), run_name(b, 0)
    assert len(na) <= 110 and na.endswith("_s0")
    assert na == run_name(dict(reversed(list(a.items()))), 0)  # order of the axes does not matter
    assert na != nb


def test_expand_is_a_product_with_zipped_groups(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, GOOD))
    combos = expand(sweep)
    assert len(combos) == 2 * 2 * 3
    assert all(c["model.kinetic"] == c["model.jacobian"] for c in combos)
    assert combos[0] == {
        "data.name": "8gaussians",
        "model.kinetic": 0.0,
        "model.jacobian": 0.0,
        "seed": 0,
    }
    assert [c["seed"] for c in combos[:3]] == [0, 1, 2]  # the last axis varies fastest
    runs = plan(sweep)
    assert len({r.run_dir for r in runs}) == 12
    assert runs[3].name == "data.name-8gaussians__model.jacobian-0.01__model.kinetic-0.01_s0"
    assert runs[0].run_dir == (Path("runs/sweeps") / "t" / runs[0].name).absolute()
    # W&B: group = sweep name, tags = axis values.
    assert "track.group=t" in runs[3].overrides
    assert "track.tags=[data.name=8gaussians,model.kinetic=0.01,model.jacobian=0.01,seed=0]" in (
        runs[3].overrides
    )
    # Same file, same plan (names are deterministic).
    assert [r.name for r in plan(load_sweep(sweep.path))] == [r.name for r in runs]


@pytest.mark.parametrize(
    "value",
    [
        0,
        -3,
        0.01,
        1e-05,
        2.5e10,
        True,
        None,
        "8gaussians",
        "a b",
        "1:00:00",
        "001",
        "x,y",
        "[1]",
        "",
        "yes",
        [16, 16],
        ["a=b", "c d"],
        {"method": "rk4", "steps": 8},
    ],
)
def test_format_value_round_trips_through_omegaconf(value):
    parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"k={format_value(value)}"]))["k"]
    assert parsed == value


def test_time_in_yaml_must_be_quoted(tmp_path):
    # YAML reads an unquoted 1:00:00 as the number 3600: refused, with the fix.
    p = write_sweep(tmp_path, GOOD + "slurm: {time: 1:00:00, mem: 4G}\n")
    with pytest.raises(SweepError, match=r'slurm.time: quote it \(time: "1:00:00"\)'):
        load_checked(p)
    p = write_sweep(tmp_path, GOOD + "slurm: {time: '1:00:00', mem: 4G}\n")
    assert load_checked(p)[1].time == "1:00:00"


MALFORMED = {
    "unknown key": (GOOD + "axis: {seed: [1]}\n", "unknown config key 'axis'"),
    "empty axis": (GOOD.replace("seed: [0, 1, 2]", "seed: []"), "axes.seed is empty"),
    "axis not a list": (GOOD.replace("seed: [0, 1, 2]", "seed: 3"), "must be a list"),
    "key the base lacks": (
        GOOD.replace("model.kinetic: [0.0, 0.01]", "model.kinetik: [0.0, 0.01]").replace(
            "[[model.kinetic, model.jacobian]]", "[[model.kinetik, model.jacobian]]"
        ),
        "unknown config key 'model.kinetik'",
    ),
    "bad value": (
        GOOD.replace("[8gaussians, checkerboard]", "[8gaussians, chekerboard]"),
        "chekerboard",
    ),
    "zip unequal": (
        GOOD.replace("model.jacobian: [0.0, 0.01]", "model.jacobian: [0.0]"),
        "equal lengths",
    ),
    "zip not an axis": (
        GOOD.replace("[[model.kinetic, model.jacobian]]", "[[model.kinetic, lr]]"),
        "not an axis",
    ),
    "bad time": (GOOD + "slurm: {time: 1h}\n", "slurm.time"),
    "negative cpus": (GOOD + "slurm: {cpus_per_task: -2}\n", "slurm.cpus_per_task"),
    "bad mem": (GOOD + "slurm: {mem: 4GB}\n", "slurm.mem"),
    "unknown slurm key": (GOOD + "slurm: {gpu: 1}\n", "unknown key 'slurm.gpu'"),
    "bad extra": (GOOD + 'slurm: {extra: ["--x=1\\n#SBATCH --y"]}\n', "slurm.extra"),
    "missing base": (GOOD.replace("@BASE@", "nowhere.yaml"), "not found"),
    "run.dir axis": (GOOD + "overrides: {run.dir: /tmp/x}\n", "run.dir"),
    "bad yaml": ("name: [unclosed\n", "not valid YAML"),
    "bad name": (GOOD.replace("name: t", "name: a/b"), "name"),
    "base override of an unlisted base": (
        GOOD + "base_overrides: {other.yaml: {train.iters: 3}}\n",
        "'other.yaml' is not a listed base",
    ),
    "base override on an axis": (
        GOOD + "base_overrides: {@BASE@: {seed: 3}}\n",
        "'seed' is both a base override and an axis",
    ),
    "base override not a mapping": (
        GOOD + "base_overrides: {@BASE@: 3}\n",
        "must map dotted keys to values",
    ),
}


def test_base_overrides_apply_to_their_base_only_and_after_the_fixed_ones(tmp_path):
    realnvp = REPO / "configs" / "flows" / "realnvp_toy.yaml"
    text = f"""
name: t
base: [{BASE}, {realnvp}]
overrides: {{train.iters: 7, eval.batch_size: 50}}
base_overrides:
  {realnvp}: {{train.iters: 9}}
axes: {{seed: [0, 1]}}
"""
    runs = plan(load_checked(write_sweep(tmp_path, text))[0])
    iters = {(Path(r.base).name, r.seed): r.config["train"]["iters"] for r in runs}
    assert iters == {
        ("toy.yaml", 0): 7,
        ("toy.yaml", 1): 7,
        ("realnvp_toy.yaml", 0): 9,
        ("realnvp_toy.yaml", 1): 9,
    }
    # The fixed overrides still reach the base with its own, and the override is on the command.
    assert {r.config["eval"]["batch_size"] for r in runs} == {50}
    assert all(("train.iters=9" in r.overrides) == r.base.name.startswith("realnvp") for r in runs)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_sweep_is_one_clear_error(tmp_path, case):
    text, expected = MALFORMED[case]
    with pytest.raises(SweepError) as err:
        plan(load_checked(write_sweep(tmp_path, text))[0])
    msg = str(err.value)
    assert expected in msg and "\n" not in msg


def test_array_spec():
    assert array_spec([0, 1, 2, 3]) == "0-3"
    assert array_spec([5, 0, 1, 3], throttle=2) == "0-1,3,5%2"
    with pytest.raises(SweepError):
        array_spec([])


def test_render_sbatch_quotes_values_and_keeps_overrides_out(tmp_path):
    evil = tmp_path / "runs $(touch PWNED) 'x'"
    sweep, slurm = load_checked(
        write_sweep(
            tmp_path,
            GOOD + "slurm: {partition: gpu, gpus: 1, time: '04:00:00', mem: 16G, array_throttle: 3,"
            " extra: ['--constraint=a100|h100'], setup: ['module load cuda/12.4']}\n",
        ),
        runs_root=evil,
    )
    runs = plan(sweep)
    manifest = sweep.folder / "runs-x.jsonl"
    tmpl = (REPO / "slurm" / "array.sbatch.tmpl").read_text()
    script = render_sbatch(
        tmpl,
        sweep,
        slurm,
        [0, 1, 5],
        manifest=manifest,
        workdir=REPO,
        python=PYTHON,
        log_dir=sweep.folder / "logs",
    )
    assert "@@" not in script
    assert f"MANIFEST={shlex.quote(str(manifest))}" in script
    for line in (
        "#SBATCH --array=0-1,5%3",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --partition=gpu",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --time=04:00:00",
        "#SBATCH --constraint='a100|h100'",
        "module load cuda/12.4",
    ):
        assert line in script.splitlines(), line
    assert "%A_%a.out" in script
    assert (
        "model.kinetic" not in script and "checkerboard" not in script
    )  # overrides: manifest only
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell
    lines = manifest_text(runs, sweep.base).splitlines()
    assert len(lines) == len(runs)
    entry = json.loads(lines[3])
    assert entry["index"] == 3 and entry["overrides"][-1].startswith("run.dir=")
    # The run.dir override reads back as the exact (odd) folder.
    value = entry["overrides"][-1].split("=", 1)[1]
    assert OmegaConf.from_dotlist([f"d={value}"]).d == str(runs[3].run_dir)


def test_ddp_template_is_chosen_for_multi_gpu_tasks(tmp_path):
    sweep, slurm = load_checked(
        write_sweep(tmp_path, GOOD + "slurm: {gpus: 4, nodes: 2, cpus_per_task: 32}\n")
    )
    assert slurm.kind == "ddp" and slurm.procs_per_node == 4
    tmpl = (REPO / "slurm" / "ddp.sbatch.tmpl").read_text()
    script = render_sbatch(
        tmpl,
        sweep,
        slurm,
        [0],
        manifest=tmp_path / "m.jsonl",
        workdir=REPO,
        python=PYTHON,
        log_dir=tmp_path,
    )
    assert "#SBATCH --nodes=2" in script and "NPROC_PER_NODE=4" in script
    assert "torch.distributed.run" in script and "scontrol show hostnames" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def _fake_run(tmp_path: Path) -> Run:
    sweep = load_sweep(write_sweep(tmp_path, GOOD), runs_root=tmp_path / "runs")
    return plan(sweep)[0]


def test_run_status(tmp_path):
    run = _fake_run(tmp_path)
    assert run_status(run) == "new"
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(run.config)))
    assert run_status(run) == "new"
    (run.run_dir / "ckpt.pt").write_bytes(b"x")
    assert run_status(run) == "partial"
    # A live process holding the folder's lock: running.
    holder = subprocess.Popen(
        [
            PYTHON,
            "-c",
            "import sys, time; from cnf.rundir import RunDir; "
            "h = RunDir(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(60)",
            str(run.run_dir),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run_status(run) == "running"
        with pytest.raises(RunFolderError, match="in use by another training process"):
            RunDir(run.run_dir).lock()  # a second training process would stop here
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert run_status(run) == "partial"
    (run.run_dir / "final.json").write_text("{}")
    assert run_status(run) == "finished"
    # A folder trained with another config is reported, not resumed.
    (tmp_path / "o").mkdir()
    other = _fake_run(tmp_path / "o")
    other.run_dir.mkdir(parents=True)
    cfg = dict(other.config, model=dict(other.config["model"], hidden_dims=[8]))
    (other.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    assert run_status(other) == "conflict"


# ------------------------------------------------------------------ slow
@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_dry_run_prints_every_run_and_the_script(tmp_path, path):
    rc, out, err = run_script(
        "sweep.py", [str(path), "--slurm", "--dry-run", "--runs-root", str(tmp_path)]
    )
    assert rc == 0, err
    runs = plan(load_sweep(path, search=[REPO], runs_root=tmp_path))
    for r in runs:
        assert f"[{r.index:>3}] new" in out and r.name in out
    assert f"status: {len(runs)} new" in out
    assert "#!/bin/bash" in out and "#SBATCH --array=" in out and "sweep.py --task" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["unknown key", "empty axis", "key the base lacks", "bad time", "bad mem"]
)
def test_cli_malformed_sweep_exits_2_with_one_line(tmp_path, case):
    path = write_sweep(tmp_path, MALFORMED[case][0])
    rc, out, err = run_script("sweep.py", [str(path), "--dry-run"])
    line = assert_clean_failure(rc, err)
    assert MALFORMED[case][1] in line


@pytest.mark.slow
def test_local_jobs_2_then_relaunch_skips_finished(tmp_path):
    smoke = REPO / "configs" / "sweeps" / "smoke.yaml"
    args = [str(smoke), "--local", "--jobs", "2", "--runs-root", str(tmp_path)]
    t0 = time.time()
    rc, out, err = run_script("sweep.py", args, timeout=900)
    assert rc == 0, out + err
    runs = plan(load_sweep(smoke, runs_root=tmp_path))
    for r in runs:
        final = json.loads((r.run_dir / "final.json").read_text())
        assert final["iterations"] == 300 and "test_nll" in final
        assert f"done  [{r.index}] {r.name}" in out
        assert (tmp_path / "smoke" / "logs" / f"{r.name}.log").is_file()
    print(f"local sweep of {len(runs)} runs with --jobs 2: {time.time() - t0:.0f} s")
    before = {r.name: (r.run_dir / "final.json").stat().st_mtime_ns for r in runs}
    rc, out, err = run_script("sweep.py", args, timeout=300)
    assert rc == 0, out + err
    assert "nothing to run" in out and out.count("finished") >= len(runs)
    assert "start [" not in out
    assert before == {r.name: (r.run_dir / "final.json").stat().st_mtime_ns for r in runs}


def test_task_entry_point_execs_train_with_the_manifest_entry(tmp_path):
    """``sweep.py --task M I`` becomes train.py with entry I's config and overrides."""
    manifest = tmp_path / "m.jsonl"
    # An unknown key makes train.py stop at once with its own one-line error.
    entry = {
        "index": 4,
        "name": "n",
        "run_dir": "x",
        "config": str(BASE),
        "overrides": ["model.nope=1"],
    }
    manifest.write_text(
        json.dumps({**entry, "index": 3, "overrides": ["x"]}) + "\n" + json.dumps(entry) + "\n"
    )
    rc, _, err = run_script("sweep.py", ["--task", str(manifest), "4"])
    assert "unknown config key 'model.nope'" in assert_clean_failure(rc, err)
    rc, _, err = run_script("sweep.py", ["--task", str(manifest), "9"])
    assert rc == 2 and "no usable entry 9" in err
