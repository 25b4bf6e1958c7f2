"""The optimization loop every training pipeline runs: pretraining (MIM objectives) and fine-tuning (the detector).

One structure, fed by each pipeline with what differs between them (a :class:`TrainingTask`): the losses of a
batch, which steps are milestones (a checkpoint, a validation) and what happens after a step (pictures, validation,
checkpoints, the model package). The engine owns what they share:

- the optimizer step: ``optim.accumulate`` micro-batches (DDP synchronizes only the last), autocast, the loss
  scaler, gradient clipping, the LR schedule, and a hook after each update (a weight average);
- the progress bar (rate and ETA), the loss means logged every ``log.every`` steps and before every milestone
  (the finite-loss check runs there, so a checkpoint never holds a diverged model), on every rank alike;
- a graceful stop: SIGINT / SIGTERM end the step, the task checkpoints, the run says how to resume;
- a wall-clock limit (``train.time_limit_s``): the loop measures its own rate and shortens the schedule, its
  cosine decay included, to the steps that end in time (:func:`steps_that_fit`).

The position it advances (:class:`LoopPosition`) is what checkpoints store, so a resumed run continues the data,
the schedule's length and the time already spent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipelines import distributed
from pipelines.distributed import Distributed
from pipelines.run_folder import check_finite_loss
from pipelines.training import GracefulStop, Precision, WarmupCosine

log = logging.getLogger("caries_mim.engine")

#: Steps of a run (or of a resumed run) left out of its measured rate: the first ones pay for lazy initialization
#: (allocator, oneDNN primitives, the loader's first batches).
RATE_SKIPPED_STEPS = 5
#: Steps measured before the first re-plan under a time limit: enough to average the per-batch variation out.
RATE_MEASURED_STEPS = 50


@dataclass
class LoopPosition:
    """Where a run stands: optimizer steps done, the epoch and micro-batches consumed in it, the seconds its steps
    have taken so far (start-up included, milestones excluded; across resumes) and, under a time limit, the
    schedule's length as last planned."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    train_seconds: float = 0.0
    planned_steps: int | None = None


def steps_that_fit(step: int, seconds_used: float, seconds_per_step: float, limit_s: float, max_steps: int) -> int:
    """The schedule's length that ends a run within ``limit_s`` seconds: ``step`` steps done in ``seconds_used``,
    the rest at ``seconds_per_step``; at least ``step`` (a run out of time ends now) and at most ``max_steps``."""
    if seconds_per_step <= 0:
        raise ValueError(f"seconds_per_step must be > 0, got {seconds_per_step}")
    more = math.floor(max(0.0, limit_s - seconds_used) / seconds_per_step)
    return max(step, min(max_steps, step + more))


class TrainingTask(Protocol):
    """What a pipeline gives the engine: its losses, its milestones and what it does after each step."""

    def losses(self, batch: Any) -> dict[str, torch.Tensor]:
        """The losses of one micro-batch (under autocast), ``"total"`` the one optimized; others are logged."""

    def after_update(self) -> None:
        """After each optimizer update (a weight average's update); may do nothing."""

    def is_milestone(self, step: int, last: bool) -> bool:
        """Whether ``step`` validates or checkpoints (the loss means are logged and checked before it)."""

    def log(self, means: dict[str, float], images_per_second: float, lr: float, grad_norm: float | None) -> None:
        """Write a logged interval (rank 0 only): loss means over the interval's steps and ranks."""

    def after_step(self, step: int, *, last: bool, milestone: bool, stopping: bool, bar: tqdm) -> bool:
        """Everything after a step's optimization (validation, pictures, checkpoints; the position is current);
        returns True to stop early (the same on every rank)."""


class PipelineRun(Protocol):
    """What a pipeline's run knows that its engine needs: the config's shared sections (``train``, ``optim``,
    ``log``), where it runs, its precision and whether it shows progress."""

    config: Any
    context: Distributed
    device: torch.device
    precision: Precision
    progress: bool


@dataclass(frozen=True)
class LoopOutcome:
    seconds: float
    steps_run: int
    stopped_early: bool


