"""DICOM writing: lossless round trips, header content, MONOCHROME1/2 equivalence."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from caries_mim.errors import InvalidArgumentError
from caries_mim.io import read_radiograph
from caries_mim.synth import TRANSFER_SYNTAXES, SynthConfig, render_indexed, write_dicom
from caries_mim.synth.dicom import INTRAORAL_PRESENTATION_SOP_CLASS, PERMANENT_TEETH
from tests.dciodvfy import dciodvfy_findings


@pytest.fixture(scope="module")
def image():
    return render_indexed(0, "labeled", 1, SynthConfig())


@pytest.mark.parametrize("transfer_syntax", TRANSFER_SYNTAXES)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_round_trip_is_lossless(image, tmp_path, transfer_syntax, photometric):
    path = tmp_path / "x.dcm"
    write_dicom(image, path, index=1, seed=0, transfer_syntax=transfer_syntax, photometric=photometric)
    ds = pydicom.dcmread(path)
    expected = image.pixels if photometric == "MONOCHROME2" else 4095 - image.pixels
    assert np.array_equal(ds.pixel_array, expected)
    assert ds.PhotometricInterpretation == photometric
    assert ds.PresentationLUTShape == ("IDENTITY" if photometric == "MONOCHROME2" else "INVERSE")
    assert [p.name for p in tmp_path.iterdir()] == ["x.dcm"], "temp file left behind"


def test_header_is_an_intraoral_presentation_image(image, tmp_path):
    path = tmp_path / "x.dcm"
    write_dicom(image, path, index=1, seed=0, transfer_syntax="rle_lossless", photometric="MONOCHROME2")
    raw = path.read_bytes()
    assert raw[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == INTRAORAL_PRESENTATION_SOP_CLASS
    assert ds.file_meta.MediaStorageSOPClassUID == INTRAORAL_PRESENTATION_SOP_CLASS
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.Modality == "IO"
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert [float(v) for v in ds.ImagerPixelSpacing] == pytest.approx(list(image.spacing_mm), rel=1e-5)
    assert ds.PatientName.family_name == "SYNTH"
    assert ds.ImageLaterality in ("R", "L")
    assert ds.Manufacturer == "caries-mim synthetic"


def test_fdi_teeth_are_coded_as_cid_4018_permanent_teeth():
    assert sorted(PERMANENT_TEETH) == [
        10 * quadrant + position for quadrant in (1, 2, 3, 4) for position in range(1, 9)
    ]
    assert len({code.value for code in PERMANENT_TEETH.values()}) == 32
    assert all(code.scheme_designator == "SCT" for code in PERMANENT_TEETH.values())
    assert PERMANENT_TEETH[11].meaning == "Permanent maxillary right central incisor tooth"
    assert PERMANENT_TEETH[26].meaning == "Permanent maxillary left first molar tooth"
    assert PERMANENT_TEETH[36].meaning == "Mandibular left first molar tooth"
    assert PERMANENT_TEETH[45].meaning == "Mandibular right second premolar tooth"


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_header_names_the_teeth_region_and_intensity_relationship(image, tmp_path, photometric):
    path = tmp_path / "x.dcm"
    write_dicom(image, path, index=1, seed=0, transfer_syntax="explicit_vr_little_endian", photometric=photometric)
    ds = pydicom.dcmread(path)
    assert [item.CodeValue for item in ds.PrimaryAnatomicStructureSequence] == [
        PERMANENT_TEETH[tooth].value for tooth in sorted(image.teeth)
    ]
    (region,) = ds.AnatomicRegionSequence
    upper = {tooth // 10 in (1, 2) for tooth in image.teeth}
    expected = {frozenset({True}): "Maxilla", frozenset({False}): "Mandible"}.get(frozenset(upper), "Jaw region")
    assert (region.CodingSchemeDesignator, region.CodeMeaning) == ("SCT", expected)
    assert ds.PixelIntensityRelationship == "LOG"
    # Higher stored values mean less beam intensity in MONOCHROME2, lower ones in the inverted MONOCHROME1 file.
    assert ds.PixelIntensityRelationshipSign == (-1 if photometric == "MONOCHROME2" else 1)
    assert "AcquisitionContextSequence" in ds
    assert len(ds.AcquisitionContextSequence) == 0


@pytest.mark.parametrize(
    ("index", "transfer_syntax", "photometric"),
    [
        (1, "explicit_vr_little_endian", "MONOCHROME2"),
        (2, "rle_lossless", "MONOCHROME1"),
        (3, "jpeg2000_lossless", "MONOCHROME2"),
    ],
)
def test_synthetic_radiographs_pass_the_dicom3tools_iod_verifier(tmp_path, index, transfer_syntax, photometric):
    """A strict archive refuses what dciodvfy flags as an error; bitewings and periapicals alike must pass."""
    for view_index in (index, index + 10):  # two draws: the view (bitewing or periapical) is drawn per image
        path = tmp_path / f"{view_index}.dcm"
        picture = render_indexed(0, "labeled", view_index, SynthConfig())
        write_dicom(picture, path, index=view_index, seed=0, transfer_syntax=transfer_syntax, photometric=photometric)
        errors, _ = dciodvfy_findings(path)
        assert errors == [], f"{picture.view}, {transfer_syntax}, {photometric}"


def test_uids_are_deterministic_and_distinct(image, tmp_path):
    uids = []
    for name, index, split in (("a", 1, "labeled"), ("b", 1, "labeled"), ("c", 2, "labeled"), ("d", 1, "unlabeled")):
        path = tmp_path / f"{name}.dcm"
        options = {"transfer_syntax": "explicit_vr_little_endian", "photometric": "MONOCHROME2"}
        write_dicom(image, path, index=index, seed=0, split=split, **options)
        ds = pydicom.dcmread(path)
        uids.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
    assert uids[0] == uids[1]
    assert len({u for triple in uids[1:] for u in triple}) == 9


def test_monochrome1_and_monochrome2_read_identically(image, tmp_path):
    paths = {}
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        paths[photometric] = tmp_path / f"{photometric}.dcm"
        write_dicom(image, paths[photometric], index=1, seed=0, transfer_syntax="rle_lossless", photometric=photometric)
    one = read_radiograph(paths["MONOCHROME1"])
    two = read_radiograph(paths["MONOCHROME2"])
    assert two.intensity_normalization == "window"
    np.testing.assert_allclose(one.pixels, two.pixels, atol=1e-6)
    # Bright = attenuating: the brightest stored values (enamel, fillings) stay bright after reading.
    assert two.pixels[image.pixels == image.pixels.max()].min() > 0.95


def test_bad_writer_arguments(image, tmp_path):
    with pytest.raises(InvalidArgumentError):
        write_dicom(image, tmp_path / "x.dcm", index=0, seed=0, transfer_syntax="jpeg", photometric="MONOCHROME2")
    with pytest.raises(InvalidArgumentError):
        write_dicom(image, tmp_path / "x.dcm", index=0, seed=0, transfer_syntax="rle_lossless", photometric="RGB")
    assert list(tmp_path.iterdir()) == []
