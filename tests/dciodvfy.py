"""Runs dicom3tools' ``dciodvfy`` (David Clunie's IOD verifier, Debian package ``dicom3tools``) on a file.

``.ci/run`` installs it; elsewhere the tests that need it skip with a message naming the program.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from caries_mim.dicom_out import structured_report_bytes  # Part 10 bytes of any highdicom object


def dciodvfy_findings(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings): the verifier's ``Error -`` and ``Warning -`` lines for ``path``; skips without it."""
    program = shutil.which("dciodvfy")
    if program is None:
        pytest.skip("dciodvfy not found: install the Debian package dicom3tools (.ci/run does)")
    result = subprocess.run([program, str(path)], capture_output=True, text=True, timeout=60, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    if result.returncode != 0 and not errors:
        errors.append(f"dciodvfy exited with {result.returncode}: {result.stderr.strip()[-500:]}")
    return errors, warnings


def assert_result_verifies(result, path: Path, *, minimal_source: bool) -> None:
    """A result object (GSPS, Secondary Capture) written to ``path`` passes dciodvfy without errors; without
    warnings too, except, from a ``minimal_source`` (no Type 2 patient/study attributes, no laterality), those about
    what the source does not say and so cannot be copied: its study date, time and ID (Type 2, empty) and which side
    it shows (Laterality is empty, "unknown"; absent is an error to dciodvfy)."""
    path.write_bytes(structured_report_bytes(result))
    errors, warnings = dciodvfy_findings(path)
    assert errors == []
    if minimal_source:
        assert all("needed to build DICOMDIR" in line or "<Laterality>" in line for line in warnings), warnings
    else:
        assert warnings == []
