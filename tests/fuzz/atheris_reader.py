"""Coverage-guided fuzzing of ``read_radiograph`` with atheris (libFuzzer for Python), the long run beside the
seeded corpus of the CI tests. Not part of the test suite (a libFuzzer run has no natural end) and atheris is not
a dependency; install it into the environment first:

    .venv/bin/pip install atheris
    .venv/bin/python tests/fuzz/atheris_reader.py -atheris_runs=200000 -max_len=65536 runs/fuzz-corpus

The corpus folder is created and seeded with the valid synthetic files of ``tests/fuzz/corpus.py`` (one per
transfer syntax); libFuzzer adds every input that reaches new code. Any exception other than a typed
``CariesMimError`` (and any crash of the process) is a finding: libFuzzer stops and writes the input as
``crash-<sha1>``; rebuild it with ``read_radiograph(open(path, "rb").read())``. Decoders are native code that
atheris does not instrument, so coverage guides it through caries-mim's and pydicom's Python; the native decoders
are exercised by what reaches them.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import pydicom  # noqa: F401 - instrumented for coverage: the header parsing happens there

    from caries_mim.errors import CariesMimError
    from caries_mim.io import read_radiograph


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(CariesMimError):  # a typed error is the right answer; anything else is a finding
        read_radiograph(data)


def seed(folder: Path) -> None:
    from tests.fuzz.corpus import seed_files

    folder.mkdir(parents=True, exist_ok=True)
    for syntax, data in seed_files().items():
        (folder / f"seed-{syntax}.dcm").write_bytes(data)


def main(argv: list[str]) -> None:
    warnings.simplefilter("ignore")
    folders = [Path(arg) for arg in argv[1:] if not arg.startswith("-")]
    for folder in folders:
        if not folder.exists() or not any(folder.iterdir()):
            seed(folder)
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/ is not installed: import it from the clone
    main(sys.argv)
