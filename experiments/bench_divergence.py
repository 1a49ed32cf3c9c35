"""Benchmark the divergence estimators by dimension: seconds per function evaluation.

    python experiments/bench_divergence.py [--dims 2,4,8,16,32,64,128] [--batch 100]
        [--hidden 64,64,64] [--reps 50] [--device auto] [--json OUT]

For a concatsquash/tanh ``TimeMLP`` field ``R^D -> R^D`` (the FFJORD toy
architecture, width ``--hidden``) on a batch of ``--batch`` states, times one
function evaluation *with* its divergence, as the ODE solver makes it, for

* ``exact/forward`` — the exact trace by forward-mode Jacobian propagation
  (``TimeMLP.forward_with_trace``; the default exact path for vector fields),
* ``exact/vjp`` — the exact trace from D vector–Jacobian products batched
  into one backward call (the path for fields without a forward-mode rule),
* ``hutchinson/forward`` — one Rademacher probe carried forward as a tangent
  (``TimeMLP.forward_with_jvp``; the default Hutchinson path for the
  library's fields),
* ``hutchinson/vjp`` — one Rademacher probe, one VJP (fields without it),

in two settings: ``eval`` (no graph kept: the evaluation solve) and ``train``
(graph kept, then one backward pass of the divergence and the field through
the parameters: what a backprop training step pays per function evaluation).
Prints one row per D with the seconds of each estimator and, per setting,
the dimension from which Hutchinson (its faster path) is cheaper than the fastest exact path
at every larger D measured (the crossover). Times are wall clock medians over ``--reps`` repetitions:
compare rows of one invocation, on a quiet machine, one thread
(``OMP_NUM_THREADS=1`` is set unless given).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _cli  # noqa: E402,F401  (puts the repo on sys.path)
import torch  # noqa: E402

from cnf.divergence import ExactDivergence, HutchinsonDivergence  # noqa: E402
from cnf.nets import TimeMLP  # noqa: E402

ESTIMATORS = ("exact/forward", "exact/vjp", "hutchinson/forward", "hutchinson/vjp")
FORWARD_MODE = ("exact/forward", "hutchinson/forward")
SETTINGS = ("eval", "train")


class _NoForwardMode(torch.nn.Module):
    """The same field without its forward-mode methods: forces the autograd (VJP) path."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.net(t, z)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_one(
    estimator: str, setting: str, dim: int, args: argparse.Namespace, device: torch.device
) -> tuple[float, float]:
    """Median seconds per function evaluation, and the mean divergence (a sanity value)."""
    torch.manual_seed(0)
    net = TimeMLP(dim, args.hidden, layer="concatsquash", activation="tanh").to(device)
    field = net if estimator in FORWARD_MODE else _NoForwardMode(net)
    est = ExactDivergence() if estimator.startswith("exact") else HutchinsonDivergence("rademacher")
    z = torch.randn(args.batch, dim, device=device)
    t = torch.tensor(0.3, device=device)
    times, div_mean = [], 0.0
    for rep in range(args.warmup + args.reps):
        probe = est.draw_probe(z)
        _sync(device)
        t0 = time.perf_counter()
        if setting == "eval":
            with torch.no_grad():
                _, div, _ = est.evaluate(field, t, z, probe)
        else:
            net.zero_grad(set_to_none=True)
            zz = z.clone().requires_grad_(True)
            f, div, _ = est.evaluate(field, t, zz, probe)
            (f.pow(2).mean() + div.mean()).backward()
        _sync(device)
        if rep >= args.warmup:
            times.append(time.perf_counter() - t0)
            div_mean = float(div.detach().mean())
    return statistics.median(times), div_mean


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=_int_list, default=[2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--hidden", type=_int_list, default=[64, 64, 64])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    if args.batch < 1 or args.reps < 1 or args.warmup < 0:
        parser.error("--batch and --reps must be >= 1, --warmup >= 0")
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    name = "cpu" if name == "auto" else name
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        parser.error(f"--device {args.device!r} is not usable here ({err}); valid: auto, cpu, cuda")

    print(
        f"TimeMLP concatsquash/tanh, hidden {args.hidden}, batch {args.batch}, "
        f"{device}, {torch.get_num_threads()} thread(s); median of {args.reps} "
        "(ms per function evaluation with its divergence)"
    )
    header = " | ".join(f"{s} {e}" for s in SETTINGS for e in ESTIMATORS)
    print(f"| D | {header} |")
    print("|---:|" + "---:|" * (len(SETTINGS) * len(ESTIMATORS)))
    rows = []
    for dim in args.dims:
        row = {"dim": dim}
        for setting in SETTINGS:
            for estimator in ESTIMATORS:
                seconds, div = time_one(estimator, setting, dim, args, device)
                row[f"{setting} {estimator}"] = seconds
                if estimator == "exact/vjp":  # the two exact paths must agree
                    row[f"{setting} exact agree"] = abs(
                        div - row[f"_{setting} exact div"]
                    ) <= 1e-4 * (1 + abs(div))
                elif estimator == "exact/forward":
                    row[f"_{setting} exact div"] = div
        rows.append(row)
        cells = " | ".join(f"{1e3 * row[f'{s} {e}']:.3f}" for s in SETTINGS for e in ESTIMATORS)
        print(f"| {dim} | {cells} |", flush=True)
    for setting in SETTINGS:
        wins = [
            r["dim"]
            for r in rows
            if min(r[f"{setting} hutchinson/forward"], r[f"{setting} hutchinson/vjp"])
            < min(r[f"{setting} exact/forward"], r[f"{setting} exact/vjp"])
        ]
        fastest = {
            r["dim"]: min(("exact/forward", "exact/vjp"), key=lambda e: r[f"{setting} {e}"])
            for r in rows
        }
        # The crossover: the smallest D from which Hutchinson wins at every larger D
        # measured (a single noisy win at small D is not a crossover).
        dims = [r["dim"] for r in rows]
        tail = [d for i, d in enumerate(dims) if all(e in wins for e in dims[i:])]
        cross = f"from D = {tail[0]}" if tail else f"not within D ≤ {max(dims)}"
        print(
            f"{setting}: Hutchinson (1 probe) is cheaper than the fastest exact path {cross}; "
            f"fastest exact path by D: {fastest}"
        )
        bad = [r["dim"] for r in rows if not r[f"{setting} exact agree"]]
        if bad:
            print(f"WARNING {setting}: the two exact paths disagree at D = {bad}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {k: v for k, v in vars(args).items()}
                | {
                    "device": str(device),
                    "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
                },
                fh,
                indent=1,
                default=str,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
