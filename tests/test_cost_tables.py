"""Likelihood-vs-cost tool (cnf/cost.py, experiments/cost_curve.py) and result tables
(cnf/tables.py, experiments/tables.py).

One tiny FFJORD toy model is trained in-process (module fixture, a few
seconds); the table tests write ``config.yaml`` + ``final.json`` files directly.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY, TOY_CONFIG, assert_clean_failure, run_script
from omegaconf import OmegaConf

from cnf.config import load_config
from cnf.cost import (
    CostGridError,
    cost_curve,
    describe_setting,
    load_cost_grid,
    normalize_cost_grid,
    parse_cost_grid,
)
from cnf.evaluation import sample_statistics
from cnf.models.base import EvalOutput, GenerativeModel, SampleOutput
from cnf.rundir import load_run
from cnf.tables import (
    TableSpecError,
    build_table,
    config_matches,
    load_table_spec,
    parse_table_spec,
)
from cnf.train.loop import Trainer

torch.set_num_threads(1)


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 8gaussians FFJORD run: 16-16 network, 50 iterations, 200 test points."""
    run_dir = tmp_path_factory.mktemp("cost") / "ffjord_8g"
    cfg = load_config(
        REPO / TOY_CONFIG,
        [
            *TINY,
            "train.iters=50",
            "train.batch_size=64",
            "train.ckpt_minutes=0",
            "model.solver.steps=4",
            "device=cpu",
            f"run.dir={run_dir}",
        ],
    )
    trainer = Trainer(cfg, progress=False, log=lambda _msg: None)
    trainer.prepare()
    assert trainer.train() == "finished"
    trainer.final_metrics()
    return run_dir


@pytest.fixture(scope="module")
def loaded(trained_run: Path):
    return load_run(trained_run, device="cpu")


# -------------------------------------------------------------- grid syntax
def test_parse_cost_grid_syntax() -> None:
    grid = parse_cost_grid("dopri5:tol=1e-1,1e-3;rk4:steps=2,4 ; default")
    assert grid == [
        {"method": "dopri5", "rtol": 0.1, "atol": 0.1},
        {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3},
        {"method": "rk4", "steps": 2},
        {"method": "rk4", "steps": 4},
        {},
    ]
    assert parse_cost_grid("dopri5:rtol=1e-3:atol=1e-5,1e-7") == [
        {"method": "dopri5", "rtol": 1e-3, "atol": 1e-5},
        {"method": "dopri5", "rtol": 1e-3, "atol": 1e-7},
    ]
    assert parse_cost_grid("sampler=em:steps=10,20") == [
        {"sampler": "em", "steps": 10},
        {"sampler": "em", "steps": 20},
    ]
    assert describe_setting(grid[1]) == "dopri5 tol=0.001"
    assert describe_setting({}) == "default"
    # YAML 1.1 reads 1e-3 as a string: numbers in strings are converted.
    assert normalize_cost_grid([{"method": "dopri5", "rtol": "1e-3"}]) == [
        {"method": "dopri5", "rtol": 1e-3}
    ]


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "dopri5;;rk4",
        "rk4:steps=",
        "rk4:steps=2,,4",
        "dopri5:tol=1e-3:rtol=1e-2",
        "rk4 steps=4",
        "steps=4:rk4",
        "rk4:steps=4;rk4:steps=4",
        "=3",
    ],
)
def test_parse_cost_grid_rejects(spec: str) -> None:
    with pytest.raises(CostGridError):
        parse_cost_grid(spec)


def test_sample_quality_on_data_itself() -> None:
    from cnf.data import build_dataset

    data = build_dataset("checkerboard", test_size=1000, val_size=10)
    fresh = data.sample_train(np.random.default_rng(7), 1000)
    q = sample_statistics(fresh, data, reference=data.test)
    assert abs(q["sample_mmd2"]) < 5e-3  # unbiased: two samples of one distribution ≈ 0
    assert q["sample_support_fraction"] == 1.0
    assert q["sample_data_logp"] == pytest.approx(-math.log(32.0))
    noise = np.random.default_rng(8).normal(size=(1000, 2))
    qn = sample_statistics(noise, data, reference=data.test)
    assert qn["sample_mmd2"] > 20 * abs(q["sample_mmd2"])
    assert qn["sample_support_fraction"] < 0.9


