"""Re-evaluate a finished or interrupted run on its test (or validation) set.

    python experiments/evaluate.py RUN_DIR [dotted.key=value ...] [--split test|val]

Overrides change evaluation only — ``eval.*`` (e.g. ``eval.solver.rtol=1e-7``,
``eval.divergence.name=hutchinson``, ``eval.divergence.num_probes=4``),
``device`` and ``data.test_size``; ``eval.fid.features=digits|PATH`` adds the
FD / KID of ``eval.fid.num_samples`` samples (image data); any other key (``train.lr``,
``model.hidden_dims``, ...) would describe another model and is refused with
one ``error:`` line (exit 2). Prints the metrics as JSON and appends them, with
the full settings that produced them (solver, tolerances or steps,
divergence, probes, number of points, seed), to ``RUN_DIR/evals.jsonl``:
earlier results are never overwritten, and ``final.json`` is left as
training wrote it.
"""

from __future__ import annotations

import argparse
import json
import time

import _cli

from cnf.evaluation import (
    draw_samples,
    evaluate_points,
    sample_statistics,
    settings_record,
    summarize,
)
from cnf.quality import SampleQuality
from cnf.rundir import RunDir, load_run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir")
    parser.add_argument(
        "overrides", nargs="*", help="dotted.key=value (eval.*, device, data.test_size)"
    )
    parser.add_argument("--split", choices=("test", "val"), default="test")
    args = parser.parse_args()
    _cli.setup_threads()
    run = load_run(args.run_dir, args.overrides)
    cfg = run.cfg
    t0 = time.perf_counter()
    points = run.data.test if args.split == "test" else run.data.val
    result = evaluate_points(
        run.model, points, run.data, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed
    )
    out = {"iteration": run.iteration, "split": args.split, "units": "nats per sample"}
    out.update(summarize(result, run.data, prefix=f"{args.split}_"))
    if cfg.eval.num_samples > 0:
        samples, nfe, _ = draw_samples(run.model, cfg.eval.num_samples, seed=cfg.eval.seed)
        out["sample_nfe"] = nfe
        out.update(sample_statistics(samples, run.data))
    if cfg.eval.fid.features is not None:  # FD / KID of image samples, as in final.json
        quality = SampleQuality.for_eval(run.data, cfg.eval, device=run.model.device)
        out.update(quality.record(run.model, seed=cfg.eval.seed))
    out["eval_seconds"] = time.perf_counter() - t0
    out["eval"] = settings_record(
        run.model.settings,
        num_points=len(points),
        batch_size=cfg.eval.batch_size,
        seed=cfg.eval.seed,
        num_samples=cfg.eval.num_samples,
        overrides=list(args.overrides),
        time=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    folder = RunDir(run.run_dir)
    folder.append_eval(out)
    print(json.dumps(out, indent=2))
    print(f"appended to {folder.file(RunDir.EVALS)}")
    return 0


if __name__ == "__main__":
    _cli.run_main(main)
