"""Divergence estimators against brute force and closed forms (float64).

* exact trace and Frobenius norm == the brute-force Jacobian's, on both
  code paths (batched reverse-mode VJP and TimeMLP's forward-mode Jacobian),
  for every layer type and activation;
* Hutchinson is unbiased for the trace and for ``‖A‖_F²``, with the
  closed-form variances ``2‖S‖_F²`` (Gaussian) and ``2(‖S‖_F² − Σ A_ii²)``
  (Rademacher) on a linear field ``f(z) = Az``;
* the probe is drawn once per solve and reused by every function evaluation,
  the adjoint's backward solve included.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import PlainField
from torch import Tensor, nn

from cnf.divergence import (
    ExactDivergence,
    HutchinsonDivergence,
    build_divergence,
    sample_probe,
)
from cnf.nets import ACTIVATIONS, LAYERS, TimeMLP
from cnf.solve import SolverConfig, integrate

DTYPE = torch.float64


def brute_jacobian(field, t: Tensor, z: Tensor) -> Tensor:
    """``J[b, i, j] = ∂f_i/∂z_j`` at sample ``b``, one sample at a time."""
    rows = []
    for b in range(z.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: field(t, v[None])[0], z[b])
        rows.append(jac.reshape(z[b].numel(), z[b].numel()))
    return torch.stack(rows)


class LinearField(nn.Module):
    """``f(t, z) = A z`` (per sample), so ``∂f/∂z = A`` everywhere."""

    def __init__(self, a: Tensor):
        super().__init__()
        self.a = nn.Parameter(a.clone())

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return z @ self.a.T


def random_matrix(d: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, d, generator=g, dtype=DTYPE)


def make_mlp(layer: str, activation: str, dim: int = 3, seed: int = 0) -> TimeMLP:
    torch.manual_seed(seed)
    net = TimeMLP(dim, (7, 5), layer=layer, activation=activation).to(DTYPE)
    # Random (non-zero) biases and time weights so nothing is trivially 0 or 1.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


# ---------------------------------------------------------------- exact trace
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_exact_divergence_matches_brute_force_jacobian(layer: str, activation: str) -> None:
    net = make_mlp(layer, activation)
    z = torch.randn(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(0.37, dtype=DTYPE)
    jac = brute_jacobian(net, t, z)
    trace = jac.diagonal(dim1=1, dim2=2).sum(-1)
    frob = jac.pow(2).sum((1, 2))
    est = ExactDivergence()

    # Forward-mode path: TimeMLP.forward_with_jacobian (J[i, b, j] = ∂y_j/∂x_i).
    y, jac_fwd = net.forward_with_jacobian(t, z)
    torch.testing.assert_close(y, net(t, z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jac_fwd.permute(1, 2, 0), jac, rtol=1e-10, atol=1e-12)
    f, div, fr = est.evaluate(net, t, z, None, frobenius=True)
    torch.testing.assert_close(f, net(t, z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div, trace, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fr, frob, rtol=1e-10, atol=1e-12)

    # Autograd path: one batched VJP (the field has no forward_with_jacobian).
    plain = PlainField(net)
    f, div, fr = est.evaluate(plain, t, z, None, frobenius=True)
    torch.testing.assert_close(div, trace, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fr, frob, rtol=1e-10, atol=1e-12)
    zz = z.clone().requires_grad_(True)
    div, fr = est(plain(t, zz), zz, None, create_graph=False, frobenius=True)
    torch.testing.assert_close(div, trace, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fr, frob, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_hutchinson_forward_mode_equals_the_vjp_path(layer: str, activation: str) -> None:
    """TimeMLP.forward_with_jvp gives each probe's ``εᵀAε`` (equal to the VJP's, with equal
    gradients w.r.t. z, t and the parameters) and ``‖Aε‖²`` from the brute-force Jacobian."""
    net = make_mlp(layer, activation)
    g = torch.Generator().manual_seed(4)
    z0 = torch.randn(6, 3, dtype=DTYPE, generator=g)
    est = HutchinsonDivergence("gaussian", num_probes=3, per_probe=True, generator=g)
    probe = est.draw_probe(z0)
    out, grads = [], []
    for field in (net, PlainField(net)):
        z = z0.clone().requires_grad_(True)
        t = torch.tensor(0.37, dtype=DTYPE, requires_grad=True)
        f, div, frob = est.evaluate(field, t, z, probe, frobenius=True)
        out.append((f, div, frob))
        loss = f.pow(2).sum() + div.sin().sum()
        grads.append(torch.autograd.grad(loss, [z, t, *net.parameters()], allow_unused=True))
    (f1, d1, fr1), (f2, d2, _) = out
    torch.testing.assert_close(f1, f2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d1, d2, rtol=1e-10, atol=1e-12)
    for a, b in zip(*grads):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    jac = brute_jacobian(net, torch.tensor(0.37, dtype=DTYPE), z0)  # (B, D, D)
    a_eps = torch.einsum("bij,kbj->kbi", jac, probe)
    torch.testing.assert_close(
        d1, torch.einsum("kbi,kbi->bk", probe, a_eps), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(fr1, a_eps.pow(2).sum(2).mean(0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_exact_divergence_gradients_match_autograd_path(layer: str, activation: str) -> None:
    """Training back-propagates through (f, div, frob): the TimeMLP path (forward-mode or
    fused kernel) must give the same gradients w.r.t. parameters, z and t as autograd."""
    net = make_mlp(layer, activation)
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(6, 3, dtype=DTYPE, generator=g)
    w_f, w_div, w_frob = (
        torch.randn(6, 3, dtype=DTYPE, generator=g),
        *torch.randn(2, 6, dtype=DTYPE, generator=g),
    )
    grads = []
    for field in (net, PlainField(net)):
        z = z0.clone().requires_grad_(True)
        t = torch.tensor(0.37, dtype=DTYPE, requires_grad=True)
        f, div, frob = ExactDivergence().evaluate(field, t, z, None, frobenius=True)
        loss = (w_f * f).sum() + (w_div * div).sum() + (w_frob * frob).sum()
        inputs = [z, t, *net.parameters()]
        grads.append(torch.autograd.grad(loss, inputs, allow_unused=True))
    for name, a, b in zip(["z", "t", *dict(net.named_parameters())], *grads):
        if b is None:  # e.g. t for the time-independent 'ignore' layer
            assert a is None or a.abs().max() == 0, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)


def test_exact_divergence_per_sample_times_and_event_shape() -> None:
    """A (B,) time per sample, and a non-flat event shape on the autograd path."""
    net = make_mlp("concatsquash", "softplus", dim=6)
    z = torch.randn(4, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    t = torch.linspace(0.1, 0.9, 4, dtype=DTYPE)
    jac = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda v, b=b: net(t[b : b + 1], v[None])[0], z[b])
            for b in range(4)
        ]
    )
    trace = jac.diagonal(dim1=1, dim2=2).sum(-1)
    _, div, _ = ExactDivergence().evaluate(net, t, z, None)
    torch.testing.assert_close(div, trace, rtol=1e-10, atol=1e-12)

    def field_2x3(tt: Tensor, v: Tensor) -> Tensor:  # (B, 2, 3) in, (B, 2, 3) out
        return net(tt, v.reshape(-1, 6)).reshape(-1, 2, 3)

    _, div3, _ = ExactDivergence().evaluate(field_2x3, t, z.reshape(4, 2, 3), None)
    torch.testing.assert_close(div3, trace, rtol=1e-10, atol=1e-12)


def test_exact_divergence_keeps_graph_only_when_grad_enabled() -> None:
    net = make_mlp("concatsquash", "tanh")
    z = torch.randn(5, 3, dtype=DTYPE)
    t = torch.tensor(0.5, dtype=DTYPE)
    for field in (net, PlainField(net)):
        with torch.no_grad():
            f, div, _ = ExactDivergence().evaluate(field, t, z, None)
        assert not f.requires_grad
        _, div, _ = ExactDivergence().evaluate(field, t, z, None)
        assert div.requires_grad  # training back-propagates through the trace
        (g,) = torch.autograd.grad(div.sum(), net.layers[0].linear.weight)
        assert g.abs().sum() > 0


# --------------------------------------------------------------- Hutchinson
def hutchinson_samples(
    field, z0: Tensor, n: int, kind: str, *, num_probes: int = 1, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``n`` independent estimates (trace, Frobenius) at the point ``z0`` (one per batch row)."""
    est = HutchinsonDivergence(
        kind, num_probes=num_probes, generator=torch.Generator().manual_seed(seed)
    )
    z = z0.expand(n, -1).clone()
    probe = est.draw_probe(z)
    t = torch.tensor(0.3, dtype=DTYPE)
    with torch.no_grad():
        _, div, frob = est.evaluate(field, t, z, probe, frobenius=True)
    return div, frob


