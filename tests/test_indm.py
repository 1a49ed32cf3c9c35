"""INDM and the ``flow`` family: reduction to the score model, NELBO decomposition, sampling.

* With the identity flow INDM performs literally the score model's
  computation: same training objective (the score model's reported NELBO),
  same gradients, same NLL and NELBO, same samples — for the same weights and
  the same random numbers (float64, bitwise where the operations coincide).
* The INDM NELBO equals −log|det ∂h/∂x| plus the latent NELBO computed
  separately with :func:`cnf.diffusion.score.nelbo`; likewise the NLL with
  :func:`cnf.diffusion.likelihood.probability_flow_nll`.
* The ``flow`` family's NLL is the change of variables with an exact log-det;
  a residual flow is evaluated with the exact log-det in low dimension.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import math

import pytest
import torch
from conftest import build_family

from cnf.config import ConfigError, load_config
from cnf.diffusion.likelihood import probability_flow_nll
from cnf.diffusion.score import nelbo as latent_nelbo
from cnf.flows.base import FlowSettings, standard_normal_logprob
from cnf.flows.logdet import ExactLogDet
from cnf.models.flow import FlowModel
from cnf.models.indm import INDM

torch.set_num_threads(1)
F64 = torch.float64
EVAL = {"solver": {"name": "dopri5", "rtol": 1e-4, "atol": 1e-4}, "divergence": {"name": "exact"}}
SOLVER_KW = {"solver": {"name": "dopri5", "rtol": 1e-4, "atol": 1e-4}}
NET = {"name": "mlp", "hidden_dims": [32, 32], "embed_dim": 8}
SMALL = {"net": NET, "nelbo_samples": 4}
EXACT = FlowSettings(logdet=ExactLogDet())


def _pair(scale: float = 1.0, shift: float = 0.0):
    """A score model and an identity-flow INDM with the same score-network weights."""
    pre = {"scale": scale, "shift": shift}
    torch.manual_seed(0)
    score = build_family("score", {**SMALL, "preprocess": pre}, eval=EVAL).to(F64)
    indm = build_family(
        "indm", {**SMALL, "flow": {"name": "identity"}, "preprocess": pre}, eval=EVAL
    ).to(F64)
    indm.latent.load_state_dict(score.state_dict())
    return score, indm


def _data(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (0.5, 0.3)])
def test_identity_flow_training_loss_equals_score_model(scale, shift):
    score, indm = _pair(scale, shift)
    x = _data()
    torch.manual_seed(5)
    out_s = score.training_loss(x)
    out_s.loss.backward()
    torch.manual_seed(5)
    out_i = indm.training_loss(x)
    out_i.loss.backward()
    # INDM's loss is the NELBO; the score model reports the same NELBO as a
    # statistic (its loss is the DSM term, which differs by θ-free closed forms).
    assert float(out_i.loss.detach()) == pytest.approx(out_s.stats["nelbo"], rel=1e-14)
    assert out_i.stats["dsm"] == float(out_s.loss.detach())
    for (name, p_s), p_i in zip(score.named_parameters(), indm.latent.parameters()):
        assert torch.equal(p_s.grad, p_i.grad), name


@pytest.mark.parametrize("scale,shift", [(1.0, 0.0), (2.0, -1.0)])
def test_identity_flow_evaluation_equals_score_model(scale, shift):
    score, indm = _pair(scale, shift)
    x = _data(4)
    torch.manual_seed(7)
    ev_s = score.evaluate(x)
    torch.manual_seed(7)
    ev_i = indm.evaluate(x)
    assert torch.equal(ev_s.nll, ev_i.nll)
    assert torch.equal(ev_s.nelbo, ev_i.nelbo)
    assert ev_s.stats["nfe"] == ev_i.stats["nfe"]
    # The [0, ε] correction follows the score model's setting, with the same noise.
    torch.manual_seed(8)
    a = score.evaluate(x, score.with_settings(correction="perturb", nelbo_samples=0)).nll
    torch.manual_seed(8)
    b = indm.evaluate(x, indm.with_settings(correction="perturb", nelbo_samples=0)).nll
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ["em", "pc", "ode"])
def test_identity_flow_samples_equal_score_model(sampler):
    score, indm = _pair(2.0, -1.0)
    cost = {"sampler": sampler, "steps": 5} if sampler != "ode" else {"sampler": "ode"}
    g = torch.Generator
    xs, _ = score.sample(6, score.with_settings(cost), generator=g().manual_seed(3))
    xi, _ = indm.sample(6, indm.with_settings(cost), generator=g().manual_seed(3))
    assert torch.equal(xs, xi)


def _indm(flow: dict, shape=(2,)) -> INDM:
    torch.manual_seed(0)
    cfg = {**SMALL, "flow": flow}
    if len(shape) == 3:
        cfg["net"] = {"name": "unet", "channels": 8, "channel_mults": [1], "groups": 4}
        cfg["net"]["attention"] = False
    data = {"name": "digits", "flatten": False} if len(shape) == 3 else None
    model = build_family("indm", cfg, shape, eval=EVAL, data=data).to(F64)
    # Non-trivial flow parameters (zero-initialised couplings would be the identity).
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


@pytest.mark.parametrize(
    "flow",
    [
        {"name": "realnvp", "num_layers": 2, "hidden_features": 16},
        {"name": "resflow", "num_blocks": 2, "hidden_features": 16, "logdet": {"name": "roulette"}},
    ],
)
def test_nelbo_and_nll_decompose(flow):
    model = _indm(flow)
    x = _data(8)
    torch.manual_seed(11)
    ev = model.evaluate(x)
    assert ev.stats["flow_logdet_exact"] == 1.0
    # Separately: exact flow log-det, then the latent quantities with the same RNG.
    with torch.no_grad():
        out = model.flow.transform(x, EXACT)
    z, logdet = out.z, out.logdet
    assert logdet.abs().max() > 1e-3  # the flow is not volume preserving
    torch.manual_seed(11)
    nll_z, _ = probability_flow_nll(model.latent.score, model.sde, z, solver=model.settings.solver)
    with torch.no_grad():
        nelbo_z = latent_nelbo(model.latent.score, model.sde, z, num_t=4, chunk=z.shape[0])
    torch.testing.assert_close(ev.nll, nll_z - logdet, rtol=0, atol=1e-10)
    torch.testing.assert_close(ev.nelbo, nelbo_z - logdet, rtol=0, atol=1e-10)


def test_training_loss_is_the_nelbo_and_trains_both_networks():
    model = _indm({"name": "realnvp", "num_layers": 2, "hidden_features": 16}).train()
    x = _data(32)
    out = model.training_loss(x)
    out.loss.backward()
    assert out.stats["nelbo"] == pytest.approx(float(out.loss.detach()))
    assert all(p.grad is not None for p in model.flow.parameters())
    assert all(p.grad is not None for p in model.latent.parameters())
    groups = model.param_groups(1e-3)
    assert [g["name"] for g in groups] == ["flow", "score"]
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))


@pytest.mark.parametrize("sampler", ["em", "pc", "ode"])
def test_sampling_shapes_and_temperature(sampler):
    flow = {"name": "resflow", "num_blocks": 1, "hidden_features": 16, "logdet": {"name": "exact"}}
    model = _indm(flow)
    cost = {"sampler": sampler, "steps": 5} if sampler != "ode" else {"sampler": "ode"}
    g = torch.Generator
    x, stats = model.sample(7, model.with_settings(cost), generator=g().manual_seed(0))
    assert x.shape == (7, 2) and torch.isfinite(x).all() and stats["nfe"] > 0
    cold = model.with_settings({**cost, "temperature": 1e-3})
    x0, _ = model.sample(7, cold, generator=g().manual_seed(0))
    assert torch.isfinite(x0).all()


def test_image_indm_samples_and_evaluates():
    flow = {"name": "realnvp", "num_scales": 1, "final_steps": 2, "hidden_channels": 4}
    model = _indm(flow, shape=(1, 4, 4))
    x = torch.rand(3, 1, 4, 4, dtype=F64)
    ev = model.evaluate(x, model.with_settings(method="rk4", steps=4))
    assert ev.nll.shape == (3,) and torch.isfinite(ev.nll).all() and torch.isfinite(ev.nelbo).all()
    s, _ = model.sample(2, model.with_settings(sampler="em", steps=3))
    assert s.shape == (2, 1, 4, 4) and torch.isfinite(s).all()


def test_indm_validation_errors():
    toy = "configs/indm/toy.yaml"
    load_config(toy)
    with pytest.raises(ConfigError, match="model.flow.name: unknown flow 'x'"):
        load_config(toy, ["model.flow.name=x"])
    with pytest.raises(ConfigError, match="unknown config key 'model.flow.bogus'"):
        load_config(toy, ["model.flow.name=realnvp", "model.flow.bogus=1"])
    with pytest.raises(ConfigError, match="model.weighting"):
        load_config(toy, ["model.weighting=variance"])
    with pytest.raises(ConfigError, match="unknown config key 'model.flow.num_blocks'"):
        load_config(toy, ["model.flow.name=identity", "model.flow.num_blocks=1"])


# ------------------------------------------------------------------ the flow family
@pytest.mark.parametrize(
    "flow",
    [
        {"name": "nice", "num_layers": 2, "hidden_features": 8},
        {"name": "realnvp", "num_layers": 2, "hidden_features": 8},
        {"name": "glow", "num_steps": 2, "hidden_features": 8},
        {"name": "resflow", "num_blocks": 2, "hidden_features": 8},
    ],
)
def test_flow_model_nll_is_change_of_variables(flow):
    torch.manual_seed(0)
    model = build_family("flow", {"flow": flow, "preprocess": {"scale": 0.5, "shift": 0.1}})
    model = model.to(F64)
    x = _data(16)
    model.train()
    model.training_loss(x).loss.backward()  # initialises ActNorm, updates spectral norms
    ev = model.evaluate(x)
    assert ev.stats["flow_logdet_exact"] == 1.0
    # Brute force: log N(f(y)) + log|det ∂f/∂x| from the full Jacobian of x -> z.
    model.eval()

    def fz(v):
        return model.flow.transform(0.5 * v[None] + 0.1, EXACT).z[0]

    expected = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(fz, xi)
        z = fz(xi)[None]
        expected.append(-(standard_normal_logprob(z)[0] + torch.linalg.slogdet(jac)[1]))
    torch.testing.assert_close(ev.nll, torch.stack(expected), rtol=0, atol=1e-8)
    s, _ = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, 2) and torch.isfinite(s).all()


def test_flow_model_logit_preprocessing_and_series_mode():
    torch.manual_seed(0)
    model = build_family(
        "flow",
        {
            "flow": {"name": "resflow", "num_blocks": 1, "hidden_channels": 4},
            "preprocess": {"logit_alpha": 0.05},
            "eval_logdet": {"exact_max_dim": 4},
        },
        (1, 4, 4),
        data={"name": "digits", "flatten": False},
    ).to(F64)
    x = torch.rand(4, 1, 4, 4, dtype=F64)
    model.train()
    model.training_loss(x)
    series = model.evaluate(x)
    assert series.stats["flow_logdet_exact"] == 0.0  # 16 > 4: the power series
    exact = model.evaluate(x, model.with_settings(logdet="exact"))
    assert exact.stats["flow_logdet_exact"] == 1.0
    assert (series.nll - exact.nll).abs().max() < 0.5
    own = model.evaluate(x, model.with_settings(logdet="own"))  # the training estimator
    assert own.stats["flow_logdet_exact"] == 0.0 and torch.isfinite(own.nll).all()
    s, _ = model.sample(3)
    assert s.shape == (3, 1, 4, 4) and torch.isfinite(s).all()
    assert math.isfinite(float(exact.nll.mean()))


def test_flow_validation():
    toy = "configs/flows/realnvp_toy.yaml"
    with pytest.raises(ConfigError, match="model.flow.name: unknown flow 'identity'"):
        load_config(toy, ["model.flow.name=identity"])
    with pytest.raises(ConfigError, match="model.preprocess.logit_alpha"):
        load_config(toy, ["model.preprocess.logit_alpha=0.7"])
    assert isinstance(build_family("flow"), FlowModel)
