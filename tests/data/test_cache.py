"""DecodeCache: content keys, identical hits, corrupt entries decoded again, concurrent writers."""

from __future__ import annotations

import logging
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import RLELossless

from caries_mim.data.cache import DecodeCache, RadiographLoader, dequantize, quantize
from caries_mim.errors import CorruptHeaderError, NotAnImageError
from caries_mim.io import ReadOptions, read_radiograph
from tests.data.conftest import write_dicom


def assert_same_radiograph(a, b) -> None:
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.pixels.dtype == b.pixels.dtype == np.float32
    for name in (
        "spacing_mm",
        "source_format",
        "modality",
        "photometric_interpretation",
        "bits_stored",
        "transfer_syntax_uid",
        "intensity_normalization",
        "dicom",
    ):
        assert getattr(a, name) == getattr(b, name), name


def only_entry(cache: DecodeCache) -> Path:
    entries = list(cache.root.rglob("*.cmimdc"))
    assert len(entries) == 1
    return entries[0]


def test_hit_returns_the_miss_result_exactly(tmp_path, dicom_file):
    cache = DecodeCache(tmp_path / "cache")
    first = cache.load(dicom_file)
    second = cache.load(dicom_file)
    assert (cache.misses, cache.hits) == (1, 1)
    assert_same_radiograph(first, second)
    assert second.dicom is not None
    assert second.dicom.sop_instance_uid
    assert second.spacing_mm == (0.035, 0.035)
    direct = read_radiograph(dicom_file)
    assert np.max(np.abs(second.pixels - direct.pixels)) <= 0.5 / 65535 + 1e-7


def test_compressed_dicom_metadata_survives(tmp_path):
    source = write_dicom(tmp_path / "rle.dcm", 40, 56, transfer_syntax=RLELossless)
    cache = DecodeCache(tmp_path / "cache")
    cache.load(source)
    hit = cache.load(source)
    assert hit.transfer_syntax_uid == RLELossless
    assert hit.bits_stored == 12
    assert hit.photometric_interpretation == "MONOCHROME2"
    assert hit.modality == "IO"
    assert hit.intensity_normalization == "window"


def test_keyed_by_content_not_name(tmp_path, dicom_file):
    cache = DecodeCache(tmp_path / "cache")
    original = cache.load(dicom_file)
    renamed = tmp_path / "elsewhere" / "renamed_copy"
    renamed.parent.mkdir()
    shutil.copyfile(dicom_file, renamed)
    assert_same_radiograph(cache.load(renamed), original)
    assert (cache.misses, cache.hits) == (1, 1)

    write_dicom(dicom_file, seed=1)  # same path, new content
    changed = cache.load(dicom_file)
    assert cache.misses == 2
    assert not np.array_equal(changed.pixels, original.pixels)


def test_read_options_are_part_of_the_key(tmp_path, dicom_file):
    cache = DecodeCache(tmp_path / "cache")
    cache.load(dicom_file)
    cache.load(dicom_file, ReadOptions(max_pixels=10_000_000))
    assert cache.misses == 2
    cache.load(dicom_file, ReadOptions(allowed_modalities=frozenset({"PX", "IO", "DX", "CR"})))
    assert cache.hits == 1  # the default allow-list, spelled in another order


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda blob: blob[: len(blob) // 2], id="truncated"),
        pytest.param(lambda blob: blob[:-1] + bytes([blob[-1] ^ 0xFF]), id="payload-bit-flip"),
        pytest.param(lambda blob: b"", id="empty"),
        pytest.param(lambda blob: b"not a cache entry at all" * 10, id="garbage"),
        pytest.param(lambda blob: blob[:8] + b"\xff\xff\xff\x7f" + blob[12:], id="huge-header-length"),
    ],
)
def test_corrupt_entry_is_decoded_again_and_repaired(tmp_path, dicom_file, damage, caplog):
    cache = DecodeCache(tmp_path / "cache")
    original = cache.load(dicom_file)
    entry = only_entry(cache)
    entry.write_bytes(damage(entry.read_bytes()))

    with caplog.at_level(logging.WARNING, logger="caries_mim.data.cache"):
        again = cache.load(dicom_file)
    assert_same_radiograph(again, original)
    assert cache.misses == 2
    assert any("corrupt" in record.getMessage() for record in caplog.records)
    cache.load(dicom_file)
    assert cache.hits == 1  # the entry was rewritten whole