@pytest.mark.parametrize("num_probes", [1, 4])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_hutchinson_mean_converges_to_exact_trace(kind: str, num_probes: int) -> None:
    net = make_mlp("concatsquash", "tanh", dim=4)
    z0 = torch.randn(1, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    t = torch.tensor(0.3, dtype=DTYPE)
    jac = brute_jacobian(net, t, z0)[0]
    trace, frob = jac.trace(), jac.pow(2).sum()
    n = 20000
    div, fr = hutchinson_samples(net, z0, n, kind, num_probes=num_probes)
    for est, exact in ((div, trace), (fr, frob)):
        se = est.std() / math.sqrt(n)
        assert abs(est.mean() - exact) < 4 * se, (kind, float(est.mean()), float(exact))
    # Averaging k probes divides the variance by k: compare with the closed form.
    s = 0.5 * (jac + jac.T)
    var1 = 2 * s.pow(2).sum()
    if kind == "rademacher":
        var1 = var1 - 2 * jac.diagonal().pow(2).sum()
    assert float(div.var()) == pytest.approx(float(var1) / num_probes, rel=0.1)


def _variance_test(est: Tensor, expected: Tensor, k: float = 5.0) -> None:
    """Sample variance within ``k`` of its standard errors ``sqrt((μ4 − σ⁴)/n)`` of ``expected``."""
    n = est.numel()
    c = est - est.mean()
    var = c.pow(2).mean()
    se = torch.sqrt((c.pow(4).mean() - var**2) / n)
    assert abs(var - expected) < k * se, (float(var), float(expected), float(se))


def test_hutchinson_variance_closed_forms_linear_field() -> None:
    d = 5
    a = random_matrix(d, seed=4)
    field = LinearField(a).to(DTYPE)
    z0 = torch.randn(1, d, dtype=DTYPE)
    s = 0.5 * (a + a.T)
    var_gauss = 2 * s.pow(2).sum()
    var_rad = 2 * (s.pow(2).sum() - a.diagonal().pow(2).sum())
    assert var_rad <= var_gauss
    n = 200_000
    div_g, frob_g = hutchinson_samples(field, z0, n, "gaussian", seed=5)
    div_r, frob_r = hutchinson_samples(field, z0, n, "rademacher", seed=6)
    # Unbiased for tr(A) and for ‖A‖_F² with either probe.
    for est, exact in (
        (div_g, a.trace()),
        (div_r, a.trace()),
        (frob_g, a.pow(2).sum()),
        (frob_r, a.pow(2).sum()),
    ):
        assert abs(est.mean() - exact) < 4 * est.std() / math.sqrt(n)
    _variance_test(div_g, var_gauss)
    _variance_test(div_r, var_rad)
    assert div_r.var() <= div_g.var()
    # Every single Rademacher estimate is εᵀAε with ε ∈ {±1}^d: the diagonal enters exactly.
    eps = sample_probe((3, d), "rademacher", dtype=DTYPE)
    assert set(eps.unique().tolist()) <= {-1.0, 1.0}


def test_rademacher_variance_is_zero_for_diagonal_matrix() -> None:
    """S diagonal ⇒ 2(‖S‖_F² − Σ A_ii²) = 0: every Rademacher estimate is exact."""
    a = torch.diag(torch.tensor([0.5, -2.0, 3.0], dtype=DTYPE))
    div, _ = hutchinson_samples(LinearField(a), torch.ones(1, 3, dtype=DTYPE), 100, "rademacher")
    torch.testing.assert_close(div, torch.full_like(div, 1.5), rtol=0, atol=1e-12)


def test_probe_moments() -> None:
    g = torch.Generator().manual_seed(7)
    for kind in ("gaussian", "rademacher"):
        eps = sample_probe((200_000, 3), kind, dtype=DTYPE, generator=g)
        cov = eps.T @ eps / len(eps)
        torch.testing.assert_close(cov, torch.eye(3, dtype=DTYPE), rtol=0, atol=0.02)
        assert eps.mean(0).abs().max() < 0.02
    with pytest.raises(ValueError, match="gaussian, rademacher"):
        sample_probe((2,), "uniform")  # type: ignore[arg-type]


def test_generator_gives_reproducible_probes() -> None:
    z = torch.zeros(8, 3, dtype=DTYPE)
    for kind in ("gaussian", "rademacher"):
        p1 = HutchinsonDivergence(kind, generator=torch.Generator().manual_seed(11)).draw_probe(z)
        p2 = HutchinsonDivergence(kind, generator=torch.Generator().manual_seed(11)).draw_probe(z)
        p3 = HutchinsonDivergence(kind, generator=torch.Generator().manual_seed(12)).draw_probe(z)
        assert p1.shape == (1, 8, 3) and p1.dtype == DTYPE
        assert torch.equal(p1, p2)
        assert not torch.equal(p1, p3)
    # Through a whole solve: same generator seed, same log-determinant estimate.
    net = make_mlp("concatsquash", "tanh")
    x = torch.randn(8, 3, dtype=DTYPE)
    solver = SolverConfig(name="rk4", steps=4)
    logdets = [
        integrate(
            net,
            x,
            solver=solver,
            divergence=build_divergence(
                "hutchinson", probe="rademacher", generator=torch.Generator().manual_seed(s)
            ),
        ).logdet
        for s in (3, 3, 4)
    ]
    assert torch.equal(logdets[0], logdets[1])
    assert not torch.equal(logdets[0], logdets[2])


def test_estimator_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="gaussian, rademacher"):
        HutchinsonDivergence("uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_probes"):
        HutchinsonDivergence(num_probes=0)
    with pytest.raises(ValueError, match="exact, hutchinson"):
        build_divergence("nosuch")
    est = HutchinsonDivergence()
    z = torch.zeros(2, 2, dtype=DTYPE, requires_grad=True)
    with pytest.raises(ValueError, match="probe"):
        est(z * 2, z, None, create_graph=False)


