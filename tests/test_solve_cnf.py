"""The ODE solve and the CNF against closed forms and brute force (float64).

* A linear field ``dz/dt = Az`` is a Gaussian flow: ``z(T) = expm(AT) x`` and
  ``log p(x) = log N(expm(AT) x; 0, I) + T·tr(A)``;
* fixed-step solvers converge with their order; NFE are counted exactly;
* x → z → x round trips, and the CNF's log-determinant equals the
  brute-force Jacobian of the whole solve;
* adjoint gradients equal backprop gradients (also with the seminorm), and a
  learned end time T receives the closed-form gradient;
* backprop through an adaptive solve leaves the step-size controller out of
  the graph without changing a single step;
* RNODE's regulariser states equal quadratures along the trajectory;
* moving batch norm is a bijection with the right log-determinant.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import cnf.solve as solve_module
from cnf.divergence import DivergenceConfig, ExactDivergence, HutchinsonDivergence
from cnf.flows.base import FlowSettings, SequentialFlow, standard_normal_logprob
from cnf.flows.cnf import CNF
from cnf.flows.normalization import MovingBatchNorm
from cnf.models.ffjord import FFJORD, ODESettings, build_ffjord
from cnf.nets import TimeMLP
from cnf.schema import FFJORDSchema
from cnf.solve import METHODS, SolverConfig, integrate

DTYPE = torch.float64
TIGHT = SolverConfig(name="dopri5", rtol=1e-10, atol=1e-10)


class LinearField(nn.Module):
    """``f(t, z) = A z``; no ``forward_with_jacobian``, so the divergence uses autograd."""

    def __init__(self, a: Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return z @ self.a.T


def linear_timemlp(a: Tensor) -> TimeMLP:
    """The same linear field as a TimeMLP (one ``ignore`` layer, no bias): forward-mode path."""
    net = TimeMLP(a.shape[0], (), layer="ignore").to(DTYPE)
    with torch.no_grad():
        net.layers[0].linear.weight.copy_(a)
        net.layers[0].linear.bias.zero_()
    return net


def fixed_matrix(d: int = 3, seed: int = 0, scale: float = 0.6) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(d, d, generator=g, dtype=DTYPE)


def random_mlp(dim: int = 2, seed: int = 0, hidden=(16, 16), **kw) -> TimeMLP:
    torch.manual_seed(seed)
    return TimeMLP(dim, hidden, **kw).to(DTYPE)  # default (non-zero) initialisation


def data(n: int = 8, d: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(n, d, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def gaussian_logprob(a: Tensor, T: float, x: Tensor) -> Tensor:
    """Closed form for ``dz/dt = Az`` on [0, T] with a standard-normal base."""
    z = x @ torch.linalg.matrix_exp(a * T).T
    return standard_normal_logprob(z) + T * a.trace()


# -------------------------------------------------------- linear field: exact
@pytest.mark.parametrize("path", ["autograd", "forward-mode"])
def test_linear_field_gives_closed_form_gaussian(path: str) -> None:
    a, T = fixed_matrix(), 0.7
    field = LinearField(a) if path == "autograd" else linear_timemlp(a)
    cnf = CNF(field, time_length=T, solver=TIGHT, divergence=ExactDivergence()).to(DTYPE)
    x = data(d=3)
    z, logdet = cnf(x)
    m = torch.linalg.matrix_exp(a * T)
    torch.testing.assert_close(z, x @ m.T, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(
        logdet, torch.full_like(logdet, T * float(a.trace())), rtol=0, atol=1e-8
    )
    logp = standard_normal_logprob(z) + logdet
    torch.testing.assert_close(logp, gaussian_logprob(a, T, x), rtol=0, atol=1e-6)
    # An independent closed form: x = M⁻¹ z with z ~ N(0, I), so x ~ N(0, M⁻¹M⁻ᵀ).
    m_inv = torch.linalg.inv(m)
    mvn = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=DTYPE), m_inv @ m_inv.T)
    torch.testing.assert_close(logp, mvn.log_prob(x), rtol=0, atol=1e-6)


def test_linear_field_hutchinson_logdet_is_T_eps_A_eps() -> None:
    """With a fixed probe and constant A, the estimated logdet is exactly T·εᵀAε per sample."""
    a, T = fixed_matrix(), 0.7
    x = data(n=4000, d=3)
    for kind in ("gaussian", "rademacher"):
        est = HutchinsonDivergence(kind, generator=torch.Generator().manual_seed(5))
        sol = integrate(LinearField(a), x, t1=T, solver=TIGHT, divergence=est)
        eps = HutchinsonDivergence(kind, generator=torch.Generator().manual_seed(5)).draw_probe(x)[
            0
        ]
        expected = T * ((eps @ a.T) * eps).sum(1)
        torch.testing.assert_close(sol.logdet, expected, rtol=1e-8, atol=1e-8)
        # ... and unbiased for T·tr(A).
        se = sol.logdet.std() / math.sqrt(len(x))
        assert abs(sol.logdet.mean() - T * a.trace()) < 4 * se


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_order_of_convergence(method: str, order: int) -> None:
    a = fixed_matrix(scale=0.8)
    x = data(d=3)
    exact = x @ torch.linalg.matrix_exp(a).T
    steps = [4, 8, 16, 32] if order > 1 else [16, 32, 64, 128]
    errs = []
    for n in steps:
        sol = integrate(LinearField(a), x, solver=SolverConfig(name=method, steps=n))
        errs.append(float((sol.z - exact).detach().abs().max()))
    slopes = [math.log2(e0 / e1) for e0, e1 in zip(errs[:-1], errs[1:])]
    for s in slopes:
        assert order - 0.5 < s < order + 0.5, (method, errs, slopes)
    if method == "rk4":
        assert 11 < errs[-2] / errs[-1] < 23  # ≈ 16 when halving the step


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_step_nfe_is_exact(dtype: torch.dtype) -> None:
    """``steps`` equal steps, no more: euler = steps evaluations, rk4 = 4·steps."""
    x = torch.ones(2, 2, dtype=dtype)
    field = lambda t, z: -z  # noqa: E731
    for n in range(1, 101):
        sol = integrate(field, x, solver=SolverConfig(name="euler", steps=n))
        assert sol.stats.nfe_forward == n, (dtype, n)
        torch.testing.assert_close(sol.z, x * (1 - 1 / n) ** n)
    for n in (3, 8, 49, 61):
        sol = integrate(field, x, solver=SolverConfig(name="rk4", steps=n))
        assert sol.stats.nfe_forward == 4 * n


# --------------------------------------------------------- nonlinear CNF
def test_round_trip_and_logdet_vs_brute_force_jacobian() -> None:
    net = random_mlp(dim=2, seed=3)
    solver = SolverConfig(name="dopri5", rtol=1e-9, atol=1e-9)
    cnf = CNF(net, time_length=0.8, solver=solver).to(DTYPE)
    x = data(n=6, d=2)
    z, logdet = cnf(x)
    assert (z - x).abs().max() > 0.1  # a non-trivial map
    x_back = cnf.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-5)

    def flow_map(v: Tensor) -> Tensor:
        return integrate(net, v[None], t1=0.8, solver=solver).z[0]

    for b in range(len(x)):
        jac = torch.autograd.functional.jacobian(flow_map, x[b])
        _, brute = torch.linalg.slogdet(jac)
        assert abs(float((logdet[b] - brute).detach())) < 1e-6


def test_density_of_random_cnf_integrates_to_one() -> None:
    """An untrained (random) 2-D CNF is a density: its mass on a large grid is 1."""
    net = random_mlp(dim=2, seed=4, hidden=(8, 8))
    flow = SequentialFlow([CNF(net, time_length=0.5, solver=SolverConfig(rtol=1e-6, atol=1e-6))])
    model = FFJORD(flow.to(DTYPE), (2,), settings=ODESettings(flow.flows[0].solver)).eval()
    lim, n = 7.0, 141
    xs = torch.linspace(-lim, lim, n, dtype=DTYPE)
    grid = torch.cartesian_prod(xs, xs)
    with torch.no_grad():
        p = model.log_prob(grid).exp()
    mass = float(p.sum() * (xs[1] - xs[0]) ** 2)
    assert abs(mass - 1) < 5e-3, mass


def test_sample_is_the_reverse_solve() -> None:
    net = random_mlp(dim=2, seed=5)
    model = FFJORD(
        SequentialFlow([CNF(net, time_length=0.6, solver=TIGHT)]).to(DTYPE),
        (2,),
        settings=ODESettings(TIGHT, DivergenceConfig("exact")),
    )
    x, stats = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert stats["nfe"] > 0
    eps = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    z, _ = model.flow.eval()(x)
    torch.testing.assert_close(z, eps, rtol=0, atol=1e-6)
    out = model.evaluate(x)
    torch.testing.assert_close(-out.nll, model.log_prob(x).detach(), rtol=0, atol=1e-9)


def ffjord(cfg: dict, eval_solver: SolverConfig = TIGHT) -> FFJORD:
    """An FFJORD model from a ``model:`` section given as a dict (missing keys: defaults)."""
    from omegaconf import OmegaConf

    section = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FFJORDSchema), cfg))
    return build_ffjord(section, (2,), ODESettings(eval_solver, DivergenceConfig("exact")))


def _grads(model_fn, params: list[Tensor], x: Tensor) -> list[Tensor]:
    x = x.clone().requires_grad_(True)
    for p in params:
        p.grad = None
    loss = model_fn(x)
    loss.backward()
    return [p.grad.clone() for p in params] + [x.grad.clone()]


def _rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_adjoint_gradients_match_backprop(divergence: str) -> None:
    net = random_mlp(dim=2, seed=6, hidden=(8, 8))
    params = list(net.parameters())
    x = data(n=8, d=2, seed=7)

    def loss_fn(solver: SolverConfig):
        def fn(xx: Tensor) -> Tensor:
            est = (
                ExactDivergence()
                if divergence == "exact"
                else HutchinsonDivergence("rademacher", generator=torch.Generator().manual_seed(3))
            )
            sol = integrate(
                net, xx, t1=0.9, solver=solver, divergence=est, kinetic=True, jacobian=True
            )
            logp = standard_normal_logprob(sol.z) + sol.logdet
            regs = sol.regularizers
            return -logp.mean() + 0.1 * regs["kinetic"].mean() + 0.1 * regs["jacobian"].mean()

        return fn

    base = SolverConfig(name="dopri5", rtol=1e-9, atol=1e-9)
    ref = _grads(loss_fn(base), params, x)
    for adj in (base.with_(adjoint=True), base.with_(adjoint=True, seminorm=True)):
        got = _grads(loss_fn(adj), params, x)
        for g, r in zip(got, ref):
            assert r.abs().max() > 0
            assert _rel_err(g, r) < 1e-4, (adj, _rel_err(g, r))


class TimeSpy(nn.Module):
    """Wraps a field and records every time it is evaluated at."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field, self.times = field, []

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        self.times.append(t)
        return self.field(t, z)


