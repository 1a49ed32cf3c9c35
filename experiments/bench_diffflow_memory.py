"""Peak memory of one DiffFlow training step: plain autograd vs checkpointed backprop.

    python experiments/bench_diffflow_memory.py [--steps 10,30,100] [--batch 1024]
                                                [--config configs/diffflow/toy.yaml]
                                                [--device cpu|cuda] [overrides ...]

For each number of steps N and each ``model.backprop`` mode, one training
step (loss + backward) of the config's model is run on a batch of data:

* **CPU** — in a fresh subprocess per (N, mode), so one run's freed memory
  cannot hide the next one's. The figure is the rise of the process's peak
  resident set size (``ru_maxrss``) over its resident size just before the
  step, after a warm-up step at N = 2 has loaded every library and kernel.
  (``tracemalloc`` does not see torch's allocations.)
* **CUDA** — ``torch.cuda.max_memory_allocated`` over the step, in-process.

Prints a markdown table of the peak increments in MiB, their ratio and the
step's wall-clock time; ``--json`` writes the rows as well.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _cli  # noqa: E402,F401  (puts the repo on sys.path)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from cnf.config import load_config  # noqa: E402
from cnf.data import batch_rng, build_dataset  # noqa: E402
from cnf.models import build_model  # noqa: E402

MODES = ("autograd", "checkpointed")


def current_rss_mib() -> float:
    """Resident set size now (Linux ``/proc/self/status``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def one_step(
    config: str, overrides: list[str], *, steps: int, mode: str, batch: int, device: str
) -> dict:
    """Build the model, warm up, and measure one training step at ``steps`` in ``mode``."""
    cfg = load_config(config, [*overrides, f"model.backprop={mode}", "device=" + device])
    torch.manual_seed(0)
    data = build_dataset(
        cfg.data.name, path=cfg.data.path, test_size=10, val_size=10, batch_size=batch
    )
    model = build_model(cfg, data.event_shape).to(device)
    x = torch.as_tensor(
        data.sample_train(batch_rng(0, 1), batch), dtype=torch.float32, device=device
    )
    model.train_steps = 2
    model.training_loss(x).loss.backward()  # warm-up: libraries, kernels, allocator pools
    model.zero_grad(set_to_none=True)
    model.train_steps = steps
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = current_rss_mib()
    t0 = time.perf_counter()
    out = model.training_loss(x)
    out.loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_rss_mib()
    seconds = time.perf_counter() - t0
    grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters())))
    return {
        "steps": steps,
        "mode": mode,
        "batch": batch,
        "peak_increase_mib": peak - base,
        "seconds": seconds,
        "loss": float(out.loss.detach()),
        "grad_norm": grad_norm,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/diffflow/toy.yaml")
    parser.add_argument("--steps", default="10,30,100", help="comma-separated numbers of steps N")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    # "--worker N,mode": one measurement, run in a subprocess by the parent.
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.worker:
        n, mode = args.worker.split(",")
        row = one_step(
            args.config,
            args.overrides,
            steps=int(n),
            mode=mode,
            batch=args.batch,
            device=args.device,
        )
        print(json.dumps(row))
        return 0

    rows = []
    for n in [int(s) for s in args.steps.split(",")]:
        for mode in MODES:
            if args.device.startswith("cuda"):
                row = one_step(
                    args.config,
                    args.overrides,
                    steps=n,
                    mode=mode,
                    batch=args.batch,
                    device=args.device,
                )
            else:
                cmd = [
                    sys.executable,
                    os.path.abspath(__file__),
                    "--config",
                    args.config,
                    "--batch",
                    str(args.batch),
                    "--worker",
                    f"{n},{mode}",
                    *args.overrides,
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"N={n:4d} {mode:12s} peak +{row['peak_increase_mib']:8.1f} MiB  "
                f"{row['seconds']:.2f} s  loss {row['loss']:.4f}  |grad| {row['grad_norm']:.4f}",
                file=sys.stderr,
            )
    unit = "MiB (peak CUDA allocation)" if args.device.startswith("cuda") else "MiB (peak RSS rise)"
    print(
        f"\nDiffFlow one training step, batch {args.batch}, config {args.config}; memory in {unit}\n"
    )
    print("| N | autograd | checkpointed | ratio | autograd s | checkpointed s |")
    print("|---|---|---|---|---|---|")
    for n in sorted({r["steps"] for r in rows}):
        a = next(r for r in rows if r["steps"] == n and r["mode"] == "autograd")
        c = next(r for r in rows if r["steps"] == n and r["mode"] == "checkpointed")
        ratio = a["peak_increase_mib"] / max(c["peak_increase_mib"], 1e-9)
        print(
            f"| {n} | {a['peak_increase_mib']:.1f} | {c['peak_increase_mib']:.1f} | "
            f"{ratio:.1f}× | {a['seconds']:.2f} | {c['seconds']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    # Same seed, same data: the two modes must agree on the loss and (nearly) the gradient.
    for n in sorted({r["steps"] for r in rows}):
        a, c = (next(r for r in rows if r["steps"] == n and r["mode"] == m) for m in MODES)
        assert np.isclose(a["loss"], c["loss"], rtol=1e-5), (a, c)
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
