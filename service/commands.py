"""``mris serve``: start the API (uvicorn) on a model bundle and an index root."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        model: Path | None = typer.Option(
            None, "--model", help="Model bundle (default: $MRIS_MODEL_DIR)."
        ),
        index_root: Path | None = typer.Option(
            None, "--index-root", help="Index root (default: $MRIS_INDEX_ROOT)."
        ),
        host: str | None = typer.Option(
            None, help="Address to listen on (default: $MRIS_HOST or 127.0.0.1)."
        ),
        port: int | None = typer.Option(None, help="Port (default: $MRIS_PORT or 8000)."),
        variant: str | None = typer.Option(
            None, help="separate (MRIS-S, default) or combined (MRIS-C)."
        ),
    ) -> None:
        """Serve POST /synthesize and /retrieve. Every option also comes from MRIS_* variables."""
        import uvicorn

        from mris.service.app import create_app
        from mris.service.config import Settings

        overrides = {
            key: value
            for key, value in {
                "model_dir": model,
                "index_root": index_root,
                "host": host,
                "port": port,
                "variant": variant,
            }.items()
            if value is not None
        }
        settings = Settings(**overrides)
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level.lower(),
            access_log=False,  # the app logs one JSON line per request
            # then in-flight requests are cancelled (SIGTERM -> exit in seconds)
            timeout_graceful_shutdown=5,
        )
