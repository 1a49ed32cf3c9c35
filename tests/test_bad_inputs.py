"""The inputs a cluster job meets: one ``error:`` line, exit 2, caught by ``--dry-run``;
and the litter a killed write leaves behind, cleaned by the next run of the folder.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, TINY, assert_clean_failure, run_train, subprocess_env

from cnf.config import ConfigError, load_config
from cnf.rundir import RunDir

DRY = "--dry-run"


@pytest.mark.parametrize(
    "overrides,config,words",
    [
        # A malformed list: not a 25-line YAML traceback.
        (["model.hidden_dims=[64,64"], "configs/ffjord/toy.yaml", ["model.hidden_dims", "YAML"]),
        # A vector family on image-shaped data: before the config dump, no traceback.
        (
            ["data.name=digits", "data.flatten=false"],
            "configs/ffjord/toy.yaml",
            ["data.flatten", "ffjord", "flatten=true"],
        ),
        # Image sets that read files need data.path, at --dry-run already.
        (["data.name=celeba64"], "configs/fm/otcfm_digits.yaml", ["data.path", "celeba64"]),
        (["data.name=mnist"], "configs/fm/otcfm_digits.yaml", ["data.path", "mnist"]),
        # A misspelt key: the nearest valid one is suggested.
        (
            ["data.nmae=moons"],
            "configs/ffjord/toy.yaml",
            ["data.nmae", "did you mean", "data.name"],
        ),
        (
            ["model.hiden_dims=[8]"],
            "configs/ffjord/toy.yaml",
            ["did you mean", "model.hidden_dims"],
        ),
    ],
    ids=["malformed-list", "flatten-vector-family", "celeba64-path", "mnist-path", "nmae", "hiden"],
)
def test_bad_input_is_one_line_at_dry_run(overrides, config, words, tmp_path: Path) -> None:
    rc, out, err = run_train(*overrides, f"run.dir={tmp_path / 'r'}", DRY, config=config)
    line = assert_clean_failure(rc, err)
    for w in words:
        assert w in line, (w, line)
    assert out == ""  # nothing printed before the error (no config dump)
    assert not (tmp_path / "r").exists()


def test_an_option_only_the_builder_can_check_is_one_line_and_writes_nothing(
    tmp_path: Path,
) -> None:
    rc, out, err = run_train(
        "model.flow.mask=diagonal",
        "train.iters=1",
        f"run.dir={tmp_path / 'r'}",
        config="configs/flows/realnvp_toy.yaml",
    )
    line = assert_clean_failure(rc, err)
    assert "mask" in line and "checkerboard" in line and "half" in line, line
    assert not (tmp_path / "r").exists()


def test_type_error_inside_a_yaml_file_names_the_key_plainly(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "_base_: " + str(REPO / "configs/ffjord/toy.yaml") + "\ntrain:\n  iters: many\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "config key 'train.iters' must be an integer, got 'many'"
    rc, _, err = run_train(DRY, config=str(path))
    assert (
        assert_clean_failure(rc, err)
        == "error: config key 'train.iters' must be an integer, got 'many'"
    )


def _killed_write(folder: Path) -> None:
    """Die (SIGKILL) in the middle of an atomic checkpoint write into ``folder``."""
    code = (
        "import os, signal, sys; from cnf.train.checkpoint import atomic_write_bytes\n"
        "def write(fh):\n"
        "    fh.write(b'x' * 4096); fh.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write_bytes(sys.argv[1], write)\n"
    )
    proc = subprocess.run(
        [PYTHON, "-c", code, str(folder / "ckpt.pt")], cwd=REPO, env=subprocess_env()
    )
    assert proc.returncode == -signal.SIGKILL


def test_a_killed_checkpoint_write_leaves_no_litter_after_a_restart(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    common = (*TINY, "train.schedule=constant")  # a resumed run may extend train.iters
    rc, _, err = run_train(*common, "train.iters=2", f"run.dir={run_dir}")
    assert rc == 0, err
    _killed_write(run_dir)
    litter = [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert len(litter) == 1 and litter[0].startswith("ckpt.pt.")  # what a SIGKILL leaves
    assert RunDir(run_dir).status() == "finished"  # litter does not change the status
    # The run that next takes the folder's lock removes it.
    rc, _, err = run_train(*common, "train.iters=3", f"run.dir={run_dir}")
    assert rc == 0, err
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_folder_holding_only_litter_is_a_new_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _killed_write(run_dir)
    assert RunDir(run_dir).status() == "new"
    rc, _, err = run_train(*TINY, "train.iters=1", f"run.dir={run_dir}")
    assert rc == 0, err
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_refuses_overrides_that_would_change_the_model(tmp_path: Path) -> None:
    from conftest import run_evaluate

    run_dir = tmp_path / "run"
    rc, _, err = run_train(*TINY, "train.iters=1", f"run.dir={run_dir}")
    assert rc == 0, err
    for bad in ("train.lr=0.1", "model.hidden_dims=[8]"):
        rc, _, err = run_evaluate(run_dir, bad)
        line = assert_clean_failure(rc, err)
        key = bad.split("=")[0]
        assert key in line and "eval.*" in line
    assert not (run_dir / "evals.jsonl").exists()
