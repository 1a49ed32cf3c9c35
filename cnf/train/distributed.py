"""torch.distributed helpers for data-parallel training (``torchrun``, SLURM + ``srun``).

Importable and usable without a process group: every helper is a no-op (or
returns its input) when ``WORLD_SIZE`` is 1, so the single-process path of the
training loop never branches on it.

Data parallelism here is deliberately manual rather than
``DistributedDataParallel``: a model's training entry point is
:meth:`~cnf.models.base.GenerativeModel.training_loss`, not ``forward``, so DDP's
forward hooks would not see it. Instead each rank computes the loss on its
shard of the global batch, and :func:`average_gradients` all-reduces the
gradients and floating buffers (such as moving batch-norm statistics) in one
flat all-reduce, and the logged statistics with a stop flag in a second, tiny
one (float64, so counts such as NFE stay exact).
With equal shards, the mean of the per-rank mean losses is the global-batch
mean, so the averaged gradient equals the single-process gradient up to
floating-point summation order.

Parameters are only broadcast at the start and never averaged afterwards, so a
data-dependent initialisation must give the same values on every rank: ActNorm
(:class:`cnf.flows.glow.ActNorm`, in Glow, RealNVP, residual flows and INDM's
flows) pools its statistics over ranks at its first training forward.
Spectral-norm power iterations depend only on the (identical) weights.

Evaluation never runs collectively: adaptive ODE solvers take a data-dependent
number of steps, so ranks would wait on each other's collectives forever.
Rank 0 evaluates the unwrapped model alone.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "DistInfo",
    "average_gradients",
    "barrier",
    "broadcast_module",
    "cleanup",
    "env_info",
    "init",
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
    is the same on all of them.

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
