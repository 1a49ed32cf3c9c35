"""Image data: digits, dequantisation, bits/dim, the logit transform, MNIST/CIFAR-10 file loaders.

The MNIST and CIFAR-10 tests write tiny files in the real formats (IDX,
python pickle batches) themselves; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_experiment_module

from cnf.config import ConfigError, load_config
from cnf.data import DataError, build_dataset
from cnf.data.images import dequantize, load_cifar10, load_mnist, read_idx
from cnf.evaluation import _bpd as bpd_metrics
from cnf.evaluation import evaluate_points
from cnf.flows.preprocess import Preprocess
from cnf.metrics import bits_per_dim
from cnf.models.base import EvalOutput, GenerativeModel

F64 = torch.float64


# ----------------------------------------------------------------- bits/dim
def test_bits_per_dim_by_hand() -> None:
    # D = 4 and an NLL of exactly 6 bits = 6 ln 2 nats: 1.5 bits per dimension
    # on the [0, 1) scale, plus log2(17) ≈ 4.0875 for 17 grey levels.
    nll = 6 * math.log(2)
    assert bits_per_dim(nll, 4, offset_bits=math.log2(17)) == pytest.approx(1.5 + 4.087462841)
    assert bits_per_dim(nll, 4) == pytest.approx(9.5)  # 256 levels: + 8
    # A uniform density on [0, 1)^D has NLL 0: exactly log2(L) bits/dim, the
    # code length of a uniform distribution over L levels.
    assert bits_per_dim(0.0, 64, offset_bits=math.log2(17)) == pytest.approx(math.log2(17))


def test_bpd_metrics_of_a_run() -> None:
    data = build_dataset("digits")
    m = {"test_nll": 64 * math.log(2) * 2.0, "test_nll_stderr": 64 * math.log(2) * 0.01}
    out = bpd_metrics(m, data, prefix="test_")
    assert out["test_bpd"] == pytest.approx(2.0 + math.log2(17))
    assert out["test_bpd_stderr"] == pytest.approx(0.01)
    assert "log2(17)" in out["bpd_convention"] and "D = 64" in out["bpd_convention"]
    # Only a bound: bits/dim of the NELBO, and the convention says so.
    only_bound = {"test_nelbo": 0.0, "test_nelbo_stderr": 0.0}
    out = bpd_metrics(only_bound, data, prefix="test_")
    assert (
        out["test_bpd"] == pytest.approx(math.log2(17)) and "upper bound" in out["bpd_convention"]
    )
    both = {**m, "test_nelbo": 0.0, "test_nelbo_stderr": 0.0}
    assert set(bpd_metrics(both, data, prefix="test_")) >= {"test_bpd", "test_nelbo_bpd"}
    assert bpd_metrics(m, build_dataset("8gaussians", test_size=10), prefix="test_") == {}


# ----------------------------------------------------------------- digits
def test_digits_shapes_levels_and_deterministic_split() -> None:
    np.random.seed(123)  # noqa: NPY002 - the split must not depend on any global seed
    a = build_dataset("digits")
    np.random.seed(456)  # noqa: NPY002
    b = build_dataset("digits", flatten=False)
    assert a.kind == "image" and a.num_levels == 17 and a.image_shape == (1, 8, 8)
    assert a.event_shape == (64,) and b.event_shape == (1, 8, 8)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert (len(a.val), len(a.test)) == (180, 359)
    np.testing.assert_array_equal(a.test, b.test.reshape(359, 64))
    np.testing.assert_array_equal(a.val, b.val.reshape(180, 64))
    assert a.test.dtype == np.uint8
    levels = np.unique(np.concatenate([a.test.ravel(), a.val.ravel()]))
    np.testing.assert_array_equal(levels, np.arange(17))
    assert a.bpd_offset == pytest.approx(math.log2(17))


def test_dequantised_digits_are_in_the_unit_cube_and_fresh() -> None:
    data = build_dataset("digits")
    x1 = data.sample_train(np.random.default_rng([0, 1]), 500)
    x2 = data.sample_train(np.random.default_rng([0, 2]), 500)
    again = data.sample_train(np.random.default_rng([0, 1]), 500)
    for x in (x1, x2):
        assert x.shape == (500, 64) and x.min() >= 0 and x.max() < 1
    np.testing.assert_array_equal(x1, again)  # a pure function of the batch's generator
    assert not np.allclose(x1, x2)
    # Held-out images: same pixels, fresh noise at every evaluation.
    e1 = data.eval_transform(data.test, np.random.default_rng(1))
    e2 = data.eval_transform(data.test, np.random.default_rng(2))
    assert e1.min() >= 0 and e1.max() < 1 and not np.allclose(e1, e2)
    np.testing.assert_array_equal(np.floor(e1 * 17).astype(np.uint8), data.test)
    np.testing.assert_array_equal(np.floor(e2 * 17).astype(np.uint8), data.test)


def test_dequantize_noise_does_not_depend_on_batching() -> None:
    levels = np.arange(40, dtype=np.uint8).reshape(10, 4) % 17
    whole = dequantize(levels, 17, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    parts = np.concatenate([dequantize(levels[i : i + 3], 17, rng) for i in range(0, 10, 3)])
    np.testing.assert_array_equal(whole, parts)


class _SumModel(GenerativeModel):
    """'NLL' = sum of the inputs: shows exactly what evaluate_points fed the model."""

    event_shape = (64,)

    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros((), dtype=F64))

    def evaluate(self, x, settings=None):
        return EvalOutput(nll=x.sum(1), stats={"nfe": 1})


def test_evaluate_split_dequantises_with_seeded_noise() -> None:
    data = build_dataset("digits")
    model = _SumModel()

    def run(batch_size: int, seed: int) -> float:
        res = evaluate_points(model, data.test, data, batch_size=batch_size, seed=seed)
        return float(res.nll.mean())

    a, b, c = run(100, 0), run(359, 0), run(100, 1)
    assert a == b  # independent of the batch size
    assert a != c  # fresh noise for another seed
    # The mean over pixels of (level + u)/17 with E[u] = 1/2.
    expected = float((data.test.astype(np.float64) + 0.5).sum(1).mean() / 17)
    assert a == pytest.approx(expected, abs=0.3)


def test_image_config_keys() -> None:
    cfg = load_config("configs/fm/otcfm_digits.yaml", ["data.flatten=false"])
    assert cfg.data.flatten is False
    with pytest.raises(ConfigError, match="data.path: data.name=mnist needs data.path"):
        load_config("configs/fm/otcfm_digits.yaml", ["data.name=mnist"])


# ----------------------------------------------------------------- logit transform
def test_logit_preprocessing_round_trip_and_logdet() -> None:
    flow = Preprocess(logit_alpha=0.05)
    x = torch.rand(5, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    z, logdet = flow(x)
    torch.testing.assert_close(flow.inverse(z), x)
    for i in range(5):
        jac = torch.autograd.functional.jacobian(
            lambda v: flow(v.reshape(1, 1, 2, 2))[0].reshape(4), x[i].reshape(4)
        )
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac).logabsdet)
    with pytest.raises(ValueError, match="alpha"):
        Preprocess(logit_alpha=0.5)


# ----------------------------------------------------------------- MNIST (IDX)
def _write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_loader_on_files_in_the_real_format(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    _write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train, gz=gz)
    _write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test, gz=gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(30) % 10, gz=gz)
    labels = read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}")
    np.testing.assert_array_equal(labels, np.arange(30) % 10)

    arrays = load_mnist(tmp_path, val_size=1000)
    assert arrays.num_levels == 256 and arrays.image_shape == (1, 28, 28)
    np.testing.assert_array_equal(arrays.test[:, 0], test)
    assert len(arrays.val) == 3 and len(arrays.train) == 27  # ≤ 10 % held out
    rows = {r.tobytes() for r in np.concatenate([arrays.train, arrays.val])[:, 0]}
    assert rows == {r.tobytes() for r in train}
    data = build_dataset("mnist", path=str(tmp_path), val_size=1000)
    assert data.event_shape == (784,) and data.num_levels == 256 and data.bpd_offset == 8.0
    x = data.sample_train(np.random.default_rng(0), 4)
    assert x.shape == (4, 784) and 0 <= x.min() and x.max() < 1


def test_mnist_bad_files_raise_one_line_data_errors(tmp_path: Path) -> None:
    def one_line(match: str, fn) -> None:
        with pytest.raises(DataError, match=match) as info:
            fn()
        assert "\n" not in str(info.value)

    one_line("not a directory", lambda: build_dataset("mnist", path=str(tmp_path / "nope")))
    one_line("needs data.path", lambda: build_dataset("mnist"))
    one_line("train-images-idx3-ubyte", lambda: load_mnist(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x12\x34\x08\x03" + bytes(20))
    one_line("bad magic", lambda: read_idx(tmp_path / "train-images-idx3-ubyte"))
    good = struct.pack(">BBBB", 0, 0, 8, 3) + struct.pack(">3I", 5, 28, 28)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(good + bytes(100))
    one_line("header says shape", lambda: read_idx(tmp_path / "train-images-idx3-ubyte"))
    (tmp_path / "broken.gz").write_bytes(b"not gzip")
    one_line("cannot read IDX", lambda: read_idx(tmp_path / "broken.gz"))


# ----------------------------------------------------------------- CIFAR-10 (pickles)
def _write_cifar(folder: Path, n_per_batch: int) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        blob = {
            b"batch_label": name.encode(),
            b"labels": [0] * n_per_batch,
            b"data": data,
            b"filenames": [b"x.png"] * n_per_batch,
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(blob, fh, protocol=2)
        written[name] = data
    return written


def test_cifar10_loader_on_pickles_in_the_real_format(tmp_path: Path) -> None:
    written = _write_cifar(tmp_path / "cifar-10-batches-py", 4)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        arrays = load_cifar10(path, val_size=5000)
        assert arrays.image_shape == (3, 32, 32) and arrays.num_levels == 256
        assert len(arrays.train) + len(arrays.val) == 20 and len(arrays.val) == 2
        # Channel-major rows: pixel (c, i, j) of image k is data[k, 1024 c + 32 i + j].
        k, c, i, j = 2, 1, 5, 7
        assert arrays.test[k, c, i, j] == written["test_batch"][k, 1024 * c + 32 * i + j]
    data = build_dataset("cifar10", path=str(tmp_path), flatten=False)
    assert data.event_shape == (3, 32, 32) and data.test.shape == (4, 3, 32, 32)


def test_cifar10_bad_files_raise_one_line_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="batches missing: data_batch_1"):
        load_cifar10(tmp_path)
    _write_cifar(tmp_path / "c", 2)
    (tmp_path / "c" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cannot read CIFAR-10 batch"):
        load_cifar10(tmp_path / "c")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "c" / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": Evil()}, fh)
    with pytest.raises(DataError, match="not allowed") as info:
        load_cifar10(tmp_path / "c")
    assert "\n" not in str(info.value)


def test_sample_grid_png(tmp_path: Path) -> None:
    save_image_grid = load_experiment_module("reporting").save_image_grid

    images = np.random.default_rng(0).random((12, 64)) * 1.2 - 0.1  # a little out of range
    save_image_grid(images, tmp_path / "grid.png", image_shape=(1, 8, 8), ncols=5)
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = np.random.default_rng(1).random((4, 3 * 4 * 4))
    save_image_grid(rgb, tmp_path / "rgb.png", image_shape=(3, 4, 4))
    assert (tmp_path / "rgb.png").is_file()
