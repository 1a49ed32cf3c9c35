"""Sample quality of image models: feature networks, Fréchet distance (FID) and KID.

* :mod:`cnf.quality.distances` — :func:`feature_statistics`, :func:`frechet_distance`, :func:`kid`;
* :mod:`cnf.quality.features` — the :class:`FeatureExtractor` interface,
  :class:`TorchScriptFeatures` (Inception-v3 as ``inception-2015-12-05.pt``),
  :func:`build_features`, :func:`compute_features`;
* :mod:`cnf.quality.digits` — :class:`DigitsFeatures`, an offline classifier for the 8×8 digits;
* :mod:`cnf.quality.reference` — cached training-set statistics (:func:`reference_statistics`);
* :mod:`cnf.quality.images` — model samples → feature-network input, :func:`image_grid`;
* :mod:`cnf.quality.sampling` — :class:`SampleQuality`: FD/KID of a model's seeded,
  batched samples (what ``final.json``, ``cost_curve.py`` and ``fid.py`` report).

Importing this package loads neither matplotlib, wandb nor scikit-learn
(the digits classifier imports scikit-learn's data when it is first built).

Example:
    >>> extractor = build_features("digits")
    >>> real = reference_statistics(extractor, train_levels, num_levels=17, dataset="digits")
    >>> feats = compute_features(extractor, samples_to_images(samples, 17))
    >>> fid = frechet_distance(*feature_statistics(feats), real.mu, real.sigma)
    >>> kid_value, kid_stderr = kid(feats, real.features)
"""

from cnf.quality.digits import DigitsFeatures, load_digits_classifier
from cnf.quality.distances import feature_statistics, frechet_distance, kid, mmd2_polynomial
from cnf.quality.features import (
    FEATURES,
    FeatureError,
    FeatureExtractor,
    TorchScriptFeatures,
    build_features,
    compute_features,
    default_cache_dir,
)
from cnf.quality.images import image_grid, samples_to_images, to_levels, to_uint8
from cnf.quality.reference import ReferenceStatistics, reference_statistics
from cnf.quality.sampling import QualityConfig, SampleQuality, sample_batches

__all__ = [
    "FEATURES",
    "DigitsFeatures",
    "FeatureError",
    "FeatureExtractor",
    "QualityConfig",
    "ReferenceStatistics",
    "SampleQuality",
    "TorchScriptFeatures",
    "build_features",
    "compute_features",
    "default_cache_dir",
    "feature_statistics",
    "frechet_distance",
    "image_grid",
    "kid",
    "load_digits_classifier",
    "mmd2_polynomial",
    "reference_statistics",
    "sample_batches",
    "samples_to_images",
    "to_levels",
    "to_uint8",
]
