"""The inference worker: micro-batches, a bounded queue (503), timeouts (504), per-image errors, draining."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from caries_mim.errors import InvalidArgumentError
from caries_mim.inference import Findings
from caries_mim.io import Radiograph
from service.app import WATCHDOG_EXIT_STATUS, watch_inference
from service.batching import InferenceWorker, ModelThread
from service.errors import ServiceError
from service.metrics import ServiceMetrics


class RecordingPredictor:
    """Stands in for Predictor: records batch sizes, can be held at a gate, refuses images whose first pixel is 1."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.entered = threading.Event()  # set once a batch has started
        self.gate = threading.Event()
        self.gate.set()

    def predict_batch(self, images, spacing_mm=None):
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(len(images))
        return [self.predict(image) for image in images]

    def predict(self, image, spacing_mm=None):
        if image.pixels[0, 0] == 1.0:
            raise InvalidArgumentError("this image is refused")
        return Findings(
            findings=(), threshold=0.5, image_shape=image.pixels.shape, spacing_mm=None, package_version="t"
        )


def radiograph(value: float = 0.0) -> Radiograph:
    return Radiograph(pixels=np.full((8, 8), value, dtype=np.float32), spacing_mm=None, source_format="png")


def make_worker(predictor, **overrides) -> InferenceWorker:
    settings = {"max_batch_size": 8, "max_wait_s": 0.05, "queue_size": 16, "retry_after_s": 3}
    settings.update(overrides)
    worker = InferenceWorker(predictor, metrics=ServiceMetrics(), **settings)
    worker.start()
    return worker


def test_concurrent_requests_share_batches():
    async def scenario():
        predictor = RecordingPredictor()
        predictor.gate.clear()  # hold the first batch so that the others queue up behind it
        worker = make_worker(predictor, max_batch_size=4)
        tasks = [asyncio.create_task(worker.predict(radiograph(), None, 10)) for _ in range(9)]
        await asyncio.sleep(0.2)
        predictor.gate.set()
        results = await asyncio.gather(*tasks)
        await worker.drain()
        return predictor.batches, results

    batches, results = asyncio.run(scenario())
    assert sum(batches) == 9
    assert max(batches) == 4
    assert len(batches) <= 4
    assert all(result.batch_size >= 1 for result in results)


def test_full_queue_is_503_with_retry_after():
    async def scenario():
        predictor = RecordingPredictor()
        predictor.gate.clear()
        worker = make_worker(predictor, max_batch_size=1, queue_size=2, max_wait_s=0.0)
        running = asyncio.create_task(worker.predict(radiograph(), None, 10))
        await asyncio.sleep(0.2)  # the worker took it and waits at the gate; the queue is empty again
        queued = [asyncio.create_task(worker.predict(radiograph(), None, 10)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceError) as refused:
            await worker.predict(radiograph(), None, 10)
        predictor.gate.set()
        await asyncio.gather(running, *queued)
        await worker.drain()
        return refused.value

    error = asyncio.run(scenario())
    assert error.status == 503
    assert error.code == "busy"
    assert error.headers == {"Retry-After": "3"}


def test_a_slow_result_is_504_and_the_worker_carries_on():
    async def scenario():
        predictor = RecordingPredictor()
        predictor.gate.clear()
        worker = make_worker(predictor, max_batch_size=1)
        with pytest.raises(ServiceError) as late:
            await worker.predict(radiograph(), None, 0.1)
        predictor.gate.set()
        later = await worker.predict(radiograph(), None, 10)
        await worker.drain()
        return late.value, later

    late, later = asyncio.run(scenario())
    assert late.status == 504
    assert later.findings.threshold == 0.5


def test_one_bad_image_fails_alone_in_its_batch():
    async def scenario():
        predictor = RecordingPredictor()
        predictor.gate.clear()
        worker = make_worker(predictor)
        good = [asyncio.create_task(worker.predict(radiograph(0.0), None, 10)) for _ in range(3)]
        bad = asyncio.create_task(worker.predict(radiograph(1.0), None, 10))
        await asyncio.sleep(0.1)
        predictor.gate.set()
        outcomes = await asyncio.gather(*good, bad, return_exceptions=True)
        await worker.drain()
        return outcomes

    *good, bad = asyncio.run(scenario())
    assert all(result.findings.threshold == 0.5 for result in good)
    assert isinstance(bad, InvalidArgumentError)


def test_drain_finishes_queued_requests_then_refuses_new_ones():
    async def scenario():
        predictor = RecordingPredictor()
        predictor.gate.clear()
        worker = make_worker(predictor, max_batch_size=1, max_wait_s=0.0)
        pending = [asyncio.create_task(worker.predict(radiograph(), None, 10)) for _ in range(3)]
        await asyncio.sleep(0.05)
        draining = asyncio.create_task(worker.drain())
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceError) as refused:
            await worker.predict(radiograph(), None, 10)
        predictor.gate.set()
        await draining
        return await asyncio.gather(*pending), refused.value

    finished, refused = asyncio.run(scenario())
    assert len(finished) == 3
    assert refused.status == 503
    assert refused.code == "shutting_down"


def test_model_thread_runs_calls_in_order_on_one_thread_and_hands_back_errors():
    async def scenario():
        thread = ModelThread(name="test-model-thread")
        order = []
        calls = [thread.submit(order.append, index) for index in range(20)]  # queued before any runs
        await asyncio.gather(*(asyncio.wrap_future(call) for call in calls))
        assert order == list(range(20))
        names = [await thread.run(lambda: threading.current_thread().name) for _ in range(3)]
        with pytest.raises(ZeroDivisionError):
            await thread.run(lambda: 1 / 0)
        after_error = await thread.run(threading.get_ident)
        thread.shutdown()
        return names, after_error

    names, after_error = asyncio.run(scenario())
    assert names == ["test-model-thread"] * 3
    assert after_error != threading.get_ident()


