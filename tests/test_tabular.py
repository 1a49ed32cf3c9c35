"""The MAF tabular benchmarks against an independent reading of MAF's rules.

Small files in the archive's real formats (a raw 8-column POWER ``.npy``, a
GAS DataFrame pickle, the two HEPMASS CSVs with their header and the test
file's extra column, a 43-column MINIBOONE ``.npy``, a BSDS300 HDF5 file with
``train``/``validation``/``test``) are written by the test; each loader's
output must equal a reference implementation written here from the rules in
``docs/data.md`` (plain numpy / pandas, none of the loader's
helpers). Then: split sizes, standardisation statistics, each dropped column,
the cache (reused, rebuilt when a source changes, atomic, relocatable), the
``build_dataset`` API, and every malformed input as a one-line
:class:`DataError` naming the file.

The writers live in ``tests/maf_archive.py`` (shared with the training tests);
its :func:`write_synthetic_miniboone` writes a MINIBOONE archive of the real
size (36 488 × 43) for timing runs; no test uses it at full size.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import sys
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from maf_archive import (
    GAS_SENSORS,
    HEPMASS_DROPPED,
    HEPMASS_HEADER,
    WRITERS,
    bsds300_splits,
    gas_frame,
    hepmass_frames,
    miniboone_raw,
    power_raw,
    write_archive,
    write_bsds300,
    write_gas,
    write_hepmass,
    write_miniboone,
    write_power,
)

from cnf.config import load_config
from cnf.data import DATASETS, DataError, batch_rng, build_dataset, dataset_from_config, tabular
from cnf.data.tabular import TABULAR_DATASETS, load_tabular

TOY_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "ffjord" / "toy.yaml"
NAMES = ("power", "gas", "hepmass", "miniboone", "bsds300")
DIMS = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}


@pytest.fixture(autouse=True)
def _private_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Never read or write the real user cache; the default location rules apply.
    monkeypatch.delenv("CNF_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


# ============================================================ archive writers
# In tests/maf_archive.py, shared with the training tests.


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_archive(tmp_path_factory.mktemp("maf"))


# ============================================================ references
# Written from the note's rules alone: plain numpy / pandas, no loader helpers.
def sizes(n: int) -> tuple[int, int, int]:
    """MAF's split of n rows: (train, validation, test)."""
    n_test = n // 10
    n_val = (n - n_test) // 10
    return n - n_test - n_val, n_val, n_test


def split_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_train, n_val, _ = sizes(len(x))
    return x[:n_train], x[n_train : n_train + n_val], x[n_train + n_val :]


def ref_power(root: Path) -> list[np.ndarray]:
    raw = np.load(root / "power" / "data.npy")
    rs = np.random.RandomState(42)  # noqa: NPY002
    x = raw[rs.permutation(len(raw))]  # the same draws as shuffling the rows in place
    # Without intensity (3) and reactive power (1); row-major like MAF's arrays, so
    # numpy's column means sum in the same order (the layout changes the rounding).
    x = np.ascontiguousarray(x[:, [0, 2, 4, 5, 6, 7]])
    n = len(x)
    u_voltage, u_active, u_sub = rs.rand(n), rs.rand(n), rs.rand(n, 3)  # MAF's draw order
    x[:, 0] += 0.001 * u_active
    x[:, 1] += 0.01 * u_voltage
    x[:, 2:5] += u_sub
    train, val, test = split_rows(x)
    fit = np.concatenate([train, val])
    mu, sd = fit.mean(0), fit.std(0)
    return [(a - mu) / sd for a in (train, val, test)]


def ref_gas_columns(frame: pd.DataFrame) -> list[str]:
    cols = [c for c in frame.columns if c not in ("Meth", "Eth", "Time")]
    while True:
        corr = np.corrcoef(frame[cols].to_numpy(), rowvar=False)
        near = [c for c, k in zip(cols, (corr > 0.98).sum(1)) if k > 1]
        if not near:
            return cols
        cols.remove(near[0])


def ref_gas(root: Path) -> list[np.ndarray]:
    frame = pd.read_pickle(root / "gas" / "ethylene_CO.pickle")
    d = frame[ref_gas_columns(frame)]
    return list(split_rows(((d - d.mean()) / d.std()).to_numpy()))


