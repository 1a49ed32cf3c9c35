"""Data sets: a name → builder registry and one interface for the training loop.

Every data set gives a deterministic training stream (a batch is a function
of the run's seed and the iteration, so a resumed run sees the same batches),
fixed validation and test arrays, and — where known — the exact data
log-density and entropy. Image data (``kind='image'``) keep integer pixel
levels in ``val``/``test`` and dequantise them with ``eval_transform``
(fresh, seeded noise at every evaluation; see :mod:`cnf.data.images`).
Tabular data are the user's own file (``file``, standardised with its
training split's statistics by default) and the five MAF benchmarks
(``power``, ``gas``, ``hepmass``, ``miniboone``, ``bsds300``; see
:mod:`cnf.data.tabular`).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnf.data.files import DataError, load_array, split_array
from cnf.data.images import IMAGE_DATASETS, bpd_offset, dequantize, flip_horizontally
from cnf.data.tabular import TABULAR_DATASETS, load_tabular
from cnf.data.toy import TOY_DATASETS, toy_entropy, toy_log_density
from cnf.registry import Registry

__all__ = [
    "DataError",
    "Dataset",
    "DATASETS",
    "DatasetSpec",
    "dataset_kind",
    "dataset_needs_path",
    "build_dataset",
    "dataset_from_config",
    "batch_rng",
    "load_tabular",
]


def batch_rng(seed: int, iteration: int, rank: int = 0) -> np.random.Generator:
    """The generator for one training batch: a pure function of (seed, iteration, rank)."""
    return np.random.default_rng([seed, iteration, rank])


@dataclass
class Dataset:
    """A data set as the training loop sees it.

    Attributes:
        name: Registry name.
        event_shape: Shape of one sample, e.g. ``(2,)``.
        val, test: Fixed held-out arrays ``(N, *event_shape)``.
        sample_train: ``(rng, n) -> (n, *event_shape)`` training batch.
        train: The finite training split ``(N, *event_shape)`` that
            ``sample_train`` draws rows from (image data: integer levels, as
            ``val``/``test``); None for the infinite toy streams.
        log_density: Exact data log-density, if known.
        entropy: ``(H, stderr)`` in nats, if known.
        kind: ``toy`` | ``tabular`` | ``image``.
        num_levels: Image data: grey levels per pixel (bits/dim offset ``log2`` of it).
        eval_transform: ``(held_out, rng) -> model input`` for ``val``/``test``
            batches (image data: uniform dequantisation); None: use as is.
        image_shape: Image data: ``(C, H, W)`` of one image (for sample grids).
        nll_offset: Nats added to every per-sample NLL or NELBO so that it is
            in the units of the stored data: ``sum_d log sigma_d`` of the
            standardising map ``x -> (x - mu) / sigma`` of a user's data file
            (the change of variables ``log p_x(x) = log p_y(y) - sum_d log
            sigma_d``). 0 for data used as stored, and for the MAF benchmarks,
            whose published NLLs are those of the standardised data.
    """

    name: str
    event_shape: tuple[int, ...]
    val: np.ndarray
    test: np.ndarray
    sample_train: Callable[[np.random.Generator, int], np.ndarray]
    log_density: Callable[[np.ndarray], np.ndarray] | None = None
    entropy: tuple[float, float] | None = None
    kind: str = "toy"
    train: np.ndarray | None = None  # None: an infinite stream
    num_levels: int | None = None
    eval_transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None
    image_shape: tuple[int, int, int] | None = None
    nll_offset: float = 0.0

    @property
    def dim(self) -> int:
        return int(np.prod(self.event_shape))

    @property
    def bpd_offset(self) -> float | None:
        """``log2(num_levels)`` for image data (bits/dim of [0, 1)-scaled data), else None."""
        return bpd_offset(self.num_levels) if self.num_levels else None


def _fixed_rng(name: str, split: str) -> np.random.Generator:
    # Held-out sets do not depend on the run's seed: every seed of a sweep is
    # scored on the same points.
    return np.random.default_rng([zlib.crc32(name.encode()), zlib.crc32(split.encode())])


def _toy(name: str, *, test_size: int, val_size: int, **_: object) -> Dataset:
    sampler = TOY_DATASETS[name]
    log_density = None
    if toy_log_density(name, np.zeros((1, 2))) is not None:
        log_density = lambda x, _n=name: toy_log_density(_n, x)  # noqa: E731
    return Dataset(
        name=name,
        event_shape=(2,),
        val=sampler(_fixed_rng(name, "val"), val_size),
        test=sampler(_fixed_rng(name, "test"), test_size),
        sample_train=sampler,
        log_density=log_density,
        entropy=toy_entropy(name),
        kind="toy",
    )


def _rows_sampler(train: np.ndarray) -> Callable[[np.random.Generator, int], np.ndarray]:
    # The seeded-batch rule: a batch is a function of its generator alone, so
    # a resumed run draws exactly the rows of an uninterrupted one.
    def sample_train(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.asarray(train[rng.integers(0, len(train), size=n)])

    return sample_train


def _check_batch(train: np.ndarray, total: int, batch_size: int, what: str) -> None:
    if len(train) < batch_size:
        raise DataError(
            f"{what}: {len(train)} training samples after the split "
            f"(of {total}) are fewer than train.batch_size={batch_size}"
        )


def _file(
    name: str, *, path: str | None, batch_size: int, standardize: bool = True, **_: object
) -> Dataset:
    if not path:
        raise DataError("data.name=file needs data.path=<file.npy|file.csv>")
    x = load_array(path)
    train, val, test = split_array(x)
    _check_batch(train, len(x), batch_size, f"data file {path}")
    nll_offset = 0.0
    if standardize:
        # Training-split statistics only, so held-out rows stay unseen.
        mu, sigma = train.mean(axis=0), train.std(axis=0)
        if (sigma == 0).any():
            raise DataError(
                f"data file {path}: column {int(np.argmax(sigma == 0))} is constant over the "
                "training split, cannot standardise it (set data.standardize=false)"
            )
        train, val, test = ((a - mu) / sigma for a in (train, val, test))
        nll_offset = float(np.log(sigma).sum())
    return Dataset(
        name="file",
        event_shape=(x.shape[1],),
        val=val,
        test=test,
        sample_train=_rows_sampler(train),
        kind="tabular",
        train=train,
        nll_offset=nll_offset,
    )


def _tabular(name: str, *, path: str | None, batch_size: int, **_: object) -> Dataset:
    if not path:
        layout = TABULAR_DATASETS[name].describe()
        raise DataError(f"data.name={name} needs data.path=<MAF archive root holding {layout}>")
    s = load_tabular(name, path)
    _check_batch(s.train, len(s.train) + len(s.val) + len(s.test), batch_size, f"data.name={name}")
    return Dataset(
        name=name,
        event_shape=(s.dim,),
        val=s.val,
        test=s.test,
        sample_train=_rows_sampler(s.train),
        kind="tabular",
        train=s.train,
    )


def _image(
    name: str,
    *,
    path: str | None,
    val_size: int,
    flatten: bool = True,
    hflip: bool = False,
    **_: object,
) -> Dataset:
    arrays = IMAGE_DATASETS[name](path=path, val_size=val_size)
    levels, shape = arrays.num_levels, arrays.image_shape
    event_shape = (int(np.prod(shape)),) if flatten else shape
    train = arrays.train.reshape(len(arrays.train), *event_shape)

    def sample_train(rng: np.random.Generator, n: int) -> np.ndarray:
        # Fresh dequantisation noise for every batch (docs/methods.md §1).
        x = dequantize(train[rng.integers(0, len(train), size=n)], levels, rng)
        if hflip:
            # Drawn after the batch from the same generator: the stream stays a
            # pure function of (seed, iteration), and runs without flips keep theirs.
            x = flip_horizontally(x, rng.random(n) < 0.5, shape)
        return x

    def eval_transform(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return dequantize(x, levels, rng)

    return Dataset(
        name=name,
        event_shape=event_shape,
        val=arrays.val.reshape(len(arrays.val), *event_shape),
        test=arrays.test.reshape(len(arrays.test), *event_shape),
        sample_train=sample_train,
        kind="image",
        train=train,
        num_levels=levels,
        eval_transform=eval_transform,
        image_shape=shape,
    )


@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set: its builder, its kind and whether it reads files.

    Attributes:
        build: ``(**data options) -> Dataset``.
        kind: ``toy`` | ``tabular`` | ``image``.
        needs_path: The data come from ``data.path`` (nothing is downloaded).
    """

    build: Callable[..., Dataset]
    kind: str
    needs_path: bool = False


