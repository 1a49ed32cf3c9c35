"""Validation-driven training, wall-clock budgets, the tabular table and sweep.

* :class:`cnf.train.plateau.Plateau` takes exactly the decisions of FFJORD's
  ``train_tabular.py`` (re-implemented here from its logic: a global number of
  drops, the learning rate reset on every validation, the stop checked before
  the next iteration) on random sequences with ties and NaNs.
* In a training run with scripted validation values: the learning rate drops
  at the right iterations (and takes effect at the next step), training stops
  early at the right one, ``best.pt`` holds the weights of the best validation
  (the EMA weights the run evaluates), the test evaluation uses them and
  ``final.json`` says which iteration was restored and its validation NLL;
  ``cnf.rundir.load_run`` reloads the same weights.
* Resume after a stop between validations is exact with the new state (best
  value, counters, drops, early stop) in the checkpoint.
* ``train.budget_seconds`` with a fake clock: the count is the one the
  warm-up's timing gives, the schedule spans it, it is stored, and a run
  resumed on a ten times slower clock ends at the same count with the same
  metrics.
* The tabular sweep fills every cell of the tabular table.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO
from omegaconf import OmegaConf

from cnf.config import ConfigError, load_config
from cnf.evaluation import evaluate_points, summarize
from cnf.rundir import RunDir, load_run
from cnf.train.loop import Trainer
from cnf.train.plateau import Plateau

TINY_FLOW = (
    "model.flow.num_layers=2",
    "model.flow.hidden_features=8",
    "data.test_size=64",
    "data.val_size=64",
    "eval.num_samples=0",
    "eval.batch_size=64",
    "eval.plots=false",
    "track.wandb=disabled",
    "train.batch_size=32",
    "train.log_every=1",
    "train.warmup_iters=0",
    "device=cpu",
)
FLOW_CONFIG = REPO / "configs" / "flows" / "realnvp_toy.yaml"


# ------------------------------------------------------------- the rule itself
def original_rule(values: list[float], *, early_stopping: int = 30) -> list[tuple[int, bool]]:
    """FFJORD's train_tabular.py logic: (number of lr drops, stopped) after each validation."""
    ndecs, best, bad, out = 0, math.inf, 0, []
    for v in values:
        if v < best:
            best, bad = v, 0
        else:
            bad += 1
        if ndecs == 0 and bad > early_stopping // 3:
            ndecs = 1
        elif ndecs == 1 and bad > early_stopping // 3 * 2:
            ndecs = 2
        out.append((ndecs, early_stopping > 0 and bad > early_stopping))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_plateau_takes_the_original_scripts_decisions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # A slowly improving, noisy, plateauing curve with exact ties and NaNs.
    values = list(np.round(3 - np.log1p(np.arange(120)) * 0.3 + rng.normal(0, 0.2, 120), 1))
    values = [math.nan if rng.random() < 0.05 else v for v in values]
    p = Plateau(drop_after=(10, 20), stop_after=30)
    got = []
    for i, v in enumerate(values):
        improved = p.update(v, i)
        assert improved == (p.bad == 0)
        got.append((p.drops, p.stopped))
        if p.stopped:
            break
    want = original_rule(values)[: len(got)]
    assert got == want
    assert got[-1][1] == any(s for _, s in original_rule(values))
    finite = [v for v in values[: len(got)] if not math.isnan(v)]
    assert p.best == min(finite) and values[p.best_iteration] == p.best


def test_plateau_state_round_trip() -> None:
    p = Plateau(drop_after=(1,), stop_after=3)
    for i, v in enumerate([2.0, 1.0, 1.5, 1.5]):
        p.update(v, i)
    q = Plateau(drop_after=(1,), stop_after=3)
    q.load_state_dict(json.loads(json.dumps(p.state_dict())))
    assert q == p


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lr_drop_after=[3]"], "train.lr_drop_after: needs validation"),
        (
            ["train.val_every=5", "train.lr_drop_after=[3,3]"],
            "train.lr_drop_after: must be increasing",
        ),
        (["train.val_every=5", "train.lr_drop_factor=1.5"], "train.lr_drop_factor"),
        (["train.keep_best=true"], "train.keep_best: needs validation"),
        (["train.budget_warmup_iters=1"], "train.budget_warmup_iters"),
        (["train.budget_warmup_fraction=1.5"], "train.budget_warmup_fraction"),
        (["train.budget_replans=-1"], "train.budget_replans"),
    ],
)
def test_bad_training_control_keys_are_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(FLOW_CONFIG, [*overrides, "run.dir=/nonexistent/run"])
    assert message in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------- the loop with scripted values
