"""Mathematical checks of DiffFlow (docs/methods.md §5), float64 and seeded.

* the backward noise δ^B of a forward trajectory drives the backward chain
  back along that trajectory, to x_0 exactly;
* the checkpointed ("stochastic adjoint") backward pass equals autograd for
  parameters and inputs;
* the normalising terms D·Σ log(g_{i+1}/g_i): zero for constant g;
* Gaussian data, linear drift and linear score: the NELBO's expectation is a
  closed-form Gaussian computation, which a large Monte Carlo average matches,
  and which upper-bounds the exact −log p_B(x_0) of the backward model;
* a frozen drift gives the fixed-drift diffusion's loss, written out by hand;
* grids, schedules, samplers, Trainer hooks and the configs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from conftest import build_family
from omegaconf import OmegaConf
from torch import Tensor

from cnf.diffflow import (
    TimeGrid,
    backward_noise,
    build_diffusion,
    forward_noise,
    forward_path,
    gaussian_prior_nll,
    path_nelbo,
    run_backward,
)

REPO = Path(__file__).resolve().parent.parent


def make_model(**overrides) -> torch.nn.Module:
    """A small float64 DiffFlow with random (not zero) networks, so every term is exercised."""
    net = {"name": "mlp", "hidden_dims": [12, 12], "zero_init": False, "activation": "tanh"}
    cfg = OmegaConf.create({"steps": 6, "drift_net": net, "score_net": net})
    cfg = OmegaConf.to_container(OmegaConf.merge(cfg, OmegaConf.create(overrides)))
    torch.manual_seed(0)
    return build_family("diffflow", cfg, (3,)).double()


VARYING = {
    "diffusion": {"name": "linear", "start": 0.3, "end": 1.2},
    "base_drift": "vp",
    "grid": {"name": "power", "t_start": 0.01, "t_end": 1.0, "power": 0.7},
}


def grid_of(model, steps: int | None = None, random: bool = False) -> tuple[Tensor, Tensor]:
    return model._schedule(steps or model.steps, random=random)


# ------------------------------------------------------------ the two chains
@pytest.mark.parametrize("overrides", [{}, VARYING], ids=["released", "varying-g"])
def test_backward_noise_reproduces_forward_trajectory(overrides):
    model = make_model(**overrides)
    ts, gs = grid_of(model)
    x0 = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        states, eps = forward_path(model, x0, ts, gs, generator=torch.Generator().manual_seed(2))
        d_b, d_f = [], []
        for i in range(len(ts) - 1):
            dt = ts[i + 1] - ts[i]
            x, xn = states[i], states[i + 1]
            d_f.append(forward_noise(x, xn, model.drift(ts[i], x), gs[i], dt))
            d_b.append(
                backward_noise(
                    x, xn, model.drift(ts[i + 1], xn), model.score(ts[i + 1], xn), gs[i + 1], dt
                )
            )
        back = run_backward(model, states[-1], ts, gs, sampler="sde", noise=d_b)
    torch.testing.assert_close(back, states[0], rtol=0, atol=1e-12)
    for f, e in zip(d_f, eps):  # and the forward noise is recovered from the states
        torch.testing.assert_close(f, e, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        VARYING,
        {**VARYING, "freeze_drift": True},
        {"prior_std": 2.0, "preprocess": {"scale": 2.0}},
    ],
    ids=["released", "varying-g", "frozen-vp", "scaled"],
)
def test_checkpointed_gradients_equal_autograd(overrides):
    model = make_model(**overrides)
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x.requires_grad_(True)
    results = {}
    for mode in ("autograd", "checkpointed"):
        model.backprop = mode
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(11)  # the same grid and forward noise in both modes
        # A non-uniform outer weight checks the per-sample gradient plumbing too.
        nelbo, _ = model.nelbo(x, steps=model.steps, random_grid=True)
        (nelbo * torch.linspace(0.5, 1.5, len(nelbo), dtype=nelbo.dtype)).sum().backward()
        results[mode] = (
            nelbo.detach(),
            x.grad.clone(),
            [p.grad.clone() for p in model.parameters()],
        )
    (va, xa, pa), (vc, xc, pc) = results["autograd"], results["checkpointed"]
    torch.testing.assert_close(vc, va, rtol=0, atol=1e-12)
    torch.testing.assert_close(xc, xa, rtol=1e-10, atol=1e-12)
    assert len(pa) == len(pc) > 0
    for ga, gc in zip(pa, pc):
        torch.testing.assert_close(gc, ga, rtol=1e-10, atol=1e-12)


def test_checkpointed_reports_recomputation():
    model = make_model(backprop="checkpointed")
    x = torch.randn(4, 3, dtype=torch.float64)
    out = model.training_loss(x)
    out.loss.backward()
    n = model.steps
    assert out.stats["nfe_forward"] == 2 * n + 1  # N + 1 drift, N score evaluations
    assert out.after_backward()["nfe_backward"] == 2 * n + 1


# ------------------------------------------------------------- the NELBO terms
@pytest.mark.parametrize("overrides", [{}, VARYING], ids=["constant-g", "varying-g"])
def test_normalizing_terms(overrides):
    model = make_model(**overrides)
    ts, gs = grid_of(model)
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        with_terms = path_nelbo(model, x, ts, gs, generator=torch.Generator().manual_seed(4))
        without = path_nelbo(
            model, x, ts, gs, normalizing_terms=False, generator=torch.Generator().manual_seed(4)
        )
    expected = 3 * sum(math.log(gs[i + 1] / gs[i]) for i in range(len(gs) - 1))
    if not overrides:
        assert expected == 0.0
    else:
        assert abs(expected - 3 * math.log(1.2 / 0.3)) < 1e-12  # telescopes to D·log(g_N/g_0)
    torch.testing.assert_close(with_terms.nelbo - without.nelbo, torch.full_like(x[:, 0], expected))


class LinearDynamics:
    """``f(x, t) = a(t)·x`` and ``s(x, t) = −c(t)·x``: every chain stays Gaussian."""

    def __init__(self, a, c):
        self.a, self.c = a, c

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self.a(t) * x

    def score(self, t: Tensor, x: Tensor) -> Tensor:
        return -self.c(t) * x


def gaussian_path_nelbo(
    dyn, x0: Tensor, ts: Tensor, gs: Tensor, sigma: float
) -> tuple[float, float]:
    """Closed forms for one point ``x0``: ``(E_q[NELBO], −log p_B(x0))``.

    Per coordinate, the forward chain ``x_{i+1} = A_i x_i + σ_i ε`` gives the
    moments; the NELBO is the expectation of full Gaussian log-densities
    (normalisers from each step's own variance, written independently of
    the library's formula). The backward model is ``x_N ~ N(0, σ²)``,
    ``x_i = B_i x_{i+1} + τ_i η``, so ``p_B(x_0) = N(0, W_0)``.
    """
    n = len(ts) - 1
    total, exact = 0.0, 0.0
    for x in x0.tolist():
        m, v = x, 0.0  # mean and variance of x_i
        kl = 0.0
        for i in range(n):
            dt = float(ts[i + 1] - ts[i])
            a_i, a_n = float(dyn.a(ts[i])), float(dyn.a(ts[i + 1]))
            c_n = float(dyn.c(ts[i + 1]))
            A, s2 = 1 + a_i * dt, float(gs[i]) ** 2 * dt
            B, tau2 = 1 - (a_n + float(gs[i + 1]) ** 2 * c_n) * dt, float(gs[i + 1]) ** 2 * dt
            m_n, v_n, cov = A * m, A * A * v + s2, A * v
            e_xx = v + m * m
            e_xy = cov + m * m_n
            e_yy = v_n + m_n * m_n
            # E[−log N(x_i; B x_{i+1}, τ²)] and E[−log N(x_{i+1}; A x_i, s2)] = ½ log(2π s2) + ½.
            e_back = 0.5 * math.log(2 * math.pi * tau2) + (e_xx - 2 * B * e_xy + B * B * e_yy) / (
                2 * tau2
            )
            e_fwd = 0.5 * math.log(2 * math.pi * s2) + 0.5
            kl += e_back - e_fwd
            m, v = m_n, v_n
        total += kl + 0.5 * math.log(2 * math.pi * sigma**2) + (v + m * m) / (2 * sigma**2)
        w = sigma**2
        for i in range(n - 1, -1, -1):
            dt = float(ts[i + 1] - ts[i])
            B = 1 - (float(dyn.a(ts[i + 1])) + float(gs[i + 1]) ** 2 * float(dyn.c(ts[i + 1]))) * dt
            w = B * B * w + float(gs[i + 1]) ** 2 * dt
        exact += 0.5 * math.log(2 * math.pi * w) + x * x / (2 * w)
    return total, exact


@pytest.mark.parametrize("g", ["constant", "linear"])
def test_gaussian_nelbo_matches_closed_form(g):
    grid = TimeGrid(name="power", t_start=0.01, t_end=1.0, power=0.8)
    cfg = {
        "constant": {"value": 0.8},
        "linear": {"start": 0.4, "end": 1.5},
    }[g]
    sched = build_diffusion(g, grid, **cfg)
    ts = grid.times(8)
    gs = sched(ts)
    dyn = LinearDynamics(lambda t: -0.9 + 0.3 * t, lambda t: 0.6 + 0.2 * t)
    x0 = torch.tensor([0.7, -1.3], dtype=torch.float64)
    expected, exact_nll = gaussian_path_nelbo(dyn, x0, ts, gs, sigma=1.3)
    n_mc = 200_000
    with torch.no_grad():
        out = path_nelbo(
            dyn,
            x0.expand(n_mc, 2),
            ts,
            gs,
            prior_std=1.3,
            generator=torch.Generator().manual_seed(5),
        )
    mean = float(out.nelbo.mean())
    se = float(out.nelbo.std() / math.sqrt(n_mc))
    assert se < 0.01
    assert abs(mean - expected) < 4 * se, (mean, expected, se)
    assert expected >= exact_nll - 1e-12  # the NELBO bounds −log p_B(x_0) of the backward model


# ----------------------------------------------------------------- frozen drift
def test_frozen_drift_is_the_fixed_drift_diffusion():
    model = make_model(**VARYING, freeze_drift=True)
    assert model.drift_net is None
    assert [g["name"] for g in model.param_groups(1e-3)] == ["score"]
    ts, gs = grid_of(model)
    x0 = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = path_nelbo(model, x0, ts, gs, generator=torch.Generator().manual_seed(7)).nelbo
        # By hand: VP-like fixed drift f = −½g²x, learned score only.
        gen = torch.Generator().manual_seed(7)
        x, total = x0, torch.zeros(9, dtype=torch.float64)
        for i in range(len(ts) - 1):
            dt = ts[i + 1] - ts[i]
            eps = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            xn = x - 0.5 * gs[i] ** 2 * x * dt + gs[i] * dt.sqrt() * eps
            s = model.score_net(model.grid.normalise(ts[i + 1]), xn)
            mean_b = xn - (-0.5 * gs[i + 1] ** 2 * xn - gs[i + 1] ** 2 * s) * dt
            var_b, var_f = gs[i + 1] ** 2 * dt, gs[i] ** 2 * dt
            log_b = -0.5 * ((x - mean_b) ** 2).sum(1) / var_b - 1.5 * torch.log(2 * math.pi * var_b)
            log_f = -0.5 * (eps**2).sum(1) - 1.5 * torch.log(2 * math.pi * var_f)
            total = total - log_b + log_f
            x = xn
        total = total + gaussian_prior_nll(x, 1.0)
    torch.testing.assert_close(got, total, rtol=0, atol=1e-10)


def test_zero_init_learned_drift_starts_as_the_frozen_model():
    learned = make_model(**VARYING, drift_net={"zero_init": True})
    frozen = make_model(**VARYING, freeze_drift=True)
    frozen.score_net.load_state_dict(learned.score_net.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64)
    vals = []
    for m in (learned, frozen):
        torch.manual_seed(8)
        vals.append(m.training_loss(x).loss.detach())
    torch.testing.assert_close(vals[0], vals[1], rtol=0, atol=1e-12)


# ------------------------------------------------------------- grids, schedules
def test_time_grids():
    g = TimeGrid(name="power", t_start=0.001, t_end=0.05, power=0.9)
    t = g.times(30)
    u = torch.linspace(0.001**0.9, 0.05**0.9, 31, dtype=torch.float64)
    torch.testing.assert_close(t, u ** (1 / 0.9))  # the released ExpTimer rule
    assert t[0] == 0.001 and t[-1] == 0.05
    r = g.times(30, random=True, generator=torch.Generator().manual_seed(0))
    assert r[0] == 0.001 and r[-1] == 0.05 and bool((r[1:] > r[:-1]).all())
    cells = torch.linspace(0.001**0.9, 0.05**0.9, 30, dtype=torch.float64)
    inner = r[1:-1] ** 0.9  # one interior point per stratum
    assert bool(((inner >= cells[:-1] - 1e-15) & (inner <= cells[1:] + 1e-15)).all())
    torch.testing.assert_close(
        TimeGrid("uniform", 0.0, 1.0).times(4), torch.linspace(0, 1, 5, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="valid: power, uniform"):
        TimeGrid(name="cosine")


def test_diffusion_registry_errors():
    grid = TimeGrid("uniform", 0.0, 1.0)
    with pytest.raises(ValueError, match="valid: constant, geometric, linear, vp"):
        build_diffusion("cubic", grid)
    with pytest.raises(ValueError, match="g = 0"):
        build_diffusion("linear", grid, start=0.0, end=1.0)
    with pytest.raises(ValueError, match="diffusion 'constant'.*'start'"):
        build_diffusion("constant", grid, start=1.0)  # another schedule's option
    geo = build_diffusion("geometric", grid, start=0.1, end=10.0)
    torch.testing.assert_close(
        geo(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)),
        torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64),
    )


# ------------------------------------------------------------------ sampling
def test_sampling_costs_and_samplers():
    model = make_model(**VARYING)
    x, stats = model.sample(
        11, model.with_settings(steps=4), generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == (11, 3) and stats == {"nfe": 8, "steps": 4}
    ode = model.with_settings(sampler="ode", steps=9)
    a, _ = model.sample(5, ode, generator=torch.Generator().manual_seed(1))
    b, _ = model.sample(5, ode, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    # The sde sampler is the backward chain with fresh noise and a noise-free last step.
    gen = torch.Generator().manual_seed(2)
    ts, gs = grid_of(model, 5)
    with torch.no_grad():
        z = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        noises = {i: torch.randn(4, 3, generator=gen, dtype=torch.float64) for i in range(4, 0, -1)}
        noises[0] = None
        want = run_backward(model, z, ts, gs, noise=lambda i: noises[i])
    got, _ = model.sample(
        4, model.with_settings(steps=5), generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(got, want)
    frozen = make_model(freeze_drift=True)
    assert frozen.sample(3, frozen.with_settings(steps=7))[1]["nfe"] == 7  # no drift network
    with pytest.raises(ValueError, match="unknown setting 'method'.*valid: sampler, steps"):
        model.with_settings(method="rk4")


def test_evaluate_is_a_nelbo_with_steps():
    model = make_model()
    x = torch.randn(8, 3, dtype=torch.float64)
    out = model.evaluate(x, model.with_settings(steps=3))
    assert out.nll is None and out.nelbo.shape == (8,) and out.stats["nfe"] == 7
    assert model.default_cost_grid() == [{"steps": n} for n in (5, 10, 20, 30, 50, 100)]


def test_progressive_steps_and_param_groups():
    model = make_model(progressive_steps=[2, 4], progressive_iters=[10, 20], drift_lr=0.5)
    assert [model.steps_at(i) for i in (1, 10, 11, 20, 21)] == [2, 2, 4, 4, 6]
    model.set_iteration(15)
    assert model.training_loss(torch.randn(3, 3, dtype=torch.float64)).stats["steps"] == 4
    groups = model.param_groups(1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("drift", 0.5), ("score", 1e-3)]
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))


# ------------------------------------------------------------------- configs
def test_configs_load_and_reject_bad_names():
    from cnf.config import ConfigError, load_config
    from cnf.data import DATASETS

    for path in sorted((REPO / "configs" / "diffflow").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if cfg.data.name not in DATASETS:
            continue  # a data set another module adds
        overrides = ["data.path=/nonexistent"] if cfg.data.name in ("mnist", "cifar10") else []
        loaded = load_config(path, overrides)
        assert loaded.model.family == "diffflow"
    with pytest.raises(ConfigError, match="valid: constant, geometric, linear, vp"):
        load_config(REPO / "configs/diffflow/toy.yaml", ["model.diffusion.name=cubic"])
    with pytest.raises(ConfigError, match="valid: autograd, checkpointed"):
        load_config(REPO / "configs/diffflow/toy.yaml", ["model.backprop=adjoint"])


@pytest.mark.parametrize("config", ["toy.yaml", "digits.yaml"])
def test_config_smoke_run(tmp_path, config):
    """Two training steps of each small config end to end, into final.json."""
    from cnf.config import load_config
    from cnf.data import DATASETS
    from cnf.train.loop import Trainer

    raw = OmegaConf.load(REPO / "configs/diffflow" / config)
    if raw.data.name not in DATASETS:
        pytest.skip(f"data set {raw.data.name} not registered")
    cfg = load_config(
        REPO / "configs/diffflow" / config,
        [
            "train.iters=2",
            "train.batch_size=64",
            "data.test_size=64",
            "data.val_size=16",
            "eval.batch_size=64",
            "eval.num_samples=32",
            "eval.plots=false",
            "track.wandb=disabled",
            "model.backprop=checkpointed",
            "model.progressive_steps=[3]",  # iteration 1 with 3 steps, then model.steps
            "model.progressive_iters=[1]",
            "train.log_every=1",
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg, progress=False, log=lambda s: None)
    trainer.prepare()
    assert trainer.train() == "finished"
    assert len(trainer.optimizer.param_groups) == 2  # drift and score
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["steps"] for line in lines] == [3, cfg.model.steps]
    trainer.final_metrics()
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    for key in ("test_nelbo", "test_nelbo_stderr", "sample_nfe"):
        assert math.isfinite(final[key]), key
    assert "test_nll" not in final


@pytest.mark.slow
def test_mnist_config_builds_and_steps():
    """The cluster MNIST config (U-Nets, checkpointed backprop): one step at N = 2."""
    from cnf.config import load_config
    from cnf.models import build_model

    cfg = load_config(REPO / "configs/diffflow/mnist.yaml", ["data.path=/unused", "model.steps=2"])
    torch.manual_seed(0)
    model = build_model(cfg, (1, 28, 28))
    out = model.training_loss(torch.rand(2, 1, 28, 28))
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach())) and out.after_backward()["nfe_backward"] == 5
    assert all(p.grad is not None for p in model.score_net.parameters())
