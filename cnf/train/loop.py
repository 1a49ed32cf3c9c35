"""The training loop: one config in, a self-describing run folder out.

A run folder holds ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per
logged iteration), ``ckpt.pt`` (atomic, embeds the config) and, at the end,
``final.json``. Every batch and probe is a pure function of
``(seed, iteration, rank)``, so a run that is stopped and resumed from its
checkpoint continues exactly as an uninterrupted run would.

Data-parallel runs (``torchrun``) pass ``rank``/``world_size``: each rank
trains on its slice of the same global batch, gradients are averaged over
ranks (:mod:`cnf.train.distributed`), and only rank 0 writes files.
"""

from __future__ import annotations

import copy
import fcntl
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cnf.config import to_dict
from cnf.data import Dataset, batch_rng, dataset_from_config
from cnf.metrics import mean_stderr
from cnf.models import GenerativeModel, build_model
from cnf.train import distributed
from cnf.train.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from cnf.train.tracking import JsonlTracker

CKPT_NAME = "ckpt.pt"
# Held (POSIX record lock) by the process training in the folder, so that a
# second launch of the same run (a relaunched sweep, a duplicate array task)
# fails instead of interleaving writes. Released by the OS when the process dies.
LOCK_NAME = ".lock"

# ``dtype:`` config values.
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Keys that may change when a run is resumed: they do not change what is trained.
RESUMABLE_CHANGES = (
    "train.iters",
    "train.log_every",
    "train.ckpt_every",
    "train.ckpt_minutes",
    "train.val_every",
    "eval",
    "track",
    "run",
    "device",
)


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (message is one line)."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient (message names the iteration)."""


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ, ignoring :data:`RESUMABLE_CHANGES`."""
    a, b = _flatten(old), _flatten(new)
    diff = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in RESUMABLE_CHANGES):
            continue
        if a.get(key, "<missing>") != b.get(key, "<missing>"):
            diff.append(key)
    return diff


def prepare_run_dir(cfg: DictConfig) -> tuple[Path, bool]:
    """Check (never damage) the run folder; returns ``(path, resuming)``.

    A new or empty folder is created. A folder with a ``config.yaml`` is
    resumed if its config matches up to :data:`RESUMABLE_CHANGES`. Anything
    else is a :class:`RunFolderError`. Nothing is written here.
    """
    path = Path(cfg.run.dir)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"run.dir {path} exists and is not a folder; choose another run.dir")
    if path.is_dir() and any(p.name != LOCK_NAME for p in path.iterdir()):
        cfg_file = path / "config.yaml"
        if not cfg_file.is_file():
            raise RunFolderError(
                f"run.dir {path} is not empty and holds no config.yaml (not a cnf run); "
                "choose another run.dir"
            )
        try:
            old = OmegaConf.to_container(OmegaConf.load(cfg_file), resolve=True)
        except Exception:
            raise RunFolderError(f"run.dir {path}: config.yaml is unreadable") from None
        diff = config_differences(old, to_dict(cfg))
        old_iters = old.get("train", {}).get("iters")
        if (
            old_iters is not None
            and old_iters != cfg.train.iters
            and cfg.train.schedule != "constant"
        ):
            # A cosine schedule spans train.iters: changing it rewrites the learning
            # rates of iterations already done, so the run could not resume exactly.
            raise RunFolderError(
                f"run.dir {path} was trained with train.iters={old_iters}; "
                f"train.schedule={cfg.train.schedule} spans train.iters, so it cannot change "
                "on resume (use the same train.iters, or choose another run.dir)"
            )
        if diff:
            shown = ", ".join(diff[:5]) + (" ..." if len(diff) > 5 else "")
            raise RunFolderError(
                f"run.dir {path} holds a run with a different config (differs at {shown}); "
                "choose another run.dir to start a new run"
            )
        return path, True
    return path, False


def lock_run_dir(path: str | Path) -> Any:
    """Take the run folder's lock; :class:`RunFolderError` if another process holds it.

    Returns the open lock file: keep it referenced for as long as the run
    trains. POSIX locks belong to the process, so taking it again in the same
    process succeeds.
    """
    path = Path(path)
    fh = open(path / LOCK_NAME, "a+")  # noqa: SIM115 - held for the life of the run
    try:
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise RunFolderError(
            f"run.dir {path} is in use by another training process; "
            "wait for it to end (or stop it) before resuming this run"
        ) from None
    return fh  # the file stays empty: taking the lock changes nothing in the folder


def run_dir_locked(path: str | Path) -> bool:
    """True if another live process trains in ``path`` (on a file system with working locks).

    Not for the process that holds the lock: closing any descriptor of the file
    would release that process's POSIX lock.
    """
    lock = Path(path) / LOCK_NAME
    if not lock.is_file():
        return False
    try:
        with open(lock, "a") as fh:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.lockf(fh, fcntl.LOCK_UN)
    except OSError:
        return True
    return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunFolderError(
            f"device={name} requested but CUDA is not available; valid here: auto, cpu"
        )
    return dev


def iteration_seed(seed: int, iteration: int, rank: int = 0) -> int:
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0])


@torch.no_grad()
def evaluate_split(
    model: GenerativeModel,
    x: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    cost: Mapping[str, Any] | None = None,
    transform: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
) -> dict[str, float]:
    """NLL/NELBO in nats per sample over ``x``, with standard errors and mean NFE.

    The global RNG is forked and seeded with ``seed``, so probes and noise are
    the same for every model and cost setting (common random numbers).
    ``transform`` (``Dataset.eval_transform``: image dequantisation) is applied
    batch by batch with a numpy generator seeded by ``seed``, in order, so the
    noise does not depend on the batch size.
    """
    nll, nelbo, nfe = [], [], []
    transform_rng = np.random.default_rng([seed, 0x0DE9])
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size]
            if transform is not None:
                xb = transform(xb, transform_rng)
            xb = torch.as_tensor(xb, dtype=model.dtype, device=model.device)
            out = model.evaluate(xb, cost=cost)
            if out.nll is not None:
                nll.append(out.nll.double().cpu())
            if out.nelbo is not None:
                nelbo.append(out.nelbo.double().cpu())
            if "nfe" in out.stats:
                nfe.append(out.stats["nfe"])
    result: dict[str, float] = {}
    if nll:
        result["nll"], result["nll_stderr"] = mean_stderr(torch.cat(nll))
    if nelbo:
        result["nelbo"], result["nelbo_stderr"] = mean_stderr(torch.cat(nelbo))
    if nfe:
        result["nfe"] = float(np.mean(nfe))
    return result


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
        self.run_dir, self.resuming = prepare_run_dir(cfg)
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
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[t.optimizer]
        # A model may ask for parameter groups (e.g. DiffFlow: drift and score lrs).
        groups = getattr(self.model, "param_groups", None)
        params = groups(t.lr) if groups is not None else self.model.parameters()
        return cls(params, lr=t.lr, weight_decay=t.weight_decay)

    def _lr_factor(self, step: int) -> float:
        t = self.cfg.train
        if t.warmup_iters and step < t.warmup_iters:
            return (step + 1) / t.warmup_iters
        if t.schedule == "cosine":
            span = max(1, t.iters - t.warmup_iters)
            progress = min(1.0, (step - t.warmup_iters) / span)
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / CKPT_NAME

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
            save_checkpoint(self.ckpt_path, self.state_dict())

    def request_stop(self, reason: str) -> None:
        """Ask the loop to checkpoint and return at the next iteration boundary (signal-safe)."""
        self._stop_reason = reason

    def prepare(self) -> None:
        """Create the folder or load the checkpoint of an existing run."""
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock = lock_run_dir(self.run_dir)
        if self.resuming and self.ckpt_path.exists():
            self.load_state_dict(load_checkpoint(self.ckpt_path, map_location=self.device))
            self.log(f"resuming {self.run_dir} from iteration {self.iteration}")
        if self.rank == 0:
            atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg))
            self.metrics = JsonlTracker(self.run_dir / "metrics.jsonl")
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
            stats = {**out.stats, **self.model.backward_stats()}
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
                val = evaluate_split(
                    self.eval_model,
                    self.data.val,
                    batch_size=cfg.eval.batch_size,
                    seed=cfg.eval.seed,
                    transform=self.data.eval_transform,
                )
                self._log({f"val_{k}": v for k, v in val.items()}, it)
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

    def final_metrics(self) -> dict[str, Any]:
        """Evaluate on the test set and write ``final.json``."""
        cfg = self.cfg
        model = self.eval_model
        t0 = time.perf_counter()
        test = evaluate_split(
            model,
            self.data.test,
            batch_size=cfg.eval.batch_size,
            seed=cfg.eval.seed,
            transform=self.data.eval_transform,
        )
        final: dict[str, Any] = {
            "iterations": self.iteration,
            "train_seconds": self.train_seconds,
            "dataset": self.data.name,
            "family": cfg.model.family,
            "seed": cfg.seed,
            "units": "nats per sample",
        }
        for k, v in test.items():
            final[f"test_{k}"] = v
        if self.data.entropy is not None and ("test_nll" in final or "test_nelbo" in final):
            h, h_se = self.data.entropy
            final["entropy"], final["entropy_stderr"] = h, h_se
            if "test_nll" in final:
                final["gap"] = final["test_nll"] - h
            if "test_nelbo" in final:  # NELBO − H ≥ KL(data ‖ model): a bound, not the gap
                final["nelbo_gap"] = final["test_nelbo"] - h
        final.update(bpd_metrics(final, self.data, prefix="test_"))
        if cfg.eval.num_samples > 0:
            devices = [model.device] if model.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(cfg.eval.seed)
                samples, stats = model.sample(cfg.eval.num_samples)
            final["sample_nfe"] = stats.get("nfe")
            self.samples = samples.detach().cpu()
            final.update(sample_statistics(self.samples.numpy(), self.data))
        final["eval_seconds"] = time.perf_counter() - t0
        if self.rank == 0:
            atomic_write_text(self.run_dir / "final.json", json.dumps(final, indent=2) + "\n")
        return final


def bpd_metrics(metrics: Mapping[str, Any], data: Dataset, *, prefix: str) -> dict[str, Any]:
    """Bits/dim of image data from ``{prefix}nll`` (else ``{prefix}nelbo``) in nats.

    ``bpd = nats / (D ln 2) + log2(L)`` for data dequantised to ``[0, 1)`` from L
    levels (:mod:`cnf.data.images`); the convention string goes beside the number.
    Empty for non-image data.
    """
    from cnf.metrics import bits_per_dim

    offset = data.bpd_offset
    if offset is None:
        return {}
    out: dict[str, Any] = {}
    for name in ("nll", "nelbo"):
        if f"{prefix}{name}" not in metrics:
            continue
        key = (
            f"{prefix}bpd"
            if name == "nll" or f"{prefix}nll" not in metrics
            else f"{prefix}nelbo_bpd"
        )
        out[key] = bits_per_dim(metrics[f"{prefix}{name}"], data.dim, offset_bits=offset)
        out[f"{key}_stderr"] = metrics[f"{prefix}{name}_stderr"] / (data.dim * math.log(2.0))
    if out:
        source = "nll" if f"{prefix}nll" in metrics else "nelbo (an upper bound)"
        out["bpd_convention"] = (
            f"bits/dim = {source} / (D ln 2) + log2({data.num_levels}), D = {data.dim}; "
            f"uniform dequantisation x = (pixel + u) / {data.num_levels}, u ~ U[0,1), "
            "seeded fresh noise per evaluation"
        )
    return out


def sample_statistics(
    samples: np.ndarray, data: Dataset, *, max_points: int = 5000
) -> dict[str, float]:
    """Sample quality for low-dimensional data: MMD² to the test set, exact data log-density."""
    from cnf.metrics import mmd2_rbf

    out: dict[str, float] = {}
    if data.dim > 64:
        return out
    finite = np.isfinite(samples).all(axis=tuple(range(1, samples.ndim)))
    out["sample_finite_fraction"] = float(finite.mean())
    s = samples[finite][:max_points].reshape(-1, data.dim)
    t = data.test[:max_points]
    if data.eval_transform is not None:  # image levels -> the model's [0, 1) scale
        t = data.eval_transform(t, np.random.default_rng(0))
    t = t.reshape(-1, data.dim)
    if len(s) > 1:
        out["sample_mmd2"] = mmd2_rbf(torch.as_tensor(s), torch.as_tensor(t))
    if data.log_density is not None and len(s):
        lp = data.log_density(s)
        inside = np.isfinite(lp)
        out["sample_support_fraction"] = float(inside.mean())
        if inside.any():
            out["sample_data_logp"] = float(lp[inside].mean())
    return out
