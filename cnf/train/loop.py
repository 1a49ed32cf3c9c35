"""The training loop: one config in, a self-describing run folder out.

The run folder's files are :class:`cnf.rundir.RunDir`'s; this module is the
training loop alone. Every batch and probe is a pure function of
``(seed, iteration, rank)``, so a run that is stopped and resumed from its
checkpoint continues exactly as an uninterrupted run would.

Data-parallel runs (``torchrun``) pass ``rank``/``world_size``: each rank
trains on its slice of the same global batch, gradients are averaged over
ranks (:mod:`cnf.train.distributed`), and only rank 0 writes files.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from cnf.config import to_dict
from cnf.data import Dataset, batch_rng, dataset_from_config
from cnf.evaluation import (
    draw_samples,
    evaluate_points,
    sample_statistics,
    settings_record,
    summarize,
)
from cnf.models import GenerativeModel, build_model
from cnf.quality import SampleQuality
from cnf.registry import Registry
from cnf.rundir import DTYPES, RunDir, RunFolderError, resolve_device
from cnf.train import distributed
from cnf.train.tracking import JsonlTracker

__all__ = ["OPTIMIZERS", "SCHEDULES", "NonFiniteError", "Trainer", "iteration_seed"]


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient (message names the iteration)."""


OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry(
    "optimizer", {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
)


def _constant(progress: float) -> float:
    return 1.0


def _cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


# name → learning-rate factor as a function of the progress ∈ [0, 1] after warm-up.
SCHEDULES: Registry[Callable[[float], float]] = Registry(
    "learning-rate schedule", {"constant": _constant, "cosine": _cosine}
)


def iteration_seed(seed: int, iteration: int, rank: int = 0) -> int:
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0])


