"""experiments/bench_time_to_nll.py: the runs it picks, the figures it prints, its bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import REPO, assert_clean_failure, load_experiment_module, run_script

from cnf.sweep import base_label, load_sweep, plan

bench = load_experiment_module("bench_time_to_nll")


def _sweep(tmp_path: Path, budgets=(2, 4), seeds=(0, 1), extra: str = "") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"""name: ttn
base: [{REPO}/configs/ffjord/toy.yaml, {REPO}/configs/flows/nsf_toy.yaml]
overrides: {{train.iters: 100000000, eval.num_samples: 0, eval.plots: false, track.wandb: disabled,
            data.test_size: 200, data.val_size: 50{extra}}}
axes:
  data.name: [8gaussians]
  train.budget_seconds: {list(budgets)}
  seed: {list(seeds)}
runs_root: {tmp_path / "runs"}
"""
    )
    return path


def test_the_shipped_sweep_is_five_models_two_densities_four_budgets_three_seeds() -> None:
    runs = plan(load_sweep(bench.SWEEP))
    assert len(runs) == 5 * 2 * 4 * 3
    assert [base_label(r.base) for r in runs[::24]] == list(bench.NAMES)
    assert {float(r.axis_values["train.budget_seconds"]) for r in runs} == {
        30.0,
        60.0,
        120.0,
        300.0,
    }
    for r in runs:  # every run is a budget run with W&B off (its service would share the CPU)
        assert r.config["train"]["budget_seconds"] == r.axis_values["train.budget_seconds"]
        assert r.config["track"]["wandb"] == "disabled"
    plain = [r for r in runs if base_label(r.base) == "ffjord-toy_plain"]
    assert {(r.config["model"]["kinetic"], r.config["model"]["jacobian"]) for r in plain} == {
        (0, 0)
    }
    # The budget recipe (make demo): the default config with Adam 2e-2 and rk4 with 8 steps.
    recipe = [r for r in runs if base_label(r.base) == "ffjord-toy_budget"]
    assert len(recipe) == 2 * 4 * 3
    for r in recipe:
        m, t = r.config["model"], r.config["train"]
        assert (m["solver"]["name"], m["solver"]["steps"], t["lr"]) == ("rk4", 8, 2e-2)
        assert (m["kinetic"], m["jacobian"], t["schedule"]) == (0.01, 0.01, "cosine")


def test_filters_pick_exactly_the_asked_runs(tmp_path: Path) -> None:
    runs = plan(load_sweep(_sweep(tmp_path)))
    chosen = bench.select(runs, data=None, budgets=[4.0], seeds=[1], models=["flows-nsf_toy"])
    assert [
        (base_label(r.base), r.axis_values["train.budget_seconds"], r.seed) for r in chosen
    ] == [("flows-nsf_toy", 4, 1)]
    assert len(bench.select(runs, data=["8gaussians"], budgets=None, seeds=None, models=None)) == 8


def test_report_gives_each_run_the_seed_means_and_the_ratio_to_the_peer(tmp_path: Path) -> None:
    runs = plan(load_sweep(_sweep(tmp_path)))
    gaps = {}
    for i, r in enumerate(runs):
        model = base_label(r.base)
        gap = 0.01 * (i + 1)
        gaps[(model, r.axis_values["train.budget_seconds"], r.seed)] = gap
        r.run_dir.mkdir(parents=True)
        final = {
            "test_nll": 2.8 + gap,
            "gap": gap,
            "gap_stderr": 0.001,
            "floor": 2.8,
            "budget_iters": 10 + i,
            "budget_spent_seconds": 1.5,
        }
        (r.run_dir / "final.json").write_text(json.dumps(final))
    rows = bench.collect(runs)
    assert len(rows) == len(runs)
    text = bench.report(rows)
    for budget in (2, 4):
        ours = [gaps[("ffjord-toy", budget, s)] for s in (0, 1)]
        peer = [gaps[("flows-nsf_toy", budget, s)] for s in (0, 1)]
        mean, se = sum(ours) / 2, abs(ours[0] - ours[1]) / 2  # n = 2: sd/√2 = |a−b|/2
        ratio = mean / (sum(peer) / 2)
        line = next(
            ln
            for ln in text.splitlines()
            if ln.split()[:4] == [f"{budget}s", "FFJORD", "+", "RNODE"] and ln.split()[4] == "2"
        )
        nll, gap, gap_se, shown_ratio = map(float, line.split()[5:9])
        assert nll == pytest.approx(2.8 + mean, abs=1e-4)
        assert gap == pytest.approx(mean, abs=1e-4)
        assert gap_se == pytest.approx(se, abs=1e-4)
        assert shown_ratio == pytest.approx(ratio, abs=0.01)
    # One row per run, with its own iteration count.
    for r, rec in zip(runs, rows):
        assert rec["iters"] == json.loads((r.run_dir / "final.json").read_text())["budget_iters"]
    assert "floor of the test points: 2.8 nats" in text


def test_mean_and_standard_error_across_seeds() -> None:
    from cnf.metrics import mean_stderr  # what the report's seed means use

    mean, se = mean_stderr([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert se == pytest.approx(sd / math.sqrt(3))
    assert math.isnan(mean_stderr([1.0])[1])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--models", "nosuch"],
            "--models: nosuch is not in the sweep; valid: ffjord-toy, flows-nsf_toy",
        ),
        (["--budgets", "45"], "--budgets: 45 is not in the sweep; valid: 2, 4"),
        (["--data", "moons"], "--data: moons is not in the sweep; valid: 8gaussians"),
        (["--budgets", "abc"], "--budgets: 'abc' is not a comma-separated list of floats"),
        (["--sweep", "no/such.yaml"], "no/such.yaml"),
    ],
)
def test_bad_input_is_one_line_and_trains_nothing(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    sweep = _sweep(tmp_path)
    rc, out, err = run_script("bench_time_to_nll.py", ["--sweep", str(sweep), *args])
    line = assert_clean_failure(rc, err)
    assert needle in line
    assert "start [" not in out and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_budget_run_end_to_end(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, budgets=(2,), seeds=(0,), extra=", train.budget_warmup_iters: 5")
    args = ["--sweep", str(sweep), "--models", "flows-nsf_toy", "--json", str(tmp_path / "r.jsonl")]
    rc, out, err = run_script("bench_time_to_nll.py", args)
    assert rc == 0, err
    (run,) = plan(load_sweep(sweep))[1:]
    final = json.loads((run.run_dir / "final.json").read_text())
    assert final["budget_seconds"] == 2 and final["stop_reason"] == "budget"
    assert final["iterations"] == final["budget_iters"] > 5
    (rec,) = [json.loads(ln) for ln in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rec["test_nll"] == final["test_nll"] and rec["gap"] == final["gap"]
    assert f"{final['test_nll']:.4f}" in out
    # A second call reads the finished run back and trains nothing.
    rc, out2, _ = run_script("bench_time_to_nll.py", args)
    assert rc == 0 and "start [" not in out2 and f"{final['test_nll']:.4f}" in out2
