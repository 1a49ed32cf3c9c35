"""The global-latent residual flow (INDM's released flow) and its variational flow term.

* Given the latent ``h`` the trunk is a bijection: the fixed-point inverse
  round-trips and its log-det equals the brute-force Jacobian's (float64,
  vectors and two-scale images).
* With ``q(h | x) = p(h)`` (an encoder and a prior set to the same Gaussian)
  ``log p(h) − log q(h | x)`` vanishes for every ``h``, so the flow term is
  exactly the log-det given ``h``.
* On a 2-D case with a 2-D latent the marginal ``log p(x) = log ∫ p(h) p(x | h) dh``
  is integrated on a grid, independently of the encoder: the prior's grid
  integral is 1, importance sampling with the model's own weights converges
  to ``log p(x)``, and the ELBO (the mean of the model's single-sample flow
  term) lies below it.
* INDM and the ``flow`` family flag their NLL as a bound with this flow only.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import math

import numpy as np
import pytest
import torch
from conftest import build_family

from cnf.evaluation import evaluate_points, summarize
from cnf.flows.base import FlowSettings, standard_normal_logprob
from cnf.flows.global_latent import GlobalLatentResidualFlow, is_variational
from cnf.flows.logdet import ExactLogDet
from cnf.flows.registry import build_flow
from cnf.models.flow import FlowModel

torch.set_num_threads(1)
F64 = torch.float64
EXACT = FlowSettings(logdet=ExactLogDet())


def _randomise(flow: GlobalLatentResidualFlow, *, shift: float, seed: int) -> None:
    """Give the encoder head, the prior's conditioners and the h-shifts non-zero weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head = flow.encoder.net[-1]
        head.weight.copy_(0.3 * torch.randn(head.weight.shape, generator=gen, dtype=F64))
        head.bias.copy_(0.2 * torch.randn(head.bias.shape, generator=gen, dtype=F64))
        for m in flow.prior.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(0.1 * torch.randn(m.weight.shape, generator=gen, dtype=F64))
        for block in flow.layers:
            for lin in getattr(getattr(block, "g", None), "shifts", []):
                lin.weight.copy_(shift * torch.randn(lin.weight.shape, generator=gen, dtype=F64))


def _vector_flow(seed: int = 0, **kw) -> GlobalLatentResidualFlow:
    torch.manual_seed(seed)
    options = dict(num_blocks=2, hidden_features=16, latent_dim=2, encoder_features=[16], tol=1e-12)
    options.update(kw)
    flow = build_flow("resflow_global", event_shape=(2,), **options).to(F64)
    flow.eval()
    return flow


def _image_flow(seed: int = 0) -> GlobalLatentResidualFlow:
    torch.manual_seed(seed)
    flow = build_flow(
        "resflow_global",
        event_shape=(1, 4, 4),
        num_scales=2,
        num_blocks=2,
        hidden_channels=8,
        latent_dim=3,
        encoder_channels=[4],
        encoder_out_channels=2,
        actnorm=True,
        tol=1e-12,
    ).to(F64)
    with torch.no_grad():  # ActNorms away from the identity
        for m in flow.layers:
            if hasattr(m, "log_scale"):
                m.log_scale.uniform_(-0.3, 0.3)
                m.bias.uniform_(-0.3, 0.3)
                m.initialized.fill_(True)
    flow.eval()
    return flow


@pytest.mark.parametrize("kind", ["vector", "image"])
def test_round_trip_and_logdet_given_h_match_brute_force(kind: str) -> None:
    flow = _vector_flow() if kind == "vector" else _image_flow()
    _randomise(flow, shift=1.0, seed=1)
    shape = (2,) if kind == "vector" else (1, 4, 4)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, *shape, generator=gen, dtype=F64)
    h = torch.randn(5, flow.latent_dim, generator=gen, dtype=F64)
    out = flow.transform_given(x, h, EXACT)
    assert out.z.shape == x.shape
    x_back, _ = flow.inverse_given(out.z, h)
    assert torch.allclose(x_back, x, atol=1e-9, rtol=0)
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(
            lambda xi, i=i: flow.transform_given(xi[None], h[i : i + 1]).z[0], x[i]
        )
        d = x[i].numel()
        brute = torch.linalg.slogdet(jac.reshape(d, d))[1]
        assert float(out.logdet[i].detach()) == pytest.approx(float(brute), abs=1e-9)
    # The latent matters: another h gives another z.
    other = flow.transform_given(x, h + 1.0, EXACT).z
    assert (other - out.z).abs().max() > 1e-3


