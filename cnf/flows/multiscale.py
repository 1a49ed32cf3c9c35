"""Multi-scale architectures with factor-out: the NICE / RealNVP / Glow builders and FFJORD's ODENVP.

**Output convention.** A multi-scale flow maps ``x`` of shape ``(B, C, H, W)``
to ``z`` of the *same shape* and the total log-determinant, such that

    log p(x) = log N(z; 0, I) + logdet.

Every level squeezes, transforms, factors out half of the channels, passes
the kept half to the next level, then concatenates ``[next level's output,
factored-out block]`` along channels and un-squeezes. ``z`` is therefore the
RealNVP layout: each factored-out block sits at the pixels it came from, so
``z`` stays spatially structured (a latent U-Net, as in INDM, can use it).

**Priors of the factored-out blocks.** RealNVP scores a factored-out block
``z_f`` against N(0, I) directly: it is copied into ``z``. Glow uses a learned
conditional prior ``z_f ~ N(mu(h), sigma(h)^2)`` given the kept half ``h``.
Here that prior is written as the affine bijection
``eps = (z_f - mu(h)) / sigma(h)`` with log-determinant ``-sum log sigma(h)``
(:class:`ConditionalStandardization`), and ``eps`` goes into ``z``; then
``log N(z_f; mu, sigma) = log N(eps; 0, I) - sum log sigma`` and the formula
above still holds. ``h`` is the kept half *at the split*, before the next
level transforms it; ``inverse`` recovers it first and then ``z_f``.

All flows map data ``x`` (t = 0) to the base ``z`` (t = T) in ``forward``.

:func:`multiscale_cnf` arranges continuous blocks the same way (FFJORD's
multi-scale CNF); the blocks' solve statistics, RNODE regularisers and
per-probe log-determinants add up through the levels like their log-dets.

References:
    Dinh, Sohl-Dickstein, Bengio. Density estimation using Real NVP. ICLR 2017,
    §3.6. Kingma, Dhariwal. Glow. NeurIPS 2018, §3 and Fig. 2b.
    Grathwohl et al., "FFJORD", ICLR 2019, §4 (docs/methods.md §3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cnf.flows.base import (
    DEFAULT_SETTINGS,
    Flow,
    FlowOutput,
    FlowSettings,
    SequentialFlow,
    sum_except_batch,
)
from cnf.flows.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    DiagonalScaling,
    checkerboard_mask,
    half_mask,
    image_channel_mask,
    image_checkerboard_mask,
)
from cnf.flows.glow import ActNorm, GlowStep, Squeeze
from cnf.solve import SolveStats

__all__ = [
    "ConditionalStandardization",
    "MultiScaleLevel",
    "count_scales",
    "glow_image",
    "glow_vector",
    "multiscale_cnf",
    "nice_vector",
    "realnvp_image",
    "realnvp_vector",
]


class ConditionalStandardization(nn.Module):
    """Glow's learned conditional prior as a bijection ``z_f -> eps``.

    ``eps = (z_f - mu(h)) * exp(-log_sigma(h))``, with ``(mu, log_sigma)`` from a
    zero-initialised 3x3 convolution of ``h`` (so the prior starts as N(0, I)).

    Args:
        cond_channels: Channels of the kept half ``h``.
        out_channels: Channels of the factored-out block ``z_f``.

    Shapes:
        ``z_f``: ``(B, out_channels, H, W)``; ``h``: ``(B, cond_channels, H, W)``;
        logdet ``(B,)`` equals ``-sum log_sigma(h)``.

    References:
        Kingma, Dhariwal. Glow. NeurIPS 2018 (reference code: ``split2d`` prior).
    """

    def __init__(self, cond_channels: int, out_channels: int):
        super().__init__()
        self.net = nn.Conv2d(cond_channels, 2 * out_channels, 3, padding=1)
        nn.init.zeros_(self.net.weight)
        nn.init.zeros_(self.net.bias)

    def _stats(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.net(h).chunk(2, dim=1)
        return mu, log_sigma

    def forward(self, z_f: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``eps`` (shape of ``z_f``) and ``logdet`` ``(B,)``."""
        mu, log_sigma = self._stats(h)
        return (z_f - mu) * torch.exp(-log_sigma), -sum_except_batch(log_sigma)

    def inverse(self, eps: Tensor, h: Tensor) -> Tensor:
        """Return ``z_f = mu(h) + sigma(h) * eps``."""
        mu, log_sigma = self._stats(h)
        return mu + torch.exp(log_sigma) * eps


