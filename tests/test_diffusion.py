"""Mathematical checks of the score-based diffusion machinery (docs/methods.md §4).

Time convention: data at t = 0, noise at t = 1. Most checks plug in the
**exact score of Gaussian data** ``N(μ, Σ)``: for a linear SDE the marginals
stay Gaussian, ``p_t = N(m(t) μ, m(t)² Σ + σ(t)² I)``, so the score, the
probability-flow ODE model's density and the expected DSM integrand are all
closed forms. Float64, seeded, one thread.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import math
from pathlib import Path

import pytest
import torch
from conftest import build_family

from cnf.diffusion import (
    SCORE_SAMPLERS,
    SamplerOptions,
    build_sde,
    decoder_constant,
    dsm_loss,
    euler_maruyama,
    nelbo,
    output_to_score,
    predictor_corrector,
    prior_kl,
    probability_flow_nll,
    probability_flow_sample,
    score_to_output,
    sdeint_sample,
)
from cnf.diffusion.likelihood import ProbabilityFlow
from cnf.diffusion.nets import ScoreNetwork, score_mlp
from cnf.diffusion.samplers import langevin_alpha, langevin_step, time_grid
from cnf.diffusion.score import cv_integral, sample_time
from cnf.diffusion.unet import UNet
from cnf.divergence import ExactDivergence, HutchinsonDivergence
from cnf.solve import SolverConfig

torch.set_num_threads(1)
DT = torch.float64
REPO = Path(__file__).resolve().parent.parent

SDE_CASES = {
    "vp": {},
    "subvp": {},
    "ve": {"sigma_max": 100.0},
}


def make_sde(name: str, **kw):
    return build_sde(name, **{**SDE_CASES[name], **kw})


class GaussianData:
    """Exact marginal scores and densities for data ``N(μ, Σ)`` under a linear SDE."""

    def __init__(self, mu, cov, sde):
        self.mu = torch.as_tensor(mu, dtype=DT)
        self.cov = torch.as_tensor(cov, dtype=DT)
        self.sde = sde
        self.lam, self.U = torch.linalg.eigh(self.cov)

    def sample(self, n, gen):
        z = torch.randn(n, len(self.mu), generator=gen, dtype=DT)
        return self.mu + z @ torch.linalg.cholesky(self.cov).T

    def _m(self, t, x):
        t = torch.as_tensor(t, dtype=DT).expand(x.shape[0])
        return t, self.sde.marginal(t)[0].reshape(-1, 1)

    def eig(self, t):
        """Eigenvalues of ``C_t = m²Σ + σ²I`` (shape ``(B, D)``) in Σ's eigenbasis."""
        m, s = self.sde.marginal(t)
        return m.reshape(-1, 1) ** 2 * self.lam + s.reshape(-1, 1) ** 2

    def score(self, t, x):
        t, m = self._m(t, x)
        r = (x - m * self.mu) @ self.U
        return -(r / self.eig(t)) @ self.U.T

    def log_prob(self, t, x):
        t, m = self._m(t, x)
        r = (x - m * self.mu) @ self.U
        c = self.eig(t)
        return -0.5 * (r**2 / c).sum(1) - 0.5 * torch.log(2 * math.pi * c).sum(1)

    def ode_model_log_prob(self, x, eps):
        """Exact density at ε of the probability-flow model started from the prior π.

        With the exact score the flow map is affine and diagonal in Σ's
        eigenbasis, ``r_1 = r_ε √(c_1/c_ε)``; π differs from p_1 slightly, so
        this is the model's density, not p_ε.
        """
        b = x.shape[0]
        te, t1 = torch.full((b,), eps, dtype=DT), torch.ones(b, dtype=DT)
        me, m1 = self.sde.marginal(te)[0], self.sde.marginal(t1)[0]
        r = (x - me.reshape(-1, 1) * self.mu) @ self.U
        ce, c1 = self.eig(te), self.eig(t1)
        x1 = (r * torch.sqrt(c1 / ce)) @ self.U.T + m1.reshape(-1, 1) * self.mu
        return self.sde.prior_log_prob(x1) + 0.5 * torch.log(c1 / ce).sum(1)

    def dsm_integrand(self, ts, x0):
        """``E_z ‖s*(x_t) + z/σ‖²`` given ``x_0`` (B, D) at times ``ts`` (T,), shape ``(T, B)``.

        ``s*(x_t) + z/σ = −m C_t⁻¹(x_0 − μ) + (I/σ − σ C_t⁻¹) z`` in closed form.
        """
        m, s = self.sde.marginal(ts)
        inv = 1 / self.eig(ts)  # (T, D)
        r0 = (x0 - self.mu) @ self.U  # (B, D)
        mean_part = m.reshape(-1, 1) ** 2 * torch.einsum("td,bd->tb", inv**2, r0**2)
        noise_part = ((1 / s.reshape(-1, 1) - s.reshape(-1, 1) * inv) ** 2).sum(1, keepdim=True)
        return mean_part + noise_part

    def nelbo_quadrature(self, x0, *, n=20001):
        """The NELBO with its score term integrated by the trapezoid rule in log t."""
        sde = self.sde
        ts = torch.logspace(math.log10(sde.eps), 0.0, n, dtype=DT)
        vals = (sde.g2(ts) * ts).reshape(-1, 1) * self.dsm_integrand(ts, x0)
        score_term = 0.5 * torch.trapezoid(vals, torch.log(ts), dim=0)
        return prior_kl(sde, x0) + score_term + decoder_constant(sde, x0.shape[1])