DATASETS: Registry[DatasetSpec] = Registry(
    "data set",
    {
        **{k: DatasetSpec(functools.partial(_toy, k), "toy") for k in TOY_DATASETS},
        "file": DatasetSpec(functools.partial(_file, "file"), "tabular", needs_path=True),
        **{
            k: DatasetSpec(functools.partial(_tabular, k), "tabular", needs_path=True)
            for k in TABULAR_DATASETS
        },
        **{
            k: DatasetSpec(functools.partial(_image, k), "image", needs_path=k != "digits")
            for k in IMAGE_DATASETS
        },
    },
)


def dataset_kind(name: str, *, flatten: bool = True) -> str:
    """``image`` for image data kept as ``(C, H, W)``, else ``vector``."""
    return "image" if DATASETS[name].kind == "image" and not flatten else "vector"


def dataset_needs_path(name: str) -> bool:
    """Whether the data set reads its files from ``data.path``."""
    return DATASETS[name].needs_path


def build_dataset(
    name: str,
    *,
    path: str | None = None,
    test_size: int = 5000,
    val_size: int = 1000,
    batch_size: int = 1,
    flatten: bool = True,
    standardize: bool = True,
    hflip: bool = False,
) -> Dataset:
    """Build a registered data set; unknown names raise :class:`DataError` listing the valid ones.

    ``path``: the file (``file``), folder (images) or MAF archive root (tabular
    benchmarks). ``flatten`` applies to image data: event shape ``(C·H·W,)``
    (True) or ``(C, H, W)``. ``standardize`` applies to ``file`` data: subtract
    the training split's mean and divide by its std (``Dataset.nll_offset``
    then converts NLLs back to the file's units). ``hflip`` (image data) flips
    each training image left-right with probability ½ (the training stream
    only; held-out images are never flipped).
    """
    try:
        spec = DATASETS[name]
    except ValueError as e:
        raise DataError(str(e)) from None
    return spec.build(
        path=path,
        test_size=test_size,
        val_size=val_size,
        batch_size=batch_size,
        flatten=flatten,
        standardize=standardize,
        hflip=hflip,
    )


def dataset_from_config(cfg: Any) -> Dataset:
    """:func:`build_dataset` from a resolved run config (its ``data`` and ``train.batch_size``)."""
    return build_dataset(
        cfg.data.name,
        path=cfg.data.path,
        test_size=cfg.data.test_size,
        val_size=cfg.data.val_size,
        batch_size=cfg.train.batch_size,
        flatten=cfg.data.flatten,
        standardize=cfg.data.standardize,
        hflip=cfg.data.hflip,
    )