SCRIPT = {2: 5.0, 4: 4.0, 6: 4.5, 8: 4.0, 10: 3.9, 12: 4.2, 14: 4.3, 16: 4.4, 18: 3.0}


def scripted_trainer(run_dir: Path, *extra: str, script: dict[int, float] = SCRIPT) -> Trainer:
    """A tiny RealNVP run whose validation NLLs are ``script[iteration]``; keeps each weight set."""
    cfg = load_config(
        FLOW_CONFIG,
        [
            *TINY_FLOW,
            "train.iters=40",
            "train.schedule=constant",
            "train.val_every=2",
            "train.lr_drop_after=[0,1]",
            "train.early_stop_after=2",
            "train.keep_best=true",
            "train.ckpt_every=1000",
            f"run.dir={run_dir}",
            *extra,
        ],
    )
    trainer = Trainer(cfg, progress=False, log=lambda _m: None)
    trainer.seen = {}
    real = trainer.evaluate_split

    def evaluate_split(x: np.ndarray, *, prefix: str, settings: Any = None) -> dict[str, Any]:
        out = real(x, prefix=prefix, settings=settings)
        if prefix == "val_":
            trainer.seen[trainer.iteration] = {
                k: v.clone() for k, v in trainer.eval_model.state_dict().items()
            }
            out["val_nll"] = script[trainer.iteration]
        return out

    trainer.evaluate_split = evaluate_split
    return trainer


def records(run_dir: Path) -> list[dict[str, Any]]:
    drop = {"sec_per_iter", "train_seconds"}
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]


def test_drops_early_stop_and_best_restore(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trainer = scripted_trainer(run_dir)
    trainer.prepare()
    assert trainer.train() == "finished"
    # Validations at 2, 4, ...: 5.0 (best), 4.0 (best), 4.5 (bad 1 > 0: drop 1),
    # 4.0 (tie, bad 2 > 1: drop 2), 3.9 (best), 4.2, 4.3, 4.4 (bad 3 > 2: stop at 16).
    assert trainer.iteration == 16 and trainer.plateau.stopped
    assert trainer.plateau.best == 3.9 and trainer.plateau.best_iteration == 10
    lr = {r["iter"]: r["lr"] for r in records(run_dir) if "loss" in r}
    base = trainer.cfg.train.lr
    # The lr logged at iteration i is the one of step i + 1; a drop after the
    # validation at i applies from step i + 1, so it shows from record i + 1 on.
    assert lr[6] == pytest.approx(base) and lr[7] == pytest.approx(0.1 * base)
    assert lr[8] == pytest.approx(0.1 * base) and lr[9] == pytest.approx(0.01 * base)
    assert lr[16] == pytest.approx(0.01 * base)
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.01 * base)

    best = RunDir(run_dir).load_best()
    assert best["iteration"] == 10 and best["metric"] == "val_nll" and best["value"] == 3.9
    for k, v in trainer.seen[10].items():
        assert torch.equal(best["weights"][k], v), k  # the EMA weights of iteration 10
    assert any(not torch.equal(v, trainer.seen[16][k]) for k, v in trainer.seen[10].items())

    final = trainer.final_metrics()
    assert final["restored_iteration"] == 10 and final["restored_val_nll"] == 3.9
    assert final["stop_reason"] == "early_stopping" and final["iterations"] == 16
    assert final["lr_drops"] == 2 and final["best_val_iteration"] == 10
    # The test NLL is that of the restored weights, and load_run reloads them.
    model = load_run(run_dir).model
    for k, v in trainer.seen[10].items():
        assert torch.equal(model.state_dict()[k], v), k
    again = summarize(
        evaluate_points(model, trainer.data.test, trainer.data, batch_size=64, seed=1234),
        trainer.data,
        prefix="test_",
    )
    assert again["test_nll"] == pytest.approx(final["test_nll"], rel=1e-7)
    assert load_run(run_dir).restored_iteration == 10