def test_flow_term_is_the_logdet_when_q_equals_the_prior() -> None:
    flow = _vector_flow(3)
    _randomise(flow, shift=1.0, seed=4)
    with torch.no_grad():
        # The prior: couplings whose conditioners output constants, an affine
        # map u = a h + c; p(h) = N(-c/a, 1/a^2). The encoder outputs the same Gaussian.
        for m in flow.prior.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.zero_()
                m.bias.uniform_(-0.5, 0.5)
        c = flow.prior(torch.zeros(1, 2, dtype=F64))[0][0]
        a = flow.prior(torch.ones(1, 2, dtype=F64))[0][0] - c
        head = flow.encoder.net[-1]
        head.weight.zero_()
        head.bias.copy_(torch.cat([-c / a, -2 * torch.log(a.abs())]))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, generator=gen, dtype=F64)
    h = 3 * torch.randn(6, 2, generator=gen, dtype=F64)
    kl_terms = flow.prior_log_prob(h) - flow.posterior_log_prob(x, h)
    assert torch.allclose(kl_terms, torch.zeros_like(kl_terms), atol=1e-12)
    torch.manual_seed(6)
    out = flow.transform(x, EXACT)
    torch.manual_seed(6)
    h_drawn, log_q = flow.sample_posterior(x)
    assert torch.allclose(log_q, flow.posterior_log_prob(x, h_drawn), atol=1e-12)
    given = flow.transform_given(x, h_drawn, EXACT)
    assert torch.allclose(out.z, given.z, atol=1e-12)
    assert torch.allclose(out.logdet, given.logdet, atol=1e-10)


def _log_marginal_on_grid(flow, x: torch.Tensor, half_width: float, step: float):
    """``log ∫ p(h) N(f_h(x)) |det| dh`` by a Riemann sum on a square grid, and ``∫ p(h) dh``."""
    axis = torch.arange(-half_width, half_width + step / 2, step, dtype=F64)
    grid = torch.cartesian_prod(axis, axis)
    log_prior = flow.prior_log_prob(grid)
    log_cell = 2 * math.log(step)
    mass = float(torch.exp(torch.logsumexp(log_prior, 0) + log_cell))
    out = []
    for xi in x:
        given = flow.transform_given(xi.expand(len(grid), 2), grid, EXACT)
        log_joint = log_prior + standard_normal_logprob(given.z) + given.logdet
        out.append(float(torch.logsumexp(log_joint, 0) + log_cell))
    return out, mass


def test_elbo_below_the_marginal_and_importance_sampling_converges_to_it() -> None:
    flow = _vector_flow(7, num_blocks=2)
    _randomise(flow, shift=1.5, seed=8)
    model = FlowModel(flow, (2,)).to(F64)
    x = torch.tensor([[0.5, -1.0], [2.0, 0.3]], dtype=F64)
    with torch.no_grad():
        exact, mass = _log_marginal_on_grid(flow, x, half_width=9.0, step=0.04)
    assert mass == pytest.approx(1.0, abs=1e-4)  # the prior flow is a normalised density
    k = 20_000
    torch.manual_seed(9)
    for i, xi in enumerate(x):
        with torch.no_grad():
            w = model.log_prob(xi.expand(k, 2), EXACT)  # log N(f_h(x)) + flow term, h ~ q
        elbo, stderr = float(w.mean()), float(w.std() / math.sqrt(k))
        iw = float(torch.logsumexp(w, 0) - math.log(k))
        assert iw == pytest.approx(exact[i], abs=0.02), (i, iw, exact[i])
        assert elbo < exact[i] - 0.02 - 5 * stderr, (i, elbo, exact[i])


