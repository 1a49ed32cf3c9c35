"""The published score networks of Song et al. (2021): NCSN++, DDPM++ and the DDPM U-Net.

One configurable U-Net trunk, :class:`NCSNpp`, covers the three architectures
of the score-SDE paper's image experiments; each is a preset function:

* :func:`ddpmpp` — DDPM++ (VP / sub-VP): BigGAN-style residual blocks that
  resample inside the block, skip sums divided by √2, sinusoidal
  (positional) embedding of the time;
* :func:`ncsnpp` — NCSN++ (VE): the same with FIR resampling (kernel
  ``(1, 3, 3, 1)``), a residual input pyramid and Gaussian Fourier features of
  ``log σ``;
* :func:`ddpm_unet` — the DDPM U-Net of Ho et al. (2020): DDPM-style blocks
  with separate resampling layers, no rescaling, two blocks per resolution.

**Layout.** The time embedding (sinusoidal of ``time_scale · c`` or Fourier
of it) goes through a two-layer SiLU MLP of width ``4 nf``; every residual
block adds a linear map of it as a per-channel shift. A 3×3 input
convolution; per resolution ``num_res_blocks`` residual blocks (each followed
by self-attention at the resolutions in ``attn_resolutions``), then a
downsampling (a resampling residual block, or a strided convolution);
residual, attention, residual in the middle; on the way up
``num_res_blocks + 1`` blocks per resolution on the concatenated skip
features. Optional progressive pyramids (StyleGAN2's input/output skips)
carry a downsampled copy of the input down and a low-resolution output up.
GroupNorm (ε = 1e-6) with ``min(32, C // min_group_width)`` groups.

**Initialisation** as in DDPM: weights uniform with variance
``scale / fan_avg``, zero biases; ``init_scale`` is the scale of the last
convolution of every residual branch, of the attention output and of the
network's output (0 in all presets, which, as in the original, means a
variance of 1e-10 — near zero, so the network starts close to the identity
and its output close to 0).

Inputs ``(B, C·H·W)`` are reshaped to ``image_shape`` and back, so the same
network serves data sets stored flattened (like :class:`cnf.diffusion.unet.UNet`).

**Which score function** (the :class:`cnf.diffusion.nets.ScoreNetwork`
settings that reproduce the original's ``score_fn``, continuous training):

* VP / sub-VP (DDPM++, DDPM): the original feeds ``999 t`` to the sinusoidal
  embedding and returns ``−net/σ_t``. Here: ``time_scale=999`` on the
  backbone, ``ScoreNetwork(net, sde, "noise", conditioning="time")``, which
  computes ``−net(t, x)/σ(t)`` with the same ``σ(t)`` (VP ``√(1 − e^{−B})``,
  sub-VP ``1 − e^{−B}``). Identical functions.
* VE (NCSN++): the original feeds ``σ_t`` and the network embeds ``log σ_t``
  with Fourier features and divides its output by ``σ_t``. Here:
  ``ScoreNetwork(net, ve_sde, "noise", conditioning="log_sigma")``, which
  feeds ``c = log(σ/m) = log σ`` (VE has ``m = 1``) and returns
  ``−net/σ``; since the network's output is linear in its last
  convolution(s), negating those weights and biases maps one onto the other,
  and their symmetric initialisation gives both the same distribution, so the
  function class and the training problem are the same. For the original's
  exact sign (e.g. to load its checkpoints), build with ``scale_by_sigma=True``
  (the backbone divides by ``exp(c) = σ``) and use ``"score"``. One
  difference is in the SDE, not the network: :class:`cnf.diffusion.sde.VESDE`
  has the exact kernel std ``√(σ_min² r^{2t} − σ_min²)``, the original uses
  ``σ_min r^t`` (``r = σ_max/σ_min``); they agree to 1% for t ≥ 0.23 (σ ≥ 0.071
  with the CIFAR-10 values).

References:
    Song et al., "Score-based generative modeling through stochastic
    differential equations", ICLR 2021 (NCSN++, DDPM++; Appendix H).
    Ho, Jain & Abbeel, "Denoising diffusion probabilistic models", NeurIPS 2020.
    Brock, Donahue & Simonyan, "Large scale GAN training for high fidelity
    natural image synthesis" (BigGAN), ICLR 2019 — residual blocks that resample.
    Karras et al., "Analyzing and improving the image quality of StyleGAN",
    CVPR 2020 — FIR resampling, progressive input/output skips.
    Tancik et al., "Fourier features let networks learn high frequency
    functions in low dimensional domains", NeurIPS 2020.

Example:
    >>> net = ddpmpp((3, 32, 32), nf=32, num_res_blocks=1)
    >>> net(torch.rand(4), torch.randn(4, 3, 32, 32)).shape
    torch.Size([4, 3, 32, 32])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cnf.diffusion.nets import (
    GaussianFourierEmbedding,
    SinusoidalEmbedding,
    _per_sample_time,
    register_image_net,
)
from cnf.diffusion.resample import (
    conv_downsample_2d,
    downsample_2d,
    upsample_2d,
    upsample_conv_2d,
)

__all__ = [
    "EMBEDDINGS",
    "PROGRESSIVE_INPUTS",
    "PROGRESSIVE_OUTPUTS",
    "RESBLOCK_TYPES",
    "SCORE_BACKBONES",
    "Attention",
    "NCSNpp",
    "ResBlock",
    "Resample",
    "build_score_backbone",
    "ddpm_unet",
    "ddpmpp",
    "ncsnpp",
]

RESBLOCK_TYPES = ("biggan", "ddpm")
PROGRESSIVE_OUTPUTS = ("none", "output_skip", "residual")
PROGRESSIVE_INPUTS = ("none", "input_skip", "residual")
EMBEDDINGS = ("positional", "fourier")


# ------------------------------------------------------------ building blocks
def _init_(module: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Module:
    """DDPM's initialisation: ``U(±√(3 s / fan_avg))`` weights, zero bias; ``s = 0`` means 1e-10."""
    w = module.weight
    receptive = w[0, 0].numel()
    fan_avg = 0.5 * (w.shape[0] + w.shape[1]) * receptive
    bound = math.sqrt(3 * (scale if scale > 0 else 1e-10) / fan_avg)
    with torch.no_grad():
        w.uniform_(-bound, bound)
        if module.bias is not None:
            module.bias.zero_()
    return module