def test_a_run_ending_by_its_count_validates_its_last_iteration(tmp_path: Path) -> None:
    script = {2: 5.0, 4: 6.0, 5: 4.0}
    trainer = scripted_trainer(
        tmp_path / "run", "train.iters=5", "train.early_stop_after=0", script=script
    )
    trainer.prepare()
    trainer.train()
    assert sorted(trainer.seen) == [2, 4, 5] and trainer.plateau.best_iteration == 5
    assert trainer.final_metrics()["restored_iteration"] == 5


def test_resume_between_validations_is_exact(tmp_path: Path) -> None:
    ref = scripted_trainer(tmp_path / "ref")
    ref.prepare()
    ref.train()
    ref_final = ref.final_metrics()

    run_dir = tmp_path / "run"
    first = scripted_trainer(run_dir)
    first.prepare()
    log = first._log

    def stop_at_nine(record: dict[str, Any], step: int) -> None:
        log(record, step)
        if step == 9 and "loss" in record:  # after 2 drops, before the best (10)
            first.request_stop("test")

    first._log = stop_at_nine
    assert first.train() == "interrupted" and first.iteration == 9
    assert first.plateau.drops == 2 and first.plateau.best == 4.0

    second = scripted_trainer(run_dir)
    assert second.resuming
    second.prepare()
    assert second.iteration == 9 and second.plateau.state_dict() == first.plateau.state_dict()
    assert second.train() == "finished"
    final = second.final_metrics()
    assert records(run_dir) == records(tmp_path / "ref")
    for key in ("test_nll", "restored_iteration", "restored_val_nll", "iterations", "lr_drops"):
        assert final[key] == ref_final[key], key
    a, b = RunDir(run_dir).load_best(), RunDir(tmp_path / "ref").load_best()
    assert a["iteration"] == b["iteration"] == 10
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


def test_val_every_cannot_change_on_resume_when_it_drives_training(tmp_path: Path) -> None:
    from cnf.rundir import RunFolderError

    trainer = scripted_trainer(tmp_path / "run", "train.iters=2")
    trainer.prepare()
    trainer.train()
    with pytest.raises(RunFolderError, match="train.val_every=2"):
        scripted_trainer(tmp_path / "run", "train.iters=2", "train.val_every=4")


def test_val_settings_are_the_evaluation_settings_changed(tmp_path: Path) -> None:
    cfg = load_config(
        REPO / "configs" / "ffjord" / "toy.yaml",
        [
            "train.val_settings={divergence: {name: hutchinson, probe: gaussian}}",
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg, progress=False, log=lambda _m: None)
    assert trainer.val_settings.divergence.name == "hutchinson"
    assert trainer.val_settings.solver == trainer.eval_model.settings.solver
    assert trainer.eval_model.settings.divergence.name == "auto"  # the test's own: unchanged


# ------------------------------------------------------------------- budget
class FakeClock:
    """``seconds[k]`` is the length of iteration k + 1 (the last repeats); scaled by ``slow``."""

    def __init__(self, seconds: list[float], slow: float = 1.0):
        self.seconds, self.slow, self.calls, self.now = seconds, slow, 0, 0.0

    def __call__(self) -> float:
        # The loop reads the clock twice per iteration: at its start and at its end.
        if self.calls % 2 == 1:
            k = min(self.calls // 2, len(self.seconds) - 1)
            self.now += self.seconds[k] * self.slow
        self.calls += 1
        return self.now


BUDGET = ("train.budget_seconds=2.5", "train.budget_warmup_iters=5", "train.schedule=cosine")


def stop_at(trainer: Trainer, step: int) -> None:
    """Make ``trainer`` ask to stop (checkpoint and return) once it has logged ``step``."""
    log = trainer._log

    def logging_then_stopping(record: dict[str, Any], at: int) -> None:
        log(record, at)
        if at == step:
            trainer.request_stop("test")

    trainer._log = logging_then_stopping


def budget_trainer(run_dir: Path, clock: FakeClock, *extra: str) -> Trainer:
    cfg = load_config(
        FLOW_CONFIG,
        [
            *TINY_FLOW,
            "train.iters=1000",
            "train.ckpt_every=1000",
            *BUDGET,
            f"run.dir={run_dir}",
            *extra,
        ],
    )
    return Trainer(cfg, progress=False, log=lambda _m: None, clock=clock)


def test_budget_fixes_the_count_from_the_warm_up(tmp_path: Path) -> None:
    # Iteration 1 pays one-off costs (1 s), the others 0.125 s: after 5 iterations
    # 1.5 s are spent at 0.125 s per iteration (iterations 2-5), so 1.0 s buys 8 more.
    trainer = budget_trainer(tmp_path / "run", FakeClock([1.0, 0.125]))
    trainer.prepare()
    assert trainer.planned_iters is None
    assert trainer.train() == "finished"
    assert trainer.budget["iters"] == 13 == trainer.iteration
    assert trainer.train_seconds == pytest.approx(2.5)
    lr = [r["lr"] for r in records(tmp_path / "run") if "loss" in r]
    base = trainer.cfg.train.lr
    # Held at progress 0 until the count is known, then cosine over 13 iterations.
    assert lr[:4] == [pytest.approx(base)] * 4
    for it in range(5, 14):
        assert lr[it - 1] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * it / 13)))
    final = trainer.final_metrics()
    assert final["budget_seconds"] == 2.5 and final["budget_iters"] == 13
    assert final["budget_spent_seconds"] == pytest.approx(2.5) and final["stop_reason"] == "budget"
    from cnf.tables import read_run_folder

    assert read_run_folder(tmp_path / "run").final is not None  # finished, not stale
    assert RunDir(tmp_path / "run").load_checkpoint()["budget"]["iters"] == 13


