"""The published score networks (cnf.diffusion.ncsnpp) and FIR resampling (cnf.diffusion.resample).

Tiny widths for forward and training checks (float32 is enough for shapes);
the full published presets are only built, on the meta device, to count
their parameters. Seeded, one thread.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import copy

import pytest
import torch
import torch.nn.functional as F

from cnf.diffusion.ncsnpp import (
    SCORE_BACKBONES,
    NCSNpp,
    build_score_backbone,
    ddpm_unet,
    ddpmpp,
    ncsnpp,
)
from cnf.diffusion.nets import ScoreNetwork
from cnf.diffusion.resample import (
    conv_downsample_2d,
    downsample_2d,
    upsample_2d,
    upsample_conv_2d,
)
from cnf.diffusion.score import dsm_loss
from cnf.diffusion.sde import VESDE, VPSDE, SubVPSDE

torch.set_num_threads(1)

PRESETS = {"ddpmpp": ddpmpp, "ncsnpp": ncsnpp, "ddpm": ddpm_unet}
# The score function that reproduces the original's (ncsnpp module docstring):
# (SDE, ScoreNetwork parameterisation, conditioning) and two conditioning values.
SCORE_SETUP = {
    "ddpmpp": (VPSDE, "noise", "time", (0.1, 0.7)),
    "ncsnpp": (VESDE, "noise", "log_sigma", (-2.0, 1.5)),
    "ddpm": (SubVPSDE, "noise", "time", (0.1, 0.7)),
}


def tiny(name: str, image_shape: tuple[int, int, int], **options) -> NCSNpp:
    """A preset at tiny width: nf 8, ch_mult (1, 2), one block, attention at the lowest resolution."""
    lowest = image_shape[1] // 2
    return PRESETS[name](
        image_shape,
        nf=8,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(lowest,),
        **options,
    )


def perturbed(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so that no near-zero initialised layer hides a path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


# ------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("image_shape", [(3, 32, 32), (1, 8, 8)])
def test_output_shape_image_and_flat(name, image_shape):
    torch.manual_seed(0)
    net = tiny(name, image_shape).eval()
    x = torch.randn(2, *image_shape)
    c = torch.tensor([0.3, 0.9])
    out = net(c, x)
    assert out.shape == x.shape
    flat = net(c, x.flatten(1))
    assert flat.shape == (2, x[0].numel())
    torch.testing.assert_close(flat, out.flatten(1))
    # A scalar conditioning input is broadcast to the batch.
    torch.testing.assert_close(net(0.3, x)[0], out[0])


@pytest.mark.parametrize(
    "options",
    [
        dict(progressive="output_skip", progressive_input="input_skip"),
        dict(progressive="residual", progressive_input="residual"),
        dict(resblock_type="ddpm", progressive="output_skip", progressive_input="residual"),
        dict(resblock_type="ddpm", fir_kernel=None, progressive="residual"),
        dict(conditional=False),
    ],
    ids=["skip-skip", "res-res", "ddpm-skip-res", "ddpm-nofir-res", "unconditional"],
)
def test_trunk_variants_shape(options):
    torch.manual_seed(0)
    net = tiny("ncsnpp", (3, 16, 16), **options).eval()
    x = torch.rand(2, 3, 16, 16)
    assert net(torch.tensor([-1.0, 2.0]), x).shape == x.shape


# --------------------------------------------------------- time conditioning
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_output_depends_on_conditioning(name):
    torch.manual_seed(0)
    # The output layers start near zero (init_scale 0): perturb before comparing.
    net = perturbed(tiny(name, (3, 32, 32))).eval()
    x = torch.randn(2, 3, 32, 32)
    c0, c1 = SCORE_SETUP[name][3]
    out0 = net(torch.full((2,), c0), x)
    out1 = net(torch.full((2,), c1), x)
    assert (out0 - out1).abs().max() > 1e-3 * out0.abs().max()


def test_unconditional_ignores_conditioning():
    torch.manual_seed(0)
    net = perturbed(tiny("ddpmpp", (1, 8, 8), conditional=False)).eval()
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(net(0.1, x), net(0.9, x))


# ------------------------------------------------------------ training
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_two_training_iterations(name):
    torch.manual_seed(0)
    sde_cls, parameterization, conditioning, _ = SCORE_SETUP[name]
    sde = sde_cls()
    net = tiny(name, (3, 32, 32))
    score = ScoreNetwork(net, sde, parameterization, conditioning=conditioning)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    out_conv_before = net.out[-1].weight.detach().clone()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 3, 32, 32, generator=g)
    for _ in range(2):
        loss = dsm_loss(score, sde, x0, generator=g).mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert not torch.equal(before, after)
    assert not torch.equal(out_conv_before, net.out[-1].weight)


# ------------------------------------------------- score parameterisations
def test_ve_scale_by_sigma_equals_noise_with_negated_output():
    """NCSN++'s ``net/σ`` ("score", scale_by_sigma) is ``−ε̂/σ`` ("noise") with the output negated."""
    torch.manual_seed(0)
    sde = VESDE()
    orig = perturbed(tiny("ncsnpp", (3, 16, 16), scale_by_sigma=True)).eval()
    ours = copy.deepcopy(orig)
    ours.scale_by_sigma = False
    with torch.no_grad():
        ours.out[-1].weight.neg_()
        ours.out[-1].bias.neg_()
    s_orig = ScoreNetwork(orig, sde, "score", conditioning="log_sigma")
    s_ours = ScoreNetwork(ours, sde, "noise", conditioning="log_sigma")
    x = torch.rand(3, 3, 16, 16)
    t = torch.tensor([0.05, 0.4, 1.0])
    _, sigma = sde.marginal(t)
    torch.testing.assert_close(s_orig.noise_input(t), sigma.log())
    torch.testing.assert_close(s_ours(t, x), s_orig(t, x))


