"""The CPU twin of the CIFAR-10 diffusion table, end to end on real data (slow).

Every row of ``configs/tables/diffusion_digits.yaml`` has its twin config (a
DDPM++-shaped network on the 8×8 digits). Each trains a few iterations into
``<runs>/diffusion_digits/<row>`` (in-process, as ``experiments/train.py``
does), ``experiments/fid.py`` computes its FID with the offline digits
features and its JSON line becomes the run's ``fid.json``, and
``experiments/tables.py`` renders the table: every row has a finite bits/dim
and FID, the published-style reference rows are there, and no run is missing.
The full-size twin (minutes per row) is the same commands without the
overrides here; see the table spec's header.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import REPO, run_script, subprocess_env

from cnf.config import load_config
from cnf.tables import build_table, load_table_spec
from cnf.train.loop import Trainer

SPEC = REPO / "configs" / "tables" / "diffusion_digits.yaml"
EXACT_FLOW = (
    "model.flow={name: resflow, num_blocks: 4, hidden_channels: 16, coeff: 0.98, "
    "activation: sin, actnorm: false, tol: 1.0e-5}"
)
# row folder -> (config, extra overrides): the runs the table spec expects.
TWIN = {
    "vp": ("configs/score/digits_ddpmpp_vp.yaml", ()),
    "subvp": ("configs/score/digits_ddpmpp_subvp.yaml", ()),
    "deep_subvp": ("configs/score/digits_ddpmpp_deep_subvp.yaml", ()),
    "scoreflow": ("configs/score/digits_ddpmpp_deep_subvp_likelihood.yaml", ()),
    "ncsnpp_ve": ("configs/score/digits_ncsnpp_ve.yaml", ()),
    "indm": ("configs/indm/digits_ddpmpp.yaml", ()),
    "indm_exact": ("configs/indm/digits_ddpmpp.yaml", (EXACT_FLOW,)),
    "indm_ve": ("configs/indm/digits_ncsnpp_ve.yaml", ()),
    "diffflow": ("configs/diffflow/digits_ddpm.yaml", ("model.steps=3",)),
    "otcfm": ("configs/fm/otcfm_digits_ddpm.yaml", ()),
}
FAST = (
    "train.iters=3",
    "train.log_every=1",
    "eval.num_samples=8",
    "eval.plots=false",
    "eval.solver.rtol=1e-2",
    "eval.solver.atol=1e-2",
    "track.wandb=disabled",
    "device=cpu",
)
SAMPLER_STEPS = {"score": "model.sampler.steps=5", "indm": "model.sampler.steps=5"}


@pytest.mark.slow
def test_twin_trains_scores_fid_and_renders_the_table(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    env = subprocess_env(CNF_CACHE=str(tmp_path / "cache"))
    for row, (config, extra) in TWIN.items():
        family = str(load_config(REPO / config).model.family)
        overrides = [*FAST, *extra, f"run.dir={runs / 'diffusion_digits' / row}"]
        if family in SAMPLER_STEPS:
            overrides.append(SAMPLER_STEPS[family])
        trainer = Trainer(load_config(REPO / config, overrides), progress=False, log=lambda _: None)
        trainer.data.test = trainer.data.test[:16]  # the twin at full size scores all 359
        trainer.prepare()
        assert trainer.train() == "finished"
        trainer.final_metrics()
        run_dir = runs / "diffusion_digits" / row
        rc, out, err = run_script(
            "fid.py",
            # 2 KID subsets, not 100: KID's kernels would be most of the test's time.
            [str(run_dir), "--num-samples", "64", "--kid-subsets", "2", "--no-progress"],
            env=env,
            timeout=1800,
        )
        assert rc == 0, err
        (run_dir / "fid.json").write_text(out.strip().splitlines()[-1] + "\n")
        fid = json.loads((run_dir / "fid.json").read_text())
        assert fid["features"] == "digits" and math.isfinite(fid["fid"]), (row, fid)
        final = json.loads((run_dir / "final.json").read_text())
        assert math.isfinite(final["test_bpd"]), (row, final)
        if row in ("indm", "indm_ve"):
            assert final["test_nll_is_bound"] is True  # the global-latent flow's bound
        if row == "indm_exact":
            assert "test_nll_is_bound" not in final

    spec = load_table_spec(SPEC)
    table = build_table(spec, runs)
    assert not table.missing and not table.unfinished, (table.missing, table.unfinished)
    assert not table.warnings, table.warnings
    for row in spec.rows:
        for key in ("test_bpd", "fid"):
            cell = table.cells[(row.label, "digits", key)]
            assert cell.n == 1 and math.isfinite(cell.mean), (row.label, key)
    # The reference row: the test digits' own FD, read from the runs (the same
    # for every run: the same 359 images and training set), not written in the spec.
    (ref,) = spec.references
    floor = table.cells[(ref.label, "digits", "fid")].mean
    data_fd = {
        json.loads((runs / "diffusion_digits" / r / "fid.json").read_text())["fid_data"]
        for r in TWIN
    }
    assert len(data_fd) == 1 and floor == pytest.approx(data_fd.pop()) and 0 < floor < 1

    rc, out, err = run_script(
        "tables.py", [str(SPEC), "--runs-root", str(runs), "--out", str(tmp_path / "tables")]
    )
    assert rc == 0, err
    markdown = (tmp_path / "tables" / "diffusion_digits.md").read_text()
    for row in spec.rows:
        assert row.label in markdown
    assert "missing" not in out.splitlines()[-1]