class Trainer:
    """Train one model from a resolved config into its run folder.

    Args:
        cfg: Resolved config (:func:`cnf.config.load_config`).
        tracker: Extra tracker (e.g. W&B) that mirrors ``metrics.jsonl``.
        log: Where human-readable lines go.
        progress: Show a tqdm progress bar (on a terminal).
    """

    def __init__(
        self,
        cfg: DictConfig,
        *,
        tracker: Any = None,
        log: Callable[[str], None] = print,
        progress: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg = cfg
        self.log = log
        self.rank, self.world_size = rank, world_size
        if cfg.train.batch_size % world_size:
            raise RunFolderError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                f"{world_size} data-parallel processes"
            )
        self.folder = RunDir(cfg.run.dir)
        self.run_dir = self.folder.path
        self.resuming = self.folder.prepare(cfg)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and world_size > 1:
            # One GPU per rank: distributed.init pinned this process to cuda:LOCAL_RANK.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = DTYPES[cfg.dtype]
        self.data: Dataset = dataset_from_config(cfg)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.data.event_shape).to(self.device, self.dtype)
        self.ema = copy.deepcopy(self.model).eval() if cfg.train.ema > 0 else None
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.iteration = 0
        self.train_seconds = 0.0
        self.wandb_id: str | None = None
        self.extra_tracker = tracker
        self.progress = progress
        self._stop_reason: str | None = None
        self._lock = None

    # ----------------------------------------------------------------- set-up
    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        cls = OPTIMIZERS[t.optimizer]
        # A model may ask for parameter groups (e.g. DiffFlow: drift and score lrs).
        groups = getattr(self.model, "param_groups", None)
        params = groups(t.lr) if groups is not None else self.model.parameters()
        return cls(params, lr=t.lr, weight_decay=t.weight_decay)

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if t.warmup_iters and step < t.warmup_iters:
            return (step + 1) / t.warmup_iters
        span = max(1, t.iters - t.warmup_iters)
        return SCHEDULES[t.schedule](min(1.0, (step - t.warmup_iters) / span))

    @property
    def ckpt_path(self):  # noqa: ANN201 - a Path
        return self.folder.ckpt_path

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iteration": self.iteration,
            "train_seconds": self.train_seconds,
            "wandb_id": self.wandb_id,
            "config": to_dict(self.cfg),
            "torch_version": str(torch.__version__),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = int(state["iteration"])
        self.train_seconds = float(state["train_seconds"])
        self.wandb_id = state.get("wandb_id")

    def save(self) -> None:
        if self.rank == 0:
            self.folder.save_checkpoint(self.state_dict())

    def request_stop(self, reason: str) -> None:
        """Ask the loop to checkpoint and return at the next iteration boundary (signal-safe)."""
        self._stop_reason = reason

    def prepare(self) -> None:
        """Create the folder or load the checkpoint of an existing run."""
        if self.rank == 0:
            self._lock = self.folder.lock()
        if self.resuming and self.folder.has_checkpoint():
            self.load_state_dict(self.folder.load_checkpoint(map_location=self.device))
            self.log(f"resuming {self.run_dir} from iteration {self.iteration}")
        if self.rank == 0:
            self.folder.write_config(self.cfg)
            self.metrics = JsonlTracker(self.folder.file(RunDir.METRICS))
            # Lines logged after the checkpoint are regenerated by the resumed run.
            self.metrics.truncate_after(self.iteration)

    # ------------------------------------------------------------------ train
    def _batch(self, it: int) -> torch.Tensor:
        # Every rank draws the same global batch and keeps its slice, so a
        # data-parallel run sees exactly the data of a single-process run.
        rng = batch_rng(self.cfg.seed, it)
        x = self.data.sample_train(rng, self.cfg.train.batch_size)
        if self.world_size > 1:
            per_rank = self.cfg.train.batch_size // self.world_size
            x = x[self.rank * per_rank : (self.rank + 1) * per_rank]
        return torch.as_tensor(x, dtype=self.dtype, device=self.device)

    def _log(self, record: dict[str, Any], step: int) -> None:
        if self.rank != 0:
            return
        self.metrics.log(record, step)
        if self.extra_tracker is not None:
            self.extra_tracker.log(record, step)

    def _ema_update(self) -> None:
        decay = self.cfg.train.ema
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.lerp_(pm, 1 - decay)
            for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(bm)

    def train(self) -> str:
        """Run until ``train.iters``; returns ``"finished"`` or ``"interrupted"``."""
        cfg = self.cfg
        total = cfg.train.iters
        bar = None
        if self.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(
                total=total,
                initial=self.iteration,
                disable=not sys.stderr.isatty(),
                dynamic_ncols=True,
                desc="train",
            )
        last_ckpt_time = time.monotonic()
        window_start, window_iters = time.perf_counter(), 0
        parallel = self.world_size > 1
        stop_agreed = False  # data-parallel: every rank stops at the same iteration
        if parallel:
            distributed.broadcast_module(self.model)
            if self.ema is not None:
                distributed.broadcast_module(self.ema)
        self.model.train()
        while self.iteration < total:
            if stop_agreed if parallel else self._stop_reason is not None:
                self.save()
                self.log(
                    f"{self._stop_reason or 'stop requested by another rank'}: "
                    f"checkpoint saved at iteration {self.iteration}"
                )
                # No rank exits before rank 0 has written the checkpoint
                # (torchrun tears the job down when any rank exits non-zero).
                distributed.barrier()
                return "interrupted"
            it = self.iteration + 1
            t0 = time.perf_counter()
            torch.manual_seed(iteration_seed(cfg.seed, it, self.rank))
            x = self._batch(it)
            if hasattr(self.model, "set_iteration"):  # e.g. a progressive number of steps
                self.model.set_iteration(it)
            out = self.model.training_loss(x)
            loss = out.loss
            if not parallel and not torch.isfinite(loss):
                raise NonFiniteError(self._nonfinite_message("loss", float(loss.detach()), it))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = float(loss.detach())
            stats = {**out.stats, **(out.after_backward() if out.after_backward else {})}
            if parallel:
                # After the all-reduce every rank holds the same gradients, the
                # rank-mean loss and statistics, and the same decision to stop.
                reduced, stop_agreed = distributed.average_gradients(
                    self.model.parameters(),
                    buffers=self.model.buffers(),
                    stats={"loss": loss_value, **stats},
                    stop=self._stop_reason is not None,
                )
                loss_value = reduced.pop("loss")
                stats = reduced
                if not math.isfinite(loss_value):
                    raise NonFiniteError(self._nonfinite_message("loss", loss_value, it))
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(),
                cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf,
            )
            if not torch.isfinite(grad_norm):
                raise NonFiniteError(self._nonfinite_message("gradient norm", float(grad_norm), it))
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self._ema_update()
            self.iteration = it
            self.train_seconds += time.perf_counter() - t0
            window_iters += 1

            if it % cfg.train.log_every == 0 or it == total:
                now = time.perf_counter()
                record = {
                    "loss": loss_value,
                    **stats,
                    "grad_norm": float(grad_norm),
                    "lr": self.scheduler.get_last_lr()[0],
                    "sec_per_iter": (now - window_start) / window_iters,
                    "train_seconds": self.train_seconds,
                }
                self._log(record, it)
                window_start, window_iters = now, 0
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{loss_value:.3f}",
                        nfe=record.get("nfe_forward", "-"),
                        refresh=False,
                    )
                elif self.rank == 0 and it % (cfg.train.log_every * 25) == 0:
                    self.log(
                        f"iter {it}/{total} loss {loss_value:.4f} nfe {record.get('nfe_forward', '-')}"
                    )
            if cfg.train.val_every and it % cfg.train.val_every == 0 and self.rank == 0:
                val = self.evaluate_split(self.data.val, prefix="val_")
                self._log(val, it)
            if bar is not None:
                bar.update(1)
            timer_due = (
                cfg.train.ckpt_minutes > 0
                and time.monotonic() - last_ckpt_time > 60 * cfg.train.ckpt_minutes
            )
            if it % cfg.train.ckpt_every == 0 or timer_due:
                self.save()
                last_ckpt_time = time.monotonic()
        if bar is not None:
            bar.close()
        self.save()
        return "finished"

    def _nonfinite_message(self, what: str, value: float, it: int) -> str:
        kept = (
            f"the last good checkpoint is kept at {self.ckpt_path}"
            if self.ckpt_path.exists()
            else "no checkpoint had been written yet"
        )
        return (
            f"non-finite {what} ({value}) at iteration {it}; training stopped and {kept} "
            "(try a lower train.lr, train.grad_clip, or a tighter model.solver)"
        )

    # --------------------------------------------------------------- evaluate
    @property
    def eval_model(self) -> GenerativeModel:
        return self.ema if self.ema is not None else self.model

    def evaluate_split(self, x: np.ndarray, *, prefix: str) -> dict[str, Any]:
        """The held-out metrics of ``x`` under the run's evaluation settings (rank 0)."""
        cfg = self.cfg
        result = evaluate_points(
            self.eval_model, x, self.data, batch_size=cfg.eval.batch_size, seed=cfg.eval.seed
        )
        return summarize(result, self.data, prefix=prefix)

    def final_metrics(self) -> dict[str, Any]:
        """Evaluate on the test set and write ``final.json`` (with the settings that made it)."""
        cfg = self.cfg
        model = self.eval_model
        t0 = time.perf_counter()
        final: dict[str, Any] = {
            "iterations": self.iteration,
            "train_seconds": self.train_seconds,
            "dataset": self.data.name,
            "family": cfg.model.family,
            "seed": cfg.seed,
            "units": "nats per sample",
        }
        final.update(self.evaluate_split(self.data.test, prefix="test_"))
        if cfg.eval.num_samples > 0:
            samples, nfe, _ = draw_samples(model, cfg.eval.num_samples, seed=cfg.eval.seed)
            final["sample_nfe"] = nfe
            self.samples = torch.as_tensor(samples)
            final.update(sample_statistics(samples, self.data))
        if cfg.eval.fid.features is not None:  # FD / KID of image samples (cnf.quality)
            quality = SampleQuality.for_eval(self.data, cfg.eval, device=model.device)
            final.update(quality.record(model, seed=cfg.eval.seed))
        final["eval_seconds"] = time.perf_counter() - t0
        final["eval"] = settings_record(
            model.settings,
            num_points=len(self.data.test),
            batch_size=cfg.eval.batch_size,
            seed=cfg.eval.seed,
            num_samples=cfg.eval.num_samples,
        )
        if self.rank == 0:
            self.folder.write_final(final)
        return final
