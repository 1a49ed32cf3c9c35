"""Where one FFJORD training iteration spends its time: a profile table.

    OMP_NUM_THREADS=1 python experiments/profile_ffjord.py [--warmup 100] [--iters 30]

Two models on 8gaussians, one thread, backprop through the solver:

* ``default`` — the project's default toy config (configs/ffjord/toy.yaml);
* ``original`` — the original FFJORD README toy model (bench_ffjord.py's
  ``ORIGINAL``: concatsquash 64-64-64, tanh, T = 0.5, exact trace, dopri5 1e-5,
  batch 100, Adam 1e-3).

Each model trains ``--warmup`` iterations first (an adaptive solve's NFE
depends on how far training is), then ``--iters`` iterations are timed. Rows
(seconds per iteration and share of the iteration's wall time):

* forward solve — ``training_loss``: the ODE solve and the loss;
  * net forward — ``NFE ×`` one evaluation of the network's output alone
    (measured on the solve's own states, in the same process);
  * exact trace, forward — ``NFE ×`` (the output with its forward-mode Jacobian
    and trace, as the solve evaluates it, − the output alone);
  * regularisers and augmented state — the dynamics calls of the solve
    (timed in place) − the two rows above;
  * torchdiffeq stepping — the forward solve − the dynamics calls (the
    Runge–Kutta combinations, error norms, step-size control);
* backward — ``loss.backward()``;
  * net backward — ``NFE ×`` the backward of the output alone;
  * trace backward — ``NFE ×`` (the backward of output + trace − of the output);
  * solver and loss graph — the rest;
* optimiser step.

A last line estimates the fixed cost of the operators themselves: the number
of ATen operators an iteration calls (counted by ``torch.profiler`` over the
same iterations, nested ones left out) times the seconds of a trivial
operator call (a 1-element add: Python and the dispatcher, no arithmetic) —
what fusing operators, or fewer operators per evaluation, would save. The per-evaluation figures are
measured outside the solve and can differ a little from their cost inside
it; the table says so where a difference row comes out negative.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _cli  # noqa: E402,F401  (puts the repo on sys.path)
import torch  # noqa: E402
from bench_ffjord import ORIGINAL, toy_batch, toy_setup  # noqa: E402

import cnf.solve as solve_module  # noqa: E402

MODELS = {"default": [], "original": ORIGINAL + ["model.solver.adjoint=false"]}


class DynamicsTimer:
    """Times every call of the solver's right-hand side, and keeps the last state it saw."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self.last = None
        self._original = solve_module.AugmentedDynamics.forward

    def __enter__(self) -> DynamicsTimer:
        timer, original = self, self._original

        def timed(dyn, s, state):  # noqa: ANN001
            t0 = time.perf_counter()
            out = original(dyn, s, state)
            timer.seconds += time.perf_counter() - t0
            timer.calls += 1
            timer.last = (dyn, s, state)
            return out

        solve_module.AugmentedDynamics.forward = timed
        return self

    def __exit__(self, *exc) -> None:
        solve_module.AugmentedDynamics.forward = self._original


def per_eval(dyn, s, state, reps: int) -> dict[str, float]:  # noqa: ANN001
    """Seconds of one evaluation of the net alone and with its exact trace, forward and backward
    (medians over ``reps``)."""
    field, z0 = dyn.field, state[0].detach()
    t = (dyn.t0 + (dyn.t1 - dyn.t0) * s).detach()
    frob = bool(dyn.jacobian)
    out = defaultdict(list)
    for rep in range(reps + 1):  # the first round is untimed (allocator warm-up)
        z = z0.clone().requires_grad_(True)
        a = time.perf_counter()
        f = field(t, z)
        b = time.perf_counter()
        f.sum().backward()
        c = time.perf_counter()
        if rep:
            out["net_fwd"].append(b - a)
            out["net_bwd"].append(c - b)
        z = z0.clone().requires_grad_(True)
        a = time.perf_counter()
        f, div, fr = field.forward_with_trace(t, z, frobenius=frob)
        b = time.perf_counter()
        total = f.sum() + div.sum() + (fr.sum() if fr is not None else 0.0)
        total.backward()
        c = time.perf_counter()
        if rep:
            out["trace_fwd"].append(b - a)
            out["trace_bwd"].append(c - b)
    field.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in out.items()}


