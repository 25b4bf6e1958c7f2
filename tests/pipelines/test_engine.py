"""The training engine both pipelines run: its schedule, its milestones and its wall-clock limit (on a fake clock)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipelines.distributed import Distributed
from pipelines.engine import (
    RATE_MEASURED_STEPS,
    RATE_SKIPPED_STEPS,
    LoopPosition,
    TrainingEngine,
    steps_that_fit,
)
from pipelines.training import TrainConfig, WarmupCosine, capture_rng, resolve_precision, restore_optimization

LR = 0.1
SINGLE = Distributed(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class LinearTask:
    """A linear regression whose every micro-batch costs ``step_seconds`` and every milestone ``milestone_seconds``
    of a fake clock."""

    def __init__(self, clock: FakeClock, *, step_seconds=1.0, milestone_seconds=0.0, milestones_every=25, stop_at=None):
        self.clock = clock
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1)
        self.step_seconds = step_seconds
        self.milestone_seconds = milestone_seconds
        self.milestones_every = milestones_every
        self.stop_at = stop_at
        self.logged: list[dict[str, float]] = []
        self.milestones: list[tuple[int, bool]] = []
        self.updates = 0

    def losses(self, batch):
        self.clock.now += self.step_seconds
        inputs, targets = batch
        loss = ((self.model(inputs) - targets) ** 2).mean()
        return {"total": loss, "half": loss / 2}

    def after_update(self) -> None:
        self.updates += 1

    def is_milestone(self, step: int, last: bool) -> bool:
        return step % self.milestones_every == 0 or last

    def log(self, means, images_per_second, lr, grad_norm) -> None:
        self.logged.append({**means, "lr": lr})

    def after_step(self, step, *, last, milestone, stopping, bar) -> bool:
        if milestone:
            self.milestones.append((step, last))
            self.clock.now += self.milestone_seconds
        return self.stop_at is not None and step >= self.stop_at


def batches():
    generator = torch.Generator().manual_seed(0)
    while True:
        inputs = torch.randn(4, 3, generator=generator)
        yield inputs, inputs.sum(dim=1, keepdim=True)


def engine(task, clock, *, max_steps=1000, time_limit_s=None, position=None, log_every=10, warmup=5):
    optimizer = torch.optim.SGD(task.model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(max_steps, warmup, 0.1))
    return TrainingEngine(
        model=task.model,
        module=task.model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        precision=resolve_precision("fp32", torch.device("cpu")),
        context=SINGLE,
        device=torch.device("cpu"),
        batches=batches(),
        position=position or LoopPosition(),
        max_steps=max_steps,
        accumulate=1,
        clip_grad=1.0,
        images_per_step=4,
        log_every=log_every,
        lr_key="optim.lr",
        description="test",
        progress=False,
        time_limit_s=time_limit_s,
        started=clock(),
        clock=clock,
    )


@pytest.mark.parametrize(
    ("step", "used", "per_step", "limit", "expected"),
    [
        (100, 50.0, 0.5, 100.0, 200),  # 50 s left hold 100 more steps
        (100, 50.0, 0.3, 100.0, 266),  # 166.7 more, rounded down
        (100, 120.0, 0.5, 100.0, 100),  # out of time: end now
        (100, 0.0, 0.01, 100.0, 1000),  # capped at max_steps
    ],
)
def test_steps_that_fit(step, used, per_step, limit, expected):
    assert steps_that_fit(step, used, per_step, limit, max_steps=1000) == expected


def test_warmup_cosine_warms_up_then_decays_to_its_floor_and_follows_a_shortened_length():
    schedule = WarmupCosine(total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(1.0)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(0.55)  # half-way down the cosine
    assert schedule(110) == pytest.approx(0.1)
    schedule.total_steps = 60
    assert schedule(35) == pytest.approx(0.55)
    assert schedule(60) == pytest.approx(0.1)


def test_a_resume_takes_the_schedule_settings_from_the_config_not_the_checkpoint():
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    saved = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(500, 10, 0.0))
    optimizer.step()
    saved.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    payload = {
        "optimizer": optimizer.state_dict(),
        "scheduler": saved.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": [capture_rng(torch.device("cpu"))],
        "global_batch": 4,
    }
    resumed_optimizer = torch.optim.SGD([parameter], lr=1.0)
    resumed = torch.optim.lr_scheduler.LambdaLR(resumed_optimizer, WarmupCosine(800, 50, 0.1))
    restore_optimization(
        payload, resumed_optimizer, resumed, scaler, context=SINGLE, position=LoopPosition(), batch_size=4
    )
    assert vars(resumed.lr_lambdas[0]) == {"total_steps": 800, "warmup_steps": 50, "min_lr_ratio": 0.1}
    assert resumed.last_epoch == 1  # the position in the schedule is the checkpoint's


def test_without_a_limit_the_engine_runs_every_step_logs_and_marks_milestones():
    clock = FakeClock()
    task = LinearTask(clock)
    outcome = engine(task, clock, max_steps=60).run(task)
    assert outcome.steps_run == 60
    assert not outcome.stopped_early
    assert task.updates == 60
    assert task.milestones == [(25, False), (50, False), (60, True)]
    # Logged every 10 steps and before each milestone: 10, 20, 25, 30, 40, 50, 60.
    assert len(task.logged) == 7
    assert all(row["half"] == pytest.approx(row["total"] / 2) for row in task.logged)
    assert task.logged[-1]["total"] < task.logged[0]["total"] / 10  # it learned
    assert task.logged[-1]["lr"] == pytest.approx(LR * 0.1)  # the cosine ended at its floor


def test_a_task_can_stop_the_run_early():
    clock = FakeClock()
    task = LinearTask(clock, stop_at=25)
    outcome = engine(task, clock, max_steps=100).run(task)
    assert outcome.stopped_early
    assert outcome.steps_run == 25


def test_a_time_limit_shortens_the_schedule_to_the_steps_that_fit_and_milestones_do_not_count():
    clock = FakeClock()
    clock.now = 15.0
    # 15 s of start-up before the engine starts, a second per step, 100 s per milestone: 100 steps fit 115 s.
    task = LinearTask(clock, milestone_seconds=100.0)
    run = engine(task, clock, max_steps=1000, time_limit_s=115.0)
    run.started = 0.0
    outcome = run.run(task)
    assert outcome.steps_run == 100
    assert run.position.planned_steps == 100
    assert task.milestones[-1] == (100, True)
    assert task.logged[-1]["lr"] == pytest.approx(LR * 0.1)  # the shortened cosine still ends at its floor
    assert run.position.train_seconds == pytest.approx(115.0)


def test_the_first_plan_waits_for_a_measured_rate():
    clock = FakeClock()
    task = LinearTask(clock)
    run = engine(task, clock, max_steps=1000, time_limit_s=5.0)
    outcome = run.run(task)
    # Out of time long before, but plans are made at logged steps (every 10), the rate measured from the first one
    # after the skipped steps, over at least the measured steps.
    measured_from = math.ceil(RATE_SKIPPED_STEPS / 10) * 10
    assert outcome.steps_run == measured_from + math.ceil(RATE_MEASURED_STEPS / 10) * 10


def test_a_resumed_run_counts_the_time_already_spent_and_keeps_the_planned_length():
    clock = FakeClock()
    task = LinearTask(clock)
    # A run that had spent 40 s on 30 steps and planned 400 steps: 60 s are left at a second per step.
    position = LoopPosition(step=30, train_seconds=40.0, planned_steps=400)
    run = engine(task, clock, max_steps=1000, time_limit_s=100.0, position=position)
    assert run.total == 400
    assert run.schedules[0].total_steps == 400
    outcome = run.run(task)
    assert run.position.step == 90
    assert outcome.steps_run == 60


def test_time_limit_must_be_positive():
    with pytest.raises(ValueError, match="time_limit_s"):
        TrainConfig(time_limit_s=0)
    assert TrainConfig(time_limit_s=30.5).time_limit_s == 30.5


def test_a_run_resumed_out_of_time_ends_at_once_and_one_given_more_time_plans_again():
    clock = FakeClock()
    task = LinearTask(clock)
    spent = LoopPosition(step=80, train_seconds=100.0, planned_steps=80)
    outcome = engine(task, clock, max_steps=1000, time_limit_s=100.0, position=spent).run(task)
    assert outcome.steps_run == 0
    # The same finished run with a longer limit: 100 s more at a second per step.
    more = LoopPosition(step=80, train_seconds=100.0, planned_steps=80)
    run = engine(task, clock, max_steps=1000, time_limit_s=200.0, position=more)
    assert run.run(task).steps_run == 100


def test_without_a_limit_no_plan_is_kept():
    clock = FakeClock()
    task = LinearTask(clock)
    position = LoopPosition(step=10, planned_steps=40)
    run = engine(task, clock, max_steps=20, position=position)
    run.run(task)
    assert position.step == 20
    assert position.planned_steps is None