def ref_hepmass_parts(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    tr = pd.read_csv(root / "hepmass" / "1000_train.csv", index_col=False)
    te = pd.read_csv(root / "hepmass" / "1000_test.csv", index_col=False)
    tr = tr.loc[tr.iloc[:, 0] == 1, list(tr.columns[1:])]
    te = te.loc[te.iloc[:, 0] == 1, list(te.columns[1:-1])]
    mu, sd = tr.mean(), tr.std()
    a, b = ((tr - mu) / sd).to_numpy(), ((te - mu) / sd).to_numpy()
    keep = []
    for j in range(a.shape[1]):
        counts = Counter(a[:, j].tolist())
        if counts[sorted(counts)[0]] <= 5:  # the count of the smallest value
            keep.append(j)
    return a[:, keep], b[:, keep], [tr.columns[j] for j in keep]


def ref_hepmass(root: Path) -> list[np.ndarray]:
    a, b, _ = ref_hepmass_parts(root)
    n_val = len(a) // 10
    return [a[: len(a) - n_val], a[len(a) - n_val :], b]


def ref_miniboone(root: Path) -> list[np.ndarray]:
    train, val, test = split_rows(np.load(root / "miniboone" / "data.npy"))
    fit = np.concatenate([train, val])
    mu, sd = fit.mean(0), fit.std(0)
    return [(a - mu) / sd for a in (train, val, test)]


def ref_bsds300(root: Path) -> list[np.ndarray]:
    with h5py.File(root / "BSDS300" / "BSDS300.hdf5", "r") as f:
        return [f[k][:] for k in ("train", "validation", "test")]


REFERENCES = {
    "power": ref_power,
    "gas": ref_gas,
    "hepmass": ref_hepmass,
    "miniboone": ref_miniboone,
    "bsds300": ref_bsds300,
}


# ============================================================ equality with the rules
@pytest.mark.parametrize("name", NAMES)
def test_loader_equals_an_independent_implementation_of_the_rules(archive: Path, name: str) -> None:
    s = load_tabular(name, archive, cache=False)
    ref = REFERENCES[name](archive)
    for split, got, want in zip(("train", "val", "test"), (s.train, s.val, s.test), ref):
        assert got.shape == want.shape, split
        assert got.dtype == want.dtype, split
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {split}")
    assert s.dim == DIMS[name] == TABULAR_DATASETS[name].dim
    assert s.cache is None and not s.from_cache


def test_split_sizes_follow_the_rules(archive: Path) -> None:
    got = {n: tuple(len(a) for a in REFERENCES[n](archive)) for n in NAMES}
    assert got["power"] == (243, 27, 30)  # 300 rows: test 30, then 27 of 270
    assert got["gas"] == (324, 36, 40)  # 400 rows
    assert got["miniboone"] == (324, 36, 40)
    assert got["bsds300"] == (300, 60, 80)  # as stored
    n_signal_test = int((hepmass_frames()[1].iloc[:, 0] == 1).sum())
    assert got["hepmass"] == (270, 30, n_signal_test)  # 300 signal rows, last 10 % validation
    for name in NAMES:
        s = load_tabular(name, archive, cache=False)
        assert (len(s.train), len(s.val), len(s.test)) == got[name]


@pytest.mark.parametrize(
    ("n", "expected"),
    [  # the real archive's row counts -> the split sizes of the note
        (2_049_280, (1_659_917, 184_435, 204_928)),  # POWER
        (1_052_065, (852_174, 94_685, 105_206)),  # GAS
        (36_488, (29_556, 3_284, 3_648)),  # MINIBOONE
    ],
)
def test_split_sizes_of_the_real_archive(n: int, expected: tuple[int, int, int]) -> None:
    train, val, test = tabular._maf_split(np.arange(n), Path("x"))
    assert (len(train), len(val), len(test)) == expected == sizes(n)
    np.testing.assert_array_equal(np.concatenate([train, val, test]), np.arange(n))


def test_standardisation_statistics(archive: Path) -> None:
    for name in ("power", "miniboone"):  # numpy ddof 0 over train + validation
        s = load_tabular(name, archive, cache=False)
        fit = np.concatenate([s.train, s.val])
        np.testing.assert_allclose(fit.mean(0), 0.0, atol=1e-12)
        np.testing.assert_allclose(fit.std(0), 1.0, rtol=1e-12)
        assert np.abs(s.test.mean(0)).max() > 1e-6  # the test split is not in the fit
    gas = load_tabular("gas", archive, cache=False)  # pandas ddof 1 over the whole table
    whole = np.concatenate([gas.train, gas.val, gas.test])
    np.testing.assert_allclose(whole.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(whole.std(0, ddof=1), 1.0, rtol=1e-12)
    hep = load_tabular("hepmass", archive, cache=False)  # ddof 1 over the whole train file
    fit = np.concatenate([hep.train, hep.val])
    np.testing.assert_allclose(fit.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(fit.std(0, ddof=1), 1.0, rtol=1e-12)
    bsds = load_tabular("bsds300", archive, cache=False)
    np.testing.assert_array_equal(bsds.train, ref_bsds300(archive)[0])  # not standardised


def test_power_drops_columns_3_then_1_and_jitters_in_maf_order(archive: Path) -> None:
    s = load_tabular("power", archive, cache=False)
    assert s.columns == ("0", "2", "4", "5", "6", "7")
    raw = np.load(archive / "power" / "data.npy")
    n, n_fit = len(raw), len(raw) - 30  # standardised with the first 270 rows (train + val)
    rs = np.random.RandomState(42)  # noqa: NPY002
    x = raw[rs.permutation(n)]
    u_voltage, u_active, u_sub = rs.rand(n), rs.rand(n), rs.rand(n, 3)
    out = np.concatenate([s.train, s.val, s.test])

    def standardised(y: np.ndarray) -> np.ndarray:
        return (y - y[:n_fit].mean()) / y[:n_fit].std()

    # Output column -> (raw column, jitter): active power 0.001 U, voltage 0.01 U
    # (drawn first), sub-metering U, time none; reactive power and intensity gone.
    jitter = {0: (0, 0.001 * u_active), 1: (2, 0.01 * u_voltage), 5: (7, 0.0)}
    jitter.update({2 + k: (4 + k, u_sub[:, k]) for k in range(3)})
    for col, (raw_col, noise) in jitter.items():
        np.testing.assert_allclose(out[:, col], standardised(x[:, raw_col] + noise), rtol=1e-10)
    # Drawing the two small jitters in column order instead gives other arrays.
    swapped = standardised(x[:, 0] + 0.001 * u_voltage)
    assert np.abs(out[:, 0] - swapped).max() > 1e-4


def test_gas_drops_meth_eth_time_then_near_duplicates_one_at_a_time(archive: Path) -> None:
    s = load_tabular("gas", archive, cache=False)
    # Each chain / pair keeps its last member: the first column with a
    # near-duplicate goes, then the counts are recomputed. Eth (corr 1 with
    # sensor 12) is dropped by name first, so sensor 13 survives its pair.
    kept = tuple(GAS_SENSORS[j] for j in (2, 5, 7, 9, 11, 13, 14, 15))
    assert s.columns == kept == tuple(ref_gas_columns(gas_frame()))
    assert s.dim == 8
    frame = gas_frame()
    corr = np.corrcoef(frame[list(kept)].to_numpy(), rowvar=False)
    assert (np.abs(corr - np.eye(8)) < 0.98).all()  # what stays has no near-duplicate
    assert corr[6, 7] > 0.9  # 14 and 15, correlated below the threshold, both stay


def test_hepmass_drops_the_label_the_extra_column_and_discrete_features(archive: Path) -> None:
    s = load_tabular("hepmass", archive, cache=False)
    assert s.columns == tuple(c for c in HEPMASS_HEADER[1:] if c not in HEPMASS_DROPPED)
    assert s.dim == 21 and "mass" not in s.columns and "# label" not in s.columns
    assert "f4" in s.columns and "f7" in s.columns  # min 5 times; max (not min) 40 times
    # The test split is standardised with the training frame's statistics.
    _, test, _ = ref_hepmass_parts(archive)
    np.testing.assert_array_equal(s.test, test)
    assert np.abs(s.test.mean(0)).max() > 1e-3


# ============================================================ cache
def test_cache_is_written_next_to_the_archive_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "maf"
    write_power(root)
    first = load_tabular("power", root)
    assert not first.from_cache and first.cache is not None
    assert first.cache.parent == root / ".cnf_cache"
    assert sorted(p.name for p in first.cache.iterdir()) == [
        "meta.json",
        "test.npy",
        "train.npy",
        "val.npy",
    ]
    assert not list((root / ".cnf_cache").rglob("*.tmp"))  # atomic writes leave no temp file
    # The second load reads the cache and never the preprocessing.
    spec = TABULAR_DATASETS["power"]

    def boom(paths: tuple[Path, ...]) -> None:
        raise AssertionError("rebuilt although the cache is current")

    monkeypatch.setitem(TABULAR_DATASETS, "power", dataclasses.replace(spec, prepare=boom))
    second = load_tabular("power", root)
    assert second.from_cache and second.cache == first.cache and second.columns == first.columns
    for a, b in zip((first.train, first.val, first.test), (second.train, second.val, second.test)):
        np.testing.assert_array_equal(a, b)
        assert b.flags.writeable  # copy-on-write memory map
    ds = build_dataset("power", path=str(root))  # the data set reads the cache too
    np.testing.assert_array_equal(ds.train, first.train)


def test_cache_is_rebuilt_when_the_source_changes(tmp_path: Path) -> None:
    root = tmp_path / "maf"
    path = write_power(root)
    first = load_tabular("power", root)
    write_power(root, power_raw(300, seed=9))  # same size, new content
    second = load_tabular("power", root)
    assert not second.from_cache and second.cache != first.cache
    assert not np.array_equal(first.train, second.train)
    np.testing.assert_array_equal(second.train, ref_power(root)[0])
    assert [p.name for p in (root / ".cnf_cache").iterdir()] == [second.cache.name]  # old evicted
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: rebuilt, same arrays
    third = load_tabular("power", root)
    assert not third.from_cache
    np.testing.assert_array_equal(third.train, second.train)
    assert load_tabular("power", root).from_cache


def test_cache_location_cnf_cache_fallback_and_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "maf"
    write_miniboone(root)
    # Not writable next to the archive (here: .cnf_cache is a file): the user cache.
    (root / ".cnf_cache").write_text("in the way\n")
    s = load_tabular("miniboone", root)
    assert s.cache is not None and s.cache.parent == tmp_path / "xdg" / "cnf" / "tabular"
    assert load_tabular("miniboone", root).from_cache
    monkeypatch.setenv("CNF_CACHE", str(tmp_path / "mine"))
    s = load_tabular("miniboone", root)
    assert s.cache is not None and s.cache.parent == tmp_path / "mine" and not s.from_cache
    assert load_tabular("miniboone", root, cache=False).cache is None
    s = load_tabular("miniboone", root, cache_dir=tmp_path / "explicit")
    assert s.cache is not None and s.cache.parent == tmp_path / "explicit"


def test_damaged_cache_entry_is_rebuilt(tmp_path: Path) -> None:
    root = tmp_path / "maf"
    write_miniboone(root)
    first = load_tabular("miniboone", root)
    train = first.cache / "train.npy"
    train.write_bytes(train.read_bytes()[:200])  # truncated
    second = load_tabular("miniboone", root)
    assert not second.from_cache
    np.testing.assert_array_equal(second.train, first.train)
    assert load_tabular("miniboone", root).from_cache


def test_unwritable_cache_warns_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "maf"
    write_miniboone(root)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file\n")
    monkeypatch.setenv("CNF_CACHE", str(blocker / "sub"))
    with pytest.warns(UserWarning, match="CNF_CACHE"):
        s = load_tabular("miniboone", root)
    assert s.cache is None and s.train.shape == (324, 43)


# ============================================================ the stable API
@pytest.mark.parametrize("name", NAMES)
def test_build_dataset_gives_the_standardised_splits(archive: Path, name: str) -> None:
    assert name in DATASETS
    ds = build_dataset(name, path=str(archive))
    ref = REFERENCES[name](archive)
    for got, want in zip((ds.train, ds.val, ds.test), ref):
        assert got.ndim == 2 and got.shape[1] == DIMS[name]
        np.testing.assert_array_equal(got, want)
    assert ds.kind == "tabular" and ds.event_shape == (ds.train.shape[1],)
    assert ds.nll_offset == 0.0 and ds.log_density is None and ds.entropy is None
    # The seeded-batch rule: a batch is train[rng.integers(0, len(train), size=n)].
    b = ds.sample_train(batch_rng(5, 11), 17)
    np.testing.assert_array_equal(b, ds.train[batch_rng(5, 11).integers(0, len(ds.train), 17)])
    np.testing.assert_array_equal(b, ds.sample_train(batch_rng(5, 11), 17))
    assert type(b) is np.ndarray


def test_tabular_from_a_config_and_batch_size_check(archive: Path) -> None:
    over = ["data.name=miniboone", f"data.path={archive}", "train.batch_size=64"]
    ds = dataset_from_config(load_config(TOY_CONFIG, over))
    assert ds.name == "miniboone" and ds.train.shape == (324, 43)
    with pytest.raises(DataError, match="batch_size=1000"):
        build_dataset("miniboone", path=str(archive), batch_size=1000)
    with pytest.raises(DataError, match="needs data.path"):
        build_dataset("power")


def test_dataset_train_of_other_kinds() -> None:
    assert build_dataset("8gaussians", test_size=10, val_size=10).train is None
    digits = build_dataset("digits")
    assert digits.train.shape[1:] == digits.test.shape[1:]
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert not hasattr(digits, "train_size") and not hasattr(digits, "extra")


# ============================================================ errors
def one_line_error(fn, *words: str) -> str:
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_layout_errors(tmp_path: Path) -> None:
    root = tmp_path / "maf"
    root.mkdir()
    one_line_error(lambda: load_tabular("power", root), str(root / "power" / "data.npy"))
    write_power(root)
    write_hepmass(root)
    (root / "hepmass" / "1000_test.csv").unlink()
    one_line_error(lambda: load_tabular("hepmass", root), str(root / "hepmass" / "1000_test.csv"))
    one_line_error(
        lambda: load_tabular("power", root / "power"),
        "POWER folder itself",
        f"data.path={root}",
    )
    one_line_error(
        lambda: load_tabular("power", root / "power" / "data.npy"), "is a file", f"data.path={root}"
    )
    one_line_error(lambda: load_tabular("power", tmp_path / "nowhere"), "does not exist")
    write_bsds300(tmp_path / "lower")
    (tmp_path / "lower" / "BSDS300").rename(tmp_path / "lower" / "bsds300")
    one_line_error(lambda: load_tabular("bsds300", tmp_path / "lower"), "'BSDS300'", "bsds300")
    one_line_error(lambda: load_tabular("cifar", root), "unknown tabular set")


NPY_CASES = {
    # name -> (set, writer of a bad array, words the message must hold)
    "power-7-columns": ("power", power_raw(300)[:, :7], ("7 columns", "expected 8")),
    "power-empty": ("power", np.zeros((0, 8)), ("empty",)),
    "power-nan": (
        "power",
        np.where(np.arange(300)[:, None] == 17, np.nan, power_raw(300)),
        ("NaN",),
    ),
    "power-too-few-rows": ("power", power_raw(9), ("too few",)),
    "power-1d": ("power", np.zeros(80), ("2-D",)),
    "power-strings": ("power", np.array([["a"] * 8] * 20), ("expected numbers",)),
    "miniboone-42-columns": ("miniboone", miniboone_raw(100)[:, :42], ("42 columns", "43")),
    "miniboone-inf": ("miniboone", np.where(np.eye(100, 43) > 0, np.inf, 1.0), ("Inf",)),
    "miniboone-constant": (
        "miniboone",
        np.c_[miniboone_raw(100)[:, :5], np.ones(100), miniboone_raw(100)[:, 6:]],
        ("column 5", "constant"),
    ),
}


@pytest.mark.parametrize("case", sorted(NPY_CASES))
def test_npy_file_errors(tmp_path: Path, case: str) -> None:
    name, x, words = NPY_CASES[case]
    path = WRITERS[name](tmp_path, x)
    one_line_error(lambda: load_tabular(name, tmp_path), str(path), *words)


@pytest.mark.parametrize("name", ["power", "miniboone"])
def test_truncated_npy(tmp_path: Path, name: str) -> None:
    path = WRITERS[name](tmp_path)
    _truncate(path)
    one_line_error(lambda: load_tabular(name, tmp_path), str(path), "truncated")


def _frame_without(col: str) -> pd.DataFrame:
    return gas_frame().drop(columns=col)


GAS_CASES = {
    "no-meth": (lambda: _frame_without("Meth"), ("no column Meth",)),
    "18-columns": (lambda: _frame_without(GAS_SENSORS[3]), ("18 columns", "expected 19")),
    "empty": (lambda: gas_frame().iloc[:0], ("empty",)),
    "inf": (lambda: gas_frame().assign(**{GAS_SENSORS[4]: np.inf}), ("NaN or Inf",)),
    "text": (lambda: gas_frame().assign(**{GAS_SENSORS[4]: "x"}), ("non-numeric",)),
    "series": (lambda: gas_frame()["Eth"], ("Series", "DataFrame")),
    "too-few-rows": (lambda: gas_frame(9), ("too few",)),
}


@pytest.mark.parametrize("case", sorted(GAS_CASES))
def test_gas_file_errors(tmp_path: Path, case: str) -> None:
    make, words = GAS_CASES[case]
    path = tmp_path / "gas" / "ethylene_CO.pickle"
    path.parent.mkdir()
    make().to_pickle(path)
    one_line_error(lambda: load_tabular("gas", tmp_path), str(path), *words)


def test_gas_pickle_that_current_pandas_cannot_read_names_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "gas" / "ethylene_CO.pickle"
    path.parent.mkdir()
    # A pickle of pandas internals that no longer exist (as an old pandas would write).
    path.write_bytes(b"\x80\x02cpandas.core.internals.gone\nBlockManager\nq\x00)\x81q\x01.")
    msg = one_line_error(
        lambda: load_tabular("gas", tmp_path), str(path), pd.__version__, "pandas<2", "np.savez"
    )
    # Following the hint (here with the installed pandas) gives the same arrays.
    frame = gas_frame()
    command = msg.split('python -c "', 1)[1].rstrip('"')
    assert f"'{path.with_suffix('.npz')}'" in command
    path.unlink()
    write_gas(tmp_path, frame)
    exec(command, {})  # noqa: S102 - the converter the message prints
    from_npz = load_tabular("gas", tmp_path, cache=False)
    assert from_npz.sources == (path.with_suffix(".npz"),)
    path.with_suffix(".npz").unlink()
    from_pickle = load_tabular("gas", tmp_path, cache=False)
    assert from_npz.columns == from_pickle.columns
    for a, b in zip(
        (from_npz.train, from_npz.val, from_npz.test),
        (from_pickle.train, from_pickle.val, from_pickle.test),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_gas_truncated_pickle(tmp_path: Path) -> None:
    path = write_gas(tmp_path)
    _truncate(path)
    one_line_error(lambda: load_tabular("gas", tmp_path), str(path), "truncated")
    path.write_bytes(pickle.dumps(1)[:3])
    one_line_error(lambda: load_tabular("gas", tmp_path), str(path))


def _hepmass_nan_row() -> int:
    """The 8th signal row of the training file (its position among the data rows)."""
    train, _ = hepmass_frames()
    return int(np.flatnonzero(train["# label"] == 1)[7])


def _hepmass_case(case: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    train, test = hepmass_frames()
    if case == "train-26-features":
        return train.drop(columns="f26"), test, "train"
    if case == "test-without-extra":
        return train, test.drop(columns="mass"), "test"
    if case == "test-names":
        return train, test.rename(columns={"f3": "g3"}), "test"
    if case == "nan":
        train.loc[_hepmass_nan_row(), "f11"] = np.nan
        return train, test, "train"
    if case == "no-signal":
        test["# label"] = 0.0
        return train, test, "test"
    if case == "text":
        train["f2"] = "abc"
        return train, test, "train"
    if case == "constant":
        train.loc[train["# label"] == 1, "f12"] = 0.5
        return train, test, "train"
    raise KeyError(case)


HEPMASS_WORDS = {
    "train-26-features": ("27 columns", "expected 28"),
    "test-without-extra": ("28 columns", "expected 29", "1 extra"),
    "test-names": ("'g3'", "'f3'"),
    "nan": ("NaN", f"data row {_hepmass_nan_row()}"),
    "no-signal": ("label",),
    "text": ("non-numeric",),
    "constant": ("f12", "constant"),
}


@pytest.mark.parametrize("case", sorted(HEPMASS_WORDS))
def test_hepmass_file_errors(tmp_path: Path, case: str) -> None:
    train, test, which = _hepmass_case(case)
    paths = write_hepmass(tmp_path, (train, test))
    path = paths[0] if which == "train" else paths[1]
    one_line_error(lambda: load_tabular("hepmass", tmp_path), str(path), *HEPMASS_WORDS[case])


def test_hepmass_empty_and_truncated_csv(tmp_path: Path) -> None:
    train_path, test_path = write_hepmass(tmp_path)
    _truncate(test_path, 0.0)
    one_line_error(lambda: load_tabular("hepmass", tmp_path), str(test_path), "cannot read CSV")
    write_hepmass(tmp_path)
    lines = train_path.read_text().splitlines()
    cut = next(i for i in range(len(lines) // 2, len(lines)) if lines[i].startswith("1.0"))
    # The file ends inside a signal row, 10 of its 28 fields written.
    train_path.write_text("\n".join([*lines[:cut], ",".join(lines[cut].split(",")[:10])]) + "\n")
    one_line_error(lambda: load_tabular("hepmass", tmp_path), str(train_path), "NaN")


def test_bsds300_file_errors(tmp_path: Path) -> None:
    tr, va, te = bsds300_splits()
    path = write_bsds300(tmp_path, {"train": tr, "test": te})
    one_line_error(lambda: load_tabular("bsds300", tmp_path), str(path), "'validation'")
    wide = np.zeros((10, 64), np.float32)
    write_bsds300(tmp_path, {"train": tr, "validation": wide, "test": te})
    one_line_error(lambda: load_tabular("bsds300", tmp_path), str(path), "64 columns", "63")
    bad = va.copy()
    bad[3, 4] = np.nan
    write_bsds300(tmp_path, {"train": tr, "validation": va, "test": bad})
    one_line_error(lambda: load_tabular("bsds300", tmp_path), str(path), "['test']", "NaN")
    write_bsds300(tmp_path, {"train": tr[:0], "validation": va, "test": te})
    one_line_error(lambda: load_tabular("bsds300", tmp_path), str(path), "empty")
    write_bsds300(tmp_path)
    _truncate(path)
    one_line_error(lambda: load_tabular("bsds300", tmp_path), str(path), "HDF5")


@pytest.mark.parametrize(
    ("name", "module"), [("gas", "pandas"), ("hepmass", "pandas"), ("bsds300", "h5py")]
)
def test_missing_optional_extra_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, module: str
) -> None:
    WRITERS[name](tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # import fails
    one_line_error(lambda: load_tabular(name, tmp_path), module, "pip install 'cnf[tabular]'")


def test_a_cached_set_needs_no_optional_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_gas(tmp_path)
    first = load_tabular("gas", tmp_path)
    monkeypatch.setitem(sys.modules, "pandas", None)
    second = load_tabular("gas", tmp_path)
    assert second.from_cache
    np.testing.assert_array_equal(first.train, second.train)


def test_synthetic_miniboone_generator_shape() -> None:
    x = miniboone_raw(500)
    assert x.shape == (500, 43) and np.isfinite(x).all()
    assert len(np.unique(x.std(0).round(6))) == 43  # columns of mixed scales