# Heavier checks run VP and VE by default; sub-VP (same drift as VP) is marked slow.
ALL_SDES = ["vp", pytest.param("subvp", marks=pytest.mark.slow), "ve"]

MU = [1.0, -0.5]
COV = [[1.0, 0.3], [0.3, 0.5]]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ the SDEs
@pytest.mark.parametrize("name", ALL_SDES)
def test_marginals_match_euler_maruyama(name):
    """m(t) and σ(t) agree with a forward Euler–Maruyama simulation of the SDE."""
    sde = make_sde(name, **({"sigma_max": 5.0} if name == "ve" else {}))
    g = gen(1)
    n, steps = 12000, 600
    x0 = torch.tensor([1.5, -0.7], dtype=DT)
    x = x0.expand(n, 2).clone()
    checkpoints = {150: None, 300: None, 600: None}
    dt = torch.tensor(1.0 / steps, dtype=DT)
    for i in range(steps):
        t = torch.tensor(i / steps, dtype=DT)
        x = (
            x
            + sde.drift(t, x) * dt
            + sde.g(t) * dt.sqrt() * torch.randn(x.shape, generator=g, dtype=DT)
        )
        if i + 1 in checkpoints:
            checkpoints[i + 1] = x.clone()
    for k, xs in checkpoints.items():
        t = torch.tensor(k / steps, dtype=DT)
        m, s = sde.marginal(t)
        mean_se = s / math.sqrt(n)
        assert torch.allclose(xs.mean(0), m * x0, atol=float(5 * mean_se + 0.003 * s)), (name, k)
        var = xs.var(0)
        # Var of a sample variance ≈ 2σ⁴/n; EM adds an O(Δt) bias (≈ βΔt/4 ≈ 0.6% for VP).
        tol = 5 * math.sqrt(2 / n) * float(s**2) + 0.01 * float(s**2)
        assert torch.allclose(var, (s**2).expand(2), atol=tol), (name, k, var, s**2)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_kernel_variance_ode_and_coefficients(name):
    """``dσ²/dt = 2fσ² + g²`` and ``m' = f m`` hold (finite differences), and σ(0) = 0."""
    sde = make_sde(name)
    t = torch.linspace(0.01, 0.99, 50, dtype=DT)
    h = 1e-6
    m_p, s_p = sde.marginal(t + h)
    m_m, s_m = sde.marginal(t - h)
    m, s = sde.marginal(t)
    dvar = (s_p**2 - s_m**2) / (2 * h)
    dm = (m_p - m_m) / (2 * h)
    assert torch.allclose(dvar, 2 * sde.f(t) * s**2 + sde.g2(t), rtol=1e-6)
    assert torch.allclose(dm, sde.f(t) * m, rtol=1e-6, atol=1e-12)
    assert float(sde.marginal(torch.tensor(0.0, dtype=DT))[1]) == 0.0


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_importance_sampler_inverse_cdf(name):
    """t ~ q ∝ g²/σ²: the closed-form CDF inverts exactly and matches numerical quadrature."""
    sde = make_sde(name)
    u = torch.linspace(0.0, 1.0, 101, dtype=DT)
    t = sde.sample_importance_time(101, u=u, dtype=DT)
    assert t[0] == pytest.approx(sde.eps, rel=1e-9) and t[-1] == pytest.approx(1.0, rel=1e-9)
    assert (t.diff() > 0).all()
    # Numerical CDF of q at the returned times must give back u.
    grid = torch.logspace(math.log10(sde.eps), 0, 200001, dtype=DT)
    dens = sde.importance_density(grid)
    cdf = torch.cat(
        [torch.zeros(1, dtype=DT), torch.cumulative_trapezoid(dens * grid, torch.log(grid))]
    )
    assert float(cdf[-1]) == pytest.approx(1.0, abs=1e-6)
    idx = torch.searchsorted(grid, t[1:-1])
    assert torch.allclose(cdf[idx], u[1:-1], atol=1e-4)


def test_sde_registry_errors():
    with pytest.raises(ValueError, match="unknown SDE 'vpp'; valid: subvp, ve, vp"):
        build_sde("vpp")
    with pytest.raises(ValueError, match="SDE 'vp'.*'beta'"):
        build_sde("vp", beta=1.0)
    # Each SDE takes its own options only: a VP option given to VE is an error, not ignored.
    assert build_sde("ve", sigma_max=4.0).sigma_max == 4.0
    with pytest.raises(ValueError, match="SDE 've'.*'beta_min'"):
        build_sde("ve", sigma_max=4.0, beta_min=0.3)