def op_overhead(n: int = 20000) -> float:
    """Seconds of one call of a trivial operator (a 1-element add): Python + dispatcher."""
    if not hasattr(op_overhead, "value"):
        a, b = torch.zeros(1), torch.zeros(1)
        for _ in range(1000):
            a + b
        t0 = time.perf_counter()
        for _ in range(n):
            a + b
        op_overhead.value = (time.perf_counter() - t0) / n
    return op_overhead.value


def profile(name: str, overrides: list[str], warmup: int, iters: int, reps: int) -> list[tuple]:
    cfg, data, model, opt = toy_setup(overrides, num_test=10)

    def step(x: torch.Tensor, phases: dict) -> None:
        a = time.perf_counter()
        loss = model.training_loss(x)
        b = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.loss.backward()
        c = time.perf_counter()
        opt.step()
        d = time.perf_counter()
        phases["forward"] += b - a
        phases["backward"] += c - b
        phases["step"] += d - c
        phases["nfe"] += loss.stats["nfe_forward"]

    for it in range(1, warmup + 1):
        step(toy_batch(cfg, data, it), defaultdict(float))
    phases: dict[str, float] = defaultdict(float)
    evals = defaultdict(float)
    with DynamicsTimer() as timer:
        for it in range(warmup + 1, warmup + iters + 1):
            step(toy_batch(cfg, data, it), phases)
            # The net's cost on this iteration's own states (a mid-solve state).
            for k, v in per_eval(*timer.last, reps=reps).items():
                evals[k] += v
    dyn_seconds = timer.seconds / iters
    ph = {k: v / iters for k, v in phases.items()}
    ev = {k: v / iters for k, v in evals.items()}
    nfe = ph["nfe"]
    wall = ph["forward"] + ph["backward"] + ph["step"]

    # The same iterations again under torch.profiler, to count the operators called
    # from Python (ATen operators not inside another one; autograd's included).
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for it in range(warmup + 1, warmup + iters + 1):
            step(toy_batch(cfg, data, it), defaultdict(float))
    ops = (
        sum(
            1
            for e in prof.events()
            if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        )
        / iters
    )
    overhead = ops * op_overhead()

    net_f = nfe * ev["net_fwd"]
    tr_f = nfe * (ev["trace_fwd"] - ev["net_fwd"])
    net_b = nfe * ev["net_bwd"]
    tr_b = nfe * (ev["trace_bwd"] - ev["net_bwd"])
    rows = [
        ("forward solve (training_loss)", ph["forward"]),
        ("  net forward", net_f),
        ("  exact trace, forward (tangents)", tr_f),
        ("  regularisers, augmented state", dyn_seconds - net_f - tr_f),
        ("  torchdiffeq stepping", ph["forward"] - dyn_seconds),
        ("backward (loss.backward)", ph["backward"]),
        ("  net backward", net_b),
        ("  trace backward", tr_b),
        ("  solver and loss graph", ph["backward"] - net_b - tr_b),
        ("optimiser step", ph["step"]),
        ("iteration (wall)", wall),
        (
            f"  fixed per-operator cost ({ops:.0f} operators × {1e6 * op_overhead():.1f} µs)",
            overhead,
        ),
    ]
    print(
        f"\n{name}: NFE {nfe:.1f} forward per iteration, iterations {warmup + 1}–{warmup + iters}"
    )
    print(f"| {'part':<40} | {'ms/iter':>8} | {'share':>6} |")
    print(f"|{'-' * 42}|{'-' * 10}:|{'-' * 7}:|")
    for label, sec in rows:
        print(f"| {label:<40} | {1e3 * sec:>8.2f} | {100 * sec / wall:>5.1f}% |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--warmup", type=int, default=100, help="untimed iterations first")
    p.add_argument("--iters", type=int, default=30, help="timed iterations")
    p.add_argument("--reps", type=int, default=7, help="repeats of each per-evaluation timing")
    p.add_argument("--models", default="default,original", help=", ".join(MODELS))
    args = p.parse_args()
    torch.set_num_threads(1)
    for name in args.models.split(","):
        if name not in MODELS:
            _cli.fail(f"unknown model '{name}'; valid: {', '.join(MODELS)}")
        profile(name, MODELS[name], args.warmup, args.iters, args.reps)
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
