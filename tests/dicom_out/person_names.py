"""The check every result builder passes: highdicom warns, quoting the name, about a person name without a caret
(e.g. "ANONYMOUS"), so stderr and logs would carry it; the builders work on a copy without the names and give them
back to the object they built."""

from __future__ import annotations

import logging
from collections.abc import Callable

from pydicom.dataset import Dataset

from caries_mim.io.dicom import parse_dicom
from tests.dicom_factory import make_dataset, ramp, to_bytes

#: PatientName, ReferringPhysicianName, PatientID: single components, as highdicom would quote them.
IDENTIFIERS = ("SECRETNAME", "DRSECRET", "SECRET-ID-7")


def check_person_names_kept_and_never_quoted(build: Callable[[Dataset], Dataset], recwarn, caplog) -> None:
    """``build(header) -> result`` keeps the header's names and IDs, leaves the header as it was, and neither warns
    nor logs any of them (``recwarn`` and ``caplog``: the test's fixtures)."""
    caplog.set_level(logging.DEBUG)
    plain = make_dataset(ramp())
    plain.PatientName, plain.ReferringPhysicianName, plain.PatientID = IDENTIFIERS
    header = parse_dicom(to_bytes(plain))
    built = build(header)
    assert (built.PatientName, built.ReferringPhysicianName, built.PatientID) == IDENTIFIERS
    assert header.PatientName == IDENTIFIERS[0], "the caller's header is not changed"
    said = caplog.text + " ".join(str(warning.message) for warning in recwarn)
    for identifier in IDENTIFIERS:
        assert identifier not in said
