"""One process or many (torchrun): device choice, process group, and the few collectives pipelines need.

Launched plainly, a pipeline runs as a world of one. Under ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``
set), it joins the process group: NCCL when every rank has a GPU, gloo otherwise (so the same command, and the
tests, run multi-process on CPU). Rank 0 alone logs, shows progress and writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from caries_mim.errors import InvalidConfigError


@dataclass(frozen=True)
class Distributed:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def choose_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` -> this rank's GPU if there is one, else CPU; ``cuda``/``cuda:N``/``cpu`` as asked (checked)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        requested = f"cuda:{local_rank}"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise InvalidConfigError(f"train.device: {requested!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError("train.device: CUDA was requested but this torch build or machine has no GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InvalidConfigError(f"train.device: {device} does not exist ({torch.cuda.device_count()} GPU(s))")
    return device


def start(requested_device: str = "auto") -> Distributed:
    """Join the torchrun process group if launched by torchrun; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = choose_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A generous timeout: rank 0 may index and cache a large dataset before the others proceed.
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
    return Distributed(rank, world_size, local_rank, local_world_size, device)


def stop(context: Distributed) -> None:
    """Leave the process group together: a rank that tears gloo down while another is still finishing (rank 0
    writes the last checkpoint) can abort the other's connection threads ("terminate called without an active
    exception", seen once in CI-sized runs), so every rank waits at a barrier first."""
    if context.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(context: Distributed) -> None:
    if context.enabled:
        dist.barrier()


def mean_across_ranks(value: torch.Tensor, context: Distributed) -> torch.Tensor:
    """Average a tensor over ranks (a copy; the input is untouched)."""
    value = value.detach().clone()
    if context.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= context.world_size
    return value


def any_rank(flag: bool, context: Distributed) -> bool:
    """True on every rank when ``flag`` is true on at least one (so all ranks stop at the same step)."""
    if not context.enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(value: Any, context: Distributed) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not context.enabled:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


@contextlib.contextmanager
def main_first(context: Distributed) -> Iterator[None]:
    """Run the body on rank 0, then on the others (e.g. rank 0 fills a cache the others then read)."""
    if not context.is_main:
        barrier(context)
    yield
    if context.is_main:
        barrier(context)
