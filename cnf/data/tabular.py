"""The MAF tabular benchmarks: POWER, GAS, HEPMASS, MINIBOONE and BSDS300.

The five density-estimation sets of MAF (Papamakarios et al. 2017), used by
FFJORD, RNODE, NSF and most papers since, read from the preprocessed archive
that accompanies MAF. ``root`` (``data.path``) is the archive's top folder::

    root/power/data.npy                         (N, 8) raw columns
    root/gas/ethylene_CO.pickle                 a pandas DataFrame (19 columns)
    root/hepmass/1000_train.csv, 1000_test.csv  label + 27 features (+1 in the test file)
    root/miniboone/data.npy                     (N, 43), already cleaned
    root/BSDS300/BSDS300.hdf5                   datasets train, validation, test (63 columns)

Each loader repeats MAF's own preprocessing step by step, so the arrays are
the ones every published number was measured on (``D`` = 6, 8, 21, 43, 63):

* **POWER** — a ``numpy.random.RandomState(42)`` shuffles the rows; column 3
  (global intensity) then column 1 (reactive power) are deleted; the same
  generator then draws uniform jitter, *voltage first* (0.01·U), then active
  power (0.001·U), then the three sub-metering columns (U); time gets none.
  Test = last 10 % of the rows, validation = last 10 % of the rest (``int``
  of 0.1·N both times); standardised with the numpy mean/std (ddof 0) of
  train + validation.
* **GAS** — drop ``Meth``, ``Eth``, ``Time``; while some column has more than
  one entry > 0.98 in its row of ``DataFrame.corr()`` (itself included),
  drop the first such column; standardise the whole table with the pandas
  mean/std (ddof 1); split as POWER, unshuffled.
* **HEPMASS** — keep the rows whose first column (the label) is 1 and drop
  that column, in both files; drop the test file's extra last column;
  standardise both with the training frame's pandas mean/std (ddof 1); drop
  every feature whose *smallest* value occurs more than 5 times in the whole
  standardised training file (MAF's quirk: it sorts the value counts by value
  and looks at the first, so a feature repeating only other values stays);
  validation = last 10 % of the training rows.
* **MINIBOONE** — split as POWER, unshuffled; numpy mean/std (ddof 0) of
  train + validation.
* **BSDS300** — the three stored splits as they are.

The splits are fixed by the archive (never by the run's seed). The arrays
keep the precision MAF computed them in — float64 for POWER and HEPMASS, the
sources' dtype for GAS and MINIBOONE (float64 in the archive as far as we
know) and BSDS300 (stored as is) — where MAF then casts to float32; the
training loop applies the model's dtype instead. The models' NLL is that of the standardised data,
as in every paper table, so the data set's ``nll_offset`` is 0.

**Cache.** The first load writes the three splits as ``.npy`` files (plus a
``meta.json`` written last, which marks the entry complete) into a cache
folder, each file atomically (temp file + ``os.replace``). Later loads
memory-map them copy-on-write, so data-parallel ranks on one node share the
pages. The folder is, in order: ``cache_dir=`` if given, ``$CNF_CACHE`` if
set, ``<root>/.cnf_cache`` if it can be written, else
``$XDG_CACHE_HOME/cnf/tabular`` (``~/.cache/cnf/tabular``). An entry is keyed
by :data:`LOADER_VERSION`, the set's name and, for every source file, its
name, size, modification time (ns) and a SHA-256 of its content — the whole
file up to 4 MiB, else 16 evenly spaced 256 KiB blocks including the first
and the last — so touching or replacing a source rebuilds the entry, while a
key costs a few milliseconds to compute on the 0.1–0.5 GB files.

pandas (GAS, HEPMASS) and h5py (BSDS300) are optional: ``pip install
'cnf[tabular]'``. They are imported only when a set is built from its
sources; a cached set needs numpy alone.

References:
    Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density
    Estimation", NeurIPS 2017 (the archive and its preprocessing).
    Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable
    Reversible Generative Models", ICLR 2019 (Table 2 uses these splits).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from cnf.data.files import DataError

__all__ = [
    "LOADER_VERSION",
    "TABULAR_DATASETS",
    "TabularSplits",
    "load_tabular",
    "source_digest",
    "tabular_cache_dirs",
]

# Bump when a loader's output changes: every cached entry is rebuilt.
LOADER_VERSION = 1

EXTRA = "pip install 'cnf[tabular]'"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class TabularSplits:
    """The standardised splits of one tabular set.

    Attributes:
        name: ``power`` | ``gas`` | ``hepmass`` | ``miniboone`` | ``bsds300``.
        train, val, test: ``(N, D)`` arrays.
        columns: Names of the source columns kept, in order (``.npy``/HDF5
            sources: their indices as strings).
        sources: The files read.
        cache: The cache entry (folder) written or read; None if not cached.
        from_cache: Whether the arrays were read from the cache.
    """

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    columns: tuple[str, ...]
    sources: tuple[Path, ...]
    cache: Path | None
    from_cache: bool

    @property
    def dim(self) -> int:
        return int(self.train.shape[1])


_Prepared = tuple[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]


@dataclass(frozen=True)
class _Spec:
    title: str
    folder: str
    layouts: tuple[tuple[str, ...], ...]  # alternative file sets, preferred first
    dim: int  # D on the real archive
    prepare: Callable[[tuple[Path, ...]], _Prepared]

    def describe(self) -> str:
        return " and ".join(f"{self.folder}/{f}" for f in self.layouts[-1])


# ------------------------------------------------------------------ helpers
def _need(module: str, name: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"data.name={name} needs {module}, an optional extra: {EXTRA}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _check_matrix(x: np.ndarray, path: Path, *, columns: int | None, what: str = "") -> None:
    """Numeric, 2-D, non-empty, ``columns`` wide, finite; else a one-line DataError."""
    where = f"{path}{what}"
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{where} holds {x.dtype} values, expected numbers")
    if x.ndim != 2:
        raise DataError(f"{where} has shape {x.shape}, expected a 2-D array (N, {columns or 'D'})")
    if columns is not None and x.shape[1] != columns:
        raise DataError(f"{where} has {x.shape[1]} columns, expected {columns}")
    if x.shape[0] == 0:
        raise DataError(f"{where} is empty (shape {x.shape})")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise DataError(
            f"{where} has {int(bad.sum())} rows with NaN or Inf (first at row {int(np.argmax(bad))})"
        )


def _load_npy(path: Path, *, columns: int) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated files raise ValueError or EOFError
        raise DataError(
            f"cannot read {path} (truncated or not a .npy file?): {_first_line(e)}"
        ) from None
    if not isinstance(x, np.ndarray):
        raise DataError(f"{path} is an .npz archive, expected one .npy array (N, {columns})")
    _check_matrix(x, path, columns=columns)
    return x


def _maf_split(x: Any, path: Path) -> tuple[Any, Any, Any]:
    """MAF's split: test = last ``int(0.1 N)`` rows, validation = last ``int(0.1 N')`` of the rest."""
    n = len(x)
    n_test = int(0.1 * n)
    n_val = int(0.1 * (n - n_test))
    if n_test < 1 or n_val < 1:
        raise DataError(f"{path}: {n} rows are too few for MAF's 10 % test / 10 % validation split")
    rest, test = x[:-n_test], x[-n_test:]
    return rest[:-n_val], rest[-n_val:], test


def _moments(x: np.ndarray, path: Path, columns: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """numpy mean and std (ddof 0) per column; a constant column is an error."""
    mu, sigma = x.mean(axis=0), x.std(axis=0)
    _check_spread(sigma, path, columns)
    return mu, sigma


def _check_spread(sigma: Any, path: Path, columns: tuple[str, ...]) -> None:
    zero = np.flatnonzero(np.asarray(sigma) == 0)
    if len(zero):
        raise DataError(
            f"{path}: column {columns[zero[0]]} is constant over the rows it is standardised "
            "with; cannot standardise it"
        )


def _index_names(n: int) -> tuple[str, ...]:
    return tuple(str(j) for j in range(n))


# ------------------------------------------------------------------ POWER
def _prepare_power(paths: tuple[Path, ...]) -> _Prepared:
    (path,) = paths
    x = _load_npy(path, columns=8)
    rng = np.random.RandomState(42)  # noqa: NPY002 - MAF's legacy generator, for the same arrays
    rng.shuffle(x)
    columns = tuple(c for c in _index_names(8) if c not in ("1", "3"))
    x = np.delete(x, 3, axis=1)  # global intensity (redundant with active power x voltage)
    x = np.delete(x, 1, axis=1)  # reactive power
    n = len(x)
    # Jitter breaks the ties of the quantised readings. MAF draws the voltage
    # noise before the active-power noise although the columns are in the
    # other order; the draws must be in its order to give its arrays.
    voltage = 0.01 * rng.rand(n, 1)
    active = 0.001 * rng.rand(n, 1)
    metering = rng.rand(n, 3)
    x = x + np.hstack([active, voltage, metering, np.zeros((n, 1))])
    train, val, test = _maf_split(x, path)
    mu, sigma = _moments(np.vstack([train, val]), path, columns)
    return (train - mu) / sigma, (val - mu) / sigma, (test - mu) / sigma, columns


# ------------------------------------------------------------------ GAS
GAS_DROPPED = ("Meth", "Eth", "Time")
GAS_COLUMNS = 19  # Time, two concentrations, 16 sensors


def _gas_hint(path: Path) -> str:
    npz = path.with_suffix(".npz")
    return (
        f"convert it once to {npz.name} next to it, with pandas<2 installed elsewhere: "
        f"python -c \"import numpy as np, pandas as pd; f = pd.read_pickle('{path}'); "
        f"np.savez('{npz}', values=f.to_numpy(), columns=np.array(f.columns, dtype=str))\""
    )


def _read_gas(path: Path, pd: ModuleType) -> Any:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                values, names = z["values"], z["columns"]
        except Exception as e:
            raise DataError(
                f"cannot read {path}: {_first_line(e)} (expected arrays 'values' (N, "
                f"{GAS_COLUMNS}) and 'columns' (names))"
            ) from None
        _check_matrix(values, path, columns=GAS_COLUMNS, what=" ('values')")
        if names.shape != (values.shape[1],):
            raise DataError(
                f"{path}: 'columns' has shape {names.shape}, expected ({values.shape[1]},)"
            )
        frame = pd.DataFrame(values, columns=[str(c) for c in names])
    else:
        try:
            frame = pd.read_pickle(path)
        except (EOFError, ValueError, pickle.UnpicklingError) as e:
            raise DataError(
                f"cannot read {path} (truncated or not a pickle?): {_first_line(e)}"
            ) from None
        except Exception as e:  # pandas internals of an old pickle protocol
            raise DataError(
                f"cannot unpickle {path} with pandas {pd.__version__} ({_first_line(e)}); "
                + _gas_hint(path)
            ) from None
        if not isinstance(frame, pd.DataFrame):
            raise DataError(f"{path} holds a {type(frame).__name__}, expected a pandas DataFrame")
    missing = [c for c in GAS_DROPPED if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path} has no column {missing[0]}; expected {GAS_COLUMNS} columns incl. "
            f"{', '.join(GAS_DROPPED)} (columns: {', '.join(map(str, frame.columns[:6]))}, ...)"
        )
    if frame.shape[1] != GAS_COLUMNS:
        raise DataError(f"{path} has {frame.shape[1]} columns, expected {GAS_COLUMNS}")
    return frame


def _check_frame(frame: Any, path: Path, pd: ModuleType) -> None:
    """The rows and columns that are used: numeric, non-empty and finite."""
    for col, dtype in frame.dtypes.items():
        if not pd.api.types.is_numeric_dtype(dtype):
            raise DataError(f"{path}: column '{col}' holds non-numeric values ({dtype})")
    if len(frame) == 0:
        raise DataError(f"{path} is empty (shape {frame.shape})")
    bad = ~np.isfinite(frame.to_numpy(dtype=np.float64)).all(axis=1)
    if bad.any():
        # The frame's index is the row's position in the file (0 = first data row).
        raise DataError(
            f"{path} has {int(bad.sum())} used rows with NaN or Inf "
            f"(first: data row {frame.index[int(np.argmax(bad))]})"
        )


def _prepare_gas(paths: tuple[Path, ...]) -> _Prepared:
    (path,) = paths
    pd = _need("pandas", "gas")
    frame = _read_gas(path, pd).drop(columns=list(GAS_DROPPED))
    _check_frame(frame, path, pd)
    while True:
        # Row sums of (corr > 0.98) count the column itself, so > 1 means a
        # near-duplicate exists; MAF removes the first such column and recounts.
        counts = (frame.corr() > 0.98).to_numpy().sum(axis=1)
        over = np.flatnonzero(counts > 1)
        if len(over) == 0:
            break
        frame = frame.drop(columns=frame.columns[over[0]])
    columns = tuple(str(c) for c in frame.columns)
    sigma = frame.std()  # pandas: ddof 1
    _check_spread(sigma.to_numpy(), path, columns)
    x = ((frame - frame.mean()) / sigma).to_numpy()
    train, val, test = _maf_split(x, path)
    return train, val, test, columns


# ------------------------------------------------------------------ HEPMASS
HEPMASS_FEATURES = 27


def _read_csv(path: Path, pd: ModuleType, *, extra: int) -> Any:
    try:
        frame = pd.read_csv(path, index_col=False)
    except Exception as e:  # EmptyDataError, ParserError, UnicodeDecodeError
        raise DataError(f"cannot read CSV file {path}: {_first_line(e)}") from None
    expected = 1 + HEPMASS_FEATURES + extra
    if frame.shape[1] != expected:
        layout = f"label + {HEPMASS_FEATURES} features" + (" + 1 extra" if extra else "")
        raise DataError(f"{path} has {frame.shape[1]} columns, expected {expected} ({layout})")
    return frame


def _signal_rows(frame: Any, path: Path) -> Any:
    label = frame.columns[0]
    frame = frame[frame[label] == 1].drop(columns=label)
    if len(frame) == 0:
        raise DataError(f"{path} has no rows with label (first column) 1")
    return frame


def _prepare_hepmass(paths: tuple[Path, ...]) -> _Prepared:
    train_path, test_path = paths
    pd = _need("pandas", "hepmass")
    train = _signal_rows(_read_csv(train_path, pd, extra=0), train_path)
    test = _signal_rows(_read_csv(test_path, pd, extra=1), test_path)
    test = test.drop(columns=test.columns[-1])  # the test file has one column too many
    _check_frame(train, train_path, pd)
    _check_frame(test, test_path, pd)
    if list(test.columns) != list(train.columns):
        j = next(j for j, (a, b) in enumerate(zip(test.columns, train.columns)) if a != b)
        raise DataError(
            f"{test_path}: column '{test.columns[j]}' where {train_path.name} has "
            f"'{train.columns[j]}'; expected the training file's columns plus one extra last column"
        )
    names = tuple(str(c) for c in train.columns)
    mu, sigma = train.mean(), train.std()  # pandas: ddof 1
    _check_spread(sigma.to_numpy(), train_path, names)
    x_train = ((train - mu) / sigma).to_numpy()
    x_test = ((test - mu) / sigma).to_numpy()
    # A feature whose smallest value repeats more than 5 times is treated as
    # discrete and dropped (MAF's rule, on the whole standardised train file).
    keep = [j for j in range(x_train.shape[1]) if (x_train[:, j] == x_train[:, j].min()).sum() <= 5]
    x_train, x_test = x_train[:, keep], x_test[:, keep]
    n_val = int(0.1 * len(x_train))
    if n_val < 1:
        raise DataError(
            f"{train_path}: {len(x_train)} signal rows are too few for a validation split"
        )
    return x_train[:-n_val], x_train[-n_val:], x_test, tuple(names[j] for j in keep)


# ------------------------------------------------------------------ MINIBOONE
def _prepare_miniboone(paths: tuple[Path, ...]) -> _Prepared:
    (path,) = paths
    x = _load_npy(path, columns=43)
    columns = _index_names(43)
    train, val, test = _maf_split(x, path)
    mu, sigma = _moments(np.vstack([train, val]), path, columns)
    return (train - mu) / sigma, (val - mu) / sigma, (test - mu) / sigma, columns


# ------------------------------------------------------------------ BSDS300
def _prepare_bsds300(paths: tuple[Path, ...]) -> _Prepared:
    (path,) = paths
    h5py = _need("h5py", "bsds300")
    try:
        fh = h5py.File(path, "r")
    except Exception as e:
        raise DataError(f"cannot read HDF5 file {path} (truncated?): {_first_line(e)}") from None
    out = []
    with fh:
        for key in ("train", "validation", "test"):
            node = fh.get(key)
            if not isinstance(node, h5py.Dataset):
                found = ", ".join(sorted(fh.keys())) or "nothing"
                raise DataError(
                    f"{path} has no dataset '{key}' (expected train, validation, test; found {found})"
                )
            try:
                x = node[()]
            except Exception as e:
                raise DataError(
                    f"cannot read '{key}' of HDF5 file {path}: {_first_line(e)}"
                ) from None
            _check_matrix(x, path, columns=63, what=f" ['{key}']")
            out.append(x)
    return out[0], out[1], out[2], _index_names(63)


TABULAR_DATASETS: dict[str, _Spec] = {
    "power": _Spec("POWER", "power", (("data.npy",),), 6, _prepare_power),
    "gas": _Spec("GAS", "gas", (("ethylene_CO.npz",), ("ethylene_CO.pickle",)), 8, _prepare_gas),
    "hepmass": _Spec(
        "HEPMASS", "hepmass", (("1000_train.csv", "1000_test.csv"),), 21, _prepare_hepmass
    ),
    "miniboone": _Spec("MINIBOONE", "miniboone", (("data.npy",),), 43, _prepare_miniboone),
    "bsds300": _Spec("BSDS300", "BSDS300", (("BSDS300.hdf5",),), 63, _prepare_bsds300),
}


# ------------------------------------------------------------------ layout
def _sources(name: str, root: Path) -> tuple[Path, ...]:
    """The source files of ``name`` under the archive root; wrong layouts are one-line errors."""
    spec = TABULAR_DATASETS[name]
    need = (
        f"data.name={name} needs data.path=<MAF archive root>, the folder holding {spec.describe()}"
    )
    if not root.exists():
        raise DataError(f"data.path {root} does not exist ({need})")
    all_files = {f for layout in spec.layouts for f in layout}
    if root.is_file():
        hint = ""
        if root.name in all_files and root.parent.name == spec.folder:
            hint = f"; use data.path={root.parent.parent}"
        raise DataError(f"data.path {root} is a file, not the archive root ({need}){hint}")
    folder = root / spec.folder
    for layout in spec.layouts:
        if all((folder / f).is_file() for f in layout):
            return tuple(folder / f for f in layout)
    if any((root / f).is_file() for f in all_files):
        raise DataError(
            f"data.path {root} is the {spec.title} folder itself, not the archive root: "
            f"use its parent, data.path={root.parent} (the folder holding {spec.describe()})"
        )
    other = [p for p in root.iterdir() if p.is_dir() and p.name.lower() == spec.folder.lower()]
    if other and other[0].name != spec.folder:
        raise DataError(
            f"{folder} not found, but {other[0]} is: the folder must be named '{spec.folder}' ({need})"
        )
    layout = spec.layouts[-1]
    missing = next(folder / f for f in layout if not (folder / f).is_file())
    raise DataError(f"{missing} not found ({need})")


# ------------------------------------------------------------------ cache
_BLOCK = 256 * 1024
_BLOCKS = 16
_WHOLE = 4 * 1024 * 1024


def _content_hash(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= _WHOLE:
            h.update(fh.read())
        else:
            for k in range(_BLOCKS):
                fh.seek((size - _BLOCK) * k // (_BLOCKS - 1))
                h.update(fh.read(_BLOCK))
    return h.hexdigest()


def source_digest(name: str, sources: tuple[Path, ...]) -> str:
    """The cache key of one set: SHA-256 of the loader version, the name and each source's
    name, size, mtime (ns) and content hash (whole file up to 4 MiB, else 16 sampled blocks)."""
    h = hashlib.sha256(f"cnf-tabular v{LOADER_VERSION} {name}".encode())
    for path in sources:
        st = path.stat()
        h.update(f"|{path.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
        h.update(_content_hash(path, st.st_size).encode())
    return h.hexdigest()


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "cnf" / "tabular"


def tabular_cache_dirs(root: str | Path, cache_dir: str | Path | None = None) -> list[Path]:
    """Cache folders in order of preference: ``cache_dir``, else ``$CNF_CACHE``, else
    ``<root>/.cnf_cache`` then the user cache (the first writable one is written)."""
    if cache_dir is not None:
        return [Path(cache_dir).expanduser()]
    if os.environ.get("CNF_CACHE"):
        return [Path(os.environ["CNF_CACHE"]).expanduser()]
    return [Path(root).expanduser() / ".cnf_cache", _user_cache()]


def _entry(folder: Path, name: str, key: str) -> Path:
    return folder / f"{name}-{key[:20]}"


def _read_entry(entry: Path, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("key") != key or meta.get("loader_version") != LOADER_VERSION:
            return None
        arrays = {}
        for split in SPLITS:
            # Copy-on-write: writable arrays (no torch warning), pages shared
            # between processes, the file never modified.
            x = np.load(entry / f"{split}.npy", mmap_mode="c", allow_pickle=False)
            if list(x.shape) != meta["shapes"][split] or str(x.dtype) != meta["dtypes"][split]:
                return None
            arrays[split] = x
        return arrays, meta
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, partial or damaged: rebuilt by the caller


def _write_entry(
    entry: Path, key: str, name: str, prepared: _Prepared, sources: tuple[Path, ...]
) -> None:
    # Lazy: cnf.train imports cnf.data.
    from cnf.train.checkpoint import atomic_write_bytes, atomic_write_text

    entry.mkdir(parents=True, exist_ok=True)
    arrays = dict(zip(SPLITS, prepared[:3]))
    for split, x in arrays.items():
        x = np.ascontiguousarray(x)
        atomic_write_bytes(
            entry / f"{split}.npy", lambda fh, x=x: np.save(fh, x, allow_pickle=False)
        )
    meta = {
        "loader_version": LOADER_VERSION,
        "key": key,
        "name": name,
        "sources": [str(p.resolve()) for p in sources],
        "shapes": {s: list(x.shape) for s, x in arrays.items()},
        "dtypes": {s: str(x.dtype) for s, x in arrays.items()},
        "columns": list(prepared[3]),
    }
    atomic_write_text(entry / "meta.json", json.dumps(meta, indent=1) + "\n")  # last: complete
    _evict_stale(entry, meta)


def _evict_stale(entry: Path, meta: dict) -> None:
    """Remove older entries of the same set built from the same source paths."""
    for other in entry.parent.glob(f"{meta['name']}-*"):
        if other == entry or not other.is_dir():
            continue
        try:
            old = json.loads((other / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if old.get("name") == meta["name"] and old.get("sources") == meta["sources"]:
            shutil.rmtree(other, ignore_errors=True)


def load_tabular(
    name: str,
    root: str | Path,
    *,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> TabularSplits:
    """Load one MAF tabular set with MAF's preprocessing, from the cache when it is current.

    Args:
        name: ``power`` | ``gas`` | ``hepmass`` | ``miniboone`` | ``bsds300``.
        root: The archive root (the folder holding ``power/``, ``gas/``, ...).
        cache: Read and write the cache (False: always build, write nothing).
        cache_dir: Cache folder; default ``$CNF_CACHE``, else ``<root>/.cnf_cache``
            when writable, else ``~/.cache/cnf/tabular``.

    Returns:
        The splits ``(N, D)`` with D = 6, 8, 21, 43, 63 on the real archive.

    Raises:
        DataError: unknown name, wrong layout, missing / truncated / malformed
            file, NaN or Inf, a missing optional extra; one line naming the file.

    Example:
        >>> s = load_tabular("miniboone", "/data/maf")  # doctest: +SKIP
        >>> s.train.shape, s.val.shape, s.test.shape  # doctest: +SKIP
        ((29556, 43), (3284, 43), (3648, 43))
    """
    if name not in TABULAR_DATASETS:
        raise DataError(f"unknown tabular set '{name}'; valid: {', '.join(TABULAR_DATASETS)}")
    root = Path(root).expanduser()
    sources = _sources(name, root)
    key = source_digest(name, sources)
    folders = tabular_cache_dirs(root, cache_dir) if cache else []
    for folder in folders:
        hit = _read_entry(_entry(folder, name, key), key)
        if hit is not None:
            arrays, meta = hit
            return TabularSplits(
                name=name,
                **arrays,
                columns=tuple(meta["columns"]),
                sources=sources,
                cache=_entry(folder, name, key),
                from_cache=True,
            )
    prepared = TABULAR_DATASETS[name].prepare(sources)
    written, errors = None, []
    for folder in folders:
        entry = _entry(folder, name, key)
        try:
            _write_entry(entry, key, name, prepared, sources)
            written = entry
            break
        except OSError as e:
            errors.append(f"{folder}: {_first_line(e)}")
    if folders and written is None:
        warnings.warn(
            f"tabular cache not written ({'; '.join(errors)}); set CNF_CACHE to a writable folder",
            stacklevel=2,
        )
    train, val, test, columns = prepared
    return TabularSplits(
        name=name,
        train=train,
        val=val,
        test=test,
        columns=columns,
        sources=sources,
        cache=written,
        from_cache=False,
    )
