"""Sample quality (FD, KID, feature networks) and few-step ODE samplers.

* the Fréchet distance against closed forms (diagonal and commuting
  covariances, one dimension, scipy's ``sqrtm`` on a well-conditioned pair,
  the nuclear norm of the data matrices for rank-deficient covariances), zero
  on a set with itself, symmetric;
* KID's unbiased MMD² and jackknife against brute force, unbiased over many
  seeds, its standard error calibrated against the spread over seeds;
* a TorchScript stand-in for ``inception-2015-12-05.pt`` (written here with
  ``torch.jit.script``) loads and sees exactly the uint8 levels; a missing,
  a non-TorchScript and a wrongly shaped file are one-line errors;
* the digits classifier: ≥ 97 % test accuracy, deterministic, cached; the
  digits FD of held-out test images against training images is small and far
  below that of uniform noise;
* Euler is first order, Heun second order, with exact NFE; Karras grid; the
  σ ↔ t conversions invert exactly;
* ``experiments/fid.py`` and ``experiments/samples.py`` end to end on a tiny run.
"""

from __future__ import annotations

import json
import math
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import PYTHON, REPO, TINY, assert_clean_failure, run_script, run_train, subprocess_env
from torch import Tensor

from cnf.diffusion.ode_samplers import (
    euler,
    fm_time_to_sigma,
    heun,
    karras_grid,
    sde_time_to_sigma,
    sigma_to_fm_time,
    sigma_to_sde_time,
    uniform_grid,
)
from cnf.diffusion.sde import VESDE, VPSDE, SubVPSDE
from cnf.quality import (
    FeatureError,
    TorchScriptFeatures,
    build_features,
    compute_features,
    feature_statistics,
    frechet_distance,
    image_grid,
    kid,
    mmd2_polynomial,
    reference_statistics,
    samples_to_images,
    to_levels,
    to_uint8,
)
from cnf.quality.digits import DigitsRecipe, digits_labeled_split, train_digits_classifier

F64 = torch.float64


def random_spd(rng: np.random.Generator, d: int, *, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


# ------------------------------------------------------------ Fréchet distance
def test_frechet_distance_diagonal_and_commuting_closed_form() -> None:
    rng = np.random.default_rng(0)
    d = 12
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Commuting covariances: tr √(Σ1Σ2) = Σ √(a_i b_i), so FD = ‖Δμ‖² + Σ (√a_i − √b_i)².
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    # One dimension: (m1 − m2)² + (s1 − s2)²; and the docstring's example.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1)
    assert frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 4 * np.eye(2)) == pytest.approx(4)


def test_frechet_distance_matches_sqrtm_and_is_symmetric() -> None:
    rng = np.random.default_rng(1)
    d = 20
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Reference: the non-symmetric product's principal square root (pytorch-fid's route).
    cross = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert fd == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fd, rel=1e-12)


def test_frechet_distance_of_a_feature_set_with_itself_is_zero() -> None:
    rng = np.random.default_rng(2)
    for n, d in ((2000, 64), (50, 200)):  # full rank, and fewer samples than features
        feats = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + 3.0
        mu, sigma = feature_statistics(feats)
        assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * max(1.0, np.trace(sigma))
        assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_rank_deficient_covariances() -> None:
    # 30 and 40 samples of 256 features: both covariances are singular. With
    # Σ_k = A_kᵀA_k (A_k the centred data / √(n−1)), tr √(Σ1Σ2) is the
    # nuclear norm of A1 A2ᵀ — an independent closed form.
    rng = np.random.default_rng(3)
    x1, x2 = rng.normal(size=(30, 256)), 0.5 * rng.normal(size=(40, 256)) + 0.2
    (mu1, s1), (mu2, s2) = feature_statistics(x1), feature_statistics(x2)
    a1 = (x1 - mu1) / math.sqrt(len(x1) - 1)
    a2 = (x2 - mu2) / math.sqrt(len(x2) - 1)
    cross = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(fd) and fd > 0
    assert fd == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fd, rel=1e-12)


def test_feature_statistics_float64_and_errors() -> None:
    x = np.random.default_rng(4).normal(size=(100, 5)).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (5, 5)
    x64 = x.astype(np.float64)
    c = x64 - x64.mean(0)
    np.testing.assert_allclose(sigma, c.T @ c / 99, rtol=1e-12)
    assert feature_statistics(x[:, :1])[1].shape == (1, 1)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(x[:1])
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu, sigma, mu[:4], sigma[:4, :4])


# ------------------------------------------------------------------------ KID
def brute_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    k = lambda a, b: (a @ b / x.shape[1] + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_mmd2_polynomial_and_jackknife_against_brute_force() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3)) + 0.3
    value, v_x, v_y = mmd2_polynomial(x, y)
    assert value == pytest.approx(brute_mmd2(x, y), rel=1e-12)
    # The jackknife by actually deleting each point.
    loo_x = np.array([brute_mmd2(np.delete(x, i, 0), y) for i in range(len(x))])
    loo_y = np.array([brute_mmd2(x, np.delete(y, j, 0)) for j in range(len(y))])
    assert v_x == pytest.approx(5 / 6 * np.sum((loo_x - loo_x.mean()) ** 2), rel=1e-10)
    assert v_y == pytest.approx(4 / 5 * np.sum((loo_y - loo_y.mean()) ** 2), rel=1e-10)
    # Sets no larger than subset_size: one exact computation.
    k, se = kid(x, y, subset_size=10)
    assert k == pytest.approx(value, rel=1e-12) and se == pytest.approx(math.sqrt(v_x + v_y))
    assert math.isnan(kid(x[:2], y, subset_size=10)[1])  # jackknife needs 3 points per set
    with pytest.raises(ValueError, match="feature sizes"):
        kid(x, y[:, :2])