def test_backprop_step_sizes_are_constants_of_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller's norm is torchdiffeq's mixed norm on detached tensors.

    Bit-for-bit the same solve (states, log-determinant, NFE) as torchdiffeq's
    own norm, but no evaluation time depends on the parameters; with
    torchdiffeq's norm the step sizes, and so the times, do.
    """
    from torchdiffeq._impl.misc import _mixed_norm

    torch.manual_seed(4)
    net = TimeSpy(random_mlp(dim=2, seed=4, hidden=(16,)))
    x = data(n=16, d=2, seed=5)
    solver = SolverConfig(name="dopri5", rtol=1e-6, atol=1e-6)
    ours = integrate(net, x, t1=0.8, solver=solver, divergence=ExactDivergence())
    ours_times = net.times
    assert ours_times and not any(t.requires_grad for t in ours_times)
    net.times = []
    monkeypatch.setattr(solve_module, "controller_norm", _mixed_norm)
    theirs = integrate(net, x, t1=0.8, solver=solver, divergence=ExactDivergence())
    assert any(t.requires_grad for t in net.times)
    assert torch.equal(ours.z, theirs.z) and torch.equal(ours.logdet, theirs.logdet)
    assert ours.stats.nfe_forward == theirs.stats.nfe_forward
    assert [float(t.detach()) for t in ours_times] == [float(t.detach()) for t in net.times]


@pytest.mark.parametrize("seminorm", [False, True])
def test_adjoint_fixed_step_matches_backprop(seminorm: bool) -> None:
    """With a fixed-step method the adjoint's backward solve uses the same steps."""
    net = random_mlp(dim=2, seed=8, hidden=(8,))
    params = list(net.parameters())
    x = data(n=4, d=2)
    solver = SolverConfig(name="rk4", steps=8)

    def fn(s: SolverConfig):
        return lambda xx: integrate(net, xx, solver=s, divergence=ExactDivergence()).logdet.sum()

    ref = _grads(fn(solver), params, x)
    adj = solver.with_(adjoint=True, seminorm=seminorm)
    got = _grads(fn(adj), params, x)
    sol = integrate(net, x, solver=adj, divergence=ExactDivergence())
    sol.logdet.sum().backward()
    assert sol.stats.nfe_backward == 4 * 8
    for g, r in zip(got, ref):
        # Discrete backprop and the discretised adjoint differ by O(h⁴).
        assert _rel_err(g, r) < 1e-4


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_adjoint_stack_with_batch_norm_matches_backprop(divergence: str) -> None:
    """CNF blocks after batch norm see inputs that require grad; the adjoint must cope."""
    cfg: dict = {}
    cfg.update(
        hidden_dims=[8],
        zero_init=False,
        num_blocks=2,
        batch_norm=True,
        divergence={"name": divergence},
        kinetic=0.1,
        jacobian=0.1,
    )
    x = 1 + 2 * data(n=16, d=2, seed=4)
    grads = []
    for adjoint in (False, True):
        cfg["solver"] = {"name": "dopri5", "rtol": 1e-9, "atol": 1e-9, "adjoint": adjoint}
        torch.manual_seed(0)
        model = ffjord(cfg).to(DTYPE).train()
        torch.manual_seed(1)  # the same Hutchinson probes in both runs
        out = model.training_loss(x)
        out.loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if adjoint:
            assert out.after_backward()["nfe_backward"] > 0
    for g, r in zip(*grads):
        assert _rel_err(g, r) < 1e-4


