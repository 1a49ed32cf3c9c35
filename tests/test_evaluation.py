"""The one evaluation module (cnf/evaluation.py): the paired gap, the floor, units, provenance.

* the exact data density scored as a "model" has gap 0 exactly, and its NLL is the floor;
* the floor of the default 8gaussians test set is its points' own mean −log p (≈ 2.8117),
  not the analytic entropy (2.8319);
* the gap's standard error is paired: far below the test set's own noise;
* data files standardised by the loader report NLLs in the file's units;
* every result carries the settings that made it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cnf.data import build_dataset
from cnf.evaluation import evaluate_points, sample_statistics, settings_record, summarize
from cnf.models.base import EvalOutput, GenerativeModel, SampleOutput

F64 = torch.float64


@dataclass(frozen=True)
class _NoSettings:
    pass


class DensityModel(GenerativeModel):
    """A "model" whose NLL is a given function of the data (e.g. the true density)."""

    Settings = _NoSettings

    def __init__(self, nll_fn, shift: float = 0.0) -> None:
        super().__init__()
        self.nll_fn, self.shift = nll_fn, shift
        self.p = torch.nn.Parameter(torch.zeros((), dtype=F64))
        self.settings = _NoSettings()
        self.event_shape = (2,)

    def evaluate(self, x, settings=None):
        nll = torch.as_tensor(self.nll_fn(x.numpy()), dtype=F64) + self.shift
        return EvalOutput(nll=nll, stats={})

    def sample(self, n, settings=None, *, generator=None):
        return SampleOutput(torch.zeros(n, 2, dtype=F64), {})


def test_true_density_scored_as_a_model_has_gap_zero_and_is_the_floor() -> None:
    data = build_dataset("8gaussians", test_size=5000, val_size=10)
    model = DensityModel(lambda x: -data.log_density(x))
    out = summarize(evaluate_points(model, data.test, data, batch_size=1000, seed=0), data)
    assert out["gap"] == 0.0 and out["gap_stderr"] == 0.0  # exactly, not approximately
    assert out["nll"] == out["floor"]
    # The default 5000 test points: their own floor, not the analytic entropy.
    assert out["floor"] == pytest.approx(2.8117, abs=5e-4)
    assert out["entropy"] == pytest.approx(2.8319, abs=5e-4)
    assert abs(out["floor"] - out["entropy"]) > 3 * out["floor_stderr"] / 2


def test_gap_is_paired_against_the_same_points() -> None:
    """A model 0.05 nats worse everywhere: gap 0.05 exactly, with a tiny paired error."""
    data = build_dataset("checkerboard", test_size=2000, val_size=10)
    lp = data.log_density
    model = DensityModel(lambda x: -lp(x), shift=0.05)
    out = summarize(evaluate_points(model, data.test, data, batch_size=500, seed=0), data)
    assert out["gap"] == pytest.approx(0.05, abs=1e-12)
    assert out["gap_stderr"] < 1e-9  # the floor's noise cancels in the pair
    assert out["floor"] == pytest.approx(math.log(32.0))


def test_standardised_file_data_report_nll_in_the_files_units(tmp_path) -> None:
    """6-D Gaussian data offset by 500: a model of the standardised data reports the NLL of
    the raw data (N(0, I) there is N(mu, sigma^2) on the file's values)."""
    from cnf.data.files import split_array

    rng = np.random.default_rng(0)
    scale = np.array([0.5, 1.0, 2.0, 3.0, 0.1, 10.0])
    raw = 500 + rng.normal(size=(4000, 6)) * scale
    np.save(tmp_path / "d.npy", raw)
    data = build_dataset("file", path=str(tmp_path / "d.npy"))
    train_raw, _, test_raw = split_array(raw)  # the loader's split, independently
    mu, sigma = train_raw.mean(0), train_raw.std(0)
    np.testing.assert_allclose(data.test, (test_raw - mu) / sigma, rtol=1e-12)
    std_normal = DensityModel(lambda y: 0.5 * (y**2).sum(1) + 3 * math.log(2 * math.pi))
    out = summarize(evaluate_points(std_normal, data.test, data, batch_size=400, seed=0), data)
    assert out["nll_offset"] == pytest.approx(float(np.log(sigma).sum()), rel=1e-12)
    raw_nll = (
        0.5 * (((test_raw - mu) / sigma) ** 2).sum(1)
        + np.log(sigma).sum()
        + 3 * math.log(2 * math.pi)
    )
    assert out["nll"] == pytest.approx(float(raw_nll.mean()), rel=1e-12)
    assert out["nll"] < 20  # a few nats per point, not the 750 000 of an unstandardised fit


def test_sample_statistics_and_settings_record() -> None:
    data = build_dataset("8gaussians", test_size=2000, val_size=10)
    fresh = data.sample_train(np.random.default_rng(1), 2000)
    stats = sample_statistics(fresh, data)
    assert abs(stats["sample_mmd2"]) < 5e-3 and stats["sample_support_fraction"] == 1.0
    broken = fresh.copy()
    broken[:100] = np.nan
    stats = sample_statistics(broken, data)
    assert stats["sample_finite_fraction"] == pytest.approx(0.95)
    assert stats["sample_support_fraction"] == pytest.approx(0.95)  # non-finite count as outside

    from cnf.models.ffjord import ODESettings

    record = settings_record(ODESettings(), num_points=2000, batch_size=500, seed=3)
    assert record["settings"]["solver.name"] == "dopri5"
    assert record["settings"]["divergence.name"] == "exact"
    assert (record["num_points"], record["batch_size"], record["seed"]) == (2000, 500, 3)
