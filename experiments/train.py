"""Train any model from a config.

    python experiments/train.py --config configs/ffjord/toy.yaml [dotted.key=value ...]

Running it again with the same ``run.dir`` resumes from the last checkpoint.
Exit codes: 0 finished, 1 non-finite loss, 2 bad input, 3 interrupted
(SIGTERM/SIGUSR1: checkpoint written, rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import os

import _cli
from omegaconf import OmegaConf

from cnf.config import load_config
from cnf.train.loop import Trainer


def make_tracker(cfg, trainer: Trainer):
    """The W&B mirror of metrics.jsonl (None when disabled)."""
    from cnf.train.tracking import WandbTracker, wandb_mode

    mode = wandb_mode(cfg.track.wandb)
    if mode == "disabled" or trainer.rank != 0:
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    tracker = WandbTracker(
        run_dir=trainer.run_dir,
        mode=mode,
        project=cfg.track.project,
        entity=cfg.track.entity,
        group=cfg.track.group,
        name=cfg.track.name or trainer.run_dir.name,
        tags=list(cfg.track.tags),
        config=OmegaConf.to_container(cfg, resolve=True),
        run_id=trainer.wandb_id,
    )
    trainer.wandb_id = tracker.run_id
    return tracker


def write_plots(trainer: Trainer, final: dict) -> list[str]:
    from cnf.plotting import density_on_grid, save_density_plot, save_samples_plot

    made = []
    if trainer.data.event_shape != (2,) or not trainer.cfg.eval.plots:
        return made
    xs, dens, mass = density_on_grid(trainer.eval_model, seed=trainer.cfg.eval.seed)
    final["density_mass_on_grid"] = mass
    save_density_plot(
        xs, dens, trainer.run_dir / "density.png", title=f"model density (mass {mass:.3f})"
    )
    made.append("density.png")
    if getattr(trainer, "samples", None) is not None:
        save_samples_plot(
            trainer.samples.numpy(), trainer.run_dir / "samples.png", data=trainer.data.test
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
    print(OmegaConf.to_yaml(cfg), end="")
    if args.dry_run:
        return 0
    trainer = Trainer(cfg)
    trainer.prepare()
    _cli.install_stop_handlers(trainer.request_stop)
    tracker = make_tracker(cfg, trainer)
    trainer.extra_tracker = tracker
    print(f"run folder: {trainer.run_dir}")
    status = trainer.train()
    if status == "interrupted":
        if tracker is not None:
            tracker.finish()
        print(f"interrupted at iteration {trainer.iteration}; rerun the same command to resume")
        return _cli.EXIT_INTERRUPTED
    final = trainer.final_metrics()
    plots = write_plots(trainer, final)
    if "density_mass_on_grid" in final:
        from cnf.train.checkpoint import atomic_write_text

        atomic_write_text(trainer.run_dir / "final.json", json.dumps(final, indent=2) + "\n")
    if tracker is not None:
        tracker.summary(final)
        if plots:
            tracker.log_images(
                {p.removesuffix(".png"): trainer.run_dir / p for p in plots}, trainer.iteration
            )
        tracker.finish()
    print(format_final(final))
    return 0


def format_final(final: dict) -> str:
    lines = [f"trained {final['iterations']} iterations in {final['train_seconds']:.1f} s"]
    if "test_nll" in final:
        s = f"test NLL {final['test_nll']:.4f} ± {final['test_nll_stderr']:.4f} nats (NFE {final.get('test_nfe', float('nan')):.0f})"
        if "entropy" in final:
            s += f"; data entropy (floor) {final['entropy']:.4f} ± {final['entropy_stderr']:.4f}; gap {final['gap']:.4f}"
        lines.append(s)
    if "test_nelbo" in final:
        lines.append(
            f"test NELBO (upper bound on NLL) {final['test_nelbo']:.4f} ± {final['test_nelbo_stderr']:.4f} nats"
        )
    if "test_bpd" in final:
        lines.append(f"test bits/dim {final['test_bpd']:.4f}")
    if "sample_mmd2" in final:
        lines.append(
            f"samples: MMD² to test {final['sample_mmd2']:.5f} (NFE {final.get('sample_nfe')})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    _cli.run_main(main)
