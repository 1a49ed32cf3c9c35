"""Writers of small MAF tabular archives in the real file formats (shared by the tests).

A raw 8-column POWER ``.npy``, a GAS DataFrame pickle, the two HEPMASS CSVs with
their header and the test file's extra column, a 43-column MINIBOONE ``.npy``
and a BSDS300 HDF5 file with ``train``/``validation``/``test``, each built to
exercise the rules of ``shared/notes/maf-tabular.md``
(``tests/test_tabular.py`` checks the loaders against them). Training tests
reach them through the ``maf_archive`` fixture of ``conftest.py``.
:func:`write_synthetic_miniboone` writes a MINIBOONE archive of the real size
(36 488 × 43) for timing runs.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd


def power_raw(n: int, seed: int = 0) -> np.ndarray:
    """Raw POWER rows: active power (kW, 3 decimals), reactive power (kW, 3 decimals),
    voltage (V, 2 decimals), intensity (A, 1 decimal), three sub-meterings (Wh,
    integers), time of day (minutes, assumed)."""
    rng = np.random.default_rng(seed)
    active = np.round(np.clip(rng.gamma(1.5, 0.7, n), 0.076, 11.122), 3)
    reactive = np.round(np.clip(rng.gamma(1.2, 0.1, n), 0.0, 1.39), 3)
    voltage = np.round(rng.normal(240.8, 3.2, n).clip(223.2, 254.15), 2)
    intensity = np.round(np.clip(active * 1000 / voltage + rng.normal(0, 0.2, n), 0.2, 48.4), 1)
    sub = np.stack(
        [
            rng.integers(0, 89, n) * (rng.random(n) < 0.1),
            rng.integers(0, 81, n) * (rng.random(n) < 0.3),
            rng.integers(0, 32, n) * (rng.random(n) < 0.6),
        ],
        1,
    )
    time = rng.integers(0, 1440, n)
    cols = [active, reactive, voltage, intensity, *sub.T, time]
    return np.stack(cols, 1).astype(np.float64)


def write_power(root: Path, x: np.ndarray | None = None, n: int = 300) -> Path:
    path = root / "power" / "data.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, power_raw(n) if x is None else x)
    return path


GAS_SENSORS = [f"TGS26{t}_{k}" for k in (1, 2, 3, 4) for t in ("02", "00", "10", "20")]


def gas_frame(n: int = 400, seed: int = 1) -> pd.DataFrame:
    """19 columns: Time, Meth, Eth, 16 sensors. Sensors 0-2 and 3-5 are chains of
    near-duplicates (a, a + e, a + e + e'; all pairwise corr > 0.98), 6-7, 8-9,
    10-11 and 12-13 pairs (corr ~0.997), 14-15 at corr ~0.95 (both kept). Eth
    copies sensor 12, so it must go before the correlation loop. 8 columns stay."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8))
    sensors = np.empty((n, 16))
    for g, start in ((0, 0), (1, 3)):  # chains of three
        sensors[:, start] = z[:, g]
        sensors[:, start + 1] = sensors[:, start] + 0.05 * rng.normal(size=n)
        sensors[:, start + 2] = sensors[:, start + 1] + 0.05 * rng.normal(size=n)
    for g, start in ((2, 6), (3, 8), (4, 10), (5, 12)):  # pairs
        sensors[:, start] = z[:, g]
        sensors[:, start + 1] = z[:, g] + 0.08 * rng.normal(size=n)
    sensors[:, 14] = z[:, 6]
    sensors[:, 15] = 0.95 * z[:, 6] + np.sqrt(1 - 0.95**2) * z[:, 7]
    sensors = 2.0 + 0.6 * sensors  # sensor conductances: positive, a few units
    frame = pd.DataFrame(sensors, columns=GAS_SENSORS)
    frame.insert(0, "Time", np.arange(n) * 0.01)
    frame.insert(1, "Meth", np.round(np.abs(rng.normal(200, 150, n)), 2))
    frame.insert(2, "Eth", 5.0 * sensors[:, 12] + 1.0)  # corr 1 with sensor 12
    return frame


def write_gas(root: Path, frame: pd.DataFrame | None = None) -> Path:
    path = root / "gas" / "ethylene_CO.pickle"
    path.parent.mkdir(parents=True, exist_ok=True)
    (gas_frame() if frame is None else frame).to_pickle(path)
    return path


HEPMASS_HEADER = ["# label", *(f"f{j}" for j in range(27))]
# Features whose smallest value repeats > 5 times among the signal rows: the
# number of jets (f5), the four b-tags (f9, f13, f17, f21) and f3, whose
# minimum occurs exactly 6 times. f4's minimum occurs exactly 5 times (kept);
# f7 repeats its *largest* value 40 times (kept: MAF looks at the smallest).
HEPMASS_DROPPED = ("f3", "f5", "f9", "f13", "f17", "f21")


def hepmass_features(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(size=(n, 27))
    x[:, 5] = rng.integers(1, 6, n)
    for j in (9, 13, 17, 21):
        x[:, j] = rng.choice([0.0, 1.0, 2.0], n, p=[0.5, 0.3, 0.2])
    x[:6, 3] = -5.0  # the minimum, 6 times
    x[:5, 4] = -5.0  # the minimum, 5 times
    x[:40, 7] = 5.0  # the maximum, 40 times
    return x[rng.permutation(n)]


def hepmass_frames(
    n_signal: int = 300, n_background: int = 200, n_test: int = 240, seed: int = 2
) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows = np.concatenate([hepmass_features(n_signal, rng), rng.normal(size=(n_background, 27))])
    label = np.r_[np.ones(n_signal), np.zeros(n_background)]
    order = rng.permutation(len(rows))
    train = pd.DataFrame(np.column_stack([label, rows])[order], columns=HEPMASS_HEADER)
    t_label = (rng.random(n_test) < 0.5).astype(float)
    t_rows = rng.normal(size=(n_test, 27))
    test = pd.DataFrame(np.column_stack([t_label, t_rows]), columns=HEPMASS_HEADER)
    test["mass"] = 1000.0  # the test file's extra last column
    return train, test


def write_hepmass(
    root: Path, frames: tuple[pd.DataFrame, pd.DataFrame] | None = None
) -> tuple[Path, Path]:
    folder = root / "hepmass"
    folder.mkdir(parents=True, exist_ok=True)
    train, test = hepmass_frames() if frames is None else frames
    paths = folder / "1000_train.csv", folder / "1000_test.csv"
    for frame, path in zip((train, test), paths):
        frame.to_csv(path, index=False, float_format="%.6f")
    return paths


def miniboone_raw(n: int, seed: int = 3) -> np.ndarray:
    """MiniBooNE-like particle-ID features: correlated, skewed, of mixed scales."""
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(5, 43)) * rng.uniform(0.2, 1.0, 43)
    z = rng.normal(size=(n, 5)) @ loadings + 0.5 * rng.normal(size=(n, 43))
    scales = 10.0 ** rng.uniform(-2, 3, 43)
    x = z * scales
    skewed = rng.random(43) < 0.4
    x[:, skewed] = np.exp(0.5 * z[:, skewed]) * scales[skewed]
    return x


def write_miniboone(root: Path, x: np.ndarray | None = None, n: int = 400) -> Path:
    path = root / "miniboone" / "data.npy"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, miniboone_raw(n) if x is None else x)
    return path