# ------------------------------------------------- one probe for a whole solve
class RecordingHutchinson(HutchinsonDivergence):
    """Records the probe tensor seen at every evaluation (and whether grad mode was on)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, Tensor]] = []

    def _reduce(self, products, probe, *, frobenius):
        # Both paths (the VJP and the forward-mode JVP) end here.
        self.seen.append((probe.data_ptr(), probe.detach().clone()))
        return super()._reduce(products, probe, frobenius=frobenius)


@pytest.mark.parametrize(
    "adjoint,seminorm",
    [(False, False), (True, False), (True, True)],
    ids=["backprop", "adjoint", "adjoint-seminorm"],
)
def test_probe_fixed_within_a_solve(adjoint: bool, seminorm: bool) -> None:
    net = make_mlp("concatsquash", "tanh")
    x = torch.randn(16, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(9))
    est = RecordingHutchinson("gaussian", num_probes=2)
    solver = SolverConfig(name="dopri5", rtol=1e-6, atol=1e-6, adjoint=adjoint, seminorm=seminorm)
    sol = integrate(net, x, solver=solver, divergence=est, kinetic=True, jacobian=True)
    n_forward = len(est.seen)
    assert n_forward == sol.stats.nfe_forward > 1
    loss = sol.logdet.sum() + sol.regularizers["jacobian"].sum() + sol.z.pow(2).sum()
    loss.backward()
    n_total = len(est.seen)
    if adjoint:
        assert sol.stats.nfe_backward > 0
        assert n_total == n_forward + sol.stats.nfe_backward  # the backward solve used it too
    else:
        assert sol.stats.nfe_backward == 0
        assert n_total == n_forward
    ptr0, probe0 = est.seen[0]
    assert probe0.shape == (2, 16, 3)
    for ptr, probe in est.seen[1:]:
        assert ptr == ptr0
        assert torch.equal(probe, probe0)

    # A fresh solve draws a fresh probe.
    est.seen.clear()
    integrate(net, x, solver=solver, divergence=est)
    assert len(est.seen) > 1
    assert not torch.equal(est.seen[0][1], probe0)
    for _, probe in est.seen[1:]:
        assert torch.equal(probe, est.seen[0][1])
