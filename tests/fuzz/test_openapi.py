"""The API contract, fuzzed: schemathesis generates requests from ``/openapi.json`` (valid and invalid ones) and
runs every check it has (``--checks all``: no server error, statuses, content types, headers and response bodies
as documented, schema-valid requests accepted, invalid ones refused, authentication not ignored) against the real
server with API keys. ``tests/fuzz/schemathesis_hooks.py`` says what a valid upload is (a radiograph).

A longer run, against any running service:

    SCHEMATHESIS_HOOKS=tests.fuzz.schemathesis_hooks schemathesis run http://127.0.0.1:8000/openapi.json \\
        --checks all --max-examples 2000 -H "Authorization: Bearer <key>"
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caries_mim.errors import InvalidArgumentError
from pipelines.service_client import LocalService
from service import ServiceSettings, create_app
from service.routes import parse_spacing
from service.schemas import SPACING_PATTERN

REPO = Path(__file__).resolve().parents[2]
KEY = "fuzz-key"
#: Cases per operation in CI (about 5 s in all); the command above runs as many as you like.
CI_EXAMPLES = 150


@pytest.mark.slow
def test_schemathesis_finds_nothing_against_the_real_server(package_path, tmp_path):
    environment = {"OMP_NUM_THREADS": "1", "CARIES_MIM_API_KEYS": KEY}
    with LocalService(package_path, tmp_path / "server.log", environment=environment, inherit_settings=False) as server:
        finished = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{server.base_url}/openapi.json",
                "--checks",
                "all",
                "--workers",
                "1",
                "--max-examples",
                str(CI_EXAMPLES),
                "--header",
                f"Authorization: Bearer {KEY}",
                "--no-color",
            ],
            env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.fuzz.schemathesis_hooks", "PYTHONPATH": str(REPO)},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        log = server.log_tail(50_000_000)
    report = _readable_report(finished.stdout, finished.stderr, tmp_path / "schemathesis.txt")
    assert finished.returncode == 0, report
    assert "No issues found" in finished.stdout, report
    generated = re.search(r"(\d+) generated", finished.stdout)
    assert generated is not None, report
    assert int(generated.group(1)) >= CI_EXAMPLES, report
    assert "Traceback" not in log


def _readable_report(stdout: str, stderr: str, keep: Path, line_chars: int = 400) -> str:
    """What a failed run reported, short enough for pytest's message: the seed and every failure with its check,
    request and response, each line cut to ``line_chars`` (a reproduction's upload is one line of binary body that
    would otherwise push the check's name out of any tail). The whole output is kept in ``keep``."""
    keep.write_text(stdout + "\n--- stderr ---\n" + stderr)
    start = max(stdout.find("FAILURES"), 0)
    lines = [line if len(line) <= line_chars else line[:line_chars] + " [...]" for line in stdout[start:].splitlines()]
    seed = re.search(r"^.*[Ss]eed.*$", stdout, re.MULTILINE)
    head = [seed.group(0)] if seed else []
    return "\n".join([*head, *lines[-400:], stderr[-2000:], f"(full output: {keep})"])


def test_the_schema_states_what_an_upload_must_be():
    spec = create_app(ServiceSettings()).openapi()
    body = spec["paths"]["/v1/predictions"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = spec["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert form["required"] == ["file"]
    assert form["properties"]["file"]["format"] == "binary"
    assert form["properties"]["file"]["minLength"] == 1
    assert form["properties"]["pixel_spacing_mm"]["pattern"] == SPACING_PATTERN
    responses = spec["paths"]["/v1/predictions"]["post"]["responses"]
    assert {"200", "400", "401", "406", "408", "413", "415", "422", "500", "503", "504"} <= set(responses)
    assert "securitySchemes" not in spec.get("components", {}), "no keys configured: nothing to send"


def test_with_keys_the_schema_asks_for_a_bearer_key_on_v1_routes_only():
    spec = create_app(ServiceSettings(api_keys=["k"])).openapi()
    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "one of the service's API keys (CARIES_MIM_API_KEYS, CARIES_MIM_API_KEYS_FILE)",
    }
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            assert ("security" in operation) == path.startswith("/v1/"), path


@given(st.from_regex(SPACING_PATTERN, fullmatch=True))
def test_every_spacing_the_schema_allows_is_accepted(text):
    spacing = parse_spacing(text)
    if text == "":
        assert spacing is None
    else:
        assert spacing is not None
        assert all(0.0 < value < 10.0 and math.isfinite(value) for value in spacing)


@given(st.text(max_size=24))
def test_every_spacing_the_schema_refuses_is_refused(text):
    if not re.fullmatch(SPACING_PATTERN, text):
        with pytest.raises(InvalidArgumentError):
            parse_spacing(text)


@pytest.mark.parametrize("text", ["0." + "0" * 400 + "1", "9." + "9" * 30, "0.03,9.999999999"])
def test_spacings_that_would_round_to_zero_or_ten_are_outside_the_pattern(text):
    """The pattern bounds the digits: no string it allows rounds to 0.0 or 10.0 as a float, which the model
    would then refuse after the schema had allowed it."""
    assert not re.fullmatch(SPACING_PATTERN, text)
    with pytest.raises(InvalidArgumentError):
        parse_spacing(text)