def test_prior_and_kl_closed_forms():
    sde = make_sde("ve", sigma_max=7.0)
    z = torch.randn(5, 3, generator=gen(), dtype=DT)
    ref = torch.distributions.Normal(0.0, 7.0).log_prob(z).sum(1)
    assert torch.allclose(sde.prior_log_prob(z), ref)
    # KL(N(m1 x0, σ1²) ‖ π) against torch.distributions.
    x0 = torch.randn(5, 3, generator=gen(1), dtype=DT)
    m1, s1 = sde.marginal(torch.tensor(1.0, dtype=DT))
    q = torch.distributions.Normal(m1 * x0, s1)
    p = torch.distributions.Normal(torch.zeros_like(x0), torch.full_like(x0, 7.0))
    assert torch.allclose(prior_kl(sde, x0), torch.distributions.kl_divergence(q, p).sum(1))


# ---------------------------------------------------------------- the losses
@pytest.mark.parametrize("name", ["vp", "ve"])
@pytest.mark.parametrize("weighting", ["variance", "likelihood_is"])
def test_dsm_minimised_by_exact_score(name, weighting):
    """E[DSM(s* + δh)] − E[DSM(s*)] = ½∫λ E‖δh‖² > 0 and the directional derivative is 0."""
    sde = make_sde(name)
    data = GaussianData(MU, COV, sde)
    n = 100000
    x0 = data.sample(n, gen(2))
    t, _ = sample_time(sde, n, weighting=weighting, generator=gen(3), dtype=DT)
    z = torch.randn(x0.shape, generator=gen(4), dtype=DT)

    def loss(delta, h):
        fn = lambda tt, x: data.score(tt, x) + delta * h(tt, x)  # noqa: E731
        return dsm_loss(fn, sde, x0, weighting=weighting, t=t, noise=z)

    base = loss(0.0, lambda tt, x: 0 * x)
    for h in (lambda tt, x: torch.ones_like(x), lambda tt, x: x, lambda tt, x: torch.sin(x)):
        d = loss(0.3, h) - base
        d_neg = loss(-0.3, h) - base
        # Second-order term (the same for ±δ) dominates; first-order one averages to 0.
        quad, lin = 0.5 * (d + d_neg), 0.5 * (d - d_neg)
        assert quad.mean() > 0
        assert abs(float(lin.mean())) < 4 * float(lin.std()) / math.sqrt(n)
        assert (d.mean() > 0) and (d_neg.mean() > 0)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_importance_sampled_and_plain_likelihood_weighting_agree(name):
    """Both estimate J_{g²} = ½∫_ε^1 g² E‖s − ∇log p_{0t}‖² dt; compared with quadrature."""
    eps = 1e-2  # plain uniform-t weighting has variance ~1/ε; a larger ε keeps the test fast
    sde = make_sde(name, eps=eps)
    data = GaussianData(MU, COV, sde)
    fn = lambda t, x: 0.8 * data.score(t, x)  # noqa: E731 - a deliberately imperfect score
    n = 400000
    x0 = data.sample(n, gen(5))
    est = {}
    for w in ("likelihood", "likelihood_is"):
        v = dsm_loss(fn, sde, x0, weighting=w, generator=gen(6))
        est[w] = (float(v.mean()), float(v.std()) / math.sqrt(n))
    # Reference by quadrature. With x_t = m x_0 + σ z ~ p_t and Stein's lemma,
    # E‖a s* + z/σ‖² = a² E‖s*‖² + 2a E[∇·s*] + D/σ² = (a² − 2a) tr(C_t⁻¹) + D/σ².
    ts = torch.logspace(math.log10(eps), 0, 20001, dtype=DT)
    tr_inv = (1 / data.eig(ts)).sum(1)
    integrand = sde.g2(ts) * ((0.64 - 1.6) * tr_inv + 2 / sde.marginal(ts)[1] ** 2)
    ref = 0.5 * float(torch.trapezoid(integrand * ts, torch.log(ts)))
    (a, sa), (b, sb) = est["likelihood"], est["likelihood_is"]
    assert sb < sa  # importance sampling reduces the variance
    assert abs(a - b) < 4 * math.hypot(sa, sb), (a, b, sa, sb)
    assert abs(b - ref) < 4 * sb + 0.01 * abs(ref), (b, ref, sb)


