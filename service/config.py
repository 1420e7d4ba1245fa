"""Service settings: one object, every option from the environment (prefix ``MRIS_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from mris.options import DEFAULT_K, MAX_K
from mris.sandbox import DEFAULT_MEMORY_MB, DEFAULT_TIMEOUT_S


class Settings(BaseSettings):
    """Every field is read from ``MRIS_<NAME>`` (e.g. ``MRIS_MODEL_DIR``); see the README."""

    model_config = SettingsConfigDict(env_prefix="MRIS_", extra="ignore")

    model_dir: Path = Field(Path("mris-demo/model"), description="Model bundle directory.")
    index_root: Path = Field(
        Path("mris-demo/index"), description="Index root; the bundle `current` points to is served."
    )
    variant: Literal["separate", "combined"] = Field(
        "separate", description="Which encoders and index to serve (MRIS-S by default)."
    )
    host: str = "127.0.0.1"
    port: int = 8000
    api_token: SecretStr | None = Field(
        None, description="Bearer token required on every route but /healthz and /readyz."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    default_k: int = Field(DEFAULT_K, ge=1, le=MAX_K, description="k when a request gives none.")
    max_upload_mb: float = Field(64.0, gt=0, description="Larger request bodies get 413.")
    max_batch: int = Field(16, ge=1, description="Most knee ROIs encoded and searched together.")
    max_wait_ms: float = Field(
        3.0, ge=0, description="Longest a ROI waits for others to batch with."
    )
    max_queue: int = Field(64, ge=1, description="ROIs waiting beyond this get 503 + Retry-After.")
    request_timeout_s: float = Field(30.0, gt=0, description="Per-request limit; past it 503.")
    worker_threads: int = Field(2, ge=1, description="Threads for decoding, ROIs and synthesis.")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads (0 = all cores).")
    max_pixels: int = Field(40_000_000, gt=0, description="Largest rows x columns decoded.")
    decode_workers: int = Field(
        2, ge=1, description="Worker processes that decode DICOM pixel data."
    )
    decode_memory_mb: int = Field(
        DEFAULT_MEMORY_MB, ge=256, description="Address-space cap of each decode worker (MB)."
    )
    decode_timeout_s: float = Field(
        DEFAULT_TIMEOUT_S,
        gt=0,
        description="Longest one decode may run; past it the worker is killed (503).",
    )
    log_level: str = "INFO"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def token(self) -> str | None:
        if self.api_token is None:
            return None
        value = self.api_token.get_secret_value()
        return value or None
