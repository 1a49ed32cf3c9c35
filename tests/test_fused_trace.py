"""The fused exact-trace pass of TimeMLP (cnf.fused_trace), eager and compiled.

The fused pass and its hand-written backward must give the same numbers as
forward mode through the layers (itself checked against brute-force
Jacobians in test_divergence.py): outputs, trace, Frobenius norm and every
gradient — input, time, each parameter — in float64.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from omegaconf import OmegaConf

import cnf.fused_trace as ft
import cnf.solve as solve_module
from cnf.divergence import DivergenceConfig, ExactDivergence
from cnf.fused_trace import (
    FUSED_ACTIVATIONS,
    FUSED_LAYERS,
    FusedTrace,
    PackedTrace,
    flat_params,
    fused_params,
    packed_spec,
    packed_trace,
)
from cnf.models.ffjord import ODESettings, build_ffjord
from cnf.nets import TimeMLP
from cnf.schema import FFJORDSchema
from cnf.solve import SolverConfig, integrate

CASES = list(itertools.product(FUSED_LAYERS, FUSED_ACTIVATIONS, [(), (7,), (8, 5), (6, 6, 6)]))


def _outputs_and_grads(net: TimeMLP, path: str, t: torch.Tensor, x: torch.Tensor, frob: bool):
    f, div, fr = net.forward_with_trace(t, x, frobenius=frob, path=path)
    # Fixed, unequal output weights: every output and every sample counts differently.
    loss = (f * torch.linspace(-1, 1, f.numel(), dtype=f.dtype).reshape(f.shape)).sum()
    loss = loss + (div * torch.linspace(0.3, 2.0, div.numel(), dtype=f.dtype)).sum()
    if frob:
        loss = loss + (fr * torch.linspace(1.5, -0.5, fr.numel(), dtype=f.dtype)).sum()
    inputs = [x, t, *net.parameters()]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    # ``ignore`` layers do not see the time: autograd says None, the fused pass 0.
    grads = [torch.zeros_like(i) if g is None else g for g, i in zip(grads, inputs)]
    return [f, div] + ([fr] if frob else []) + grads


@pytest.mark.parametrize(
    "layer,activation,hidden", CASES, ids=[f"{a}-{b}-{len(c)}" for a, b, c in CASES]
)
@pytest.mark.parametrize("frobenius", [False, True])
def test_fused_pass_equals_forward_mode(layer, activation, hidden, frobenius) -> None:
    torch.manual_seed(0)
    net = TimeMLP(3, hidden, layer=layer, activation=activation).double()
    for p in net.parameters():  # away from the initialisation's structure (zero biases etc.)
        torch.nn.init.normal_(p, std=0.7)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.37, dtype=torch.float64, requires_grad=True)
    fused = _outputs_and_grads(net, "fused", t, x, frobenius)
    layered = _outputs_and_grads(net, "layered", t, x, frobenius)
    assert len(fused) == len(layered) == (3 if frobenius else 2) + 2 + len(list(net.parameters()))
    t_index = (3 if frobenius else 2) + 1
    for i, (a, b) in enumerate(zip(fused, layered)):
        if not (i == t_index and layer == "ignore"):
            assert b.abs().max() > 0  # no gradient is trivially zero
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fused_pass_passes_gradcheck() -> None:
    torch.manual_seed(1)
    net = TimeMLP(2, (4, 3), layer="concatsquash", activation="softplus").double()
    spec = net._fused_spec
    params = [p.detach().clone().requires_grad_(True) for p in fused_params(net.layers)]
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)

    def fn(x, t, *ps):
        return FusedTrace.apply(x, t, (*spec, True), False, *ps)

    assert torch.autograd.gradcheck(fn, (x, t, *params))


def test_packed_pass_passes_gradcheck() -> None:
    """``[f·span | tr J·span]`` at ``t0 + span·s``: every input's gradient by finite differences."""
    torch.manual_seed(2)
    net = TimeMLP(2, (4, 3), layer="concatsquash", activation="tanh").double()
    params = fused_params(net.layers)
    spec = packed_spec(net._fused_spec, params)
    flat = flat_params(params).detach().clone().requires_grad_(True)
    y = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    s, t0, span = (
        torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (0.3, 0.1, -0.7)
    )

    def fn(y, s, t0, span, flat):
        return PackedTrace.apply(y, s, t0, span, spec, False, flat)

    assert torch.autograd.gradcheck(fn, (y, s, t0, span, flat))