def test_budget_warm_up_lasts_its_fraction_of_the_budget(tmp_path: Path) -> None:
    # 80% of 2.5 s = 2.0 s: reached after iteration 9 (1 + 8 x 0.125 s), not 5; the
    # count is fitted there (0.125 s per iteration, 0.5 s left: 4 more) and the
    # schedule is held at progress 0 until then.
    trainer = budget_trainer(
        tmp_path / "run", FakeClock([1.0, 0.125]), "train.budget_warmup_fraction=0.8"
    )
    trainer.prepare()
    assert trainer.train() == "finished" and trainer.budget["iters"] == 13 == trainer.iteration
    lr = [r["lr"] for r in records(tmp_path / "run") if "loss" in r]
    base = trainer.cfg.train.lr
    assert lr[:8] == [pytest.approx(base)] * 8
    for it in range(9, 14):
        assert lr[it - 1] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * it / 13)))
    # A slow start is not extrapolated: 3 s for iteration 1 and 0.5 s later, with
    # 20% of 10 s as warm-up, fixes the count after iteration 5 at 5 + floor(5 / 0.5).
    slow = budget_trainer(
        tmp_path / "slow",
        FakeClock([3.0, 0.5]),
        "train.budget_seconds=10",
        "train.budget_warmup_fraction=0.2",
    )
    slow.prepare()
    slow.train()
    assert slow.budget["iters"] == 15 == slow.iteration


def test_budget_is_capped_by_train_iters_and_a_frozen_clock(tmp_path: Path) -> None:
    trainer = budget_trainer(tmp_path / "run", FakeClock([0.0]), "train.iters=9")
    trainer.prepare()
    trainer.train()
    assert trainer.budget["iters"] == 9 == trainer.iteration


# Iteration 1 pays 1 s, iterations 2-5 (the warm-up) 0.125 s, every later one
# 0.25 s: the cost doubles after the count is fitted, as an adaptive solver's
# NFE grows (binary fractions: the clock's sums are exact).
SLOWING = [1.0, 0.125, 0.125, 0.125, 0.125, 0.25]
SLOWING_BUDGET = "train.budget_seconds=5"


def test_budget_fixed_once_overruns_when_iterations_slow_down(tmp_path: Path) -> None:
    # Fitted after 5 iterations (1.5 s) at 0.125 s each: 28 more for the 3.5 s
    # left, which then cost 7 s: 8.5 s spent of a 5 s budget.
    trainer = budget_trainer(tmp_path / "run", FakeClock(SLOWING), SLOWING_BUDGET)
    trainer.prepare()
    trainer.train()
    assert trainer.budget["iters"] == 33 == trainer.iteration
    assert trainer.train_seconds == 8.5
    assert trainer.final_metrics()["budget_replans"] == 0