# ---------------------------------------------------------------- likelihood
@pytest.mark.parametrize("name", ALL_SDES)
def test_probability_flow_nll_exact_score(name):
    """Probability-flow NLL = the ODE model's analytic NLL (and, for centred data, the data NLL)."""
    sde = make_sde(name)
    solver = SolverConfig("dopri5", rtol=1e-8, atol=1e-8)
    # Off-centre data: against the exact density of the model (π ≠ p_1 is accounted for).
    data = GaussianData(MU, COV, sde)
    x = data.sample(64, gen(8))
    nll, info = probability_flow_nll(data.score, sde, x, solver=solver)
    assert info["nfe"] > 0
    assert (nll + data.ode_model_log_prob(x, sde.eps)).abs().max() < 1e-5
    # Centred data: p_1 ≈ π, so the model density is the data density to 1e-3 nats/dim.
    data0 = GaussianData([0.0, 0.0], COV, sde)
    x = data0.sample(64, gen(9))
    nll, _ = probability_flow_nll(data0.score, sde, x, solver=solver)
    assert (nll + data0.log_prob(0.0, x)).abs().max() / 2 < 1e-3


def _count_jacobian_calls(monkeypatch):
    """Count ``ScoreNetwork.score_with_jacobian`` calls and forbid ``torch.autograd.grad``."""
    calls = {"jacobian": 0}
    real = ScoreNetwork.score_with_jacobian

    def counted(self, t, x):
        calls["jacobian"] += 1
        return real(self, t, x)

    def no_grad_call(*args, **kwargs):
        raise AssertionError("torch.autograd.grad called: the forward-mode path was not taken")

    monkeypatch.setattr(ScoreNetwork, "score_with_jacobian", counted)
    monkeypatch.setattr(torch.autograd, "grad", no_grad_call)
    return calls


