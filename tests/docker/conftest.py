"""Fixtures of the deployment tests: the service tests' synthetic package and DICOM, and the Docker files parsed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docker.dockerfile import Instruction, parse_dockerfile
from tests.service.conftest import package, package_path, synthetic_dicom  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}


@pytest.fixture(scope="session", params=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, list[Instruction]]:
    """(flavour, instructions) of each Dockerfile."""
    return request.param, parse_dockerfile(DOCKERFILES[request.param])
