"""Re-evaluate a finished or interrupted run on its test set.

    python experiments/evaluate.py RUN_DIR [dotted.key=value ...]

Overrides change evaluation only (e.g. ``eval.solver.rtol=1e-7``,
``eval.divergence=hutchinson``, ``eval.num_probes=4``). Prints the metrics and
writes them to ``RUN_DIR/eval-<iteration>.json``; ``final.json`` is left as
training wrote it.
"""

from __future__ import annotations

import argparse
import json
import time

import _cli

from cnf.runs import load_run
from cnf.train.checkpoint import atomic_write_text
from cnf.train.loop import bpd_metrics, evaluate_split, sample_statistics


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value (eval.* keys)")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    args = parser.parse_args()
    _cli.setup_threads()
    run = load_run(args.run_dir, args.overrides)
    cfg = run.cfg
    t0 = time.perf_counter()
    data = run.data.test if args.split == "test" else run.data.val
    res = evaluate_split(
        run.model,
        data,
        batch_size=cfg.eval.batch_size,
        seed=cfg.eval.seed,
        transform=run.data.eval_transform,
    )
    out = {"iteration": run.iteration, "split": args.split, "units": "nats per sample"}
    out.update({f"{args.split}_{k}": v for k, v in res.items()})
    if run.data.entropy is not None and f"{args.split}_nll" in out:
        out["entropy"], out["entropy_stderr"] = run.data.entropy
        out["gap"] = out[f"{args.split}_nll"] - out["entropy"]
    out.update(bpd_metrics(out, run.data, prefix=f"{args.split}_"))
    if cfg.eval.num_samples > 0:
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(cfg.eval.seed)
            samples, stats = run.model.sample(cfg.eval.num_samples)
        out["sample_nfe"] = stats.get("nfe")
        out.update(sample_statistics(samples.detach().cpu().numpy(), run.data))
    out["eval_seconds"] = time.perf_counter() - t0
    path = run.run_dir / f"eval-{run.iteration}.json"
    atomic_write_text(path, json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