def test_budget_replans_follow_slower_iterations(tmp_path: Path) -> None:
    # The same run with 4 re-fits: the first comes 28 / 5 iterations after the
    # fit, at iteration 11 (3 s spent, 0.25 s per iteration since iteration 5),
    # and re-fits the count to 11 + 2 / 0.25 = 19; the later ones keep it.
    run = tmp_path / "run"
    trainer = budget_trainer(run, FakeClock(SLOWING), SLOWING_BUDGET, "train.budget_replans=4")
    trainer.prepare()
    trainer.train()
    assert trainer.budget["iters"] == 19 == trainer.iteration
    assert trainer.train_seconds == 5.0
    final = trainer.final_metrics()
    assert final["budget_replans"] == 4 and final["budget_iters"] == 19
    # The cosine schedule spans the count in force: 33 until iteration 11, then 19.
    lr = [r["lr"] for r in records(run) if "loss" in r]
    base = trainer.cfg.train.lr
    for it in range(5, 11):
        assert lr[it - 1] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * it / 33)))
    for it in range(11, 20):
        assert lr[it - 1] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * it / 19)))


def test_budget_replans_spend_what_a_lighter_load_frees(tmp_path: Path) -> None:
    # A warm-up slowed by load (0.25 s per iteration) that then lifts (0.0625 s):
    # fixed once, the count is 5 + 1.25 / 0.25 = 10 and 0.9375 s of the 2.5 s go
    # unspent; with 3 re-fits the first (iteration 7) re-fits to 7 + 1.125 / 0.0625
    # = 25 and the run spends the budget.
    seconds = [0.25, 0.25, 0.25, 0.25, 0.25, 0.0625]
    once = budget_trainer(tmp_path / "once", FakeClock(seconds))
    once.prepare()
    once.train()
    assert once.iteration == 10 and once.train_seconds == 1.5625
    replanned = budget_trainer(tmp_path / "re", FakeClock(seconds), "train.budget_replans=3")
    replanned.prepare()
    replanned.train()
    assert replanned.iteration == 25 and replanned.train_seconds == 2.5


def test_budget_resume_after_the_last_replan_ends_where_the_count_says(tmp_path: Path) -> None:
    # 2 re-fits (iterations 15 and 17) set the count to 19; a run stopped at 18
    # and resumed on a machine 40x slower has no re-fit left: it ends at 19 too.
    replans = "train.budget_replans=2"
    ref = budget_trainer(tmp_path / "ref", FakeClock(SLOWING), SLOWING_BUDGET, replans)
    ref.prepare()
    ref.train()
    assert ref.budget["replans"] == 2 and ref.iteration == 19
    run_dir = tmp_path / "run"
    first = budget_trainer(run_dir, FakeClock(SLOWING), SLOWING_BUDGET, replans)
    first.prepare()
    stop_at(first, 18)
    assert first.train() == "interrupted" and first.budget["iters"] == 19
    second = budget_trainer(run_dir, FakeClock([1.0], slow=10.0), SLOWING_BUDGET, replans)
    second.prepare()
    assert second.train() == "finished" and second.iteration == 19
    assert records(run_dir) == records(tmp_path / "ref")
    assert second.final_metrics()["test_nll"] == ref.final_metrics()["test_nll"]


def test_budget_resume_on_a_slower_machine_ends_where_the_count_says(tmp_path: Path) -> None:
    ref = budget_trainer(tmp_path / "ref", FakeClock([1.0, 0.125]))
    ref.prepare()
    ref.train()
    ref_final = ref.final_metrics()

    run_dir = tmp_path / "run"
    first = budget_trainer(run_dir, FakeClock([1.0, 0.125]))
    first.prepare()
    stop_at(first, 7)
    assert first.train() == "interrupted" and first.budget["iters"] == 13
    second = budget_trainer(run_dir, FakeClock([1.0], slow=10.0))  # 10 s per iteration now
    second.prepare()
    assert second.budget["iters"] == 13
    assert second.train() == "finished" and second.iteration == 13
    final = second.final_metrics()
    assert records(run_dir) == records(tmp_path / "ref")
    assert final["test_nll"] == ref_final["test_nll"]
    assert final["budget_spent_seconds"] > ref_final["budget_spent_seconds"]  # honest seconds


