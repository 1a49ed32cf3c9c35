"""Train any model from a config.

    python experiments/train.py --config configs/ffjord/toy.yaml [dotted.key=value ...]

Running it again with the same ``run.dir`` resumes from the last checkpoint.
Exit codes: 0 finished, 1 non-finite loss, 2 bad input, 3 interrupted
(SIGTERM/SIGUSR1: checkpoint written, rerun to resume).

Data-parallel on N GPUs (or N CPU processes with gloo), one node:

    torchrun --standalone --nproc_per_node=N experiments/train.py --config ... [overrides]

``train.batch_size`` is the global batch; each rank trains on its slice and
only rank 0 writes the run folder. Multi-node jobs: ``slurm/ddp.sbatch.tmpl``.
"""

from __future__ import annotations

import signal

# A pre-emption signal may arrive while torch is still being imported: remember
# it (the default action would kill the process without a checkpoint) and hand
# it to the trainer once it exists, which then checkpoints and exits with 3.
_EARLY_SIGNALS: list[str] = []
for _sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_sig, lambda signum, _frame: _EARLY_SIGNALS.append(signal.Signals(signum).name))

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import _cli  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from cnf.config import load_config  # noqa: E402
from cnf.train import distributed  # noqa: E402
from cnf.train.loop import Trainer  # noqa: E402


def make_tracker(cfg, trainer: Trainer):
    """The W&B mirror of metrics.jsonl (None when disabled, and on ranks other than 0).

    The run id is kept in the checkpoint and in the run folder's ``wandb_id.txt``
    (written at once, so a run pre-empted before its first checkpoint keeps its
    id) and reused with ``resume="allow"`` when the run resumes. W&B never stops
    training: an online init that fails or times out (``track.init_timeout``)
    logs offline instead, and any other W&B error is one warning line, after
    which W&B is off for the rest of the run (:class:`~cnf.train.tracking.WandbTracker`).
    """
    from cnf.train.tracking import WandbTracker, redact, wandb_mode

    mode = wandb_mode(cfg.track.wandb)
    if mode == "disabled" or trainer.rank != 0:
        return None
    if mode != cfg.track.wandb:
        print(f"W&B: track.wandb={cfg.track.wandb} but no API key is configured; logging {mode}")
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        if trainer.wandb_id is None:
            trainer.wandb_id = trainer.folder.read_wandb_id()
        tracker = WandbTracker(
            run_dir=trainer.run_dir,
            mode=mode,
            project=cfg.track.project,
            entity=cfg.track.entity,
            group=cfg.track.group,
            name=cfg.track.name or trainer.run_dir.name,
            tags=list(cfg.track.tags),
            system_metrics=cfg.track.system_metrics,
            init_timeout=cfg.track.init_timeout,
            config=OmegaConf.to_container(cfg, resolve=True),
            run_id=trainer.wandb_id,
        )
        if not tracker.enabled:
            return None
        trainer.wandb_id = tracker.run_id
        if trainer.wandb_id:
            trainer.folder.write_wandb_id(trainer.wandb_id)
    except Exception as e:  # the tracker is a mirror: never stop training for it
        msg = redact(f"{type(e).__name__}: {e}".splitlines()[0])
        print(f"warning: W&B set-up failed ({msg}); W&B is disabled for this run", file=sys.stderr)
        return None
    return tracker


def write_plots(trainer: Trainer, final: dict) -> list[str]:
    from reporting import (
        data_window,
        density_on_grid,
        save_density_plot,
        save_image_grid,
        save_samples_plot,
    )

    made = []
    data = trainer.data
    if not trainer.cfg.eval.plots:
        return made
    samples = getattr(trainer, "samples", None)
    if data.image_shape is not None:
        if samples is not None:
            save_image_grid(
                samples.numpy(),
                trainer.run_dir / "samples.png",
                image_shape=data.image_shape,
                title=f"{data.name}, iteration {trainer.iteration}",
            )
            made.append("samples.png")
        return made
    if data.event_shape != (2,):
        return made
    window = data_window(data.test)
    xs, ys, dens, mass = density_on_grid(trainer.eval_model, window, seed=trainer.cfg.eval.seed)
    final["density_mass_on_grid"] = mass
    score = ""
    if "test_nll" in final:
        score = f", test NLL {final['test_nll']:.3f}"
    elif "test_nelbo" in final:
        score = f", test NELBO {final['test_nelbo']:.3f}"
    title = f"{data.name}, iteration {trainer.iteration}{score}"
    save_density_plot(
        xs,
        ys,
        dens,
        trainer.run_dir / "density.png",
        title=f"model density ({title}; mass {mass:.3f})",
    )
    made.append("density.png")
    if samples is not None:
        save_samples_plot(
            samples.numpy(), trainer.run_dir / "samples.png", window, title=title, data=data.test
        )
        made.append("samples.png")
    return made


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/ffjord/toy.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args()
    _cli.setup_threads()

    cfg = load_config(args.config, args.overrides)
    info = distributed.env_info()
    if info.is_main:
        print(OmegaConf.to_yaml(cfg), end="")
    if args.dry_run:
        return 0
    info = distributed.init(cfg.device)
    try:
        return train(cfg, info)
    finally:
        distributed.cleanup()