@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
def test_learned_T_gets_the_closed_form_gradient(adjoint: bool) -> None:
    """d/dT of log p(x) for dz/dt = Az is −zᵀAz + tr(A), with z = expm(AT)x."""
    a, T = fixed_matrix(seed=2), 0.7
    cnf = CNF(
        LinearField(a),
        time_length=T,
        learn_time=True,
        solver=TIGHT.with_(adjoint=adjoint),
    ).to(DTYPE)
    assert isinstance(cnf.log_T, nn.Parameter)
    x = data(n=5, d=3)
    z, logdet = cnf(x)
    logp = standard_normal_logprob(z) + logdet
    logp.sum().backward()
    zt = x @ torch.linalg.matrix_exp(a * T).T
    dlogp_dT = -((zt @ a.T) * zt).sum(1) + a.trace()
    expected = float((dlogp_dT * T).sum())  # the parameter is log T
    assert cnf.log_T.grad is not None and abs(float(cnf.log_T.grad)) > 1e-3
    assert float(cnf.log_T.grad) == pytest.approx(expected, rel=1e-6)


def test_learned_T_backprop_and_adjoint_agree_for_mlp() -> None:
    x = data(n=8, d=2, seed=9)
    grads = []
    for adjoint in (False, True):
        cnf = CNF(
            random_mlp(dim=2, seed=10, hidden=(8, 8)),
            time_length=0.5,
            learn_time=True,
            solver=SolverConfig(rtol=1e-9, atol=1e-9, adjoint=adjoint),
            kinetic=True,
        ).to(DTYPE)
        out = cnf.transform(x, FlowSettings(regularize=True))
        loss = (
            -(standard_normal_logprob(out.z) + out.logdet).mean()
            + out.regularizers["kinetic"].mean()
        )
        loss.backward()
        grads.append(cnf.log_T.grad.clone())
    assert grads[0].abs() > 1e-4
    assert _rel_err(grads[1], grads[0]) < 1e-4


