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

from cnf.divergence import DivergenceConfig, ExactDivergence
from cnf.fused_trace import FUSED_ACTIVATIONS, FUSED_LAYERS, FusedTrace, fused_params
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
    import cnf.fused_trace as ft

    used = []
    passes = ft._passes
    monkeypatch.setattr(ft, "_passes", lambda compiled: used.append(compiled) or passes(compiled))
    torch.manual_seed(0)
    eager = _ffjord(False)
    compiled = _ffjord(True)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(64, 2)
    results = []
    for model in (eager, compiled):
        out = model.training_loss(x)
        grads = torch.autograd.grad(out.loss, list(model.parameters()))
        results.append((out.loss.detach(), grads, out.stats["nfe_forward"]))
    (le, ge, ne), (lc, gc, nc) = results
    assert ne == nc
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
