"""FFJORD and RNODE on images: conv time layers, the multi-scale CNF, Hutchinson in high dimension.

* the convolutional time layers keep the spatial size, depend on time as
  stated (``concat`` = the convolution of ``[t, h]``), and a zero-initialised
  last layer makes the CNF the identity;
* the multi-scale CNF (FFJORD's ODENVP) has the original's layout, is a
  bijection, and its log-determinant equals ``log|det|`` of the brute-force
  Jacobian of the whole map (float64, exact trace, 1×4×4 and 3×8×8 images);
* Hutchinson's estimate with many probes converges to the exact-trace NLL,
  ``K`` probes cost one VJP per function evaluation, and the probe standard
  error reported by :func:`cnf.evaluation.summarize` matches the closed-form
  variance of the estimator;
* RNODE's regularisers and statistics add up over the blocks, with the
  released code's per-dimension normalisation;
* config errors, horizontal flips, sweeps listing several base configs and the table specs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, PlainField, build_family, run_script
from omegaconf import OmegaConf
from torch import Tensor, nn

from cnf.config import ConfigError, load_config, to_dict
from cnf.data import Dataset, batch_rng, build_dataset
from cnf.data.images import flip_horizontally
from cnf.divergence import DivergenceEstimator, ExactDivergence, HutchinsonDivergence
from cnf.evaluation import evaluate_points, summarize
from cnf.flows.base import DEFAULT_SETTINGS, Flow, FlowSettings, IdentityFlow, SequentialFlow
from cnf.flows.cnf import CNF
from cnf.flows.multiscale import count_scales, multiscale_cnf
from cnf.models.ffjord import FFJORD, REGULARIZER_NORMS, ODESettings
from cnf.nets import CONV_LAYERS, ConcatConv2d, TimeConvNet
from cnf.solve import SolverConfig
from cnf.sweep import load_sweep, manifest_text, plan
from cnf.tables import build_table, load_table_spec

F64 = torch.float64
TIGHT = SolverConfig(name="dopri5", rtol=1e-8, atol=1e-8)


def perturb_(module: nn.Module, scale: float, seed: int = 0) -> nn.Module:
    """Add Gaussian noise to every parameter (reproducibly): no layer is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def conv_block(shape: tuple[int, int, int], *, seed: int = 0, **cnf_kw) -> CNF:
    """A CNF block with a small random conv field, exact trace, tight dopri5, float64."""
    torch.manual_seed(seed + shape[0])
    field = TimeConvNet(shape[0], (6,), layer="concatsquash", activation="softplus").to(F64)
    perturb_(field, 0.05, seed)
    return CNF(field, solver=TIGHT, divergence=ExactDivergence(), **cnf_kw)


