"""Distances between sets of features: Fréchet distance (FID) and kernel inception distance (KID).

Both compare features of model samples with features of data, computed by a
feature network (:mod:`cnf.quality.features`); with Inception-v3 pool features
they are FID and KID, with the project's digits classifier a "digits FD/KID".
Everything is computed in float64 with numpy.

**Fréchet distance** of the Gaussians fitted to two feature sets (Heusel et
al. 2017; Dowson & Landau 1982)::

    FD = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^{1/2}.

The last trace is the sum of the square roots of the eigenvalues of ``Σ₁Σ₂``
(non-negative reals for PSD ``Σ``). Since ``Σ₁Σ₂`` has the eigenvalues of
``(√Σ₁ √Σ₂)(√Σ₁ √Σ₂)ᵀ``, it equals the **nuclear norm** (sum of singular
values) of ``√Σ₁ √Σ₂`` — the choice here: each ``√Σ`` comes from a symmetric
eigendecomposition, with eigenvalues below the numerical-rank tolerance
``F · eps · λ_max`` (rounding noise, and the tiny negative eigenvalues of a
rank-deficient covariance) set to zero. Unlike ``scipy.linalg.sqrtm`` of the
non-symmetric product (pytorch-fid's route, which needs an ε-regularised
retry when the product is near singular) or the eigenvalues of
``√Σ₁ Σ₂ √Σ₁``, the singular values of ``√Σ₁ √Σ₂`` are computed to an absolute
error of order ``eps · ‖Σ₁‖^{1/2} ‖Σ₂‖^{1/2}`` instead of its square root, so
rank-deficient covariances (fewer samples than features) need no
regularisation and the FD of a set with itself is zero to rounding.

**KID** (Bińkowski et al. 2018): the unbiased estimate of the squared maximum
mean discrepancy (Gretton et al. 2012, eq. 3) with the polynomial kernel
``k(x, y) = (xᵀy / F + 1)³``, averaged over random subsets; see :func:`kid`
for the standard error.

References:
    Dowson & Landau, "The Fréchet distance between multivariate normal
    distributions", J. Multivariate Analysis 1982.
    Heusel et al., "GANs trained by a two time-scale update rule converge to a
    local Nash equilibrium", NeurIPS 2017 (FID).
    Bińkowski, Sutherland, Arbel & Gretton, "Demystifying MMD GANs", ICLR 2018 (KID).
    Gretton et al., "A kernel two-sample test", JMLR 2012 (unbiased MMD²).
    Arvesen, "Jackknifing U-statistics", Ann. Math. Statist. 1969.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["feature_statistics", "frechet_distance", "kid", "mmd2_polynomial", "sqrt_psd"]


def _features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, F), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or Inf")
    return x


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(F,)`` and covariance ``(F, F)`` (ddof = 1) of features ``(N, F)``, in float64.

    Raises:
        ValueError: fewer than 2 samples, not 2-D, or non-finite values.
    """
    x = _features(features, "features")
    if len(x) < 2:
        raise ValueError(f"feature statistics need at least 2 samples, got {len(x)}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix by eigendecomposition (symmetrised first).

    Eigenvalues below ``F · eps · λ_max`` — zero to working precision, including
    the small negative ones of a rank-deficient covariance — are set to zero.
    """
    s = np.asarray(sigma, dtype=np.float64)
    s = 0.5 * (s + s.T)
    lam, q = np.linalg.eigh(s)
    tol = s.shape[0] * np.finfo(np.float64).eps * max(float(lam.max(initial=0.0)), 0.0)
    root = np.sqrt(np.where(lam > tol, lam, 0.0))
    return (q * root) @ q.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet (2-Wasserstein) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 ‖√Σ₁ √Σ₂‖_*`` in float64 (see the module
    docstring for why the nuclear norm). Symmetric in its two Gaussians;
    rounding can make it slightly negative (≈ −1e-12 · tr Σ) for equal inputs.

    Args:
        mu1, mu2: Means ``(F,)``.
        sigma1, sigma2: Covariances ``(F, F)``, symmetric PSD (possibly singular).

    Returns:
        The squared distance FD (as reported as "FID").

    Example:
        >>> mu, s = np.zeros(2), np.eye(2)
        >>> round(frechet_distance(mu, s, mu + 1, 4 * s), 6)   # 2 + (1 − 2)² · 2
        4.0
    """
    mu1, mu2 = (
        np.atleast_1d(np.asarray(mu1, np.float64)),
        np.atleast_1d(np.asarray(mu2, np.float64)),
    )
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    f = mu1.shape[0]
    if mu2.shape != (f,) or s1.shape != (f, f) or s2.shape != (f, f):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}"
        )
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} holds NaN or Inf")
    diff = mu1 - mu2
    cross = np.linalg.svd(sqrt_psd(s1) @ sqrt_psd(s2), compute_uv=False).sum()
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * cross)


