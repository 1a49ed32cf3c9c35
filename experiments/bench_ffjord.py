"""Benchmark FFJORD training: seconds/iteration, NFE and test NLL per gradient mode.

    python experiments/bench_ffjord.py [--iters 1000] [--modes backprop,adjoint,adjoint_seminorm]

Two models on 8gaussians, one thread:

* ``original`` — the original FFJORD toy model (rtqichen/ffjord ``train_toy.py``):
  one CNF, concatsquash MLP 2-64-64-64-2, tanh, T = 0.5, exact trace, dopri5
  atol = rtol = 1e-5, batch 100, Adam 1e-3 — once per gradient mode
  (``backprop_compiled``: backprop with ``model.compile=true``, the fused
  exact trace through torch.compile; its first iteration compiles);
* ``default`` — the project's default toy configuration (configs/ffjord/toy.yaml).

Prints seconds/iteration (averaged over iterations 1–200 and 1–N), NFE
forward/backward, and test NLL (exact trace, dopri5 1e-5, nats) at
iterations 200 and N, beside the data entropy (the floor). Times are wall
clock: compare modes measured in the same run, not across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _cli  # noqa: E402,F401  (puts the repo on sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cnf.config import load_config  # noqa: E402
from cnf.data import batch_rng, build_dataset  # noqa: E402
from cnf.evaluation import evaluate_points, summarize  # noqa: E402
from cnf.models import build_model  # noqa: E402
from cnf.train.loop import iteration_seed  # noqa: E402

ORIGINAL = [
    "model.hidden_dims=[64,64,64]",
    "model.layer=concatsquash",
    "model.activation=tanh",
    "model.zero_init=false",
    "model.time_length=0.5",
    "model.divergence=exact",
    "model.solver.name=dopri5",
    "model.solver.rtol=1e-5",
    "model.solver.atol=1e-5",
    "model.kinetic=0.0",
    "model.jacobian=0.0",
    "train.batch_size=100",
    "train.lr=1e-3",
    "train.weight_decay=1e-5",  # the original optimiser default
    "train.schedule=constant",
    "train.optimizer=adam",
]
MODES = {
    "backprop": ["model.solver.adjoint=false"],
    # The fused exact-trace pass through torch.compile (cnf.fused_trace); the
    # first iteration includes the compilation (cached on disk across runs).
    "backprop_compiled": ["model.solver.adjoint=false", "model.compile=true"],
    "adjoint": ["model.solver.adjoint=true", "model.solver.seminorm=false"],
    "adjoint_seminorm": ["model.solver.adjoint=true", "model.solver.seminorm=true"],
}


def toy_setup(overrides: list[str], num_test: int) -> tuple:
    """``(cfg, data, model, optimiser)`` of the toy config with ``overrides``, seeded."""
    cfg = load_config("configs/ffjord/toy.yaml", overrides)
    data = build_dataset(cfg.data.name, test_size=num_test, val_size=10)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.event_shape)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return cfg, data, model, opt


def toy_batch(cfg, data, it: int) -> torch.Tensor:  # noqa: ANN001
    """Iteration ``it``'s training batch, with the training loop's seeds."""
    torch.manual_seed(iteration_seed(cfg.seed, it))
    x = data.sample_train(batch_rng(cfg.seed, it), cfg.train.batch_size)
    return torch.as_tensor(x, dtype=torch.float32)


def run(overrides: list[str], iters: int, checkpoints: tuple[int, ...], num_test: int) -> dict:
    cfg, data, model, opt = toy_setup(overrides + [f"train.iters={iters}"], num_test)
    if cfg.train.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
    else:
        sched = None
    times, nfe_f, nfe_b, out = [], [], [], {}
    for it in range(1, iters + 1):
        x = toy_batch(cfg, data, it)
        t0 = time.perf_counter()
        loss = model.training_loss(x)
        opt.zero_grad(set_to_none=True)
        loss.loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        times.append(time.perf_counter() - t0)
        nfe_f.append(loss.stats["nfe_forward"])
        nfe_b.append(loss.after_backward()["nfe_backward"])
        if it in checkpoints:
            result = evaluate_points(
                model, data.test, data, batch_size=len(data.test), seed=cfg.eval.seed
            )
            ev = summarize(result, data)
            out[it] = {
                "sec_per_iter": float(np.mean(times)),
                "nfe_forward": int(np.mean(nfe_f[-10:])),
                "nfe_backward": int(np.mean(nfe_b[-10:])),
                "test_nll": ev["nll"],
                "test_nll_stderr": ev["nll_stderr"],
            }
            print(f"  iter {it}: {json.dumps(out[it])}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--iters", type=int, default=1000, help="iterations for the original model")
    p.add_argument("--modes", default="backprop,adjoint,adjoint_seminorm")
    p.add_argument(
        "--default-iters", type=int, default=None, help="iterations of the default config (its own)"
    )
    p.add_argument("--num-test", type=int, default=5000)
    p.add_argument("--skip-default", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(1)
    entropy = build_dataset("8gaussians", test_size=10, val_size=10).entropy[0]
    rows = []
    for mode in args.modes.split(","):
        if mode not in MODES:
            _cli.fail(f"unknown mode '{mode}'; valid: {', '.join(MODES)}")
        res = run(
            ORIGINAL + MODES[mode],
            args.iters,
            tuple(sorted({*range(200, args.iters, 200), min(200, args.iters), args.iters})),
            args.num_test,
        )
        rows.append((f"original/{mode}", res))
        print(f"done original/{mode}", flush=True)
    if not args.skip_default:
        cfg = load_config("configs/ffjord/toy.yaml")
        n = args.default_iters or cfg.train.iters
        rows.append(
            ("default (configs/ffjord/toy.yaml)", run([], n, (min(200, n), n), args.num_test))
        )
    print(
        f"\n8gaussians, 1 thread; test NLL in nats on {args.num_test} held-out points (exact trace, "
        f"dopri5 1e-5); entropy floor {entropy:.4f}"
    )
    header = "| model / gradient mode | s/iter (1–200) | s/iter (1–N) | N | NFE f/b @200 | NFE f/b @N | NLL @200 | NLL @N |"
    print(header)
    print("|" + "---|" * 8)
    for name, res in rows:
        its = sorted(res)
        a, b = res[its[0]], res[its[-1]]
        print(
            f"| {name} | {a['sec_per_iter']:.4f} | {b['sec_per_iter']:.4f} | {its[-1]} | "
            f"{a['nfe_forward']}/{a['nfe_backward']} | {b['nfe_forward']}/{b['nfe_backward']} | "
            f"{a['test_nll']:.3f} ± {a['test_nll_stderr']:.3f} | {b['test_nll']:.3f} ± {b['test_nll_stderr']:.3f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({name: res for name, res in rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
