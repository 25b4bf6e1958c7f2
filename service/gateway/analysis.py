"""What the gateway does with a received radiograph: detect caries and report them as DICOM objects on it.

The file is decoded by the reader given (in the gateway, an :class:`~caries_mim.io.isolation.IsolatedReader`: a
decoder that crashes or hangs on a hostile file costs that job only), the packaged detector predicts, and the
findings become the results the operator chose (:data:`RESULT_KINDS`), each in the source's study: the TID 1500
caries SR (:mod:`caries_mim.dicom_out.structured_report`) and, for archives that cannot show SR, a Grayscale
Softcopy Presentation State over the original image or a Secondary Capture with the marks burnt in.

Every result's UIDs are derived from the source's SOP Instance UID, the model's name, version and checksum and the
kind of result: a job run again (its worker died after the analysis) rebuilds the same instances, so an archive
receives one result of each kind per image and model, however often the job ran. Its series is derived from the
source's study, the model and the kind: a DICOM series belongs to one study, so each study gets its own series of
each kind of result per model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from caries_mim.dicom_out import (
    caries_presentation_state,
    caries_secondary_capture,
    caries_structured_report,
    structured_report_bytes,
)
from caries_mim.errors import InvalidArgumentError, InvalidConfigError
from caries_mim.inference import Findings, Predictor
from caries_mim.io.dicom import parse_dicom
from caries_mim.io.options import ReadOptions
from caries_mim.io.radiograph import Radiograph
from service.gateway.store import CatalogKeys, ResultFile, StoredInstance
from service.runtime import ModelIdentity

#: ``read(path, options) -> Radiograph``: the real reader, or an isolated one's ``read``.
Reader = Callable[[Path, ReadOptions], Radiograph]

#: The results the gateway can make of an analysed radiograph, by the name the configuration uses, with one line
#: each for the CLI's help.
RESULT_KIND_DESCRIPTIONS: Mapping[str, str] = {
    "sr": "TID 1500 caries Structured Report: each finding's region, class and score, for SR-aware viewers",
    "gsps": "Grayscale Softcopy Presentation State: boxes and scores a viewer draws over the original image",
    "sc": "Secondary Capture: an RGB copy of the image with the boxes burnt in, for archives that show only images",
}
#: The result names, in the order a job produces them.
RESULT_KINDS: tuple[str, ...] = tuple(RESULT_KIND_DESCRIPTIONS)

#: What starts the derivation of each kind's UIDs. The SR's is the one it always had, so its SOP Instance UIDs are
#: those of earlier versions.
_UID_ROOTS = {"sr": "caries-mim gateway SR", "gsps": "caries-mim gateway GSPS", "sc": "caries-mim gateway SC"}


def result_uids(
    kind: str,
    source_sop_instance_uid: str,
    identity: ModelIdentity,
    *,
    study_instance_uid: str | None = None,
    include_below_threshold: bool = False,
) -> tuple[str, str]:
    """(SOP Instance UID, Series Instance UID) of the ``kind`` result on a source instance by a model: the same
    inputs always give the same UIDs (pydicom's root and a hash of them).

    Args:
        kind: one of :data:`RESULT_KINDS`.
        source_sop_instance_uid: the analysed instance.
        identity: the model (name, version and checksum).
        study_instance_uid: the source's study. A series belongs to one study in DICOM, so the gateway passes it
            and each study gets its own result series; None derives the series from the model alone.
        include_below_threshold: the SR also lists the findings under the threshold, content of its own, hence a
            UID of its own (the GSPS and SC draw only those at the operating point whatever it says).
    Raises:
        InvalidArgumentError: an unknown ``kind``.
    """
    root = _UID_ROOTS.get(kind)
    if root is None:
        raise InvalidArgumentError(f"unknown result kind {kind!r}; the gateway makes {', '.join(RESULT_KINDS)}")
    model = [identity.name, identity.version, identity.checksum]
    parts = [root, source_sop_instance_uid, *model]
    if include_below_threshold and kind == "sr":
        parts.append("below threshold included")
    series_parts = [f"{root} series", *model]
    if study_instance_uid is not None:
        series_parts.append(study_instance_uid)
    return generate_uid(entropy_srcs=parts), generate_uid(entropy_srcs=series_parts)


def report_uids(
    source_sop_instance_uid: str,
    identity: ModelIdentity,
    *,
    include_below_threshold: bool = False,
    study_instance_uid: str | None = None,
) -> tuple[str, str]:
    """(SOP Instance UID, Series Instance UID) of the caries SR on a source instance by a model: the "sr" case of
    :func:`result_uids`."""
    return result_uids(
        "sr",
        source_sop_instance_uid,
        identity,
        study_instance_uid=study_instance_uid,
        include_below_threshold=include_below_threshold,
    )


class CariesReportAnalysis:
    """The gateway's analysis (:data:`service.gateway.worker.Analysis`): the chosen results per radiograph.

    Args:
        predictor: the loaded model package.
        identity: the model's name, version and checksum (they name the algorithm in the results and derive their
            UIDs).
        read: how files are decoded.
        options: what the reader accepts (modalities, size).
        include_below_threshold: the SR also reports the findings under the operating threshold (marked optional);
            the GSPS and SC mark only those at the operating point.
        outputs: which results to make, any non-empty selection of :data:`RESULT_KINDS` (a single name is one
            kind); they come in the order of :data:`RESULT_KINDS` whatever the order given.
    Raises:
        InvalidConfigError: ``outputs`` is empty or names an unknown kind.
    """

    def __init__(
        self,
        predictor: Predictor,
        identity: ModelIdentity,
        read: Reader,
        options: ReadOptions | None = None,
        *,
        include_below_threshold: bool = False,
        outputs: Iterable[str] = ("sr",),
    ) -> None:
        self.predictor = predictor
        self.identity = identity
        self.read = read
        self.options = options or ReadOptions()
        self.include_below_threshold = include_below_threshold
        self.outputs = _checked_outputs(outputs)

    def __call__(self, instance: StoredInstance) -> list[ResultFile]:
        radiograph = self.read(instance.path, self.options)
        findings = self.predictor.predict(radiograph)
        header = parse_dicom(
            instance.path.read_bytes(), max_pixels=radiograph.height * radiograph.width, stop_before_pixels=True
        )
        results = []
        for kind in self.outputs:
            sop_instance_uid, series_instance_uid = result_uids(
                kind,
                instance.sop_instance_uid,
                self.identity,
                study_instance_uid=instance.study_instance_uid,
                include_below_threshold=self.include_below_threshold,
            )
            dataset = self._build(kind, header, radiograph, findings, sop_instance_uid, series_instance_uid)
            results.append(
                ResultFile(
                    sop_instance_uid,
                    dataset.SOPClassUID,
                    structured_report_bytes(dataset),
                    keys=CatalogKeys.from_dataset(dataset),
                )
            )
        return results

    def _build(
        self,
        kind: str,
        header: Dataset,
        radiograph: Radiograph,
        findings: Findings,
        sop_instance_uid: str,
        series_instance_uid: str,
    ) -> Dataset:
        common = {
            "algorithm_name": self.identity.name,
            "algorithm_version": self.identity.version,
            "sop_instance_uid": sop_instance_uid,
            "series_instance_uid": series_instance_uid,
        }
        if kind == "sr":
            return caries_structured_report(
                header, findings, include_below_threshold=self.include_below_threshold, **common
            )
        if kind == "gsps":
            return caries_presentation_state(header, findings, **common)
        return caries_secondary_capture(header, radiograph.pixels, findings, **common)


def _checked_outputs(outputs: Iterable[str]) -> tuple[str, ...]:
    chosen = {outputs} if isinstance(outputs, str) else set(outputs)
    unknown = sorted(str(name) for name in chosen - set(RESULT_KINDS))
    if unknown:
        raise InvalidConfigError(
            f"unknown gateway output {', '.join(map(repr, unknown))}; choose from {', '.join(RESULT_KINDS)}"
        )
    if not chosen:
        raise InvalidConfigError(f"no gateway output chosen; choose one or more of {', '.join(RESULT_KINDS)}")
    return tuple(kind for kind in RESULT_KINDS if kind in chosen)
