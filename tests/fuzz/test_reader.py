"""Hostile DICOM files through ``read_radiograph`` and ``caries-mim inspect``: every file gets a result or a typed
error, never another exception, a traceback or a crash.

The corpus (``tests/fuzz/corpus.py``) is seeded: a failure names the file (``<syntax>-<family>-<index>``), and
``hostile_file(seed, index)`` gives its bytes back. A longer run: ``python -m tests.fuzz --count 20000``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caries_mim.errors import CariesMimError
from caries_mim.io import read_radiograph
from tests.fuzz.corpus import MUTATIONS, SEED_SYNTAXES, every_family, hostile_files, seed_files

# pydicom warns about every malformed element it reads; here that is the point, not news.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: Files of the seeded corpus read in CI (about 8 s); ``python -m tests.fuzz`` runs as many as you like.
CI_CORPUS_FILES = 4000


def outcome(data: bytes) -> str:
    """``"ok"`` or the typed error's code; anything else propagates and fails the test that asked."""
    try:
        radiograph = read_radiograph(data)
    except CariesMimError as error:
        return error.code if error.message else f"{error.code} without a message"
    assert radiograph.pixels.dtype.name == "float32"
    assert radiograph.pixels.ndim == 2
    assert 0.0 <= float(radiograph.pixels.min()) <= float(radiograph.pixels.max()) <= 1.0
    return "ok"


def _outcome_or_failure(data: bytes) -> str:
    """:func:`outcome`, with any other exception (panics included: that is what the test looks for) as text."""
    try:
        return outcome(data)
    except KeyboardInterrupt:
        raise
    except BaseException as error:
        return f"FAILED {type(error).__name__}: {str(error)[:200]}"


def test_every_seed_file_reads():
    for syntax, data in seed_files().items():
        assert outcome(data) == "ok", syntax


def test_the_seeded_corpus_gets_results_or_typed_errors():
    outcomes: Counter[tuple[str, str]] = Counter()
    failures = []
    for hostile in [*every_family(0), *hostile_files(seed=0, count=CI_CORPUS_FILES)]:
        result = _outcome_or_failure(hostile.data)
        if result.startswith("FAILED"):
            failures.append(f"{hostile.name}: {result}")
        outcomes[hostile.family, result] += 1
    assert not failures, "\n".join(failures)
    assert not [code for _, code in outcomes if code.endswith("without a message")]
    families = {family for family, _ in outcomes}
    assert families == set(MUTATIONS), "every mutation family was generated"
    refused = {family for (family, code), count in outcomes.items() if code != "ok"}
    assert refused == set(MUTATIONS), "every family produced files the reader refuses"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    syntax=st.sampled_from(sorted(SEED_SYNTAXES)),
    edits=st.lists(
        st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6
    ),
    cut=st.one_of(st.none(), st.floats(0.0, 1.0)),
    insert=st.one_of(st.none(), st.tuples(st.floats(0.0, 1.0), st.binary(min_size=1, max_size=64))),
)
def test_arbitrary_edits_of_a_valid_file_get_results_or_typed_errors(syntax, edits, cut, insert):
    """Property-based: overwrite a few runs of bytes anywhere, optionally insert some and cut the file short."""
    data = bytearray(seed_files()[syntax])
    for position, replacement in edits:
        start = int(position * len(data))
        data[start : start + len(replacement)] = replacement
    if insert is not None:
        position = int(insert[0] * len(data))
        data[position:position] = insert[1]
    if cut is not None:
        del data[int(cut * len(data)) :]
    outcome(bytes(data))


@pytest.mark.slow
def test_inspect_answers_every_hostile_file_with_one_line(tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    corpus = [*every_family(1), *hostile_files(seed=1, count=250)]
    for hostile in corpus:
        (folder / f"{hostile.name}.dcm").write_bytes(hostile.data)
    finished = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "inspect", str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert finished.returncode == 2, finished.stderr[-2000:]  # some files are unreadable: a user error
    assert "Traceback" not in finished.stderr
    records = [json.loads(line) for line in finished.stdout.splitlines()]
    assert len(records) == len(corpus)
    codes = Counter(record["error"]["code"] for record in records if not record["ok"])
    assert "internal_error" not in codes, codes
    assert sum(codes.values()) > len(corpus) // 3
    assert f"of {len(corpus)} file(s) readable" in finished.stderr.splitlines()[-1]