# ------------------------------------------------------------ cost curve
def test_nll_converges_and_nfe_grows(loaded) -> None:
    tols = (1e-1, 1e-2, 1e-3, 1e-5, 1e-7)
    grid = [{"method": "dopri5", "rtol": t, "atol": t} for t in tols]
    recs = cost_curve(loaded.model, loaded.data, grid=grid, num_samples=200)
    nll = [r["nll"] for r in recs]
    nfe = [r["eval_nfe"] for r in recs]
    assert all(a <= b for a, b in zip(nfe, nfe[1:])), nfe  # tighter tolerance, more NFE
    assert nfe[-1] > nfe[0]
    err = [abs(v - nll[-1]) for v in nll]
    assert err[-2] < 1e-3  # 1e-5 vs 1e-7: the solver error is gone
    assert err[-2] <= err[0] + 1e-4 and err[-2] <= err[1] + 1e-4  # shrinks as tol tightens
    # The reference is the most expensive setting; paired differences agree with the NLLs.
    assert recs[-1]["ref_label"] == "dopri5 tol=1e-07"
    for r in recs:
        assert r["objective"] == "nll" and r["objective_minus_ref"] == pytest.approx(
            r["nll"] - nll[-1], abs=1e-9
        )
        assert r["sample_nfe"] > 0 and r["sample_seconds"] > 0 and "sample_mmd2" in r
        assert 0 <= r["sample_support_fraction"] <= 1 and "sample_data_logp" in r
        assert r["gap"] == pytest.approx(r["nll"] - r["floor"])
        assert r["settings"]["solver.name"] == "dopri5" and r["num_points"] == 200


def test_common_random_numbers(loaded) -> None:
    hutch = {"method": "dopri5", "rtol": 1e-6, "atol": 1e-6, "divergence.name": "hutchinson"}
    grid = [hutch, {"method": "rk4", "steps": 8}]
    keys = ("nll", "nll_stderr", "eval_nfe", "sample_mmd2", "sample_data_logp", "sample_nfe")
    a = cost_curve(loaded.model, loaded.data, grid=grid, num_samples=200)
    b = cost_curve(loaded.model, loaded.data, grid=grid, num_samples=200)
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}
    # The same probes across settings: two tight tolerances differ by solver error
    # only, far below the Hutchinson noise that fresh probes would add.
    tighter = dict(hutch, rtol=1e-7, atol=1e-7)
    c = cost_curve(loaded.model, loaded.data, grid=[hutch, tighter], num_samples=0)
    assert abs(c[0]["nll"] - c[1]["nll"]) < 1e-3 < c[0]["nll_stderr"]


def test_default_setting_reproduces_final_json(loaded) -> None:
    rec = cost_curve(
        loaded.model,
        loaded.data,
        grid=[{}],
        num_samples=0,
        batch_size=loaded.cfg.eval.batch_size,
        seed=loaded.cfg.eval.seed,
    )[0]
    assert rec["nll"] == pytest.approx(loaded.final["test_nll"], abs=1e-9)
    assert rec["eval_nfe"] == loaded.final["test_nfe"]


@dataclass(frozen=True)
class _StepSettings:
    sampler: str = "em"
    steps: int = 10


class _GaussianNELBO(GenerativeModel):
    """A stand-in SDE-like family: N(0, I) that reports only a NELBO = NLL + 1/steps."""

    Settings = _StepSettings
    event_shape = (2,)

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.settings = _StepSettings()

    def evaluate(self, x, settings=None):
        steps = self._resolve(settings).steps
        noise = 1e-3 * torch.randn(len(x))  # stands in for probes / SDE noise (global RNG)
        nll = 0.5 * (x**2).sum(1) + math.log(2 * math.pi)
        return EvalOutput(nelbo=nll + 1.0 / steps + noise, stats={"nfe": steps})

    def sample(self, n, settings=None, *, generator=None):
        steps = self._resolve(settings).steps
        return SampleOutput(torch.randn(n, 2, generator=generator), {"nfe": steps})


