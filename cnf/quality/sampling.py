"""FD and KID of a model's samples: seeded batched sampling → features → distances.

:class:`SampleQuality` is built once per data set and feature network — it
loads the network (:func:`~cnf.quality.features.build_features`, checked on
the data's image shape) and the training set's cached reference statistics
(:func:`~cnf.quality.reference.reference_statistics`) — and then scores any
number of models or sampling settings against them (docs/methods.md §8.5):

* :meth:`SampleQuality.of_model` draws ``num_samples`` samples through
  ``model.sample(n, settings, generator=...)`` in batches of ``batch_size``,
  quantises them to the data's levels (:func:`~cnf.quality.images.samples_to_images`),
  computes their features and returns ``fid``, ``kid``, ``kid_stderr`` with
  the sampler's NFE. Common random numbers: one ``torch.Generator`` seeded
  with ``seed`` on the model's device gives the base noise, and the global
  RNG is forked and seeded with ``seed`` — so every setting and every model of
  the same event shape sees the same noise, and a repeat gives identical numbers;
* :meth:`SampleQuality.of_data` scores the held-out test images the same way
  (``fid_data``, ``kid_data``): the floor a model's samples are compared
  with. It has fewer images than a model usually has samples, and FD is
  biased upwards at small sizes (KID is not), so the comparison favours the model.

The model is used only through ``sample``, ``device`` and its ``settings``
(any :class:`~cnf.models.base.GenerativeModel`); the data set only through
``train``, ``test``, ``num_levels``, ``image_shape`` and ``name``
(a :class:`~cnf.data.Dataset`). Nothing here imports a model family.

Example:
    >>> quality = SampleQuality.for_dataset(data, QualityConfig("digits", num_samples=2000))  # doctest: +SKIP
    >>> quality.of_model(model, settings={"sampler": "heun", "steps": 10}, seed=0)  # doctest: +SKIP
    {'fid': ..., 'kid': ..., 'kid_stderr': ..., 'fid_nfe': 19.0, ...}
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnf.quality.distances import feature_statistics, frechet_distance, kid
from cnf.quality.features import build_features, compute_features
from cnf.quality.images import samples_to_images
from cnf.quality.reference import reference_statistics

__all__ = ["QualityConfig", "SampleQuality", "sample_batches"]


@dataclass(frozen=True)
class QualityConfig:
    """How sample quality is measured (the typed form of the ``eval.fid`` config section).

    Attributes:
        features: ``digits`` or the path of a TorchScript feature network.
        num_samples: Model samples per score.
        batch_size: Samples per ``model.sample`` call (and images per feature batch).
        kid_subsets, kid_subset_size: KID's subsets (:func:`~cnf.quality.distances.kid`).
    """

    features: str
    num_samples: int = 50_000
    batch_size: int = 500
    kid_subsets: int = 100
    kid_subset_size: int = 1000

    @classmethod
    def from_section(
        cls, section: Any, *, default_batch_size: int, **changes: Any
    ) -> QualityConfig:
        """From an ``eval.fid`` section (``batch_size`` 0 → ``default_batch_size``), with ``changes``."""
        fields = {
            "features": section.features,
            "num_samples": section.num_samples,
            "batch_size": section.batch_size or default_batch_size,
            "kid_subsets": section.kid_subsets,
            "kid_subset_size": section.kid_subset_size,
        }
        fields.update({k: v for k, v in changes.items() if v is not None})
        if fields["features"] is None:
            raise ValueError("eval.fid.features is not set (digits or a TorchScript file)")
        return cls(**fields)

    def __post_init__(self) -> None:
        if self.num_samples < 2 or self.batch_size < 1:
            raise ValueError(
                f"need num_samples >= 2 and batch_size >= 1, got {self.num_samples}, {self.batch_size}"
            )
        if self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise ValueError(
                f"need kid_subsets >= 1 and kid_subset_size >= 2, "
                f"got {self.kid_subsets}, {self.kid_subset_size}"
            )


def sample_batches(
    model: Any,
    n: int,
    *,
    settings: Any = None,
    seed: int,
    batch_size: int,
    stats: dict[str, Any] | None = None,
) -> Iterator[torch.Tensor]:
    """``n`` model samples in batches, with common random numbers (module docstring).

    Args:
        model: Anything with ``sample(n, settings, generator=)`` and ``device``.
        n: Samples in all.
        settings: The model's sampling settings (None: its own).
        seed: Seeds the base-noise generator and the (forked) global RNG.
        batch_size: Samples per call.
        stats: If given, filled with ``nfe`` (list, per batch) and ``finite`` (count).

    Yields:
        Sample batches ``(b, *event_shape)`` as the model returns them.
    """
    device = model.device
    record = stats if stats is not None else {}
    record.setdefault("nfe", [])
    record.setdefault("finite", 0)
    generator = torch.Generator(device=device).manual_seed(seed)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            x, out = model.sample(min(batch_size, n - start), settings, generator=generator)
            if out.get("nfe") is not None:
                record["nfe"].append(float(out["nfe"]))
            record["finite"] += int(torch.isfinite(x).flatten(1).all(1).sum())
            yield x


class SampleQuality:
    """FD and KID against one data set's training images, with one feature network.

    Args:
        config: What to measure (:class:`QualityConfig`).
        train_levels: Training images as integer levels, ``(N, C, H, W)`` or ``(N, D)``.
        num_levels: Grey levels ``L`` of the data.
        image_shape: ``(C, H, W)`` of one image.
        dataset: The data set's name (part of the reference cache key).
        test_levels: Held-out images for :meth:`of_data` (optional).
        device: Where the feature network runs.
        cache_dir: Cache of weights and reference statistics (default ``$CNF_CACHE``).
        progress: Progress bars on stderr.

    Raises:
        FeatureError: a missing or unusable feature network (one line).
    """

    def __init__(
        self,
        config: QualityConfig,
        *,
        train_levels: np.ndarray,
        num_levels: int,
        image_shape: tuple[int, int, int],
        dataset: str,
        test_levels: np.ndarray | None = None,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
        progress: bool = False,
    ):
        self.config = config
        self.num_levels = int(num_levels)
        self.image_shape = tuple(image_shape)
        self.progress = progress
        self.extractor = build_features(
            config.features, cache_dir=cache_dir, device=device, progress=progress
        )
        self.extractor.check(self.image_shape)  # a wrong network fails before any long work
        train = np.asarray(train_levels).reshape(-1, *self.image_shape)
        self.reference = reference_statistics(
            self.extractor,
            train,
            num_levels=self.num_levels,
            dataset=dataset,
            cache_dir=cache_dir,
            batch_size=config.batch_size,
            progress=progress,
        )
        self._test = None if test_levels is None else np.asarray(test_levels)
        self._data_scores: dict[str, Any] | None = None

    @classmethod
    def for_dataset(cls, data: Any, config: QualityConfig, **kwargs: Any) -> SampleQuality:
        """For an image :class:`~cnf.data.Dataset` (its training split, test split and levels)."""
        if getattr(data, "image_shape", None) is None or getattr(data, "train", None) is None:
            raise ValueError(
                f"FD/KID need an image data set with a training split; {data.name} is not one"
            )
        return cls(
            config,
            train_levels=data.train,
            num_levels=data.num_levels,
            image_shape=data.image_shape,
            dataset=data.name,
            test_levels=data.test,
            **kwargs,
        )

    @classmethod
    def for_eval(
        cls,
        data: Any,
        eval_section: Any,
        *,
        device: str | torch.device = "cpu",
        progress: bool = False,
        **changes: Any,
    ) -> SampleQuality:
        """For a run: its data set and ``eval:`` section (``eval.fid``; ``changes`` override it)."""
        config = QualityConfig.from_section(
            eval_section.fid, default_batch_size=eval_section.batch_size, **changes
        )
        return cls.for_dataset(data, config, device=device, progress=progress)

    def distances(self, features: np.ndarray, *, seed: int) -> dict[str, float]:
        """``fid``, ``kid``, ``kid_stderr`` of features ``(N, F)`` against the reference."""
        fid = frechet_distance(
            *feature_statistics(features), self.reference.mu, self.reference.sigma
        )
        kid_value, kid_stderr = kid(
            features,
            self.reference.features,
            num_subsets=self.config.kid_subsets,
            subset_size=self.config.kid_subset_size,
            seed=seed,
        )
        return {"fid": fid, "kid": kid_value, "kid_stderr": kid_stderr}

    def of_model(
        self, model: Any, *, settings: Any = None, seed: int, num_samples: int | None = None
    ) -> dict[str, Any]:
        """FD and KID of ``num_samples`` (default ``config.num_samples``) samples of ``model``.

        Returns:
            ``fid``, ``kid``, ``kid_stderr``, ``fid_num_samples``, ``fid_nfe``
            (mean NFE per ``sample`` call, None if the model reports none),
            ``fid_finite_fraction`` (samples without NaN/Inf; non-finite
            values become level 0) and ``fid_seconds`` (sampling and features).
        """
        n = self.config.num_samples if num_samples is None else int(num_samples)
        if n < 2:
            raise ValueError(f"FD/KID need at least 2 samples, got {n}")
        t0 = time.perf_counter()
        stats: dict[str, Any] = {}
        images = (
            samples_to_images(x.reshape(len(x), *self.image_shape), self.num_levels)
            for x in sample_batches(
                model,
                n,
                settings=settings,
                seed=seed,
                batch_size=self.config.batch_size,
                stats=stats,
            )
        )
        feats = compute_features(
            self.extractor,
            images,
            progress=self.progress,
            total=n,
            dtype=np.float32,  # halves the memory of 50k × 2048 features
        )
        out: dict[str, Any] = self.distances(feats, seed=seed)
        out.update(
            fid_num_samples=n,
            fid_nfe=float(np.mean(stats["nfe"])) if stats["nfe"] else None,
            fid_finite_fraction=stats["finite"] / n,
            fid_seconds=time.perf_counter() - t0,
        )
        return out

    def of_data(self, *, seed: int = 0) -> dict[str, Any]:
        """FD and KID of the held-out test images (computed once): ``fid_data``, ``kid_data``, ...

        Empty when the instance was built without ``test_levels``.
        """
        if self._test is None:
            return {}
        if self._data_scores is None:
            levels = self._test.reshape(-1, *self.image_shape)
            images = torch.as_tensor(levels).float() / (self.num_levels - 1)
            feats = compute_features(self.extractor, images, batch_size=self.config.batch_size)
            d = self.distances(feats, seed=seed)
            self._data_scores = {
                "fid_data": d["fid"],
                "kid_data": d["kid"],
                "kid_data_stderr": d["kid_stderr"],
                "fid_data_num_images": len(levels),
            }
        return dict(self._data_scores)

    def record(self, model: Any, *, settings: Any = None, seed: int) -> dict[str, Any]:
        """:meth:`of_model`, :meth:`of_data` and ``fid_info`` (:meth:`provenance` with the seed): one result record."""
        out = self.of_model(model, settings=settings, seed=seed)
        out.update(self.of_data(seed=seed))
        out["fid_info"] = self.provenance(seed=seed)
        return out

    def provenance(self, **extra: Any) -> dict[str, Any]:
        """What the numbers were measured with: the network, the reference and the settings."""
        return {
            **asdict(self.config),
            "features": self.extractor.name,  # the spec (a path) is kept as features_spec
            "features_spec": self.config.features,
            "feature_identity": self.extractor.identity,
            "reference": {
                "num_images": self.reference.num_images,
                "cache": str(self.reference.path),
            },
            **extra,
        }