def test_T_is_not_learned_by_default() -> None:
    cnf = CNF(random_mlp(), time_length=0.5)
    assert cnf.log_T is None
    assert "log_T" not in dict(cnf.named_parameters())
    assert float(cnf.T) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="time_length"):
        CNF(random_mlp(), time_length=0.0)


# ---------------------------------------------------------------- RNODE
def _simpson(y: Tensor, t: Tensor) -> Tensor:
    """Composite Simpson's rule along dim 0 (an even number of uniform intervals)."""
    h = t[1] - t[0]
    w = torch.ones(len(t), dtype=y.dtype)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return (w[:, None] * y).sum(0) * h / 3


def test_regulariser_states_equal_quadrature_along_trajectory() -> None:
    net = random_mlp(dim=2, seed=11)
    x = data(n=5, d=2)
    T = 0.8
    sol = integrate(
        net, x, t1=T, solver=TIGHT, divergence=ExactDivergence(), kinetic=True, jacobian=True
    )
    times = torch.linspace(0, T, 401, dtype=DTYPE)
    traj = integrate(net, x, t1=T, solver=TIGHT, times=times).trajectory
    assert traj.shape == (401, 5, 2)
    # Brute force on every (time, sample) pair at once: one autograd pass per output row.
    zs = traj.reshape(-1, 2).detach().requires_grad_(True)
    ts = times.repeat_interleave(5)
    f = net(ts, zs)
    rows = [torch.autograd.grad(f[:, i].sum(), zs, retain_graph=True)[0] for i in range(2)]
    frob2 = torch.stack(rows, 1).pow(2).sum((1, 2)).reshape(401, 5)
    speed2 = f.pow(2).sum(1).reshape(401, 5)
    kinetic = _simpson(speed2, times)
    jacobian = _simpson(frob2, times)
    torch.testing.assert_close(sol.regularizers["kinetic"], kinetic.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(sol.regularizers["jacobian"], jacobian.detach(), rtol=1e-6, atol=0)
    # Integrated over |dt|: a reverse solve gives the same positive integral.
    back = integrate(net, sol.z, t0=T, t1=0.0, solver=TIGHT, kinetic=True)
    torch.testing.assert_close(back.regularizers["kinetic"], kinetic.detach(), rtol=1e-5, atol=0)


def test_jacobian_regulariser_needs_a_divergence() -> None:
    with pytest.raises(ValueError, match="divergence"):
        integrate(random_mlp(), data(), solver=TIGHT, jacobian=True)


def test_trajectory_starts_at_x_and_ends_at_z() -> None:
    net = random_mlp(dim=2, seed=12)
    cnf = CNF(net, time_length=0.6, solver=SolverConfig(rtol=1e-9, atol=1e-9)).to(DTYPE)
    x = data(n=4, d=2)
    z, _ = cnf(x)
    times = torch.tensor([0.0, 0.1, 0.25, 0.6], dtype=DTYPE)
    traj = cnf.solve(x, times=times).trajectory
    assert traj.shape == (4, 4, 2)
    torch.testing.assert_close(traj[0], x, rtol=0, atol=1e-12)
    torch.testing.assert_close(traj[-1], z, rtol=0, atol=1e-7)
    # An intermediate state, continued to T, ends at z(T) too.
    rest = integrate(net, traj[2], t0=0.25, t1=0.6, solver=cnf.solver).z
    torch.testing.assert_close(rest, z, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="times"):
        cnf.solve(x, times=torch.tensor([0.5, 0.1], dtype=DTYPE))


# ------------------------------------------------------ moving batch norm
def test_moving_batch_norm_round_trip_and_logdet() -> None:
    bn = MovingBatchNorm(3).to(DTYPE)
    with torch.no_grad():
        bn.log_gamma.copy_(torch.tensor([0.3, -0.2, 0.1]))
        bn.beta.copy_(torch.tensor([1.0, -1.0, 0.5]))
    g = torch.Generator().manual_seed(0)
    loc, scale = (
        torch.tensor([2.0, -1.0, 0.0], dtype=DTYPE),
        torch.tensor([3.0, 0.5, 1.0], dtype=DTYPE),
    )
    bn.train()
    first = loc + scale * torch.randn(64, 3, generator=g, dtype=DTYPE)
    bn(first)
    # One update from (0, 1) with momentum 0.1.
    torch.testing.assert_close(bn.running_mean, 0.1 * first.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * first.var(0, unbiased=False))
    for _ in range(200):
        bn(loc + scale * torch.randn(256, 3, generator=g, dtype=DTYPE))
    torch.testing.assert_close(bn.running_mean, loc, rtol=0, atol=0.15)
    torch.testing.assert_close(bn.running_var.sqrt(), scale, rtol=0.1, atol=0)

    bn.eval()
    x = loc + scale * torch.randn(7, 3, generator=g, dtype=DTYPE)
    z, logdet = bn(x)
    torch.testing.assert_close(bn.inverse(z), x, rtol=0, atol=1e-12)
    for b in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: bn(v[None])[0][0], x[b])
        torch.testing.assert_close(logdet[b], torch.linalg.slogdet(jac)[1], rtol=0, atol=1e-10)
    # Eval mode uses the running averages: the map does not change with the batch.
    z2, _ = bn(x[:3])
    torch.testing.assert_close(z2, z[:3])


