"""``mris pacs watch``: follow Orthanc's change feed and route every new stable study.

Why the change feed (``GET /changes``) and not Orthanc's Python plugin's stable-study callback:
the feed is kept in Orthanc's database, so a change that happens while the watcher is down
(restarted, upgraded, crashed) is still there when it comes back, and the watcher's position in
it is one number it keeps itself. A plugin callback fires once, inside Orthanc's process, and is
lost if its handler is down or fails; it would also put our pipeline (onnxruntime, FAISS, the
decoders) inside the PACS's process and need the ``orthanc-python`` plugin on every PACS.

At least once, never twice:

- The cursor (``STATE_DIR/cursor.json``, the last change finished) is saved after each change,
  atomically. A watcher stopped in the middle of a study routes it again when it restarts; the
  router's UID check (``mris.pacs.router``) makes that second pass store nothing new.
- Storing our results into a study makes Orthanc announce the study as stable once more; that
  pass finds every radiograph already processed and stores nothing (it ends there).
- A study that fails (a PACS refusal, a pipeline error) is written to the dead-letter file
  (``STATE_DIR/dead-letters.jsonl``: time, Study Instance UID, change number, error type and
  message, model and index versions) and the watcher moves on; ``mris pacs retry`` routes them
  again. A PACS that cannot be reached is not a study's failure: the watcher keeps its place
  and tries again, waiting ``poll_s`` doubling up to ``MAX_BACKOFF_S``.
- First start (no cursor): from the feed's end (studies arriving from now on), or with
  ``--from-start`` from its beginning (every stable study Orthanc still lists).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from mris.errors import MrisError
from mris.fsutil import atomic_write_json, atomic_write_text
from mris.pacs.client import Change, PacsClient, PacsUnreachable
from mris.pacs.metrics import RouterMetrics
from mris.pacs.router import StudyRouter, study_ref

log = logging.getLogger(__name__)

CURSOR_FILE = "cursor.json"
DEAD_LETTER_FILE = "dead-letters.jsonl"
CURSOR_FORMAT = "mris-pacs-cursor/1"
MAX_BACKOFF_S = 60.0
FEED_PAGE = 100


class WatchState:
    """The watcher's state folder: the cursor and the dead letters."""

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def cursor_path(self) -> Path:
        return self.dir / CURSOR_FILE

    @property
    def dead_letter_path(self) -> Path:
        return self.dir / DEAD_LETTER_FILE

    def cursor(self) -> int | None:
        if not self.cursor_path.is_file():
            return None
        data = json.loads(self.cursor_path.read_text(encoding="utf-8"))
        if data.get("format") != CURSOR_FORMAT:
            raise MrisError(f"{self.cursor_path} is not a {CURSOR_FORMAT} cursor")
        return int(data["last_change"])

    def save_cursor(self, last_change: int) -> None:
        atomic_write_json(self.cursor_path, {"format": CURSOR_FORMAT, "last_change": last_change})

    def add_dead_letter(self, record: dict[str, Any]) -> None:
        """Append one record and make it durable before the cursor moves past its change."""
        with open(self.dead_letter_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def dead_letters(self) -> list[dict[str, Any]]:
        if not self.dead_letter_path.is_file():
            return []
        lines = self.dead_letter_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def replace_dead_letters(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
        atomic_write_text(self.dead_letter_path, text)


def dead_letter_record(
    study_uid: str, error: BaseException, versions: dict[str, str], change: int | None
) -> dict[str, Any]:
    """A dead letter: which study, why (the error's type, and its message when it is one of
    ours: those never quote a DICOM value), with what, when."""
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "study_instance_uid": study_uid,
        "study": study_ref(study_uid),
        "change": change,
        "error": type(error).__name__,
        "message": error.detail if isinstance(error, MrisError) else "",
        "versions": versions,
        "attempts": 1,
    }


class Watcher:
    """Routes each new stable study of Orthanc's change feed (module docstring)."""

    def __init__(
        self,
        router: StudyRouter,
        client: PacsClient,
        state: WatchState,
        metrics: RouterMetrics | None = None,
        poll_s: float = 2.0,
        from_start: bool = False,
    ) -> None:
        self.router = router
        self.client = client
        self.state = state
        self.metrics = metrics
        self.poll_s = poll_s
        self.from_start = from_start
        self.position: int | None = None

    def start(self) -> int:
        """The position to read from: the saved cursor, else the feed's end (``from_start``:
        its beginning)."""
        position = self.state.cursor()
        if position is None:
            position = 0 if self.from_start else self.client.last_change()
            self.state.save_cursor(position)
        self.position = position
        if self.metrics is not None:
            self.metrics.feed_position.set(position)
        log.info("watching Orthanc's change feed from change %d", position)
        return position

    def _advance(self, seq: int) -> None:
        if self.position is None or seq > self.position:
            self.position = seq
            self.state.save_cursor(seq)
            if self.metrics is not None:
                self.metrics.feed_position.set(seq)

    def poll(self) -> bool:
        """Read one page of the feed and route its stable studies; True when caught up."""
        if self.position is None:
            self.start()
        changes, last, done = self.client.changes(self.position, FEED_PAGE)
        for change in changes:
            if change.change_type == "StableStudy" and change.resource_type == "Study":
                self._study(change)
            self._advance(change.seq)
        self._advance(last)
        return done

    def _study(self, change: Change) -> None:
        study_uid = self.client.study_uid(change.orthanc_id)  # PacsUnreachable: retried
        if study_uid is None:
            log.info("change %d: the study is gone from the PACS", change.seq)
            return
        try:
            self.router.route(study_uid)
        except PacsUnreachable:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one study is its dead letter
            record = dead_letter_record(study_uid, exc, self.router.pipeline.versions, change.seq)
            self.state.add_dead_letter(record)
            if self.metrics is not None:
                self.metrics.dead_letters.inc()
            log.warning(
                "study %s failed (%s): written to the dead letters",
                record["study"],
                record["error"],
                extra={"study": record["study"], "error": record["error"]},
            )

    def run(self, once: bool = False, stop: threading.Event | None = None) -> None:
        """Poll until ``stop`` is set (or, ``once``, until caught up with the feed). A PACS
        that cannot be reached, at start too, is waited for."""
        stop = stop or threading.Event()
        backoff_s = self.poll_s
        while not stop.is_set():
            try:
                done = self.poll()
            except PacsUnreachable as exc:
                if self.metrics is not None:
                    self.metrics.pacs_unreachable.inc()
                log.warning("%s; trying again in %.0f s", exc.detail, backoff_s)
                stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, MAX_BACKOFF_S)
                continue
            backoff_s = self.poll_s
            if done:
                if once:
                    return
                stop.wait(self.poll_s)


def retry_dead_letters(router: StudyRouter, state: WatchState) -> tuple[int, int]:
    """Route every dead-lettered study again: those that succeed leave the file, the others
    stay with one more attempt. Returns (routed, still failing)."""
    kept: list[dict[str, Any]] = []
    routed = 0
    for record in state.dead_letters():
        try:
            router.route(record["study_instance_uid"])
            routed += 1
        except Exception as exc:  # noqa: BLE001 - it stays a dead letter, with the new reason
            again = dead_letter_record(
                record["study_instance_uid"], exc, router.pipeline.versions, record.get("change")
            )
            again["attempts"] = int(record.get("attempts", 1)) + 1
            kept.append(again)
            log.warning("study %s failed again (%s)", again["study"], again["error"])
    state.replace_dead_letters(kept)
    return routed, len(kept)
