"""Whatever a decoder raises becomes a typed error (Rust panics included), the program's own exits pass through,
and a deflate bomb is refused before it is inflated."""

from __future__ import annotations

import io
import random
import tracemalloc

import pydicom
import pytest

from caries_mim.errors import CariesMimError, CorruptPixelDataError
from caries_mim.io import read_radiograph
from caries_mim.io.decoder_failures import decoder_failures_as
from caries_mim.io.dicom import parse_dicom
from tests.fuzz.corpus import DEFLATE_BOMB_BYTES, META_DETOURS, deflate_bomb, hostile_file, seed_files


class FakePanic(BaseException):
    """What pyo3 raises for a Rust panic: a BaseException, which ``except Exception`` does not see."""


def _patch_decoder(monkeypatch, error: BaseException) -> None:
    def broken(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(broken))


def test_a_panic_in_a_decoder_is_corrupt_pixel_data(monkeypatch):
    _patch_decoder(monkeypatch, FakePanic("index out of bounds: the len is 64000 but the index is 64000"))
    with pytest.raises(CorruptPixelDataError) as caught:
        read_radiograph(seed_files()["rle_lossless"])
    assert "index out of bounds" in caught.value.message
    assert isinstance(caught.value.__cause__, FakePanic)


@pytest.mark.parametrize("exit_kind", [KeyboardInterrupt, SystemExit, GeneratorExit])
def test_the_programs_own_exits_pass_through(monkeypatch, exit_kind):
    _patch_decoder(monkeypatch, exit_kind())
    with pytest.raises(exit_kind):
        read_radiograph(seed_files()["explicit_vr_little_endian"])


def test_running_out_of_memory_in_a_decoder_is_image_too_large(monkeypatch):
    _patch_decoder(monkeypatch, MemoryError())
    with pytest.raises(CariesMimError) as caught:
        read_radiograph(seed_files()["explicit_vr_little_endian"])
    assert caught.value.code == "image_too_large"


def test_typed_errors_keep_their_own_type_through_the_guard():
    with pytest.raises(CorruptPixelDataError, match=r"^inner$"), decoder_failures_as(CariesMimError, "outer"):
        raise CorruptPixelDataError("inner")


@pytest.mark.parametrize("index", [75, 76, 145])
def test_rle_files_that_panic_pylibjpeg_rle_are_corrupt_pixel_data(index):
    """Real files of the fuzz corpus on which pylibjpeg-rle (Rust) panics with an index out of bounds."""
    hostile = hostile_file(0, index)
    assert hostile.syntax == "rle_lossless"
    with pytest.raises(CariesMimError) as caught:
        read_radiograph(hostile.data)
    assert caught.value.code == "corrupt_pixel_data"
    if type(caught.value.__cause__).__name__ != "PanicException":
        pytest.skip("pylibjpeg-rle no longer panics on this file (the typed error above still holds)")


@pytest.mark.parametrize("detour", sorted(META_DETOURS))
def test_a_deflate_bomb_is_refused_without_being_inflated(detour):
    """Also when its meta group carries elements that a hand-written meta reader would misread (a UV element, an
    undefined-length sequence): the check reads the group with pydicom's own reader."""
    bomb = deflate_bomb(random.Random(0), seed_files()["deflated"], "deflated", detour)
    assert len(bomb) < DEFLATE_BOMB_BYTES // 500
    for read in (read_radiograph, lambda data: parse_dicom(data, max_pixels=1000, stop_before_pixels=True)):
        tracemalloc.start()
        try:
            with pytest.raises(CariesMimError) as caught:
                read(bomb)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert caught.value.code == "image_too_large"
        assert "inflates" in caught.value.message
        assert peak < 32 * 1024 * 1024, f"{peak} bytes allocated while refusing the bomb"


def test_an_honest_deflated_file_still_reads():
    radiograph = read_radiograph(seed_files()["deflated"])
    assert radiograph.transfer_syntax_uid == str(pydicom.uid.DeflatedExplicitVRLittleEndian)
    plain = read_radiograph(seed_files()["explicit_vr_little_endian"])
    assert (radiograph.pixels == plain.pixels).all()
    assert pydicom.dcmread(io.BytesIO(seed_files()["deflated"])).file_meta.TransferSyntaxUID.is_deflated
