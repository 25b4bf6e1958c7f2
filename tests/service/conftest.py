"""Fixtures of the service tests: a tiny untrained predictor (it returns boxes: score threshold 0), synthetic DICOM
uploads and an application factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from caries_mim.detection import CariesDetector
from caries_mim.inference import Predictor
from caries_mim.io import read_radiograph
from caries_mim.package import ModelPackage, save_package
from caries_mim.synth import SynthConfig, render_indexed, write_dicom
from service import ServiceSettings, create_app
from tests.detection.tiny import tiny_config


@pytest.fixture(scope="session")
def package(synthetic_dicom) -> ModelPackage:
    """An untrained tiny detector whose operating threshold is the median score on the synthetic image, so that
    it has findings both above and below the threshold there."""
    torch.manual_seed(1)
    detector = CariesDetector(tiny_config(class_names=("caries", "deep_caries"), max_downscale=32.0))
    probe = Predictor(ModelPackage.from_detector(detector, threshold=0.5), device="cpu")
    scores = [finding.score for finding in probe.predict(read_radiograph(synthetic_dicom)).findings]
    threshold = float(np.median(scores))
    return ModelPackage.from_detector(detector, threshold=threshold, version="0.1.0", provenance={"purpose": "tests"})


@pytest.fixture(scope="session")
def package_path(package, tmp_path_factory) -> Path:
    return save_package(package, tmp_path_factory.mktemp("package") / "model.cmpkg")


@pytest.fixture(scope="session")
def predictor(package) -> Predictor:
    return Predictor(package, device="cpu")


@pytest.fixture(scope="session")
def synthetic_dicom(tmp_path_factory) -> Path:
    """One synthetic bitewing/periapical as DICOM; its PatientName is SYNTH^PATIENT^L000000."""
    path = tmp_path_factory.mktemp("dicom") / "image.dcm"
    image = render_indexed(0, "labeled", 0, SynthConfig())
    write_dicom(
        image,
        path,
        index=0,
        seed=0,
        transfer_syntax="explicit_vr_little_endian",
        photometric="MONOCHROME2",
        split="labeled",
    )
    return path


@pytest.fixture
def make_client(predictor) -> Iterator[Callable[..., TestClient]]:
    """``make_client(**settings)`` -> a started TestClient (lifespan run) on an app with the tiny predictor;
    ``read_function`` replaces what the decode workers run."""
    clients: list[TestClient] = []

    def make(read_function=read_radiograph, **settings) -> TestClient:
        app: FastAPI = create_app(ServiceSettings(**settings), predictor=predictor, read_function=read_function)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()