def test_vp_time_scale_is_the_label_of_the_embedding():
    """``time_scale=999`` feeds ``999 t`` to the embedding: the same net at scale 1 given 999 t."""
    torch.manual_seed(0)
    net = perturbed(tiny("ddpmpp", (1, 8, 8))).eval()
    same = copy.deepcopy(net)
    same.time_scale = 1.0
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([0.2, 0.6])
    torch.testing.assert_close(net(t, x), same(999 * t, x))


# -------------------------------------------------------- parameter counts
# Reference counts measured on 2026-12-01 by building the original
# yang-song/score_sde_pytorch models (commit cb1f359, CPU, its CUDA op replaced
# by its own native upfirdn2d) from these configs and summing
# p.numel() over model.parameters(); the VE models hold 128 more
# non-trainable numbers (the Fourier frequencies, a buffer here), so the
# trainable counts are the reference. At the time of writing ours are equal.
REFERENCE_COUNTS = {
    # configs/vp/cifar10_ddpmpp_continuous.py
    "ddpmpp": (dict(), 61_804_419),
    # configs/subvp/cifar10_ddpmpp_deep_continuous.py
    "ddpmpp_deep": (dict(deep=True), 106_632_579),
    # configs/ve/cifar10_ncsnpp_continuous.py
    "ncsnpp": (dict(), 62_758_787),
    # configs/ve/cifar10_ncsnpp_deep_continuous.py
    "ncsnpp_deep": (dict(deep=True), 107_586_947),
    # configs/vp/ddpm/cifar10_continuous.py (models/ddpm.py)
    "ddpm": (dict(), 35_218_947),
    # the same with model.nf = 64 (DiffFlow's score network)
    "ddpm_nf64": (dict(nf=64), 8_819_459),
}


@pytest.mark.parametrize("key", sorted(REFERENCE_COUNTS))
def test_parameter_count_matches_original(key):
    options, reference = REFERENCE_COUNTS[key]
    builder = PRESETS[key.split("_")[0]]
    with torch.device("meta"):  # no memory, no initialisation work
        net = builder((3, 32, 32), **options)
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - reference) <= 0.01 * reference, (count, reference)


# ------------------------------------------------------------------ registry
def test_registry():
    assert set(SCORE_BACKBONES) == {"ddpmpp", "ncsnpp", "ddpm"}
    net = build_score_backbone("ddpm", (1, 8, 8), nf=8, ch_mult=(1, 2), attn_resolutions=(4,))
    assert isinstance(net, NCSNpp)
    with pytest.raises(ValueError, match="valid: ddpm, ddpmpp, ncsnpp"):
        build_score_backbone("unet++", (1, 8, 8))
    with pytest.raises(ValueError, match="progressive"):
        NCSNpp((1, 8, 8), nf=8, ch_mult=(1, 2), progressive="both")
    with pytest.raises(ValueError, match="divisible"):
        NCSNpp((1, 6, 6), nf=8, ch_mult=(1, 2, 2))


# ------------------------------------------------------------- FIR resampling
DT = torch.float64


def test_fir_box_kernel_is_nearest_and_average_pooling():
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    torch.testing.assert_close(upsample_2d(x, (1, 1)), F.interpolate(x, scale_factor=2))
    torch.testing.assert_close(downsample_2d(x, (1, 1)), F.avg_pool2d(x, 2))


def test_fir_keeps_constants_inside_and_commutes_with_flips():
    k = (1, 3, 3, 1)
    ones = torch.ones(1, 1, 8, 8, dtype=DT)
    torch.testing.assert_close(
        upsample_2d(ones, k)[..., 1:-1, 1:-1], torch.ones(1, 1, 14, 14, dtype=DT)
    )
    torch.testing.assert_close(
        downsample_2d(ones, k)[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2, dtype=DT)
    )
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 8, dtype=DT)
    w = torch.randn(3, 2, 3, 3, dtype=DT)
    flip = lambda t: t.flip(-1)
    torch.testing.assert_close(upsample_2d(flip(x), k), flip(upsample_2d(x, k)))
    torch.testing.assert_close(downsample_2d(flip(x), k), flip(downsample_2d(x, k)))
    torch.testing.assert_close(
        upsample_conv_2d(flip(x), flip(w), k), flip(upsample_conv_2d(x, w, k))
    )
    torch.testing.assert_close(
        conv_downsample_2d(flip(x), flip(w), k), flip(conv_downsample_2d(x, w, k))
    )


def test_fused_resampling_equals_the_sequence_away_from_the_border():
    torch.manual_seed(0)
    k = (1, 3, 3, 1)
    x = torch.randn(1, 2, 16, 16, dtype=DT)
    w = torch.randn(3, 2, 3, 3, dtype=DT)
    up = upsample_conv_2d(x, w, k)
    assert up.shape == (1, 3, 32, 32)
    torch.testing.assert_close(
        up[..., 3:-3, 3:-3], F.conv2d(upsample_2d(x, k), w, padding=1)[..., 3:-3, 3:-3]
    )
    down = conv_downsample_2d(x, w, k)
    assert down.shape == (1, 3, 8, 8)
    torch.testing.assert_close(
        down[..., 2:-2, 2:-2], downsample_2d(F.conv2d(x, w, padding=1), k)[..., 2:-2, 2:-2]
    )
