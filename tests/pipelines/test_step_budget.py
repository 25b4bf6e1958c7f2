"""Fine-tuning steps sized to a wall-clock budget (pipelines/step_budget.py) and the demo's use of them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml

from caries_mim.errors import InvalidArgumentError
from pipelines import demo, step_budget
from pipelines.finetune import load_finetune_config
from pipelines.step_budget import (
    LOOP_OVERHEAD,
    SECONDS_AFTER_FINETUNING,
    STARTUP_SECONDS,
    STEPS_PER_EVALUATED_IMAGE,
    STEPS_PER_EXTRA_PASS,
    StepPlan,
    measure_step_seconds,
    median_seconds,
    plan_steps,
)


def test_the_plan_spends_what_is_left_after_start_up_and_evaluations_on_steps():
    plan = plan_steps(700.0, 0.2, validation_images=120, evaluated_after=124, validations=2, max_steps=10_000)
    evaluated_seconds = (2 * 120 + 124) * STEPS_PER_EVALUATED_IMAGE * 0.2
    # The fine-tuning run gets what validations and evaluation leave; its steps are estimated after its start-up.
    assert plan.time_limit_s == pytest.approx(700.0 - SECONDS_AFTER_FINETUNING - evaluated_seconds)
    expected = int((plan.time_limit_s - STARTUP_SECONDS) / (LOOP_OVERHEAD * 0.2))
    assert plan.steps == expected
    assert plan.max_steps == 10_000
    # Two validations: half-way (rounded up) and at the last step.
    assert plan.eval_every == -(-expected // 2)
    assert plan.eval_every * 2 >= plan.steps > plan.eval_every
    # Twice as slow a machine: about half the steps in the same time.
    slower = plan_steps(700.0, 0.4, validation_images=120, evaluated_after=124, validations=2, max_steps=10_000)
    slower_seconds = 700.0 - SECONDS_AFTER_FINETUNING - STARTUP_SECONDS - 2 * evaluated_seconds
    assert abs(slower.steps - slower_seconds / (LOOP_OVERHEAD * 0.4)) <= 1


def test_further_inference_passes_cost_no_more_than_the_first_one():
    one = plan_steps(700.0, 0.2, validation_images=120, evaluated_after=124, validations=2, max_steps=10_000)
    four = plan_steps(
        700.0, 0.2, validation_images=120, evaluated_after=124, validations=2, max_steps=10_000, inference_passes=4
    )
    per_image = STEPS_PER_EVALUATED_IMAGE + 3 * STEPS_PER_EXTRA_PASS
    assert STEPS_PER_EXTRA_PASS <= STEPS_PER_EVALUATED_IMAGE  # the image is read and resampled once
    assert four.seconds_for_steps == pytest.approx(
        700.0 - SECONDS_AFTER_FINETUNING - STARTUP_SECONDS - 364 * per_image * 0.2
    )
    assert four.steps < one.steps
    with pytest.raises(InvalidArgumentError, match="inference_passes >= 1"):
        plan_steps(700.0, 0.2, validation_images=1, evaluated_after=1, max_steps=10, inference_passes=0)


def test_the_plan_stays_between_its_bounds():
    generous = plan_steps(1e6, 0.2, validation_images=10, evaluated_after=10, max_steps=3200)
    assert (generous.steps, generous.eval_every) == (3200, 1600)
    hopeless = plan_steps(10.0, 0.2, validation_images=10, evaluated_after=10, min_steps=50, max_steps=3200)
    assert hopeless.steps == 50
    assert hopeless.seconds_for_steps < 0
    assert generous.fits
    assert not hopeless.fits
    # One validation: at the last step only, wherever the time limit ends the run.
    single = plan_steps(1e3, 0.2, validation_images=1, evaluated_after=0, validations=1, min_steps=1, max_steps=9000)
    assert single.steps < 9000
    assert single.eval_every == 9000


@pytest.mark.parametrize(
    ("step_seconds", "validations", "min_steps", "max_steps"), [(0.0, 2, 1, 5), (0.1, 0, 1, 5), (0.1, 2, 6, 5)]
)
def test_impossible_plans_are_refused(step_seconds, validations, min_steps, max_steps):
    with pytest.raises(InvalidArgumentError):
        plan_steps(
            100.0,
            step_seconds,
            validation_images=1,
            evaluated_after=1,
            validations=validations,
            min_steps=min_steps,
            max_steps=max_steps,
        )


def test_the_median_is_taken_over_the_timed_calls_after_the_warm_up(monkeypatch):
    # The warm-up call reads the clock once (its end is never read); each timed call reads its start and its end.
    clock = iter([0.0, 10.0, 10.5, 20.0, 20.1, 30.0, 30.3])
    # Only this module's clock is replaced (pytest's own timing reads the real one).
    monkeypatch.setattr(step_budget, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    calls = []
    seconds = median_seconds(lambda: calls.append(1), timed=3, warmup=1, device=torch.device("cpu"))
    assert len(calls) == 4
    assert seconds == pytest.approx(0.3)  # the median of 0.5, 0.1 and 0.3


def test_a_step_of_the_configured_detector_is_timed_here_and_the_threads_are_restored():
    config = load_finetune_config(
        "demo",
        [
            "optim.batch_size=2",
            "detector.image_size=96",
            "detector.roi_size=96",
            "detector.sliding_window_overlap=0.3333",
            "train.threads=1",
        ],
    )
    threads = torch.get_num_threads()
    seconds = measure_step_seconds(config, timed=1, warmup=0)
    assert 0.0 < seconds < 60.0
    assert torch.get_num_threads() == threads
    with pytest.raises(InvalidArgumentError, match="timed >= 1"):
        measure_step_seconds(config, timed=0)


def test_the_demo_fine_tunes_the_planned_steps_and_reports_the_plan(tmp_path, monkeypatch, capsys):
    asked = {}

    def plan(seconds_left, step_seconds, **kwargs):
        asked.update(seconds_left=seconds_left, step_seconds=step_seconds, **kwargs)
        return StepPlan(
            steps=2, max_steps=2, eval_every=1, step_seconds=step_seconds, seconds_for_steps=1.0, time_limit_s=600.0
        )

    monkeypatch.setattr(demo, "measure_step_seconds", lambda config: 0.25)
    monkeypatch.setattr(demo, "plan_steps", plan)
    summary = demo.run_demo(tmp_path / "demo", n_labeled=16, seed=1, budget_seconds=600.0)
    assert asked["step_seconds"] == 0.25
    assert 0 < asked["seconds_left"] < 600.0  # what the stages before fine-tuning left
    assert asked["validation_images"] == summary["splits"]["val"]["images"]
    assert asked["evaluated_after"] == summary["splits"]["test"]["images"] + demo.PREDICT_FILES
    assert asked["max_steps"] == load_finetune_config("demo", None).train.steps
    assert summary["finetune"]["steps"] == 2
    assert summary["finetune_plan"] == {
        "steps": 2,
        "max_steps": 2,
        "eval_every": 1,
        "step_seconds": 0.25,
        "seconds_for_steps": 1.0,
        "time_limit_s": 600.0,
    }
    # Fine-tuning ran under the plan's time limit, capped at its steps.
    trained = yaml.safe_load((tmp_path / "demo" / "finetune" / "config.yaml").read_text())
    assert trained["train"]["time_limit_s"] == 600.0
    assert trained["train"]["steps"] == 2
    assert (
        "about 2 steps fit the 10-minute budget here (one step timed at 250 ms): fine-tuning gets 600 s and fits its "
        "schedule to them at its own rate" in capsys.readouterr().out
    )