@pytest.mark.parametrize("n, subset_size, num_subsets", [(60, 1000, 100), (300, 100, 8)])
def test_kid_unbiased_and_its_stderr_calibrated(n: int, subset_size: int, num_subsets: int) -> None:
    # Over 200 seeds: for one distribution the mean KID is 0 within its
    # standard error (the estimator is unbiased) and the reported stderr does
    # not understate the spread (conservative there, as documented); for two
    # distributions the stderr matches the spread over seeds.
    for shift in (0.0, 0.5):
        values, stderrs = [], []
        for seed in range(200):
            r = np.random.default_rng([seed, 7])
            a, b = r.normal(size=(n, 4)), r.normal(size=(n, 4)) + shift
            v, se = kid(a, b, subset_size=subset_size, num_subsets=num_subsets, seed=seed)
            values.append(v)
            stderrs.append(se)
        values = np.array(values)
        spread = values.std(ddof=1)
        ratio = np.mean(stderrs) / spread
        if shift == 0.0:
            assert abs(values.mean()) < 3 * spread / math.sqrt(len(values))
            assert 0.8 < ratio < 3.0, ratio
        else:
            assert values.mean() > 10 * spread / math.sqrt(len(values))
            assert 0.75 < ratio < 1.3, ratio


# ------------------------------------------------------------ images ↔ levels
@pytest.mark.parametrize("levels", [17, 256])
def test_to_levels_recovers_levels_from_both_conventions(levels: int) -> None:
    k = torch.arange(levels, dtype=F64)
    u = torch.rand(levels, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(to_levels(k / (levels - 1), levels), k.long())
    assert torch.equal(to_levels((k + u) / levels, levels), k.long())
    assert torch.equal(to_levels((k + 0.999999) / levels, levels), k.long())
    wild = torch.tensor([-0.5, 1.0, 7.0, math.inf, -math.inf, math.nan], dtype=F64)
    assert to_levels(wild, levels).tolist() == [0, levels - 1, levels - 1, levels - 1, 0, 0]
    imgs = samples_to_images((k + u) / levels, levels)
    assert imgs.dtype == torch.float32 and torch.allclose(imgs.double(), k / (levels - 1))
    if levels == 256:
        assert torch.equal(to_uint8(k / 255), k.to(torch.uint8))


def test_image_grid_places_images_row_by_row() -> None:
    imgs = np.arange(5, dtype=np.float64)[:, None, None, None] * np.ones((5, 1, 2, 3))
    grid = image_grid(imgs, 2, 3, pad=1, pad_value=-1.0)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert (grid[1:3, 1:4] == 0).all() and (grid[1:3, 9:12] == 2).all()
    assert (grid[4:6, 5:8] == 4).all() and (grid[4:6, 9:12] == -1).all()  # empty sixth cell
    assert grid[0].max() == -1 and grid[:, 4].max() == -1  # padding
    assert image_grid(torch.zeros(3, 3, 4, 4), 1, 2, pad=0).shape == (4, 8, 3)


# ------------------------------------------------------- TorchScript features
class PixelsStandIn(torch.nn.Module):
    """Stand-in for inception-2015-12-05.pt: 2048 features, the uint8 pixel values (tiled if fewer)."""

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        if x.dtype != torch.uint8 or x.shape[1] != 3:
            raise ValueError("expected uint8 images with 3 channels")
        flat = x.flatten(1).float()
        reps = (2048 + flat.shape[1] - 1) // flat.shape[1]
        return flat.repeat(1, reps)[:, :2048]


class WrongShape(torch.nn.Module):
    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        return x.float().mean(dim=(2, 3))


def save_script(module: torch.nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(module), str(path))
    return path


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_script(PixelsStandIn(), tmp_path_factory.mktemp("ts") / "stand_in.pt")


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_torchscript_features_see_uint8_levels(stand_in: Path) -> None:
    extractor = build_features(str(stand_in))
    assert isinstance(extractor, TorchScriptFeatures)
    assert extractor.num_features == 2048 and extractor.name == "stand_in"
    levels = torch.randint(0, 256, (5, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    for images in (levels / 255, (levels + torch.as_tensor(rng.random(levels.shape))) / 256):
        feats = extractor(images)
        assert feats.shape == (5, 2048) and feats.dtype == np.float64
        flat = levels.flatten(1).double().numpy()
        np.testing.assert_array_equal(feats[:, :1024], flat)  # grey → channel 0 …
        np.testing.assert_array_equal(feats[:, 1024:], flat)  # … repeated as channel 1
    batched = compute_features(extractor, levels / 255, batch_size=2, progress=True)
    np.testing.assert_array_equal(batched, extractor(levels / 255))
    assert extractor.identity.startswith("torchscript:")


def test_torchscript_features_bad_files(tmp_path: Path) -> None:
    missing = tmp_path / "inception.pt"
    with pytest.raises(FeatureError) as e:
        TorchScriptFeatures(missing)
    assert str(missing) in one_line(e) and "not found" in str(e.value)
    text = tmp_path / "notes.pt"
    text.write_text("not a network")
    pickled = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(3)}, pickled)
    for path in (text, pickled):
        with pytest.raises(FeatureError) as e:
            build_features(str(path))
        assert str(path) in one_line(e) and "not a TorchScript file" in str(e.value)
    wrong = save_script(WrongShape(), tmp_path / "wrong.pt")
    extractor = TorchScriptFeatures(wrong)
    with pytest.raises(FeatureError) as e:
        extractor.check((3, 16, 16))
    assert str(wrong) in one_line(e) and "(2, 2048)" in str(e.value) and "(2, 3)" in str(e.value)


def test_reference_statistics_cached_and_reused(stand_in: Path, tmp_path: Path) -> None:
    extractor = TorchScriptFeatures(stand_in)
    levels = np.random.default_rng(0).integers(0, 256, (40, 3, 32, 32), dtype=np.uint8)
    kw = dict(num_levels=256, dataset="toyimages", cache_dir=tmp_path, max_kid_features=30)
    first = reference_statistics(extractor, levels, **kw)
    assert not first.from_cache and first.path.is_file() and first.num_images == 40
    feats = extractor(torch.as_tensor(levels) / 255)
    mu, sigma = feature_statistics(feats)
    np.testing.assert_allclose(first.mu, mu, rtol=1e-12)
    np.testing.assert_allclose(first.sigma, sigma, rtol=1e-10, atol=1e-10)
    assert first.features.shape == (30, 2048)  # a fixed subsample for KID
    mtime = first.path.stat().st_mtime_ns
    again = reference_statistics(extractor, levels, **kw)
    assert again.from_cache and again.path == first.path and first.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.sigma, first.sigma)
    np.testing.assert_array_equal(again.features, first.features)
    changed = levels.copy()
    changed[0, 0, 0, 0] ^= 1  # other data: another cache file
    assert reference_statistics(extractor, changed, **kw).path != first.path