class MultiScaleLevel(Flow):
    """One level of a multi-scale flow, recursing into the next level.

    ``forward``: ``pre`` at input resolution -> optional squeeze -> ``post``
    -> split channels into kept ``h`` (first ``keep_channels``) and ``z_f``
    -> ``z_f`` standardised by ``prior`` (if any) -> ``h`` through ``inner``
    -> concatenate ``[inner(h), eps]`` -> un-squeeze. Without ``inner`` nothing
    is factored out (the last level). Output shape = input shape.

    Args:
        pre: Flow applied before the squeeze (or ``None``).
        post: Flow applied after the squeeze (or ``None``).
        inner: The next level (or any shape-preserving flow) applied to the kept
            half; ``None`` for the last level.
        prior: :class:`ConditionalStandardization` for Glow's learned prior, or
            ``None`` for RealNVP's N(0, I).
        squeeze: Whether to squeeze 2x2 between ``pre`` and ``post``.
        keep_channels: Channels kept after the split (default: half).

    Shapes:
        ``x``: ``(B, C, H, W)``; ``z``: ``(B, C, H, W)``; logdet ``(B,)``.
    """

    def __init__(
        self,
        *,
        pre: Flow | None = None,
        post: Flow | None = None,
        inner: Flow | None = None,
        prior: ConditionalStandardization | None = None,
        squeeze: bool = True,
        keep_channels: int | None = None,
    ):
        super().__init__()
        if prior is not None and inner is None:
            raise ValueError("a conditional prior needs a split (inner is None)")
        self.pre = pre
        self.post = post
        self.inner = inner
        self.prior = prior
        self.squeeze = Squeeze(2) if squeeze else None
        self.keep_channels = keep_channels

    def _keep(self, c: int) -> int:
        return self.keep_channels if self.keep_channels is not None else c // 2

    def transform(self, x: Tensor, settings: FlowSettings = DEFAULT_SETTINGS) -> FlowOutput:
        """``(B, C, H, W) -> (B, C, H, W)``, logdet ``(B,)``, and the statistics of every block."""
        out = FlowOutput(x, x.new_zeros(x.shape[0]))
        if self.pre is not None:
            out = out.then(self.pre.transform(out.z, settings))
        if self.squeeze is not None:
            out.z = self.squeeze(out.z)[0]
        if self.post is not None:
            out = out.then(self.post.transform(out.z, settings))
        if self.inner is not None:
            k = self._keep(out.z.shape[1])
            h, z_f = out.z[:, :k], out.z[:, k:]
            out = dataclasses.replace(out, z=h)
            if self.prior is not None:
                z_f, ld = self.prior(z_f, h)
                out = out.then(FlowOutput(h, ld))
            inner = self.inner.transform(h, settings)
            out = out.then(inner)
            out.z = torch.cat([inner.z, z_f], dim=1)
        if self.squeeze is not None:
            out.z = self.squeeze.inverse(out.z)
        return out

    def inverse_transform(
        self, z: Tensor, settings: FlowSettings = DEFAULT_SETTINGS
    ) -> tuple[Tensor, SolveStats]:
        """``(B, C, H, W) -> (B, C, H, W)`` and the statistics of every block's inverse."""
        stats = SolveStats()
        if self.squeeze is not None:
            z, _ = self.squeeze(z)
        if self.inner is not None:
            k = self._keep(z.shape[1])
            h, z_f = z[:, :k], z[:, k:]
            h, st = self.inner.inverse_transform(h, settings)
            stats = stats + st
            if self.prior is not None:
                z_f = self.prior.inverse(z_f, h)
            z = torch.cat([h, z_f], dim=1)
        if self.post is not None:
            z, st = self.post.inverse_transform(z, settings)
            stats = stats + st
        if self.squeeze is not None:
            z = self.squeeze.inverse(z)
        if self.pre is not None:
            z, st = self.pre.inverse_transform(z, settings)
            stats = stats + st
        return z, stats


