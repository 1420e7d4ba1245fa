"""The ``mris`` command line. Each concern registers its own commands from its own module
(``COMMAND_MODULES``); heavy imports (torch, onnxruntime, faiss) happen inside the commands so
``mris --help`` stays fast."""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console
from rich.markup import escape

from mris.errors import MrisError

app = typer.Typer(
    name="mris",
    help="MRIS: synthesize MR cartilage thickness maps from knee radiographs by retrieval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """MRIS: synthesize MR cartilage thickness maps from knee radiographs by retrieval."""

# Each module exposes ``register(app: typer.Typer) -> None``.
COMMAND_MODULES = [
    "mris.commands",
    "mris.ingest_commands",
    "mris.cohort.commands",
    "mris.index.commands",
    "mris.training.commands",
    "mris.service.commands",
    "mris.evaluation.commands",
]


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register()


def main() -> None:
    """Console-script entry point: typed errors become one line and a non-zero exit."""
    try:
        app()
    except MrisError as exc:
        err_console.print(f"[bold red]error:[/] {escape(exc.detail)}")
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except (FileExistsError, PermissionError) as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