def test_quality_modules_import_no_plotting_tracking_or_sklearn() -> None:
    # The package's own __init__ (cnf/__init__.py) is bypassed so that only the
    # modules of this issue are checked; matplotlib, wandb and sklearn then fail to import.
    code = f"""
import sys, types, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("matplotlib", "wandb", "sklearn"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
pkg = types.ModuleType("cnf"); pkg.__path__ = [{str(REPO / "cnf")!r}]; sys.modules["cnf"] = pkg
import cnf.quality, cnf.quality.digits, cnf.diffusion.ode_samplers
print("ok")
"""
    out = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------ digits features
@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the trained digits classifier (trained once per session)."""
    cache = tmp_path_factory.mktemp("cnf_cache")
    extractor = build_features("digits", cache_dir=cache)
    info = extractor.info
    print(
        f"\ndigits classifier: test accuracy {info['test_accuracy']:.4f}, "
        f"val {info['val_accuracy']:.4f}, trained in {info['train_seconds']:.1f} s"
    )
    return cache


def test_digits_split_is_load_digits_images_split() -> None:
    from cnf.data.images import load_digits_images

    split, arrays = digits_labeled_split(), load_digits_images()
    for name in ("train", "val", "test"):
        levels, labels = split[name]
        np.testing.assert_array_equal(levels, getattr(arrays, name))
        assert labels.shape == (len(levels),) and set(np.unique(labels)) <= set(range(10))
    assert [len(split[s][0]) for s in ("train", "val", "test")] == [1258, 180, 359]


def test_digits_classifier_is_deterministic() -> None:
    # One epoch is enough to show that the same recipe gives the same weights.
    recipe = DigitsRecipe(epochs=1)
    (net1, info1), (net2, info2) = train_digits_classifier(recipe), train_digits_classifier(recipe)
    for (k, a), (_, b) in zip(net1.state_dict().items(), net2.state_dict().items()):
        assert torch.equal(a, b), k
    assert info1["digest"] == info2["digest"] and info1["test_accuracy"] == info2["test_accuracy"]
    assert train_digits_classifier(DigitsRecipe(epochs=1, seed=1))[1]["digest"] != info1["digest"]


@pytest.mark.slow
def test_digits_classifier_accuracy_and_cache(digits_cache: Path) -> None:
    from cnf.quality.digits import load_digits_classifier

    _, info = load_digits_classifier(cache_dir=digits_cache)
    assert not info["trained"]  # the session fixture trained and cached it
    print(f"\ndigits classifier test accuracy {info['test_accuracy']:.4f}")
    assert info["test_accuracy"] >= 0.97
    path = Path(info["path"])
    mtime = path.stat().st_mtime_ns
    extractor = build_features("digits", cache_dir=digits_cache)
    assert not extractor.info["trained"] and path.stat().st_mtime_ns == mtime
    assert extractor.num_features == 128 and extractor.identity == f"digits:{info['digest']}"


@pytest.mark.slow
def test_digits_fd_of_test_images_small_and_noise_large(digits_cache: Path) -> None:
    extractor = build_features("digits", cache_dir=digits_cache)
    split = digits_labeled_split()
    ref = reference_statistics(
        extractor, split["train"][0], num_levels=17, dataset="digits", cache_dir=digits_cache
    )
    test_levels = split["test"][0]
    feats = compute_features(extractor, torch.as_tensor(test_levels) / 16)
    # Dequantised images (the model's scale) give the same features as levels/16.
    deq = (test_levels + np.random.default_rng(0).random(test_levels.shape)) / 17
    np.testing.assert_array_equal(compute_features(extractor, deq), feats)
    noise = torch.rand(len(test_levels), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = compute_features(extractor, noise)
    fd_test = frechet_distance(*feature_statistics(feats), ref.mu, ref.sigma)
    fd_noise = frechet_distance(*feature_statistics(noise), ref.mu, ref.sigma)
    kid_test, kid_test_se = kid(feats, ref.features)
    kid_noise, _ = kid(noise, ref.features)
    print(
        f"\ndigits FD test vs train {fd_test:.4f}, uniform noise {fd_noise:.4f}; "
        f"KID test {kid_test:.5f} ± {kid_test_se:.5f}, noise {kid_noise:.5f}"
    )
    assert fd_test < 1.0 and fd_noise > 20 * fd_test
    assert abs(kid_test) < 3 * kid_test_se and kid_noise > 10 * kid_test_se


# ------------------------------------------------------------ ODE samplers
A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=F64)  # a decaying rotation


def linear_field(t: Tensor, x: Tensor) -> Tensor:
    assert t.shape == (x.shape[0],)
    return x @ A.T


def errors(sampler, steps: list[int], **kw) -> list[float]:
    x0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0]], dtype=F64)
    exact = x0 @ torch.linalg.matrix_exp(A * (0.0 - 1.0)).T  # from t = 1 down to t = 0
    return [
        float((sampler(linear_field, x0, uniform_grid(n, 1.0, 0.0), **kw)[0] - exact).norm())
        for n in steps
    ]


def test_euler_first_and_heun_second_order() -> None:
    steps = [16, 32, 64, 128]
    for name, sampler, kw, order in [
        ("euler", euler, {}, 2.0),
        ("heun", heun, {}, 4.0),
        ("heun+last", heun, {"last_correction": True}, 4.0),
    ]:
        err = errors(sampler, steps, **kw)
        ratios = [err[i] / err[i + 1] for i in range(len(err) - 1)]
        assert all(abs(r - order) < 0.15 * order for r in ratios), (name, ratios)
    # A time-dependent field, increasing grid: dx/dt = −t x, x(1) = x(0) e^{−1/2}. Heun with
    # the last correction is the plain trapezoidal rule; without it the last Euler step adds
    # an O(h²) term that approaches the asymptotic ratio from above.
    x0 = torch.ones(3, 1, dtype=F64)
    field = lambda t, x: -t[:, None] * x  # noqa: E731
    for last, tol in ((True, 0.3), (False, 0.5)):
        err = [
            float(
                (
                    heun(field, x0, uniform_grid(n, 0.0, 1.0), last_correction=last)[0]
                    - math.exp(-0.5)
                )
                .abs()
                .max()
            )
            for n in (40, 80, 160)
        ]
        assert all(abs(err[i] / err[i + 1] - 4) < tol for i in range(2)), (last, err)


def test_samplers_count_every_evaluation() -> None:
    calls: list[float] = []

    def field(t: Tensor, x: Tensor) -> Tensor:
        calls.append(float(t[0]))
        return -x

    x = torch.randn(4, 3, dtype=F64)
    times = karras_grid(6, 0.002, 80.0)
    for sampler, kw, expected in [
        (euler, {}, 6),
        (heun, {}, 11),
        (heun, {"last_correction": True}, 12),
    ]:
        calls.clear()
        _, nfe = sampler(field, x, times, **kw)
        assert nfe == len(calls) == expected
    assert calls[-1] == 0.0  # the last correction evaluates the field at the grid's end
    calls.clear()
    heun(field, x, times)
    assert min(calls) == pytest.approx(0.002)  # without it the field never sees σ = 0
    with pytest.raises(ValueError, match="monotone|increasing"):
        euler(field, x, torch.tensor([1.0, 0.5, 0.7]))


def test_karras_grid() -> None:
    n, lo, hi = 18, 0.002, 80.0
    s = karras_grid(n, lo, hi)
    assert s.shape == (n + 1,) and s.dtype == F64
    assert s[0] == hi and s[n - 1] == lo and s[n] == 0
    assert bool((s[1:] < s[:-1]).all())
    i = 5  # EDM eq. 5
    assert float(s[i]) == pytest.approx(
        (hi ** (1 / 7) + i / (n - 1) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7, rel=1e-14
    )
    torch.testing.assert_close(
        karras_grid(4, 1.0, 4.0, rho=1.0)[:-1], torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64)
    )
    assert karras_grid(1, lo, hi).tolist() == [hi, 0.0]
    torch.testing.assert_close(
        uniform_grid(4, 1.0, 0.0), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=F64)
    )


@pytest.mark.parametrize(
    "sde", [VPSDE(), SubVPSDE(), VESDE(sigma_min=0.01, sigma_max=50.0)], ids=["vp", "subvp", "ve"]
)
def test_sigma_time_conversions_invert(sde) -> None:
    t = torch.linspace(1e-5, 1.0, 101, dtype=F64)
    sigma = sde_time_to_sigma(sde, t)
    assert bool((sigma[1:] > sigma[:-1]).all())
    torch.testing.assert_close(sigma_to_sde_time(sde, sigma), t, rtol=1e-12, atol=1e-14)
    grid = karras_grid(10, 0.002, float(sigma[-1]))
    torch.testing.assert_close(
        sde_time_to_sigma(sde, sigma_to_sde_time(sde, grid)), grid, rtol=1e-12, atol=0.0
    )
    assert float(sigma_to_sde_time(sde, torch.tensor(0.0, dtype=F64))) == 0.0
    if isinstance(sde, VPSDE):  # σ_EDM of VP is √(e^{B} − 1)
        b = sde.integral_beta(t)
        torch.testing.assert_close(sigma, torch.sqrt(torch.expm1(b)), rtol=1e-12, atol=0.0)


def test_flow_matching_sigma_time_conversions() -> None:
    t = torch.linspace(0.0, 0.99, 100, dtype=F64)
    torch.testing.assert_close(sigma_to_fm_time(fm_time_to_sigma(t)), t, rtol=1e-14, atol=1e-15)
    # x_t = (1 − t) x0 + t x1 = (1 − t)(x0 + σ x1) with σ = t/(1 − t).
    x0, x1, tt = torch.randn(5, dtype=F64), torch.randn(5, dtype=F64), torch.tensor(0.3, dtype=F64)
    torch.testing.assert_close((1 - tt) * x0 + tt * x1, (1 - tt) * (x0 + fm_time_to_sigma(tt) * x1))
    assert float(sigma_to_fm_time(torch.tensor(80.0))) == pytest.approx(80 / 81)


# ------------------------------------------- few-step samplers in the families
def count_calls(module: torch.nn.Module) -> list[int]:
    """A counter of ``module``'s forward calls (one entry per call)."""
    calls: list[int] = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("family", ["score", "indm", "fm"])
