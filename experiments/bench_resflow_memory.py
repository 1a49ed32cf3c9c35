"""Peak memory of one residual-flow training step: the plain backward vs the gradient in the forward pass.

    python experiments/bench_resflow_memory.py [--config configs/indm/celeba64.yaml]
                                               [--batch 2] [--device cpu|cuda]

Builds the residual flow of the config's ``model.flow`` (``resflow`` or
``resflow_global``) on the config's image shape and runs one training step of
its maximum-likelihood loss, ``−mean(log N(z) + logdet)``, on a random batch,
with ``logdet.grad_in_forward`` false and true. On the CPU each mode runs in a
fresh subprocess and the figure is the rise of the process's peak resident
set size (``ru_maxrss``) over a no-grad warm-up pass (ActNorm initialisation,
spectral-norm power iterations); on CUDA it is ``max_memory_allocated`` over
the step. The two modes draw the same probes, so the loss and the gradient
norm printed beside them agree. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import NoReturn

os.environ.setdefault("OMP_NUM_THREADS", "1")

import _cli  # noqa: E402,F401  (puts the repo on sys.path)
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from cnf.flows.registry import build_flow  # noqa: E402
from cnf.flows.residual import LogDetOptions  # noqa: E402

SHAPES = {
    "celeba64": (3, 64, 64),
    "cifar10": (3, 32, 32),
    "mnist": (1, 28, 28),
    "digits": (1, 8, 8),
}


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def flow_spec(config: str) -> tuple[str, dict, dict, tuple[int, ...]]:
    """``(name, options, logdet options, event shape)`` of the config's residual flow, or exit 2."""
    try:
        cfg = OmegaConf.load(config)
    except OSError as exc:
        fail(f"cannot read --config {config}: {exc.strerror}")
    section = OmegaConf.select(cfg, "model.flow")
    flow_cfg = (
        OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else {}
    )
    name = flow_cfg.pop("name", None)
    if name not in ("resflow", "resflow_global"):
        fail(f"{config}: model.flow.name is {name!r}; valid: resflow, resflow_global")
    shape = SHAPES.get(str(OmegaConf.select(cfg, "data.name")))
    if shape is None:
        fail(
            f"{config}: data.name {OmegaConf.select(cfg, 'data.name')!r}; valid: {', '.join(SHAPES)}"
        )
    return name, flow_cfg, dict(flow_cfg.pop("logdet", {})), shape


def one_step(config: str, *, grad_in_forward: bool, batch: int, device: str) -> dict:
    name, flow_cfg, logdet, shape = flow_spec(config)
    logdet["grad_in_forward"] = grad_in_forward
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    torch.manual_seed(0)
    flow = build_flow(name, event_shape=shape, logdet=LogDetOptions(**logdet), **flow_cfg)
    flow = flow.to(device).train()
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    with torch.no_grad():
        flow(x)  # ActNorm initialisation and power iterations, outside the measurement
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    torch.manual_seed(2)  # the same probes and series lengths in both modes
    z, ld = flow(x)
    loss = -(ld - 0.5 * z.flatten(1).pow(2).sum(1)).mean()
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seconds = time.perf_counter() - t0
    grad_norm = sum(
        float(p.grad.double().pow(2).sum()) for p in flow.parameters() if p.grad is not None
    )
    return {
        "grad_in_forward": grad_in_forward,
        "peak_increase_gib": (peak - base) / 2**30,
        "seconds": seconds,
        "loss": float(loss.detach()),
        "grad_norm": grad_norm**0.5,
        "params": sum(p.numel() for p in flow.parameters()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/indm/celeba64.yaml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--worker", choices=("0", "1"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch < 1:
        print("error: --batch must be >= 1", file=sys.stderr)
        return 2
    flow_spec(args.config)  # a bad config is one error line here, before any worker
    if args.worker is not None:
        row = one_step(
            args.config, grad_in_forward=args.worker == "1", batch=args.batch, device=args.device
        )
        print(json.dumps(row))
        return 0
    rows = []
    for mode in ("0", "1"):
        if args.device == "cuda":
            rows.append(
                one_step(args.config, grad_in_forward=mode == "1", batch=args.batch, device="cuda")
            )
            continue
        argv = [
            sys.executable,
            __file__,
            "--config",
            args.config,
            "--batch",
            str(args.batch),
            "--worker",
            mode,
        ]
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode:
            print(
                out.stderr.strip().splitlines()[-1]
                if out.stderr.strip()
                else "error: worker failed",
                file=sys.stderr,
            )
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"{args.config}: batch {args.batch}, {rows[0]['params']:,} flow parameters, {args.device}"
    )
    print("| grad_in_forward | peak increase (GiB) | step s | loss | grad norm |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {str(r['grad_in_forward']).lower()} | {r['peak_increase_gib']:.2f} | {r['seconds']:.1f} "
            f"| {r['loss']:.4f} | {r['grad_norm']:.6e} |"
        )
    print(
        f"memory ratio (true / false): {rows[1]['peak_increase_gib'] / rows[0]['peak_increase_gib']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
