"""Flow matching: the CFM objective's optimum, OT pairing, reflow, and the CNF likelihood.

Float64 where the mathematics is checked; every random draw is seeded.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY, build_family, run_train
from torch import Tensor, nn

import cnf.flows.cnf as cnf_block
from cnf.config import ConfigError, load_config
from cnf.diffusion.flow_matching import (
    cfm_loss,
    load_pairs,
    ot_permutation,
    pair_batch,
    save_pairs,
    straight_path,
    transport_cost,
)
from cnf.flows.base import standard_normal_logprob
from cnf.flows.preprocess import Preprocess
from cnf.models import build_model
from cnf.models.fm import FlowMatchingModel
from cnf.nets import TimeMLP
from cnf.solve import SolverConfig, integrate

F64 = torch.float64


# ----------------------------------------------------------------- the optimum
class GaussianBridgeField(nn.Module):
    """Affine field ``a(t) x + b(t)`` equal to the exact marginal CFM field at θ = 0.

    Data ``x0 ~ N(μ, s²I)`` and noise ``x1 ~ N(0, I)`` drawn independently; on
    ``x_t = (1−t)x0 + t x1 + σε`` the regression target ``u = x1 − x0`` and
    ``x_t`` are jointly Gaussian, so ``E[u | x_t = x] = −μ + c_t/v_t (x − (1−t)μ)``
    with ``c_t = Cov(u, x_t) = t − (1−t)s²`` and ``v_t = Var(x_t) = (1−t)²s² + t² + σ²``.
    The parameters perturb ``a`` and ``b`` by polynomials in t (per-t coefficients).
    """

    def __init__(self, mu: Tensor, s: float, sigma: float, degree: int = 2):
        super().__init__()
        self.mu, self.s, self.sigma = mu, s, sigma
        self.alpha = nn.Parameter(torch.zeros(degree + 1, dtype=F64))
        self.beta = nn.Parameter(torch.zeros(degree + 1, mu.numel(), dtype=F64))

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=F64).reshape(-1, 1)
        powers = torch.cat([t**k for k in range(self.alpha.numel())], dim=1)  # (B, K)
        var = (1 - t) ** 2 * self.s**2 + t**2 + self.sigma**2
        a = (t - (1 - t) * self.s**2) / var + powers @ self.alpha[:, None]
        b_opt = -self.mu - (t - (1 - t) * self.s**2) / var * (1 - t) * self.mu
        return a * x + b_opt + powers @ self.beta


def _gaussian_batch(n: int, mu: Tensor, s: float, seed: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    d = mu.numel()
    x0 = mu + s * torch.randn(n, d, generator=g, dtype=F64)
    x1 = torch.randn(n, d, generator=g, dtype=F64)
    t = torch.rand(n, generator=g, dtype=F64)
    eps = torch.randn(n, d, generator=g, dtype=F64)
    return x0, x1, t, eps


def _grads(field: nn.Module, loss: Tensor) -> Tensor:
    grads = torch.autograd.grad(loss, list(field.parameters()))
    return torch.cat([g.flatten() for g in grads])


@pytest.mark.parametrize("sigma", [0.0, 0.3])
def test_cfm_loss_has_zero_gradient_at_the_analytic_gaussian_field(sigma: float) -> None:
    mu, s = torch.tensor([1.0, -2.0, 0.5], dtype=F64), 0.5
    field = GaussianBridgeField(mu, s, sigma)
    x0, x1, t, eps = _gaussian_batch(200_000, mu, s, seed=0)

    # Chunked gradients: their spread gives the Monte Carlo standard error.
    chunks = [
        _grads(field, cfm_loss(field, a, b, sigma=sigma, t=c, noise=e).mean())
        for a, b, c, e in zip(*(v.chunk(50) for v in (x0, x1, t, eps)))
    ]
    g = torch.stack(chunks)
    mean, se = g.mean(0), g.std(0) / math.sqrt(len(g))
    assert (mean.abs() < 5 * se).all(), mean / se

    # The same test sees a perturbed field as far from stationary.
    with torch.no_grad():
        field.alpha[1] += 0.3
        field.beta[0, 0] -= 0.3
    g_pert = _grads(field, cfm_loss(field, x0, x1, sigma=sigma, t=t, noise=eps).mean())
    with torch.no_grad():
        field.alpha[1] -= 0.3
        field.beta[0, 0] += 0.3
    assert g_pert.abs().max() > 20 * se.max()
    assert mean.abs().max() < 0.05 * g_pert.abs().max()

    # Value stationarity: every coordinate step away from θ = 0 raises the loss
    # (common random numbers, so only the curvature of the quadratic remains).
    def loss_value() -> float:
        with torch.no_grad():
            return float(cfm_loss(field, x0, x1, sigma=sigma, t=t, noise=eps).mean())

    base = loss_value()
    params = list(field.parameters())
    for p in params:
        for idx in itertools.product(*(range(n) for n in p.shape)):
            for delta in (0.05, -0.05):
                with torch.no_grad():
                    p[idx] += delta
                assert loss_value() > base
                with torch.no_grad():
                    p[idx] -= delta


def test_straight_path_endpoints_and_velocity() -> None:
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    torch.testing.assert_close(straight_path(x0, x1, 0.0), x0)
    torch.testing.assert_close(straight_path(x0, x1, torch.ones(5, dtype=F64)), x1)
    # d x_t / dt by finite differences is the regression target x1 − x0.
    t = torch.rand(5, generator=g, dtype=F64)
    h = 1e-6
    fd = (straight_path(x0, x1, t + h) - straight_path(x0, x1, t - h)) / (2 * h)
    torch.testing.assert_close(fd, x1 - x0)


# ----------------------------------------------------------------- OT pairing
@pytest.mark.parametrize("solver", ["emd", "assignment"])
def test_ot_pairing_beats_random_pairing_on_every_batch(solver: str) -> None:
    g = torch.Generator().manual_seed(2)
    for n, d in [(8, 2), (64, 2), (256, 2), (32, 5), (128, 64)]:
        for _ in range(3):
            x0 = torch.randn(n, d, generator=g, dtype=F64) * 2 + 1
            x1 = torch.randn(n, d, generator=g, dtype=F64)
            random_cost = transport_cost(x0, x1).mean()
            p0, p1 = pair_batch(x0, x1, pairing="ot", ot_solver=solver)
            torch.testing.assert_close(p0, x0)
            # A re-ordering of x1: every noise point used exactly once.
            perm = ot_permutation(x0, x1, solver=solver)
            assert sorted(perm.tolist()) == list(range(n))
            torch.testing.assert_close(p1, x1[perm])
            assert transport_cost(p0, p1).mean() < random_cost
            shuffled = x1[torch.randperm(n, generator=g)]
            assert transport_cost(p0, p1).mean() <= transport_cost(x0, shuffled).mean()


def test_ot_pairing_is_the_exact_optimum() -> None:
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(6, 2, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
    best = min(
        float(transport_cost(x0, x1[list(p)]).sum()) for p in itertools.permutations(range(6))
    )
    for solver in ("emd", "assignment"):
        perm = ot_permutation(x0, x1, solver=solver)
        assert float(transport_cost(x0, x1[perm]).sum()) == pytest.approx(best, rel=1e-12)


def test_pairing_names_are_checked() -> None:
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="valid: ot, rectified"):
        pair_batch(x, x, pairing="sinkhorn")
    with pytest.raises(ValueError, match="valid: assignment, emd"):
        ot_permutation(x, x, solver="greedy")
    torch.testing.assert_close(pair_batch(x, x + 1, pairing="rectified")[1], x + 1)


def test_ot_training_loss_reports_lower_transport_cost() -> None:
    torch.manual_seed(4)
    x = torch.randn(256, 2) * 3
    costs = {}
    for pairing in ("rectified", "ot"):
        model = build_family("fm", {"pairing": {"name": pairing}, "hidden_dims": [16]})
        torch.manual_seed(5)
        costs[pairing] = model.training_loss(x).stats["transport_cost"]
    assert costs["ot"] < 0.5 * costs["rectified"]


# ----------------------------------------------------------------- the model as a CNF
def _tiny_model(event_shape=(3,), logit_alpha: float = 0.0, seed: int = 0) -> FlowMatchingModel:
    torch.manual_seed(seed)
    dim = int(np.prod(event_shape))
    net = TimeMLP(dim, (8, 8), layer="concatsquash", activation="tanh")
    with torch.no_grad():  # larger weights: a clearly non-linear, non-volume-preserving flow
        for p in net.parameters():
            p.mul_(2.0)
    return FlowMatchingModel(net, event_shape, preprocess=Preprocess(logit_alpha=logit_alpha)).to(
        F64
    )


@pytest.mark.parametrize("event_shape,alpha", [((3,), 0.0), ((1, 2, 2), 0.05)])
def test_nll_goes_through_integrate_and_matches_brute_force_jacobian(
    event_shape, alpha: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _tiny_model(event_shape, alpha)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return integrate(*args, **kwargs)

    monkeypatch.setattr(cnf_block, "integrate", spy)  # the one likelihood path's solve
    g = torch.Generator().manual_seed(6)
    x = torch.rand((4, *event_shape), generator=g, dtype=F64) * 0.8 + 0.1
    cost = model.with_settings({"method": "rk4", "steps": 100, "divergence.name": "exact"})
    out = model.evaluate(x, cost)
    assert len(calls) == 1 and calls[0]["divergence"] is not None
    assert (calls[0]["t0"], calls[0]["t1"]) == (0.0, 1.0)  # data at 0 → noise at 1
    assert out.stats["nfe"] == 400

    solver = SolverConfig(name="rk4", steps=100)
    dim = int(np.prod(event_shape))

    def data_to_noise(xi: Tensor) -> Tensor:
        y = xi.reshape(1, *event_shape)
        if alpha > 0:
            s = alpha + (1 - 2 * alpha) * y
            y = torch.log(s) - torch.log1p(-s)
        return integrate(model.field, y.reshape(1, dim), solver=solver).z[0]

    for i in range(len(x)):
        xi = x[i].reshape(dim)
        z = data_to_noise(xi)
        jac = torch.autograd.functional.jacobian(data_to_noise, xi, vectorize=True)
        logdet = torch.linalg.slogdet(jac).logabsdet
        nll = -(standard_normal_logprob(z[None])[0] + logdet)
        assert float(out.nll[i]) == pytest.approx(float(nll.detach()), abs=1e-7)


def test_adaptive_nll_agrees_with_fine_fixed_step_nll() -> None:
    model = _tiny_model()
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    adaptive = model.evaluate(x, model.with_settings(method="dopri5", rtol=1e-9, atol=1e-9))
    fine = model.evaluate(x, model.with_settings(method="rk4", steps=200))
    torch.testing.assert_close(adaptive.nll, fine.nll, atol=1e-7, rtol=0)


def test_sampling_inverts_the_likelihood_solve_and_reports_nfe() -> None:
    model = _tiny_model()
    for method, steps, per_step in [("euler", 1, 1), ("euler", 5, 1), ("midpoint", 10, 2)]:
        _, stats = model.sample(3, model.with_settings(method=method, steps=steps))
        assert stats["nfe"] == steps * per_step
    x, stats = model.sample(
        8,
        model.with_settings(method="dopri5", rtol=1e-10, atol=1e-10),
        generator=torch.Generator().manual_seed(8),
    )
    assert stats["nfe"] > 0
    z = integrate(model.field, x, solver=SolverConfig(rtol=1e-10, atol=1e-10)).z
    z_expected = torch.randn(8, 3, generator=torch.Generator().manual_seed(8), dtype=F64)
    torch.testing.assert_close(z, z_expected, atol=1e-7, rtol=0)


def test_cost_knob_errors_are_clear() -> None:
    model = _tiny_model()
    with pytest.raises(ValueError, match="needs a fixed-step method"):
        model.with_settings(steps=5)
    with pytest.raises(ValueError, match="unknown setting 'tolerance'"):
        model.with_settings(tolerance=1e-3)
    with pytest.raises(ValueError, match="unknown solver method"):
        model.with_settings(method="leapfrog", steps=2)


def test_default_cost_grid_is_accepted_by_the_model() -> None:
    model = _tiny_model()
    grid = model.default_cost_grid()
    labels = {(c.get("method", c.get("sampler")), c.get("grid"), c.get("steps")) for c in grid}
    for method in ("euler", "midpoint"):
        assert {(method, None, s) for s in (1, 2, 5, 10, 20)} <= labels
    assert any(c.get("method") == "dopri5" for c in grid)
    # The few-step samplers as named settings: Heun at 9..99 NFE, Euler at 10..100, both grids.
    for grid_name in ("karras", "uniform"):
        assert {("heun", grid_name, s) for s in (5, 10, 25, 50)} <= labels
        assert {("euler", grid_name, s) for s in (10, 20, 50, 100)} <= labels
    x = torch.zeros(2, 3, dtype=F64)
    for cost in grid:
        s = model.with_settings(cost)
        assert model.evaluate(x, s).nll.shape == (2,)
        assert model.sample(2, s)[0].shape == (2, 3)


# ----------------------------------------------------------------- reflow
class ConstantField(nn.Module):
    def __init__(self, c: Tensor):
        super().__init__()
        self.c = nn.Parameter(c)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        return self.c.expand_as(x)


def test_reflow_pairs_are_the_models_own_ode_endpoints() -> None:
    model = _tiny_model()
    cost = model.with_settings(method="rk4", steps=20)
    x0, x1, stats = model.reflow_pairs(
        64, cost, generator=torch.Generator().manual_seed(9), batch_size=24
    )
    assert x0.shape == x1.shape == (64, 3) and stats["nfe"] == 80
    # Integrating the model from the noise end gives the paired sample ...
    back = integrate(model.field, x1, t0=1.0, t1=0.0, solver=SolverConfig("rk4", steps=20)).z
    torch.testing.assert_close(back, x0)
    # ... which is exactly what the sampler returns for the same noise.
    samples, _ = model.sample(64, cost, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(samples, x0)
    # And the forward solve from x0 returns to x1 (the coupling is deterministic).
    fwd = integrate(model.field, x0, solver=SolverConfig("dopri5", rtol=1e-9, atol=1e-9)).z
    torch.testing.assert_close(fwd, x1, atol=1e-4, rtol=0)


def test_reflow_target_is_consistent_for_a_straight_flow(tmp_path) -> None:
    c = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    model = FlowMatchingModel(ConstantField(c.clone()), (3,)).to(F64)
    x0, x1, _ = model.reflow_pairs(100, model.with_settings(method="euler", steps=3))
    # Straight trajectories: the regression target x1 − x0 is the field itself ...
    torch.testing.assert_close(x1 - x0, c.expand(100, 3))
    # ... so training on the model's own pairs has zero loss, unlike fresh pairs.
    torch.manual_seed(10)
    assert float(model.training_loss(torch.zeros(32, 3, dtype=F64)).loss.detach()) > 0.1
    save_pairs(tmp_path / "pairs.pt", x0, x1, source="test")
    p0, p1, meta = load_pairs(tmp_path / "pairs.pt")
    assert meta == {"source": "test"}
    model.set_reflow_pairs(p0, p1)
    out = model.training_loss(torch.zeros(32, 3, dtype=F64))
    assert float(out.loss) == pytest.approx(0.0, abs=1e-20)


def test_reflow_config_loads_pairs_and_initial_weights(tmp_path) -> None:
    torch.manual_seed(11)
    first = build_family("fm", {"hidden_dims": [8]})
    torch.save({"model": first.state_dict(), "ema": None}, tmp_path / "ckpt.pt")
    x0, x1, _ = first.reflow_pairs(50, first.with_settings(method="euler", steps=4))
    save_pairs(tmp_path / "pairs.pt", x0, x1)
    cfg = load_config(
        "configs/fm/rectified_toy.yaml",
        [
            "model.hidden_dims=[8]",
            f"model.reflow_pairs={tmp_path / 'pairs.pt'}",
            f"model.init_from={tmp_path}",
        ],
    )
    second = build_model(cfg, (2,))
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(second.pairs_x0, x0)
    with pytest.raises(ConfigError, match="model.reflow_pairs"):
        load_config("configs/fm/rectified_toy.yaml", [f"model.reflow_pairs={tmp_path / 'nope.pt'}"])
    with pytest.raises(ValueError, match="reflow pairs"):
        load_pairs(tmp_path / "ckpt.pt")


def test_config_names_are_validated() -> None:
    with pytest.raises(
        ConfigError, match="model.pairing.name: unknown pairing 'sinkhorn'; valid: ot, rectified"
    ):
        load_config("configs/fm/otcfm_toy.yaml", ["model.pairing=sinkhorn"])
    with pytest.raises(ConfigError, match="model.sigma"):
        load_config("configs/fm/otcfm_toy.yaml", ["model.sigma=-1"])
    with pytest.raises(ConfigError, match="model.ml_fraction: must be in"):
        load_config("configs/fm/otcfm_toy.yaml", ["model.ml_fraction=1"])
    with pytest.raises(ConfigError, match="model.ml_fraction: not with train.budget_seconds"):
        load_config(
            "configs/fm/otcfm_toy.yaml", ["model.ml_fraction=0.1", "train.budget_seconds=60"]
        )
    with pytest.raises(ConfigError, match="ml_divergence.name: training needs exact or hutchinson"):
        load_config("configs/fm/otcfm_toy.yaml", ["model.ml_divergence.name=auto"])


def test_ml_fine_tune_phase_trains_the_exact_nll_of_its_own_solve() -> None:
    torch.manual_seed(0)
    model = build_family(
        "fm",
        {
            "hidden_dims": [16, 16],
            "ml_fraction": 0.25,
            "ml_solver": {"name": "rk4", "steps": 3},
            "ml_divergence": {"name": "exact"},
        },
    ).double()
    x = torch.randn(64, 2, dtype=torch.float64)
    # Until the count is known (a budget warm-up) and for the first 75% of it: CFM.
    for it, planned in ((5, None), (1, 8), (6, 8)):
        model.set_iteration(it, planned)
        assert "cfm" in model.training_loss(x).stats
    # The last 25% (iterations 7 and 8 of 8): the NLL of the rk4 solve, 3 steps = 12 NFE.
    model.set_iteration(7, 8)
    out = model.training_loss(x)
    assert out.stats["nfe_forward"] == 12 and "cfm" not in out.stats
    # Brute force: the same rk4 solve of [z, log det] with the Jacobian trace by autograd.
    field = model.field

    def augmented(t: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        f = field(t, z)
        jac = torch.stack(
            [torch.autograd.functional.jacobian(lambda v: field(t, v[None])[0], zi) for zi in z]
        )
        return f, jac.diagonal(dim1=1, dim2=2).sum(1)

    z, logdet, h = x.clone(), torch.zeros(64, dtype=torch.float64), 1 / 3
    for k in range(3):  # torchdiffeq's rk4 is the 3/8 rule
        t = torch.tensor(k * h, dtype=torch.float64)
        k1 = augmented(t, z)
        k2 = augmented(t + h / 3, z + h * k1[0] / 3)
        k3 = augmented(t + 2 * h / 3, z + h * (k2[0] - k1[0] / 3))
        k4 = augmented(t + h, z + h * (k1[0] - k2[0] + k3[0]))
        z = z + h * (k1[0] + 3 * (k2[0] + k3[0]) + k4[0]) / 8
        logdet = logdet + h * (k1[1] + 3 * (k2[1] + k3[1]) + k4[1]) / 8
    nll = -(standard_normal_logprob(z) + logdet).mean()
    assert float(out.loss.detach()) == pytest.approx(float(nll), rel=1e-10)
    # Its gradient reaches the field's parameters (backprop through the solver).
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.parameters())


def test_ml_fine_tune_takes_the_last_iterations_with_a_fresh_schedule(tmp_path) -> None:
    from cnf.train.loop import Trainer

    cfg = load_config(
        "configs/fm/otcfm_toy.yaml",
        [
            *TINY,
            "model.ml_lr_scale=0.15",
            "model.hidden_dims=[16,16]",
            "train.iters=10",
            "train.batch_size=32",
            "train.log_every=1",
            "model.ml_solver.steps=2",
            "model.ml_fraction=0.2",
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg, progress=False, log=lambda _m: None)
    trainer.prepare()
    trainer.train()
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    # ml_fraction 0.2 of 10: iterations 9-10 are maximum-likelihood ones (NFE 2 x 4).
    assert [("cfm" in r) for r in recs] == [True] * 8 + [False] * 2
    assert all(r["nfe_forward"] == 8 for r in recs[8:])
    # The cosine spans optimiser steps 0-7, then starts afresh at 0.15 x lr for steps
    # 8-9 (the log gives, at iteration i, the rate of step i: the next one).
    lr = cfg.train.lr
    expected = [lr * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(1, 8)]
    expected += [0.15 * lr * 0.5 * (1 + math.cos(math.pi * k / 2)) for k in range(3)]
    assert [r["lr"] for r in recs] == [pytest.approx(v) for v in expected]


# ----------------------------------------------------------------- smoke runs
# tests/test_configs.py trains every config for two iterations in-process; here
# the digits configs go through the command line, which must report bits/dim.
FM_DIGITS_CONFIGS = ["configs/fm/rectified_digits.yaml", "configs/fm/otcfm_digits.yaml"]


@pytest.mark.parametrize("config", FM_DIGITS_CONFIGS)
def test_config_smoke_run(config: str, run_dir) -> None:
    rc, out, err = run_train(
        *TINY,
        "train.iters=2",
        "train.batch_size=32",
        "eval.solver.name=euler",
        "eval.solver.steps=2",
        f"run.dir={run_dir}",
        config=config,
    )
    assert rc == 0, err
    final = json.loads((run_dir / "final.json").read_text())
    assert final["family"] == "fm" and math.isfinite(final["test_nll"])
    assert final["test_nfe"] == 2 and final["sample_nfe"] == 2
    assert final["dataset"] == "digits"
    expected = final["test_nll"] / (64 * math.log(2)) + math.log2(17)
    assert final["test_bpd"] == pytest.approx(expected)
    assert "log2(17)" in final["bpd_convention"]
    assert "test bits/dim" in out


@pytest.mark.slow
def test_two_stage_reflow_end_to_end(tmp_path) -> None:
    from conftest import run_script

    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    common = (
        *TINY,
        "train.iters=2",
        "train.batch_size=32",
        "eval.solver.name=euler",
        "eval.solver.steps=2",
    )
    rc, _, err = run_train(*common, f"run.dir={stage1}", config="configs/fm/rectified_toy.yaml")
    assert rc == 0, err
    rc, out, err = run_script(
        "reflow.py", [str(stage1), "--num-pairs", "64", "--method", "euler", "--steps", "4"]
    )
    assert rc == 0, err
    pairs = stage1 / "reflow_pairs.pt"
    x0, x1, meta = load_pairs(pairs)
    assert x0.shape == (64, 2) and meta["cost"] == {"method": "euler", "steps": 4}
    rc, _, err = run_train(
        *common,
        f"model.reflow_pairs={pairs}",
        f"model.init_from={stage1}",
        f"run.dir={stage2}",
        config="configs/fm/rectified_toy.yaml",
    )
    assert rc == 0, err
    assert math.isfinite(json.loads((stage2 / "final.json").read_text())["test_nll"])
