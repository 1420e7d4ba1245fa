"""``PacsSettings``: where the PACS is, how to reach it, what to run against it; every option
from the environment (prefix ``MRIS_PACS_``, e.g. ``MRIS_PACS_DICOMWEB_URL``) and overridable by
the ``mris pacs`` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from mris.options import DEFAULT_K, MAX_K
from mris.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S
from mris.synthesis import DEFAULT_NAN_RULE, NanRule


class PacsSettings(BaseSettings):
    """Every field is read from ``MRIS_PACS_<NAME>``; see docs/PACS.md."""

    model_config = SettingsConfigDict(env_prefix="MRIS_PACS_", extra="ignore")

    dicomweb_url: str = Field(
        "http://127.0.0.1:8042/dicom-web",
        description="DICOMweb root of the PACS (QIDO-RS, WADO-RS and STOW-RS below it).",
    )
    orthanc_url: str | None = Field(
        None,
        description="Orthanc's REST root, for `watch`'s change feed (default: the DICOMweb URL "
        "without its last path segment, e.g. http://127.0.0.1:8042).",
    )
    username: str | None = Field(None, description="HTTP basic user name (none: no auth).")
    password: SecretStr | None = Field(None, description="HTTP basic password.")
    timeout_s: float = Field(60.0, gt=0, description="Per HTTP request to the PACS.")
    model_dir: Path = Field(Path("mris-demo/model"), description="Model bundle directory.")
    index_root: Path = Field(Path("mris-demo/index"), description="Index root (its current).")
    variant: Literal["separate", "combined"] = "separate"
    k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="Neighbours per knee and region.")
    nan_rule: NanRule = DEFAULT_NAN_RULE
    state_dir: Path = Field(
        Path("mris-pacs-state"),
        description="The watcher's cursor and dead letters (holds Study Instance UIDs).",
    )
    poll_s: float = Field(2.0, gt=0, description="Seconds between polls of an idle change feed.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus port (0: none).")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics listen on.")
    decode_workers: int = Field(1, ge=1, description="Decode worker processes.")
    decode_memory_mb: int = Field(DEFAULT_MEMORY_MB, ge=256)
    decode_timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0)
    max_instances: int = Field(
        200, ge=1, description="A study with more instances than this is refused (dead letter)."
    )

    @property
    def orthanc_root(self) -> str:
        if self.orthanc_url:
            return self.orthanc_url.rstrip("/")
        return self.dicomweb_url.rstrip("/").rsplit("/", 1)[0]

    @property
    def credentials(self) -> tuple[str, str] | None:
        if not self.username:
            return None
        password = self.password.get_secret_value() if self.password is not None else ""
        return self.username, password