def test_entry_under_another_key_is_not_returned(tmp_path, dicom_file):
    cache = DecodeCache(tmp_path / "cache")
    cache.load(dicom_file)
    other = write_dicom(tmp_path / "other.dcm", seed=5)
    expected = cache.load(other)
    # Put the first file's entry where the second file's entry belongs.
    first_entry, second_entry = sorted(cache.root.rglob("*.cmimdc"), key=lambda p: p.stat().st_mtime_ns)
    shutil.copyfile(first_entry, second_entry)
    assert_same_radiograph(cache.load(other), expected)
    assert cache.misses == 3


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_decode_errors_are_cached_with_their_code(tmp_path):
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"x" * 20)
    cache = DecodeCache(tmp_path / "cache")
    with pytest.raises(CorruptHeaderError) as first:
        cache.load(broken)
    with pytest.raises(CorruptHeaderError) as second:
        cache.load(broken)
    assert (cache.misses, cache.hits) == (1, 1)
    assert first.value.code == second.value.code == "corrupt_header"
    assert second.value.message == first.value.message


def test_not_an_image_is_not_stored_as_pixels(tmp_path):
    text = tmp_path / "notes.dcm"
    text.write_text("hello")
    cache = DecodeCache(tmp_path / "cache")
    with pytest.raises(NotAnImageError):
        cache.load(text)
    with pytest.raises(NotAnImageError):
        cache.load(text)


def test_quantization_round_trip_is_within_half_a_step():
    pixels = np.linspace(0.0, 1.0, 10_001, dtype=np.float32).reshape(73, 137)
    assert np.max(np.abs(dequantize(quantize(pixels)) - pixels)) <= 0.5 / 65535 + 1e-7


def test_loader_without_cache_reads_directly(dicom_file):
    direct = RadiographLoader()(dicom_file)
    np.testing.assert_array_equal(direct.pixels, read_radiograph(dicom_file).pixels)


def _load_repeatedly(root: str, source: str, rounds: int) -> list[float]:
    """Each round forces a miss (the entry is deleted) so both processes keep writing the same key."""
    cache = DecodeCache(root)
    sums = []
    for _ in range(rounds):
        cache.entry_path(cache.key(Path(source).read_bytes(), ReadOptions())).unlink(missing_ok=True)
        sums.append(float(cache.load(source).pixels.astype(np.float64).sum()))
    return sums


def test_concurrent_writers_leave_one_valid_entry(tmp_path):
    source = write_dicom(tmp_path / "shared.dcm", 64, 96)
    expected = float(DecodeCache(tmp_path / "reference").load(source).pixels.astype(np.float64).sum())
    root = tmp_path / "cache"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.starmap(_load_repeatedly, [(str(root), str(source), 25)] * 2)
    assert all(value == expected for sums in results for value in sums)

    cache = DecodeCache(root)
    final = cache.load(source)
    assert cache.hits == 1
    assert float(final.pixels.astype(np.float64).sum()) == expected
    assert not list(root.rglob("*.tmp")), "temporary files left behind"


def test_unwritable_cache_still_returns_pixels(tmp_path, dicom_file, caplog):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    cache = DecodeCache(blocker)
    with caplog.at_level(logging.WARNING, logger="caries_mim.data.cache"):
        radiograph = cache.load(dicom_file)
    assert radiograph.pixels.shape == (48, 64)
    assert any("cannot be written" in record.getMessage() for record in caplog.records)
