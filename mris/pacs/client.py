"""The PACS's side: DICOMweb (dicomweb-client: QIDO-RS, WADO-RS, STOW-RS) and Orthanc's REST
change feed, each call a method, each failure a typed error.

Errors never carry a URL (a DICOMweb URL holds Study, Series and SOP Instance UIDs) or a
response body: ``PacsUnreachable`` (no connection, a timeout, HTTP 5xx, 429: worth retrying
later) and ``PacsError`` (any other refusal: wrong credentials, a store the PACS rejected),
named by the operation and the HTTP status.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mris.errors import MrisError
from mris.pacs.config import PacsSettings

# Both log URLs and UIDs (dicomweb-client at INFO, urllib3 at DEBUG): held at WARNING.
QUIET_LOGGERS = ("dicomweb_client", "urllib3")

# DICOM JSON tags (PS3.18 F.2) of the attributes the router reads from QIDO-RS.
_TAGS = {
    "StudyInstanceUID": "0020000D",
    "SeriesInstanceUID": "0020000E",
    "SOPInstanceUID": "00080018",
    "SOPClassUID": "00080016",
    "Modality": "00080060",
    "BodyPartExamined": "00180015",
}
INSTANCE_FIELDS = ("Modality", "BodyPartExamined", "SOPClassUID")
_RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
RETRY_ATTEMPTS = 3  # DICOMweb calls: attempts on a failure or a 408/429/503/504 answer...
RETRY_WAIT_MS = 500  # ...waiting 1 s, then 2 s (exponential, this multiplier)


class PacsError(MrisError):
    """The PACS refused an operation (named, with its HTTP status: ``status``, 0 for none)."""

    title = "PACS error"

    def __init__(self, detail: str, status: int = 0) -> None:
        super().__init__(detail)
        self.status = status


class PacsUnreachable(PacsError):
    """The PACS could not be reached or was overloaded; trying again later may succeed."""

    title = "PACS unreachable"


def quiet_third_party_loggers() -> None:
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)


@contextmanager
def _operation(name: str) -> Iterator[None]:
    """Turn what requests raises during ``name`` into a typed error without a URL."""
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        kind = PacsUnreachable if status in _RETRY_STATUSES else PacsError
        raise kind(f"{name}: the PACS answered HTTP {status}", status) from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise PacsUnreachable(f"{name}: the PACS is unreachable ({type(exc).__name__})") from None
    except requests.RequestException as exc:
        raise PacsError(f"{name}: {type(exc).__name__}") from None


@dataclass(frozen=True, repr=False)
class InstanceRef:
    """One instance of a study as QIDO-RS lists it (UIDs: never logged)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str | None
    modality: str | None
    body_part: str | None

    def __repr__(self) -> str:
        return f"InstanceRef(modality={self.modality!r}, body_part={self.body_part!r})"


def _value(item: dict[str, Any], keyword: str) -> str | None:
    values = item.get(_TAGS[keyword], {}).get("Value") or []
    return str(values[0]).strip() if values and values[0] is not None else None


@dataclass(frozen=True)
class Change:
    """One entry of Orthanc's change feed (``GET /changes``)."""

    seq: int
    change_type: str
    resource_type: str
    orthanc_id: str