def test_cnf_stack_with_batch_norm_is_a_bijection() -> None:
    cfg: dict = {}
    cfg.update(
        hidden_dims=[8],
        zero_init=False,
        num_blocks=2,
        batch_norm=True,
        time_length=0.5,
        solver={"name": "dopri5", "rtol": 1e-9, "atol": 1e-9},
    )
    torch.manual_seed(0)
    model = ffjord(cfg).to(DTYPE)
    assert sum(isinstance(f, MovingBatchNorm) for f in model.flow.flows) == 3
    model.train()
    model.training_loss(3 + 2 * data(n=64, d=2))  # moves the running statistics
    model.eval()
    x = data(n=4, d=2, seed=3)
    z, logdet = model.flow(x)
    torch.testing.assert_close(model.flow.inverse(z), x, rtol=0, atol=1e-6)
    for b in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: model.flow(v[None])[0][0], x[b])
        assert abs(float(logdet[b].detach() - torch.linalg.slogdet(jac)[1])) < 1e-6


# ------------------------------------------------------- solver settings, NFE
def test_solver_config_rejects_unknown_method_listing_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        SolverConfig(name="nosuch")
    msg = str(info.value)
    assert "nosuch" in msg and "\n" not in msg
    for name in ("dopri5", "rk4", "euler", "midpoint"):
        assert name in msg
    assert {"dopri5", "rk4", "euler"} <= set(METHODS)
    with pytest.raises(ValueError, match="steps"):
        SolverConfig(name="rk4")
    with pytest.raises(ValueError, match="rtol"):
        SolverConfig(name="dopri5", rtol=0.0)