def test_packed_pass_is_the_scaled_fused_pass() -> None:
    torch.manual_seed(3)
    net = TimeMLP(2, (5, 5), layer="squash", activation="softplus").double()
    z, logdet = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    s, t0, span = (torch.tensor(v, dtype=torch.float64) for v in (0.25, 0.2, 0.5))
    dy = packed_trace(
        torch.cat([z, logdet], 1), s, t0, span, net._fused_spec, fused_params(net.layers)
    )
    f, div, _ = net.forward_with_trace(t0 + span * s, z, path="layered")
    torch.testing.assert_close(
        dy, torch.cat([f * span, (div * span)[:, None]], 1), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("learned_end", [False, True])
def test_solve_on_the_packed_state_equals_the_tuple_solve(monkeypatch, learned_end) -> None:
    """A compile_trace net's solve carries ``[z | logdet]`` as one tensor: same steps, values, gradients."""
    monkeypatch.setattr(ft, "_passes", lambda compiled, packed=False: _EAGER(False, packed))
    used = []
    monkeypatch.setattr(
        solve_module, "PackedDynamics", lambda *a: used.append(1) or _PACKED_DYNAMICS(*a)
    )
    torch.manual_seed(4)
    packed = TimeMLP(2, (8, 8), compile_trace=True).double()
    tuple_net = TimeMLP(2, (8, 8)).double()
    tuple_net.load_state_dict(packed.state_dict())
    z0 = torch.randn(16, 2, dtype=torch.float64, requires_grad=True)
    times = torch.tensor([0.0, 0.3, 0.9], dtype=torch.float64)
    solver = SolverConfig(name="dopri5", rtol=1e-6, atol=1e-6)
    results = []
    for net in (packed, tuple_net):
        t1 = torch.tensor(0.9, dtype=torch.float64, requires_grad=learned_end)
        sol = integrate(net, z0, t1=t1, solver=solver, divergence=ExactDivergence(), times=times)
        loss = sol.z.pow(2).sum() - sol.logdet.sum() + sol.trajectory[1].sum()
        inputs = [z0, *net.parameters()] + ([t1] if learned_end else [])
        grads = torch.autograd.grad(loss, inputs)
        results.append((sol.stats.nfe_forward, sol.z, sol.logdet, sol.trajectory, grads))
    assert used == [1]  # the compile_trace net went packed, the other did not
    (na, *a), (nb, *b) = results
    assert na == nb
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    for x, y in zip(a[3], b[3]):
        torch.testing.assert_close(x, y, rtol=1e-8, atol=1e-10)


def test_regularised_and_adjoint_solves_keep_the_tuple(monkeypatch) -> None:
    monkeypatch.setattr(ft, "_passes", lambda compiled, packed=False: _EAGER(False, packed))
    used = []
    monkeypatch.setattr(
        solve_module, "PackedDynamics", lambda *a: used.append(1) or _PACKED_DYNAMICS(*a)
    )
    net = TimeMLP(2, (6,), compile_trace=True).double()
    z0 = torch.randn(5, 2, dtype=torch.float64)
    rk4 = SolverConfig(name="rk4", steps=3)
    integrate(net, z0, solver=rk4, divergence=ExactDivergence(), kinetic=True, jacobian=True)
    integrate(net, z0, solver=rk4.with_(adjoint=True), divergence=ExactDivergence())
    assert used == []
    integrate(net, z0, solver=rk4, divergence=ExactDivergence())
    assert used == [1]


_EAGER = ft._passes
_PACKED_DYNAMICS = solve_module.PackedDynamics


def test_fused_pass_refuses_a_double_backward() -> None:
    net = TimeMLP(2, (4,)).double()
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    _, div, _ = net.forward_with_trace(torch.tensor(0.2, dtype=torch.float64), x, path="fused")
    (g,) = torch.autograd.grad(div.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        torch.autograd.grad(g.sum(), x)


def test_one_time_per_sample_takes_the_layered_path() -> None:
    net = TimeMLP(2, (6,)).double()
    x = torch.randn(4, 2, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    got = net.forward_with_trace(t, x, path="fused")
    ref = net.forward_with_trace(t, x, path="layered")
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_network_without_a_fused_rule_says_so() -> None:
    with pytest.raises(ValueError, match="compile_trace.*swish"):
        TimeMLP(2, (4,), activation="swish", compile_trace=True)
    with pytest.raises(ValueError, match="path=fused"):
        TimeMLP(2, (4,), layer="blend").forward_with_trace(0.3, torch.randn(2, 2), path="fused")


@pytest.mark.parametrize(
    "overrides,words",
    [
        ({"divergence": {"name": "hutchinson"}}, ["compile", "divergence.name=exact"]),
        ({"activation": "swish"}, ["compile", "activation", "tanh, softplus"]),
        ({"layer": "blend"}, ["compile", "layer", "concatsquash"]),
    ],
)
def test_model_compile_needs_what_it_compiles(overrides, words) -> None:
    with pytest.raises(ValueError) as info:
        OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(FFJORDSchema), {"compile": True, **overrides})
        )
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def _ffjord(compile_: bool):
    section = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(FFJORDSchema),
            {
                "compile": compile_,
                "hidden_dims": [16, 16],
                "zero_init": False,
                "divergence": {"name": "exact"},
                "solver": {"name": "dopri5", "rtol": 1e-5, "atol": 1e-5, "steps": 0},
            },
        )
    )
    tight = SolverConfig(name="dopri5", rtol=1e-5, atol=1e-5)
    return build_ffjord(section, (2,), ODESettings(tight, DivergenceConfig("exact")))


