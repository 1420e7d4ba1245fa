"""One study through the pipeline: list its instances, skip what is not a bilateral PA knee
radiograph (counted by reason), skip what was already processed with these model and index
versions, synthesize the rest and store each radiograph's SC and SR back into the study."""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mris.dicom_out import ResultUids, results_to_dicom
from mris.errors import (
    DecodeTimeout,
    ImageTooLarge,
    KneeNotFound,
    NoUsableSpacing,
    UnreadableDicom,
    UnsupportedDicom,
)
from mris.pacs.client import InstanceRef, PacsClient, PacsError

if TYPE_CHECKING:  # pragma: no cover
    from mris.options import RequestOptions
    from mris.pacs.metrics import RouterMetrics
    from mris.pipeline import Pipeline
    from mris.sandbox import DecodeSandbox

log = logging.getLogger(__name__)

RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
# Body Part Examined values (spaces and underscores removed, upper case) that may show knees;
# an instance without the attribute is looked at (the localiser decides).
KNEE_BODY_PARTS = frozenset(
    {"KNEE", "KNEES", "BILATERALKNEES", "LEG", "LOWERLIMB", "LOWEREXTREMITY", "EXTREMITY"}
)
SKIP_REASONS = {
    "not-a-radiograph": "Modality is not CR or DX (including MRIS's own SC and SR)",
    "not-a-knee": "Body Part Examined names another body part",
    "unreadable": "the file does not decode (corrupt, unsupported, too large, too slow)",
    "no-spacing": "no usable pixel spacing",
    "knees-not-found": "the localiser did not find both knees",
}
MAX_STUDY_INSTANCES_DEFAULT = 200


def study_ref(study_uid: str) -> str:
    """What logs and messages call a study: 12 hex digits of the SHA-256 of its UID."""
    return hashlib.sha256(study_uid.encode("ascii", "replace")).hexdigest()[:12]


@dataclass
class StudyReport:
    """What routing one study did."""

    study: str  # study_ref, not the UID
    synthesized: int = 0
    already_processed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def outcome(self) -> str:
        if self.synthesized:
            return "synthesized"
        if self.already_processed:
            return "already_processed"
        return "nothing_to_do"

    def summary(self) -> str:
        parts = [
            f"study {self.study}: {self.synthesized} radiograph(s) synthesized",
            f"{self.already_processed} already processed",
        ]
        if self.skipped:
            counts = sorted(self.skipped.items())
            skipped = ", ".join(f"{count} {reason}" for reason, count in counts)
            parts.append(f"skipped {skipped}")
        return "; ".join(parts) + f" ({self.seconds:.1f} s)"

    def to_dict(self) -> dict:
        return {
            "study": self.study,
            "outcome": self.outcome,
            "synthesized": self.synthesized,
            "already_processed": self.already_processed,
            "skipped": dict(self.skipped),
            "seconds": round(self.seconds, 3),
        }


class TooManyInstances(PacsError):
    """A study larger than ``max_instances``: refused rather than fetched."""


def skip_reason(ref: InstanceRef) -> str | None:
    """Why an instance is not looked at from its QIDO-RS attributes alone (None: look at it)."""
    if (ref.modality or "").upper() not in RADIOGRAPH_MODALITIES:
        return "not-a-radiograph"
    if ref.body_part:
        normalized = ref.body_part.upper().replace(" ", "").replace("_", "")
        if normalized not in KNEE_BODY_PARTS:
            return "not-a-knee"
    return None


class StudyRouter:
    """Routes studies with one loaded ``Pipeline``, one ``PacsClient`` and one started
    ``DecodeSandbox``; ``options`` are the synthesis options (both knees)."""

    def __init__(
        self,
        pipeline: Pipeline,
        client: PacsClient,
        sandbox: DecodeSandbox,
        options: RequestOptions,
        metrics: RouterMetrics | None = None,
        max_instances: int = MAX_STUDY_INSTANCES_DEFAULT,
    ) -> None:
        self.pipeline = pipeline
        self.client = client
        self.sandbox = sandbox
        self.options = options
        self.metrics = metrics
        self.max_instances = max_instances

    def route(self, study_uid: str) -> StudyReport:
        """Route one study; raises ``PacsError`` (``PacsUnreachable`` when worth retrying) or
        any error of the pipeline itself. Skipped images are counted, not raised."""
        started = time.perf_counter()
        report = StudyReport(study=study_ref(study_uid))
        try:
            refs = self.client.instances(study_uid)
            if len(refs) > self.max_instances:
                raise TooManyInstances(
                    f"the study has {len(refs)} instances, more than the {self.max_instances} "
                    "allowed (MRIS_PACS_MAX_INSTANCES)"
                )
            for ref in refs:
                outcome = self._instance(ref, report)
                self._count("instances", outcome)
        except Exception:
            self._count("studies", "failed")
            raise
        report.seconds = time.perf_counter() - started
        self._count("studies", report.outcome)
        if self.metrics is not None:
            self.metrics.study_seconds.observe(report.seconds)
        log.info("study routed: %s", report.summary(), extra=report.to_dict())
        return report

    def _instance(self, ref: InstanceRef, report: StudyReport) -> str:
        reason = skip_reason(ref)
        if reason is None:
            uids = ResultUids.derived(ref.sop_instance_uid, self.pipeline.versions)
            if self.client.has_instance(ref.study_uid, uids.sr_instance) and (
                self.client.has_instance(ref.study_uid, uids.sc_instance)
            ):
                report.already_processed += 1
                return "already_processed"
            reason = self._synthesize(ref, uids)
            if reason is None:
                report.synthesized += 1
                return "synthesized"
        report.skipped[reason] += 1
        if self.metrics is not None:
            self.metrics.skipped.labels(reason=reason).inc()
        return "skipped"

    def _synthesize(self, ref: InstanceRef, uids: ResultUids) -> str | None:
        """Fetch, decode (sandboxed), synthesize and store one radiograph; a skip reason when it
        is not a usable bilateral knee radiograph."""
        data = self.client.retrieve(ref)
        try:
            radiograph = self.sandbox.read(data, self.options.spacing_mm, self.pipeline.limits)
        except NoUsableSpacing:
            return "no-spacing"
        except (UnreadableDicom, UnsupportedDicom, ImageTooLarge, DecodeTimeout):
            return "unreadable"
        try:
            prepared = self.pipeline.prepare(radiograph, self.options)
        except KneeNotFound:
            return "knees-not-found"
        hits = self.pipeline.search(prepared.rois, self.options.k)
        results = self.pipeline.assemble(
            prepared, hits, self.options.k, True, self.options.nan_rule
        )
        sc, sr = results_to_dicom(
            results,
            prepared.source,
            versions=self.pipeline.versions,
            k=self.options.k,
            uids=uids,
            coverage=self.pipeline.coverage,
        )
        self.client.store(ref.study_uid, [sc, sr])
        return None

    def _count(self, metric: str, outcome: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, metric).labels(outcome=outcome).inc()