def test_solver_describe_reports_relevant_settings() -> None:
    assert SolverConfig(name="rk4", steps=8).describe() == {
        "name": "rk4",
        "steps": 8,
        "adjoint": False,
    }
    d = SolverConfig(adjoint=True, seminorm=True).describe()
    assert d["name"] == "dopri5" and d["seminorm"] is True and "steps" not in d


@pytest.mark.parametrize("adjoint", [False, True], ids=["backprop", "adjoint"])
def test_nfe_counters(adjoint: bool) -> None:
    net = random_mlp(dim=2, seed=13, hidden=(8,))
    x = data(n=4, d=2)
    sol = integrate(
        net,
        x,
        solver=SolverConfig(rtol=1e-6, atol=1e-6, adjoint=adjoint),
        divergence=ExactDivergence(),
    )
    assert sol.stats.nfe_forward > 0
    assert sol.stats.nfe_backward == 0  # nothing re-evaluated yet
    sol.logdet.sum().backward()
    if adjoint:
        assert sol.stats.nfe_backward > 0
    else:
        assert sol.stats.nfe_backward == 0
    assert sol.stats.as_dict() == {
        "nfe_forward": sol.stats.nfe_forward,
        "nfe_backward": sol.stats.nfe_backward,
    }


def test_ffjord_model_reports_nfe_and_eval_settings() -> None:
    cfg: dict = {}
    cfg.update(hidden_dims=[8], zero_init=False, solver={"name": "rk4", "steps": 3}, kinetic=0.1)
    torch.manual_seed(0)
    model = ffjord(cfg, SolverConfig(rtol=1e-6, atol=1e-6)).to(DTYPE)
    x = data(n=16, d=2)
    out = model.training_loss(x)
    assert out.stats["nfe_forward"] == 12  # rk4: 4 evaluations per step, 3 steps
    assert out.stats["kinetic"] > 0
    out.loss.backward()
    assert out.after_backward() == {"nfe_backward": 0}
    ev = model.evaluate(x)
    assert ev.stats["nfe"] > 0 and ev.stats["nfe"] % 6 == 2  # dopri5: 6 per step + 2 (FSAL, init)
    ev_rk = model.evaluate(x, model.with_settings(method="rk4", steps=2))
    assert ev_rk.stats["nfe"] == 8
    # Settings are per call: the next evaluation is the default again.
    assert model.evaluate(x).stats["nfe"] == ev.stats["nfe"]
    np.testing.assert_allclose(model.evaluate(x).nll.numpy(), ev.nll.numpy(), rtol=0, atol=0)
