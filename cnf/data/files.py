"""The user's own samples from a ``.npy`` or ``.csv`` file, split deterministically."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data set that cannot be used; the message says why in one line."""


def load_array(path: str | Path) -> np.ndarray:
    """Load an ``(N, D)`` float array from ``.npy`` or ``.csv`` (one sample per row).

    Raises:
        DataError: missing file, unknown suffix, unreadable content, wrong
            shape, or non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            x = _load_csv(path)
        else:
            raise DataError(f"data file {path} has suffix '{suffix}'; valid: .npy, .csv")
    except DataError:
        raise
    except Exception as e:  # numpy's own messages are long; keep the first line
        raise DataError(f"cannot read data file {path}: {str(e).splitlines()[0]}") from None
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"data file {path} holds {x.dtype} values, expected numbers")
    if x.ndim == 1:
        raise DataError(
            f"data file {path} has shape {x.shape}; expected (N, D): one sample per row"
        )
    if x.ndim != 2:
        raise DataError(f"data file {path} has shape {x.shape}; expected a 2-D array (N, D)")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"data file {path} is empty (shape {x.shape})")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise DataError(
            f"data file {path} has {int(bad.sum())} rows with NaN or Inf "
            f"(first at row {int(np.argmax(bad))})"
        )
    return x


def _load_csv(path: Path) -> np.ndarray:
    with open(path) as fh:
        first = fh.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        skip = 0
    except ValueError:  # a header line
        skip = 1
    with warnings.catch_warnings():
        # An empty file is reported as a DataError below; numpy's warning would
        # add a second, unexplained line to the one-line error.
        warnings.simplefilter("ignore")
        return np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)


def split_array(
    x: np.ndarray, *, val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle with a fixed seed (independent of the run's seed) and split train/val/test."""
    n = len(x)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    if n - n_test - n_val < 1 or (test_fraction > 0 and n_test < 1):
        raise DataError(f"{n} samples are too few to split into train/val/test")
    test, val, train = np.split(x[perm], [n_test, n_test + n_val])
    return train, val, test
