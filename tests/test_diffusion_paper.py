"""The paper configs of the diffusion families and what they need.

* ``data.hflip``: a seeded left-right flip of training images only (resumable).
* Image backbones behind flow matching's field and DiffFlow's networks.
* Tables read FID from a run's ``fid.json`` (``experiments/fid.py``'s JSON line)
  when ``final.json`` has none, and only if it is from the run's final iteration.
* The CIFAR-10 and CelebA-64 configs carry the published training settings
  their comments name; the CIFAR-10 table lists every row as missing without runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, build_family
from omegaconf import OmegaConf

from cnf.config import ConfigError, load_config
from cnf.data import batch_rng, build_dataset
from cnf.tables import build_table, load_table_spec, read_run_folder

torch.set_num_threads(1)
CONFIGS = REPO / "configs"
# The previous release's cluster configs (our own small networks) stay as they
# were, for tests/test_config_migration.py; the paper configs are new files.
PREVIOUS = REPO / "tests" / "data" / "previous_release" / "configs"
PAPER = sorted(
    p
    for family in ("score", "indm", "diffflow", "fm")
    for p in (CONFIGS / family).glob("*.yaml")
    if OmegaConf.select(OmegaConf.load(p), "data.name") in ("cifar10", "celeba64")
    and not (PREVIOUS / family / p.name).is_file()
)


# ------------------------------------------------------------------ flips
def test_hflip_flips_training_images_only_and_is_seeded() -> None:
    plain = build_dataset("digits", flatten=False)
    flipped = build_dataset("digits", flatten=False, hflip=True)
    a = plain.sample_train(batch_rng(0, 7), 256)
    b = flipped.sample_train(batch_rng(0, 7), 256)
    again = flipped.sample_train(batch_rng(0, 7), 256)
    np.testing.assert_array_equal(b, again)  # a function of (seed, iteration): resumable
    same = np.all(a == b, axis=(1, 2, 3))
    mirrored = np.all(a[..., ::-1] == b, axis=(1, 2, 3))
    assert np.all(same | mirrored)  # the same rows and noise, some mirrored
    assert 0.3 < mirrored.mean() < 0.7 and not np.all(same)
    np.testing.assert_array_equal(plain.test, flipped.test)
    flat = build_dataset("digits", hflip=True).sample_train(batch_rng(0, 7), 256)
    np.testing.assert_array_equal(flat, b.reshape(256, 64))
    with pytest.raises(ConfigError, match="hflip: flips images"):
        load_config(REPO / "configs/score/vp_toy.yaml", ["data.hflip=true"])


# --------------------------------------------------------- image networks
def test_flow_matching_and_diffflow_take_the_published_image_networks() -> None:
    net = {"name": "ddpm", "nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4]}
    evals = {"solver": {"name": "rk4", "steps": 2}, "divergence": {"name": "hutchinson"}}
    torch.manual_seed(0)
    fm = build_family("fm", {"net": net, "pairing": {"name": "ot"}}, (1, 8, 8), eval=evals)
    assert type(fm.field).__name__ == "NCSNpp"
    x = torch.rand(4, 1, 8, 8)
    out = fm.training_loss(x)
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach())) and all(
        p.grad is not None for p in fm.parameters()
    )
    assert torch.isfinite(fm.evaluate(x).nll).all()
    assert fm.sample(3).x.shape == (3, 1, 8, 8)
    assert type(build_family("fm", {}, (2,)).field).__name__ == "TimeMLP"

    df = build_family("diffflow", {"steps": 2, "drift_net": net, "score_net": net}, (1, 8, 8))
    assert type(df.score_net).__name__ == "NCSNpp"
    loss = df.training_loss(x).loss
    loss.backward()
    assert math.isfinite(float(loss.detach()))


# --------------------------------------------------------- FID in tables
def _run(root: Path, name: str, *, final: dict, fid: dict | str | None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = {
        "seed": 0,
        "data": {"name": "digits"},
        "model": {"family": "score"},
        "train": {"iters": 10},
    }
    OmegaConf.save(OmegaConf.create(cfg), d / "config.yaml")
    (d / "final.json").write_text(json.dumps({"iterations": 10, **final}))
    if fid is not None:
        (d / "fid.json").write_text(fid if isinstance(fid, str) else json.dumps(fid))
    return d


def test_tables_read_fid_json_of_the_final_iteration(tmp_path: Path) -> None:
    line = {"fid": 1.5, "kid": 0.01, "num_samples": 1000, "nfe_per_sample": 42.0, "iteration": 10}
    run = read_run_folder(_run(tmp_path, "a", final={"test_bpd": 2.0}, fid=line))
    assert run.warning is None
    assert (run.final["fid"], run.final["fid_nfe"], run.final["fid_num_samples"]) == (
        1.5,
        42.0,
        1000,
    )
    own = read_run_folder(_run(tmp_path, "b", final={"fid": 3.0}, fid=line))
    assert own.final["fid"] == 3.0 and "fid_nfe" not in own.final  # final.json's own FID wins
    stale = read_run_folder(_run(tmp_path, "c", final={}, fid={**line, "iteration": 5}))
    assert "fid" not in stale.final and "computed at iteration 5" in stale.warning
    broken = read_run_folder(_run(tmp_path, "d", final={}, fid="{not json"))
    assert "fid" not in broken.final and "unreadable" in broken.warning


# --------------------------------------------------------- paper configs
def test_paper_configs_carry_the_published_training_settings() -> None:
    assert len(PAPER) >= 11, PAPER
    for path in PAPER:
        cfg = load_config(path, ["data.path=/unused"])
        where = path.relative_to(CONFIGS)
        assert cfg.data.hflip, where  # random flips
        assert cfg.train.lr == 2e-4 and cfg.train.grad_clip == 1.0, where
        family, sde = cfg.model.family, OmegaConf.select(cfg, "model.sde.name")
        if family == "diffflow":
            assert cfg.train.batch_size == 100 and cfg.train.ema == 0.999, where
            assert cfg.model.drift_net.name == cfg.model.score_net.name == "ddpm", where
            continue
        assert cfg.train.batch_size == 128, where
        assert cfg.train.ema == (0.999 if sde == "ve" else 0.9999), where
        if family == "indm":
            assert cfg.model.flow.name == "resflow_global", where  # the released flow
            assert cfg.train.warmup_iters == 0 and cfg.train.optimizer == "adamw", where
        else:
            assert cfg.train.warmup_iters == 5000, where
        if family == "score":
            assert cfg.model.net.name == ("ncsnpp" if sde == "ve" else "ddpmpp"), where
            assert cfg.model.sde.eps == (1e-2 if cfg.model.weighting != "variance" else 1e-5)


def test_cifar10_table_lists_every_row_missing_and_the_published_column(tmp_path: Path) -> None:
    spec = load_table_spec(CONFIGS / "tables" / "diffusion_cifar10.yaml")
    table = build_table(spec, tmp_path)
    assert len(table.missing) == len(spec.rows) >= 10
    for label in table.ref_rows:  # the published column: a number in bits/dim or FID per row
        cells = [table.cells[(label, "CIFAR-10", k)] for k in ("test_bpd", "fid")]
        assert any(c.mean is not None for c in cells), label
    marks = {table.cells[(label, "CIFAR-10", "fid")].mark for label in table.ref_rows}
    assert "†" in marks and "" in marks  # unverified numbers carry their mark
    for row in spec.rows:  # every row names its config, and INDM rows their flow
        assert row.note and "configs/" in row.note, row.label
        if "INDM" in row.label:
            assert "flow resflow" in row.label and "model.flow" in row.select
