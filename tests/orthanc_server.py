"""A real Orthanc PACS for the tests: Debian's ``orthanc`` with its DICOMweb plugin
(``orthanc-dicomweb``), a temporary storage folder, a free port, a random password.

Debian's Orthanc (1.10) has no option for the address it listens on: it binds every interface.
So the test server refuses every client but this machine (``RemoteAccessAllowed: false``: any
other client gets 403 before its credentials are read), asks for a password made per run, and
opens no DICOM port (``DicomServerEnabled: false``)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import requests
from conftest import missing_dependency
from serve_process import free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER = "mris-test"


def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here (None: it can)."""
    if not (shutil.which("Orthanc") or os.access(ORTHANC, os.X_OK)):
        return f"{ORTHANC} is missing (apt-get install orthanc orthanc-dicomweb)"
    if not os.path.exists(DICOMWEB_PLUGIN):
        return f"{DICOMWEB_PLUGIN} is missing (apt-get install orthanc-dicomweb)"
    return None


def require_orthanc() -> None:
    """Skip without Orthanc on a laptop; in CI (CI=true) a missing Orthanc fails the run."""
    missing = orthanc_missing()
    if missing is not None:
        missing_dependency(f"a real PACS: {missing}")


class OrthancServer:
    def __init__(self, root: Path, stable_age_s: int = 1) -> None:
        self.root = Path(root)
        self.port = free_port()
        self.password = secrets.token_urlsafe(16)
        self.process: subprocess.Popen | None = None
        self.log_path = self.root / "orthanc.log"
        self.config = {
            "Name": "MRIS-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "storage"),
            "HttpPort": self.port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: self.password},
            "DicomServerEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "StableAge": stable_age_s,
            "HttpTimeout": 30,
        }

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return USER, self.password

    def environment(self) -> dict[str, str]:
        """The ``MRIS_PACS_*`` variables that point ``mris pacs`` at this server."""
        return {
            "MRIS_PACS_DICOMWEB_URL": self.dicomweb_url,
            "MRIS_PACS_USERNAME": USER,
            "MRIS_PACS_PASSWORD": self.password,
        }

    def start(self, timeout_s: float = 30.0) -> OrthancServer:
        self.root.mkdir(parents=True, exist_ok=True)
        config_path = self.root / "orthanc.json"
        config_path.write_text(json.dumps(self.config), encoding="utf-8")
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the process's life
        self.process = subprocess.Popen(
            [shutil.which("Orthanc") or ORTHANC, str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {self.log_tail()}")
            try:
                if self.get("/system").get("Version"):
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s:g} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]

    def get(self, path: str, **params) -> object:
        response = requests.get(f"{self.url}{path}", params=params, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json()

    def upload(self, data: bytes) -> dict:
        """Store one DICOM file (Orthanc's REST ``POST /instances``)."""
        response = requests.post(f"{self.url}/instances", data=data, auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json()

    def study_instances(self, study_uid: str) -> list[dict]:
        """Every instance of a study with its tags (Orthanc's REST, not DICOMweb)."""
        found = requests.post(
            f"{self.url}/tools/find",
            json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
            auth=self.auth,
            timeout=30,
        )
        found.raise_for_status()
        return found.json()

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