def write_synthetic_miniboone(root: str | Path, n: int = 36488, seed: int = 3) -> Path:
    """A MINIBOONE archive of the real size (36 488 × 43) under ``root``, for timing runs:
    ``build_dataset("miniboone", path=root)`` then gives 29 556 / 3 284 / 3 648 rows."""
    return write_miniboone(Path(root), miniboone_raw(n, seed))


def bsds300_splits(sizes: tuple[int, int, int] = (300, 60, 80), seed: int = 4) -> list:
    rng = np.random.default_rng(seed)
    # Patches of 8x8 grey levels with the DC component removed, last pixel dropped.
    return [(rng.normal(size=(n, 63)) * 0.05).astype(np.float32) for n in sizes]


def write_bsds300(root: Path, splits: dict | None = None) -> Path:
    path = root / "BSDS300" / "BSDS300.hdf5"
    path.parent.mkdir(parents=True, exist_ok=True)
    if splits is None:
        splits = dict(zip(("train", "validation", "test"), bsds300_splits()))
    with h5py.File(path, "w") as f:
        for key, x in splits.items():
            f.create_dataset(key, data=x)
    return path


WRITERS = {
    "power": write_power,
    "gas": write_gas,
    "hepmass": write_hepmass,
    "miniboone": write_miniboone,
    "bsds300": write_bsds300,
}


def write_archive(root: Path) -> Path:
    for write in WRITERS.values():
        write(root)
    return root