def test_the_worker_runs_batches_on_the_thread_it_was_given():
    class ThreadRecordingPredictor(RecordingPredictor):
        def __init__(self) -> None:
            super().__init__()
            self.threads: set[int] = set()

        def predict_batch(self, images, spacing_mm=None):
            self.threads.add(threading.get_ident())
            return super().predict_batch(images, spacing_mm)

    async def scenario():
        thread = ModelThread()
        loaded_on = await thread.run(threading.get_ident)
        predictor = ThreadRecordingPredictor()
        settings = {"max_batch_size": 4, "max_wait_s": 0.0, "queue_size": 4, "retry_after_s": 1}
        worker = InferenceWorker(predictor, metrics=ServiceMetrics(), thread=thread, **settings)
        worker.start()
        await asyncio.gather(*(worker.predict(radiograph(), None, 10) for _ in range(3)))
        await worker.drain()
        return loaded_on, predictor

    loaded_on, predictor = asyncio.run(scenario())
    assert sum(predictor.batches) == 3
    assert predictor.threads == {loaded_on}


async def _until(condition, timeout_s: float = 10.0):
    """Poll ``condition()`` until it returns something truthy (returned) or ``timeout_s`` passes (its last value)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return value


def _gated_worker(**settings) -> tuple[RecordingPredictor, InferenceWorker]:
    """A worker whose batches wait at the predictor's gate, closed until the test opens it."""
    predictor = RecordingPredictor()
    predictor.gate.clear()
    return predictor, make_worker(predictor, max_wait_s=0.0, **settings)


async def _held_batch(predictor: RecordingPredictor, worker: InferenceWorker) -> asyncio.Task:
    """One request whose batch has started and waits at the gate (the task of its answer)."""
    pending = asyncio.create_task(worker.predict(radiograph(), None, 30))
    await asyncio.to_thread(predictor.entered.wait, 10)
    return pending


def test_a_batch_past_the_stall_limit_is_reported_until_it_ends():
    async def scenario():
        predictor, worker = _gated_worker(stall_timeout_s=0.1)
        healthy_before = worker.problem()
        pending = await _held_batch(predictor, worker)
        stalled = await _until(worker.problem)
        predictor.gate.set()
        await pending
        healthy_after = worker.problem()  # the batch is over once its request has its answer
        await worker.drain()
        return healthy_before, stalled, healthy_after

    healthy_before, stalled, healthy_after = asyncio.run(scenario())
    assert healthy_before is None
    assert "a model batch has been running for" in stalled
    assert "(stall limit 0.1 s)" in stalled
    assert healthy_after is None


def test_draining_does_not_wait_for_a_batch_past_the_stall_limit(caplog):
    async def scenario():
        predictor, worker = _gated_worker(stall_timeout_s=0.1)
        pending = await _held_batch(predictor, worker)
        await _until(worker.problem)
        await asyncio.wait_for(worker.drain(), 20)  # returns although the batch still hangs
        still_hanging = not pending.done()
        predictor.gate.set()  # let the daemon thread finish
        await pending
        return still_hanging

    assert asyncio.run(scenario())
    assert "not waiting for the model to finish" in caplog.text


def test_a_fault_of_the_worker_itself_answers_its_batch_and_the_next_batch_runs(monkeypatch, caplog):
    async def scenario():
        worker = make_worker(RecordingPredictor(), max_wait_s=0.0)
        more = worker._more
        monkeypatch.setattr(worker, "_more", lambda first: 1 / 0)  # a bug in the worker, not in the model
        with pytest.raises(ZeroDivisionError):
            await worker.predict(radiograph(), None, 10)
        monkeypatch.setattr(worker, "_more", more)
        after = await worker.predict(radiograph(), None, 10)
        problem = worker.problem()
        await worker.drain()
        return after, problem

    after, problem = asyncio.run(scenario())
    assert after.batch_size == 1
    assert problem is None
    assert "the inference worker failed on a batch of 1" in caplog.text


class _ThreadKilled(BaseException):
    """Stands in for what no ``except Exception`` catches."""


def test_a_dead_inference_loop_is_reported_and_refuses_requests(monkeypatch, caplog):
    async def scenario():
        predictor, worker = _gated_worker(max_batch_size=1)
        running = await _held_batch(predictor, worker)
        queued = asyncio.create_task(worker.predict(radiograph(), None, 30))  # waits behind the running batch
        await _until(lambda: worker.depth == 1)

        def killed(first):
            raise _ThreadKilled

        monkeypatch.setattr(worker, "_more", killed)  # the next batch kills the loop
        predictor.gate.set()
        await running
        with pytest.raises(ServiceError) as queued_error:  # answered at once, not after its timeout
            await queued
        await asyncio.wait([asyncio.wrap_future(worker._running)], timeout=10)
        problem = worker.problem()
        with pytest.raises(ServiceError) as refused:
            await worker.predict(radiograph(), None, 30)
        await worker.drain()
        return queued_error.value, problem, refused.value

    queued_error, problem, refused = asyncio.run(scenario())
    assert (queued_error.status, queued_error.code) == (503, "unhealthy")
    assert problem == "the inference thread has stopped"
    assert (refused.status, refused.code) == (503, "unhealthy")
    assert "the inference loop ended" in caplog.text


def test_with_several_workers_one_that_lost_its_model_exits_to_be_replaced():
    class Broken:
        def problem(self):
            return "the inference thread has stopped"

    exits = []
    asyncio.run(watch_inference(Broken(), ServiceMetrics(), period_s=0.01, exit_process=exits.append))
    assert exits == [WATCHDOG_EXIT_STATUS]
