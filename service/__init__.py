"""The MRIS HTTP service (FastAPI): thin routes over mris.pipeline; settings from MRIS_*
variables."""