def train(cfg, info: distributed.DistInfo) -> int:
    trainer = Trainer(
        cfg,
        rank=info.rank,
        world_size=info.world_size,
        log=print if info.is_main else (lambda _msg: None),
    )
    if cfg.eval.fid.features is not None and info.is_main:
        # A wrong feature network fails now, not after training (one error line).
        from cnf.quality import build_features

        build_features(cfg.eval.fid.features, device=trainer.device).check(trainer.data.image_shape)
    # Every rank has looked at the run folder before rank 0 writes to it.
    distributed.barrier()
    trainer.prepare()
    _cli.install_stop_handlers(trainer.request_stop)
    for name in _EARLY_SIGNALS:
        trainer.request_stop(f"received {name}")
    tracker = make_tracker(cfg, trainer)
    trainer.extra_tracker = tracker
    if info.is_main:
        print(f"run folder: {trainer.run_dir}")
        if info.world_size > 1:
            print(f"data-parallel over {info.world_size} processes")
    status = trainer.train()
    if status == "interrupted":
        # The checkpoint is written; say so before W&B's (slower) finish, which
        # SLURM may cut short (KillWait) after a SIGTERM.
        if info.is_main:
            print(f"interrupted at iteration {trainer.iteration}; rerun the same command to resume")
        if tracker is not None:
            tracker.finish()
        return _cli.EXIT_INTERRUPTED
    # Rank 0 has written the final checkpoint. Evaluation runs on rank 0 alone
    # with the plain (unwrapped) model: adaptive solvers take a data-dependent
    # number of steps, so a collective evaluation could deadlock. The other
    # ranks are done and leave now rather than wait at a barrier that could
    # time out during a long evaluation.
    distributed.barrier()
    if not info.is_main:
        return 0
    final = trainer.final_metrics()
    plots = write_plots(trainer, final)
    if "density_mass_on_grid" in final:
        trainer.folder.write_final(final)
    if tracker is not None:
        tracker.summary(final)
        if plots:
            tracker.log_images(
                {p.removesuffix(".png"): trainer.run_dir / p for p in plots}, trainer.iteration
            )
        tracker.finish()
    print(format_final(final))
    return 0


def _cost(nfe: float | None) -> str:
    """``NFE n``, or a note for models without an ODE/SDE solve (discrete flows)."""
    if nfe is None or nfe != nfe or nfe == 0:
        return "no ODE/SDE solve"
    return f"NFE {nfe:.0f}"


def format_final(final: dict) -> str:
    line = f"trained {final['iterations']} iterations in {final['train_seconds']:.1f} s"
    if final.get("budget_seconds"):
        line += f" (budget {final['budget_seconds']:g} s)"
    lines = [line]
    if "test_nll" in final:
        s = f"test NLL {final['test_nll']:.4f} ± {final['test_nll_stderr']:.4f} nats ({_cost(final.get('test_nfe'))})"
        if "floor" in final:
            s += (
                f"; floor of these test points {final['floor']:.4f}; "
                f"gap {final['gap']:.4f} ± {final['gap_stderr']:.4f} (paired; the KL to the data)"
            )
        lines.append(s)
    if "test_nelbo" in final:
        lines.append(
            f"test NELBO (upper bound on the NLL of the SDE/chain model) {final['test_nelbo']:.4f} ± {final['test_nelbo_stderr']:.4f} nats"
        )
    if "test_bpd" in final:
        s = f"test bits/dim {final['test_bpd']:.4f}"
        if "test_bpd_probe_stderr" in final:
            s += (
                f" ± {final['test_bpd_stderr']:.4f} over the test points, of which "
                f"± {final['test_bpd_probe_stderr']:.4f} from the {final['test_nll_probes']} "
                "Hutchinson probes"
            )
        lines.append(s)
    if "fid" in final:
        info = final["fid_info"]
        lines.append(
            f"samples: FD {final['fid']:.3f}, KID {final['kid']:.4f} ± {final['kid_stderr']:.4f} "
            f"({info['features']} features, {final['fid_num_samples']} samples, "
            f"{_cost(final.get('fid_nfe'))}); test images: FD {final.get('fid_data', float('nan')):.3f}"
        )
    if "sample_mmd2" in final:
        lines.append(
            f"samples: MMD² to test {final['sample_mmd2']:.5f} ({_cost(final.get('sample_nfe'))})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    _cli.run_main(main)
