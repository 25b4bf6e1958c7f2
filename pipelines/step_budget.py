"""Fine-tuning steps that fit a wall-clock budget on the machine at hand.

The demo promises its whole run in 15 minutes on 2 CPU cores, but a step of the same detector costs 202 ms on a
2-core Xeon with AMX-BF16 and 329 ms on a 2-core AMD EPYC with AVX512-BF16 (benchmarks/detector_step.py, "demo
scale"): a fixed step count either overruns the budget on the slower machine or wastes it on the faster one. So the
demo times a few steps of its own detector here, on random crops, and from what is left of the budget sets aside
what validation and evaluation will cost; the rest is the fine-tuning run's time limit (``train.time_limit_s``),
within which the training loop fits its schedule to its own measured rate (pipelines/engine.py). The timed step
only prices the evaluations and gives the first estimate of the steps:

    time limit = seconds left - validations - what follows fine-tuning
    steps ~ (time limit - start-up) / (loop overhead x step)

Validation and evaluation run the same network over whole images, so their cost is counted in steps per image,
measured with the step: the constants below come from the demo's run on the Xeon (2,400 steps: 703 s of
fine-tuning with 4 validations of 120 images, evaluation of 120 test images 22 s; README). They still bound the
frozen-encoder recipe on a 2-core EPYC (fresh clone, 2026-12-04: step timed 129 ms, loop 148 ms = 1.15x; a
validated image 0.1 s = 0.8 timed steps; the whole demo 13 min 37 s against the 14-minute plan). Test-time flips
run the network again on the image already read and resampled: with four passes (fresh clone, 2026-12-05, step timed
161 ms) a validated image took 0.44 s = 2.7 timed steps; on a later clone whose step timed fast (135 ms) a validated
image took 0.47 s and an evaluated one 0.45 s, 3.4 timed steps, and the demo overran its budget by 20 s. Inference
does not follow the timed step as closely as training does (a validated image took 0.42-0.47 s whether the step timed
at 89 or 161 ms), so the price is the dearest measurement: on a fresh clone of 2026-12-06 whose step timed at 89 ms a
validated image took 0.42 s, 4.8 timed steps, and the demo overran its 795 s budget by 23 s (validation 15 s over
its price, evaluation 8 s). Hence 1.2 + 3 x 1.2 timed steps an image with four passes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from caries_mim.detection import CariesDetector
from caries_mim.errors import InvalidArgumentError
from pipelines.distributed import choose_device
from pipelines.finetune import FinetuneConfig, detector_config, encoder_architecture
from pipelines.training import configure_threads, freeze_encoder_layers, resolve_precision

#: A step of the training loop against the timed step: data loading, logging, gradient clipping, the scheduler.
#: Measured 1.15 (fresh clone, 2026-12-04); on 2026-12-05 four fresh clones on the same 2-core EPYC timed 161, 164,
#: 177 and 133 ms for a loop that ran 164, 154, 157 and 162 ms a step (0.89 to 1.22x): the timing of a few steps
#: moves with the VM's neighbours. Only the first estimate uses it: the loop measures its own rate.
LOOP_OVERHEAD = 1.1
#: Reading the training set, fitting anchors and building the loaders, before the first step.
STARTUP_SECONDS = 40.0
#: A validation or evaluation image (reading, resampling, sliding-window inference, box selection, matching) in timed
#: steps, with one inference pass.
STEPS_PER_EVALUATED_IMAGE = 1.2
#: Each further test-time pass over an image already read and resampled (a flipped copy), in timed steps.
STEPS_PER_EXTRA_PASS = 1.2
#: What follows fine-tuning besides predicting images: evaluation's bootstrap, curves and overlays (19 s), the
#: service's start and its three answers (6 s), the predict stage's files (2 s) (fresh clone, 2026-12-05).
SECONDS_AFTER_FINETUNING = 30.0
#: Lesion crops in the timed batch, like the recipe's (two lesions of 12 working pixels each).
_LESIONS_PER_CROP = 2


@dataclass(frozen=True)
class StepPlan:
    """A fine-tuning schedule sized to a budget: about ``steps`` in all (at most ``max_steps``) within
    ``time_limit_s`` seconds of the run (start-up and steps; validations not), a validation every ``eval_every``."""

    steps: int
    max_steps: int
    eval_every: int
    step_seconds: float
    seconds_for_steps: float
    time_limit_s: float

    @property
    def fits(self) -> bool:
        """Whether the steps fit the budget (False when the floor of the plan, ``min_steps``, overruns it)."""
        return self.steps * LOOP_OVERHEAD * self.step_seconds <= max(self.seconds_for_steps, 0.0)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "steps": self.steps,
            "max_steps": self.max_steps,
            "eval_every": self.eval_every,
            "step_seconds": round(self.step_seconds, 4),
            "seconds_for_steps": round(self.seconds_for_steps, 1),
            "time_limit_s": round(self.time_limit_s, 1),
        }


def median_seconds(action: Callable[[], object], *, timed: int, warmup: int, device: torch.device) -> float:
    """The median wall time of ``timed`` calls of ``action`` after ``warmup`` untimed ones; on a GPU each call is
    timed from an idle device to an idle device (synchronized on both sides)."""
    if timed < 1 or warmup < 0:
        raise InvalidArgumentError(f"need timed >= 1 and warmup >= 0, got {timed} and {warmup}")
    times = []
    for index in range(warmup + timed):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        action()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_step_seconds(config: FinetuneConfig, *, timed: int = 4, warmup: int = 2) -> float:
    """Seconds of one optimizer step (forward, losses, backward, AdamW) of ``config``'s detector on this machine:
    the median of ``timed`` steps after ``warmup``, on random crops of the working size with two lesions each, at
    the precision and CPU threads the run resolves. The weights are random: a step costs the same whatever they are.
    """
    device = choose_device(config.train.device, local_rank=0)
    threads_before = torch.get_num_threads()
    configure_threads(device, 1, config.train.threads)
    try:
        detector_settings = detector_config(config, ("caries", "deep_caries"), encoder_architecture(config))
        detector = CariesDetector(detector_settings).to(device).train()
        freeze_encoder_layers(detector, config.optim.frozen_layers, detector_settings.encoder.depth)
        optimizer = torch.optim.AdamW([p for p in detector.parameters() if p.requires_grad], lr=1e-6)
        precision = resolve_precision(config.train.precision, device)
        size, crop = config.optim.batch_size, detector_settings.image_size
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(size, 1, crop, crop, generator=generator).to(device)
        corners = torch.randint(8, crop - 24, (size, _LESIONS_PER_CROP, 2), generator=generator).float()
        labels = torch.arange(_LESIONS_PER_CROP) % 2
        # On the host, as fine-tuning hands them to the detector.
        targets = [{"boxes": torch.cat([corners[i], corners[i] + 12.0], dim=1), "labels": labels} for i in range(size)]

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with precision.autocast(device):
                loss = detector.losses(images, targets)["total"]
            loss.backward()
            optimizer.step()

        return median_seconds(step, timed=timed, warmup=warmup, device=device)
    finally:
        torch.set_num_threads(threads_before)


def plan_steps(
    seconds_left: float,
    step_seconds: float,
    *,
    validation_images: int,
    evaluated_after: int,
    validations: int = 2,
    min_steps: int = 200,
    max_steps: int,
    inference_passes: int = 1,
) -> StepPlan:
    """The fine-tuning run's time limit and about the steps that fit ``seconds_left`` (see the module docstring),
    between ``min_steps`` and ``max_steps``, with ``validations`` validations of ``validation_images`` images (the
    last at the last step; one: only there, wherever the loop ends) and ``evaluated_after`` images evaluated once
    fine-tuning is done (test split, predictions), each image ``inference_passes`` times through the network
    (``DetectorConfig.test_time_mirrors``: 2 with one test-time flip, 4 with both)."""
    if step_seconds <= 0 or validations < 1 or inference_passes < 1 or not 1 <= min_steps <= max_steps:
        raise InvalidArgumentError(
            f"need step_seconds > 0, validations >= 1, inference_passes >= 1 and 1 <= min_steps <= max_steps, got "
            f"{step_seconds}, {validations}, {inference_passes}, {min_steps}, {max_steps}"
        )
    evaluated = validations * validation_images + evaluated_after
    per_image = STEPS_PER_EVALUATED_IMAGE + (inference_passes - 1) * STEPS_PER_EXTRA_PASS
    time_limit = seconds_left - SECONDS_AFTER_FINETUNING - evaluated * per_image * step_seconds
    for_steps = time_limit - STARTUP_SECONDS
    steps = int(for_steps / (LOOP_OVERHEAD * step_seconds)) if for_steps > 0 else 0
    steps = max(min_steps, min(max_steps, steps))
    # A validation every steps / validations, the last one on the last step (the loop always validates there); a
    # single one only there, wherever the time limit ends the run.
    eval_every = max_steps if validations == 1 else -(-steps // validations)
    return StepPlan(
        steps=steps,
        max_steps=max_steps,
        eval_every=eval_every,
        step_seconds=step_seconds,
        seconds_for_steps=for_steps,
        time_limit_s=time_limit,
    )
