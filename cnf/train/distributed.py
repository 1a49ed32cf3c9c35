"""torch.distributed helpers for data-parallel training (``torchrun``, SLURM + ``srun``).

Importable and usable without a process group: every helper is a no-op (or
returns its input) when ``WORLD_SIZE`` is 1, so the single-process path of the
training loop never branches on it.

Gradients are averaged by :class:`torch.nn.parallel.DistributedDataParallel`,
which all-reduces them in buckets from autograd hooks while the backward pass
is still running, so communication overlaps computation (what matters at
image scale). DDP only hooks a module's ``forward``, and a model's training
entry point is :meth:`~cnf.models.base.GenerativeModel.training_loss`, so
:func:`data_parallel` wraps the model in :class:`TrainingLoss`, a module
whose ``forward`` *is* the training loss. Buffers are not broadcast by DDP
(rank 0's would win); instead :func:`average_gradients` averages the floating
buffers (such as moving batch-norm statistics, which each rank updates from
its shard) in one flat all-reduce after the backward pass, and the logged
statistics with a stop flag in a second, tiny one (float64, so counts such as
NFE stay exact). With equal shards, the mean of the per-rank mean losses is
the global-batch mean, so the averaged gradient equals the single-process
gradient up to floating-point summation order.

Parameters are only broadcast at the start and never averaged afterwards, so a
data-dependent initialisation must give the same values on every rank: ActNorm
(:class:`cnf.flows.glow.ActNorm`, in Glow, RealNVP, residual flows and INDM's
flows) pools its statistics over ranks at its first training forward.
Spectral-norm power iterations depend only on the (identical) weights.

Evaluation never runs collectively: adaptive ODE solvers take a data-dependent
number of steps, so ranks would wait on each other's collectives forever.
Rank 0 evaluates the unwrapped model alone (never the DDP wrapper), and shares
what the other ranks must know (a validation value, a measured speed) with
:func:`broadcast_float` once it is done.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "TrainingLoss",
    "average_gradients",
    "barrier",
    "broadcast_float",
    "broadcast_module",
    "cleanup",
    "env_info",
    "init",
    "data_parallel",
    "is_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a data-parallel job (``world_size == 1``: alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Rank, local rank and world size from the environment ``torchrun`` sets."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def init(device: str = "auto", *, timeout_minutes: float | None = None) -> DistInfo:
    """Join the process group described by the environment (``env://``), if any.

    Backend: NCCL when the run uses CUDA, gloo otherwise (CPU). On CUDA the
    process is pinned to ``cuda:LOCAL_RANK``. With ``WORLD_SIZE`` unset or 1
    nothing happens.

    Args:
        device: The config's ``device`` (``auto`` | ``cpu`` | ``cuda[:N]``).
        timeout_minutes: Collective timeout; default ``$CNF_DIST_TIMEOUT_MINUTES``
            or 30.
    """
    info = env_info()
    if info.world_size <= 1 or is_distributed():
        return info
    use_cuda = device != "cpu" and torch.cuda.is_available() and device.startswith(("auto", "cuda"))
    if use_cuda:
        torch.cuda.set_device(info.local_rank)
    minutes = timeout_minutes or float(os.environ.get("CNF_DIST_TIMEOUT_MINUTES", 30))
    torch.distributed.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        init_method="env://",
        timeout=datetime.timedelta(minutes=minutes),
    )
    return info


def cleanup() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every rank (start and resume)."""
    if not is_distributed():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        torch.distributed.broadcast(t.data, src)


def broadcast_float(value: float | None, src: int = 0) -> float:
    """``src``'s ``value`` on every rank (float64; None travels as NaN). Alone: ``value``."""
    if not is_distributed():
        return math.nan if value is None else float(value)
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    t = torch.tensor([math.nan if value is None else float(value)], dtype=torch.float64)
    t = t.to(device)
    torch.distributed.broadcast(t, src)
    return float(t.cpu()[0])


class TrainingLoss(nn.Module):
    """``forward(x)`` = ``model.training_loss(x).loss``, so that DDP's hooks see the training step.

    The whole :class:`~cnf.models.base.LossOutput` of the last call (its
    statistics) is kept in :attr:`last`.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.last: Any = None

    def forward(self, x: Tensor) -> Tensor:
        self.last = self.model.training_loss(x)
        return self.last.loss


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model``'s training loss as a module; under a process group, wrapped in DDP.

    Args:
        model: A :class:`~cnf.models.base.GenerativeModel` (identical on every
            rank: call :func:`broadcast_module` first).
        device: This rank's device (CUDA: one GPU per rank).

    Returns:
        A module whose ``forward(x)`` returns the scalar loss; its
        :class:`TrainingLoss` (``.module`` under DDP) holds the last statistics.
        Gradients reach every rank already averaged when ``backward`` returns.
    """
    loss = TrainingLoss(model)
    if not is_distributed():
        return loss
    return nn.parallel.DistributedDataParallel(
        loss,
        device_ids=[device] if device.type == "cuda" else None,
        # Buffers are averaged after the step (average_gradients), not copied from rank 0.
        broadcast_buffers=False,
    )


@torch.no_grad()
def average_gradients(
    params: Iterable[nn.Parameter],
    *,
    buffers: Iterable[torch.Tensor] = (),
    stats: Mapping[str, float] | None = None,
    stop: bool = False,
) -> tuple[dict[str, float], bool]:
    """Average gradients, floating buffers and statistics over ranks; agree on stopping.

    One flat all-reduce (sum, then divide by the world size). Parameters
    without a gradient are skipped; every rank runs the same code, so the set
    is the same on all of them. The training loop passes no parameters: DDP
    (:func:`data_parallel`) has averaged their gradients during the backward pass.

    Args:
        params: Parameters whose ``.grad`` is replaced by the rank mean.
        buffers: Floating buffers replaced by the rank mean (e.g. running
            statistics, which each rank updates from its own shard).
        stats: Scalars to average (loss, NFE, regulariser values, ...).
        stop: This rank's wish to stop (a signal arrived); the result is True
            on every rank when any rank wished it.

    Returns:
        ``(mean stats, stop agreed)``. Without a process group: the inputs.
    """
    stats = dict(stats or {})
    if not is_distributed():
        return stats, stop
    world = torch.distributed.get_world_size()
    grads = [p.grad for p in params if p.grad is not None]
    bufs = [b for b in buffers if b.is_floating_point()]
    tensors = grads + bufs
    keys = list(stats)
    if tensors:
        device, dtype = tensors[0].device, tensors[0].dtype
    else:
        device, dtype = torch.device("cpu"), torch.float64
    # Statistics ride in float64 so that integer-valued counts (NFE) stay exact.
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors]) if tensors else None
    extra = torch.tensor(
        [float(stats[k]) for k in keys] + [1.0 if stop else 0.0], dtype=torch.float64
    )
    if flat is not None:
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
    extra = extra.to(device)
    torch.distributed.all_reduce(extra)
    extra = extra.cpu()
    mean = {k: float(extra[i]) / world for i, k in enumerate(keys)}
    return mean, bool(extra[-1] > 0)