def test_bound_trains_every_part() -> None:
    flow = _vector_flow(10)
    flow.train()
    model = FlowModel(flow, (2,)).to(F64)
    loss = model.training_loss(torch.randn(32, 2, dtype=F64)).loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    parts = {"encoder": 0.0, "prior": 0.0, "layers": 0.0}
    for name, p in flow.named_parameters():
        parts[name.split(".")[0]] += float(p.grad.abs().sum())
    assert all(v > 0 for v in parts.values()), parts


def test_families_report_the_nll_as_a_bound_with_this_flow_only() -> None:
    small = {"net": {"name": "mlp", "hidden_dims": [16], "embed_dim": 8}, "nelbo_samples": 2}
    evals = {
        "solver": {"name": "dopri5", "rtol": 1e-3, "atol": 1e-3},
        "divergence": {"name": "exact"},
    }
    flow = {"name": "resflow_global", "num_blocks": 2, "hidden_features": 8, "latent_dim": 2}
    torch.manual_seed(0)
    indm = build_family("indm", {**small, "flow": flow}, eval=evals).to(F64)
    plain = build_family(
        "indm", {**small, "flow": {"name": "resflow", "num_blocks": 2}}, eval=evals
    )
    x = torch.randn(4, 2, dtype=F64)
    out = indm.evaluate(x)
    assert out.nll_is_bound and out.nll.shape == (4,) and torch.isfinite(out.nelbo).all()
    assert not plain.to(F64).evaluate(x).nll_is_bound
    assert is_variational(indm.flow) and not is_variational(plain.flow)
    samples, _ = indm.sample(3, {"sampler": "em", "steps": 5})
    assert samples.shape == (3, 2) and torch.isfinite(samples).all()

    fm = build_family("flow", {"flow": flow}).to(F64)

    class Data:  # the parts of a Dataset evaluate_points and summarize read
        eval_transform = None
        log_density = None
        entropy = None
        bpd_offset = None
        nll_offset = 0.0

    result = evaluate_points(
        fm, np.random.default_rng(0).normal(size=(8, 2)), Data(), batch_size=4, seed=1
    )
    metrics = summarize(result, Data(), prefix="test_")
    assert metrics["test_nll_is_bound"] is True
    flat = build_family("flow", {"flow": {"name": "realnvp"}}).to(F64)
    result = evaluate_points(flat, np.zeros((4, 2)), Data(), batch_size=4, seed=1)
    assert "test_nll_is_bound" not in summarize(result, Data(), prefix="test_")


@pytest.mark.parametrize(
    "options,match",
    [
        ({"latent_dim": 1}, "latent_dim must be >= 2"),
        ({"num_scales": 2}, "num_scales must be 1 for vectors"),
        ({"num_hidden_layers": 1}, "at least 3 layers"),
    ],
)
def test_bad_options_are_one_line_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_flow("resflow_global", event_shape=(2,), **options)
    with pytest.raises(ValueError, match="not divisible"):
        build_flow("resflow_global", event_shape=(1, 6, 6), num_scales=3)


def test_resflow_memory_benchmark_runs_both_modes_with_the_same_step() -> None:
    from conftest import run_script

    rc, out, err = run_script(
        "bench_resflow_memory.py", ["--config", "configs/indm/digits_ddpmpp.yaml", "--batch", "2"]
    )
    assert rc == 0, err
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")][1:]
    assert [r[0].strip() for r in rows] == ["false", "true"]
    assert rows[0][3] == rows[1][3] and rows[0][4] == rows[1][4]  # loss and gradient norm
    rc, _, err = run_script("bench_resflow_memory.py", ["--config", "configs/score/vp_digits.yaml"])
    assert rc == 2 and err.strip() == (
        "error: configs/score/vp_digits.yaml: model.flow.name is None; valid: resflow, resflow_global"
    )
