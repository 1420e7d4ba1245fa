"""``mris pacs run | watch | retry`` (registered by ``mris.cli``). Settings come from
``MRIS_PACS_*`` (``mris.pacs.config.PacsSettings``); a flag given overrides its variable."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer


def _settings(**overrides: Any):
    from mris.pacs.config import PacsSettings

    return PacsSettings(**{key: value for key, value in overrides.items() if value is not None})


@contextmanager
def open_router(settings, metrics=None) -> Iterator[Any]:
    """A ``StudyRouter`` with the settings' pipeline, PACS client and a started decode sandbox;
    all closed on exit."""
    from mris.options import SynthesisOptions
    from mris.pacs.client import PacsClient
    from mris.pacs.router import StudyRouter
    from mris.pipeline import Pipeline
    from mris.sandbox import DecodeSandbox
    from mris.service.logging_setup import configure_logging

    configure_logging("INFO")
    options = SynthesisOptions.parse(
        knees="both", k=settings.k, nan_rule=settings.nan_rule
    ).request_options()
    pipeline = Pipeline.load(settings.model_dir, settings.index_root, settings.variant)
    client = PacsClient(settings)
    sandbox = DecodeSandbox(
        workers=settings.decode_workers,
        memory_mb=settings.decode_memory_mb,
        timeout_s=settings.decode_timeout_s,
    ).start()
    try:
        yield StudyRouter(
            pipeline, client, sandbox, options, metrics, max_instances=settings.max_instances
        )
    finally:
        sandbox.close()
        client.close()


def register(app: typer.Typer) -> None:
    pacs_app = typer.Typer(
        help="Synthesize the knee radiographs of PACS studies and store the results back "
        "(DICOMweb; docs/PACS.md).",
        no_args_is_help=True,
    )
    app.add_typer(pacs_app, name="pacs")

    url_option = typer.Option(
        None, "--dicomweb-url", help="DICOMweb root [MRIS_PACS_DICOMWEB_URL]."
    )
    model_option = typer.Option(None, "--model", help="Model bundle [MRIS_PACS_MODEL_DIR].")
    index_option = typer.Option(None, "--index", help="Index root [MRIS_PACS_INDEX_ROOT].")

    @pacs_app.command("run")
    def run(
        study: str = typer.Option(..., "--study", help="Study Instance UID."),
        dicomweb_url: str | None = url_option,
        model: Path | None = model_option,
        index: Path | None = index_option,
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ) -> None:
        """Synthesize every bilateral PA knee radiograph of one study and store its Secondary
        Capture and SR into the study; radiographs already processed with this model and index
        are skipped, as are images that are not knee radiographs (counted)."""
        import json

        settings = _settings(dicomweb_url=dicomweb_url, model_dir=model, index_root=index)
        with open_router(settings) as router:
            report = router.route(study)
        typer.echo(json.dumps(report.to_dict()) if json_out else report.summary())

    @pacs_app.command("watch")
    def watch(
        dicomweb_url: str | None = url_option,
        orthanc_url: str | None = typer.Option(
            None, "--orthanc-url", help="Orthanc REST root [MRIS_PACS_ORTHANC_URL]."
        ),
        model: Path | None = model_option,
        index: Path | None = index_option,
        state_dir: Path | None = typer.Option(
            None, "--state-dir", help="Cursor and dead letters [MRIS_PACS_STATE_DIR]."
        ),
        metrics_port: int | None = typer.Option(
            None, "--metrics-port", help="Serve Prometheus metrics [MRIS_PACS_METRICS_PORT]."
        ),
        once: bool = typer.Option(False, "--once", help="Stop once caught up with the feed."),
        from_start: bool = typer.Option(
            False, "--from-start", help="First start: route every stable study Orthanc lists."
        ),
    ) -> None:
        """Follow Orthanc's change feed and route each new stable study (at least once, never
        twice; failures go to the dead letters). Stops on Ctrl-C / SIGTERM, keeping its place."""
        from mris.pacs.metrics import RouterMetrics
        from mris.pacs.watch import Watcher, WatchState

        settings = _settings(
            dicomweb_url=dicomweb_url,
            orthanc_url=orthanc_url,
            model_dir=model,
            index_root=index,
            state_dir=state_dir,
            metrics_port=metrics_port,
        )
        metrics = RouterMetrics()
        if settings.metrics_port:
            metrics.serve(settings.metrics_port, settings.metrics_host)
        with open_router(settings, metrics) as router:
            state = WatchState(settings.state_dir)
            watcher = Watcher(router, router.client, state, metrics, settings.poll_s, from_start)
            typer.echo(f"watching Orthanc's change feed; state in {settings.state_dir}")
            watcher.run(once=once)
        typer.echo(f"caught up at change {watcher.position}")

    @pacs_app.command("retry")
    def retry(
        dicomweb_url: str | None = url_option,
        model: Path | None = model_option,
        index: Path | None = index_option,
        state_dir: Path | None = typer.Option(
            None, "--state-dir", help="Cursor and dead letters [MRIS_PACS_STATE_DIR]."
        ),
    ) -> None:
        """Route every dead-lettered study again; those that succeed leave the dead letters."""
        from mris.pacs.watch import WatchState, retry_dead_letters

        settings = _settings(
            dicomweb_url=dicomweb_url, model_dir=model, index_root=index, state_dir=state_dir
        )
        state = WatchState(settings.state_dir)
        if not state.dead_letters():
            typer.echo("no dead letters")
            return
        with open_router(settings) as router:
            routed, failing = retry_dead_letters(router, state)
        typer.echo(f"{routed} study(ies) routed, {failing} still failing")
        if failing:
            raise typer.Exit(1)
