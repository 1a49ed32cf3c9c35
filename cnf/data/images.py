"""Image data: scikit-learn's 8×8 digits, MNIST, CIFAR-10 and CelebA-64 files; dequantisation; bits/dim.

Pixels are integer *levels* ``0 … L−1`` (L = 17 for the digits, whose values
are 0–16; L = 256 for MNIST and CIFAR-10). A model sees continuous data in
``[0, 1)^D`` by **uniform dequantisation** (Theis et al. 2016; docs/methods.md §1)::

    x = (pixel + u) / L,   u ~ U[0, 1)^D,

drawn afresh for every training batch and at every evaluation (seeded there,
so evaluations repeat exactly). A continuous density ``p`` on ``[0, 1)^D``
then gives a discrete model ``P(pixel) ≥ L^{−D} · exp E_u[log p(x)]``, so

    bits/dim = −log p(x) / (D ln 2) + log2(L)

(offset 8 for 256 levels, log2 17 ≈ 4.087 for the digits) is an upper bound on
the discrete model's code length — the convention of every paper table.

Held-out arrays (``Dataset.val``/``test``) hold the integer levels; the
dataset's ``eval_transform(levels, rng)`` dequantises them, so the noise is
fresh for every evaluation yet reproducible from its seed.

Layout: ``flatten=True`` (the default) gives event shape ``(C·H·W,)`` for
MLP-based models (FFJORD, flow matching); ``flatten=False`` keeps
``(C, H, W)`` for convolutional ones (``data.flatten`` in the config).

File formats (read from ``data.path``, a directory; nothing is downloaded):

* MNIST — the IDX files ``train-images-idx3-ubyte`` and
  ``t10k-images-idx3-ubyte``, optionally gzipped, in the directory or in its
  ``MNIST/raw`` sub-folder (torchvision's layout).
* CIFAR-10 — the python pickles ``data_batch_1`` … ``data_batch_5`` and
  ``test_batch`` in ``cifar-10-batches-py/`` (the directory itself or a
  sub-folder of it). Each holds ``b"data"``: ``(N, 3072)`` uint8, channel-major.
* CelebA-64 — ``celeba64_train.npy`` and ``celeba64_test.npy``, uint8
  ``(N, 64, 64, 3)``, preprocessed once (:func:`load_celeba64`).

References:
    Theis, van den Oord & Bethge, "A note on the evaluation of generative
    models", ICLR 2016 (dequantisation and the bound).
    Dinh et al., "Density estimation using Real NVP", ICLR 2017.
    LeCun et al., the MNIST database (IDX format), http://yann.lecun.com/exdb/mnist/.
    Krizhevsky, "Learning multiple layers of features from tiny images", 2009 (CIFAR-10).
"""

from __future__ import annotations

import gzip
import math
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cnf.data.files import DataError, split_array

__all__ = [
    "IMAGE_DATASETS",
    "ImageArrays",
    "bpd_offset",
    "dequantize",
    "flip_horizontally",
    "load_celeba64",
    "load_cifar10",
    "load_digits_images",
    "load_mnist",
    "read_idx",
]


class ImageArrays:
    """Integer pixel levels of one image data set, split into train/val/test.

    Attributes:
        train, val, test: ``(N, C, H, W)`` uint8 arrays of levels ``0 … num_levels−1``.
        num_levels: Number of grey levels ``L``.
    """

    def __init__(self, train: np.ndarray, val: np.ndarray, test: np.ndarray, num_levels: int):
        self.train, self.val, self.test = train, val, test
        self.num_levels = int(num_levels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]


