"""Time to quality: test NLL and paired gap to the floor after 30, 60, 120 and 300 s of training.

    OMP_NUM_THREADS=1 python experiments/bench_time_to_nll.py                 # all 120 runs
    OMP_NUM_THREADS=1 python experiments/bench_time_to_nll.py --data 8gaussians --budgets 30,60 --jobs 2
    python experiments/bench_time_to_nll.py --report                          # print only

The runs are the sweep ``configs/sweeps/time_to_nll.yaml`` (models × toy
densities × budgets × seeds): each trains for ``train.budget_seconds`` of
training time (the iteration count, and with it the learning-rate schedule,
is fitted to the budget after a short timed warm-up; see
:mod:`cnf.train.loop`) and is then scored on the same 5000 test points by its
exact likelihood (CNFs: exact trace, dopri5 1e-5). The filters pick a subset;
runs already finished are read back, not trained again, and interrupted ones
resume. ``--report`` trains nothing and prints what is there (e.g. after a
SLURM run of the sweep).

Prints, per density and budget, one row per model and seed (test NLL, the
paired gap = mean(log p_data − log q) on the test points with its standard
error, iterations run, seconds spent), each model's mean over seeds with the
standard error across seeds, and the ratio of each model's mean gap to the
neural spline flow's (zuko, the discrete-flow peer) measured in the same sweep.
Budgets are seconds of one thread: run at most one job per core
(``--jobs`` ≤ cores) or every model buys less than its budget says.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _cli  # noqa: E402,F401  (puts the repo on sys.path)

from cnf.metrics import mean_stderr  # noqa: E402
from cnf.sweep import SweepError, base_label, load_sweep, plan, run_status  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "configs" / "sweeps" / "time_to_nll.yaml"
# Readable names of the sweep's bases (their base_label), in the sweep's order.
NAMES = {
    "ffjord-toy_plain": "FFJORD",
    "ffjord-toy": "FFJORD + RNODE",
    "ffjord-toy_budget": "FFJORD budget",
    "fm-otcfm_toy": "OT-CFM",
    "flows-nsf_toy": "NSF (zuko)",
}
PEER = "flows-nsf_toy"


def _csv(option: str, text: str | None, kind=str) -> list | None:
    """The comma-separated values of ``option`` (None when it is not given)."""
    if text is None:
        return None
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"{option}: '{text}' is not a comma-separated list of {kind.__name__}s"
        ) from None


def select(runs, *, data, budgets, seeds, models) -> list:
    """The runs whose density, budget, seed and model are all asked for (None: any)."""

    def keep(r) -> bool:
        a = r.axis_values
        return (
            (data is None or a["data.name"] in data)
            and (budgets is None or float(a["train.budget_seconds"]) in budgets)
            and (seeds is None or r.seed in seeds)
            and (models is None or base_label(r.base) in models)
        )

    return [r for r in runs if keep(r)]


def collect(runs) -> list[dict]:
    """One record per finished run: its axis values and the figures of its ``final.json``."""
    rows = []
    for r in runs:
        final = r.run_dir / "final.json"
        if not final.is_file():
            continue
        f = json.loads(final.read_text())
        rows.append(
            {
                "model": base_label(r.base),
                "data": r.axis_values["data.name"],
                "budget": float(r.axis_values["train.budget_seconds"]),
                "seed": r.seed,
                "test_nll": f["test_nll"],
                "gap": f.get("gap"),
                "gap_stderr": f.get("gap_stderr"),
                "floor": f.get("floor"),
                "iters": f.get("budget_iters", f.get("iterations")),
                "spent": f.get("budget_spent_seconds", f.get("train_seconds")),
                "run_dir": str(r.run_dir),
            }
        )
    return rows


def report(rows: list[dict]) -> str:
    """The tables described in the module docstring, as text."""
    if not rows:
        return "no finished runs yet"
    out = []
    order = {m: i for i, m in enumerate(NAMES)}
    for data in dict.fromkeys(r["data"] for r in rows):
        sub = [r for r in rows if r["data"] == data]
        floors = sorted({round(r["floor"], 4) for r in sub if r["floor"] is not None})
        out.append(f"\n== {data} (floor of the test points: {', '.join(map(str, floors))} nats) ==")
        out.append(
            f"{'budget':>7} {'model':<16} {'seed':>4} {'test NLL':>9} {'gap':>8} {'± se':>7}"
            f" {'iters':>7} {'seconds':>8}"
        )
        means: dict[tuple[float, str], tuple[float, float, float, int]] = {}
        for budget in sorted({r["budget"] for r in sub}):
            models = sorted({r["model"] for r in sub if r["budget"] == budget}, key=order.get)
            for model in models:
                cell = sorted(
                    (r for r in sub if r["budget"] == budget and r["model"] == model),
                    key=lambda r: r["seed"],
                )
                for r in cell:
                    out.append(
                        f"{budget:>6g}s {NAMES.get(model, model):<16} {r['seed']:>4}"
                        f" {r['test_nll']:>9.4f} {r['gap']:>8.4f} {r['gap_stderr']:>7.4f}"
                        f" {r['iters']:>7} {r['spent']:>8.1f}"
                    )
                nll, _ = mean_stderr([r["test_nll"] for r in cell])
                gap, gap_se = mean_stderr([r["gap"] for r in cell])
                means[(budget, model)] = (nll, gap, gap_se, len(cell))
        out.append(
            f"\nmean over seeds (± standard error across seeds); ratio = gap / {NAMES[PEER]}'s gap"
        )
        out.append(
            f"{'budget':>7} {'model':<16} {'seeds':>5} {'test NLL':>9} {'gap':>8} {'± se':>7} {'ratio':>6}"
        )
        for (budget, model), (nll, gap, gap_se, n) in sorted(
            means.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99))
        ):
            peer = means.get((budget, PEER))
            ratio = f"{gap / peer[1]:>6.2f}" if peer and peer[1] > 0 else f"{'-':>6}"
            out.append(
                f"{budget:>6g}s {NAMES.get(model, model):<16} {n:>5} {nll:>9.4f} {gap:>8.4f}"
                f" {gap_se:>7.4f} {ratio}"
            )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", default=str(SWEEP), help="the sweep file (default: %(default)s)")
    parser.add_argument("--data", help="comma-separated densities (default: the sweep's)")
    parser.add_argument("--budgets", help="comma-separated seconds, e.g. 30,60")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--models", help=f"comma-separated, from: {', '.join(NAMES)}")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (≤ cores; default 1)")
    parser.add_argument("--report", action="store_true", help="train nothing; print what is there")
    parser.add_argument("--json", help="also write the per-run records to this JSON-lines file")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    try:
        budgets = _csv("--budgets", args.budgets, float)
        seeds = _csv("--seeds", args.seeds, int)
        models = _csv("--models", args.models)
        data = _csv("--data", args.data)
        sweep = load_sweep(args.sweep)
        runs = plan(sweep)
    except (SweepError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, asked, valid in (
        ("--models", models, {base_label(r.base) for r in runs}),
        ("--data", data, {r.axis_values["data.name"] for r in runs}),
        ("--budgets", budgets, {float(r.axis_values["train.budget_seconds"]) for r in runs}),
        ("--seeds", seeds, {r.seed for r in runs}),
    ):
        bad = sorted(set(asked or ()) - valid)
        if bad:

            def show(v) -> str:  # noqa: ANN001
                return f"{v:g}" if isinstance(v, float) else str(v)

            shown = ", ".join(map(show, sorted(valid)))
            print(
                f"error: {name}: {show(bad[0])} is not in the sweep; valid: {shown}",
                file=sys.stderr,
            )
            return 2
    chosen = select(runs, data=data, budgets=budgets, seeds=seeds, models=models)
    rc = 0
    if not args.report:
        from sweep import run_local  # experiments/sweep.py: the one local launcher

        rc = run_local(sweep, chosen, [run_status(r) for r in chosen], jobs=args.jobs)
    rows = collect(chosen)
    print(report(rows))
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rc


if __name__ == "__main__":
    sys.exit(main())
