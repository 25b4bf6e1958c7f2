"""docker/compose.yaml: valid by the Compose Specification, the service with a GPU reservation, its secret, model
volume, restart policy and a readiness healthcheck, and a train service running torchrun on every GPU.

compose_spec.json is the Compose Specification's JSON schema as shipped in docker-compose 1.29.2 (PyPI,
compose/config/compose_spec.json, Apache-2.0): no Docker engine or compose binary exists in this workplace.
"""

from __future__ import annotations

import json
import os
import re

import jsonschema
import pytest
import yaml

from pipelines.cli import build_parser
from service.settings import ServiceSettings
from tests.docker.conftest import DOCKER, REPO

COMPOSE = DOCKER / "compose.yaml"
SCHEMA = DOCKER.parent / "tests" / "docker" / "compose_spec.json"
VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolated(text: str, environment: dict[str, str] | None = None) -> str:
    """Compose's ``${NAME:-default}`` / ``${NAME}`` substitution, from ``environment`` or the defaults."""
    values = environment or {}

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in values:
            return values[name]
        if default is None:
            raise AssertionError(f"${{{name}}} has no default: `docker compose config` would warn and use ''")
        return default

    return VARIABLE.sub(substitute, text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(interpolated(COMPOSE.read_text()))


def compose_schema() -> dict:
    schema = json.loads(SCHEMA.read_text())
    # The top-level project `name` joined the specification after this copy of its schema (Compose v2.3).
    schema["properties"]["name"] = {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"}
    return schema


def test_the_file_is_valid_by_the_compose_specification(compose):
    validator = jsonschema.Draft201909Validator(compose_schema())
    problems = sorted(validator.iter_errors(compose), key=lambda error: list(error.path))
    assert not problems, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in problems)


def test_the_schema_catches_a_misspelt_key(compose):
    """The validation above is not vacuous: a wrong key under the GPU reservation is refused."""
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["deploy"]["resources"]["reservations"]["device"] = [{"capabilities": ["gpu"]}]
    validator = jsonschema.Draft201909Validator(compose_schema())
    assert any("device" in error.message for error in validator.iter_errors(broken))


def gpu_devices(service: dict) -> list[dict]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def test_the_api_reserves_a_gpu_and_is_healthy_once_ready(compose):
    api = compose["services"]["api"]
    (device,) = gpu_devices(api)
    assert device["capabilities"] == ["gpu"]
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert api["healthcheck"]["test"] == ["CMD", "python", "/opt/caries-mim/healthcheck.py", "/readyz"]
    assert api["healthcheck"]["start_period"]
    assert api["restart"] == "unless-stopped"
    assert api["init"] is True
    # The graceful shutdown (uvicorn's 30 s for in-flight requests, then the queue) fits in the grace period.
    assert int(api["stop_grace_period"].rstrip("s")) > 30
    assert api["ports"] == ["8000:8000"]


def test_the_api_takes_its_keys_from_a_secret_and_its_model_from_a_read_only_volume(compose):
    api = compose["services"]["api"]
    environment = api["environment"]
    assert environment["CARIES_MIM_API_KEYS_FILE"] == f"/run/secrets/{api['secrets'][0]}"
    assert compose["secrets"][api["secrets"][0]]["file"] == "../secrets/api_keys"
    assert "../models:/models:ro" in api["volumes"]
    settings = {f"CARIES_MIM_{name.upper()}" for name in ServiceSettings.model_fields}
    assert set(environment) <= settings, f"not settings of the service: {set(environment) - settings}"


def test_the_train_service_runs_torchrun_on_every_gpu_of_the_host(compose):
    train = compose["services"]["train"]
    assert train["profiles"] == ["train"], "training must not start with `docker compose up`"
    (device,) = gpu_devices(train)
    assert device["count"] == "all"
    assert device["capabilities"] == ["gpu"]
    command = train["command"]
    assert command[:3] == ["torchrun", "--standalone", "--nproc-per-node=gpu"]
    module = command.index("-m")
    assert command[module + 1] == "pipelines.cli"
    # The rest parses as a caries-mim command line, the way the CLI itself would read it.
    arguments = build_parser().parse_args(command[module + 2 :])
    assert arguments.command == "pretrain"
    assert [str(path) for path in arguments.data] == ["/data/unlabeled"]
    assert str(arguments.out).startswith("/runs")
    assert "../data:/data:ro" in train["volumes"]
    assert "../runs:/runs" in train["volumes"]
    assert train["shm_size"]


def test_both_services_build_the_gpu_image_from_the_repository(compose):
    for name in ("api", "train"):
        service = compose["services"][name]
        context = (DOCKER / service["build"]["context"]).resolve()
        assert context == REPO
        assert (context / service["build"]["dockerfile"]) == DOCKER / "Dockerfile"
        assert service["image"] == "caries-mim:gpu"
        assert service["user"] == "10001:10001"


def test_variables_override_the_defaults():
    text = interpolated(COMPOSE.read_text(), {"CARIES_MIM_PUBLISH": "9000", "CARIES_MIM_MODELS": "/srv/models"})
    api = yaml.safe_load(text)["services"]["api"]
    assert api["ports"] == ["9000:8000"]
    assert "/srv/models:/models:ro" in api["volumes"]


def test_every_variable_has_a_default():
    for match in VARIABLE.finditer(COMPOSE.read_text()):
        assert match.group(2) is not None or match.group(1) in os.environ, match.group(0)


def test_the_compose_variables_are_not_the_service_settings():
    """A CARIES_MIM_MODEL exported in the shell for a local `caries-mim serve` must not reach the container."""
    settings = {f"CARIES_MIM_{name.upper()}" for name in ServiceSettings.model_fields}
    variables = {match.group(1) for match in VARIABLE.finditer(COMPOSE.read_text())}
    assert not variables & settings


def test_the_api_container_is_hardened(compose):
    api = compose["services"]["api"]
    assert api["read_only"] is True
    assert api["tmpfs"] == ["/tmp"]
    for service in compose["services"].values():
        assert service["cap_drop"] == ["ALL"]
        assert service["security_opt"] == ["no-new-privileges:true"]


def test_the_gateway_listens_on_11112_and_8042_keeps_its_queue_on_a_volume_and_answers_c_echo(compose):
    gateway = compose["services"]["gateway"]
    arguments = build_parser().parse_args(gateway["command"])
    assert (arguments.command, arguments.gateway_command) == ("gateway", "run")
    assert (str(arguments.root), arguments.port, arguments.host) == ("/gateway", 11112, "0.0.0.0")
    assert str(arguments.model) == "/models/reference_detector.cmpkg"
    assert [destination.name for destination in arguments.destination] == ["pacs"]
    assert gateway["ports"] == ["11112:11112", "8042:8042"]
    assert (arguments.http_host, arguments.http_port) == ("0.0.0.0", 8042)
    # DICOMweb beyond loopback needs keys: the API's secret, read through the variable the CLI also reads.
    assert gateway["environment"]["CARIES_MIM_API_KEYS_FILE"] == "/run/secrets/caries_mim_api_keys"
    assert gateway["secrets"] == ["caries_mim_api_keys"]
    assert "../models:/models:ro" in gateway["volumes"]
    assert "../gateway:/gateway" in gateway["volumes"]
    assert gateway["read_only"] is True
    probe = gateway["healthcheck"]["test"]
    assert probe[:3] == ["CMD", "python", "-c"]
    compile(probe[3], "healthcheck", "exec")  # the C-ECHO probe is valid Python
    assert "send_c_echo" in probe[3]
    (device,) = gpu_devices(gateway)
    assert device["count"] == 1
