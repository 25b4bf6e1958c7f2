"""Pieces every training pipeline shares: precision, threads, AdamW groups, the warmup-cosine schedule, RNG state."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from caries_mim.data import ResumableEpochSampler
from caries_mim.errors import InvalidConfigError
from pipelines.distributed import Distributed

log = logging.getLogger("caries_mim.training")

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """Resolved mixed precision: the autocast dtype (None = fp32 everywhere) and whether a GradScaler is needed."""

    name: str
    autocast_dtype: torch.dtype | None

    @property
    def needs_scaler(self) -> bool:
        return self.autocast_dtype == torch.float16

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


#: CPU flags of hardware bf16 matrix arithmetic that oneDNN uses: AMX-BF16 tiles (Intel Sapphire Rapids and later)
#: and the AVX512-BF16 dot-product instructions (Intel Cooper Lake, AMD Zen 4 and later).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_has_bf16_matmul(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (any of :data:`BF16_CPU_FLAGS`), read from the
    kernel's CPU flags; False where they cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    return any(
        line.startswith("flags") and any(flag in line.split() for flag in BF16_CPU_FLAGS) for line in text.splitlines()
    )


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``auto``: bf16 autocast on a GPU that supports it and on a CPU with bf16 matrix hardware (oneDNN runs the
    detector's convolutions and matmuls in bf16: a fine-tuning step 1.6x faster than fp32 on a 2-core Xeon with
    AMX-BF16, 1.4x on a 2-core AMD EPYC with AVX512-BF16; benchmarks/detector_step.py), fp32 on other CPUs (there
    bf16 is emulated: slower than fp32, and numerically it only costs). Explicit choices are checked against the
    device."""
    if requested not in PRECISIONS:
        raise InvalidConfigError(f"train.precision: {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            requested = "bf16" if device.type == "cpu" and cpu_has_bf16_matmul() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise InvalidConfigError("train.precision: fp16 needs a GPU (use fp32 or bf16 on CPU)")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
    return Precision(requested, dtype)


def weight_average(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of ``model``'s weights and buffers (PyTorch's ``AveragedModel``), updated with
    ``update_parameters(model)`` after each optimizer step.

    Each update moves the average a fraction ``1 - d_n`` towards the current weights, with
    ``d_n = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (timm's and YOLO's warm-up): an average with the
    full decay from the first step would still hold a large share of the randomly initialized heads after a short
    schedule (0.998 ** 1000 = 0.14). Integer buffers (BatchNorm's batch counters) are copied, not averaged.
    """
    if not 0.0 < decay < 1.0:
        raise InvalidConfigError(f"optim.ema_decay must be in (0, 1) or null, got {decay}")

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], updates: torch.Tensor | int) -> None:
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        done = int(updates)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + done) / (10.0 + done)))

    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=update, use_buffers=True)


def configure_threads(device: torch.device, local_world_size: int, threads: int | None) -> int:
    """Intra-op threads for this process: the configured number, else the CPU cores shared by the processes on this
    node (oversubscribed threads make every matmul slower). On GPU also allow TF32 for fp32 matmuls."""
    if threads is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, available // max(1, local_world_size))
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return threads


def _skips_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    """Biases, norms (1-D tensors) and learned tokens or position embeddings are not decayed (MAE, timm)."""
    return parameter.ndim <= 1 or name.endswith(("token", "pos_embed"))


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups, as MAE/timm do: no weight decay on biases, norms (1-D tensors) and learned tokens or
    position embeddings (names ending in ``token`` or ``pos_embed``); decay on every other weight."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if _skips_weight_decay(name, parameter) else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


_ENCODER_STEM = re.compile(r"(^|\.)(patch_embed|cls_token|pos_embed)(\.|$)")
_ENCODER_BLOCK = re.compile(r"(^|\.)blocks\.(\d+)\.")


def vit_layer_id(name: str, depth: int) -> int:
    """Layer of a parameter for layer-wise lr decay, as MAE's fine-tuning numbers them: the patch embedding, CLS
    token and position embedding are layer 0, encoder block i is layer i + 1, everything after the blocks (final
    norm, feature pyramid, detection heads) is layer depth + 1. ``name`` may carry any prefix
    (``retinanet.network...encoder.blocks.3.attn.qkv.weight``)."""
    if _ENCODER_STEM.search(name):
        return 0
    block = _ENCODER_BLOCK.search(name)
    return int(block.group(2)) + 1 if block else depth + 1


def freeze_encoder_layers(model: nn.Module, layers: int, depth: int) -> int:
    """Keep the encoder's first ``layers`` layers (numbered as :func:`vit_layer_id`: 0 the patch embedding, i + 1
    block i) at their current weights; returns how many tensors were frozen. Backward then stops above them, which
    on a CPU saves more than their share of the forward (attention's backward costs about 3x its forward)."""
    if not 0 <= layers <= depth + 1:
        raise InvalidConfigError(f"frozen_layers must be in [0, {depth + 1}], got {layers}")
    frozen = 0
    for name, parameter in model.named_parameters():
        if "encoder." in name and vit_layer_id(name, depth) < layers:
            parameter.requires_grad_(False)
            frozen += 1
    return frozen


def layer_decay_param_groups(
    model: nn.Module, *, base_lr: float, weight_decay: float, layer_decay: float, depth: int
) -> list[dict[str, Any]]:
    """AdamW groups with layer-wise lr decay (BEiT / MAE fine-tuning): a parameter at layer l (see
    :func:`vit_layer_id`) learns at ``base_lr * layer_decay ** (depth + 1 - l)``, so the pretrained stem moves least
    and the fresh heads at the full rate; weight decay is split as in :func:`adamw_param_groups`. Each group's
    ``lr`` is its scaled rate (a LambdaLR schedule multiplies it) and ``lr_scale`` records the factor.

    Raises:
        InvalidConfigError: ``layer_decay`` outside (0, 1].
    """
    if not 0.0 < layer_decay <= 1.0:
        raise InvalidConfigError(f"layer_decay must be in (0, 1], got {layer_decay}")
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer = vit_layer_id(name, depth)
        decayed = not _skips_weight_decay(name, parameter)
        if (layer, decayed) not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[layer, decayed] = {
                "params": [],
                "weight_decay": weight_decay if decayed else 0.0,
                "lr": base_lr * scale,
                "lr_scale": scale,
                "layer": layer,
            }
        groups[layer, decayed]["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


class WarmupCosine:
    """LR multiplier per optimizer step: linear warmup from ~0 to 1 over ``warmup_steps``, then half-cosine down to
    ``min_lr_ratio`` at ``total_steps`` (MAE's schedule, in steps instead of epochs).

    An object rather than a closure so that a time limit can shorten ``total_steps`` during the run, and so that
    LambdaLR's state_dict carries its fields into checkpoints.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's torch RNG states (CPU, and the device's CUDA generator) as tensors (weights_only-safe).

    Python's and NumPy's global generators are not captured: nothing in training draws from them (augmentation
    is seeded per item, see :class:`~caries_mim.data.ResumableEpochSampler`).
    """
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class GracefulStop:
    """Turns the first SIGINT or SIGTERM into a request the training loop honours at the end of its step (save a
    checkpoint, then stop), instead of dying mid-step. Schedulers preempt with SIGTERM; a second Ctrl-C still
    interrupts at once. Outside the main thread (where handlers cannot be installed) it only reports "no"."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers leave SIGINT/SIGTERM to the main process. A scheduler or Ctrl-C
    signals the whole process group; a worker dying on it would abort the main process before
    :class:`GracefulStop` could checkpoint. The main process shuts its workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@dataclass(frozen=True)
class TrainConfig:
    #: Optimizer steps in the whole run.
    steps: int = 1000
    seed: int = 0
    device: str = "auto"
    #: auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16.
    precision: str = "auto"
    compile: bool = False
    #: Intra-op CPU threads per process; null = cores / processes on this node.
    threads: int | None = None
    #: Wall-clock seconds for the run's steps, its start-up included and its milestones (validations, pictures,
    #: checkpoints) not: after a few dozen steps the loop measures its own rate and shortens the schedule, its cosine
    #: decay included, to the steps that end in time, at most ``steps`` (pipelines/engine.py). Counted across
    #: resumes. null: ``steps``, whatever they take.
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.time_limit_s is not None and not 0 < self.time_limit_s < math.inf:
            raise ValueError(f"time_limit_s must be a number of seconds > 0 or null, got {self.time_limit_s}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")


class DataPosition(Protocol):
    """Where a run stands in its data: the epoch and the micro-batches consumed in it."""

    epoch: int
    batch_in_epoch: int


def resumable_loader(
    dataset: Dataset,
    sampler: ResumableEpochSampler,
    *,
    batch_size: int,
    workers: int,
    device: torch.device,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """The DataLoader of a resumable run: batches from ``sampler`` (set its position before each iterator)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals,
        # Its own generator: creating an iterator must not consume the global RNG (masks, drop-path), or a resumed
        # run (which creates one more iterator) would draw differently.
        generator=torch.Generator(),
    )


def endless_batches(loader: DataLoader, sampler: ResumableEpochSampler, position: DataPosition) -> Iterator[Any]:
    """Batches over epochs from ``position``, which advances as batches are taken (and is what a checkpoint
    stores, so a resumed run continues inside the epoch where it stopped)."""
    if sampler.batches_per_epoch == 0:
        raise InvalidConfigError("optim.batch_size: not one full batch per epoch")
    while True:
        if position.batch_in_epoch >= sampler.batches_per_epoch:
            position.epoch += 1
            position.batch_in_epoch = 0
        sampler.set_position(position.epoch, position.batch_in_epoch)
        for batch in loader:
            position.batch_in_epoch += 1
            yield batch


def restore_optimization(
    payload: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    *,
    context: Distributed,
    position: DataPosition,
    batch_size: int,
) -> None:
    """Restore a checkpoint's optimizer, schedule, loss scaler and this rank's RNG, and re-express the position
    inside the epoch in the current global batch, ``batch_size`` per process times the processes (rounded down: a
    few images may be seen twice)."""
    rank, world_size, device = context.rank, context.world_size, context.device
    global_batch = batch_size * world_size
    optimizer.load_state_dict(payload["optimizer"])
    # The schedule's settings come from this run's config (and its length from the training engine), not from the
    # checkpoint: LambdaLR's state holds the fields of callable schedules, which would override a changed warmup.
    schedules = [fn for fn in getattr(scheduler, "lr_lambdas", []) if isinstance(fn, WarmupCosine)]
    configured = [dict(vars(schedule)) for schedule in schedules]
    scheduler.load_state_dict(payload["scheduler"])
    for schedule, values in zip(schedules, configured, strict=True):
        vars(schedule).update(values)
    scaler.load_state_dict(payload["scaler"])
    rng_states = payload["rng"]
    if len(rng_states) == world_size:
        restore_rng(rng_states[rank], device)
    else:
        log.warning(
            "resuming with %d process(es) instead of %d: random draws will not continue the old streams",
            world_size,
            len(rng_states),
        )
    saved_global_batch = payload["global_batch"]
    if saved_global_batch != global_batch:
        position.batch_in_epoch = position.batch_in_epoch * saved_global_batch // global_batch