def _conv(
    c_in: int, c_out: int, kernel: int = 3, *, init_scale: float = 1.0, stride: int = 1
) -> nn.Conv2d:
    # "Same" padding at stride 1; none at stride 2 (the caller pads, or uses the weight in a fused op).
    padding = kernel // 2 if stride == 1 else 0
    return _init_(nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding), init_scale)


def _linear(d_in: int, d_out: int) -> nn.Linear:
    return _init_(nn.Linear(d_in, d_out))


def _group_norm(channels: int, min_group_width: int) -> nn.GroupNorm:
    # min(32, C // width) groups, lowered to a divisor of C for odd widths.
    g = max(1, min(32, channels // min_group_width))
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels, eps=1e-6)


class Resample(nn.Module):
    """×2 up- or down-sampling, optionally fused with a 3×3 convolution.

    Without a FIR kernel: nearest-neighbour upsampling (then the conv), or
    average pooling (with a conv: a stride-2 conv, padded (0, 1) like
    TensorFlow's 'SAME'). With a kernel: FIR resampling, the conv fused in
    (:mod:`cnf.diffusion.resample`).

    Args:
        direction: ``up`` | ``down``.
        fir_kernel: 1-D FIR kernel, or None.
        c_in: Input width if the layer has a conv (None: no parameters).
        c_out: Output width of the conv (default ``c_in``).
    """

    def __init__(
        self,
        direction: str,
        *,
        fir_kernel: Sequence[float] | None,
        c_in: int | None = None,
        c_out: int | None = None,
    ):
        super().__init__()
        if direction not in ("up", "down"):
            raise ValueError(f"unknown direction '{direction}'; valid: up, down")
        self.up = direction == "up"
        self.fir_kernel = None if fir_kernel is None else tuple(fir_kernel)
        stride = 1 if self.up or self.fir_kernel is not None else 2
        self.conv = None if c_in is None else _conv(c_in, c_out or c_in, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        k, conv = self.fir_kernel, self.conv
        if k is None:
            if self.up:
                x = F.interpolate(x, scale_factor=2, mode="nearest")
                return x if conv is None else conv(x)
            return F.avg_pool2d(x, 2) if conv is None else conv(F.pad(x, (0, 1, 0, 1)))
        if conv is None:
            return upsample_2d(x, k) if self.up else downsample_2d(x, k)
        fused = upsample_conv_2d if self.up else conv_downsample_2d
        return fused(x, conv.weight, k) + rearrange(conv.bias, "c -> c 1 1")


class ResBlock(nn.Module):
    """Residual block ``x ↦ (skip(x) + F(x, e)) / (√2 if skip_rescale)``.

    ``F``: GroupNorm → SiLU → [resample] → 3×3 conv → + linear(SiLU(e)) →
    GroupNorm → SiLU → dropout → 3×3 conv (init ``init_scale``). The skip is
    the identity, or a 1×1 conv (after the same resampling) when the width
    changes or the block resamples (BigGAN; DDPM++ and NCSN++ resample this
    way, FIR or nearest/average).

    Args:
        c_in, c_out: Widths.
        emb_dim: Width of the time embedding (None: unconditional).
        resample: ``none`` | ``up`` | ``down``.
        fir_kernel: FIR kernel for resampling (None: nearest / average pooling).
        skip_init: Initialisation scale of the 1×1 skip (1 in BigGAN blocks,
            0.1 in DDPM blocks).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        emb_dim: int | None,
        *,
        dropout: float,
        skip_rescale: bool,
        init_scale: float,
        min_group_width: int,
        resample: str = "none",
        fir_kernel: Sequence[float] | None = None,
        skip_init: float = 1.0,
    ):
        super().__init__()
        if resample not in ("none", "up", "down"):
            raise ValueError(f"unknown resample '{resample}'; valid: none, up, down")
        self.resample = (
            nn.Identity() if resample == "none" else Resample(resample, fir_kernel=fir_kernel)
        )
        self.norm1 = _group_norm(c_in, min_group_width)
        self.conv1 = _conv(c_in, c_out)
        self.emb = _linear(emb_dim, c_out) if emb_dim is not None else None
        self.norm2 = _group_norm(c_out, min_group_width)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(c_out, c_out, init_scale=init_scale)
        needs_skip = c_in != c_out or resample != "none"
        self.skip = _conv(c_in, c_out, 1, init_scale=skip_init) if needs_skip else None
        self.scale = 1 / math.sqrt(2) if skip_rescale else 1.0

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        h = self.resample(F.silu(self.norm1(x)))
        x = self.resample(x)
        h = self.conv1(h)
        if self.emb is not None:
            h = h + rearrange(self.emb(F.silu(emb)), "b c -> b c 1 1")
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * self.scale


class Attention(nn.Module):
    """Single-head self-attention over the pixels, ``x ↦ (x + W_o softmax(QKᵀ/√C) V) / (√2 if rescale)``."""

    def __init__(
        self, channels: int, *, skip_rescale: bool, init_scale: float, min_group_width: int
    ):
        super().__init__()
        self.norm = _group_norm(channels, min_group_width)
        self.q = _conv(channels, channels, 1, init_scale=0.1)
        self.k = _conv(channels, channels, 1, init_scale=0.1)
        self.v = _conv(channels, channels, 1, init_scale=0.1)
        self.out = _conv(channels, channels, 1, init_scale=init_scale)
        self.scale = 1 / math.sqrt(2) if skip_rescale else 1.0

    def forward(self, x: Tensor) -> Tensor:
        _, _, hgt, wid = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        h = rearrange(
            F.scaled_dot_product_attention(q, k, v), "b 1 (h w) c -> b c h w", h=hgt, w=wid
        )
        return (x + self.out(h)) * self.scale


class _Unit(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, res: ResBlock, attn: Attention | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        h = self.res(x, emb)
        return h if self.attn is None else self.attn(h)


# ---------------------------------------------------------------- the trunk
class NCSNpp(nn.Module):
    """The NCSN++ / DDPM++ U-Net trunk ``(c, x) -> y`` (module docstring).

    Args:
        image_shape: ``(C, H, W)``; H and W divisible by ``2^(len(ch_mult) − 1)``.
        nf: Base width.
        ch_mult: Width multipliers per resolution (one ×2 downsampling between each).
        num_res_blocks: Residual blocks per resolution on the way down (one more up).
        attn_resolutions: Feature-map heights at which every residual block is
            followed by self-attention (the middle block always has it).
        dropout: Dropout in the residual blocks.
        resblock_type: ``biggan`` (resampling inside residual blocks) or
            ``ddpm`` (separate resampling layers with a 3×3 conv).
        fir_kernel: FIR kernel of all up/down-sampling, e.g. ``(1, 3, 3, 1)``;
            None: nearest-neighbour / average pooling (strided conv for DDPM blocks).
        skip_rescale: Divide residual, attention and pyramid sums by √2.
        progressive: Output pyramid: ``none``, ``output_skip`` (a 3-channel
            output at every resolution, upsampled and summed) or ``residual``
            (a feature pyramid upsampled with a conv and added to the trunk).
        progressive_input: Input pyramid: ``none``, ``input_skip`` (the
            downsampled input, through a 1×1 conv, added after each
            downsampling) or ``residual`` (a conv-downsampled pyramid added to
            the trunk and carried on).
        embedding: ``positional`` (sinusoidal, width ``nf``) or ``fourier``
            (Gaussian random features, width ``2 nf``) of ``time_scale · c``.
        time_scale: Factor on ``c`` before the embedding: 999 reproduces
            score_sde's VP labels ``999 t``; 1 for ``c = log σ``.
        fourier_scale: Std of the Fourier frequencies (16).
        conditional: Condition on ``c`` (False: the network ignores it).
        init_scale: Initialisation scale of the last layer of every branch and of the output.
        scale_by_sigma: Divide the output by ``exp(c)`` — ``σ`` when ``c = log σ``
            (``ScoreNetwork(..., conditioning="log_sigma")`` on VE).
        centered: Inputs are in [−1, 1]; if False, inputs in [0, 1] are mapped
            by ``2x − 1`` first.
        min_group_width: GroupNorm uses ``min(32, C // min_group_width)`` groups:
            4 in NCSN++ / DDPM++; 2 in the DDPM U-Net, whose fixed 32 groups this
            reproduces at every width ≥ 64 while never making one-channel groups
            below (a one-channel group's norm cancels the per-channel shift
            that carries the time embedding, so the output would ignore ``c``).

    Shapes: ``c`` scalar or ``(B,)``; ``x`` ``(B, C, H, W)`` or ``(B, C·H·W)``;
    the output has the shape of ``x``.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        *,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        resblock_type: str = "biggan",
        fir_kernel: Sequence[float] | None = None,
        skip_rescale: bool = True,
        progressive: str = "none",
        progressive_input: str = "none",
        embedding: str = "positional",
        time_scale: float = 1.0,
        fourier_scale: float = 16.0,
        conditional: bool = True,
        init_scale: float = 0.0,
        scale_by_sigma: bool = False,
        centered: bool = True,
        min_group_width: int = 4,
    ):
        super().__init__()
        for value, valid, what in (
            (resblock_type, RESBLOCK_TYPES, "resblock_type"),
            (progressive, PROGRESSIVE_OUTPUTS, "progressive"),
            (progressive_input, PROGRESSIVE_INPUTS, "progressive_input"),
            (embedding, EMBEDDINGS, "embedding"),
        ):
            if value not in valid:
                raise ValueError(f"unknown {what} '{value}'; valid: {', '.join(valid)}")
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        channels, height, width = image_shape
        levels = len(ch_mult)
        factor = 2 ** (levels - 1)
        if height % factor or width % factor:
            raise ValueError(f"image size {height}×{width} not divisible by {factor} (ch_mult)")
        self.image_shape = tuple(image_shape)
        self.progressive = progressive
        self.progressive_input = progressive_input
        self.scale_by_sigma = scale_by_sigma
        self.centered = centered
        self.time_scale = float(time_scale)
        self.pyramid_scale = 1 / math.sqrt(2) if skip_rescale else 1.0
        fir = None if fir_kernel is None else tuple(fir_kernel)

        # Time embedding and its MLP.
        emb_dim = 4 * nf if conditional else None
        if conditional:
            embed = (
                SinusoidalEmbedding(nf, scale=1.0, max_period=10000.0)
                if embedding == "positional"
                else GaussianFourierEmbedding(2 * nf, scale=fourier_scale)
            )
            self.time_embed = nn.Sequential(
                embed, _linear(embed.dim, 4 * nf), nn.SiLU(), _linear(4 * nf, 4 * nf)
            )
        else:
            self.time_embed = None

        common = dict(min_group_width=min_group_width)
        block = dict(
            emb_dim=emb_dim,
            dropout=dropout,
            skip_rescale=skip_rescale,
            init_scale=init_scale,
            fir_kernel=fir,
            skip_init=1.0 if resblock_type == "biggan" else 0.1,
            **common,
        )

        def res(c_in: int, c_out: int, resample: str = "none") -> ResBlock:
            return ResBlock(c_in, c_out, resample=resample, **block)

        def attn(c: int) -> Attention:
            return Attention(c, skip_rescale=skip_rescale, init_scale=init_scale, **common)

        def head(c_in: int, c_out: int, scale: float) -> nn.Sequential:
            return nn.Sequential(
                _group_norm(c_in, min_group_width), nn.SiLU(), _conv(c_in, c_out, init_scale=scale)
            )

        self.conv_in = _conv(channels, nf)

        # Down: per level `units`, then (not at the lowest level) `down` and the input pyramid.
        self.down = nn.ModuleList()
        skips, ch, pyr_ch = [nf], nf, channels
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.units = nn.ModuleList()
            with_attn = height // 2**level in attn_resolutions
            for _ in range(num_res_blocks):
                stage.units.append(
                    _Unit(res(ch, nf * mult), attn(nf * mult) if with_attn else None)
                )
                ch = nf * mult
                skips.append(ch)
            stage.downsample = stage.pyramid = stage.pyramid_resample = None
            if level < levels - 1:
                stage.downsample = (
                    Resample("down", fir_kernel=fir, c_in=ch)
                    if resblock_type == "ddpm"
                    else res(ch, ch, "down")
                )
                if progressive_input == "input_skip":
                    stage.pyramid_resample = Resample("down", fir_kernel=fir)
                    stage.pyramid = _conv(pyr_ch, ch, 1)
                elif progressive_input == "residual":
                    stage.pyramid = Resample("down", fir_kernel=fir, c_in=pyr_ch, c_out=ch)
                    pyr_ch = ch
                skips.append(ch)
            self.down.append(stage)

        self.mid = nn.ModuleList([res(ch, ch), attn(ch), res(ch, ch)])

        # Up: per level `units`, attention, the output pyramid, then `upsample`.
        self.up = nn.ModuleList()
        pyr_ch = 0
        for level in reversed(range(levels)):
            stage = nn.Module()
            c_out = nf * ch_mult[level]
            stage.units = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.units.append(res(ch + skips.pop(), c_out))
                ch = c_out
            stage.attn = attn(ch) if height // 2**level in attn_resolutions else None
            # The lowest level starts the output pyramid; higher ones upsample it.
            first = level == levels - 1
            stage.pyramid = stage.pyramid_resample = stage.upsample = None
            if progressive == "output_skip":
                stage.pyramid = head(ch, channels, init_scale)
                if not first:
                    stage.pyramid_resample = Resample("up", fir_kernel=fir)
            elif progressive == "residual":
                stage.pyramid = (
                    head(ch, ch, 1.0)
                    if first
                    else Resample("up", fir_kernel=fir, c_in=pyr_ch, c_out=ch)
                )
                pyr_ch = ch
            if level > 0:
                stage.upsample = (
                    Resample("up", fir_kernel=fir, c_in=ch)
                    if resblock_type == "ddpm"
                    else res(ch, ch, "up")
                )
            self.up.append(stage)
        assert not skips
        self.out = head(ch, channels, init_scale) if progressive != "output_skip" else None

    def _call(self, layer: nn.Module, h: Tensor, emb: Tensor | None) -> Tensor:
        return layer(h, emb) if isinstance(layer, ResBlock) else layer(h)

    def forward(self, c: Tensor | float, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(shape[0], *self.image_shape)
        c = _per_sample_time(c, x)
        emb = None if self.time_embed is None else self.time_embed(self.time_scale * c)
        if not self.centered:
            x = 2 * x - 1

        # Down, keeping every unit's output for the skips.
        pyramid = x if self.progressive_input != "none" else None
        hs = [self.conv_in(x)]
        for stage in self.down:
            for unit in stage.units:
                hs.append(unit(hs[-1], emb))
            if stage.downsample is not None:
                h = self._call(stage.downsample, hs[-1], emb)
                if self.progressive_input == "input_skip":
                    pyramid = stage.pyramid_resample(pyramid)
                    h = h + stage.pyramid(pyramid)
                elif self.progressive_input == "residual":
                    pyramid = (stage.pyramid(pyramid) + h) * self.pyramid_scale
                    h = pyramid
                hs.append(h)

        h = self.mid[0](hs[-1], emb)
        h = self.mid[2](self.mid[1](h), emb)

        # Up, consuming the skips; `pyramid` now carries the output pyramid.
        pyramid = None
        for stage in self.up:
            for unit in stage.units:
                h = unit(torch.cat([h, hs.pop()], dim=1), emb)
            if stage.attn is not None:
                h = stage.attn(h)
            if self.progressive == "output_skip":
                out = stage.pyramid(h)
                pyramid = out if pyramid is None else stage.pyramid_resample(pyramid) + out
            elif self.progressive == "residual":
                if pyramid is None:
                    pyramid = stage.pyramid(h)
                else:
                    pyramid = (stage.pyramid(pyramid) + h) * self.pyramid_scale
                    h = pyramid
            if stage.upsample is not None:
                h = self._call(stage.upsample, h, emb)

        out = pyramid if self.out is None else self.out(h)
        if self.scale_by_sigma:
            out = out / rearrange(c.exp(), "b -> b 1 1 1")
        return out.reshape(shape)


# ------------------------------------------------------------------- presets
#: What score_sde's CIFAR-10 continuous configs share (DDPM++ and NCSN++ alike).
_CIFAR10_CONT: dict[str, Any] = dict(
    nf=128,
    ch_mult=(1, 2, 2, 2),
    attn_resolutions=(16,),
    dropout=0.1,
    resblock_type="biggan",
    skip_rescale=True,
    progressive="none",
    init_scale=0.0,
)


def _cifar10_preset(
    image_shape: Sequence[int], deep: bool, defaults_only: bool, options: dict, **preset: Any
) -> NCSNpp:
    full = {**_CIFAR10_CONT, "num_res_blocks": 8 if deep else 4, **preset}
    if defaults_only:
        return full  # type: ignore[return-value]
    return NCSNpp(image_shape, **{**full, **options})


def ddpmpp(
    image_shape: Sequence[int], *, deep: bool = False, _defaults_only: bool = False, **options: Any
) -> NCSNpp:
    """DDPM++ (cont.) of Song et al. 2021 for VP and sub-VP SDEs.

    score_sde's ``configs/vp/cifar10_ddpmpp_continuous.py`` (``deep``:
    ``configs/subvp/cifar10_ddpmpp_deep_continuous.py``): nf 128, ch_mult
    (1, 2, 2, 2), 4 residual blocks per resolution (8 if ``deep``), attention at
    16×16, dropout 0.1, BigGAN blocks without FIR, skip rescaling, no
    pyramids, sinusoidal embedding of ``999 c``, centred data ([−1, 1]).

    Score function of the original: ``ScoreNetwork(net, VPSDE() or SubVPSDE(),
    "noise", conditioning="time")``, i.e. ``s = −net(t, x)/σ(t)`` with the
    label ``999 t`` (``time_scale=999``).

    Args:
        image_shape: ``(C, H, W)``.
        deep: 8 residual blocks per resolution instead of 4.
        options: Any :class:`NCSNpp` argument, overriding the preset.
    """
    return _cifar10_preset(
        image_shape,
        deep,
        _defaults_only,
        options,
        fir_kernel=None,
        progressive_input="none",
        embedding="positional",
        time_scale=999.0,
        centered=True,
    )


def ncsnpp(
    image_shape: Sequence[int], *, deep: bool = False, _defaults_only: bool = False, **options: Any
) -> NCSNpp:
    """NCSN++ (cont.) of Song et al. 2021 for the VE SDE.

    score_sde's ``configs/ve/cifar10_ncsnpp_continuous.py`` (``deep``:
    ``configs/ve/cifar10_ncsnpp_deep_continuous.py``): as :func:`ddpmpp` but
    FIR resampling with kernel (1, 3, 3, 1), a residual input pyramid
    (``progressive_input="residual"``; the CIFAR-10 configs have no output
    pyramid, ``progressive="none"``; the 256×256 ones use ``output_skip`` /
    ``input_skip``), Gaussian Fourier features (scale 16) of ``c``, and data in
    [0, 1] (``centered=False``: the network maps ``2x − 1``).

    Score function of the original (``net(x, σ_t)/σ_t`` with the embedding of
    ``log σ_t``): ``ScoreNetwork(net, VESDE(), "noise", conditioning="log_sigma")``,
    which returns ``−net(log σ, x)/σ`` — the same function class (negate the
    output convolution); or ``scale_by_sigma=True`` with ``"score"`` and
    ``conditioning="log_sigma"`` for the original's exact form.

    Args: as :func:`ddpmpp`.
    """
    return _cifar10_preset(
        image_shape,
        deep,
        _defaults_only,
        options,
        fir_kernel=(1, 3, 3, 1),
        progressive_input="residual",
        embedding="fourier",
        fourier_scale=16.0,
        time_scale=1.0,
        centered=False,
    )


def ddpm_unet(
    image_shape: Sequence[int], *, nf: int = 128, _defaults_only: bool = False, **options: Any
) -> NCSNpp:
    """The DDPM U-Net (Ho et al. 2020; score_sde's ``models/ddpm.py``).

    ``configs/vp/ddpm/cifar10_continuous.py``: nf 128, ch_mult (1, 2, 2, 2), 2
    residual blocks per resolution, attention at 16×16, dropout 0.1, DDPM
    blocks with strided-conv / nearest+conv resampling, no rescaling, 32
    GroupNorm groups (fewer, of two channels each, below width 64), sinusoidal
    embedding of ``999 c``, centred data.
    DiffFlow's image configs use it for the drift (nf 128) and the score (nf 64).

    Score function of the original (VP, continuous): ``ScoreNetwork(net,
    VPSDE(), "noise", conditioning="time")`` with ``time_scale=999``.

    Args:
        image_shape: ``(C, H, W)``.
        nf: Base width.
        options: Any :class:`NCSNpp` argument, overriding the preset.
    """
    preset: dict[str, Any] = dict(
        nf=nf,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        resblock_type="ddpm",
        fir_kernel=None,
        skip_rescale=False,
        progressive="none",
        progressive_input="none",
        embedding="positional",
        time_scale=999.0,
        init_scale=0.0,
        centered=True,
        min_group_width=2,
    )
    if _defaults_only:
        return preset  # type: ignore[return-value]
    return NCSNpp(image_shape, **{**preset, **options})


def _preset(builder: Callable[..., NCSNpp], name: str) -> Callable[..., NCSNpp]:
    """A config-facing builder ``(image_shape, **NCSNpp options)`` with the preset's defaults.

    Its options are :class:`NCSNpp`'s keyword arguments, with the defaults the
    preset ``builder`` gives them (what :func:`cnf.schema.options_schema` shows in
    a resolved config; ``deep`` is ``num_res_blocks: 8``).
    """
    defaults = dict(builder((3, 32, 32), _defaults_only=True))

    @functools.wraps(NCSNpp)
    def build(image_shape: Sequence[int], **options: Any) -> NCSNpp:
        return NCSNpp(image_shape, **{**defaults, **options})

    build.option_defaults = defaults  # type: ignore[attr-defined]
    build.__name__ = name
    return build


SCORE_BACKBONES: dict[str, Callable[..., NCSNpp]] = {
    "ddpmpp": ddpmpp,
    "ncsnpp": ncsnpp,
    "ddpm": ddpm_unet,
}


def build_score_backbone(name: str, image_shape: Sequence[int], **options: Any) -> NCSNpp:
    """Registry lookup in :data:`SCORE_BACKBONES`: ``ddpmpp`` | ``ncsnpp`` | ``ddpm``."""
    if name not in SCORE_BACKBONES:
        valid = ", ".join(sorted(SCORE_BACKBONES))
        raise ValueError(f"unknown score backbone '{name}'; valid: {valid}")
    return SCORE_BACKBONES[name](image_shape, **options)


for _name, _builder in SCORE_BACKBONES.items():
    register_image_net(_name, _preset(_builder, _name))
