"""The isolated reader: the same radiographs as an in-process read, and a decoder that crashes, hangs or exhausts
memory costs only its own file (``tests/fuzz/hostile.py`` misbehaves on purpose, in real worker processes)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from caries_mim.errors import CariesMimError
from caries_mim.io import ReadOptions, read_radiograph
from caries_mim.io.decode_worker import ProtocolError, radiograph_from_json, radiograph_to_json
from caries_mim.io.isolation import DecoderWarning, IsolatedReader
from tests.dicom_factory import make_dataset, ramp, to_bytes
from tests.fuzz.corpus import seed_files
from tests.fuzz.hostile import hostile_read
from tests.polling import eventually

GOOD = seed_files()["explicit_vr_little_endian"]


@pytest.fixture
def hostile_reader():
    # wait_s covers a replacement's start on a busy machine: these tests lose workers on purpose.
    with IsolatedReader(2, timeout_s=2.0, memory_mb=256, wait_s=30.0, read_function=hostile_read) as reader:
        yield reader


def _code(reader: IsolatedReader, data: bytes) -> str:
    with pytest.raises(CariesMimError) as caught:
        reader.read(data)
    return caught.value.code


def _wait_for_full_pool(reader: IsolatedReader, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while reader.alive < reader.size and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader.alive == reader.size


def test_isolated_reads_equal_in_process_reads(tmp_path):
    with IsolatedReader(1) as reader:
        for syntax, data in seed_files().items():
            expected = read_radiograph(data)
            path = tmp_path / f"{syntax}.dcm"
            path.write_bytes(data)
            for source in (data, path, str(path)):
                got = reader.read(source)
                np.testing.assert_array_equal(got.pixels, expected.pixels)
                assert got.pixels.dtype == np.float32
                assert radiograph_to_json(got) == radiograph_to_json(expected), syntax


def test_typed_errors_come_back_with_their_codes(tmp_path):
    with IsolatedReader(1) as reader:
        assert _code(reader, b"not an image at all") == "not_an_image"
        assert _code(reader, b"") == "not_an_image"
        with pytest.raises(CariesMimError) as caught:
            reader.read(tmp_path / "missing.dcm")
        assert caught.value.code == "unreadable_file"
        with pytest.raises(CariesMimError) as caught:
            reader.read(GOOD, ReadOptions(max_pixels=100))
        assert caught.value.code == "image_too_large"
        assert "over the limit of 100" in caught.value.message


def test_a_crashing_decoder_costs_its_file_only(hostile_reader, capfd):
    with pytest.raises(CariesMimError) as caught:
        hostile_reader.read(b"CRASH" + GOOD)
    assert caught.value.code == "corrupt_pixel_data"
    assert "SIGSEGV" in caught.value.message
    assert hostile_reader.read(GOOD).pixels.shape == (96, 128)
    _wait_for_full_pool(hostile_reader)
    assert hostile_reader.stats.crashes == 1
    # A BaseException escaping the read (a panic outside the guarded decoders) ends that worker the same way.
    assert _code(hostile_reader, b"PANIC" + GOOD) == "corrupt_pixel_data"
    assert capfd.readouterr().err == "", "the workers' own output goes nowhere near the caller's stderr"


@pytest.mark.parametrize("command", [b"HANG", b"SLEEP"])
def test_a_hanging_decoder_is_stopped_at_the_time_limit(hostile_reader, command):
    started = time.monotonic()
    assert _code(hostile_reader, command + GOOD) == "decode_timeout"
    assert 2.0 <= time.monotonic() - started < 10.0
    assert hostile_reader.read(GOOD).pixels.shape == (96, 128)
    _wait_for_full_pool(hostile_reader)
    assert hostile_reader.stats.timeouts == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the memory limit is RLIMIT_DATA (Linux)")
def test_a_decode_past_the_memory_limit_is_image_too_large(hostile_reader):
    with pytest.raises(CariesMimError) as caught:
        hostile_reader.read(b"GREEDY" + GOOD)
    assert caught.value.code == "image_too_large"
    assert "256 MiB" in caught.value.message
    assert hostile_reader.stats.replaced == {"memory": 1}, "a worker that ran out of memory is replaced"
    assert hostile_reader.read(GOOD).pixels.shape == (96, 128)


def test_other_reads_go_on_while_one_worker_hangs_and_another_crashes(hostile_reader):
    """Concurrent callers: the hang holds one worker until its limit, the crash loses the other; good reads are
    answered by the replacements meanwhile, and each caller gets its own outcome."""
    outcomes: dict[str, str] = {}

    def read(name: str, data: bytes) -> None:
        try:
            hostile_reader.read(data)
            outcomes[name] = "ok"
        except CariesMimError as error:
            outcomes[name] = error.code

    threads = [threading.Thread(target=read, args=("hang", b"HANG" + GOOD))]
    threads[0].start()
    time.sleep(0.2)
    threads += [threading.Thread(target=read, args=("crash", b"CRASH" + GOOD))]
    threads += [threading.Thread(target=read, args=(f"good{i}", GOOD)) for i in range(6)]
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert outcomes.pop("hang") == "decode_timeout"
    assert outcomes.pop("crash") == "corrupt_pixel_data"
    assert outcomes == {f"good{i}": "ok" for i in range(6)}


def test_a_busy_pool_answers_unavailable_after_the_wait():
    with IsolatedReader(1, timeout_s=2.0, wait_s=0.3, read_function=hostile_read) as reader:
        sleeper = threading.Thread(target=_code, args=(reader, b"SLEEP" + GOOD))
        sleeper.start()
        assert eventually(lambda: reader.stats.reads == 1)  # the sleeper holds the only worker
        assert _code(reader, GOOD) == "decoder_unavailable"
        sleeper.join()


def test_an_answer_no_reader_gives_is_refused_and_its_worker_replaced(hostile_reader):
    """A worker answering an error code that read_radiograph never raises is not trusted (it may be subverted)."""
    with pytest.raises(CariesMimError) as caught:
        hostile_reader.read(b"FORGE" + GOOD)
    assert caught.value.code == "corrupt_pixel_data"
    assert "nonsense" in caught.value.message
    assert hostile_reader.stats.replaced == {"invalid_reply": 1}


def test_a_read_cut_short_by_close_is_not_blamed_on_the_file():
    reader = IsolatedReader(1, timeout_s=30.0, read_function=hostile_read)
    outcome = []
    sleeper = threading.Thread(target=lambda: outcome.append(_code(reader, b"SLEEP" + GOOD)))
    sleeper.start()
    assert eventually(lambda: reader.stats.reads == 1)
    reader.close()
    sleeper.join(timeout=30)
    assert outcome == ["decoder_unavailable"]
    assert reader.stats.crashes == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_hold_no_secrets_and_dump_no_cores(monkeypatch):
    monkeypatch.setenv("CARIES_MIM_API_KEYS", "secret-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-too")
    with IsolatedReader(1) as reader:
        pid = next(iter(reader._workers)).process.pid
        environment = Path(f"/proc/{pid}/environ").read_bytes()
        limits = Path(f"/proc/{pid}/limits").read_text()
    assert b"secret" not in environment
    assert b"OMP_NUM_THREADS=1" in environment
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_end_when_their_parent_dies_without_closing_them():
    script = (
        "import os, sys\n"
        "from caries_mim.io.isolation import IsolatedReader\n"
        "reader = IsolatedReader(1)\n"
        "print(next(iter(reader._workers)).process.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    worker = int(parent.stdout.split()[0])
    assert eventually(lambda: not Path(f"/proc/{worker}").exists(), timeout_s=15), "the orphaned worker lives on"


def test_a_closed_reader_refuses_reads_and_leaves_no_process():
    reader = IsolatedReader(2)
    processes = [worker.process for worker in reader._workers]
    reader.close()
    assert all(process.poll() is not None for process in processes)
    assert _code(reader, GOOD) == "decoder_unavailable"


def test_a_worker_that_cannot_start_is_a_clear_error():
    with pytest.raises(CariesMimError) as caught:
        IsolatedReader(1, read_function=_not_importable_in_a_worker)
    assert caught.value.code == "decoder_unavailable"
    assert "cannot import" in caught.value.message


def _not_importable_in_a_worker(source, options):  # pragma: no cover - the worker fails to find it
    raise AssertionError("never called")


_not_importable_in_a_worker.__qualname__ = "no_such_function"


def test_warnings_are_relayed_only_when_asked():
    ds = make_dataset(ramp(), window=(2048, 4096))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SeriesInstanceUID = "1.2.3.abc"  # not a UID: pydicom warns when it reads it back
        data = to_bytes(ds)
    for relay in (False, True):
        with IsolatedReader(1, relay_warnings=relay) as reader, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reader.read(data)
        relayed = [w for w in caught if issubclass(w.category, DecoderWarning)]
        assert bool(relayed) == relay


def test_a_reply_that_lies_about_its_pixels_is_refused():
    header = radiograph_to_json(read_radiograph(GOOD))
    with pytest.raises(ProtocolError):
        radiograph_from_json(header, bytearray(10))
    with pytest.raises(ProtocolError):
        radiograph_from_json({**header, "shape": ["x", 2]}, bytearray(8))