def dequantize(levels: np.ndarray, num_levels: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform dequantisation ``(levels + u) / L`` with ``u ~ U[0, 1)``; float64 in ``[0, 1)``.

    Uniforms are drawn in C order, so the noise of sample ``k`` is the same
    however the array is cut into batches (as long as the batches are
    dequantised in order from the same generator).
    """
    return (levels.astype(np.float64) + rng.random(levels.shape)) / num_levels


def flip_horizontally(x: np.ndarray, which: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """Mirror the images ``x[which]`` left-right (data augmentation of a training batch).

    Args:
        x: ``(N, *event_shape)``, event shape ``(C, H, W)`` or flattened ``(C·H·W,)``.
        which: ``(N,)`` booleans.
        image_shape: ``(C, H, W)`` of one image.
    """
    images = x.reshape(len(x), *image_shape).copy()
    images[which] = images[which][..., ::-1]
    return images.reshape(x.shape)


def bpd_offset(num_levels: int) -> float:
    """``log2(L)``: the bits/dim offset that undoes the scaling of L levels to ``[0, 1)``."""
    return math.log2(num_levels)


# ---------------------------------------------------------------- digits
def load_digits_images(*, val_fraction: float = 0.1, test_fraction: float = 0.2) -> ImageArrays:
    """scikit-learn's 1797 8×8 digits (values 0–16: 17 levels), split with a fixed seed.

    The split does not depend on the run's seed: every run is scored on the
    same 359 test images (20 %); 180 (10 %) are held out for validation.
    """
    from sklearn.datasets import load_digits

    x = load_digits().images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    train, val, test = split_array(
        x, val_fraction=val_fraction, test_fraction=test_fraction, seed=17
    )
    return ImageArrays(train, val, test, num_levels=17)


# ---------------------------------------------------------------- MNIST
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), gzipped if its name ends in ``.gz``.

    Header: two zero bytes, a type code (0x08 = unsigned byte, ...), the
    number of dimensions, then each dimension as a big-endian uint32.

    Raises:
        DataError: unreadable file, bad magic number, or a size that does not
            match the header.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {str(e).splitlines()[0]}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated (header of {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"IDX file {path}: header says shape {shape} ({expected} bytes of data), "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _find(folder: Path, names: list[str]) -> Path | None:
    for sub in (folder, folder / "MNIST" / "raw", folder / "raw"):
        for name in names:
            if (sub / name).is_file():
                return sub / name
    return None


def _check_dir(path: str | Path | None, dataset: str) -> Path:
    if not path:
        raise DataError(f"data.name={dataset} needs data.path=<directory with the {dataset} files>")
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"data.path {folder} is not a directory (data.name={dataset})")
    return folder


def load_mnist(path: str | Path | None, *, val_size: int = 5000) -> ImageArrays:
    """MNIST from its IDX files; ``val_size`` training images (at most 10 %) held out by a fixed seed.

    Raises:
        DataError: no such directory, missing or malformed files.
    """
    folder = _check_dir(path, "mnist")
    arrays = []
    for split in ("train", "t10k"):
        base = f"{split}-images-idx3-ubyte"
        found = _find(folder, [base, base + ".gz", f"{split}-images.idx3-ubyte"])
        if found is None:
            raise DataError(
                f"data.path {folder}: MNIST file {base}[.gz] not found "
                "(expected train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz])"
            )
        x = read_idx(found)
        if x.ndim != 3 or x.dtype != np.dtype(">u1"):
            raise DataError(
                f"{found}: expected unsigned-byte images (N, H, W), got {x.dtype} {x.shape}"
            )
        arrays.append(np.ascontiguousarray(x.astype(np.uint8))[:, None])
    train, test = arrays
    return _hold_out(train, test, val_size, num_levels=256)


def _hold_out(
    train: np.ndarray, test: np.ndarray, val_size: int, *, num_levels: int
) -> ImageArrays:
    n_val = max(1, min(val_size, len(train) // 10))
    if len(train) - n_val < 1 or len(test) < 1:
        raise DataError(f"{len(train)} training and {len(test)} test images are too few")
    perm = np.random.default_rng(0).permutation(len(train))
    return ImageArrays(train[perm[n_val:]], train[perm[:n_val]], test, num_levels=num_levels)


# ---------------------------------------------------------------- CIFAR-10
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only what a CIFAR batch holds (dicts, lists, bytes, numpy arrays).

    A pickle can run arbitrary code on load; restricting the globals it may
    name keeps a stray file in ``data.path`` from doing so.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch")


def _read_cifar_batch(path: Path) -> np.ndarray:
    try:
        with open(path, "rb") as fh:
            blob = _ArrayUnpickler(fh, encoding="bytes").load()
    except Exception as e:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(blob, dict):
        raise DataError(f"CIFAR-10 batch {path}: expected a dict, got {type(blob).__name__}")
    data = blob.get(b"data", blob.get("data"))
    if data is None:
        raise DataError(f"CIFAR-10 batch {path} has no 'data' entry")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DataError(
            f"CIFAR-10 batch {path}: expected uint8 data of shape (N, 3072), "
            f"got {data.dtype} {data.shape}"
        )
    return data.reshape(-1, 3, 32, 32)


def load_cifar10(path: str | Path | None, *, val_size: int = 5000) -> ImageArrays:
    """CIFAR-10 from its python pickle batches; ``val_size`` training images (≤ 10 %) held out.

    Raises:
        DataError: no such directory, missing or malformed batches.
    """
    folder = _check_dir(path, "cifar10")
    if not (folder / "test_batch").is_file() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in [*names, "test_batch"] if not (folder / n).is_file()]
    if missing:
        raise DataError(
            f"data.path {folder}: CIFAR-10 batches missing: {', '.join(missing)} "
            "(expected data_batch_1..5 and test_batch of cifar-10-batches-py)"
        )
    train = np.concatenate([_read_cifar_batch(folder / n) for n in names])
    test = _read_cifar_batch(folder / "test_batch")
    return _hold_out(train, test, val_size, num_levels=256)


# ---------------------------------------------------------------- CelebA 64×64
def load_celeba64(path: str | Path | None, *, val_size: int = 5000) -> ImageArrays:
    """CelebA at 64×64 from two preprocessed uint8 arrays; ``val_size`` training images held out.

    Expects ``celeba64_train.npy`` and ``celeba64_test.npy`` in ``data.path``,
    uint8 of shape ``(N, 64, 64, 3)`` or ``(N, 3, 64, 64)``, read with
    ``allow_pickle=False``. They are made once from the aligned CelebA images
    as in Score SDE / INDM: central 140×140 crop, resized to 64×64, split by
    the official ``list_eval_partition.txt`` (train 0, test 2).

    Raises:
        DataError: no such directory, missing or malformed arrays.
    """
    folder = _check_dir(path, "celeba64")
    arrays = []
    for split in ("train", "test"):
        f = folder / f"celeba64_{split}.npy"
        if not f.is_file():
            raise DataError(
                f"data.path {folder}: {f.name} not found (expected celeba64_train.npy and "
                "celeba64_test.npy, uint8 (N, 64, 64, 3))"
            )
        try:
            x = np.load(f, allow_pickle=False)
        except Exception as e:
            raise DataError(f"cannot read {f}: {str(e).splitlines()[0]}") from None
        if x.ndim == 4 and x.shape[1:] == (64, 64, 3):
            x = x.transpose(0, 3, 1, 2)
        if x.dtype != np.uint8 or x.shape[1:] != (3, 64, 64):
            raise DataError(f"{f}: expected uint8 (N, 64, 64, 3) images, got {x.dtype} {x.shape}")
        arrays.append(np.ascontiguousarray(x))
    return _hold_out(arrays[0], arrays[1], val_size, num_levels=256)


IMAGE_DATASETS: dict[str, Callable[..., ImageArrays]] = {
    "digits": lambda path=None, val_size=0: load_digits_images(),
    "mnist": lambda path=None, val_size=5000: load_mnist(path, val_size=val_size),
    "cifar10": lambda path=None, val_size=5000: load_cifar10(path, val_size=val_size),
    "celeba64": lambda path=None, val_size=5000: load_celeba64(path, val_size=val_size),
}
