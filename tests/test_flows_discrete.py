"""Mathematical checks of the discrete flows (NICE, RealNVP, Glow, residual flows).

Every bijection is tested in float64 on randomised parameters (zero-initialised
conditioners would make couplings trivially the identity): inverse round trip
and log-determinant against the brute-force Jacobian of the flattened map.
"""

import copy
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from torch import Tensor, nn

from cnf.flows.base import Flow, SequentialFlow, standard_normal_logprob
from cnf.flows.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    DiagonalScaling,
    checkerboard_mask,
    half_mask,
    image_channel_mask,
    image_checkerboard_mask,
)
from cnf.flows.glow import (
    ActNorm,
    GlowCoupling,
    GlowStep,
    Invertible1x1ConvLU,
    InvertibleLinearLU,
    Squeeze,
)
from cnf.flows.lipschitz import (
    SpectralNormLinear,
    lipschitz_convnet,
    lipschitz_mlp,
    update_spectral_norm,
)
from cnf.flows.logdet import ExactLogDet, RouletteLogDet, SeriesLogDet
from cnf.flows.multiscale import (
    glow_image,
    glow_vector,
    nice_image,
    nice_vector,
    realnvp_image,
    realnvp_vector,
)
from cnf.flows.registry import build_flow
from cnf.flows.residual import FixedPointError, LogDetOptions, ResidualBlock

torch.set_num_threads(1)

F64 = torch.float64
TOL = 1e-6


# ----------------------------------------------------------------------------- helpers


