"""Feature networks for sample quality behind one small interface, and batched feature computation.

A :class:`FeatureExtractor` is a callable: float images ``(N, C, H, W)`` in
``[0, 1]`` (``level/(L − 1)``, see :func:`~cnf.quality.images.samples_to_images`;
the dequantised scale of the network's own number of levels works too) →
``(N, F)`` float64 numpy features. It has a ``name``, ``num_features`` and an
``identity`` string that names the exact network (the cache key of reference
statistics). Two are built in:

* :class:`TorchScriptFeatures` — any TorchScript feature network called as
  ``detector(uint8 images (N, 3, H, W), return_features=True)``, the
  convention of NVIDIA's ``inception-2015-12-05.pt`` (StyleGAN2-ADA, EDM,
  clean-fid), which resizes internally and returns the 2048 pool features of
  Inception-v3 (FID's network). Loaded with ``torch.jit.load`` — no Python
  unpickling, no torchvision. Grey images are repeated to 3 channels.
* :class:`~cnf.quality.digits.DigitsFeatures` — the project's 8×8 digits
  classifier, trained offline on first use (``"digits"``).

:func:`build_features` maps a spec to one of them (:data:`FEATURES` names the
built-in ones; anything else is the path of a TorchScript file).

References:
    Szegedy et al., "Rethinking the Inception architecture for computer vision", CVPR 2016.
    Karras et al., "Training generative adversarial networks with limited data",
    NeurIPS 2020 (StyleGAN2-ADA; ``inception-2015-12-05.pt``).
    Parmar, Zhang & Zhu, "On aliased resizing and surprising subtleties in GAN
    evaluation", CVPR 2022 (clean-fid).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cnf.quality.images import to_uint8

__all__ = [
    "FEATURES",
    "FeatureError",
    "FeatureExtractor",
    "TorchScriptFeatures",
    "build_features",
    "compute_features",
    "default_cache_dir",
    "file_digest",
]


class FeatureError(ValueError):
    """A feature network that cannot be used; the message is one line naming the file."""


def default_cache_dir() -> Path:
    """``$CNF_CACHE``, else ``~/.cache/cnf``: feature-network weights and reference statistics."""
    return Path(os.environ.get("CNF_CACHE") or "~/.cache/cnf").expanduser()


def file_digest(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    # TorchScript runtime errors start with a generic banner and end with the cause.
    line = lines[-1] if "TorchScript" in lines[0] else lines[0]
    # torch's archive errors append several sentences of advice: keep the first.
    return line.split(". ")[0] if len(line) > 160 else line


class FeatureExtractor(ABC):
    """Images ``(N, C, H, W)`` in ``[0, 1]`` → features ``(N, F)`` float64 (numpy, on the CPU).

    Subclasses set ``name``, ``num_features`` and ``num_levels`` (the grey
    levels the network sees) and implement :meth:`_forward`, :meth:`_move`
    and :attr:`identity`.
    """

    name: str
    num_features: int
    num_levels: int = 256

    def __init__(self, *, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    @property
    @abstractmethod
    def identity(self) -> str:
        """A string that changes whenever the features could change (name, weights digest, ...)."""

    @abstractmethod
    def _forward(self, images: Tensor) -> Tensor:
        """Features of float images on ``self.device``; returns ``(N, num_features)``."""

    @abstractmethod
    def _move(self, device: torch.device) -> None:
        """Move the network's weights to ``device``."""

    def _source(self) -> str:
        return self.name

    def to(self, device: str | torch.device) -> FeatureExtractor:
        """Run on ``device`` from now on; returns ``self``."""
        self.device = torch.device(device)
        self._move(self.device)
        return self

    @torch.no_grad()
    def __call__(self, images: Tensor | np.ndarray) -> np.ndarray:
        x = torch.as_tensor(images)
        if x.dim() != 4:
            raise FeatureError(
                f"{self._source()}: expected images of shape (N, C, H, W), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():  # e.g. uint8 levels passed by mistake
            raise FeatureError(
                f"{self._source()}: expected float images in [0, 1], got dtype {x.dtype} "
                "(convert levels with cnf.quality.samples_to_images or level/(L - 1))"
            )
        # Kept in its dtype: the quantisation to the network's levels is exact in float64.
        x = x.to(self.device)
        try:
            out = self._forward(x)
        except FeatureError:
            raise
        except Exception as e:
            raise FeatureError(
                f"{self._source()}: the feature network failed: {_one_line(e)}"
            ) from None
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        if not isinstance(out, Tensor) or shape != (x.shape[0], self.num_features):
            raise FeatureError(
                f"{self._source()}: expected features of shape ({x.shape[0]}, {self.num_features}) "
                f"for {x.shape[0]} images, got {shape}"
            )
        return out.detach().to("cpu", torch.float64).numpy()

    def check(self, image_shape: tuple[int, int, int]) -> None:
        """Run the network on two blank images of ``image_shape`` ``(C, H, W)``.

        Raises:
            FeatureError: the network does not take such images or returns
                features of the wrong shape.
        """
        self(torch.zeros((2, *image_shape)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity})"


class TorchScriptFeatures(FeatureExtractor):
    """A TorchScript feature network called as ``detector(uint8 (N, 3, H, W), return_features=True)``.

    Images in ``[0, 1]`` become uint8 by :func:`~cnf.quality.images.to_uint8`
    (exact for ``level/255`` and for ``(level + u)/256``); one channel is
    repeated to three.

    Args:
        path: The ``.pt`` file, e.g. NVIDIA's ``inception-2015-12-05.pt``.
        num_features: Features per image the module must return (2048 for Inception-v3).
        device: Where to run it.

    Raises:
        FeatureError: no such file, or not a TorchScript archive.

    Example:
        >>> features = TorchScriptFeatures("inception-2015-12-05.pt")  # doctest: +SKIP
        >>> features(torch.rand(4, 3, 32, 32)).shape  # doctest: +SKIP
        (4, 2048)
    """

    num_levels = 256

    def __init__(
        self, path: str | Path, *, num_features: int = 2048, device: str | torch.device = "cpu"
    ):
        super().__init__(device=device)
        self.path = Path(path)
        expected = "a TorchScript feature network such as inception-2015-12-05.pt"
        if not self.path.is_file():
            raise FeatureError(f"feature network file not found: {self.path} (expected {expected})")
        try:
            with warnings.catch_warnings():
                # torch.jit is deprecated in recent torch, but it is the format of
                # the published feature networks.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.module = torch.jit.load(str(self.path), map_location=self.device).eval()
        except Exception as e:
            raise FeatureError(
                f"{self.path} is not a TorchScript file (expected {expected}; "
                f"torch.jit.load: {_one_line(e)})"
            ) from None
        self.name = self.path.stem
        self.num_features = int(num_features)
        self._digest = file_digest(self.path)

    @property
    def identity(self) -> str:
        return f"torchscript:{self._digest}:{self.num_features}"

    def _source(self) -> str:
        return str(self.path)

    def _move(self, device: torch.device) -> None:
        self.module = self.module.to(device)

    def _forward(self, images: Tensor) -> Tensor:
        c = images.shape[1]
        if c not in (1, 3):
            raise FeatureError(f"{self.path}: expects grey or RGB images, got {c} channels")
        u8 = to_uint8(images)
        if c == 1:
            u8 = u8.expand(-1, 3, -1, -1)
        return self.module(u8.contiguous(), return_features=True)


def _digits(*, cache_dir: str | Path | None, device: str | torch.device, progress: bool):
    from cnf.quality.digits import DigitsFeatures

    return DigitsFeatures(cache_dir=cache_dir, device=device, progress=progress)


FEATURES: dict[str, Callable[..., FeatureExtractor]] = {"digits": _digits}
"""Built-in feature networks by name; :func:`build_features` treats other specs as file paths."""


def build_features(
    spec: str,
    *,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> FeatureExtractor:
    """A feature extractor from a spec: a name in :data:`FEATURES` (``"digits"``) or a TorchScript path.

    Args:
        spec: ``"digits"`` or the path of a TorchScript file.
        cache_dir: Cache of trained weights (default :func:`default_cache_dir`).
        device: Where the network runs.
        progress: Report training of a built-in network (if it is not cached yet).

    Raises:
        FeatureError: a path that is missing or not TorchScript.
    """
    if spec in FEATURES:
        return FEATURES[spec](cache_dir=cache_dir, device=device, progress=progress)
    return TorchScriptFeatures(spec, device=device)


def _batches(images: Tensor | np.ndarray | Iterable, batch_size: int) -> Iterable:
    if isinstance(images, (Tensor, np.ndarray)):
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
    else:
        yield from images


def compute_features(
    extractor: FeatureExtractor,
    images_or_batches: Tensor | np.ndarray | Iterable[Tensor | np.ndarray],
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
    total: int | None = None,
    dtype: type = np.float64,
) -> np.ndarray:
    """Features of many images, batch by batch.

    Args:
        extractor: The feature network.
        images_or_batches: Images ``(N, C, H, W)`` in ``[0, 1]`` (split into
            ``batch_size`` chunks), or an iterable of such batches (e.g. a
            generator that samples a model batch by batch).
        batch_size: Chunk size for an array input.
        device: Move the extractor there first (default: where it is).
        progress: Show a tqdm bar (on stderr) counting images.
        total: Number of images, for the bar of an iterable input.
        dtype: Of the returned array (float32 halves the memory of many features).

    Returns:
        ``(N, F)`` features.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None:
        extractor.to(device)
    if total is None and isinstance(images_or_batches, (Tensor, np.ndarray)):
        total = len(images_or_batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="img", desc=f"features ({extractor.name})", leave=False)
    out = []
    try:
        for batch in _batches(images_or_batches, batch_size):
            out.append(extractor(batch).astype(dtype, copy=False))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    if not out:
        return np.zeros((0, extractor.num_features), dtype)
    return np.concatenate(out)
