"""The longer fuzz run: ``python -m tests.fuzz [--seed S] [--count N] [--start I] [--isolated]``.

Reads ``count`` files of the seeded hostile-DICOM corpus (``tests/fuzz/corpus.py``) with ``read_radiograph`` (or
through the isolated reader with ``--isolated``) and prints a tally by mutation family and outcome, then every file
that got anything but a result or a typed error, by name (``hostile_file(seed, index)`` rebuilds it). Exit status
1 when there was one. CI reads a few thousand files of seeds 0-2; this is for tens of thousands.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections import Counter

from caries_mim.errors import CariesMimError
from caries_mim.io import read_radiograph
from caries_mim.io.isolation import IsolatedReader
from tests.fuzz.corpus import hostile_files


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--isolated", action="store_true", help="read through IsolatedReader (2 workers)")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    reader = IsolatedReader(2) if args.isolated else None
    read = reader.read if reader is not None else read_radiograph
    tally: Counter[tuple[str, str]] = Counter()
    failures = []
    started = time.monotonic()
    try:
        for number, hostile in enumerate(hostile_files(args.seed, args.count, start=args.start), 1):
            try:
                read(hostile.data)
                tally[hostile.family, "ok"] += 1
            except CariesMimError as error:
                tally[hostile.family, error.code] += 1
            except KeyboardInterrupt:
                raise
            except BaseException as error:  # what the run looks for
                tally[hostile.family, "FAILED"] += 1
                failures.append(f"{hostile.name}: {type(error).__name__}: {str(error)[:200]}")
            if number % 1000 == 0:
                print(f"{number} files, {time.monotonic() - started:.0f} s, {len(failures)} failures", file=sys.stderr)
    finally:
        if reader is not None:
            reader.close()
    summary = {f"{family}/{code}": count for (family, code), count in sorted(tally.items())}
    report = {"seed": args.seed, "files": sum(tally.values()), "failures": len(failures), "tally": summary}
    if reader is not None:
        report["decoder_crashes"] = reader.stats.crashes
        report["decoder_timeouts"] = reader.stats.timeouts
    print(json.dumps(report))
    for failure in failures:
        print(failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