def perturb_(module: nn.Module, scale: float = 0.1, seed: int = 0) -> nn.Module:
    """Add small Gaussian noise to every parameter (reproducibly)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def brute_force_logdet(flow: Flow, x: Tensor) -> Tensor:
    """``log|det dz/dx|`` per sample from the full Jacobian of the flattened map."""
    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0].flatten(), xi)
        jac = jac.reshape(xi.numel(), xi.numel())
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def check_bijection(flow: Flow, x: Tensor, tol: float = TOL) -> None:
    """Round trip and log-det vs brute-force Jacobian, in eval mode."""
    flow.eval()
    z, logdet = flow(x)
    assert z.shape == x.shape
    assert logdet.shape == (x.shape[0],)
    assert z.dtype == x.dtype and logdet.dtype == x.dtype
    x_rec = flow.inverse(z)
    assert (x_rec - x).abs().max().item() < tol
    expected = brute_force_logdet(flow, x)
    assert (logdet - expected).abs().max().item() < tol


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


VECTOR_SHAPES = [(2,), (5,)]
IMAGE_SHAPES = [(2, 4, 4), (1, 4, 4)]


# ------------------------------------------------------------------------------- masks


def test_vector_masks_split_and_alternate():
    for dim in (2, 5):
        for fn in (half_mask, checkerboard_mask):
            m0, m1 = fn(dim, parity=0), fn(dim, parity=1)
            assert m0.shape == (dim,) and m0.dtype == torch.bool
            assert torch.equal(m0, ~m1)
            assert 0 < int(m0.sum()) < dim
    # D = 2: each coupling transforms exactly one coordinate given the other.
    assert half_mask(2).tolist() == [True, False]
    assert checkerboard_mask(2, parity=1).tolist() == [False, True]
    with pytest.raises(ValueError):
        half_mask(1)


def test_image_masks():
    cb = image_checkerboard_mask((2, 4, 4))
    assert cb.shape == (2, 4, 4) and int(cb.sum()) == 16
    assert bool(cb[0, 0, 0]) and not bool(cb[0, 0, 1]) and bool(cb[1, 1, 1])
    ch = image_channel_mask((4, 2, 2), parity=1)
    assert ch[:, 0, 0].tolist() == [False, False, True, True]
    with pytest.raises(ValueError):
        image_channel_mask((1, 4, 4))


# --------------------------------------------------------------------------- couplings


COUPLING_CASES = [
    (cls, shape)
    for cls in (AdditiveCoupling, AffineCoupling, GlowCoupling)
    for shape in VECTOR_SHAPES + IMAGE_SHAPES
    # Glow's default channel split needs C >= 2.
    if not (cls is GlowCoupling and len(shape) == 3 and shape[0] < 2)
]


@pytest.mark.parametrize("cls,shape", COUPLING_CASES)
@pytest.mark.parametrize("parity", [0, 1])
def test_coupling_bijection(cls, shape, parity):
    torch.manual_seed(0)
    flow = cls(shape, parity=parity, hidden_features=16, hidden_channels=8).double()
    x = randn(3, *shape)
    # Zero-initialised last layer: additive / affine couplings start as the identity.
    if cls is not GlowCoupling:
        z, logdet = flow(x)
        assert torch.equal(z, x) and torch.all(logdet == 0)
    check_bijection(perturb_(flow), x)


@pytest.mark.parametrize("cls", [AdditiveCoupling, AffineCoupling])
@pytest.mark.parametrize("mask_fn", [checkerboard_mask, image_channel_mask])
def test_coupling_other_masks(cls, mask_fn):
    shape = (5,) if mask_fn is checkerboard_mask else (2, 4, 4)
    mask = mask_fn(shape[0] if len(shape) == 1 else shape, parity=1)
    torch.manual_seed(1)
    flow = cls(shape, mask=mask, hidden_features=16, hidden_channels=8).double()
    x = randn(3, *shape, seed=1)
    z, _ = perturb_(flow)(x)
    # The conditioning part passes through unchanged.
    assert torch.equal(z[:, mask], x[:, mask])
    check_bijection(flow, x)


def test_coupling_rejects_bad_mask():
    with pytest.raises(ValueError, match="mask"):
        AffineCoupling((3,), mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize(
    "shape,per_channel", [((5,), False), ((2, 4, 4), True), ((2, 4, 4), False)]
)
def test_diagonal_scaling(shape, per_channel):
    flow = perturb_(DiagonalScaling(shape, per_channel=per_channel).double())
    x = randn(3, *shape)
    _, logdet = flow(x)
    reps = shape[1] * shape[2] if per_channel else 1
    assert torch.allclose(logdet, flow.log_scale.sum() * reps * torch.ones(3, dtype=F64))
    check_bijection(flow, x)


# -------------------------------------------------------------------------------- glow


def test_actnorm_is_identity_until_initialised():
    layer = ActNorm(3).double().eval()
    x = randn(4, 3)
    z, logdet = layer(x)
    assert torch.equal(z, x) and torch.all(logdet == 0) and not bool(layer.initialized)


@pytest.mark.parametrize("shape", [(5,), (3, 4, 4)])
def test_actnorm_init_standardises_batch(shape):
    layer = ActNorm(shape[0]).double()
    x = 3.0 + 2.0 * randn(64, *shape)
    layer.train()
    y, _ = layer(x)
    dims = [0] + list(range(2, x.dim()))
    assert bool(layer.initialized)
    assert y.mean(dim=dims).abs().max().item() < 1e-10
    assert (y.var(dim=dims, unbiased=False) - 1).abs().max().item() < 1e-5
    # Initialised only once; the flag survives a state_dict round trip.
    before = layer.log_scale.detach().clone()
    layer(randn(64, *shape, seed=3))
    assert torch.equal(layer.log_scale, before)
    fresh = ActNorm(shape[0]).double()
    fresh.load_state_dict(layer.state_dict())
    assert bool(fresh.initialized)
    fresh.train()
    fresh(randn(8, *shape, seed=4))
    assert torch.equal(fresh.log_scale, before)
    check_bijection(perturb_(layer), randn(3, *shape, seed=5))


def test_lu_linear_logdet_matches_slogdet():
    torch.manual_seed(0)
    layer = perturb_(InvertibleLinearLU(5).double())
    w = layer.weight()
    sign, logabs = torch.linalg.slogdet(w)
    assert abs(logabs.item() - layer.log_abs_det().item()) < 1e-10
    assert torch.allclose(layer.inverse_weight() @ w, torch.eye(5, dtype=F64), atol=1e-10)
    check_bijection(layer, randn(3, 5))


def test_lu_init_is_orthogonal():
    torch.manual_seed(0)
    w = InvertibleLinearLU(6).double().weight()
    assert torch.allclose(w @ w.T, torch.eye(6, dtype=F64), atol=1e-5)


def test_1x1_conv_lu():
    torch.manual_seed(0)
    layer = perturb_(Invertible1x1ConvLU(3).double())
    x = randn(3, 3, 4, 4)
    _, logdet = layer(x)
    expected = 16 * torch.linalg.slogdet(layer.weight())[1]
    assert (logdet - expected).abs().max().item() < 1e-10
    check_bijection(layer, x)


@pytest.mark.parametrize("shape", [(2,), (5,), (2, 4, 4)])
def test_glow_step(shape):
    torch.manual_seed(0)
    step = GlowStep(shape, hidden_channels=8, hidden_features=16).double()
    x = randn(3, *shape)
    step.train()
    step(randn(16, *shape, seed=1))  # ActNorm data-dependent init
    check_bijection(perturb_(step), x)


def test_squeeze():
    sq = Squeeze()
    x = randn(2, 2, 4, 4)
    z, logdet = sq(x)
    assert z.shape == (2, 8, 2, 2) and torch.all(logdet == 0)
    # Channel c * 4 + p * 2 + q holds pixel (2h + p, 2w + q) of channel c.
    assert torch.equal(z[:, 1 * 4 + 1 * 2 + 0], x[:, 1, 1::2, 0::2])
    assert torch.equal(sq.inverse(z), x)
    with pytest.raises(ValueError):
        sq(randn(1, 1, 3, 4))


# -------------------------------------------------------------------------- multiscale


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_nice_image(shape):
    torch.manual_seed(0)
    flow = perturb_(nice_image(shape, num_layers=3, hidden_channels=8).double())
    check_bijection(flow, randn(2, *shape))
    # Additive couplings are volume-preserving: the log-det is the scaling's alone.
    _, logdet = flow(randn(2, *shape))
    assert torch.allclose(logdet, flow.flows[-1].log_scale.sum().expand(2))


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
def test_realnvp_multiscale(shape):
    torch.manual_seed(0)
    flow = realnvp_image(shape, num_scales=2, steps_per_scale=2, final_steps=2, hidden_channels=8)
    flow = perturb_(flow.double())
    check_bijection(flow, randn(2, *shape))


@pytest.mark.parametrize("shape", IMAGE_SHAPES)
@pytest.mark.parametrize("learned_prior", [True, False])
def test_glow_multiscale(shape, learned_prior):
    torch.manual_seed(0)
    flow = glow_image(
        shape, num_scales=2, steps_per_scale=2, hidden_channels=8, learned_prior=learned_prior
    ).double()
    flow.train()
    flow(randn(16, *shape, seed=1))  # ActNorm init
    check_bijection(perturb_(flow), randn(2, *shape))


def test_glow_learned_prior_is_a_standardisation():
    # With the prior's net perturbed, log p(x) = log N(z; 0, I) + logdet must
    # equal the explicit sum: final block under N(0, I), factored-out block
    # under N(mu(h), sigma(h)), plus the flows' log-dets.
    torch.manual_seed(0)
    shape = (2, 4, 4)
    flow = glow_image(shape, num_scales=2, steps_per_scale=1, hidden_channels=8).double()
    perturb_(flow).eval()
    x = randn(3, *shape)
    z, logdet = flow(x)
    # Recompute by hand: level 0 = squeeze + steps, split, prior, inner level.
    y, ld_post = flow.post(flow.squeeze(x)[0])
    h, z_f = y[:, :4], y[:, 4:]
    mu, log_sigma = flow.prior.net(h).chunk(2, dim=1)
    log_n_f = torch.distributions.Normal(mu, log_sigma.exp()).log_prob(z_f).flatten(1).sum(1)
    h_out, ld_inner = flow.inner(h)
    expected = log_n_f + standard_normal_logprob(h_out) + ld_post + ld_inner
    assert (standard_normal_logprob(z) + logdet - expected).abs().max().item() < 1e-10


@pytest.mark.parametrize("dim", [2, 5])
@pytest.mark.parametrize("builder", [nice_vector, realnvp_vector, glow_vector])
def test_vector_builders(builder, dim):
    torch.manual_seed(0)
    flow = builder(dim, hidden_features=16).double()
    flow.train()
    flow(randn(16, dim, seed=1))
    check_bijection(perturb_(flow), randn(3, dim))


def test_float32_follows_input_dtype():
    torch.manual_seed(0)
    for flow, shape in [
        (glow_image((2, 4, 4), num_scales=2, steps_per_scale=1, hidden_channels=8), (2, 4, 4)),
        (realnvp_vector(3, hidden_features=8), (3,)),
    ]:
        x = torch.randn(4, *shape)
        z, logdet = flow(x)
        assert z.dtype == torch.float32 and logdet.dtype == torch.float32
        assert (flow.inverse(z) - x).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------- residual


def residual_block(shape, *, coeff=0.9, logdet="exact", seed=0, **kwargs) -> ResidualBlock:
    torch.manual_seed(seed)
    if len(shape) == 1:
        g = lipschitz_mlp(shape[0], hidden_features=16, num_hidden_layers=1, coeff=coeff)
    else:
        g = lipschitz_convnet(shape, hidden_channels=8, coeff=coeff)
    block = ResidualBlock(g, logdet=logdet, **kwargs).double()
    perturb_(block)
    update_spectral_norm(block, 200)  # re-tighten the bound after perturbing weights
    return block.eval()


@pytest.mark.parametrize("shape", [(2,), (5,), (1, 4, 4)])
def test_residual_block_exact(shape):
    block = residual_block(shape, tol=1e-12)
    check_bijection(block, randn(3, *shape))


@pytest.mark.parametrize("shape", [(5,), (2, 4, 4)])
def test_spectral_norm_contractive(shape):
    block = residual_block(shape, coeff=0.9)
    g = block.g
    x, y = randn(256, *shape, seed=1), randn(256, *shape, seed=2)
    with torch.no_grad():
        ratio = (g(x) - g(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert ratio.max().item() < 0.95
    for xi in randn(3, *shape, seed=3):
        jac = torch.autograd.functional.jacobian(lambda v: g(v[None]).flatten(), xi)
        jac = jac.reshape(xi.numel(), xi.numel())
        assert torch.linalg.matrix_norm(jac, ord=2).item() < 1.0


def test_spectral_norm_eval_is_deterministic_and_train_updates():
    block = residual_block((3,))
    x = randn(4, 3)
    u = block.g[0].u.clone()
    z1, ld1 = block(x)
    z2, ld2 = block(x)
    assert torch.equal(z1, z2) and torch.equal(ld1, ld2) and torch.equal(block.g[0].u, u)
    block.train()
    with torch.no_grad():
        block.g[0].weight.add_(0.5)
    block(x)
    assert not torch.equal(block.g[0].u, u)


def test_residual_forward_under_no_grad():
    block = residual_block((3,), logdet=SeriesLogDet(n_terms=5))
    x = randn(4, 3)
    with torch.no_grad():
        z, logdet = block(x)
    assert not z.requires_grad and not logdet.requires_grad


def test_fixed_point_inverse_and_error():
    block = residual_block((5,), coeff=0.9, tol=1e-10, max_iters=500)
    x = randn(8, 5)
    z, _ = block(x)
    assert (block.inverse(z) - x).abs().max().item() < 1e-8
    with pytest.raises(FixedPointError) as info:
        block.inverse(z, tol=1e-14, max_iters=1)
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "residual" in msg and "tol = 1.0e-14" in msg and "max_iters = 1" in msg
    assert "`max_iters`" in msg and "`tol`" in msg


def tanh_block(dim: int, *, coeff: float = 0.6, seed: int = 2) -> ResidualBlock:
    """``g(x) = tanh(W x + b)`` with ``||W|| = coeff`` exactly (weights blown up, then
    spectrally normalised), so ``||J_g|| ~ coeff`` near 0 and every term of the
    log-det series matters; a deeper random MLP has a much smaller Jacobian."""
    torch.manual_seed(seed)
    lin = SpectralNormLinear(dim, dim, coeff=coeff)
    with torch.no_grad():
        lin.weight.mul_(10.0)
        lin.bias.mul_(0.1)
    block = ResidualBlock(nn.Sequential(lin, nn.Tanh()), logdet="exact").double()
    update_spectral_norm(block, 200)
    return block.eval()


def _repeated(x: Tensor, n: int) -> Tensor:
    return x.expand(n, *x.shape[1:]).clone().requires_grad_(True)


def test_tanh_block_has_large_jacobian():
    block = tanh_block(2, coeff=0.6)
    x = 0.3 * randn(1, 2, seed=7)
    jac = torch.autograd.functional.jacobian(lambda v: block.g(v[None])[0], x[0])
    assert 0.5 < torch.linalg.matrix_norm(jac, ord=2).item() < 0.6


def test_spectral_norm_initialises_lazily_once():
    torch.manual_seed(0)
    lin = SpectralNormLinear(6, 5, coeff=0.7, init_iters=100).double()
    assert not bool(lin.initialised)  # building a model runs no power iterations
    u0 = lin.u.clone()
    w = lin.normalized_weight()  # first use runs them: the bound holds at once
    assert bool(lin.initialised) and not torch.equal(lin.u, u0)
    sigma = torch.linalg.matrix_norm(w.detach(), ord=2).item()
    assert sigma == pytest.approx(0.7, rel=1e-6)
    # A checkpoint restores u, v and the flag: loading never re-runs the iterations,
    # and checkpoints written before the flag existed count as initialised.
    state = {k: v for k, v in lin.state_dict().items() if k != "initialised"}
    fresh = SpectralNormLinear(6, 5, coeff=0.7, init_iters=100).double()
    fresh.load_state_dict(state)
    assert bool(fresh.initialised)
    assert torch.equal(fresh.normalized_weight(), lin.normalized_weight())


# Rademacher probes in D = 2 keep the Hutchinson noise low enough that dropping
# the 1 / P(N >= k) weights is detected at > 10 standard errors in these cases.
ROULETTE_CASES = [
    dict(distribution="geometric", geometric_p=0.5, n_exact_terms=0, probe="rademacher"),
    dict(distribution="geometric", geometric_p=0.5, n_exact_terms=2, probe="rademacher"),
    dict(distribution="geometric", geometric_p=0.5, n_exact_terms=1, probe="gaussian"),
]


@pytest.mark.parametrize("options", ROULETTE_CASES)
def test_roulette_estimator_unbiased(options):
    block = tanh_block(2, coeff=0.6)
    x = 0.3 * randn(1, 2, seed=7)
    xr = x.clone().requires_grad_(True)
    exact = ExactLogDet()(block.g(xr), xr, create_graph=False)
    est = RouletteLogDet(generator=torch.Generator().manual_seed(0), **options)
    n = 4000
    xs = _repeated(x, n)
    draws = est(block.g(xs), xs, create_graph=False)
    se = draws.std() / n**0.5
    assert (draws.mean() - exact[0]).abs().item() < 4 * se.item()
    assert draws.std().item() > 1e-4  # not trivially exact


def test_roulette_tail_probabilities_match_sampler():
    est = RouletteLogDet(geometric_p=0.5, generator=torch.Generator().manual_seed(0))
    m = est._sample_extra(200_000, torch.device("cpu"))
    ks = torch.arange(0, 6)
    empirical = torch.stack([(m >= k).double().mean() for k in ks])
    assert torch.allclose(empirical, est.tail_probability(ks), atol=5e-3)


def test_poisson_roulette_is_refused_with_the_reason():
    """A Poisson number of terms has infinite variance: refused in the estimator and the config."""
    from cnf.config import ConfigError, load_config
    from cnf.flows.residual import LogDetOptions

    with pytest.raises(ValueError, match="infinite variance"):
        RouletteLogDet(distribution="poisson")
    with pytest.raises(ValueError, match="infinite variance"):
        LogDetOptions(distribution="poisson")
    toy = "configs/flows/resflow_toy.yaml"
    for key in ("model.flow.logdet.distribution", "model.flow.roulette_distribution"):
        with pytest.raises(ConfigError, match=r"^model\.flow\.logdet: .*infinite variance"):
            load_config(toy, ["model.flow.logdet.name=roulette", f"{key}=poisson"])
    with pytest.raises(ConfigError, match="valid: geometric"):
        load_config(
            toy, ["model.flow.logdet.name=roulette", "model.flow.logdet.distribution=uniform"]
        )
    load_config(
        toy, ["model.flow.logdet.name=roulette", "model.flow.logdet.distribution=geometric"]
    )


def test_series_estimator_converges_to_exact_in_mean():
    block = tanh_block(2, coeff=0.6)
    x = (0.3 * randn(1, 2, seed=7)).requires_grad_(True)
    exact = ExactLogDet()(block.g(x), x, create_graph=False)
    est = SeriesLogDet(n_terms=30, probe="rademacher", generator=torch.Generator().manual_seed(0))
    xs = _repeated(x.detach(), 4000)
    draws = est(block.g(xs), xs, create_graph=False)
    assert (draws.mean() - exact[0]).abs().item() < 4 * draws.std().item() / 4000**0.5


@pytest.mark.parametrize("neumann_grad", [False, True])
def test_roulette_gradient_unbiased(neumann_grad):
    block = tanh_block(2, coeff=0.6)
    params = list(block.g.parameters())

    def flat_grad(out: Tensor) -> Tensor:
        return torch.cat([t.flatten() for t in torch.autograd.grad(out, params)])

    x = 0.3 * randn(1, 2, seed=7)
    xr = x.clone().requires_grad_(True)
    g_exact = flat_grad(ExactLogDet()(block.g(xr), xr, create_graph=True).sum())
    est = RouletteLogDet(
        n_exact_terms=1,
        probe="rademacher",
        neumann_grad=neumann_grad,
        generator=torch.Generator().manual_seed(1),
    )
    groups = []
    for _ in range(20):
        xs = _repeated(x, 200)
        groups.append(flat_grad(est(block.g(xs), xs, create_graph=True).mean()))
    grads = torch.stack(groups)
    se = grads.std(dim=0) / len(groups) ** 0.5
    assert torch.all((grads.mean(dim=0) - g_exact).abs() <= 4 * se + 1e-8)


def test_neumann_value_equals_power_series_value():
    block = tanh_block(3, coeff=0.6)
    x = 0.3 * randn(16, 3, seed=9)
    values = []
    for neumann in (False, True):
        est = RouletteLogDet(neumann_grad=neumann, generator=torch.Generator().manual_seed(5))
        xs = x.clone().requires_grad_(True)
        values.append(est(block.g(xs), xs, create_graph=True))
    assert torch.allclose(values[0], values[1], atol=1e-12)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("resflow", {"num_blocks": 2, "hidden_channels": 8}),
        (
            "resflow_global",
            {"num_scales": 2, "num_blocks": 2, "hidden_channels": 8, "latent_dim": 4},
        ),
    ],
)
@pytest.mark.parametrize(
    "logdet",
    [
        LogDetOptions("roulette", neumann_grad=True),
        LogDetOptions("roulette"),
        LogDetOptions("series", n_terms=4),
    ],
    ids=["roulette-neumann", "roulette", "series"],
)
def test_grad_in_forward_gives_the_same_gradients(name, kwargs, logdet):
    # The gradient taken in the forward pass (graph freed there) equals the plain
    # backward's, for the parameters and for an input that requires grad.
    shape = (2, 4, 4)
    x = 0.5 * randn(6, *shape, seed=3)
    torch.manual_seed(0)
    base = perturb_(build_flow(name, event_shape=shape, logdet=logdet, **kwargs).double())
    grads = []
    for in_forward in (False, True):
        flow = copy.deepcopy(base).train()
        for m in flow.modules():
            if isinstance(m, ResidualBlock):
                m.grad_in_forward = in_forward
        xr = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # the same probes, series lengths and posterior draws
        z, logdet_z = flow(xr)
        loss = -(standard_normal_logprob(z) + logdet_z).mean()
        params = [p for p in flow.parameters() if p.requires_grad]
        g = torch.autograd.grad(loss, [xr, *params], allow_unused=True)
        grads.append([torch.zeros_like(t) if gi is None else gi for t, gi in zip([xr, *params], g)])
    for plain, early in zip(*grads):
        torch.testing.assert_close(early, plain, rtol=1e-10, atol=1e-12)
    assert any(gi.abs().max() > 0 for gi in grads[1][1:])


def test_grad_in_forward_refuses_unequal_sample_weights():
    flow = build_flow(
        "resflow", event_shape=(2,), num_blocks=1, logdet=LogDetOptions(grad_in_forward=True)
    ).double()
    _, logdet = flow(randn(4, 2))
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    with pytest.raises(RuntimeError, match="weighs every sample's log-det equally"):
        (weights * logdet).sum().backward()


# ---------------------------------------------------------------------------- registry


@pytest.mark.parametrize(
    "name,shape,kwargs",
    [
        ("nice", (2,), {}),
        ("realnvp", (5,), {"num_layers": 2}),
        ("glow", (5,), {"num_steps": 2}),
        ("resflow", (2,), {"num_blocks": 2, "logdet": LogDetOptions("exact")}),
        ("nice", (2, 4, 4), {"num_layers": 2, "hidden_channels": 8}),
        ("realnvp", (2, 4, 4), {"num_scales": 2, "hidden_channels": 8}),
        ("glow", (2, 4, 4), {"num_scales": 2, "steps_per_scale": 1, "hidden_channels": 8}),
        (
            "resflow",
            (1, 4, 4),
            {"num_blocks": 1, "hidden_channels": 8, "logdet": LogDetOptions("exact")},
        ),
    ],
)
def test_registry_builds_valid_flows(name, shape, kwargs):
    torch.manual_seed(0)
    flow = build_flow(name, event_shape=shape, **kwargs).double()
    assert isinstance(flow, Flow)
    flow.train()
    flow(randn(8, *shape, seed=1))
    if name == "resflow":
        update_spectral_norm(flow, 100)
        for block in flow.flows:
            if isinstance(block, ResidualBlock):
                block.tol = 1e-12
    check_bijection(flow, randn(2, *shape))


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown flow 'x'; valid: glow, nice, realnvp, resflow"):
        build_flow("x", event_shape=(2,))
    with pytest.raises(ValueError, match="unknown option.*'bogus'.*valid:.*num_steps"):
        build_flow("glow", event_shape=(2,), bogus=1)
    with pytest.raises(ValueError, match=r"event_shape must be \(D,\) or \(C, H, W\)"):
        build_flow("nice", event_shape=(4, 4))
    with pytest.raises(ValueError, match="unknown log-det estimator 'magic'"):
        build_flow("resflow", event_shape=(2,), logdet=LogDetOptions("magic"))


def test_sequential_of_everything_is_a_flow():
    # Mixed stack on vectors: couplings, ActNorm, LU and a residual block compose.
    torch.manual_seed(0)
    block = residual_block((4,), tol=1e-12)
    flow = SequentialFlow(
        [AffineCoupling((4,), hidden_features=8), InvertibleLinearLU(4).double(), block]
    ).double()
    perturb_(flow, scale=0.05)
    update_spectral_norm(flow, 200)
    check_bijection(flow, randn(3, 4))


# ------------------------------------------------- the CNF behind the same interface


class _ConvField(nn.Module):
    """Time-dependent conv vector field ``(t, z) -> dz/dt`` for image-shaped states."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels + 1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        tt = torch.as_tensor(t, dtype=z.dtype).expand(z.shape[0], 1, *z.shape[2:])
        return self.conv2(torch.tanh(self.conv1(torch.cat([z, tt], 1))))


