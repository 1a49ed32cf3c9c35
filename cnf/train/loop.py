"""The training loop: one config in, a self-describing run folder out.

The run folder's files are :class:`cnf.rundir.RunDir`'s; this module is the
training loop alone. Every batch and probe is a pure function of
``(seed, iteration, rank)``, so a run that is stopped and resumed from its
checkpoint continues exactly as an uninterrupted run would.

Data-parallel runs (``torchrun``) pass ``rank``/``world_size``: each rank
trains on its slice of the same global batch, gradients are averaged over
ranks by DDP during the backward pass (:mod:`cnf.train.distributed`), and
only rank 0 writes files.

**Validation** (``train.val_every``) scores the validation split under the
evaluation settings changed by ``train.val_settings``. With
``train.lr_drop_after`` / ``early_stop_after`` the validations drive the
learning rate and the stop (:class:`cnf.train.plateau.Plateau`, FFJORD's
tabular rule); with ``train.keep_best`` each improvement replaces the run
folder's ``best.pt`` and the test evaluation restores it (``final.json``:
``restored_iteration``, ``restored_val_nll``). A run that ends by its
iteration count validates its last iteration too, so it competes.

**Budget** (``train.budget_seconds``): the first ``train.budget_warmup_iters``
iterations, and at least ``train.budget_warmup_fraction`` of the budget, are
timed (the first iteration left out: it pays one-off costs), and
the iteration count is fixed once, at most ``train.iters``, so that the
budget of training seconds is spent; until then the schedule's progress is
held at 0, afterwards it spans that count. The count is in the checkpoint:
a resumed run ends exactly where an uninterrupted one with that count does,
however fast its machine. Iterations that slow down later (an adaptive
solver's NFE grows) overrun such a budget. With ``train.budget_replans = R``
the count is fitted again R times, spread evenly over the iterations left
after each fit, from the seconds per iteration since the previous fit, and
the schedule then spans the new count: the seconds spent follow the budget
through a growing NFE or a changing load; a run resumed before its last
re-fit re-fits with its own machine's speed (after it, it ends exactly where
the count says). ``final.json`` gives ``budget_seconds``, ``budget_iters``,
``budget_spent_seconds`` and ``budget_replans`` (the re-fits done).

The counters of both (best value, validations without improvement, drops
done, the fixed count) are in the checkpoint, so resume stays exact.
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
from cnf.rundir import DTYPES, RunDir, RunFolderError, flatten_config, resolve_device
from cnf.train import distributed
from cnf.train.plateau import Plateau
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
        rank, world_size: This process's place in a data-parallel job.
        clock: Seconds of a monotonic clock (tests pass a fake one): times the
            iterations (``train_seconds``, the budget).
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
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.cfg = cfg
        self.clock = clock
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
        t = cfg.train
        self.plateau = Plateau(tuple(t.lr_drop_after), t.early_stop_after)
        # The fixed iteration count of a budget run and the first iteration's seconds.
        # Re-fits: how many were done, and the iteration and seconds of the last fit.
        self.budget: dict[str, Any] = {
            "iters": None,
            "first_seconds": None,
            "replans": 0,
            "fit_iter": None,
            "fit_seconds": None,
        }
        self.val_settings = self.eval_model.with_settings(flatten_config(to_dict(t.val_settings)))
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.iteration = 0
        self.train_seconds = 0.0
        self.wandb_id: str | None = None
        self.extra_tracker = tracker
        self.progress = progress
        self._stop_reason: str | None = None
        self._lock = None
        self.step_module: torch.nn.Module | None = None  # the training step (DDP-wrapped)

    # ----------------------------------------------------------------- set-up
    def _build_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        cls = OPTIMIZERS[t.optimizer]
        # A model may ask for parameter groups (e.g. DiffFlow: drift and score lrs).
        groups = getattr(self.model, "param_groups", None)
        params = groups(t.lr) if groups is not None else self.model.parameters()
        return cls(params, lr=t.lr, weight_decay=t.weight_decay)

    @property
    def planned_iters(self) -> int | None:
        """The iteration the run ends at: ``train.iters``, or a budget run's fixed count
        (None until it is fixed). Early stopping may end it sooner."""
        if self.cfg.train.budget_seconds > 0:
            return self.budget["iters"]
        return self.cfg.train.iters

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        drop = t.lr_drop_factor**self.plateau.drops
        if t.warmup_iters and step < t.warmup_iters:
            return drop * (step + 1) / t.warmup_iters
        iters = self.planned_iters
        if iters is None:  # a budget run before its count is fixed
            return drop * SCHEDULES[t.schedule](0.0)
        # A model whose last phase trains another loss (fm's maximum-likelihood
        # fine-tune) starts the schedule afresh there, at its own scale.
        phase = getattr(self.model, "lr_phase", None)
        phase = phase(iters) if phase is not None else None
        if phase is not None and step >= phase[0]:
            start, scale = phase
            progress = (step - start) / max(1, iters - start)
            return drop * scale * SCHEDULES[t.schedule](min(1.0, progress))
        end = phase[0] if phase is not None else iters
        span = max(1, end - t.warmup_iters)
        return drop * SCHEDULES[t.schedule](min(1.0, (step - t.warmup_iters) / span))

    def _apply_lr(self) -> None:
        """Set the learning rates of the next step now (after a drop or a fixed count)."""
        step = self.scheduler.last_epoch
        lrs = [base * self._lr_factor(step) for base in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs  # what get_last_lr() reports

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
            "plateau": self.plateau.state_dict(),
            "budget": dict(self.budget),
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
        self.plateau.load_state_dict(state.get("plateau", {}))
        self.budget.update(state.get("budget", {}))
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
        """Run to the planned iteration (or an early stop); ``"finished"`` or ``"interrupted"``."""
        cfg = self.cfg
        bar = None
        if self.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(
                total=self.planned_iters,
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
        # The training loss as a module: DDP-wrapped under a process group, so that
        # gradients are all-reduced in buckets while the backward pass runs.
        step_module = self.step_module = distributed.data_parallel(self.model, self.device)
        self.model.train()
        while not self._done():
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
            t0 = self.clock()
            torch.manual_seed(iteration_seed(cfg.seed, it, self.rank))
            x = self._batch(it)
            if hasattr(self.model, "set_iteration"):  # progressive steps, a loss by phase
                self.model.set_iteration(it, self.planned_iters)
            loss = step_module(x)
            out = (step_module.module if parallel else step_module).last
            if not parallel and not torch.isfinite(loss):
                raise NonFiniteError(self._nonfinite_message("loss", float(loss.detach()), it))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            loss_value = float(loss.detach())
            stats = {**out.stats, **(out.after_backward() if out.after_backward else {})}
            if parallel:
                # DDP has averaged the gradients; now the buffers, the rank-mean loss
                # and statistics, and the decision to stop (the same on every rank).
                reduced, stop_agreed = distributed.average_gradients(
                    (),
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
            self.train_seconds += self.clock() - t0
            window_iters += 1
            if cfg.train.budget_seconds > 0:
                if self.budget["iters"] is None:
                    self._budget_step(it)
                elif self._replan_due(it):
                    self._budget_replan(it)
                if bar is not None and self.budget["iters"] is not None:
                    bar.total = self.budget["iters"]

            if it % cfg.train.log_every == 0 or it == self.planned_iters:
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
                        f"iter {it}/{self.planned_iters or '?'} loss {loss_value:.4f} "
                        f"nfe {record.get('nfe_forward', '-')}"
                    )
            if cfg.train.val_every and it % cfg.train.val_every == 0:
                self.validate()
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
        if cfg.train.budget_seconds > 0 and self.budget["iters"] is None:
            self.budget["iters"] = self.iteration  # train.iters came before the warm-up's end
        if cfg.train.keep_best and self.plateau.validated_at != self.iteration:
            self.validate()  # the last weights compete for the best too
        self.save()
        return "finished"

    def _done(self) -> bool:
        if self.plateau.stopped:
            return True
        planned = self.planned_iters
        return self.iteration >= (planned if planned is not None else self.cfg.train.iters)

    @property
    def stop_reason(self) -> str:
        """Why training ended: ``early_stopping`` | ``budget`` | ``iterations``."""
        if self.plateau.stopped:
            return "early_stopping"
        return "budget" if self.cfg.train.budget_seconds > 0 else "iterations"

    def _budget_step(self, it: int) -> None:
        """Time the warm-up; at its end fix the iteration count once (the same on every rank)."""
        t = self.cfg.train
        if self.budget["first_seconds"] is None:
            # The first iteration of the run (resumed runs have it in the checkpoint).
            self.budget["first_seconds"] = self.train_seconds
        if it < t.budget_warmup_iters:
            return
        if t.budget_warmup_fraction > 0:
            # Rank 0's clock decides, on every rank alike (the count is a collective).
            short = self.train_seconds < t.budget_warmup_fraction * t.budget_seconds
            if distributed.broadcast_float(float(short) if self.rank == 0 else None):
                return
        # Iterations 2..it: the first paid one-off costs.
        self._fit_count(it, self.budget["first_seconds"], max(1, it - 1))
        self.log(
            f"budget {t.budget_seconds:g} s: {self.budget['iters']} iterations "
            f"({self.train_seconds / it:.4f} s per iteration so far)"
        )

    def _replan_due(self, it: int) -> bool:
        """Whether iteration ``it`` is the next re-fit: the iterations left after the
        last fit split evenly among the re-fits left (``train.budget_replans``)."""
        b = self.budget
        left = self.cfg.train.budget_replans - b["replans"]
        if left <= 0 or b["fit_iter"] is None or it >= b["iters"]:
            return False
        return it >= b["fit_iter"] + (b["iters"] - b["fit_iter"]) / (left + 1)

    def _fit_count(self, it: int, since_seconds: float, timed: int) -> None:
        """Fix the count at iteration ``it`` so the budget's seconds are spent, at the
        seconds per iteration of the ``timed`` iterations since ``since_seconds``
        (rank 0's clock, the same count on every rank); the schedule spans it."""
        t = self.cfg.train
        count = None
        if self.rank == 0:
            per_iter = (self.train_seconds - since_seconds) / timed
            left = t.budget_seconds - self.train_seconds
            count = t.iters if per_iter <= 0 else it + max(0, math.floor(left / per_iter))
            count = max(it, min(t.iters, count))
        self.budget["iters"] = int(distributed.broadcast_float(count))
        self.budget["fit_iter"], self.budget["fit_seconds"] = it, self.train_seconds
        self._apply_lr()

    def _budget_replan(self, it: int) -> None:
        """Fit the count again from the seconds per iteration since the last fit."""
        t, b = self.cfg.train, self.budget
        previous = b["iters"]
        self._fit_count(it, b["fit_seconds"], max(1, it - b["fit_iter"]))
        b["replans"] += 1
        self.log(
            f"budget re-fit {b['replans']}/{t.budget_replans} at iteration {it}: "
            f"{previous} -> {b['iters']} iterations"
        )

    def validate(self) -> dict[str, Any]:
        """Score the validation split (rank 0) and apply the plateau rule (every rank).

        Logs ``val_*`` metrics with ``val_best`` and ``val_bad`` (validations
        without improvement); an improvement replaces ``best.pt``
        (``train.keep_best``); a learning-rate drop takes effect at the next step.
        """
        t = self.cfg.train
        it = self.iteration
        record: dict[str, Any] = {}
        value = None
        if self.rank == 0:
            record = self.evaluate_split(self.data.val, prefix="val_", settings=self.val_settings)
            value = record.get("val_nll", record.get("val_nelbo"))
        # The other ranks wait here while rank 0 evaluates alone (no collective inside).
        value = distributed.broadcast_float(value)
        drops = self.plateau.drops
        if self.plateau.update(value, it) and t.keep_best and self.rank == 0:
            self.folder.save_best(
                {
                    "weights": self.eval_model.state_dict(),
                    "iteration": it,
                    "metric": self._val_key(record),
                    "value": value,
                }
            )
        if self.plateau.drops != drops:
            self._apply_lr()
            self.log(
                f"iteration {it}: {self.plateau.bad} validations without improvement; "
                f"learning rate × {t.lr_drop_factor:g} → {self.scheduler.get_last_lr()[0]:.3g}"
            )
        if self.plateau.stopped:
            self.log(
                f"iteration {it}: early stop after {self.plateau.bad} validations without "
                f"improvement (best {self.plateau.best:.5f} at iteration {self.plateau.best_iteration})"
            )
        record.update(val_best=self.plateau.best, val_bad=self.plateau.bad)
        self._log(record, it)
        return record

    @staticmethod
    def _val_key(record: Mapping[str, Any]) -> str:
        return "val_nll" if "val_nll" in record else "val_nelbo"

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

    def evaluate_split(self, x: np.ndarray, *, prefix: str, settings: Any = None) -> dict[str, Any]:
        """The held-out metrics of ``x`` under ``settings`` (default: the run's evaluation ones; rank 0)."""
        cfg = self.cfg
        result = evaluate_points(
            self.eval_model,
            x,
            self.data,
            settings=settings,
            batch_size=cfg.eval.batch_size,
            seed=cfg.eval.seed,
        )
        return summarize(result, self.data, prefix=prefix)

    def restore_best(self) -> dict[str, Any]:
        """Load ``best.pt`` into the evaluated model (``train.keep_best``); what was restored.

        Returns ``{"restored_iteration", "restored_<metric>"}``, or ``{}`` when
        the run keeps no best weights (or none were written).
        """
        if not self.cfg.train.keep_best or not self.folder.has_best():
            return {}
        best = self.folder.load_best(map_location=self.device)
        self.eval_model.load_state_dict(best["weights"])
        return {
            "restored_iteration": int(best["iteration"]),
            f"restored_{best['metric']}": best["value"],
        }

    def final_metrics(self) -> dict[str, Any]:
        """Evaluate on the test set and write ``final.json`` (with the settings that made it).

        With ``train.keep_best`` the best-validation weights are restored first.
        """
        cfg = self.cfg
        t = cfg.train
        model = self.eval_model
        t0 = time.perf_counter()
        final: dict[str, Any] = {
            "iterations": self.iteration,
            "train_seconds": self.train_seconds,
            "stop_reason": self.stop_reason,
            "dataset": self.data.name,
            "family": cfg.model.family,
            "seed": cfg.seed,
            "units": "nats per sample",
        }
        if t.budget_seconds > 0:
            final.update(
                budget_seconds=t.budget_seconds,
                budget_iters=self.budget["iters"],
                budget_spent_seconds=self.train_seconds,
                budget_replans=self.budget["replans"],
            )
        if t.val_every:
            final.update(best_val=self.plateau.best, best_val_iteration=self.plateau.best_iteration)
            final["lr_drops"] = self.plateau.drops
        final.update(self.restore_best())
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
