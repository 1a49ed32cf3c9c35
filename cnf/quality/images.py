"""From model samples to the images a feature network expects; image grids.

The project's image models work on the **dequantised scale**
``x = (level + u)/L`` in ``[0, 1)`` (:mod:`cnf.data.images`), ``L`` grey levels.
Feature networks take integer levels (Inception: uint8, 256 levels). The map
used everywhere here is

    level = clamp(⌊x · L⌋, 0, L − 1),

which returns the level exactly for both conventions of an L-level image:
``x = (level + u)/L`` with ``u ∈ [0, 1)``, and ``x = level/(L − 1)`` (since
``⌊level · L/(L − 1)⌋ = level`` for ``level < L − 1``, and the top level is
clamped). Model samples outside ``[0, 1)`` are clamped to the end levels;
NaN becomes level 0 (count non-finite samples separately if it matters).

:func:`samples_to_images` turns model samples into ``level/(L − 1)`` in
``[0, 1]`` — the input convention of every :class:`~cnf.quality.features.FeatureExtractor`
— and :func:`to_uint8` gives the uint8 images of a 256-level network.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["image_grid", "samples_to_images", "to_levels", "to_uint8"]


def to_levels(x: Tensor, num_levels: int) -> Tensor:
    """``clamp(⌊x · L⌋, 0, L − 1)`` as int64 (NaN → 0, ±Inf → the end levels).

    Args:
        x: Images in ``[0, 1)`` (dequantised) or ``[0, 1]`` (``level/(L − 1)``), any shape.
        num_levels: ``L``.
    """
    if num_levels < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        x = x.double()
    # Clamp before flooring so that ±Inf and huge values are safe to cast.
    y = torch.nan_to_num(x * num_levels, nan=0.0).clamp(0, num_levels - 1)
    return y.floor().long()


def samples_to_images(x: Tensor, num_levels: int) -> Tensor:
    """Model samples on the dequantised scale → ``level/(L − 1)`` in ``[0, 1]`` (float32)."""
    return to_levels(x, num_levels).float() / (num_levels - 1)


def to_uint8(images: Tensor) -> Tensor:
    """Images in ``[0, 1]`` (``level/255`` or ``(level + u)/256``) → uint8 levels of 256."""
    return to_levels(images, 256).to(torch.uint8)


def image_grid(
    images: np.ndarray | Tensor, rows: int, cols: int, *, pad: int = 1, pad_value: float = 1.0
) -> np.ndarray:
    """Tile images ``(N, C, H, W)`` row by row into one ``(rows·(H+pad)+pad, cols·(W+pad)+pad, C)`` array.

    The first ``rows · cols`` images are used; missing cells (N smaller) are
    filled with ``pad_value`` like the padding. Values are copied as they are
    (float64); clip or quantise before if needed.

    Example:
        >>> image_grid(np.zeros((6, 1, 8, 8)), 2, 3).shape
        (19, 28, 1)
    """
    if rows < 1 or cols < 1 or pad < 0:
        raise ValueError(f"need rows, cols >= 1 and pad >= 0, got {rows}, {cols}, {pad}")
    imgs = np.asarray(images.detach().cpu() if isinstance(images, Tensor) else images, np.float64)
    if imgs.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {imgs.shape}")
    _, c, h, w = imgs.shape
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.float64)
    for k, img in enumerate(imgs[: rows * cols]):
        r, q = divmod(k, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = img.transpose(1, 2, 0)
    return grid
