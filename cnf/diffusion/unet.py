"""A small convolutional U-Net ``(t, x) -> y`` for image score models.

The DDPM layout at toy scale (Ho et al. 2020; Song et al. 2021's DDPM++
without its extras): a sinusoidal time embedding through an MLP; per
resolution ``num_res_blocks`` residual blocks (GroupNorm → SiLU → 3×3 conv,
the time embedding added as a per-channel shift); stride-2 convolutions down,
nearest-neighbour upsampling + conv up; skip connections concatenated on the
way up; self-attention in the middle (lowest resolution). Output convolutions
of every residual branch start at zero, so each block starts as the identity
and the network's output as 0.

Vector inputs ``(B, C·H·W)`` are reshaped to ``image_shape`` and back, so the
same network serves data sets stored flattened.

References:
    Ronneberger, Fischer & Brox, "U-Net", MICCAI 2015.
    Ho, Jain & Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020.
    Song et al., "Score-based generative modeling through SDEs", ICLR 2021.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cnf.diffusion.nets import SinusoidalEmbedding, _per_sample_time, register_image_net

__all__ = ["UNet"]


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    # The largest group count ≤ groups that divides the channels.
    g = max(k for k in range(1, min(groups, channels) + 1) if channels % k == 0)
    return nn.GroupNorm(g, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, *, groups: int, dropout: float):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + rearrange(self.emb(emb), "b c -> b c 1 1")
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map."""

    def __init__(self, channels: int, *, heads: int = 1, groups: int = 8):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels {channels} not divisible by heads {heads}")
        self.heads = heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        _, _, h, w = x.shape
        q, k, v = rearrange(
            self.qkv(self.norm(x)), "b (three n c) h w -> three b n (h w) c", three=3, n=self.heads
        )
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b n (h w) c -> b (n c) h w", h=h, w=w)
        return x + self.proj(out)


class UNet(nn.Module):
    """Time-conditioned U-Net for images.

    Args:
        image_shape: ``(C, H, W)``; H and W divisible by ``2^(len(channel_mults) − 1)``.
        channels: Base width.
        channel_mults: Width multipliers per resolution (one downsampling between each).
        num_res_blocks: Residual blocks per resolution on the way down.
        attention: Self-attention in the middle block.
        dropout: Dropout inside residual blocks.
        groups: GroupNorm groups (reduced to a divisor of the width where needed).
        embed_scale: Highest frequency of the sinusoidal embedding of the
            conditioning input (1000 for t ∈ [0, 1]; ~1 for log σ).

    Shapes: ``t`` scalar or ``(B,)``; ``x`` ``(B, C, H, W)`` or ``(B, C·H·W)``;
    the output has the shape of ``x``.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention: bool = True,
        dropout: float = 0.0,
        groups: int = 8,
        embed_scale: float = 1000.0,
    ):
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        c, h, w = image_shape
        factor = 2 ** (len(channel_mults) - 1)
        if h % factor or w % factor:
            raise ValueError(f"image size {h}×{w} not divisible by {factor} (channel_mults)")
        self.image_shape = tuple(image_shape)
        emb_dim = 4 * channels
        self.time_embed = nn.Sequential(
            SinusoidalEmbedding(channels, scale=embed_scale),
            nn.Linear(channels, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        block = dict(emb_dim=emb_dim, groups=groups, dropout=dropout)
        self.conv_in = nn.Conv2d(c, channels, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [channels]
        ch = channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, channels * mult, **block))
                ch = channels * mult
                skips.append(ch)
            if level < len(channel_mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)

        self.mid1 = ResBlock(ch, ch, **block)
        self.mid_attn = Attention(ch, groups=groups) if attention else nn.Identity()
        self.mid2 = ResBlock(ch, ch, **block)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), channels * mult, **block))
                ch = channels * mult
            if level > 0:
                self.up.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)
                    )
                )
        self.norm_out = _norm(ch, groups)
        self.conv_out = _zero(nn.Conv2d(ch, c, 3, padding=1))

    def forward(self, t: Tensor | float, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(shape[0], *self.image_shape)
        emb = self.time_embed(_per_sample_time(t, x))
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), emb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h))).reshape(shape)


register_image_net("unet", UNet)
