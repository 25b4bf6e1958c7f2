"""The service fixtures (a tiny untrained model package, a synthetic DICOM) for the HTTP fuzz tests."""

from tests.service.conftest import package, package_path, synthetic_dicom

__all__ = ["package", "package_path", "synthetic_dicom"]
