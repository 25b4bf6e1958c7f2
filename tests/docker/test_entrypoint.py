"""The image's entrypoint and health probe, run outside Docker: the same scripts, the environment of the image
(docker/Dockerfile's ENV, with its paths mapped onto this machine), a synthetic model package."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.cli import build_parser
from pipelines.service_client import free_port, post_radiograph
from tests.docker.conftest import DOCKER, DOCKERFILES
from tests.docker.dockerfile import environment, parse_dockerfile

ENTRYPOINT = DOCKER / "entrypoint.sh"
HEALTHCHECK = DOCKER / "healthcheck.py"
VENV_BIN = str(Path(sys.executable).parent)


def image_environment(**overrides: str) -> dict[str, str]:
    """docker/Dockerfile's ENV as a process here sees it: /opt/venv/bin is this Python's folder, $PATH ours."""
    env = environment(parse_dockerfile(DOCKERFILES["gpu"]))
    env["PATH"] = env["PATH"].replace("/opt/venv/bin", VENV_BIN).replace("$PATH", os.environ.get("PATH", ""))
    return {**env, **overrides}


def healthcheck(port: int, *path: str) -> subprocess.CompletedProcess:
    # A proxy nobody listens on: the probe must not use it (Docker copies the client's proxy into containers).
    proxy = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "CARIES_MIM_PORT": str(port), "CARIES_MIM_HEALTHCHECK_TIMEOUT_S": "2"}
    env.update(http_proxy=proxy, HTTP_PROXY=proxy, no_proxy="", NO_PROXY="")
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *path], env=env, capture_output=True, text=True, check=False
    )


@pytest.mark.slow
def test_the_entrypoint_serves_predictions_with_the_image_environment(package_path, synthetic_dicom, tmp_path):
    port = free_port()
    keys = tmp_path / "api_keys"
    keys.write_text("# one key per line\nsecret-key-1\n")
    env = image_environment(
        CARIES_MIM_MODEL=str(package_path),  # where the image mounts it: /models/model.cmpkg
        CARIES_MIM_PORT=str(port),
        CARIES_MIM_API_KEYS_FILE=str(keys),
        MPLCONFIGDIR=str(tmp_path / "matplotlib"),
    )
    assert env["CARIES_MIM_HOST"] == "0.0.0.0"
    log = (tmp_path / "service.log").open("wb")
    process = subprocess.Popen([str(ENTRYPOINT)], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while healthcheck(port, "/readyz").returncode != 0:
            assert process.poll() is None, (tmp_path / "service.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "not ready within 120 s"
            time.sleep(0.3)
        assert healthcheck(port).returncode == 0  # the image's HEALTHCHECK: /healthz
        base = f"http://127.0.0.1:{port}"
        data = synthetic_dicom.read_bytes()
        answer = post_radiograph(base, data, api_key="secret-key-1")
        assert answer.status == 200, answer.body[:300]
        findings = answer.json()
        assert findings["model"]["version"] == "0.1.0"
        assert findings["findings"]
        assert post_radiograph(base, data).status == 401
        assert post_radiograph(base, data, api_key="secret-key-1", accept="application/dicom").status == 200
        # exec: the entrypoint's process is the service itself, so SIGTERM reaches uvicorn (graceful stop).
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)
        assert status in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    text = (tmp_path / "service.log").read_text()
    assert "Traceback" not in text
    assert "secret-key-1" not in text


def test_the_image_refuses_to_serve_without_api_keys(package_path, tmp_path):
    env = image_environment(CARIES_MIM_MODEL=str(package_path), CARIES_MIM_PORT=str(free_port()))
    done = subprocess.run([str(ENTRYPOINT)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "without API keys" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_model_mount_is_one_clear_line(tmp_path):
    env = image_environment(CARIES_MIM_API_KEYS="k", CARIES_MIM_PORT=str(free_port()))
    assert env["CARIES_MIM_MODEL"] == "/models/model.cmpkg"
    done = subprocess.run([str(ENTRYPOINT)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "/models/model.cmpkg does not exist" in done.stderr


def test_other_commands_run_as_given_and_flags_go_to_serve(tmp_path):
    env = image_environment()
    done = subprocess.run(
        [str(ENTRYPOINT), "python", "-c", "import sys; print('ran', sys.argv[1:])", "x"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0
    assert done.stdout.strip() == "ran ['x']"
    done = subprocess.run([str(ENTRYPOINT), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "caries-mim serve" in done.stdout
    done = subprocess.run([str(ENTRYPOINT), "synth", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "caries-mim synth" in done.stdout


def test_the_entrypoint_knows_every_command_of_the_cli():
    case = re.search(r"^\s*(serve \|[^)]*)\)", ENTRYPOINT.read_text(), re.MULTILINE)
    assert case is not None
    listed = {name.strip() for name in case.group(1).split("|")}
    parser = build_parser()
    (commands,) = [action for action in parser._actions if action.dest == "command"]
    assert listed == set(commands.choices)


def test_healthcheck_fails_when_nothing_answers_and_on_a_bad_path():
    done = healthcheck(free_port())
    assert done.returncode == 1
    assert "did not answer" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = healthcheck(free_port(), "healthz")
    assert done.returncode == 2
    assert "must start with '/'" in done.stderr