class TrainingEngine:
    """The loop of one run: see the module docstring.

    ``model`` is what the forward runs (a DDP or compiled wrapper), ``module`` the bare model (its parameters are
    clipped); ``max_steps`` is ``train.steps``; ``time_limit_s`` (None: none) counts from ``started`` (a
    ``clock()`` reading taken when the run began, so its start-up counts) plus the position's ``train_seconds``.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        scaler: torch.amp.GradScaler,
        precision: Precision,
        context: Distributed,
        device: torch.device,
        batches: Iterator[Any],
        position: LoopPosition,
        max_steps: int,
        accumulate: int,
        clip_grad: float | None,
        images_per_step: int,
        log_every: int,
        lr_key: str,
        description: str,
        progress: bool,
        time_limit_s: float | None = None,
        started: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model = model
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.precision = precision
        self.context = context
        self.device = device
        self.batches = batches
        self.position = position
        self.max_steps = max_steps
        self.accumulate = accumulate
        self.clip_grad = clip_grad
        self.images_per_step = images_per_step
        self.log_every = log_every
        self.lr_key = lr_key
        self.description = description
        self.progress = progress
        self.time_limit_s = time_limit_s
        self.clock = clock
        self.started = clock() if started is None else started
        #: Seconds of this process spent outside the steps (milestones: validation, pictures, checkpoints).
        self._excluded = 0.0
        #: The step this process started from, and (step, seconds used) where its rate is measured from.
        self._first_step = position.step
        self._rate_from: tuple[int, float] | None = None
        self.schedules = [fn for fn in scheduler.lr_lambdas if isinstance(fn, WarmupCosine)]
        if time_limit_s is not None and not self.schedules:
            raise ValueError("a time limit needs a WarmupCosine schedule to shorten")
        planned = position.planned_steps
        if time_limit_s is None:
            self.total = max_steps
        elif position.train_seconds >= time_limit_s:
            self.total = position.step  # resumed out of time: nothing more to run
        elif planned is None or planned <= position.step:
            # A new run, or a finished one given more time: the first plan comes from the measured rate.
            self.total = max(max_steps, position.step)
        else:
            self.total = min(max_steps, planned)
        self._set_total(self.total)

    @classmethod
    def for_run(
        cls,
        run: PipelineRun,
        *,
        model: torch.nn.Module,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        scaler: torch.amp.GradScaler,
        batches: Iterator[Any],
        position: LoopPosition,
        lr_key: str,
        description: str,
        started: float,
    ) -> TrainingEngine:
        """The engine of a pipeline's run, its settings from the config sections every pipeline has."""
        config, context = run.config, run.context
        return cls(
            model=model,
            module=module,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            precision=run.precision,
            context=context,
            device=run.device,
            batches=batches,
            position=position,
            max_steps=config.train.steps,
            accumulate=config.optim.accumulate,
            clip_grad=config.optim.clip_grad,
            images_per_step=config.optim.batch_size * config.optim.accumulate * context.world_size,
            log_every=config.log.every,
            lr_key=lr_key,
            description=description,
            progress=run.progress,
            time_limit_s=config.train.time_limit_s,
            started=started,
        )

    def seconds_used(self) -> float:
        """Seconds the run's steps have taken (start-up included, milestones excluded), across resumes."""
        return self.position.train_seconds + (self.clock() - self.started) - self._excluded

    def _set_total(self, total: int) -> None:
        self.total = total
        for schedule in self.schedules:
            schedule.total_steps = total
        self.position.planned_steps = None if self.time_limit_s is None else total

    def _replan(self, bar: tqdm) -> None:
        """Under a time limit: the schedule's length from the rate measured in this process so far."""
        step, used = self.position.step, self.seconds_used()
        if self._rate_from is None:
            if step - self._first_step >= RATE_SKIPPED_STEPS:
                self._rate_from = (step, used)
            return
        measured_steps = step - self._rate_from[0]
        if measured_steps < RATE_MEASURED_STEPS:
            return
        rate = (used - self._rate_from[1]) / measured_steps
        total = steps_that_fit(step, used, max(rate, 1e-9), self.time_limit_s, self.max_steps)
        # One length on every rank (each measured its own clock).
        total = round(
            distributed.mean_across_ranks(torch.tensor(float(total), device=self.device), self.context).item()
        )
        if total != self.total:
            self._set_total(total)
            bar.total = total
            bar.refresh()

    def run(self, task: TrainingTask) -> LoopOutcome:
        """Train until the schedule's last step, a stop signal or ``task`` stops early.

        The engine keeps no reference to ``task`` after this returns: a pipeline's task holds the engine, and a
        cycle between them would keep the data loader's persistent workers alive until a garbage collection.
        """
        position = self.position
        bar = tqdm(
            total=self.total,
            initial=position.step,
            desc=self.description,
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        interval: dict[str, torch.Tensor] = {}
        interval_steps = 0
        interval_start = loop_start = self.clock()
        stopped_early = False
        try:
            with GracefulStop() as stop:
                while position.step < self.total:
                    self.model.train()
                    grad_norm = self._optimizer_step(task, interval)
                    position.step += 1
                    interval_steps += 1
                    bar.update(1)
                    step = position.step
                    stopping = distributed.any_rank(stop.requested, self.context)
                    logging_now = step % self.log_every == 0
                    if self.time_limit_s is not None and (logging_now or step == self.total):
                        self._replan(bar)
                    last = step >= self.total
                    milestone = task.is_milestone(step, last)
                    if logging_now or milestone or stopping:
                        self._log(task, interval, interval_steps, self.clock() - interval_start, grad_norm, bar)
                        interval.clear()
                        interval_steps = 0
                        interval_start = self.clock()
                    # The time so far goes into the position before a checkpoint can store it; the clock restarts.
                    since = self.clock()
                    position.train_seconds, self._excluded, self.started = self.seconds_used(), 0.0, since
                    stopped_early = task.after_step(step, last=last, milestone=milestone, stopping=stopping, bar=bar)
                    # Milestones (validation, pictures, checkpoints) do not count against the time limit.
                    self._excluded += self.clock() - since
                    if stopping:
                        log.warning("stopped at step %d, checkpoint saved: continue with --resume", step)
                        raise KeyboardInterrupt
                    if stopped_early:
                        break
        finally:
            bar.close()
        return LoopOutcome(self.clock() - loop_start, position.step - self._first_step, stopped_early)

    def _optimizer_step(self, task: TrainingTask, interval: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """One optimizer step over ``accumulate`` micro-batches; adds the losses to ``interval`` (kept on the device:
        reading them every step would stall a GPU). Returns the gradient norm when clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(self.accumulate):
            batch = next(self.batches)
            # DDP all-reduces gradients on every backward unless told not to; only the last micro-batch needs it.
            skip_sync = micro < self.accumulate - 1 and isinstance(self.model, DistributedDataParallel)
            with (
                self.model.no_sync() if skip_sync else contextlib.nullcontext(),
                self.precision.autocast(self.device),
            ):
                losses = task.losses(batch)
            self.scaler.scale(losses["total"] / self.accumulate).backward()
            for name, value in losses.items():
                # float32 sums: a bf16 or fp16 loss summed over an interval in its own precision would lose digits.
                detached = value.detach().float() / self.accumulate
                interval[name] = interval[name] + detached if name in interval else detached
        grad_norm = None
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        task.after_update()
        return grad_norm

    def _log(
        self,
        task: TrainingTask,
        interval: dict[str, torch.Tensor],
        steps: int,
        elapsed: float,
        grad_norm: torch.Tensor | None,
        bar: tqdm,
    ) -> None:
        means = {
            name: distributed.mean_across_ranks(value / max(steps, 1), self.context).item()
            for name, value in sorted(interval.items())
        }
        check_finite_loss(means.get("total", math.nan), self.position.step, self.lr_key)
        if not self.context.is_main:
            return
        images_per_second = steps * self.images_per_step / max(elapsed, 1e-9)
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        bar.set_postfix(loss=f"{means.get('total', math.nan):.4f}", img_s=f"{images_per_second:.1f}", lr=f"{lr:.2e}")
        task.log(means, images_per_second, lr, None if grad_norm is None else float(grad_norm))
