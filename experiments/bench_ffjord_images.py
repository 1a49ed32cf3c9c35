"""Benchmark a training iteration of the multi-scale FFJORD / RNODE MNIST models.

    python experiments/bench_ffjord_images.py [--batch 200] [--iters 5] [--warmup 1]
        [--device auto] [--threads 1] [--cudnn-benchmark] [--runs ffjord/backprop,rnode/adjoint] [--json OUT]

Models: ``ffjord`` = configs/ffjord/mnist.yaml (the README command of
rtqichen/ffjord: multi-scale, dims 64,64,64, 2 blocks, concat, softplus,
Rademacher, dopri5 1e-5, learned T, logit α 1e-6) and ``rnode`` =
configs/rnode/mnist.yaml (rk4 with 4 steps, kinetic and Jacobian
regularisers); each in gradient mode ``backprop`` (through the solver),
``adjoint`` or ``adjoint_seminorm``. Inputs are random MNIST-shaped batches,
``(B, 1, 28, 28)`` dequantised 8-bit levels in ``[0, 1)``, seeded.

For every run: seconds per training iteration — forward, loss, backward and
optimiser step, measured after ``--warmup`` iterations and averaged over
``--iters`` — with the NFE of the forward solves and of the backward
(adjoint) solves, and the peak memory: on CUDA ``torch.cuda.max_memory_allocated``
during the timed iterations; on CPU the peak resident set size of the
process (each run is a fresh subprocess, so the peaks are its own) and its
growth over the RSS after building the model. Times are wall clock: compare
runs made in one invocation, on an otherwise quiet machine. The untrained
models' adaptive NFE are those of their initialisation, which the original
code (measured beside this, outside the repository) shares.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import _cli  # noqa: F401  (puts the repo on sys.path)

CONFIGS = {"ffjord": "configs/ffjord/mnist.yaml", "rnode": "configs/rnode/mnist.yaml"}
MODES = {
    "backprop": ["model.solver.adjoint=false", "model.solver.seminorm=false"],
    "adjoint": ["model.solver.adjoint=true", "model.solver.seminorm=false"],
    "adjoint_seminorm": ["model.solver.adjoint=true", "model.solver.seminorm=true"],
}
DEFAULT_RUNS = "ffjord/backprop,ffjord/adjoint,ffjord/adjoint_seminorm,rnode/backprop,rnode/adjoint"


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux ``/proc``; the peak otherwise)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _peak_rss_mb()


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (
        peak / 2**20 if sys.platform == "darwin" else peak / 2**10
    )  # bytes on macOS, KiB on Linux


def measure(
    model_name: str,
    mode: str,
    *,
    batch: int,
    iters: int,
    warmup: int,
    device: str,
    cudnn_benchmark: bool = False,
) -> dict:
    """Time ``iters`` training iterations of one model and gradient mode (in this process)."""
    import torch

    # Off in training runs (exact resume needs deterministic kernels); train_cnf.py turns it on.
    torch.backends.cudnn.benchmark = cudnn_benchmark

    from cnf.config import load_config
    from cnf.models import build_model
    from cnf.rundir import resolve_device

    overrides = [*MODES[mode], "data.path=.", f"train.batch_size={batch}", f"device={device}"]
    cfg = load_config(CONFIGS[model_name], overrides)
    dev = resolve_device(cfg.device)
    torch.manual_seed(0)
    model = build_model(cfg, (1, 28, 28)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    gen = torch.Generator().manual_seed(0)
    cuda = dev.type == "cuda"
    rss0 = _rss_mb()
    times, nfe_f, nfe_b = [], [], []
    for it in range(warmup + iters):
        levels = torch.randint(0, 256, (batch, 1, 28, 28), generator=gen)
        x = ((levels + torch.rand(levels.shape, generator=gen)) / 256).to(dev)
        if cuda:
            torch.cuda.synchronize(dev)
            if it == warmup:
                torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        out = model.training_loss(x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        if it >= warmup:
            times.append(seconds)
            nfe_f.append(out.stats["nfe_forward"])
            nfe_b.append(out.after_backward()["nfe_backward"])
    result = {
        "model": model_name,
        "mode": mode,
        "config": CONFIGS[model_name],
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "cudnn_benchmark": cudnn_benchmark,
        "batch": batch,
        "iters": iters,
        "sec_per_iter": sum(times) / len(times),
        "sec_min": min(times),
        "nfe_forward": sum(nfe_f) / len(nfe_f),
        "nfe_backward": sum(nfe_b) / len(nfe_b),
        "loss": float(out.loss.detach()),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if cuda:
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        result["memory"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak_mem_mb"] = _peak_rss_mb()
        result["mem_growth_mb"] = result["peak_mem_mb"] - rss0
        result["memory"] = "peak RSS of the process"
    return result


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=200, help="batch size (the README's 200)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN pick its fastest kernels (as the original train_cnf.py does)",
    )
    p.add_argument("--runs", default=DEFAULT_RUNS, help="MODEL/MODE,... (models: ffjord, rnode)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # MODEL/MODE in this process (a subprocess)
    args = p.parse_args()
    if args.batch < 1 or args.iters < 1 or args.warmup < 0 or args.threads < 1:
        _cli.fail("--batch, --iters and --threads must be >= 1, --warmup >= 0")
    runs = [r.strip() for r in (args.one or args.runs).split(",") if r.strip()]
    for r in runs:
        name, _, mode = r.partition("/")
        if name not in CONFIGS or mode not in MODES:
            _cli.fail(
                f"unknown run '{r}'; valid: MODEL/MODE with MODEL in {', '.join(CONFIGS)} "
                f"and MODE in {', '.join(MODES)}"
            )
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        name, _, mode = runs[0].partition("/")
        res = measure(
            name,
            mode,
            batch=args.batch,
            iters=args.iters,
            warmup=args.warmup,
            device=args.device,
            cudnn_benchmark=args.cudnn_benchmark,
        )
        print(json.dumps(res))
        return 0
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    results = []
    for r in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", r]
        cmd += ["--batch", str(args.batch), "--iters", str(args.iters)]
        cmd += ["--warmup", str(args.warmup), "--device", args.device]
        cmd += ["--threads", str(args.threads)] + ["--cudnn-benchmark"] * args.cudnn_benchmark
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            lines = (proc.stderr.strip() or "no output").splitlines()
            _cli.fail(f"run {r} failed: {lines[-1]}", code=1)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"done {r}: {results[-1]['sec_per_iter']:.3f} s/iter", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    print(table(results, args))
    return 0


def table(results: list[dict], args: argparse.Namespace) -> str:
    """The results as a markdown table, with the conditions in a heading line."""
    first = results[0]
    lines = [
        f"\nMNIST multi-scale CNF, random (B, 1, 28, 28) batches, batch {args.batch}, "
        f"{first['device']}, {first['threads']} thread(s); {args.iters} timed iterations after "
        f"{args.warmup} warm-up; memory: {first['memory']}",
        "| model | gradient | s/iter | min s/iter | NFE fwd | NFE bwd | peak MiB | params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = ("sec_per_iter", "sec_min", "nfe_forward", "nfe_backward", "peak_mem_mb")
    formats = (".3f", ".3f", ".0f", ".0f", ".0f")
    for res in results:
        cells = [res["model"], res["mode"], *(format(res[k], f) for k, f in zip(keys, formats))]
        lines.append("| " + " | ".join([*cells, str(res["params"])]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    _cli.run_main(main)