def test_few_step_samplers_count_network_calls_exactly(family: str) -> None:
    from conftest import build_family

    if family == "fm":
        model = build_family("fm", {"hidden_dims": [8]}, (3,)).to(F64)
        net = model.field
    else:
        section = {"net": {"name": "mlp", "hidden_dims": [8]}}
        if family == "indm":
            section["flow"] = {"name": "identity"}
        model = build_family(family, section, (3,)).to(F64)
        net = model.latent.score if family == "indm" else model.score
    calls = count_calls(net)
    for sampler, grid in [("heun", "karras"), ("heun", "uniform"), ("euler", "karras")]:
        for steps in (1, 2, 5, 10):
            calls.clear()
            x, stats = model.sample(4, {"sampler": sampler, "grid": grid, "steps": steps})
            expected = 2 * steps - 1 if sampler == "heun" else steps
            assert stats["nfe"] == len(calls) == expected, (sampler, grid, steps)
            assert x.shape == (4, 3) and bool(torch.isfinite(x).all())
    # A bare ``steps`` with a solver key stays the solver's, as before.
    s = model.with_settings(method="rk4", steps=3)
    assert s.sampler == "ode" and s.solver.steps == 3
    calls.clear()
    assert model.sample(2, s)[1]["nfe"] == len(calls) == 12
    with pytest.raises(ValueError, match="unknown time grid 'edm'"):
        model.with_settings(sampler="heun", grid="edm")