class PacsClient:
    """DICOMweb calls against ``settings.dicomweb_url`` and Orthanc REST calls against
    ``settings.orthanc_root``, one HTTP session (basic auth when a user name is set)."""

    def __init__(self, settings: PacsSettings) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        quiet_third_party_loggers()
        self.settings = settings
        self.session = requests.Session()
        if settings.credentials is not None:
            self.session.auth = settings.credentials
        self.dicomweb = DICOMwebClient(
            settings.dicomweb_url.rstrip("/"), session=self.session, timeout=settings.timeout_s
        )
        # dicomweb-client retries every failure 5 times with exponential waits (about 30 s for
        # a PACS that is down); a short retry here, the watcher's own backoff above it.
        self.dicomweb.set_http_retry_params(
            retry=True, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MS
        )

    def close(self) -> None:
        self.session.close()

    # ------------------------------------------------------------------ DICOMweb
    def instances(self, study_uid: str) -> list[InstanceRef]:
        """Every instance of the study (QIDO-RS), with the attributes the router reads."""
        with _operation("listing the study's instances (QIDO-RS)"):
            found = self.dicomweb.search_for_instances(
                study_instance_uid=study_uid, fields=list(INSTANCE_FIELDS), get_remaining=True
            )
        refs = []
        for item in found:
            series, instance = _value(item, "SeriesInstanceUID"), _value(item, "SOPInstanceUID")
            if series is None or instance is None:
                continue
            refs.append(
                InstanceRef(
                    study_uid=study_uid,
                    series_uid=series,
                    sop_instance_uid=instance,
                    sop_class_uid=_value(item, "SOPClassUID"),
                    modality=_value(item, "Modality"),
                    body_part=_value(item, "BodyPartExamined"),
                )
            )
        return refs

    def has_instance(self, study_uid: str, sop_instance_uid: str) -> bool:
        """Whether the study holds an instance with this SOP Instance UID (QIDO-RS)."""
        with _operation("looking for a stored result (QIDO-RS)"):
            found = self.dicomweb.search_for_instances(
                study_instance_uid=study_uid, search_filters={"SOPInstanceUID": sop_instance_uid}
            )
        return any(_value(item, "SOPInstanceUID") == sop_instance_uid for item in found)

    def retrieve(self, ref: InstanceRef) -> bytes:
        """The instance as a DICOM file (WADO-RS, in the transfer syntax it is stored in: no
        transcoding by the PACS)."""
        from pydicom.filewriter import dcmwrite

        with _operation("fetching an instance (WADO-RS)"):
            dataset = self.dicomweb.retrieve_instance(
                ref.study_uid,
                ref.series_uid,
                ref.sop_instance_uid,
                media_types=(("application/dicom", "*"),),
            )
        buffer = io.BytesIO()
        dcmwrite(buffer, dataset, enforce_file_format=True)
        return buffer.getvalue()

    def store(self, study_uid: str, datasets: Sequence[Any]) -> None:
        """Store the datasets into the study (STOW-RS); a partial store is a ``PacsError``."""
        with _operation("storing the results (STOW-RS)"):
            response = self.dicomweb.store_instances(list(datasets), study_instance_uid=study_uid)
        failed = getattr(response, "FailedSOPSequence", None) if response is not None else None
        if failed:
            raise PacsError(f"storing the results (STOW-RS): the PACS refused {len(failed)}")

    # ------------------------------------------------------------------ Orthanc REST
    def _get_json(self, operation: str, path: str, params: dict | None = None) -> Any:
        with _operation(operation):
            response = self.session.get(
                f"{self.settings.orthanc_root}{path}",
                params=params,
                timeout=self.settings.timeout_s,
            )
            response.raise_for_status()
            return response.json()

    def last_change(self) -> int:
        """The sequence number of Orthanc's latest change (0 for an empty feed)."""
        answer = self._get_json("reading the change feed's end", "/changes", {"last": ""})
        return int(answer.get("Last", 0))

    def changes(self, since: int, limit: int = 100) -> tuple[list[Change], int, bool]:
        """The changes after ``since``: (changes, the last sequence number read, done)."""
        answer = self._get_json(
            "reading the change feed", "/changes", {"since": since, "limit": limit}
        )
        changes = [
            Change(
                seq=int(item["Seq"]),
                change_type=str(item.get("ChangeType", "")),
                resource_type=str(item.get("ResourceType", "")),
                orthanc_id=str(item.get("ID", "")),
            )
            for item in answer.get("Changes", [])
        ]
        return changes, int(answer.get("Last", since)), bool(answer.get("Done", True))

    def study_uid(self, orthanc_id: str) -> str | None:
        """The Study Instance UID of an Orthanc study, None when it is gone (deleted)."""
        try:
            answer = self._get_json("reading a study", f"/studies/{orthanc_id}")
        except PacsError as exc:
            if exc.status != 404:
                raise
            return None
        return (answer.get("MainDicomTags") or {}).get("StudyInstanceUID")
