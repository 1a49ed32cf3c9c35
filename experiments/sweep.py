"""Expand a sweep file into training runs; show them, run them here, or submit a SLURM job array.

    python experiments/sweep.py configs/sweeps/ffjord_toy.yaml --dry-run       # runs + status
    python experiments/sweep.py configs/sweeps/ffjord_toy.yaml --local --jobs 2
    python experiments/sweep.py configs/sweeps/ffjord_toy.yaml --slurm --dry-run  # + sbatch script
    python experiments/sweep.py configs/sweeps/ffjord_toy.yaml --slurm

Runs live in ``<runs_root>/<sweep name>/<digest of the axis values>_s<seed>``
(see cnf/sweep.py for the file format). Relaunching a sweep skips finished
runs (``final.json``) and resumes partial ones from their checkpoints; a run
whose folder is locked by a live training process is left alone.

``--slurm`` writes ``runs-<hash>.jsonl`` (line i = array task i) and
``sweep.sbatch`` into the sweep folder and submits the unfinished runs as one
job array (``slurm/array.sbatch.tmpl``, or ``slurm/ddp.sbatch.tmpl`` for
multi-GPU / multi-node tasks). Logs: ``<sweep folder>/logs/``.

Exit codes: 0 done, 1 a local run failed, 2 bad sweep file or input,
3 interrupted (local runs checkpointed; rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "experiments" / "train.py"
TEMPLATES = REPO / "slurm"
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 3


def exec_task(manifest: str, index: str) -> None:
    """Become ``train.py`` for manifest entry ``index`` (same pid: signals reach it directly).

    Runs inside the sbatch scripts, before torch is imported: only the standard
    library here.
    """
    try:
        wanted = int(index)
        with open(manifest) as fh:
            entries = [json.loads(line) for line in fh if line.strip()]
        entry = next(e for e in entries if e["index"] == wanted)
        argv = [sys.executable, "-u", str(TRAIN), "--config", entry["config"], *entry["overrides"]]
    except (OSError, ValueError, StopIteration, KeyError) as e:
        print(f"error: manifest {manifest}: no usable entry {index} ({e!r})", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    sys.stdout.flush()
    os.execv(sys.executable, argv)


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_plan(sweep, runs, statuses) -> None:
    plural = "s" if len(runs) != 1 else ""
    print(f"sweep {sweep.name}: {len(runs)} run{plural} from {_shown(sweep.path.absolute())}")
    if sweep.bases:
        print("base configs: " + ", ".join(_shown(Path(b)) for b in sweep.bases))
    else:
        print(f"base config: {_shown(sweep.base)}")
    width = max(len(_shown(r.run_dir)) for r in runs)
    for r, st in zip(runs, statuses):
        print(f"  [{r.index:>3}] {st:<9} {_shown(r.run_dir):<{width}}  {r.describe()}")
    counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
    print("status: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if "conflict" in counts:
        print(
            "conflict: the folder holds a run trained with a different config; "
            "move it away or change runs_root"
        )


# ------------------------------------------------------------------- local
def run_local(sweep, runs, statuses, *, jobs: int) -> int:
    import signal
    import subprocess
    import time

    from cnf.sweep import run_base

    todo = [r for r, st in zip(runs, statuses) if st in ("new", "partial")]
    for r, st in zip(runs, statuses):
        if st in ("finished", "running", "conflict"):
            print(f"skip [{r.index}] {r.name}: {st}")
    if not todo:
        print("nothing to run")
        return 0
    log_dir = sweep.folder.absolute() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))

    stopping: list[str] = []

    def on_signal(signum, _frame) -> None:
        stopping.append(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)

    running: dict[subprocess.Popen, tuple] = {}
    failed, finished, interrupted = [], [], []
    forwarded = False
    while (todo and not stopping) or running:
        while todo and not stopping and len(running) < jobs:
            r = todo.pop(0)
            log_path = log_dir / f"{r.name}.log"
            cmd = [sys.executable, "-u", str(TRAIN), "--config", str(run_base(r, sweep.base))]
            cmd += r.train_overrides
            fh = open(log_path, "ab")  # noqa: SIM115 - closed when the run ends
            # Own session: a Ctrl-C in the terminal reaches only this launcher,
            # which asks every run to checkpoint (SIGTERM) instead.
            p = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
            running[p] = (r, fh, log_path)
            print(f"start [{r.index}] {r.name} (pid {p.pid}, log {_shown(log_path)})", flush=True)
        if stopping and not forwarded:
            print(f"received {stopping[0]}: asking {len(running)} run(s) to checkpoint", flush=True)
            for p in running:
                p.send_signal(signal.SIGTERM)
            forwarded = True
        time.sleep(0.2)
        for p in [p for p in running if p.poll() is not None]:
            r, fh, log_path = running.pop(p)
            fh.close()
            rc = p.returncode
            if rc == 0:
                finished.append(r)
                final = r.run_dir / "final.json"
                nll = json.loads(final.read_text()).get("test_nll") if final.is_file() else None
                extra = f": test NLL {nll:.4f}" if isinstance(nll, float) else ""
                print(f"done  [{r.index}] {r.name}{extra}", flush=True)
            elif rc == EXIT_INTERRUPTED:
                interrupted.append(r)
                print(f"stop  [{r.index}] {r.name}: checkpointed, rerun to resume", flush=True)
            else:
                failed.append(r)
                print(f"FAIL  [{r.index}] {r.name}: exit {rc}, see {_shown(log_path)}", flush=True)
    print(
        f"local sweep {sweep.name}: {len(finished)} finished, {len(failed)} failed, "
        f"{len(interrupted)} interrupted, {len(todo)} not started"
    )
    if stopping or interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else 0


# ------------------------------------------------------------------- SLURM
def submit_slurm(sweep, runs, statuses, *, dry_run: bool) -> int:
    import hashlib

    from cnf.sweep import manifest_text
    from cnf.train.checkpoint import atomic_write_text
    from slurm.launch import parse_slurm, render_sbatch, submit

    folder = sweep.folder.absolute()
    todo = [r.index for r, st in zip(runs, statuses) if st in ("new", "partial")]
    if "running" in statuses:
        print("runs marked 'running' are being trained right now and are not submitted again")
    if not todo:
        print("nothing to submit: every run is finished, running or in conflict")
        return 0
    slurm = parse_slurm(sweep.slurm, str(sweep.path))
    text = manifest_text(runs, sweep.base)
    # Named by content: a relaunch of the same sweep reuses it, and tasks of an
    # earlier array keep reading the file they were submitted with.
    manifest = folder / f"runs-{hashlib.sha1(text.encode()).hexdigest()[:8]}.jsonl"
    script_path = folder / "sweep.sbatch"
    template_path = TEMPLATES / f"{slurm.kind}.sbatch.tmpl"
    script = render_sbatch(
        template_path.read_text(),
        sweep,
        slurm,
        todo,
        manifest=manifest,
        workdir=REPO,
        python=slurm.python or sys.executable,
        log_dir=folder / "logs",
    )
    if dry_run:
        print(f"would write {_shown(manifest)} ({len(runs)} lines) and {_shown(script_path)}")
        print(f"would submit {len(todo)} of {len(runs)} runs: sbatch {_shown(script_path)}")
        print(f"---- {_shown(script_path)} (from {template_path.relative_to(REPO)}) ----")
        print(script, end="")
        print("---- end ----")
        return 0
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    if not manifest.is_file() or manifest.read_text() != text:
        atomic_write_text(manifest, text)
    atomic_write_text(script_path, script)
    job_id = submit(script_path)
    with open(folder / "jobs.txt", "a") as fh:
        fh.write(f"{job_id} {script_path.name} {manifest.name} tasks={','.join(map(str, todo))}\n")
    print(f"submitted job array {job_id}: {len(todo)} task(s), logs {_shown(folder / 'logs')}")
    print(job_id)
    return 0


# -------------------------------------------------------------------- main
def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "--task":
        if len(sys.argv) != 4:
            print("usage: sweep.py --task MANIFEST INDEX", file=sys.stderr)
            return EXIT_USAGE
        exec_task(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/ffjord_toy.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run the unfinished runs here")
    mode.add_argument("--slurm", action="store_true", help="submit them as a SLURM job array")
    parser.add_argument("--dry-run", action="store_true", help="print, do not run or submit")
    parser.add_argument("--jobs", type=int, default=1, help="--local: runs at a time (default 1)")
    parser.add_argument("--runs-root", help="override the sweep file's runs_root")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")

    import _cli

    from cnf.sweep import SweepError, load_sweep, plan, run_status
    from slurm.launch import SlurmError, check_time_quoted, parse_slurm

    _cli.setup_threads()
    try:
        text = Path(args.sweep).read_text() if Path(args.sweep).is_file() else ""
        check_time_quoted(text, args.sweep)
        sweep = load_sweep(args.sweep, search=[REPO, Path.cwd()], runs_root=args.runs_root)
        parse_slurm(sweep.slurm, str(sweep.path))  # a bad slurm section stops every mode
        runs = plan(sweep)
        statuses = [run_status(r) for r in runs]
        print_plan(sweep, runs, statuses)
        if args.slurm:
            return submit_slurm(sweep, runs, statuses, dry_run=args.dry_run)
        if args.local and not args.dry_run:
            return run_local(sweep, runs, statuses, jobs=args.jobs)
        return 0
    except (SweepError, SlurmError) as e:
        _cli.fail(str(e), EXIT_USAGE)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if len(sys.argv) >= 2 and sys.argv[1] == "--task":
        sys.exit(main())
    import _cli

    _cli.run_main(main)
