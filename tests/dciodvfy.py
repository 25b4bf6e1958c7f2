"""Runs dicom3tools' ``dciodvfy`` (David Clunie's IOD verifier, Debian package ``dicom3tools``) on a file.

``.ci/run`` installs it; elsewhere the tests that need it skip with a message naming the program.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


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