# ------------------------------------------------------------------------- builders


def _check_scales(shape: tuple[int, ...], num_squeezes: int) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"image builders need event_shape (C, H, W), got {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    f = 2**num_squeezes
    if h % f or w % f:
        raise ValueError(
            f"H and W must be divisible by 2**{num_squeezes} = {f} for this number of "
            f"scales, got shape {tuple(shape)}"
        )
    return c, h, w


def realnvp_image(
    event_shape: tuple[int, int, int],
    *,
    num_scales: int = 2,
    steps_per_scale: int = 3,
    final_steps: int = 4,
    hidden_channels: int = 64,
) -> MultiScaleLevel:
    """RealNVP multi-scale flow for images.

    Each scale but the last: ``steps_per_scale`` checkerboard affine couplings
    (alternating parity), squeeze, ``steps_per_scale`` channel-mask affine
    couplings, factor out half the channels (scored against N(0, I)). Last
    scale: ``final_steps`` checkerboard couplings.

    Args:
        event_shape: ``(C, H, W)`` with ``H, W`` divisible by ``2**(num_scales-1)``.
        num_scales: Number of scales (``num_scales - 1`` factor-outs).
        steps_per_scale: Couplings per mask type per scale (3 in the paper).
        final_steps: Checkerboard couplings of the last scale (4 in the paper).
        hidden_channels: Width of the conv conditioners.

    Returns:
        A :class:`MultiScaleLevel` mapping ``(B, C, H, W)`` to ``z`` of the same shape.

    References:
        Dinh, Sohl-Dickstein, Bengio. Real NVP. ICLR 2017, §4.1.
    """
    if num_scales < 1:
        raise ValueError(f"num_scales must be >= 1, got {num_scales}")
    c, h, w = _check_scales(event_shape, num_scales - 1)

    def checkerboard(shape: tuple[int, int, int], n: int) -> SequentialFlow:
        return SequentialFlow(
            AffineCoupling(
                shape,
                mask=image_checkerboard_mask(shape, parity=i),
                hidden_channels=hidden_channels,
            )
            for i in range(n)
        )

    def build(shape: tuple[int, int, int], scale: int) -> MultiScaleLevel:
        if scale == num_scales - 1:
            return MultiScaleLevel(pre=checkerboard(shape, final_steps), squeeze=False)
        c, h, w = shape
        squeezed = (4 * c, h // 2, w // 2)
        post = SequentialFlow(
            AffineCoupling(
                squeezed,
                mask=image_channel_mask(squeezed, parity=i),
                hidden_channels=hidden_channels,
            )
            for i in range(steps_per_scale)
        )
        return MultiScaleLevel(
            pre=checkerboard(shape, steps_per_scale),
            post=post,
            inner=build((2 * c, h // 2, w // 2), scale + 1),
        )

    return build((c, h, w), 0)


def glow_image(
    event_shape: tuple[int, int, int],
    *,
    num_scales: int = 3,
    steps_per_scale: int = 8,
    hidden_channels: int = 128,
    learned_prior: bool = True,
) -> MultiScaleLevel:
    """Glow multi-scale flow for images.

    Each scale: squeeze, ``steps_per_scale`` :class:`~cnf.flows.glow.GlowStep` s,
    then (all but the last scale) factor out half the channels with the learned
    conditional prior as a :class:`ConditionalStandardization`.

    Args:
        event_shape: ``(C, H, W)`` with ``H, W`` divisible by ``2**num_scales``.
        num_scales: Number of scales ``L`` (3 for CIFAR-10 in the paper).
        steps_per_scale: Steps of flow ``K`` per scale (32 in the paper).
        hidden_channels: Width of the coupling conv nets (512 in the paper).
        learned_prior: Glow's conditional prior for factored-out halves; with
            ``False`` they are scored against N(0, I) as in RealNVP.

    Returns:
        A :class:`MultiScaleLevel` mapping ``(B, C, H, W)`` to ``z`` of the same shape.

    References:
        Kingma, Dhariwal. Glow. NeurIPS 2018, Fig. 2b.
    """
    if num_scales < 1:
        raise ValueError(f"num_scales must be >= 1, got {num_scales}")
    c, h, w = _check_scales(event_shape, num_scales)

    def build(shape: tuple[int, int, int], scale: int) -> MultiScaleLevel:
        c, h, w = shape
        squeezed = (4 * c, h // 2, w // 2)
        post = SequentialFlow(
            GlowStep(squeezed, hidden_channels=hidden_channels) for _ in range(steps_per_scale)
        )
        if scale == num_scales - 1:
            return MultiScaleLevel(post=post)
        keep = 2 * c
        prior = ConditionalStandardization(keep, 4 * c - keep) if learned_prior else None
        return MultiScaleLevel(
            post=post, inner=build((keep, h // 2, w // 2), scale + 1), prior=prior
        )

    return build((c, h, w), 0)


def count_scales(height: int, width: int) -> int:
    """FFJORD's number of scales: how often ``H`` and ``W`` can be halved while both are ≥ 4.

    Counted as in the original ``ODENVP``: 3 for 28×28, 4 for 32×32, 2 for 8×8, 1 for 4×4.
    """
    n = 0
    while height >= 4 and width >= 4:
        n, height, width = n + 1, height // 2, width // 2
    return n


def multiscale_cnf(
    event_shape: tuple[int, int, int],
    block: Callable[[tuple[int, int, int]], Flow],
    *,
    num_blocks: int = 2,
    num_scales: int = 0,
) -> MultiScaleLevel:
    """FFJORD's multi-scale continuous flow (``ODENVP``) from any shape-preserving block.

    Every scale but the last: ``num_blocks`` blocks, a squeeze
    ``(C, H, W) -> (4C, H/2, W/2)``, ``num_blocks`` more blocks, then half of
    the channels are factored out (scored under N(0, I), as in RealNVP) and
    the other half goes to the next scale. The last scale: ``num_blocks``
    blocks, no squeeze. With ``num_blocks = 2``: 10 blocks for 28×28, 14 for
    32×32. :meth:`MultiScaleLevel.inverse_transform` runs the scales in
    reverse (sampling). The blocks' statistics and regularisers add up.

    Args:
        event_shape: ``(C, H, W)``.
        block: ``shape -> Flow`` on ``(B, *shape)``: one CNF block, built afresh per call.
        num_blocks: Blocks before and after each squeeze.
        num_scales: Number of scales; 0 = :func:`count_scales` (FFJORD's choice).

    Returns:
        A :class:`MultiScaleLevel` mapping ``(B, C, H, W)`` to ``z`` of the same shape.

    References:
        Grathwohl et al., "FFJORD", ICLR 2019, §4 (docs/methods.md §3; the
        factor-out: §2.4); Dinh, Sohl-Dickstein, Bengio. Real NVP. ICLR 2017, §3.6.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    c, h, w = _check_scales(event_shape, 0)
    n = num_scales or count_scales(h, w)
    if n < 1:
        raise ValueError(f"a multi-scale CNF needs H and W >= 4, got shape {tuple(event_shape)}")
    _check_scales(event_shape, n - 1)

    def stack(shape: tuple[int, int, int]) -> SequentialFlow:
        return SequentialFlow(block(shape) for _ in range(num_blocks))

    def build(shape: tuple[int, int, int], scale: int) -> MultiScaleLevel:
        if scale == n - 1:
            return MultiScaleLevel(pre=stack(shape), squeeze=False)
        c, h, w = shape
        return MultiScaleLevel(
            pre=stack(shape),
            post=stack((4 * c, h // 2, w // 2)),
            inner=build((2 * c, h // 2, w // 2), scale + 1),
        )

    return build((c, h, w), 0)


def _vector_mask(kind: str, dim: int, parity: int) -> Tensor:
    masks = {"half": half_mask, "checkerboard": checkerboard_mask}
    if kind not in masks:
        raise ValueError(f"unknown mask {kind!r}; valid: {', '.join(sorted(masks))}")
    return masks[kind](dim, parity=parity)


def nice_vector(
    dim: int,
    *,
    num_layers: int = 4,
    hidden_features: int = 64,
    num_hidden_layers: int = 3,
    mask: str = "half",
) -> SequentialFlow:
    """NICE for vectors: additive couplings with alternating masks, then a diagonal scaling.

    Args:
        dim: Number of features ``D >= 2``.
        num_layers: Additive couplings (4 in the paper).
        hidden_features: Width of each MLP conditioner.
        num_hidden_layers: Hidden layers of each MLP conditioner.
        mask: ``"half"`` or ``"checkerboard"`` (identical for ``D = 2``).

    Returns:
        A :class:`~cnf.flows.base.SequentialFlow` on ``(B, D)``.

    References:
        Dinh, Krueger, Bengio. NICE. ICLR workshop 2015, §5.
    """
    layers: list[Flow] = [
        AdditiveCoupling(
            (dim,),
            mask=_vector_mask(mask, dim, i),
            hidden_features=hidden_features,
            num_hidden_layers=num_hidden_layers,
        )
        for i in range(num_layers)
    ]
    layers.append(DiagonalScaling((dim,)))
    return SequentialFlow(layers)


def nice_image(
    event_shape: tuple[int, int, int],
    *,
    num_layers: int = 4,
    hidden_channels: int = 64,
) -> SequentialFlow:
    """NICE for images: additive couplings with alternating checkerboard masks, then a diagonal scaling.

    NICE itself is single-scale (the paper flattens images); this keeps the
    spatial layout so the conditioners can be convolutional.

    Args:
        event_shape: ``(C, H, W)``.
        num_layers: Additive couplings (4 in the paper).
        hidden_channels: Width of the conv conditioners.

    Returns:
        A :class:`~cnf.flows.base.SequentialFlow` on ``(B, C, H, W)``.

    References:
        Dinh, Krueger, Bengio. NICE. ICLR workshop 2015, §5.
    """
    shape = _check_scales(event_shape, 0)
    layers: list[Flow] = [
        AdditiveCoupling(
            shape,
            mask=image_checkerboard_mask(shape, parity=i),
            hidden_channels=hidden_channels,
        )
        for i in range(num_layers)
    ]
    layers.append(DiagonalScaling(shape))
    return SequentialFlow(layers)


def realnvp_vector(
    dim: int,
    *,
    num_layers: int = 6,
    hidden_features: int = 64,
    num_hidden_layers: int = 2,
    mask: str = "half",
    actnorm: bool = False,
) -> SequentialFlow:
    """RealNVP for vectors: affine couplings with alternating masks.

    Args:
        dim: Number of features ``D >= 2``.
        num_layers: Affine couplings.
        hidden_features: Width of each MLP conditioner.
        num_hidden_layers: Hidden layers of each MLP conditioner.
        mask: ``"half"`` or ``"checkerboard"``.
        actnorm: Put an :class:`~cnf.flows.glow.ActNorm` before every coupling
            (a batch-independent stand-in for RealNVP's batch normalisation).

    Returns:
        A :class:`~cnf.flows.base.SequentialFlow` on ``(B, D)``.

    References:
        Dinh, Sohl-Dickstein, Bengio. Real NVP. ICLR 2017.
    """
    layers: list[Flow] = []
    for i in range(num_layers):
        if actnorm:
            layers.append(ActNorm(dim))
        layers.append(
            AffineCoupling(
                (dim,),
                mask=_vector_mask(mask, dim, i),
                hidden_features=hidden_features,
                num_hidden_layers=num_hidden_layers,
            )
        )
    return SequentialFlow(layers)


def glow_vector(
    dim: int,
    *,
    num_steps: int = 6,
    hidden_features: int = 64,
    num_hidden_layers: int = 2,
) -> SequentialFlow:
    """Glow for vectors: ``num_steps`` steps of ActNorm -> LU linear -> GlowCoupling.

    Args:
        dim: Number of features ``D >= 2``.
        num_steps: Steps of flow.
        hidden_features: Width of each MLP conditioner.
        num_hidden_layers: Hidden layers of each MLP conditioner.

    Returns:
        A :class:`~cnf.flows.base.SequentialFlow` on ``(B, D)``.

    References:
        Kingma, Dhariwal. Glow. NeurIPS 2018.
    """
    return SequentialFlow(
        GlowStep(
            (dim,),
            hidden_features=hidden_features,
            num_hidden_layers=num_hidden_layers,
            parity=i,
        )
        for i in range(num_steps)
    )