def gaussian_vp_case() -> tuple[VPSDE, callable, Tensor, Tensor]:
    """Data N(μ, s² I) under the VP SDE: exact score and exact probability-flow map x(1) → x(0).

    ``p_t = N(m μ, v(t) I)`` with ``v = m² s² + σ²``; the flow is affine,
    ``x(t) = m(t) μ + √(v(t)/v(1)) (x(1) − m(1) μ)``, so ``x(0) = μ + s (x(1) − m(1) μ)/√v(1)``.
    """
    sde, mu, s = VPSDE(), 0.7, 0.3

    def score(t: Tensor, x: Tensor) -> Tensor:
        m, sigma = sde.marginal(t)
        return -(x - m[:, None] * mu) / ((m * s) ** 2 + sigma**2)[:, None]

    x1 = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    m1, sigma1 = sde.marginal(torch.tensor(1.0, dtype=F64))
    return sde, score, x1, mu + s * (x1 - m1 * mu) / torch.sqrt((m1 * s) ** 2 + sigma1**2)


def test_heun_karras_converges_at_second_order_on_gaussian_data() -> None:
    from cnf.diffusion.samplers import SamplerOptions, probability_flow_euler, probability_flow_heun

    sde, score, x1, exact = gaussian_vp_case()

    def err(fn, steps: int, grid: str) -> float:
        # The Karras grid over the SDE's whole range [σ(ε), σ(1)], so it starts at x(1) exactly.
        wide = {"sigma_min": 1e-12, "sigma_max": float("inf")}
        x, info = fn(score, sde, x1, SamplerOptions(steps=steps, grid=grid, **wide))
        assert info["nfe"] == (2 * steps - 1 if fn is probability_flow_heun else steps)
        return float((x - exact).abs().max())

    steps = [32, 64, 128, 256]
    heun_err = [err(probability_flow_heun, n, "karras") for n in steps]
    euler_err = [err(probability_flow_euler, n, "karras") for n in steps]
    for e, order in ((heun_err, 4.0), (euler_err, 2.0)):
        ratios = [e[i] / e[i + 1] for i in range(len(e) - 1)]
        assert all(abs(r - order) < 0.15 * order for r in ratios), ratios
    # At equal NFE (Heun N steps = 2N − 1 evaluations) Heun + EDM grid beats Euler on either
    # grid once the steps resolve the flow. Here they do from 32 Heun steps: this data's
    # σ-space flow bends where σ is near its std 0.3 (at 16 steps, 31 NFE, Heun's error is
    # 0.108 against uniform Euler's 0.052); real images bend less (EDM §3).
    for n in (32, 64, 128):
        heun = err(probability_flow_heun, n, "karras")
        assert heun < err(probability_flow_euler, 2 * n, "uniform")
        assert heun < err(probability_flow_euler, 2 * n, "karras")