@pytest.mark.slow
def test_compiled_pass_trains_like_the_eager_one(monkeypatch) -> None:
    """``model.compile=true``: the same loss, gradients and NFE as the layered path (float32 round-off)."""
    used = []
    passes = ft._passes
    monkeypatch.setattr(
        ft,
        "_passes",
        lambda compiled, packed=False: used.append(compiled) or passes(compiled, packed),
    )
    torch.manual_seed(0)
    eager = _ffjord(False)
    compiled = _ffjord(True)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(64, 2)
    results = []
    torch._dynamo.reset()
    for model in (eager, compiled):
        out = model.training_loss(x)
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        results.append((out.loss.detach(), grads, out.stats["nfe_forward"]))
    (le, ge, ne), (lc, gc, nc) = results
    assert ne == nc
    # One program per pass: the solve's first evaluation (a state without
    # grad) and the later ones (with grad) share the forward's compilation.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    # And a no-grad solve (evaluation) at another batch size goes through it too.
    z = torch.randn(33, 2)
    solver = SolverConfig(name="dopri5", rtol=1e-5, atol=1e-5)
    logdets = []
    for model in (eager, compiled):
        field = next(m for m in model.modules() if isinstance(m, TimeMLP))
        with torch.no_grad():
            sol = integrate(field, z, t1=0.5, solver=solver, divergence=ExactDivergence())
        logdets.append(sol.logdet)
    assert used and all(used)  # every fused pass ran compiled (and only the compiled model's)
    torch.testing.assert_close(logdets[1], logdets[0], rtol=1e-4, atol=1e-5)
