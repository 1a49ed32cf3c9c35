"""Toy densities against closed forms, the user's own data files, and config validation.

* every toy generator draws finite ``(n, 2)`` arrays at FFJORD's scale and is
  a deterministic function of its ``numpy.random.Generator``;
* the known densities are normalised (8gaussians: grid quadrature;
  checkerboard: uniform on an area of 32) and their entropies match Monte
  Carlo estimates;
* ``.npy``/``.csv`` files load and split deterministically; every malformed
  file is a :class:`DataError` with a one-line message;
* every bad config is a :class:`ConfigError` with a one-line message naming
  the key (and the valid choices for names).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import load_experiment_module

from cnf.config import ConfigError, load_config, parse_overrides
from cnf.data import DATASETS, DataError, batch_rng, build_dataset, dataset_from_config
from cnf.data.files import load_array, split_array
from cnf.data.toy import TOY_DATASETS, toy_entropy, toy_log_density

TOY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "ffjord" / "toy.yaml"


# ----------------------------------------------------------------- toy data
@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_generator_shape_scale_and_determinism(name: str) -> None:
    sampler = TOY_DATASETS[name]
    x = sampler(np.random.default_rng(0), 5000)
    assert x.shape == (5000, 2)
    assert np.isfinite(x).all()
    assert np.abs(x).max() < 5.0  # FFJORD's toy data live in about [-4, 4]²
    assert (0.8 < x.std(0)).all() and (x.std(0) < 2.5).all()
    np.testing.assert_array_equal(x, sampler(np.random.default_rng(0), 5000))
    assert not np.array_equal(x, sampler(np.random.default_rng(1), 5000))
    assert sampler(np.random.default_rng(0), 7).shape == (7, 2)  # odd sizes too


def test_toy_scales_match_ffjord() -> None:
    rng = np.random.default_rng(0)
    r = np.linalg.norm(TOY_DATASETS["8gaussians"](rng, 20000), axis=1)
    assert np.median(r) == pytest.approx(4 / 1.414, abs=0.05)  # centres at radius 4, / 1.414
    cb = TOY_DATASETS["checkerboard"](rng, 20000)
    assert np.abs(cb).max() <= 4.0 and np.abs(cb).max() > 3.9
    r = np.linalg.norm(TOY_DATASETS["circles"](rng, 20000), axis=1)
    assert np.median(r[r > 2.25]) == pytest.approx(3.0, abs=0.05)  # radii 3 and 1.5
    assert np.median(r[r < 2.25]) == pytest.approx(1.5, abs=0.05)


def _grid(lim: float, h: float) -> tuple[np.ndarray, float]:
    xs = np.arange(-lim + h / 2, lim, h)  # cell midpoints
    gx, gy = np.meshgrid(xs, xs)
    return np.stack([gx.ravel(), gy.ravel()], 1), h * h


def test_eight_gaussians_density_is_normalised_and_entropy_matches_monte_carlo() -> None:
    pts, cell = _grid(7.0, 0.02)
    logp = toy_log_density("8gaussians", pts)
    assert float(np.exp(logp).sum() * cell) == pytest.approx(1.0, abs=1e-6)
    x = TOY_DATASETS["8gaussians"](np.random.default_rng(3), 1_000_000)
    lp = toy_log_density("8gaussians", x)
    assert np.isfinite(lp).all()
    mc, se = float(-lp.mean()), float(lp.std(ddof=1) / math.sqrt(len(lp)))
    h, h_err = toy_entropy("8gaussians")
    assert h_err < 1e-6
    assert abs(mc - h) < 4 * se, (mc, h, se)
    # The components barely overlap: H is just below log 8 + H(N(0, s²I)), its upper bound.
    s = 0.5 / 1.414
    upper = math.log(8) + 1 + math.log(2 * math.pi * s * s)
    assert upper - 0.02 < h < upper


def test_checkerboard_density_and_entropy() -> None:
    h, h_err = toy_entropy("checkerboard")
    assert h == pytest.approx(math.log(32), abs=1e-12) and h_err == 0
    x = TOY_DATASETS["checkerboard"](np.random.default_rng(4), 20000)
    np.testing.assert_allclose(
        toy_log_density("checkerboard", x), -math.log(32), rtol=0, atol=1e-12
    )
    pts, cell = _grid(5.0, 0.05)
    p = np.exp(toy_log_density("checkerboard", pts))
    assert float(p.sum() * cell) == pytest.approx(1.0, abs=1e-9)
    # Each of the 8 occupied 2×2 squares gets 1/8 of the samples.
    cells = np.floor(x / 2).astype(int)
    _, counts = np.unique(cells, axis=0, return_counts=True)
    assert len(counts) == 8
    np.testing.assert_allclose(counts / len(x), 1 / 8, atol=0.01)


@pytest.mark.parametrize("name", sorted(set(TOY_DATASETS) - {"8gaussians", "checkerboard"}))
def test_unknown_densities_report_none(name: str) -> None:
    assert toy_log_density(name, np.zeros((1, 2))) is None
    assert toy_entropy(name) is None


def test_toy_dataset_splits_are_fixed_and_stream_is_deterministic() -> None:
    a = build_dataset("8gaussians", test_size=300, val_size=100)
    b = build_dataset("8gaussians", test_size=300, val_size=100)
    assert a.event_shape == (2,) and a.test.shape == (300, 2) and a.val.shape == (100, 2)
    np.testing.assert_array_equal(a.test, b.test)
    assert not np.array_equal(a.test[:100], a.val)
    assert a.entropy == toy_entropy("8gaussians") and a.log_density is not None
    np.testing.assert_array_equal(
        a.sample_train(batch_rng(0, 5), 64), b.sample_train(batch_rng(0, 5), 64)
    )
    assert not np.array_equal(
        a.sample_train(batch_rng(0, 5), 64), a.sample_train(batch_rng(0, 6), 64)
    )
    assert not np.array_equal(
        a.sample_train(batch_rng(0, 5), 64), a.sample_train(batch_rng(1, 5), 64)
    )
    with pytest.raises(DataError, match="8gaussians"):
        build_dataset("nosuch")


# ---------------------------------------------------------------- data files
def _rows(n: int = 100, d: int = 3) -> np.ndarray:
    # Row i is (i, i + 0.5, ...): rows are distinct and identify themselves.
    return np.arange(n)[:, None] + np.linspace(0, 0.5, d)[None]


@pytest.mark.parametrize("fmt", ["npy", "npy-float32", "csv", "csv-header"])
def test_data_file_loads(tmp_path: Path, fmt: str) -> None:
    x = _rows()
    if fmt.startswith("npy"):
        path = tmp_path / "x.npy"
        np.save(path, x.astype(np.float32) if fmt == "npy-float32" else x)
    else:
        path = tmp_path / "x.csv"
        header = "a,b,c\n" if fmt == "csv-header" else ""
        path.write_text(
            header + "\n".join(",".join(repr(float(v)) for v in row) for row in x) + "\n"
        )
    y = load_array(path)
    assert y.dtype == np.float64 and y.shape == (100, 3)
    np.testing.assert_allclose(y, x, rtol=1e-7)


def test_single_column_csv_and_single_row(tmp_path: Path) -> None:
    (tmp_path / "col.csv").write_text("\n".join(str(i) for i in range(10)) + "\n")
    assert load_array(tmp_path / "col.csv").shape == (10, 1)
    (tmp_path / "row.csv").write_text("1,2,3\n")
    assert load_array(tmp_path / "row.csv").shape == (1, 3)


def test_split_is_deterministic_disjoint_and_sized() -> None:
    x = _rows(1000, 2)
    train, val, test = split_array(x)
    train2, val2, test2 = split_array(x)
    for a, b in ((train, train2), (val, val2), (test, test2)):
        np.testing.assert_array_equal(a, b)
    assert (len(train), len(val), len(test)) == (800, 100, 100)
    ids = [set(part[:, 0].astype(int)) for part in (train, val, test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert ids[0] | ids[1] | ids[2] == set(range(1000))
    assert not np.array_equal(test, x[:100])  # shuffled, not the first rows


def test_file_dataset(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", _rows(500, 4))
    # Unstandardised, so column 0 still holds the row ids.
    ds = build_dataset("file", path=str(tmp_path / "x.npy"), batch_size=64, standardize=False)
    assert ds.event_shape == (4,) and ds.kind == "tabular" and ds.nll_offset == 0.0
    assert ds.train.shape == (400, 4) and len(ds.val) == 50 and len(ds.test) == 50
    assert ds.entropy is None and ds.log_density is None
    b1 = ds.sample_train(batch_rng(0, 1), 64)
    np.testing.assert_array_equal(b1, ds.sample_train(batch_rng(0, 1), 64))
    test_ids = set(ds.test[:, 0].astype(int)) | set(ds.val[:, 0].astype(int))
    assert not set(b1[:, 0].astype(int)) & test_ids  # training batches never see held-out rows


def test_file_dataset_is_standardised_with_training_statistics(tmp_path: Path) -> None:
    """6-D data offset by 500 and scaled: the training split has mean 0 / std 1, the
    held-out splits use the training statistics, and ``nll_offset`` is the change of
    variables ``sum_d log sigma_d`` between the stored and the standardised data."""
    rng = np.random.default_rng(0)
    scale = np.array([0.01, 0.5, 1.0, 3.0, 40.0, 1e3])
    raw = 500.0 + rng.normal(size=(2000, 6)) * scale
    np.save(tmp_path / "x.npy", raw)
    ds = build_dataset("file", path=str(tmp_path / "x.npy"))
    train_raw, val_raw, test_raw = split_array(raw)
    mu, sigma = train_raw.mean(0), train_raw.std(0)
    np.testing.assert_allclose(ds.train.mean(0), 0.0, atol=1e-9)  # 500 / 0.01: 5 digits lost
    np.testing.assert_allclose(ds.train.std(0), 1.0, rtol=1e-9)
    np.testing.assert_allclose(ds.val, (val_raw - mu) / sigma, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ds.test, (test_raw - mu) / sigma, rtol=1e-12, atol=1e-12)
    assert ds.nll_offset == pytest.approx(np.log(sigma).sum(), rel=1e-12)
    assert ds.nll_offset == pytest.approx(np.log(scale).sum(), abs=0.2)  # about the true scales
    # Change of variables: a density fitted to the standardised data, scored there
    # and shifted by nll_offset, is the density of the raw data.
    from scipy.stats import norm

    nll_std = -norm(0.0, 1.0).logpdf(ds.test).sum(1)
    nll_raw = -norm(mu, sigma).logpdf(test_raw).sum(1)
    np.testing.assert_allclose(nll_std + ds.nll_offset, nll_raw, rtol=1e-10)
    # Batches follow the seeded-batch rule on the standardised rows.
    np.testing.assert_array_equal(
        ds.sample_train(batch_rng(3, 7), 32),
        ds.train[batch_rng(3, 7).integers(0, len(ds.train), size=32)],
    )
    plain = build_dataset("file", path=str(tmp_path / "x.npy"), standardize=False)
    np.testing.assert_array_equal(plain.train, train_raw)
    assert plain.nll_offset == 0.0


def test_file_dataset_with_a_constant_column_cannot_be_standardised(tmp_path: Path) -> None:
    x = _rows(100, 3)
    x[:, 1] = 7.0
    np.save(tmp_path / "c.npy", x)
    with pytest.raises(DataError) as e:
        build_dataset("file", path=str(tmp_path / "c.npy"))
    msg = str(e.value)
    assert "\n" not in msg and "c.npy" in msg and "column 1" in msg and "standardize" in msg
    assert build_dataset("file", path=str(tmp_path / "c.npy"), standardize=False).nll_offset == 0


def test_data_standardize_config_key(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", _rows(200, 2) * 10)
    base = ["data.name=file", f"data.path={tmp_path / 'x.npy'}", "train.batch_size=8"]
    on = dataset_from_config(load_config(TOY_CONFIG, base))
    off = dataset_from_config(load_config(TOY_CONFIG, [*base, "data.standardize=false"]))
    assert on.nll_offset != 0.0 and off.nll_offset == 0.0
    np.testing.assert_allclose(on.train.std(0), 1.0)


def _write_bad(tmp_path: Path, case: str) -> tuple[Path, int]:
    """A malformed data file and the batch size to use with it."""
    if case == "missing":
        return tmp_path / "nope.npy", 8
    if case == "suffix":
        p = tmp_path / "x.txt"
        p.write_text("1,2\n3,4\n")
        return p, 8
    if case == "1d":
        p = tmp_path / "x.npy"
        np.save(p, np.arange(100.0))
        return p, 8
    if case == "3d":
        p = tmp_path / "x.npy"
        np.save(p, np.zeros((10, 2, 2)))
        return p, 8
    if case == "nan":
        x = _rows(100, 2)
        x[37, 1] = np.nan
        p = tmp_path / "x.npy"
        np.save(p, x)
        return p, 8
    if case == "inf-csv":
        p = tmp_path / "x.csv"
        p.write_text("1,2\n3,inf\n5,6\n")
        return p, 1
    if case == "too-few":
        p = tmp_path / "x.npy"
        np.save(p, _rows(50, 2))  # 40 training rows after the split
        return p, 128
    if case == "non-numeric-csv":
        p = tmp_path / "x.csv"
        p.write_text("a,b\n1,2\nthree,4\n")
        return p, 1
    if case == "strings-npy":
        p = tmp_path / "x.npy"
        np.save(p, np.array([["a", "b"], ["c", "d"]]))
        return p, 1
    if case == "empty-csv":
        p = tmp_path / "x.csv"
        p.write_text("")
        return p, 1
    raise AssertionError(case)


BAD_FILES = {
    "missing": "not found",
    "suffix": "suffix",
    "1d": "shape",
    "3d": "shape",
    "nan": "NaN",
    "inf-csv": "Inf",
    "too-few": "batch_size",
    "non-numeric-csv": "x.csv",
    "strings-npy": "x.npy",
    "empty-csv": "x.csv",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_file_is_a_one_line_data_error(tmp_path: Path, case: str) -> None:
    path, batch_size = _write_bad(tmp_path, case)
    # No warning on the way either: on the command line it would be a second stderr line.
    with warnings.catch_warnings(), pytest.raises(DataError) as info:
        warnings.simplefilter("error")
        build_dataset("file", path=str(path), batch_size=batch_size)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    assert BAD_FILES[case] in msg, msg
    if case != "too-few":
        assert str(path) in msg or path.name in msg


# ------------------------------------------------------------------- config
def test_toy_config_loads_with_overrides() -> None:
    cfg = load_config(TOY_CONFIG, ["train.iters=7", "model.hidden_dims=[8,8]", "data.name=moons"])
    assert cfg.train.iters == 7 and list(cfg.model.hidden_dims) == [8, 8]
    assert cfg.data.name == "moons" and cfg.model.family == "ffjord"
    assert cfg.track.wandb == "offline"  # the default needs no key and no network
    assert cfg.run.dir == "runs/ffjord_moons_s0"
    with pytest.raises(Exception):  # noqa: B017 - resolved configs are read-only
        cfg.train.iters = 3


CONFIG_ERRORS = [
    # (override, words the one-line message must contain)
    ("nosuch=1", ["nosuch"]),
    ("train.nosuch=1", ["train.nosuch"]),
    ("model.nosuch=1", ["model.nosuch"]),
    ("train.iters=abc", ["train.iters"]),
    ("train.lr=fast", ["train.lr"]),
    ("model.hidden_dims=abc", ["model.hidden_dims"]),
    ("model.zero_init=maybe", ["model.zero_init"]),
    ("data.name=nosuch", ["data.name", "nosuch", "8gaussians", "checkerboard", "file"]),
    ("model.solver.name=nosuch", ["model.solver", "nosuch", "dopri5", "rk4"]),
    ("eval.solver.name=nosuch", ["eval.solver", "nosuch", "dopri5", "rk4"]),
    ("model.layer=nosuch", ["model.layer", "nosuch", "concatsquash", "concat", "ignore"]),
    ("model.activation=nosuch", ["model.activation", "nosuch", "tanh", "softplus", "swish"]),
    ("model.divergence=nosuch", ["model.divergence", "nosuch", "exact", "hutchinson"]),
    ("eval.divergence=nosuch", ["eval.divergence", "nosuch", "exact", "hutchinson"]),
    # (keys of the previous release: moved to their sections, named there)
    ("model.probe=nosuch", ["model.divergence.probe", "nosuch", "gaussian", "rademacher"]),
    ("eval.probe=nosuch", ["eval.divergence.probe", "nosuch", "gaussian", "rademacher"]),
    ("track.wandb=nosuch", ["track.wandb", "nosuch", "offline", "online", "disabled"]),
    ("model.family=nosuch", ["model.family", "nosuch", "ffjord"]),
    ("train.batch_size=0", ["train.batch_size"]),
    ("train.iters=-1", ["train.iters"]),
    ("model.solver.name=rk4 model.solver.steps=0", ["model.solver", "steps"]),
    ("data.name=file", ["data.path"]),
    ("train.iters", ["train.iters", "key=value"]),
]


@pytest.mark.parametrize("override,words", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_bad_config_is_a_one_line_config_error(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(TOY_CONFIG, override.split())
    msg = str(info.value)
    assert msg and "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_overrides_need_an_equals_sign() -> None:
    for bad in ("train.iters", "=3", "--train.iters"):
        with pytest.raises(ConfigError, match="key=value"):
            parse_overrides([bad])
    assert parse_overrides(["a.b=1", "c=[1,2]"]) == {"a": {"b": 1}, "c": [1, 2]}


def test_base_inheritance(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(
        "seed: 3\nmodel:\n  family: ffjord\n  hidden_dims: [32, 32]\n  activation: softplus\n"
        "train:\n  iters: 10\n  lr: 0.01\n"
    )
    (tmp_path / "sub" / "child.yaml").write_text(
        "_base_: ../base.yaml\nmodel:\n  activation: swish\ntrain:\n  iters: 20\n"
    )
    cfg = load_config(tmp_path / "sub" / "child.yaml", ["train.lr=0.5"])
    assert cfg.seed == 3  # inherited
    assert list(cfg.model.hidden_dims) == [32, 32]  # inherited
    assert cfg.model.activation == "swish"  # overridden by the child
    assert cfg.train.iters == 20
    assert cfg.train.lr == 0.5  # the command line wins
    assert "_base_" not in cfg
    # A chain that loops back is an error, not a hang.
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML") as info:
        load_config(tmp_path / "bad.yaml")
    assert "\n" not in str(info.value)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "nofamily.yaml").write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="model.family"):
        load_config(tmp_path / "nofamily.yaml")


def test_every_dataset_name_is_accepted_by_the_config() -> None:
    for name in sorted(DATASETS):
        # Some data sets need a path (file, image folders); validation only checks it is set.
        cfg = load_config(TOY_CONFIG, [f"data.name={name}", "data.path=somewhere"])
        assert cfg.data.name == name


def test_2d_plot_window_follows_the_data_not_a_fixed_square() -> None:
    reporting = load_experiment_module("reporting")

    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (20_000, 2)) * [10.0, 2.0] + [500.0, -7.0]  # far from [-4, 4]^2
    x[0] = [1e9, 1e9]  # one outlier must not stretch the window (quantiles, not min/max)
    (x_lo, x_hi), (y_lo, y_hi) = reporting.data_window(x, quantile=0.005, margin=0.15)
    # Uniform data: the 0.5% / 99.5% quantiles are lo + 0.005 span and hi − 0.005 span,
    # widened by 15% of their distance on each side.
    for (lo, hi), (a, span) in (((x_lo, x_hi), (500.0, 10.0)), ((y_lo, y_hi), (-7.0, 2.0))):
        q_lo, q_hi = a + 0.005 * span, a + 0.995 * span
        assert lo == pytest.approx(q_lo - 0.15 * (q_hi - q_lo), abs=0.02 * span)
        assert hi == pytest.approx(q_hi + 0.15 * (q_hi - q_lo), abs=0.02 * span)