def test_exact_divergence_takes_the_probability_flow_jacobian(monkeypatch):
    """ExactDivergence on the probability-flow field: forward-mode Jacobian, no autograd.grad."""
    sde = make_sde("vp")
    torch.manual_seed(0)
    net = score_mlp(3, hidden_dims=(16, 16), activation="tanh", embed_scale=1.0).to(DT)
    field = ProbabilityFlow(ScoreNetwork(net, sde, "noise"), sde)
    x = torch.randn(5, 3, dtype=DT, generator=gen(1))
    t = torch.tensor(0.4, dtype=DT)
    xr = x.clone().requires_grad_(True)
    fr = field(t, xr)
    rows = torch.stack(
        [torch.autograd.grad(fr[:, j].sum(), xr, retain_graph=True)[0] for j in range(3)], 1
    )  # rows[b, j, i] = ∂f_j/∂x_i (brute force, before autograd.grad is forbidden)
    calls = _count_jacobian_calls(monkeypatch)
    f, div, frob = ExactDivergence().evaluate(field, t, x, None, frobenius=True)
    assert calls["jacobian"] == 1
    torch.testing.assert_close(f, fr.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div, rows.diagonal(dim1=1, dim2=2).sum(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(frob, rows.pow(2).sum((1, 2)), rtol=1e-10, atol=1e-12)


def test_score_model_nll_fast_path_equals_autograd_path(monkeypatch):
    """A score model's probability-flow NLL (float64): forward-mode trace = autograd trace."""
    torch.manual_seed(3)
    model = build_family(
        "score", {"net": {"name": "mlp", "hidden_dims": [16, 16]}, "nelbo_samples": 0}
    ).to(DT)
    x = torch.randn(16, 2, dtype=DT, generator=gen(5))
    cost = model.with_settings(rtol=1e-9, atol=1e-9)
    with monkeypatch.context() as mp:
        calls = _count_jacobian_calls(mp)
        fast = model.evaluate(x, cost)
        assert calls["jacobian"] > 0  # one per function evaluation
        assert calls["jacobian"] == fast.stats["nfe"]
    with monkeypatch.context() as mp:  # hide the Jacobian: the autograd path
        mp.setattr(ScoreNetwork, "has_jacobian", property(lambda self: False))
        slow = model.evaluate(x, cost)
    torch.testing.assert_close(fast.nll, slow.nll, rtol=1e-9, atol=1e-9)


def test_probability_flow_hutchinson_and_jacobian_paths():
    """Hutchinson averages to the exact trace; the forward-mode Jacobian path equals autograd."""
    sde = make_sde("vp")
    torch.manual_seed(0)
    net = score_mlp(3, hidden_dims=(16, 16), activation="tanh", embed_scale=1.0).to(DT)
    for p in ("score", "noise", "data"):
        score = ScoreNetwork(net, sde, p, conditioning="log_sigma")
        field = ProbabilityFlow(score, sde)
        x = torch.randn(6, 3, dtype=DT)
        t = torch.tensor(0.3, dtype=DT)
        f, jac = field.forward_with_jacobian(t, x)
        xr = x.clone().requires_grad_(True)
        fr = field(t, xr)
        rows = torch.stack(
            [torch.autograd.grad(fr[:, j].sum(), xr, retain_graph=True)[0] for j in range(3)], 2
        )  # rows[b, i, j] = ∂f_j/∂x_i
        assert torch.allclose(f, fr)
        assert torch.allclose(jac.transpose(0, 1), rows, atol=1e-10)
    # Hutchinson (many Rademacher probes, drawn once per solve) against the exact trace.
    sde = make_sde("vp", eps=1e-3)
    score = ScoreNetwork(net, sde, "score", conditioning="log_sigma")
    solver = SolverConfig("dopri5", rtol=1e-6, atol=1e-6)
    x = torch.randn(4, 3, generator=gen(10), dtype=DT)
    exact, _ = probability_flow_nll(score, sde, x, solver=solver, divergence=ExactDivergence())
    # 200 copies of each point, one probe each: per-point mean and standard error.
    k = 200
    hutch, _ = probability_flow_nll(
        score,
        sde,
        x.repeat(k, 1),
        solver=solver,
        divergence=HutchinsonDivergence("rademacher", generator=gen(11)),
    )
    hutch = hutch.detach().reshape(k, -1)
    se = hutch.std(0) / math.sqrt(k)
    assert ((hutch.mean(0) - exact.detach()).abs() < 4 * se + 1e-4).all()


def test_score_model_reports_the_nll_once_per_probe():
    """Hutchinson evaluation of a score model: per-probe NLLs (B, K) whose row mean is the NLL,
    centred on the exact-trace NLL within 4 of their own standard errors; none when exact."""
    from cnf.metrics import probe_stderr

    torch.manual_seed(3)
    model = build_family(
        "score", {"net": {"name": "mlp", "hidden_dims": [16, 16]}, "nelbo_samples": 0}
    ).to(DT)
    x = torch.randn(6, 2, dtype=DT, generator=gen(5))
    tight = {"solver.rtol": 1e-8, "solver.atol": 1e-8}
    exact = model.evaluate(x, {**tight, "divergence.name": "exact"})
    assert exact.nll_probes is None
    torch.manual_seed(4)
    hutch = model.evaluate(x, {**tight, "divergence.name": "hutchinson", "num_probes": 32})
    assert hutch.nll_probes.shape == (6, 32)
    torch.testing.assert_close(hutch.nll_probes.mean(1), hutch.nll, rtol=1e-12, atol=1e-12)
    se = probe_stderr(hutch.nll_probes)
    assert se > 1e-4  # the probes really are noisy: agreement is not by construction
    assert abs(float((hutch.nll - exact.nll).mean())) < 4 * se


@pytest.mark.parametrize("name", ALL_SDES)
def test_uniform_time_nelbo_is_unbiased_with_a_small_spread(name):
    """``nelbo(importance=False)``: uniform t, same expectation, finite (small) variance.

    With the plain weight ``(1 − ε) g²/σ² ~ 1/t`` the estimate had variance
    ~ 1/ε and scattered over nats between seeds; with the exact integral of
    its ``½ w c ‖z‖²`` part it must agree with the quadrature NELBO and with
    the importance-sampled estimate within standard errors, seed after seed,
    with a standard error comparable to importance sampling's.
    """
    sde = make_sde(name)
    data = GaussianData(MU, COV, sde)
    x = data.sample(1000, gen(20))
    quad = data.nelbo_quadrature(x)
    uniform_means, uniform_se = [], []
    for seed in range(5):
        est = {}
        for importance in (True, False):
            mc = nelbo(data.score, sde, x, num_t=8, importance=importance, generator=gen(seed))
            err = mc - quad  # per point: only the (t, z) noise, independent over points
            se = float(err.std()) / math.sqrt(len(x))
            assert abs(float(err.mean())) < 4 * se, (importance, seed)
            est[importance] = (float(mc.mean()), se)
        (a, sa), (b, sb) = est[True], est[False]
        assert abs(a - b) < 4 * math.hypot(sa, sb), (seed, est)
        assert sb < 1.5 * sa, (seed, est)  # finite variance, of importance sampling's size
        uniform_means.append(b)
        uniform_se.append(sb)
    spread = max(uniform_means) - min(uniform_means)
    se = sum(uniform_se) / len(uniform_se)
    print(
        f"{name}: quadrature {float(quad.mean()):.4f}; uniform-t NELBO over 5 seeds "
        f"{min(uniform_means):.4f}..{max(uniform_means):.4f}, standard error {se:.4f}"
    )
    assert spread < 6 * se


def test_uniform_time_nelbo_constant_closed_form_and_refusal():
    """``cv_integral`` against VP's closed form; uniform t without the control variate errs."""
    sde = make_sde("vp")
    eps = sde.eps
    u1, ue = (torch.exp(-sde.integral_beta(torch.tensor(t, dtype=DT))) for t in (1.0, eps))
    exact = float((-ue - torch.log1p(-ue)) - (-u1 - torch.log1p(-u1)))
    assert cv_integral(sde) == pytest.approx(exact, rel=1e-10)
    x = torch.zeros(4, 2, dtype=DT)
    with pytest.raises(ValueError, match="control_variate"):
        nelbo(lambda t, x: -x, sde, x, importance=False, control_variate=False)


@pytest.mark.parametrize("name", ALL_SDES)
def test_nelbo_bounds_nll_and_constant_is_right(name):
    """With the exact score the NELBO is ≥ the NLL and tight (gap ~ prior mismatch).

    The quadrature NELBO checks the closed-form terms (prior KL and decoder
    constant C): an error in C of even 1e-3 nats would show. The Monte-Carlo
    estimator of :func:`nelbo` must agree with the quadrature in expectation.
    """
    sde = make_sde(name)
    data = GaussianData([0.0, 0.0], COV, sde)
    x = data.sample(100, gen(12))
    nll, _ = probability_flow_nll(
        data.score, sde, x, solver=SolverConfig("dopri5", rtol=1e-9, atol=1e-9)
    )
    quad = data.nelbo_quadrature(x)
    gap = quad - nll
    assert gap.mean() >= -1e-5
    assert gap.abs().max() < 2e-3
    torch.manual_seed(13)
    # Monte Carlo: the per-point errors are independent, so their mean has
    # standard error std/√B.
    for cv in (True, False):
        mc = nelbo(data.score, sde, x, num_t=400, control_variate=cv, generator=gen(13))
        err = mc - quad
        assert abs(float(err.mean())) < 4 * float(err.std()) / math.sqrt(len(x)), cv
        if cv:
            spread_cv = float(err.std())
    assert spread_cv < float(err.std())  # the control variate reduces the variance


def test_nelbo_perturb_correction_bounds():
    """The 'perturb' [0, ε] handling gives a (stochastic) upper bound close to the truncated NLL."""
    sde = make_sde("vp", eps=1e-3)
    data = GaussianData([0.0, 0.0], COV, sde)
    x = data.sample(200, gen(15))
    solver = SolverConfig("dopri5", rtol=1e-8, atol=1e-8)
    trunc, _ = probability_flow_nll(data.score, sde, x, solver=solver)
    pert, _ = probability_flow_nll(
        data.score, sde, x, solver=solver, correction="perturb", generator=gen(16)
    )
    assert abs(float((pert - trunc).detach().mean())) < 0.05


# ------------------------------------------------------------------ samplers
def _check_moments(xs, mu, cov, *, tol_mean, tol_cov):
    m, c = xs.mean(0), torch.cov(xs.T)
    assert torch.allclose(m, mu, atol=tol_mean), (m, mu)
    assert torch.allclose(c, cov, atol=tol_cov), (c, cov)


@pytest.mark.parametrize("name", ALL_SDES)
def test_samplers_reproduce_gaussian_moments(name):
    """EM and PC reach the data moments; the ODE reaches its model's exact pushforward of π."""
    sde = make_sde(name, **({"sigma_max": 50.0} if name == "ve" else {}))
    data = GaussianData(MU, COV, sde)
    n = 8000
    x_T = sde.prior.sample((n, 2), generator=gen(17), dtype=DT)
    # MC error of the mean ≲ 0.011, of the covariance ≲ 0.016; plus discretisation bias.
    xs, st = euler_maruyama(data.score, sde, x_T, SamplerOptions(steps=200), generator=gen(18))
    assert st["nfe"] == 200
    _check_moments(xs, data.mu, data.cov, tol_mean=0.045, tol_cov=0.07)
    xs, st = predictor_corrector(
        data.score, sde, x_T, SamplerOptions(steps=100, snr=0.1), generator=gen(19)
    )
    assert st["nfe"] == 200
    _check_moments(xs, data.mu, data.cov, tol_mean=0.045, tol_cov=0.07)
    # The ODE is deterministic, so it keeps the prior mismatch π ≠ p_1: its
    # samples follow the affine pushforward of π (identity-free, exact), which
    # for VE with σ_max = 50 shifts the mean by ~2% of μ.
    xs, st = probability_flow_sample(
        data.score, sde, x_T, SamplerOptions(solver=SolverConfig("dopri5", rtol=1e-7, atol=1e-7))
    )
    assert st["nfe"] > 0
    one, e = torch.ones(1, dtype=DT), torch.full((1,), sde.eps, dtype=DT)
    ratio = torch.sqrt(data.eig(e)[0] / data.eig(one)[0])
    a_map = data.U @ torch.diag(ratio) @ data.U.T  # x_ε − m_ε μ = A (x_1 − m_1 μ)
    m_e, m_1 = sde.marginal(e)[0], sde.marginal(one)[0]
    mean = m_e * data.mu - a_map @ (m_1 * data.mu)
    cov = sde.prior_std**2 * a_map @ a_map.T
    assert torch.allclose(x_T @ a_map.T + mean, xs, atol=1e-4)  # the flow map itself
    _check_moments(xs, mean, cov, tol_mean=0.045, tol_cov=0.07)


def test_langevin_step_size_follows_song_et_al():
    """PC corrector: δ = 2 α (r ‖z‖/‖s‖)², α = 1 − β_i for VP and sub-VP, 1 for VE (Alg. 4/5)."""
    vp, subvp, ve = make_sde("vp"), make_sde("subvp"), make_sde("ve")
    ts = time_grid(vp, 1000, like=torch.zeros(1, dtype=DT))
    t, t_next = ts[0], ts[1]
    dt = float(t - t_next)
    alpha = langevin_alpha(vp, t, t_next)
    # exp(−∫β) over the step: Song et al.'s 1 − β(t) Δt to first order.
    integral = float(vp.integral_beta(t) - vp.integral_beta(t_next))
    assert float(alpha) == pytest.approx(math.exp(-integral), rel=1e-12)
    print(f"VP alpha at t=1, 1000 steps: {float(alpha):.6f}; 1 - beta dt = {1 - 20.0 * dt:.6f}")
    assert abs(float(alpha) - (1 - float(vp.beta(t)) * dt)) < 3e-4
    assert float(langevin_alpha(subvp, t, t_next)) == pytest.approx(float(alpha), rel=1e-12)
    assert float(langevin_alpha(ve, t, t_next)) == 1.0
    coarse = time_grid(vp, 10, like=torch.zeros(1, dtype=DT))  # 1 − β Δt = −1 here
    assert 0 < float(langevin_alpha(vp, coarse[0], coarse[1])) < 1

    # The step itself, with a known score and the same noise.
    x = torch.tensor([[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]], dtype=DT)
    score = lambda t, x: -0.5 * x  # noqa: E731
    out = langevin_step(score, x, t, snr=0.16, alpha=alpha, generator=gen(3))
    z = torch.randn(x.shape, generator=gen(3), dtype=DT)
    s = -0.5 * x
    delta = 2 * float(alpha) * (0.16 * z.norm(dim=1).mean() / s.norm(dim=1).mean()) ** 2
    assert torch.allclose(out, x + delta * s + math.sqrt(2 * delta) * z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_predictor_corrector_passes_alpha_to_every_corrector_step(name, monkeypatch):
    import cnf.diffusion.samplers as samplers

    sde = make_sde(name)
    seen = []
    real = samplers.langevin_step

    def spy(score_fn, x, t, *, snr, alpha=1.0, generator=None):
        seen.append((float(t), float(alpha)))
        return real(score_fn, x, t, snr=snr, alpha=alpha, generator=generator)

    monkeypatch.setattr(samplers, "langevin_step", spy)
    x_T = sde.prior.sample((64, 2), generator=gen(4), dtype=DT)
    samplers.predictor_corrector(
        lambda t, x: -x, sde, x_T, SamplerOptions(steps=5, corrector_steps=2)
    )
    ts = time_grid(sde, 5, like=x_T)
    expected = [float(langevin_alpha(sde, ts[i], ts[i + 1])) for i in range(5) for _ in range(2)]
    assert [a for _, a in seen] == pytest.approx(expected, rel=1e-12)
    if name == "ve":
        assert all(a == 1.0 for _, a in seen)
    else:
        assert all(0 < a < 1 for _, a in seen)


def test_sdeint_sampler_and_registry():
    sde = make_sde("vp")
    data = GaussianData(MU, COV, sde)
    x_T = sde.prior.sample((6000, 2), generator=gen(20), dtype=DT)
    xs, st = sdeint_sample(data.score, sde, x_T, SamplerOptions(steps=150), generator=gen(21))
    assert st["nfe"] >= 150
    _check_moments(xs, data.mu, data.cov, tol_mean=0.05, tol_cov=0.08)
    assert set(SCORE_SAMPLERS) == {"em", "pc", "ode", "sdeint", "euler", "heun"}


def test_em_last_step_is_noise_free():
    """With a zero score and steps=1 the sample is the deterministic mean of the step."""
    sde = make_sde("vp")
    x_T = torch.ones(3, 2, dtype=DT)
    zero = lambda t, x: torch.zeros_like(x)  # noqa: E731
    x1, _ = euler_maruyama(zero, sde, x_T, SamplerOptions(steps=1), generator=gen(0))
    x2, _ = euler_maruyama(zero, sde, x_T, SamplerOptions(steps=1), generator=gen(1))
    assert torch.equal(x1, x2)


# ---------------------------------------------------------- parameterisations
@pytest.mark.parametrize("name", ["vp", "subvp", "ve"])
def test_parameterisation_conversions(name):
    """score ↔ noise ↔ data outputs are consistent, incl. Tweedie's x̂₀ for Gaussian data."""
    sde = make_sde(name)
    data = GaussianData(MU, COV, sde)
    x = torch.randn(7, 2, generator=gen(22), dtype=DT) * 2
    t = torch.rand(7, generator=gen(23), dtype=DT) * 0.9 + 0.05
    s = data.score(t, x)
    for p in ("score", "noise", "data"):
        out = score_to_output(s, x, t, sde, p)
        assert torch.allclose(output_to_score(out, x, t, sde, p), s)
    m, sig = (v.reshape(-1, 1) for v in sde.marginal(t))
    eps_hat = score_to_output(s, x, t, sde, "noise")
    x0_hat = score_to_output(s, x, t, sde, "data")
    assert torch.allclose(x, m * x0_hat + sig * eps_hat)  # x_t = m x̂₀ + σ ε̂
    # Tweedie: E[x_0 | x_t] for Gaussian data = μ + Σ m C_t⁻¹ (x_t − m μ).
    ct_inv = torch.stack(
        [
            torch.linalg.inv(m[i] ** 2 * data.cov + sig[i] ** 2 * torch.eye(2, dtype=DT))
            for i in range(7)
        ]
    )
    post = data.mu + torch.einsum("ij,bjk,bk->bi", data.cov, ct_inv, x - m * data.mu) * m
    assert torch.allclose(x0_hat, post, atol=1e-8)
    with pytest.raises(ValueError, match="valid: data, noise, score"):
        output_to_score(s, x, t, sde, "velocity")


def test_unet_shapes_and_zero_init():
    torch.manual_seed(0)
    net = UNet((1, 8, 8), channels=16, channel_mults=(1, 2), num_res_blocks=1)
    x = torch.randn(3, 1, 8, 8)
    t = torch.rand(3)
    assert torch.equal(net(t, x), torch.zeros_like(x))  # zero-initialised output conv
    assert net(t, x.reshape(3, 64)).shape == (3, 64)  # flat inputs are reshaped
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    y = net(0.5, x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="not divisible"):
        UNet((1, 6, 6), channel_mults=(1, 2, 2))


# ----------------------------------------------------------- the model family
def test_score_model_interface_and_cost_keys():
    net = {"name": "mlp", "hidden_dims": [16, 16]}
    torch.manual_seed(0)
    model = build_family("score", {"net": net, "nelbo_samples": 2}).to(DT)
    x = torch.randn(5, 2, dtype=DT)
    out = model.training_loss(x)
    assert out.loss.ndim == 0 and "nelbo" in out.stats
    ev = model.evaluate(x, model.with_settings(method="rk4", steps=4))
    assert ev.nll.shape == (5,) and ev.nelbo.shape == (5,) and ev.stats["nfe"] == 16
    for cost in model.default_cost_grid()[:1] + [
        {"sampler": "em", "steps": 3},
        {"sampler": "pc", "steps": 2},
    ]:
        xs, st = model.sample(4, model.with_settings(cost), generator=gen(0))
        assert xs.shape == (4, 2) and st["nfe"] > 0
    with pytest.raises(ValueError, match="unknown setting 'tolerance'"):
        model.with_settings(tolerance=1e-3)
    with pytest.raises(ValueError, match="unknown sampler"):
        model.with_settings(sampler="ddim")
    # The data map y = 2x − 1 changes the NLL by exactly −D log 2.
    scaled = build_family(
        "score", {"net": net, "nelbo_samples": 0, "preprocess": {"scale": 2.0, "shift": -1.0}}
    ).to(DT)
    scaled.load_state_dict(model.state_dict())
    cost = model.with_settings(method="rk4", steps=4)
    a = scaled.evaluate((x + 1) / 2, cost).nll
    b = model.evaluate(x, cost).nll
    assert torch.allclose(a, b - 2 * math.log(2.0))


def test_vp_toy_config_trains_end_to_end(tmp_path):
    """A few iterations of configs/score/vp_toy.yaml in-process, with a tiny evaluation."""
    from cnf.config import load_config
    from cnf.train.loop import Trainer

    cfg = load_config(
        REPO / "configs/score/vp_toy.yaml",
        [
            "train.iters=3",
            "train.batch_size=64",
            "data.test_size=64",
            "data.val_size=16",
            "eval.num_samples=64",
            "eval.batch_size=64",
            "model.nelbo_samples=4",
            "eval.plots=false",
            "eval.solver.name=rk4",
            "eval.solver.steps=8",
            "track.wandb=disabled",
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg, progress=False, log=lambda s: None)
    trainer.prepare()
    assert trainer.train() == "finished"
    final = trainer.final_metrics()
    for key in ("test_nll", "test_nelbo", "test_nfe", "sample_nfe", "sample_mmd2"):
        assert key in final and math.isfinite(final[key]), key


@pytest.mark.slow
def test_digits_config_smoke(tmp_path):
    """configs/score/vp_digits.yaml builds and takes two steps (if the digits data set exists)."""
    from cnf.config import load_config
    from cnf.train.loop import Trainer

    cfg = load_config(
        REPO / "configs/score/vp_digits.yaml",
        [
            "train.iters=2",
            "train.batch_size=8",
            "data.val_size=16",
            "eval.num_samples=4",
            "eval.batch_size=16",
            "eval.plots=false",
            "eval.solver.name=euler",
            "eval.solver.steps=2",
            "model.nelbo_samples=1",
            "track.wandb=disabled",
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg, progress=False, log=lambda s: None)
    trainer.prepare()
    trainer.data.test = trainer.data.test[:16]
    assert trainer.train() == "finished"
    final = trainer.final_metrics()
    assert math.isfinite(final["test_nll"]) and math.isfinite(final["test_nelbo"])