def images(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------ conv layers
@pytest.mark.parametrize("name", sorted(CONV_LAYERS))
def test_conv_layers_keep_the_spatial_size_and_depend_on_time(name: str) -> None:
    torch.manual_seed(0)
    layer = CONV_LAYERS[name](3, 5).to(F64)
    perturb_(layer, 0.1)
    x = images(4, 3, 6, 7)
    y0 = layer(torch.tensor([[0.2]], dtype=F64), x)
    y1 = layer(torch.tensor([[0.7]], dtype=F64), x)
    assert y0.shape == (4, 5, 6, 7)
    if name == "ignore":
        assert torch.equal(y0, y1)
    else:
        assert (y0 - y1).abs().max() > 1e-3
    # One time per sample equals one call per sample.
    tt = torch.tensor([[0.2], [0.7], [0.2], [0.7]], dtype=F64)
    per_sample = layer(tt, x)
    torch.testing.assert_close(per_sample[0::2], y0[0::2])
    torch.testing.assert_close(per_sample[1::2], y1[1::2])


def test_concat_conv_is_the_convolution_of_time_and_state() -> None:
    """FFJORD's ``concat``: a constant time channel concatenated in front, zero padding included."""
    torch.manual_seed(0)
    layer = ConcatConv2d(2, 4).to(F64)
    x = images(3, 2, 5, 5)
    t = 0.37
    plane = torch.full((3, 1, 5, 5), t, dtype=F64)
    expected = F.conv2d(torch.cat([plane, x], 1), layer.conv.weight, layer.conv.bias, padding=1)
    torch.testing.assert_close(
        layer(torch.tensor([[t]], dtype=F64), x), expected, rtol=1e-12, atol=1e-12
    )


def test_conv_net_shapes_and_errors() -> None:
    net = TimeConvNet(3, (8, 8), layer="concat", activation="swish")
    assert [type(m).__name__ for m in net.layers] == ["ConcatConv2d"] * 3
    assert net(0.5, torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)
    assert net(torch.rand(2), torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="convolutional layer type 'add'"):
        TimeConvNet(3, (8,), layer="add")


@pytest.mark.parametrize("name", sorted(CONV_LAYERS))
@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_zero_init_gives_the_identity_flow(name: str, divergence: str) -> None:
    torch.manual_seed(0)
    net = TimeConvNet(2, (4,), layer=name, zero_init=True).to(F64)
    x = images(3, 2, 4, 4)
    assert torch.equal(net(0.3, x), torch.zeros_like(x))
    est = ExactDivergence() if divergence == "exact" else HutchinsonDivergence(num_probes=3)
    block = CNF(net, solver=SolverConfig(name="rk4", steps=2), divergence=est)
    out = block.transform(x)
    assert torch.equal(out.z, x) and torch.equal(out.logdet, torch.zeros(3, dtype=F64))


# ------------------------------------------------------------------ multi-scale
def test_number_of_scales_is_ffjords() -> None:
    assert [count_scales(s, s) for s in (28, 32, 8, 4, 3)] == [3, 4, 2, 1, 0]
    assert count_scales(64, 8) == 2  # the smaller side decides


@pytest.mark.parametrize(
    "shape, blocks",
    [
        ((1, 28, 28), [(1, 28, 28)] * 2 + [(4, 14, 14)] * 2 + [(2, 14, 14)] * 2 + [(8, 7, 7)] * 2 + [(4, 7, 7)] * 2),
        ((3, 32, 32), [(3, 32, 32)] * 2 + [(12, 16, 16)] * 2 + [(6, 16, 16)] * 2 + [(24, 8, 8)] * 2
         + [(12, 8, 8)] * 2 + [(48, 4, 4)] * 2 + [(24, 4, 4)] * 2),
    ],
)  # fmt: skip
def test_multiscale_layout_is_the_originals(shape, blocks) -> None:
    """2 blocks, squeeze, 2 blocks, factor out half, per scale; 10 blocks for MNIST, 14 for CIFAR-10."""
    seen: list[tuple[int, int, int]] = []

    def block(s: tuple[int, int, int]) -> Flow:
        seen.append(s)
        return IdentityFlow()

    flow = multiscale_cnf(shape, block, num_blocks=2)
    assert seen == blocks
    x = torch.randn(2, *shape)
    z, logdet = flow(x)
    assert z.shape == x.shape and torch.equal(logdet, torch.zeros(2))
    torch.testing.assert_close(flow.inverse(z), x)


def test_multiscale_rejects_what_it_cannot_squeeze() -> None:
    with pytest.raises(ValueError, match="H and W >= 4"):
        multiscale_cnf((1, 3, 3), lambda s: IdentityFlow())
    with pytest.raises(ValueError, match="divisible by"):
        multiscale_cnf((1, 9, 9), lambda s: IdentityFlow())  # 2 scales need an even 9


class NoTrace(DivergenceEstimator):
    """No log-determinant state: the solves compute the map ``x -> z`` alone (for its Jacobian)."""

    def _forward_mode(self, field, t, z, probe, *, frobenius):
        return field(t, z), z.new_zeros(z.shape[0]), None


def brute_force_logdet(flow: Flow, x: Tensor) -> Tensor:
    """``log|det ∂z/∂x|`` per sample from the Jacobian of the whole flattened map ``x -> z``."""
    shape = x.shape[1:]
    settings = FlowSettings(divergence=NoTrace())

    def flat_map(v: Tensor) -> Tensor:
        return flow.transform(v.reshape(1, *shape), settings).z.flatten()

    out = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(flat_map, xi.flatten(), vectorize=True)
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


@pytest.mark.parametrize(
    "shape, num_scales", [((1, 4, 4), 0), ((1, 4, 4), 2), ((3, 8, 8), 0)], ids=str
)
def test_multiscale_cnf_round_trip_and_logdet_vs_brute_force(shape, num_scales) -> None:
    flow = multiscale_cnf(shape, conv_block, num_blocks=1, num_scales=num_scales)
    x = images(2, *shape, seed=1)
    with torch.no_grad():
        out = flow.transform(x)
    assert out.z.shape == x.shape
    assert out.stats.nfe_forward > 0
    torch.testing.assert_close(out.logdet, brute_force_logdet(flow, x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        back, stats = flow.inverse_transform(out.z)
    torch.testing.assert_close(back, x, rtol=1e-6, atol=1e-6)
    assert stats.nfe_forward > 0
    assert abs(float(out.logdet.abs().max())) > 1e-3  # not an identity map


def test_ffjord_log_prob_of_the_whole_chain_vs_brute_force() -> None:
    """Logit preprocessing + multi-scale CNF + N(0, I) on every factored-out part: one density."""
    shape = (1, 4, 4)
    flow = multiscale_cnf(shape, conv_block, num_blocks=1, num_scales=2)
    settings = ODESettings(solver=TIGHT)
    model = FFJORD(flow, shape, preprocess=build_preprocess(1e-3), settings=settings).to(F64)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    chain = SequentialFlow([model.preprocess, model.flow])
    with torch.no_grad():
        z = chain(x)[0]
        logp = model.log_prob(x)
    log_n = -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * 16 * math.log(2 * math.pi)
    expected = log_n + brute_force_logdet(chain, x)
    torch.testing.assert_close(logp, expected, rtol=1e-6, atol=1e-6)
    # Sampling runs the scales in reverse: the sample maps back to its base draw.
    g = torch.Generator().manual_seed(3)
    xs = model.sample(2, generator=g).x
    zs = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(chain(xs)[0], zs, rtol=1e-6, atol=1e-6)


def build_preprocess(alpha: float):
    from cnf.flows.preprocess import Preprocess

    return Preprocess(logit_alpha=alpha)


# ------------------------------------------------------------------ the family
SMALL = {
    "architecture": "multiscale",
    "hidden_dims": [8],
    "layer": "concat",
    "activation": "softplus",
    "num_blocks": 1,
    "zero_init": False,
    "divergence": {"name": "hutchinson", "probe": "rademacher"},
    "solver": {"name": "rk4", "steps": 4},
    "preprocess": {"logit_alpha": 0.05},
}


def digits(n: int, seed: int = 0) -> Tensor:
    data = build_dataset("digits", flatten=False)
    return torch.as_tensor(data.sample_train(batch_rng(seed, 1), n), dtype=torch.float32)


def test_training_statistics_and_regularisers_add_up_over_blocks(monkeypatch) -> None:
    torch.manual_seed(0)
    model = build_family(
        "ffjord", {**SMALL, "kinetic": 0.01, "jacobian": 0.01, "learn_time": True}, (1, 8, 8)
    )
    assert len(model.cnfs) == 3  # 8x8: 2 scales, 1 block before and after the squeeze
    out = model.training_loss(digits(8))
    assert out.stats["nfe_forward"] == 3 * 16  # rk4: 4 steps x 4 stages per block
    out.loss.backward()
    assert out.after_backward()["nfe_backward"] == 0  # backprop through the solver
    assert all(c.log_T.grad is not None and c.log_T.grad != 0 for c in model.cnfs)
    assert math.isclose(out.stats["T"], sum(float(c.T.detach()) for c in model.cnfs), rel_tol=1e-6)
    # What the chain reports is the sum of what every block returned, through
    # the squeezes and factor-outs of the multi-scale levels.
    seen = []
    transform = CNF.transform

    def recording(self, x, settings=DEFAULT_SETTINGS):
        result = transform(self, x, settings)
        seen.append(result)
        return result

    monkeypatch.setattr(CNF, "transform", recording)
    _, chain = model.chain_log_prob(digits(8), FlowSettings(regularize=True))
    assert len(seen) == 3
    for name in ("kinetic", "jacobian"):
        total = sum(r.regularizers[name] for r in seen)
        assert float(total.detach().min()) > 0
        torch.testing.assert_close(chain.regularizers[name], total)
    assert chain.stats.nfe_forward == sum(r.stats.nfe_forward for r in seen)
    preprocess_logdet = model.preprocess(digits(8))[1]
    torch.testing.assert_close(chain.logdet, preprocess_logdet + sum(r.logdet for r in seen))


def test_rnode_per_dim_normalisation_scales_each_block() -> None:
    """``per_dim``: block b's integrals × D ln2/(2 d_b) (kinetic) and D ln2/d_b (Jacobian)."""
    norm = REGULARIZER_NORMS["per_dim"]
    assert norm(784, 784) == pytest.approx({"kinetic": math.log(2) / 2, "jacobian": math.log(2)})
    assert norm(196, 784)["jacobian"] == pytest.approx(4 * math.log(2))
    assert REGULARIZER_NORMS["sum"](196, 784) == {}
    x = digits(4)
    regs = {}
    for mode in ("sum", "per_dim"):
        torch.manual_seed(0)
        cfg = {**SMALL, "kinetic": 0.01, "jacobian": 0.01, "regularizer_norm": mode}
        model = build_family("ffjord", cfg, (1, 8, 8))
        torch.manual_seed(1)
        regs[mode] = model.chain_log_prob(x, FlowSettings(regularize=True))[1].regularizers
        dims = [math.prod(s) for s in ((1, 8, 8), (4, 4, 4), (2, 4, 4))]
    # With a single-dimension ratio per block: digits blocks have d_b = 64, 64, 32.
    assert dims == [64, 64, 32]
    for name in ("kinetic", "jacobian"):
        assert torch.all(regs["per_dim"][name] >= regs["sum"][name] * norm(64, 64)[name] * 0.999)
        assert torch.all(regs["per_dim"][name] <= regs["sum"][name] * norm(32, 64)[name] * 1.001)


def _loss_and_grads(unit: str, adjoint: bool, x: Tensor) -> tuple[Tensor, list[Tensor], int]:
    torch.manual_seed(0)
    solver = {"name": "dopri5", "rtol": 1e-6, "atol": 1e-6, "adjoint": adjoint}
    cfg = {**SMALL, "loss_unit": unit, "solver": solver, "divergence": {"name": "exact"}}
    model = build_family("ffjord", cfg, (1, 8, 8)).to(F64)
    perturb_(model, 0.2)
    out = model.training_loss(x)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return out.loss.detach(), grads, out.after_backward()["nfe_backward"]


def test_bits_per_dim_loss_unit_scales_the_objective_and_eases_the_adjoint() -> None:
    """``loss_unit: bits_per_dim`` divides the objective (and its gradient) by D ln 2.

    With the adjoint, the backward solve's absolute tolerance then meets an
    adjoint state D ln 2 times smaller: same gradient, fewer backward steps.
    """
    x = digits(4).to(F64)
    scale = 64 * math.log(2.0)
    loss_n, grads_n, nfe_n = _loss_and_grads("nats", False, x)
    loss_b, grads_b, nfe_b = _loss_and_grads("bits_per_dim", False, x)
    assert nfe_n == nfe_b == 0
    torch.testing.assert_close(loss_b, loss_n / scale, rtol=1e-12, atol=0)
    for gn, gb in zip(grads_n, grads_b):
        torch.testing.assert_close(gb, gn / scale, rtol=1e-9, atol=1e-12)
    _, adj_n, back_n = _loss_and_grads("nats", True, x)
    _, adj_b, back_b = _loss_and_grads("bits_per_dim", True, x)
    for ref, gn, gb in zip(grads_n, adj_n, adj_b):
        # Both adjoints agree with backprop to the solver's tolerance.
        torch.testing.assert_close(gn, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
        torch.testing.assert_close(gb * scale, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
    assert 0 < back_b < back_n
    with pytest.raises(ConfigError, match="model.loss_unit: unknown training loss unit 'bpd'"):
        load_config(REPO / "configs/ffjord/digits.yaml", ["model.loss_unit=bpd"])


def test_conv_single_scale_architecture() -> None:
    model = build_family(
        "ffjord",
        {**SMALL, "architecture": "conv", "num_blocks": 2},
        (1, 8, 8),
        eval={"solver": {"name": "rk4", "steps": 2}},
    )
    assert len(model.cnfs) == 2 and isinstance(model.flow, SequentialFlow)
    assert model.evaluate(digits(3)).nll.shape == (3,)


# ------------------------------------------------------------------ Hutchinson
def test_probes_cost_one_vjp_per_function_evaluation(monkeypatch) -> None:
    """K probes in one batched VJP: autograd.grad is called once per evaluation, not K times."""
    calls = []
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    net = PlainField(perturb_(TimeConvNet(2, (8,), layer="concat"), 0.1))
    est = HutchinsonDivergence("rademacher", num_probes=16, per_probe=True)
    block = CNF(net, solver=SolverConfig(name="rk4", steps=3), divergence=est)
    with torch.no_grad():
        out = block.transform(torch.randn(5, 2, 4, 4))
    assert out.stats.nfe_forward == 12
    assert len(calls) == 12 and all(calls)
    assert out.logdet_probes.shape == (5, 16)
    torch.testing.assert_close(out.logdet, out.logdet_probes.mean(1))


def test_forward_mode_probes_cost_one_convolution_per_layer(monkeypatch) -> None:
    """With ``forward_with_jvp`` the K probes ride along as tangents: no autograd.grad at all,
    and one convolution per layer carries all K of them (no loop over probes)."""
    grads, convs = [], []
    grad, conv2d = torch.autograd.grad, F.conv2d
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: grads.append(1) or grad(*a, **k))

    def counting_conv(x, *args, **kwargs):
        convs.append(x.shape[0])
        return conv2d(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", counting_conv)
    net = perturb_(TimeConvNet(2, (8,), layer="concat"), 0.1)
    est = HutchinsonDivergence("rademacher", num_probes=16, per_probe=True)
    block = CNF(net, solver=SolverConfig(name="rk4", steps=3), divergence=est)
    with torch.no_grad():
        out = block.transform(torch.randn(5, 2, 4, 4))
    assert out.stats.nfe_forward == 12 and not grads
    # Per evaluation and layer: the state (5), the time plane (1), the 16 x 5 tangents at once.
    assert sorted(convs) == sorted([5, 1, 80] * 2 * 12)
    assert out.logdet_probes.shape == (5, 16)


@pytest.mark.parametrize("layer", sorted(CONV_LAYERS))
def test_forward_mode_probes_equal_the_vjp_ones(layer: str) -> None:
    """``εᵀ(Aε)`` by forward mode is ``(εᵀA)ε`` by the VJP, per probe, with equal gradients (float64);
    its Frobenius estimate ``‖Aε‖²`` is ``εᵀAᵀAε`` with ``A`` the brute-force Jacobian."""
    torch.manual_seed(3)
    net = perturb_(TimeConvNet(2, (6, 5), layer=layer), 0.2).double()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    t = torch.tensor(0.4, dtype=torch.float64)
    est = HutchinsonDivergence("rademacher", num_probes=4, per_probe=True)
    probe = est.draw_probe(x)
    results = []
    for field in (net, PlainField(net)):
        f, div, frob = est.evaluate(field, t, x, probe, frobenius=True)
        loss = f.pow(2).sum() + div.sin().sum()  # the Frobenius estimates differ (‖Aε‖², ‖εᵀA‖²)
        results.append((f, div, frob, torch.autograd.grad(loss, list(net.parameters()))))
    (f1, d1, fr1, g1), (f2, d2, _, g2) = results
    torch.testing.assert_close(f1, f2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d1, d2, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g2):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    jac = torch.stack(
        [
            torch.autograd.functional.jacobian(lambda v: net(t, v[None])[0].flatten(), xi).flatten(
                1
            )
            for xi in x
        ]
    )  # (B, D, D)
    eps = probe.flatten(2)  # (K, B, D)
    a_eps = torch.einsum("bij,kbj->kbi", jac, eps)
    torch.testing.assert_close(d1, torch.einsum("kbi,kbi->bk", eps, a_eps), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fr1, a_eps.pow(2).sum(2).mean(0), rtol=1e-10, atol=1e-12)


def test_many_probes_converge_to_the_exact_trace_nll_on_digits() -> None:
    """Tolerance: 0.01 bits/dim on the mean over 8 digits, and within 4 probe standard errors."""
    torch.manual_seed(0)
    model = build_family("ffjord", SMALL, (1, 8, 8)).to(F64)
    perturb_(model, 0.05)
    x = digits(8).double()
    exact = model.evaluate(
        x, {"divergence.name": "exact", "solver.rtol": 1e-7, "solver.atol": 1e-7}
    )
    assert exact.nll_probes is None
    torch.manual_seed(1)
    hutch = model.evaluate(
        x,
        {
            "divergence.name": "hutchinson",
            "num_probes": 64,
            "solver.rtol": 1e-7,
            "solver.atol": 1e-7,
        },
    )
    assert hutch.nll_probes.shape == (8, 64)
    to_bpd = 1 / (64 * math.log(2))
    diff = float((hutch.nll - exact.nll).mean()) * to_bpd
    from cnf.metrics import probe_stderr

    se = probe_stderr(hutch.nll_probes) * to_bpd
    assert se > 1e-4  # the probes really are noisy: agreement is not by construction
    assert abs(diff) < 0.01 and abs(diff) < 4 * se, (diff, se)


class LinearField(nn.Module):
    def __init__(self, a: Tensor):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        return z @ self.a.T


def test_probe_stderr_matches_the_closed_form_variance() -> None:
    """Linear field: each probe's log-det is T εᵀAε, variance 2T²(‖S‖²_F − Σ A_ii²) (Rademacher)."""
    d, n, k, big_t = 6, 3000, 4, 0.7
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.3
    block = CNF(LinearField(a), time_length=big_t)
    settings = ODESettings(solver=SolverConfig(name="rk4", steps=20))
    settings = dataclasses.replace(settings, divergence=_config("hutchinson", k))
    model = FFJORD(SequentialFlow([block]), (d,), settings=settings)
    x = np.random.default_rng(0).standard_normal((n, d))
    data = Dataset("file", (d,), x[:10], x, lambda rng, m: x[:m], kind="tabular")
    result = evaluate_points(model, x, data, batch_size=1000, seed=0)
    summary = summarize(result, data, prefix="test_")
    s = (a + a.T) / 2
    var = 2 * big_t**2 * (s.pow(2).sum() - a.diagonal().pow(2).sum())
    expected = math.sqrt(float(var) / (k * n))
    assert summary["test_nll_probes"] == k
    assert summary["test_nll_probe_stderr"] == pytest.approx(expected, rel=0.08)
    # Over the points the standard error also carries the data's own spread.
    assert summary["test_nll_stderr"] > 1.5 * summary["test_nll_probe_stderr"]


def _config(name: str, k: int):
    from cnf.divergence import DivergenceConfig

    return DivergenceConfig(name, probe="rademacher", num_probes=k)


def test_image_summary_reports_probe_stderr_in_bits_per_dim() -> None:
    torch.manual_seed(0)
    model = build_family(
        "ffjord",
        SMALL,
        (1, 8, 8),
        eval={
            "divergence": {"name": "hutchinson", "num_probes": 3},
            "solver": {"rtol": 1e-3, "atol": 1e-3},
        },
    )
    perturb_(model, 0.05)
    data = build_dataset("digits", flatten=False)
    summary = summarize(
        evaluate_points(model, data.test[:6], data, batch_size=3, seed=0), data, prefix="test_"
    )
    assert summary["test_nll_probes"] == 3
    assert summary["test_bpd_probe_stderr"] == pytest.approx(
        summary["test_nll_probe_stderr"] / (64 * math.log(2))
    )
    again = evaluate_points(model, data.test[:6], data, batch_size=3, seed=0)
    assert summarize(again, data, prefix="test_") == summary  # seeded probes and dequantisation


# ------------------------------------------------------------------ configs and data
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["model.architecture=mlp"],
            "data.flatten: family 'ffjord' with model.architecture=mlp models flat vectors",
        ),
        (["data.flatten=true"], "model.architecture: multiscale needs images kept as (C, H, W)"),
        (["model.layer=add"], "model.layer: unknown convolutional layer type 'add'"),
        (["model.batch_norm=true"], "model.batch_norm: moving batch norm is for vectors"),
        (["model.architecture=conv", "model.num_scales=2"], "model.num_scales: only for"),
        (["model.regularizer_norm=mean"], "model.regularizer_norm: unknown regularizer"),
        (["model.architecture=odenvp"], "valid: conv, mlp, multiscale"),
    ],
)
def test_bad_image_configs_are_one_line_errors(overrides, expected) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/ffjord/digits.yaml", overrides)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_hflip_config_errors() -> None:
    with pytest.raises(ConfigError, match="data.hflip: flips images"):
        load_config(REPO / "configs/ffjord/toy.yaml", ["data.hflip=true"])


@pytest.mark.parametrize("flatten", [False, True])
def test_hflip_mirrors_training_images_only_and_stays_seeded(flatten: bool) -> None:
    plain = build_dataset("digits", flatten=flatten)
    flipped = build_dataset("digits", flatten=flatten, hflip=True)
    a = plain.sample_train(batch_rng(0, 7), 64)
    b = flipped.sample_train(batch_rng(0, 7), 64)
    np.testing.assert_array_equal(b, flipped.sample_train(batch_rng(0, 7), 64))  # seeded
    ai, bi = a.reshape(64, 1, 8, 8), b.reshape(64, 1, 8, 8)
    same = np.all(ai == bi, axis=(1, 2, 3))
    mirrored = np.all(ai[..., ::-1] == bi, axis=(1, 2, 3))
    assert np.all(same | mirrored) and 10 < (~same).sum() < 54
    np.testing.assert_array_equal(plain.test, flipped.test)
    assert flipped.eval_transform is not None
    x = np.arange(2 * 3 * 2 * 2).reshape(2, 12).astype(float)
    y = flip_horizontally(x, np.array([True, False]), (3, 2, 2))
    np.testing.assert_array_equal(y[0].reshape(3, 2, 2), x[0].reshape(3, 2, 2)[..., ::-1])
    np.testing.assert_array_equal(y[1], x[1])


# ------------------------------------------------------------------ sweeps and tables
def test_image_sweep_has_one_run_per_config() -> None:
    sweep = load_sweep(REPO / "configs/sweeps/ffjord_images.yaml")
    runs = plan(sweep)
    assert len(runs) == 8 and len({r.run_dir for r in runs}) == 8
    families = [(r.config["model"]["family"], r.config["data"]["name"]) for r in runs]
    assert families.count(("ffjord", "mnist")) == 2 and families.count(("flow", "cifar10")) == 2
    assert all(r.config["data"]["path"] == f"/data/{r.config['data']['name']}" for r in runs)
    entries = [json.loads(line) for line in manifest_text(runs, sweep.base).splitlines()]
    assert [Path(e["config"]).name for e in entries[:3]] == [
        "mnist.yaml",
        "cifar10.yaml",
        "mnist.yaml",
    ]
    assert not any(o.startswith("base=") for e in entries for o in e["overrides"])


def test_digits_sweep_renders_one_run_per_model_and_seed() -> None:
    path = REPO / "configs/sweeps/digits_bpd.yaml"
    runs = plan(load_sweep(path))
    assert len(runs) == 21
    models = {json.dumps(r.config["model"], sort_keys=True) for r in runs}
    assert len(models) == 7
    assert all(r.config["eval"]["divergence"]["exact_max_dim"] == 64 for r in runs)
    assert all(r.config["train"]["budget_seconds"] == 600 for r in runs)


@pytest.mark.slow
def test_image_sweep_renders_for_slurm(tmp_path: Path) -> None:
    rc, out, err = run_script(
        "sweep.py",
        ["configs/sweeps/ffjord_images.yaml", "--slurm", "--dry-run", "--runs-root", str(tmp_path)],
    )
    assert rc == 0, err
    assert "status: 8 new" in out and "#SBATCH --array=0-7" in out and "--gres=gpu:1" in out


def _fake_run(root: Path, name: str, config: Path, final: dict, **set_keys) -> None:
    cfg = to_dict(
        load_config(
            config,
            [f"data.path={root}"] if "mnist" in str(config) or "cifar" in str(config) else [],
        )
    )
    for dotted, value in set_keys.items():
        node = cfg
        *head, last = dotted.split("__")
        for part in head:
            node = node[part]
        node[last] = value
    folder = root / name
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(cfg), folder / "config.yaml")
    (folder / "final.json").write_text(json.dumps({"iterations": cfg["train"]["iters"], **final}))


def test_image_table_rows_select_the_shipped_configs(tmp_path: Path) -> None:
    spec = load_table_spec(REPO / "configs/tables/ffjord_images.yaml")
    root = tmp_path / "runs"
    rows = {
        "FFJORD (multi-scale)": "ffjord",
        "RNODE": "rnode",
        "RealNVP (ours)": "flows/realnvp",
        "Glow (ours)": "flows/glow",
    }
    for i, stem in enumerate(rows.values()):
        for j, data in enumerate(("mnist", "cifar10")):
            config = (
                REPO / "configs" / (f"{stem}_{data}.yaml" if "/" in stem else f"{stem}/{data}.yaml")
            )
            _fake_run(root, f"r{i}{j}", config, {"test_bpd": 1.0 + i + 0.1 * j})
    table = build_table(spec, root)
    assert not table.missing and not table.unfinished
    for i, label in enumerate(rows):
        assert table.cells[(label, "mnist", "test_bpd")].mean == pytest.approx(1.0 + i)
        assert table.cells[(label, "cifar10", "test_bpd")].mean == pytest.approx(1.1 + i)


def test_digits_table_rows_select_the_shipped_configs(tmp_path: Path) -> None:
    spec = load_table_spec(REPO / "configs/tables/digits_bpd.yaml")
    sweep = tmp_path / "runs" / "sweeps" / "digits_bpd"
    configs = ["ffjord/digits", "rnode/digits", "flows/realnvp_digits", "flows/glow_digits",
               "flows/resflow_digits", "fm/otcfm_digits", "score/vp_digits"]  # fmt: skip
    for i, stem in enumerate(configs):
        for seed in (0, 1, 2):
            final = {"test_bpd": 2.0 + i, "train_seconds": 600.0, "test_nfe": 10.0 * i}
            # train.budget_seconds is another change's key: set it as a run of it would.
            _fake_run(
                sweep, f"{i}_s{seed}", REPO / f"configs/{stem}.yaml", final,
                train__budget_seconds=600, seed=seed,
            )  # fmt: skip
    table = build_table(spec, tmp_path / "runs")
    assert not table.missing and not table.unfinished and len(table.rows) == 7
    for i, label in enumerate(table.rows):
        cell = table.cells[(label, "digits", "test_bpd")]
        assert cell.mean == pytest.approx(2.0 + i) and cell.n == 3
        assert table.cells[(label, "digits", "train_seconds")].mean == 600.0


# ------------------------------------------------------------------ benchmark
def test_benchmark_rejects_an_unknown_run() -> None:
    rc, out, err = run_script("bench_ffjord_images.py", ["--runs", "ffjord/fast"])
    assert rc == 2 and err.strip().startswith("error: unknown run 'ffjord/fast'")


@pytest.mark.slow
def test_benchmark_smoke(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    args = ["--batch", "1", "--iters", "1", "--warmup", "0", "--runs", "rnode/backprop"]
    rc, out, err = run_script("bench_ffjord_images.py", [*args, "--json", str(out_json)])
    assert rc == 0, err
    (res,) = json.loads(out_json.read_text())
    assert res["nfe_forward"] == 10 * 16 and res["nfe_backward"] == 0  # 10 blocks, rk4 x 4 steps
    assert res["sec_per_iter"] > 0 and res["peak_mem_mb"] > 0
    assert "| rnode | backprop |" in out