def test_nelbo_family_and_crn_samples() -> None:
    from cnf.data import build_dataset

    data = build_dataset("8gaussians", test_size=300, val_size=10)
    grid = parse_cost_grid("sampler=em:steps=5,50")
    recs = cost_curve(_GaussianNELBO(), data, grid=grid, num_samples=300)
    assert [r["objective"] for r in recs] == ["nelbo", "nelbo"]
    assert "nll" not in recs[0] and "gap" not in recs[0]  # a bound is not compared to the floor
    assert recs[0]["nelbo"] - recs[1]["nelbo"] == pytest.approx(0.18, abs=1e-6)  # float32
    assert recs[0]["objective_minus_ref"] == pytest.approx(0.18, abs=1e-6)  # same noise
    assert recs[0]["eval_nfe"] == 5 and recs[1]["sample_nfe"] == 50
    # The same base noise for every setting: this model's samples ignore steps.
    assert recs[0]["sample_mmd2"] == recs[1]["sample_mmd2"]


def test_rejected_setting_is_a_grid_error(loaded) -> None:
    with pytest.raises(CostGridError, match="unknown solver method 'foo'"):
        cost_curve(loaded.model, loaded.data, grid=[{"method": "foo"}])


def test_cost_curve_cli_outputs(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cc"
    grid = tmp_path / "grid.yaml"
    grid.write_text("- {method: dopri5, rtol: 1.0e-2, atol: 1.0e-2}\n- {method: rk4, steps: 4}\n")
    rc, stdout, stderr = run_script(
        "cost_curve.py",
        [str(trained_run), str(trained_run), "--grid", str(grid), "--out", str(out)]
        + ["--num-test", "100", "--num-samples", "100"],
    )
    assert rc == 0, stderr
    lines = (out / "cost_curve.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    assert len(recs) == 4  # 2 runs (same folder twice) x 2 settings
    assert {r["family"] for r in recs} == {"ffjord"} and {r["dataset"] for r in recs} == {
        "8gaussians"
    }
    assert recs[0]["setting"] == {"method": "dopri5", "rtol": 0.01, "atol": 0.01}
    assert "0.1, 0.5, 1, 2" in recs[0]["mmd_kernel"]
    assert recs[0]["nll"] == recs[2]["nll"]  # same model, same numbers (CRN)
    assert (out / "cost_curve.png").stat().st_size > 10_000
    md = (out / "cost_curve.md").read_text()
    assert "| dopri5 tol=0.01 |" in md and "| rk4 steps=4 |" in md and "MMD" in md
    assert "| dopri5 tol=0.01 |" in stdout


@pytest.mark.parametrize("text", ["missing.yaml", "BAD_LIST", "BAD_YAML", "BAD_VALUE"])
def test_load_cost_grid_file_errors(tmp_path: Path, text: str) -> None:
    contents = {
        "BAD_LIST": "method: rk4\nsteps: 4\n",  # a mapping, not a list of settings
        "BAD_YAML": "- {method: rk4\n",
        "BAD_VALUE": "- {method: rk4, steps: [4, 8]}\n",
    }
    if text in contents:
        path = tmp_path / "grid.yaml"
        path.write_text(contents[text])
        text = str(path)
    with pytest.raises(CostGridError, match="grid file"):
        load_cost_grid(text)


@pytest.mark.parametrize("grid", ["dopri5;;rk4", "foo:steps=2"])
def test_cost_curve_cli_bad_grid(trained_run: Path, tmp_path: Path, grid: str) -> None:
    """A malformed spec, and a setting the model rejects: one error line, exit 2, nothing written."""
    out = tmp_path / "never"
    rc, _, stderr = run_script(
        "cost_curve.py", [str(trained_run), "--grid", grid, "--out", str(out)]
    )
    line = assert_clean_failure(rc, stderr)
    assert "grid group 2 is empty" in line or "unknown solver method 'foo'" in line
    assert not out.exists()


# ------------------------------------------------------------------ tables
def _fake_run(
    root: Path,
    name: str,
    *,
    data: str,
    kinetic: float,
    seed: int,
    nll: float | None,
    entropy: float,
    floor: float | None = None,
) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = {
        "seed": seed,
        "data": {"name": data},
        "model": {"family": "ffjord", "kinetic": kinetic, "jacobian": kinetic},
        "train": {"iters": 100},
    }
    OmegaConf.save(OmegaConf.create(cfg), d / "config.yaml")
    if nll is not None:
        floor = entropy if floor is None else floor
        final = {
            "iterations": 100,
            "test_nll": nll,
            "entropy": entropy,
            "floor": floor,
            "gap": nll - floor,
            "dataset": data,
        }
        (d / "final.json").write_text(json.dumps(final))
    else:
        (d / "metrics.jsonl").write_text('{"iter": 10}\n{"iter": 40}\n')
    return d


@pytest.fixture
def fake_runs(tmp_path: Path) -> Path:
    """A toy sweep in the sweep's layout, with gaps: some seeds missing, one unfinished."""
    sweep = tmp_path / "runs" / "sweeps" / "ffjord_toy"
    h8, hc, f8 = 2.8319, math.log(32), 2.8117  # f8: the floor of the 8gaussians test points
    for s, v in enumerate((3.0, 3.1, 3.2)):
        _fake_run(
            sweep, f"a8_s{s}", data="8gaussians", kinetic=0.0, seed=s, nll=v, entropy=h8, floor=f8
        )
    for s, v in enumerate((3.6, 3.8)):
        _fake_run(sweep, f"ac_s{s}", data="checkerboard", kinetic=0.0, seed=s, nll=v, entropy=hc)
    _fake_run(sweep, "ac_s2", data="checkerboard", kinetic=0.0, seed=2, nll=None, entropy=hc)
    _fake_run(
        sweep, "b8_s0", data="8gaussians", kinetic=0.01, seed=0, nll=2.9, entropy=h8, floor=f8
    )
    (sweep / "not_a_run").mkdir()
    return tmp_path / "runs"


def _spec(tmp_path: Path, **extra) -> Path:
    spec = {
        "name": "toy_test",
        "title": "toy test",
        "metrics": [{"key": "test_nll", "label": "test NLL", "better": "lower"}, "gap"],
        "columns": ["8gaussians", "checkerboard"],
        "rows": [
            {
                "label": "FFJORD",
                "sweep": "ffjord_toy",
                "select": {"model.family": "ffjord", "model.kinetic": 0},
                "seeds": [0, 1, 2],
            },
            {
                "label": "FFJORD + RNODE",
                "sweep": "ffjord_toy",
                "select": {"model.kinetic": 0.01},
                "seeds": [0, 1, 2],
            },
        ],
        "references": [
            {
                "label": "floor",
                "status": "measured",
                "from_runs": {"test_nll": "floor"},
                "values": {"8gaussians": {"gap": 0.0}},
            },
            {
                "label": "Paper_X",
                "status": "confirmed",
                "source": "Table 9",
                "values": {
                    "8gaussians": 3.05,
                    "checkerboard": {"test_nll": {"value": 3.61, "status": "unverified"}},
                },
            },
        ],
        **extra,
    }
    path = tmp_path / "spec.yaml"
    OmegaConf.save(OmegaConf.create(spec), path)
    return path


def test_config_matches() -> None:
    cfg = {"model": {"family": "ffjord", "kinetic": 0.0, "hidden_dims": [16, 16]}, "seed": 1}
    assert config_matches(cfg, {"model.kinetic": 0, "model.family": "ffjord"})
    assert config_matches(cfg, {"model.hidden_dims": [16, 16], "seed": {"in": [0, 1]}})
    assert not config_matches(cfg, {"model.kinetic": 0.01})
    assert not config_matches(cfg, {"model.nope": 0})
    assert not config_matches(cfg, {"seed": True})


def test_build_table_aggregates(fake_runs: Path, tmp_path: Path) -> None:
    spec = parse_table_spec(OmegaConf.to_container(OmegaConf.load(_spec(tmp_path))))
    table = build_table(spec, fake_runs)
    c = table.cells[("FFJORD", "8gaussians", "test_nll")]
    assert (c.n, c.mean, c.std) == (3, pytest.approx(3.1), pytest.approx(0.1))
    c = table.cells[("FFJORD", "checkerboard", "test_nll")]
    assert (c.n, c.mean) == (2, pytest.approx(3.7))  # the unfinished seed is not counted
    assert table.cells[("FFJORD + RNODE", "checkerboard", "gap")].mean is None
    floor = table.cells[("floor", "checkerboard", "test_nll")]
    assert floor.mean == pytest.approx(math.log(32)) and floor.mark == "‡"
    assert table.cells[("Paper_X", "checkerboard", "test_nll")].mark == "†"
    assert table.cells[("Paper_X", "8gaussians", "test_nll")].mark == ""
    assert table.cells[("FFJORD + RNODE", "8gaussians", "test_nll")].bold  # 2.9 < 3.1
    missing = "\n".join(table.missing)
    assert "FFJORD + RNODE × 8gaussians: no run folder for seed(s) 1, 2" in missing
    assert "FFJORD + RNODE × checkerboard: no run folder" in missing
    assert len(table.unfinished) == 1 and "ac_s2" in table.unfinished[0]
    assert "last logged iteration 40 of 100" in table.unfinished[0]


def test_a_cell_whose_runs_differ_in_an_unselected_value_is_warned_about(
    fake_runs: Path, tmp_path: Path
) -> None:
    spec = parse_table_spec(OmegaConf.to_container(OmegaConf.load(_spec(tmp_path))))
    assert not [w for w in build_table(spec, fake_runs).warnings if "differ in" in w]
    cfg_path = fake_runs / "sweeps" / "ffjord_toy" / "a8_s1" / "config.yaml"
    cfg = OmegaConf.load(cfg_path)
    cfg.train.iters = 50
    cfg.eval = {"solver": {"rtol": 1e-3}}
    OmegaConf.save(cfg, cfg_path)
    warnings = [w for w in build_table(spec, fake_runs).warnings if "differ in" in w]
    assert len(warnings) == 1  # only the FFJORD × 8gaussians cell mixes them
    assert warnings[0].startswith("FFJORD × 8gaussians: the 3 runs differ in")
    assert "train.iters (100, 50)" in warnings[0] and "eval.solver.rtol" in warnings[0]
    assert "seed" not in warnings[0]  # seeds are meant to differ


def test_metric_warnings_only_for_partial_absence(fake_runs: Path, tmp_path: Path) -> None:
    # No run has a NELBO: the cells are "—" without a warning. One seed without
    # its NLL (a broken final.json) is warned about.
    spec = _spec(tmp_path, metrics=["test_nll", "gap", "test_nelbo"])
    spec = parse_table_spec(OmegaConf.to_container(OmegaConf.load(spec)))
    run = fake_runs / "sweeps" / "ffjord_toy" / "a8_s1"
    final = json.loads((run / "final.json").read_text())
    final["test_nll"] = float("nan")
    (run / "final.json").write_text(json.dumps(final))
    table = build_table(spec, fake_runs)
    assert table.cells[("FFJORD", "8gaussians", "test_nelbo")].mean is None
    assert not [w for w in table.warnings if "test_nelbo" in w]
    assert [w for w in table.warnings if "'test_nll' absent or not finite in 1 of 3" in w]


def test_tables_cli(fake_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, stdout, stderr = run_script(
        "tables.py", [str(_spec(tmp_path)), "--runs-root", str(fake_runs), "--out", str(out)]
    )
    assert rc == 0, stderr
    md = (out / "toy_test.md").read_text()
    tex = (out / "toy_test.tex").read_text()
    assert "| FFJORD | 3.100 ± 0.100 (n=3) |" in md
    assert "3.610†" in md and "† unverified" in md
    assert "2.812‡" in md and "‡ measured" in md
    assert "missing (no run folder)" in md and "unfinished" in md and "ac_s2" in md
    assert md in stdout and "1 unfinished" in stdout
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"$3.100 \pm 0.100$ {\scriptsize(3)}" in tex
    assert r"$3.610^\dagger$" in tex and r"\multicolumn{2}{c}{8gaussians}" in tex
    assert "Paper\\_X" in tex  # LaTeX specials escaped


def test_shipped_ffjord_toy_spec(fake_runs: Path, tmp_path: Path) -> None:
    rc, stdout, stderr = run_script(
        "tables.py",
        [
            "configs/tables/ffjord_toy.yaml",
            "--runs-root",
            str(fake_runs),
            "--out",
            str(tmp_path / "t"),
        ],
    )
    assert rc == 0, stderr
    assert "| FFJORD | 3.100 ± 0.100 (n=3) |" in stdout
    assert "| original FFJORD code, 1000 iterations | 3.067‡ |" in stdout
    assert "| floor of the test points | 2.812‡ | 0.000‡ | 3.466‡ | 0.000‡ |" in stdout
    assert (tmp_path / "t" / "ffjord_toy.tex").is_file()


MALFORMED_SPECS = [
    "name: t\ncolumns: [a]\nrows: [{label: r}]\nbogus: 1\n",
    "name: t\ncolumns: [a]\nrows: {label: r}\n",
    "name: t\ncolumns: [a]\nrows: [{label: r}]\n"
    "references: [{label: p, status: maybe, values: {a: 1}}]\n",
    "name: t\ncolumns: [a]\nrows: [{label: r}]\n"
    "references: [{label: p, status: confirmed, values: {b: 1}}]\n",
    "name: t\ncolumns: [a]\nrows: [{label: r, seeds: [x]}]\n",
    "name: t\ncolumns: [a]\nrows: [{label: r, runs: ../elsewhere}]\n",
    "name: t\ncolumns: []\nrows: [{label: r}]\n",
    "name: [t\n",
    None,  # no file
]


@pytest.mark.parametrize("content", MALFORMED_SPECS)
def test_load_table_spec_rejects(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "spec.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TableSpecError, match="table spec") as info:
        load_table_spec(path)
    assert "\n" not in str(info.value)


def test_tables_cli_malformed_spec(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(MALFORMED_SPECS[0])
    rc, _, stderr = run_script("tables.py", [str(path), "--out", str(tmp_path / "o")])
    line = assert_clean_failure(rc, stderr)
    assert "unknown config key 'bogus'" in line
    assert not (tmp_path / "o").exists()


def test_parse_table_spec_messages() -> None:
    with pytest.raises(TableSpecError, match=r"rows\[0\]\.select\.model\.kinetic"):
        parse_table_spec(
            {
                "name": "t",
                "columns": ["a"],
                "rows": [{"label": "r", "select": {"model.kinetic": {"x": 1}}}],
            }
        )
    with pytest.raises(TableSpecError, match="unknown config key 'lable'"):
        parse_table_spec({"name": "t", "columns": ["a"], "rows": [{"lable": "r"}]})


# ------------------------------------------------ cost-curve rows: the digits quality table
def _quality_run(root: Path, name: str, model: dict, final: dict, records: list[dict]) -> Path:
    d = root / "digits_quality" / name
    d.mkdir(parents=True)
    cfg = {
        "seed": 0,
        "data": {"name": "digits"},
        "model": model,
        "train": {"iters": 1000, "batch_size": 128},
    }
    OmegaConf.save(OmegaConf.create(cfg), d / "config.yaml")
    (d / "final.json").write_text(json.dumps({"iterations": 1000, **final}))
    if records:
        (d / "cost_curve-0123abcd").mkdir()
        lines = [
            json.dumps({"run_dir": f"runs/digits_quality/{name}", "iteration": 1000, **r})
            for r in records
        ]
        (d / "cost_curve-0123abcd" / "cost_curve.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _record(
    sampler: str, grid: str, steps: int, nfe: int, fid: float, sigma_max: float | None = None
) -> dict:
    setting = {"sampler": sampler, "grid": grid, "steps": steps}
    if sigma_max is not None:
        setting["sigma_max"] = sigma_max
    return {
        "setting": setting,
        "settings": {"sigma_max": 80.0, **setting, "solver.name": "dopri5"},
        "label": describe_setting(setting),
        "bpd": 1.9,
        "fid": fid,
        "kid": fid / 100,
        "fid_nfe": float(nfe),
        "fid_data": 0.3,
        "kid_data": 0.001,
        "fid_info": {"features": "digits"},
    }


VP_DDPMPP = "Score SDE VP, DDPM++ (variance weighting)"
VP_LIK = "VP score SDE, U-Net (likelihood weighting)"


def test_shipped_digits_quality_spec_reads_cost_curve_records(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    score = {"family": "score", "sde": {"name": "vp"}, "weighting": "variance"}
    heun = [_record("heun", "karras", n, 2 * n - 1, 10.0 / n) for n in (5, 10, 25)]
    euler = [_record("euler", "uniform", n, n, 40.0 / n) for n in (10, 20, 50, 100)]
    # Heun with the grid's sigma_max at the data's diameter: rows of their own.
    narrow = [_record("heun", "karras", n, 2 * n - 1, 1.0 / n, sigma_max=9) for n in (5, 10)]
    _quality_run(runs, "score_ddpmpp_vp", score, {"test_bpd": 1.9}, heun + euler + narrow)
    # The likelihood-weighted VP run has rows of its own: its records never enter these.
    lik = {**score, "weighting": "likelihood_is"}
    lik_records = [_record("heun", "karras", n, 2 * n - 1, 99.0) for n in (5, 10, 25, 50)]
    _quality_run(runs, "score_vp", lik, {"test_bpd": 2.6}, lik_records)
    flow = {"family": "flow", "flow": {"name": "realnvp"}}
    _quality_run(runs, "realnvp", flow, {"test_bpd": 2.5, "fid": 7.0, "kid": 0.07}, [])
    # A finished INDM run without records is listed as unfinished, not silently missing.
    _quality_run(runs, "indm", {"family": "indm"}, {"test_nelbo": 1.0}, [])
    # A stale record (from an earlier iteration) is skipped with a warning.
    stale = _quality_run(runs, "otcfm", {"family": "fm", "pairing": {"name": "ot"}}, {}, [])
    (stale / "cost_curve-x").mkdir()
    rec = {**_record("heun", "karras", 5, 9, 1.0), "run_dir": str(stale), "iteration": 500}
    (stale / "cost_curve-x" / "cost_curve.jsonl").write_text(json.dumps(rec) + "\n")

    spec = load_table_spec(REPO / "configs/tables/digits_quality.yaml")
    assert [c.label for c in spec.columns] == ["10 NFE", "20 NFE", "50 NFE", "100 NFE"]
    assert [m.key for m in spec.metrics] == ["bpd", "fid", "kid"]
    table = build_table(spec, runs)
    for col, n in zip(("10 NFE", "20 NFE", "50 NFE", "100 NFE"), (5, 10, 25, 50)):
        heun_cell = table.cells[(f"{VP_DDPMPP}, Heun (EDM grid, σ_max 80)", col, "fid")]
        assert heun_cell.mean == (10.0 / n if n < 50 else None)
        narrow_cell = table.cells[(f"{VP_DDPMPP}, Heun (EDM grid, σ_max 9)", col, "fid")]
        assert narrow_cell.mean == (1.0 / n if n < 25 else None)
        assert table.cells[(f"{VP_DDPMPP}, Euler (uniform grid)", col, "fid")].mean == 20.0 / n
        assert table.cells[(f"{VP_LIK}, Heun (EDM grid, σ_max 80)", col, "fid")].mean == 99.0
        # A final.json row (one sampling setting) stands in every column.
        assert table.cells[("RealNVP (1 pass)", col, "fid")].mean == 7.0
        assert table.cells[("RealNVP (1 pass)", col, "bpd")].mean == 2.5
        assert table.cells[("held-out test images", col, "fid")].mean == 0.3
    assert any(
        m.startswith(f"{VP_DDPMPP}, Heun (EDM grid, σ_max 80) × 100 NFE: no cost-curve record")
        for m in table.missing
    )
    assert any("Rectified flow" in m and "no run folder" in m for m in table.missing)
    for family in ("INDM", "OT-CFM"):  # no records, or only stale ones
        assert any(family in u and "no cost-curve records" in u for u in table.unfinished)
    assert any("stale" in w for w in table.warnings)

    rc, stdout, stderr = run_script(
        "tables.py",
        ["configs/tables/digits_quality.yaml", "--runs-root", str(runs), "--out", str(tmp_path)],
    )
    assert rc == 0, stderr
    assert f"| {VP_DDPMPP}, Heun (EDM grid, σ_max 80) | **1.900** (n=1) | 2.00 (n=1) |" in stdout
    assert f"| {VP_DDPMPP}, Heun (EDM grid, σ_max 9) | **1.900** (n=1) | **0.20** (n=1) |" in stdout
    assert "| RealNVP (1 pass) | 2.500 (n=1) | 7.00 (n=1) | 0.070 (n=1) | 2.500 (n=1) |" in stdout
    assert "DiffFlow (SDE sampler) × 10 NFE: no run folder" in stdout
    assert (tmp_path / "digits_quality.tex").is_file()