def _cnf(shape: tuple[int, ...]) -> Flow:
    from cnf.divergence import ExactDivergence
    from cnf.flows.cnf import CNF
    from cnf.nets import TimeMLP
    from cnf.solve import SolverConfig

    torch.manual_seed(0)
    field = TimeMLP(shape[0], (16, 16)) if len(shape) == 1 else _ConvField(shape[0])
    tight = SolverConfig("dopri5", rtol=1e-9, atol=1e-9)
    return CNF(field, time_length=0.7, solver=tight, divergence=ExactDivergence()).double()


@pytest.mark.parametrize("shape", [(3,), pytest.param((1, 2, 2), marks=pytest.mark.slow)])
def test_cnf_behind_flow_interface(shape):
    # The CNF alone and stacked between discrete flows: round trip and log-det
    # against the brute-force Jacobian of the whole map, in float64 at 1e-6.
    check_bijection(_cnf(shape), randn(2, *shape))
    if len(shape) == 1:
        stack = [AffineCoupling(shape, hidden_features=8), _cnf(shape), InvertibleLinearLU(3)]
    else:
        stack = [
            AffineCoupling(shape, mask=image_checkerboard_mask(shape), hidden_channels=4),
            _cnf(shape),
            ActNorm(shape[0]),
        ]
    flow = perturb_(SequentialFlow(stack).double(), scale=0.05)
    check_bijection(flow, randn(2, *shape))


def test_identity_and_preprocessing_are_flows():
    from cnf.flows.base import IdentityFlow
    from cnf.flows.preprocess import Preprocess

    x = torch.rand(3, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    check_bijection(IdentityFlow(), x)
    check_bijection(Preprocess(logit_alpha=0.05), x)
    check_bijection(Preprocess(logit_alpha=0.05, scale=2.0, shift=-1.0), x)
