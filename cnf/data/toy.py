"""FFJORD's 2-D toy densities, at FFJORD's scales, and their exact log-densities where known.

Each generator draws ``n`` points with a ``numpy.random.Generator`` (so a
run's data stream is a deterministic function of its seed and iteration).
For ``8gaussians`` and ``checkerboard`` the density is known in closed form:
:func:`toy_log_density` returns it and :func:`toy_entropy` the true entropy,
the floor below which no model's test NLL can go in expectation.

References:
    Grathwohl et al., "FFJORD", ICLR 2019 (the toy data sets, lib/toy_data.py).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np

Sampler = Callable[[np.random.Generator, int], np.ndarray]


def _sklearn():  # noqa: ANN202 - imported on first use: ``import cnf`` stays light
    from sklearn import datasets

    return datasets


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def swissroll(rng: np.random.Generator, n: int) -> np.ndarray:
    x = _sklearn().make_swiss_roll(n_samples=n, noise=1.0, random_state=_seed(rng))[0]
    return x[:, [0, 2]] / 5.0


def circles(rng: np.random.Generator, n: int) -> np.ndarray:
    x = _sklearn().make_circles(n_samples=n, factor=0.5, noise=0.08, random_state=_seed(rng))[0]
    return x * 3.0


def moons(rng: np.random.Generator, n: int) -> np.ndarray:
    x = _sklearn().make_moons(n_samples=n, noise=0.1, random_state=_seed(rng))[0]
    return x * 2.0 + np.array([-1.0, -0.2])


def rings(rng: np.random.Generator, n: int) -> np.ndarray:
    """Four concentric rings (radii 1–4, scaled by 0.9), Gaussian noise 0.08, times 3."""
    counts = [n // 4] * 4
    counts[0] += n - sum(counts)
    pts = []
    for radius, m in zip((4.0, 3.0, 2.0, 1.0), counts):
        theta = np.linspace(0, 2 * np.pi, m, endpoint=False)
        pts.append(np.stack([np.cos(theta), np.sin(theta)], 1) * radius * 0.9)
    x = np.concatenate(pts) / 3.0
    x = x + rng.normal(scale=0.08, size=x.shape)
    return rng.permutation(x) * 3.0


_EIGHT_CENTERS = np.array(
    [(1, 0), (-1, 0), (0, 1), (0, -1)]
    + [(s1 / math.sqrt(2), s2 / math.sqrt(2)) for s1 in (1, -1) for s2 in (1, -1)]
)
_EIGHT_SCALE = 4.0 / 1.414  # FFJORD: centres at radius 4, everything divided by 1.414
_EIGHT_STD = 0.5 / 1.414


def eight_gaussians(rng: np.random.Generator, n: int) -> np.ndarray:
    idx = rng.integers(0, 8, size=n)
    return _EIGHT_CENTERS[idx] * _EIGHT_SCALE + rng.normal(size=(n, 2)) * _EIGHT_STD


def pinwheel(rng: np.random.Generator, n: int) -> np.ndarray:
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = np.linspace(0, 2 * np.pi, num_classes, endpoint=False)
    feats = rng.normal(size=(n, 2)) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    labels = rng.integers(0, num_classes, size=n)
    angles = rads[labels] + rate * np.exp(feats[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    rot = np.stack([c, -s, s, c], axis=1).reshape(-1, 2, 2)
    return 2 * np.einsum("ti,tij->tj", feats, rot)


def two_spirals(rng: np.random.Generator, n: int) -> np.ndarray:
    m = n // 2
    r = np.sqrt(rng.random((m, 1))) * 540 * (2 * np.pi) / 360
    d1x = -np.cos(r) * r + rng.random((m, 1)) * 0.5
    d1y = np.sin(r) * r + rng.random((m, 1)) * 0.5
    x = np.vstack((np.hstack((d1x, d1y)), np.hstack((-d1x, -d1y)))) / 3
    x = x + rng.normal(size=x.shape) * 0.1
    if len(x) < n:  # odd n: one more point from the first spiral
        x = np.vstack([x, x[:1]])
    return rng.permutation(x)


def checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    """Uniform on the 8 dark squares of a 4×4 board on [-4, 4]² (area 32)."""
    x1 = rng.random(n) * 4 - 2
    x2_ = rng.random(n) - rng.integers(0, 2, n) * 2
    x2 = x2_ + (np.floor(x1) % 2)
    return np.stack([x1, x2], 1) * 2


TOY_DATASETS: dict[str, Sampler] = {
    "swissroll": swissroll,
    "circles": circles,
    "rings": rings,
    "moons": moons,
    "8gaussians": eight_gaussians,
    "pinwheel": pinwheel,
    "2spirals": two_spirals,
    "checkerboard": checkerboard,
}


def _eight_gaussians_logpdf(x: np.ndarray) -> np.ndarray:
    mu = _EIGHT_CENTERS * _EIGHT_SCALE
    sq = ((x[:, None, :] - mu[None]) ** 2).sum(-1) / _EIGHT_STD**2
    log_comp = -0.5 * sq - np.log(2 * np.pi * _EIGHT_STD**2) - np.log(8)
    m = log_comp.max(1, keepdims=True)
    return (m + np.log(np.exp(log_comp - m).sum(1, keepdims=True)))[:, 0]


def _checkerboard_logpdf(x: np.ndarray) -> np.ndarray:
    inside = (np.abs(x) <= 4).all(1)
    # Occupied squares: cells (i, j) of side 2 with floor(x1/2) + floor(x2/2) even.
    parity = (np.floor(x[:, 0] / 2) + np.floor(x[:, 1] / 2)) % 2 == 0
    return np.where(inside & parity, -np.log(32.0), -np.inf)


TOY_LOG_DENSITIES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "8gaussians": _eight_gaussians_logpdf,
    "checkerboard": _checkerboard_logpdf,
}


def toy_log_density(name: str, x: np.ndarray) -> np.ndarray | None:
    """Exact data log-density at ``x`` (``(N, 2)``), or None if not known in closed form."""
    fn = TOY_LOG_DENSITIES.get(name)
    return None if fn is None else fn(np.asarray(x, dtype=np.float64))


@functools.cache
def toy_entropy(name: str) -> tuple[float, float] | None:
    """True entropy ``H = −∫ p log p`` in nats and the error of its computation.

    Checkerboard is uniform on an area of 32, so ``H = log 32`` exactly. For
    8gaussians ``H`` is computed by midpoint quadrature of ``−p log p`` on a
    0.02-spaced grid over [−7, 7]² (the density is smooth, so the quadrature
    error is negligible; the mass outside the square is < 1e-12). Returns
    None when the density is not known in closed form.
    """
    if name == "checkerboard":
        return math.log(32.0), 0.0
    if name == "8gaussians":
        h = 0.02
        xs = np.arange(-7 + h / 2, 7, h)
        total, mass = 0.0, 0.0
        for row in np.array_split(xs, 20):
            gx, gy = np.meshgrid(xs, row)
            lp = _eight_gaussians_logpdf(np.stack([gx.ravel(), gy.ravel()], 1))
            p = np.exp(lp)
            total += float(-(p * lp).sum() * h * h)
            mass += float(p.sum() * h * h)
        # The quadrature error shows as the missing/extra mass; report it as the error.
        return total, abs(1.0 - mass)
    return None
