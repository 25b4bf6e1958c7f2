"""docs/deploy.md and docker/kubernetes.yaml say what the files do: every path, compose service, build argument,
variable and caries-mim command line in the guide exists, and the Kubernetes example probes and mounts what the
image serves and reads."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from pipelines.cli import build_parser
from service.settings import ServiceSettings
from tests.docker.conftest import DOCKER, DOCKERFILES, REPO
from tests.docker.dockerfile import build_args, environment, parse_dockerfile
from tests.docker.test_compose import COMPOSE, VARIABLE, interpolated

GUIDE = REPO / "docs" / "deploy.md"


def code_lines() -> list[str]:
    """The guide's code blocks, one command per line (backslash continuations joined, comments dropped)."""
    lines, block, pending = [], False, ""
    for line in GUIDE.read_text().splitlines():
        if line.startswith("```"):
            block = not block
            continue
        if not block:
            continue
        text = line.split("  #")[0].rstrip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        lines.append((pending + text).strip())
        pending = ""
    return [line for line in lines if line]


def setting_variables() -> set[str]:
    return {f"CARIES_MIM_{name.upper()}" for name in ServiceSettings.model_fields}


def test_every_repository_path_in_the_guide_exists():
    text = GUIDE.read_text()
    paths = set(re.findall(r"(?<![\w/.])((?:docker|docs|tests|service|pipelines|caries_mim)/[\w./-]*\w)", text))
    assert "docker/compose.yaml" in paths
    # Not files of the repository: the BuildKit frontend image and the optional file an operator creates.
    named_otherwise = {"docker/dockerfile", "docker/.env"}
    missing = sorted(path for path in paths - named_otherwise if not (REPO / path).exists())
    assert not missing, f"the guide names files that do not exist: {missing}"


def test_compose_commands_name_its_services_and_profiles():
    services = set(yaml.safe_load(interpolated(COMPOSE.read_text()))["services"])
    profiles = {"train"}
    found = 0
    for line in code_lines():
        if "docker compose" not in line:
            continue
        words = shlex.split(line[line.index("docker compose") :])
        assert words[words.index("-f") + 1] == "docker/compose.yaml", line
        if "--profile" in words:
            assert words[words.index("--profile") + 1] in profiles, line
        for verb in ("run", "logs"):
            if verb in words:
                rest = [word for word in words[words.index(verb) + 1 :] if not word.startswith("-")]
                assert rest[0] in services, line
                found += 1
    assert found >= 3


def test_build_commands_use_the_dockerfiles_and_their_arguments():
    arguments = build_args(parse_dockerfile(DOCKERFILES["gpu"]))
    builds = [line for line in code_lines() if line.startswith("docker build")]
    assert "docker build -f docker/Dockerfile -t caries-mim:gpu ." in builds
    assert "docker build -f docker/Dockerfile.cpu -t caries-mim:cpu ." in builds
    for line in builds:
        words = shlex.split(line)
        assert (REPO / words[words.index("-f") + 1]).is_file(), line
        assert words[-1] == "."
        for index, word in enumerate(words):
            if word == "--build-arg":
                assert words[index + 1].partition("=")[0] in arguments, line


def test_every_variable_the_guide_names_is_read_by_something():
    compose_variables = {match.group(1) for match in VARIABLE.finditer(COMPOSE.read_text())}
    image = set(environment(parse_dockerfile(DOCKERFILES["gpu"])))
    probe = set(re.findall(r"CARIES_MIM_\w+", (DOCKER / "healthcheck.py").read_text()))
    known = setting_variables() | compose_variables | image | probe
    named = set(re.findall(r"\bCARIES_MIM_[A-Z_]*[A-Z]\b", GUIDE.read_text()))
    assert named
    assert not named - known, f"the guide names variables nothing reads: {sorted(named - known)}"


def test_caries_mim_command_lines_in_the_guide_parse():
    parser = build_parser()
    parsed = 0
    for line in code_lines():
        words = shlex.split(line)
        if "pipelines.cli" in words:
            tail = words[words.index("pipelines.cli") + 1 :]
        elif "caries-mim:gpu" in words and words.index("caries-mim:gpu") + 1 < len(words):
            tail = words[words.index("caries-mim:gpu") + 1 :]
            if tail[0] not in {"pretrain", "finetune", "serve", "predict", "evaluate"}:
                continue
        else:
            continue
        if "--help" in tail:
            continue
        try:
            parser.parse_args(tail)
        except SystemExit:
            pytest.fail(f"not a valid caries-mim command line: {line}")
        parsed += 1
    assert parsed >= 5


@pytest.fixture(scope="module")
def deployment() -> dict:
    documents = list(yaml.safe_load_all((DOCKER / "kubernetes.yaml").read_text()))
    (found,) = [document for document in documents if document and document["kind"] == "Deployment"]
    return found


def test_kubernetes_probes_and_resources(deployment):
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    image_env = environment(parse_dockerfile(DOCKERFILES["gpu"]))
    (port,) = container["ports"]
    assert port["containerPort"] == int(image_env["CARIES_MIM_PORT"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120  # model loading
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30


def test_kubernetes_runs_the_image_user_and_mounts_what_the_settings_read(deployment):
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    user = next(i.arguments for i in parse_dockerfile(DOCKERFILES["gpu"]) if i.keyword == "USER")
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    assert pod["securityContext"]["runAsNonRoot"] is True
    env = {item["name"]: item["value"] for item in container["env"]}
    assert set(env) <= setting_variables()
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    model = environment(parse_dockerfile(DOCKERFILES["gpu"]))["CARIES_MIM_MODEL"]
    assert mounts[model.rsplit("/", 1)[0]]["readOnly"] is True
    assert env["CARIES_MIM_API_KEYS_FILE"].rsplit("/", 1)[0] in mounts
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    secret = volumes[mounts[env["CARIES_MIM_API_KEYS_FILE"].rsplit("/", 1)[0]]["name"]]["secret"]
    assert secret["secretName"] == "caries-mim-api-keys"
    assert "--from-file=api_keys=" in GUIDE.read_text()  # the key file name the env points at
    assert env["CARIES_MIM_API_KEYS_FILE"].endswith("/api_keys")
    # A read-only root needs a writable /tmp (MPLCONFIGDIR lives there).
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "/tmp" in mounts