@pytest.mark.parametrize("sde_name", ["vp", "subvp", "ve"])
def test_karras_grid_steps_in_edm_variables_euler_is_ddim(sde_name: str) -> None:
    # On the Karras grid the probability-flow ODE runs in σ on x̂ = x/m(t), where for an
    # ε-prediction score s = −ε̂/std Euler's step is DDIM's: x̂ ← x̂ + (σ_{i+1} − σ_i) ε̂.
    from cnf.diffusion.ode_samplers import karras_grid, sde_time_to_sigma, sigma_to_sde_time
    from cnf.diffusion.samplers import SamplerOptions, probability_flow_euler

    sde = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE()}[sde_name]

    def eps_hat(t: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(x) + t[:, None]

    def score(t: Tensor, x: Tensor) -> Tensor:
        return -eps_hat(t, x) / sde.marginal(t)[1][:, None]

    x_T = torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    x, info = probability_flow_euler(score, sde, x_T, SamplerOptions(steps=6, grid="karras"))
    ends = sde_time_to_sigma(sde, torch.tensor([sde.T, sde.eps], dtype=F64))
    # EDM's range [0.002, 80] clamped to the SDE's [σ(ε), σ(1)]; the start is σ_0 z, z the
    # prior's standard noise (VP: σ(1) ≈ 152 > 80; VE: σ(1) = 50, the prior itself).
    sigmas = karras_grid(6, max(0.002, float(ends[1])), min(80.0, float(ends[0])))
    x_hat = sigmas[0] * x_T / sde.marginal(torch.tensor(sde.T, dtype=F64))[1]
    if sde_name == "ve":
        torch.testing.assert_close(x_hat, x_T, rtol=1e-14, atol=0.0)
    for i in range(6):
        t = sigma_to_sde_time(sde, sigmas[i]).clamp(min=sde.eps).expand(8)
        m = sde.marginal(t)[0][:, None]
        x_hat = x_hat + (sigmas[i + 1] - sigmas[i]) * eps_hat(t, m * x_hat)
    assert info["nfe"] == 6
    torch.testing.assert_close(x, x_hat, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "sde", [VPSDE(eps=1e-5), VESDE(sigma_min=0.01, sigma_max=50.0)], ids=["vp", "ve"]
)
def test_karras_range_is_clamped_to_the_model(sde) -> None:
    from cnf.diffusion.ode_samplers import sde_sigma_grid

    like = torch.zeros(1, dtype=F64)
    lo, hi = (float(v) for v in sde_time_to_sigma(sde, torch.tensor([sde.eps, 1.0], dtype=F64)))
    for sigma_min, sigma_max in [(0.002, 80.0), (1e-6, 1e6), (0.05, 9.0)]:
        grid = sde_sigma_grid(sde, 5, sigma_min=sigma_min, sigma_max=sigma_max, like=like)
        want = karras_grid(5, max(sigma_min, lo), min(sigma_max, hi))
        torch.testing.assert_close(grid, want, rtol=1e-14, atol=0.0)
    # A range wider than the model's is the model's own grid [σ(ε), σ(1)].
    torch.testing.assert_close(
        sde_sigma_grid(sde, 7, sigma_min=1e-9, sigma_max=1e9, like=like),
        karras_grid(7, lo, hi),
        rtol=1e-14,
        atol=0.0,
    )
    with pytest.raises(ValueError, match="leave nothing of the model's noise range"):
        sde_sigma_grid(sde, 5, sigma_min=2 * hi, sigma_max=4 * hi, like=like)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        sde_sigma_grid(sde, 5, sigma_min=9.0, sigma_max=9.0, like=like)


@pytest.mark.parametrize("family", ["score", "fm"])
def test_sigma_max_is_a_sampling_setting(family: str) -> None:
    from conftest import build_family

    if family == "fm":
        model = build_family("fm", {"hidden_dims": [8]}, (3,)).to(F64)
    else:
        model = build_family(family, {"net": {"name": "mlp", "hidden_dims": [8]}}, (3,)).to(F64)

    def draw(**kw):
        gen = torch.Generator().manual_seed(5)
        return model.sample(
            4, {"sampler": "heun", "grid": "karras", "steps": 4, **kw}, generator=gen
        )[0]

    base, narrow = draw(), draw(sigma_max=2.0)
    assert draw().equal(base)  # seeded
    assert not torch.allclose(base, narrow)  # the interior points moved
    assert "sigma_max" in type(model.settings).SAMPLING_ONLY  # evaluate()'s numbers are reused
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        model.with_settings(sigma_min=3.0, sigma_max=2.0)


def test_flow_matching_heun_on_gaussian_data() -> None:
    from cnf.models.fm import FlowMatchingModel

    mu, s = 0.7, 0.3

    class GaussianVelocity(torch.nn.Module):
        """E[x1 − x0 | x_t] for x0 ~ N(μ, s²), x1 ~ N(0, 1) (independent): an affine field."""

        def __init__(self) -> None:
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(()))

        def forward(self, t: Tensor, x: Tensor) -> Tensor:
            t = t.reshape(-1, 1)
            var = (1 - t) ** 2 * s**2 + t**2
            return -mu + (t - (1 - t) * s**2) / var * (x - (1 - t) * mu)

    model = FlowMatchingModel(GaussianVelocity(), (2,)).to(F64)
    z = torch.randn(64, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    exact = mu + s * z  # the flow carries x1 = z to μ + s z

    def err(sampler: str, grid: str, steps: int) -> float:
        gen = torch.Generator().manual_seed(3)  # the same base noise z
        x, stats = model.sample(
            64, {"sampler": sampler, "grid": grid, "steps": steps}, generator=gen
        )
        return float((x - exact).abs().max())

    for grid in ("karras", "uniform"):
        e = [err("heun", grid, n) for n in (16, 32, 64)]
        assert all(abs(e[i] / e[i + 1] - 4) < 0.6 for i in range(2)), (grid, e)
        assert err("heun", grid, 10) < err("euler", grid, 20)


# ------------------------------------------------------------ entry points
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory, digits_cache: Path) -> Path:
    """A 2-iteration OT-CFM digits run whose final.json has the digits FD/KID of 64 samples."""
    run = tmp_path_factory.mktemp("fid") / "run"
    rc, out, err = run_train(
        *TINY,
        "train.iters=2",
        "train.batch_size=32",
        "eval.solver.name=euler",
        "eval.solver.steps=2",
        "eval.fid.features=digits",
        "eval.fid.num_samples=64",
        f"run.dir={run}",
        config="configs/fm/otcfm_digits.yaml",
        env=subprocess_env(CNF_CACHE=str(digits_cache)),
    )
    assert rc == 0, err[-3000:]
    assert "samples: FD" in out
    return run


