"""FIR up- and down-sampling of feature maps (StyleGAN2's ``upfirdn2d``), in plain PyTorch.

Resampling by a factor ``f`` with a separable low-pass FIR filter ``k``
(``(1, 3, 3, 1)`` in NCSN++): upsampling inserts ``f − 1`` zeros between
pixels and filters with ``f² · k kᵀ / Σ(k kᵀ)`` (so a constant image stays
constant); downsampling filters with ``k kᵀ / Σ(k kᵀ)`` and keeps every
``f``-th pixel. With ``k = (1, 1)`` these are nearest-neighbour upsampling and
``f × f`` average pooling. The padding is placed so that the output grid is
centred on the input grid: resampling commutes with flipping the image (no
half-pixel shift), and zeros are assumed outside the image.

The fused variants put a 3×3 convolution on the fine grid in the same pass,
padding once: the FIR filter then a strided convolution, or a transposed
(strided) convolution then the FIR filter. Away from the border they equal
resampling and a zero-padded convolution in sequence; at the border they differ.

Every function takes ``x`` of shape ``(B, C, H, W)``; kernels are 1-D
sequences (made separable here). Pure PyTorch, so it runs on any device and
supports double backward.

References:
    Karras et al., "Analyzing and improving the image quality of StyleGAN"
    (StyleGAN2), CVPR 2020 — the ``upfirdn2d`` operator and fused resampling.
    Zhang, "Making convolutional networks shift-invariant again", ICML 2019.
    Song et al., "Score-based generative modeling through SDEs", ICLR 2021 (NCSN++).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "conv_downsample_2d",
    "downsample_2d",
    "fir_filter",
    "upfirdn2d",
    "upsample_2d",
    "upsample_conv_2d",
]


def fir_filter(kernel: Sequence[float], *, gain: float = 1.0) -> Tensor:
    """The separable 2-D filter ``gain · k kᵀ / Σ(k kᵀ)`` of a 1-D kernel ``k``, shape ``(K, K)``."""
    k = torch.as_tensor(kernel, dtype=torch.float64)
    if k.dim() != 1 or len(k) == 0:
        raise ValueError(f"FIR kernel must be a non-empty 1-D sequence, got {kernel}")
    k2 = torch.outer(k, k)
    return gain * k2 / k2.sum()


def upfirdn2d(
    x: Tensor, filt: Tensor, *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)
) -> Tensor:
    """Zero-insertion upsampling, padding, 2-D FIR filtering and subsampling, per channel.

    Args:
        x: ``(B, C, H, W)``.
        filt: ``(K, K)`` filter (convolved, i.e. flipped, as in signal processing).
        up: Upsampling factor (``up − 1`` zeros between pixels).
        down: Keep every ``down``-th output pixel.
        pad: Zeros added before and after, on both spatial axes, after upsampling.

    Returns:
        ``(B, C, H', W')`` with ``H' = (H·up + pad[0] + pad[1] − K) // down + 1``.
    """
    if min(pad) < 0:
        raise ValueError(f"padding must be non-negative, got {pad}")
    b, c, h, w = x.shape
    if up > 1:
        stuffed = x.new_zeros(b, c, h * up, w * up)
        stuffed[:, :, ::up, ::up] = x
        x = stuffed
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = filt.flip(0, 1).to(x)[None, None].expand(c, 1, *filt.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def upsample_2d(x: Tensor, kernel: Sequence[float], *, factor: int = 2) -> Tensor:
    """FIR upsampling ``(B, C, H, W) → (B, C, f·H, f·W)``."""
    filt = fir_filter(kernel, gain=factor**2)
    p = filt.shape[0] - factor
    return upfirdn2d(x, filt, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Tensor, kernel: Sequence[float], *, factor: int = 2) -> Tensor:
    """FIR downsampling ``(B, C, H, W) → (B, C, H/f, W/f)``."""
    filt = fir_filter(kernel)
    p = filt.shape[0] - factor
    return upfirdn2d(x, filt, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(
    x: Tensor, weight: Tensor, kernel: Sequence[float], *, factor: int = 2
) -> Tensor:
    """FIR upsampling fused with a convolution: ``(B, C_in, H, W) → (B, C_out, f·H, f·W)``.

    A transposed convolution with stride ``f`` (the zero insertion and the
    convolution ``weight`` in one step), then the FIR filter.

    Args:
        weight: ``(C_out, C_in, k, k)`` with odd ``k``, as for :func:`torch.nn.functional.conv2d`.
    """
    k = weight.shape[-1]
    # conv_transpose2d wants (C_in, C_out, k, k), spatially flipped to act as
    # "insert zeros, then correlate with weight".
    x = F.conv_transpose2d(x, weight.flip(2, 3).transpose(0, 1), stride=factor)
    filt = fir_filter(kernel, gain=factor**2)
    p = (filt.shape[0] - factor) - (k - 1)
    return upfirdn2d(x, filt, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(
    x: Tensor, weight: Tensor, kernel: Sequence[float], *, factor: int = 2
) -> Tensor:
    """A convolution fused with FIR downsampling: ``(B, C_in, H, W) → (B, C_out, H/f, W/f)``.

    The FIR filter (with the padding of both operations), then a strided
    convolution with ``weight`` ``(C_out, C_in, k, k)``.
    """
    k = weight.shape[-1]
    filt = fir_filter(kernel)
    p = (filt.shape[0] - factor) + (k - 1)
    x = upfirdn2d(x, filt, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=factor)