# ------------------------------------------------------------------------ KID
def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_polynomial(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Unbiased MMD² with ``k(a, b) = (aᵀb / F + 1)³`` and its two-sample jackknife variance.

    ``MMD²_u = Σ_{i≠j} k(x_i, x_j)/(m(m−1)) + Σ_{i≠j} k(y_i, y_j)/(n(n−1)) − 2 Σ k(x_i, y_j)/(mn)``.
    The jackknife (Arvesen 1969) leaves out one point of ``x`` at a time
    (``m`` replicates, closed form from the kernel matrices' row sums), then one
    of ``y``: ``V_x = (m−1)/m Σ_i (U_{(i)} − Ū)²`` estimates the part of the
    variance due to the draw of ``x``, ``V_y`` likewise; ``V_x + V_y`` is the
    (slightly conservative) variance estimate of ``MMD²_u``.

    Args:
        x: ``(m, F)`` with ``m ≥ 2``; y: ``(n, F)`` with ``n ≥ 2``.

    Returns:
        ``(MMD²_u, V_x, V_y)``; the variances are NaN when ``m < 3`` or ``n < 3``.
    """
    m, n = len(x), len(y)
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    # Off-diagonal row sums and totals.
    rxx, ryy = kxx.sum(1) - np.diag(kxx), kyy.sum(1) - np.diag(kyy)
    sxx, syy = rxx.sum(), ryy.sum()
    rxy_x, rxy_y = kxy.sum(1), kxy.sum(0)
    sxy = rxy_x.sum()
    a, b, c = sxx / (m * (m - 1)), syy / (n * (n - 1)), sxy / (m * n)
    value = float(a + b - 2 * c)
    if m < 3 or n < 3:
        return value, math.nan, math.nan
    # Leaving out x_i drops its row and column of K_xx and its row of K_xy.
    u_x = (sxx - 2 * rxx) / ((m - 1) * (m - 2)) + b - 2 * (sxy - rxy_x) / ((m - 1) * n)
    u_y = a + (syy - 2 * ryy) / ((n - 1) * (n - 2)) - 2 * (sxy - rxy_y) / (m * (n - 1))
    v_x = (m - 1) / m * float(((u_x - u_x.mean()) ** 2).sum())
    v_y = (n - 1) / n * float(((u_y - u_y.mean()) ** 2).sum())
    return value, v_x, v_y


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    generator: np.random.Generator | None = None,
) -> tuple[float, float]:
    """Kernel inception distance: unbiased polynomial-kernel MMD² averaged over random subsets.

    Each of ``num_subsets`` rounds draws ``m_a = min(subset_size, N_a)`` rows of
    ``features_a`` and ``m_b = min(subset_size, N_b)`` of ``features_b``
    without replacement and computes :func:`mmd2_polynomial`; KID is the mean.
    When both sets are no larger than ``subset_size`` every subset is the
    whole set, so it is computed once.

    **Standard error.** The subsets overlap when ``num_subsets · m > N``, so
    the spread of the subset values understates the error of their mean, and
    it is 0 for sets smaller than ``subset_size``. Instead the jackknife
    variances ``V_a, V_b`` of one subset's estimate (averaged over the subsets)
    are divided by the number of effectively independent subsets of each set,
    ``k_a = min(num_subsets, N_a/m_a)``::

        stderr² = mean(V_a)/k_a + mean(V_b)/k_b.

    This is the sampling error of KID under a fresh draw of both sets (the
    variance of an MMD² estimate on N points falls like 1/N; under equal
    distributions faster, so the estimate is conservative there).

    Args:
        features_a, features_b: ``(N_a, F)``, ``(N_b, F)``, at least 2 rows each.
        num_subsets: Subsets to average over.
        subset_size: Rows per subset (clean-fid / torch-fidelity: 1000).
        seed: Seed of the subset draws (ignored when ``generator`` is given).
        generator: A numpy generator for the subset draws.

    Returns:
        ``(KID, stderr)``; stderr is NaN when a set has fewer than 3 rows.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> value, se = kid(rng.normal(size=(500, 8)), rng.normal(size=(400, 8)), subset_size=200)
    """
    a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if num_subsets < 1 or subset_size < 2:
        raise ValueError(
            f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}"
        )
    rng = generator if generator is not None else np.random.default_rng(seed)
    m_a, m_b = min(subset_size, len(a)), min(subset_size, len(b))
    rounds = 1 if (m_a == len(a) and m_b == len(b)) else num_subsets
    values, var_a, var_b = [], [], []
    for _ in range(rounds):
        xa = a if m_a == len(a) else a[rng.choice(len(a), m_a, replace=False)]
        xb = b if m_b == len(b) else b[rng.choice(len(b), m_b, replace=False)]
        v, va, vb = mmd2_polynomial(xa, xb)
        values.append(v)
        var_a.append(va)
        var_b.append(vb)
    k_a, k_b = min(rounds, len(a) / m_a), min(rounds, len(b) / m_b)
    stderr = math.sqrt(np.mean(var_a) / k_a + np.mean(var_b) / k_b)
    return float(np.mean(values)), stderr
