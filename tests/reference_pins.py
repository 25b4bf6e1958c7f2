"""The shipped reference detector's predictions on a fixture radiograph, pinned (the regression test's record).

The fixture is a synthetic bitewing (744 x 539 px, JPEG 2000 lossless, three caries and one deep caries labeled; drawn
with ``caries-mim synth --labeled 10 --seed 4242 --set 'width_px_range=[700,760]'``, image 5), committed as a file
so a change of the generator does not move it. After a deliberate rebuild of ``models/`` (``make reference-cpu`` or
``make reference``), pin the new detector's predictions with::

    .venv/bin/python -m tests.reference_pins
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from caries_mim.inference import Predictor
from caries_mim.package import REFERENCE_DETECTOR, read_package
from pipelines.reference import file_sha256

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "radiograph.dcm"
PINS = FIXTURE.with_name("predictions.json")


def package_sha256() -> str:
    return file_sha256(REFERENCE_DETECTOR)


def predict_fixture() -> dict[str, Any]:
    """The shipped detector's findings on the fixture, on the CPU, as ``caries-mim predict`` reports them."""
    predictor = Predictor(read_package(REFERENCE_DETECTOR), "cpu", source=str(REFERENCE_DETECTOR))
    return predictor.predict_file(FIXTURE).to_dict()


def main() -> None:
    # Every finding the detector returns (its own score floor, detector.score_threshold, is well under the scores
    # the test compares, so one that moves a little across machines never falls out of the record).
    found = predict_fixture()
    record = {"package_sha256": package_sha256(), **found}
    PINS.write_text(json.dumps(record, indent=1) + "\n")
    print(f"pinned {len(found['findings'])} findings to {PINS}")


if __name__ == "__main__":
    main()