@pytest.mark.slow
def test_final_json_has_the_fd_and_kid_of_samples(digits_run: Path) -> None:
    final = json.loads((digits_run / "final.json").read_text())
    for key in ("fid", "kid", "kid_stderr", "fid_data", "kid_data", "kid_data_stderr"):
        assert np.isfinite(final[key]), key
    assert final["fid_num_samples"] == 64 and final["fid_nfe"] == 2
    assert final["fid_finite_fraction"] == 1.0 and final["fid_data_num_images"] == 359
    info = final["fid_info"]
    assert info["features"] == "digits" and info["feature_identity"].startswith("digits:")
    assert info["seed"] == final["eval"]["seed"] == 1234 and info["num_samples"] == 64
    assert info["reference"]["num_images"] == 1258
    assert final["eval"]["settings"]["sampler"] == "ode"  # the sampler that made them
    # Held-out test images score far below the samples of a 2-iteration model.
    assert final["fid_data"] < 0.1 * final["fid"] and final["kid_data"] < final["kid"]
    print(
        f"\nfinal.json: FD {final['fid']:.2f}, KID {final['kid']:.4f} (2 iterations); "
        f"test images FD {final['fid_data']:.3f}, KID {final['kid_data']:.4f}"
    )


@pytest.mark.slow
def test_cost_curve_on_an_image_run_writes_fd_and_grids(
    digits_run: Path, digits_cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cc"
    grid = "euler:steps=2;sampler=heun:grid=karras:steps=2"
    args = [str(digits_run), "--grid", grid, "--fid", "digits", "--fid-samples", "32"]
    args += ["--num-samples", "0", "--num-test", "20", "--image-grid", "2x3", "--out", str(out)]
    rc, stdout, err = run_script(
        "cost_curve.py", args, env=subprocess_env(CNF_CACHE=str(digits_cache))
    )
    assert rc == 0, err[-3000:]
    records = [json.loads(line) for line in (out / "cost_curve.jsonl").read_text().splitlines()]
    assert [r["label"] for r in records] == ["euler steps=2", "sampler=heun grid=karras steps=2"]
    assert [r["fid_nfe"] for r in records] == [2, 3]  # Heun: 2N − 1
    for r in records:
        assert np.isfinite([r["fid"], r["kid"], r["kid_stderr"], r["bpd"]]).all()
        assert r["fid_num_samples"] == 32 and r["fid_info"]["features"] == "digits"
        assert r["fid_data"] < r["fid"]
    # The Heun setting samples differently but evaluates like the run's own solver.
    assert records[1]["eval_reused_from"] == "euler steps=2"
    assert records[1]["bpd"] == records[0]["bpd"] and records[1]["fid"] != records[0]["fid"]
    pngs = sorted((out / "samples").rglob("*.png"))
    assert [p.name for p in pngs] == ["euler_steps-2.png", "sampler-heun_grid-karras_steps-2.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (out / "cost_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "cost_curve.md").read_text()
    assert "| FD | KID | FD NFE |" in md and "digits features: test images score FD" in md


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fid_cli_end_to_end(
    digits_run: Path, digits_cache: Path, stand_in: Path, tmp_path: Path
) -> None:
    env = subprocess_env(CNF_CACHE=str(digits_cache))
    rc, out, err = run_script(
        "fid.py", [str(digits_run), "eval.fid.features=digits", "--num-samples", "64"], env=env
    )
    assert rc == 0, err[-3000:]
    res = last_json(out)
    for key in (
        "fid",
        "kid",
        "kid_stderr",
        "num_samples",
        "features",
        "iteration",
        "seed",
        "nfe_per_sample",
    ):
        assert key in res, key
    assert res["num_samples"] == 64 and res["features"] == "digits" and res["iteration"] == 2
    assert res["nfe_per_sample"] == 2 and res["sampling"]["solver.name"] == "euler"
    assert np.isfinite(res["fid"]) and res["fid"] > 0 and res["kid_stderr"] > 0
    assert res["fid_data"] < res["fid"] and res["data_num_images"] == 359
    # One owner: final.json's FD of the same 64 samples (same seed and batch size) is this one.
    final = json.loads((digits_run / "final.json").read_text())
    assert (res["fid"], res["kid"]) == (final["fid"], final["kid"])
    print(f"\nfid.py digits on a 2-iteration run: FD {res['fid']:.3f}, KID {res['kid']:.4f}")
    # Flat sampling-settings keys choose the sampler, as in a cost grid.
    rc, out, err = run_script(
        "fid.py",
        [str(digits_run), "sampler=heun", "steps=2", "grid=karras", "--num-samples", "64"],
        env=env,
    )
    assert rc == 0, err[-3000:]
    heun = last_json(out)
    assert heun["nfe_per_sample"] == 3 and heun["sampling"]["sampler"] == "heun"
    assert heun["fid"] != res["fid"]
    rc, _, err = run_script("fid.py", [str(digits_run), "sampler=leapfrog"], env=env)
    assert "unknown ODE sampler 'leapfrog'" in assert_clean_failure(rc, err)
    # The same seed gives the same samples, so the same numbers.
    rc, out2, _ = run_script(
        "fid.py",
        [str(digits_run), "eval.fid.features=digits", "--num-samples", "64", "--no-progress"],
        env=env,
    )
    assert rc == 0 and last_json(out2)["fid"] == res["fid"]
    rc, out, err = run_script(
        "fid.py",
        [
            str(digits_run),
            f"eval.fid.features={stand_in}",
            "--num-samples",
            "64",
            "--kid-subsets",
            "2",
        ],
        env=env,
    )
    assert rc == 0, err[-3000:]
    res = last_json(out)
    assert res["features"] == "stand_in" and res["feature_identity"].startswith("torchscript:")
    missing = tmp_path / "inception-2015-12-05.pt"
    rc, out, err = run_script("fid.py", [str(digits_run), f"eval.fid.features={missing}"], env=env)
    line = assert_clean_failure(rc, err)
    assert str(missing) in line
    rc, _, err = run_script("fid.py", [str(digits_run), "eval.fid.bogus=1"], env=env)
    assert "eval.fid.features" in assert_clean_failure(rc, err)


@pytest.mark.slow
def test_samples_cli_writes_a_png(digits_run: Path, tmp_path: Path) -> None:
    png = tmp_path / "grid.png"
    rc, _, err = run_script(
        "samples.py", [str(digits_run), "--grid", "3x4", "--out", str(png), "eval.solver.steps=3"]
    )
    assert rc == 0, err[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "NFE 3" in err
    rc, _, err = run_script(
        "samples.py",
        [str(digits_run), "--grid", "2x2", "--out", str(png), "sampler=heun", "steps=3"],
    )
    assert rc == 0 and "NFE 5" in err, err[-3000:]
    rc, _, err = run_script("samples.py", [str(digits_run), "--grid", "3by4", "--out", str(png)])
    assert "--grid" in assert_clean_failure(rc, err)


@pytest.mark.slow
def test_digits_features_cli(digits_cache: Path) -> None:
    rc, out, err = run_script("digits_features.py", ["--cache-dir", str(digits_cache)])
    assert rc == 0, err[-3000:]
    res = last_json(out)
    assert res["trained"] is False and res["test_accuracy"] >= 0.97
    print(f"\n{err.strip().splitlines()[-1]}")


def test_digits_quality_sigma_max_is_the_training_digits_diameter() -> None:
    # The quality table's data-scaled Karras range ends at the largest distance between
    # two training digits in the model's [-1, 1] scale (pixel centres (v + ½)/17).
    from conftest import load_experiment_module

    from cnf.data.images import load_digits_images

    module = load_experiment_module("digits_quality")
    train = torch.as_tensor(load_digits_images().train, dtype=F64).flatten(1)
    x = (train + 0.5) / 17 * 2 - 1
    diameter = float(torch.cdist(x, x).max())
    assert diameter == pytest.approx(9.036, abs=1e-3)
    assert module.DIGITS_DIAMETER == pytest.approx(diameter, abs=0.05)
    assert f"sigma_max={module.DIGITS_DIAMETER:g}" in module.RUNS["score_vp"][1]
