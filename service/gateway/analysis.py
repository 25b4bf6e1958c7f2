"""What the gateway does with a received radiograph: detect caries and report them as a DICOM SR on it.

The file is decoded by the reader given (in the gateway, an :class:`~caries_mim.io.isolation.IsolatedReader`: a
decoder that crashes or hangs on a hostile file costs that job only), the packaged detector predicts, and the
findings become the TID 1500 caries SR (:mod:`caries_mim.dicom_out.structured_report`) in the source's study.

The SR's UIDs are derived from the source's SOP Instance UID and the model's name, version and checksum: a job run
again (its worker died after the analysis) rebuilds the same SR instance, so an archive receives one report per
image and model, however often the job ran.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydicom.uid import Comprehensive3DSRStorage, generate_uid

from caries_mim.dicom_out import caries_structured_report, structured_report_bytes
from caries_mim.inference import Predictor
from caries_mim.io.dicom import parse_dicom
from caries_mim.io.options import ReadOptions
from caries_mim.io.radiograph import Radiograph
from service.gateway.store import ResultFile, StoredInstance
from service.runtime import ModelIdentity

#: ``read(path, options) -> Radiograph``: the real reader, or an isolated one's ``read``.
Reader = Callable[[Path, ReadOptions], Radiograph]


def report_uids(
    source_sop_instance_uid: str, identity: ModelIdentity, *, include_below_threshold: bool = False
) -> tuple[str, str]:
    """(SOP Instance UID, Series Instance UID) of the caries SR on a source instance by a model: the same inputs
    always give the same UIDs (pydicom's root and a hash of them). One series per model holds its reports; a report
    that also lists the findings under the threshold has content of its own, hence a UID of its own."""
    parts = ["caries-mim gateway SR", source_sop_instance_uid, identity.name, identity.version, identity.checksum]
    if include_below_threshold:
        parts.append("below threshold included")
    series_parts = ["caries-mim gateway SR series", identity.name, identity.version, identity.checksum]
    return generate_uid(entropy_srcs=parts), generate_uid(entropy_srcs=series_parts)


class CariesReportAnalysis:
    """The gateway's analysis (:data:`service.gateway.worker.Analysis`): one caries SR per radiograph.

    Args:
        predictor: the loaded model package.
        identity: the model's name, version and checksum (they name the algorithm in the SR and derive its UIDs).
        read: how files are decoded.
        options: what the reader accepts (modalities, size).
        include_below_threshold: also report the findings under the operating threshold (marked optional).
    """

    def __init__(
        self,
        predictor: Predictor,
        identity: ModelIdentity,
        read: Reader,
        options: ReadOptions | None = None,
        *,
        include_below_threshold: bool = False,
    ) -> None:
        self.predictor = predictor
        self.identity = identity
        self.read = read
        self.options = options or ReadOptions()
        self.include_below_threshold = include_below_threshold

    def __call__(self, instance: StoredInstance) -> list[ResultFile]:
        radiograph = self.read(instance.path, self.options)
        findings = self.predictor.predict(radiograph)
        header = parse_dicom(
            instance.path.read_bytes(), max_pixels=radiograph.height * radiograph.width, stop_before_pixels=True
        )
        sop_instance_uid, series_instance_uid = report_uids(
            instance.sop_instance_uid, self.identity, include_below_threshold=self.include_below_threshold
        )
        report = caries_structured_report(
            header,
            findings,
            algorithm_name=self.identity.name,
            algorithm_version=self.identity.version,
            include_below_threshold=self.include_below_threshold,
            sop_instance_uid=sop_instance_uid,
            series_instance_uid=series_instance_uid,
        )
        return [ResultFile(sop_instance_uid, Comprehensive3DSRStorage, structured_report_bytes(report))]
