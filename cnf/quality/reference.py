"""Reference statistics of a training set for FD and KID, computed once and cached.

``reference_statistics(extractor, levels, num_levels=L, dataset=name)``
computes the features of the training images (``level/(L − 1)``), their mean
and covariance, and stores them in ``<cache_dir>/reference/<dataset>-<extractor>-<digest>.npz``
(default cache: ``$CNF_CACHE`` or ``~/.cache/cnf``). The digest covers the
data set's name, the SHA-256 of the training array's bytes (with its shape,
dtype and number of levels), the extractor's ``identity`` (for a TorchScript
network the SHA-256 of its file, for the digits classifier that of its
recipe and data) and the format version; a later call with the same inputs
loads the file instead of recomputing.

The ``.npz`` holds ``mu`` (F,) and ``sigma`` (F, F) in float64 over **all**
training images, and ``features`` for KID: all of them when there are at
most ``max_kid_features`` (default 10 000) images, else the first
``max_kid_features`` of a fixed permutation (``numpy.random.default_rng(0)``)
— stored as float32, the precision the feature networks compute in.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnf.quality.distances import feature_statistics
from cnf.quality.features import FeatureExtractor, compute_features, default_cache_dir

__all__ = ["ReferenceStatistics", "reference_statistics"]

FORMAT_VERSION = 1


@dataclass
class ReferenceStatistics:
    """Features of a training set for FD and KID.

    Attributes:
        mu, sigma: Mean ``(F,)`` and covariance ``(F, F)`` (float64) of all images' features.
        features: ``(K, F)`` features for KID (all, or a fixed subsample).
        num_images: Training images the statistics are over.
        path: The cache file.
        from_cache: True when this call loaded the file instead of computing it.
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    num_images: int
    path: Path
    from_cache: bool


def _key(
    dataset: str, levels: np.ndarray, num_levels: int, extractor: FeatureExtractor, kmax: int
) -> str:
    data = hashlib.sha256(np.ascontiguousarray(levels).tobytes()).hexdigest()
    fields = {
        "dataset": dataset,
        "data_sha256": data,
        "shape": list(levels.shape),
        "dtype": levels.dtype.str,
        "num_levels": int(num_levels),
        "extractor": extractor.identity,
        "max_kid_features": int(kmax),
        "version": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _load(path: Path, num_features: int) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("mu", "sigma", "features", "num_images")}
    except Exception:  # missing, truncated or foreign: recompute
        return None
    f = num_features
    if out["mu"].shape != (f,) or out["sigma"].shape != (f, f) or out["features"].shape[1:] != (f,):
        return None
    return out


def reference_statistics(
    extractor: FeatureExtractor,
    levels: np.ndarray,
    *,
    num_levels: int,
    dataset: str,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
    max_kid_features: int = 10_000,
    recompute: bool = False,
) -> ReferenceStatistics:
    """Mean, covariance and KID features of training images, from the cache when possible.

    Args:
        extractor: The feature network.
        levels: Training images as integer levels ``(N, C, H, W)`` (e.g. uint8).
        num_levels: ``L``; the network sees ``level/(L − 1)``.
        dataset: Data set name (part of the cache key and file name).
        cache_dir: Cache root (default :func:`~cnf.quality.features.default_cache_dir`).
        batch_size, device, progress: As in :func:`~cnf.quality.features.compute_features`.
        max_kid_features: At most this many features are kept for KID.
        recompute: Ignore an existing cache file (and overwrite it).

    Returns:
        :class:`ReferenceStatistics`.
    """
    levels = np.asarray(levels)
    if levels.ndim != 4 or len(levels) < 2:
        raise ValueError(f"levels must be (N, C, H, W) with N >= 2, got shape {levels.shape}")
    key = _key(dataset, levels, num_levels, extractor, max_kid_features)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "reference" / f"{dataset}-{extractor.name}-{key[:16]}.npz"
    cached = None if recompute else _load(path, extractor.num_features)
    if cached is not None:
        return ReferenceStatistics(
            cached["mu"],
            cached["sigma"],
            cached["features"].astype(np.float64),
            int(cached["num_images"]),
            path,
            True,
        )
    images = torch.as_tensor(levels).float() / (num_levels - 1)
    feats = compute_features(
        extractor, images, batch_size=batch_size, device=device, progress=progress
    )
    mu, sigma = feature_statistics(feats)
    if len(feats) > max_kid_features:
        feats = feats[np.random.default_rng(0).permutation(len(feats))[:max_kid_features]]
    kid_feats = feats.astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma, features=kid_feats, num_images=np.int64(len(levels)))
    # Imported here: cnf.train's package imports the data sets (scikit-learn).
    from cnf.train.checkpoint import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, lambda fh: fh.write(buf.getvalue()))
    return ReferenceStatistics(mu, sigma, kid_feats.astype(np.float64), len(levels), path, False)