# ------------------------------------------------------------- table and sweep
def test_the_tabular_sweep_fills_the_tabular_table(tmp_path: Path) -> None:
    from cnf.sweep import load_sweep, plan
    from cnf.tables import build_table, load_table_spec

    sweep = load_sweep(
        REPO / "configs" / "sweeps" / "ffjord_tabular.yaml", runs_root=tmp_path / "sweeps"
    )
    runs = plan(sweep)
    assert len(runs) == 25 and len({r.run_dir for r in runs}) == 25
    expected = {}
    for i, r in enumerate(runs):
        r.run_dir.mkdir(parents=True)
        (r.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(r.config)))
        final = {"iterations": 7, "stop_reason": "early_stopping", "test_nll": float(i)}
        (r.run_dir / "final.json").write_text(json.dumps(final))
        expected[r.name] = float(i)
    spec = load_table_spec(REPO / "configs" / "tables" / "ffjord_tabular.yaml")
    table = build_table(spec, runs_root=tmp_path)
    assert not table.missing and not table.unfinished, table.missing + table.unfinished
    family_of_row = {
        "FFJORD": "ffjord__",
        "RNODE": "rnode__",
        "RealNVP": "flows-realnvp",
        "Glow": "flows-glow",
        "MAF": "flows-maf",
    }
    for row in table.rows:
        prefix = next(v for k, v in family_of_row.items() if row.startswith(k))
        for col in ("power", "gas", "hepmass", "miniboone", "bsds300"):
            (name,) = [n for n in expected if n.startswith(prefix) and f"-{col}_s0" in n]
            assert table.cells[(row, col, "test_nll")].mean == expected[name], (row, col)
    refs = {r: table.cells[(r, "power", "test_nll")].mean for r in table.ref_rows}
    assert refs["FFJORD (paper)"] == -0.46 and refs["MAF (paper)"] == -0.24


def write_sweep(
    tmp_path: Path, base: str, axes: str = "{data.name: [power, gas], seed: [0]}"
) -> Path:
    for name in ("power", "gas"):
        (tmp_path / f"{name}.yaml").write_text(
            (REPO / "configs" / "ffjord" / f"{name}.yaml").read_text()
        )
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nbase: {base}\naxes: {axes}\n")
    return path


def test_sweep_base_templates_and_lists(tmp_path: Path) -> None:
    from cnf.sweep import SweepError, load_sweep, manifest_text, plan

    sweep = load_sweep(write_sweep(tmp_path, "['{data.name}.yaml']"), runs_root=tmp_path / "r")
    runs = plan(sweep)
    assert [r.config["data"]["name"] for r in runs] == ["power", "gas"]
    assert [r.config["model"]["hidden_dims"][0] for r in runs] == [60, 160]  # each set's own
    assert [
        Path(json.loads(x)["config"]).name for x in manifest_text(runs, sweep.base).splitlines()
    ] == [
        "power.yaml",
        "gas.yaml",
    ]
    for base, message in (
        ("'{seed}x.yaml'", "not found"),
        ("'{model.nope}.yaml'", "{model.nope} is not an axis"),
        ("['power.yaml', 'power.yaml']", "lists a config twice"),
        ("[]", "or a list of them) is required"),
    ):
        with pytest.raises(SweepError, match=re.escape(message)) as e:
            load_sweep(write_sweep(tmp_path, base))
        assert "\n" not in str(e.value)


def test_bench_tabular_smoke() -> None:
    from conftest import run_script

    rc, out, err = run_script(
        "bench_tabular.py",
        ["--iters", "2", "--rows", "2000", "model.hidden_dims=[16,16]", "train.batch_size=100"],
    )
    assert rc == 0, out + err
    assert "1620 train rows x 43" in out  # 2000 rows: 1620 + 180 + 200 by MAF's split
    assert "s/iteration:" in out and "NFE at iteration 2 (last): forward" in out
