"""The ``mris`` command line. Each concern registers its own commands from its own module
(``COMMAND_MODULES``); heavy imports (torch, onnxruntime, faiss) happen inside the commands so
``mris --help`` stays fast.

Signals (``main``): SIGINT (Ctrl-C) and SIGTERM (``kill``, ``docker stop``, a parent ``mris``
passing a signal on, see ``mris.subcommand``) both raise ``KeyboardInterrupt`` in the main thread,
so a SIGTERM ends a command exactly as Ctrl-C does (a training keeps its last checkpoint and says
so; ``--resume`` continues it). The command then prints one line, "interrupted (SIGINT)" or
"interrupted (SIGTERM)", and exits 128 + the signal number: 130 for SIGINT, 143 for SIGTERM (what
a shell reports for a process killed by that signal). Once interrupted, a further SIGTERM is
ignored: with Ctrl-C under ``mris demo`` the child gets the terminal's SIGINT and then its
parent's SIGTERM, and the second must not break the first one's clean-up. A further SIGINT still
raises (a user pressing Ctrl-C again). Signals ignored at start (``nohup``, ``&`` in a
non-interactive shell) stay ignored; a process forked from a command (a pool worker) keeps
Python's own behaviour (SIGINT raises, SIGTERM ends it). ``mris serve`` is the exception to the
exit code: uvicorn takes both signals for a graceful shutdown and then ends normally (exit 0).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import typer
from rich.markup import escape

from mris.errors import MrisError
from mris.progress import make_console

app = typer.Typer(
    name="mris",
    help="MRIS: synthesize MR cartilage thickness maps from knee radiographs by retrieval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = make_console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from mris import __version__

        typer.echo(f"mris {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """MRIS: synthesize MR cartilage thickness maps from knee radiographs by retrieval."""


# Each module exposes ``register(app: typer.Typer) -> None``.
COMMAND_MODULES = [
    "mris.commands",
    "mris.ingest_commands",
    "mris.synthesize_commands",
    "mris.batch.commands",
    "mris.cohort.commands",
    "mris.index.commands",
    "mris.training.commands",
    "mris.service.commands",
    "mris.evaluation.commands",
    "mris.pacs.commands",
]


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register()


_interrupted_by: int | None = None  # the first SIGINT / SIGTERM this process got
_handler_pid = os.getpid()


def _interrupt(signum: int, frame: object) -> None:
    """SIGINT / SIGTERM -> ``KeyboardInterrupt``; a SIGTERM after the first interruption is
    ignored."""
    global _interrupted_by
    if os.getpid() != _handler_pid:  # a forked worker: Python's default behaviour
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _interrupted_by is not None and signum != signal.SIGINT:
        return
    if _interrupted_by is None:
        _interrupted_by = signum
    raise KeyboardInterrupt


def _install_interrupt_handlers() -> None:
    global _handler_pid
    _handler_pid = os.getpid()
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _interrupt)


def _exit_interrupted() -> None:
    signum = _interrupted_by or signal.SIGINT
    err_console.print(f"[yellow]interrupted ({signal.Signals(signum).name})[/]")
    sys.exit(128 + signum)


def main() -> None:
    """Console-script entry point: typed errors become one line and a non-zero exit; SIGINT and
    SIGTERM become one line "interrupted (...)" and exit 130 / 143 (module docstring)."""
    _install_interrupt_handlers()
    try:
        app()
    except MrisError as exc:
        err_console.print(f"[bold red]error:[/] {escape(exc.detail)}")
        sys.exit(2)
    except KeyboardInterrupt:
        _exit_interrupted()
    except SystemExit as exc:
        # typer ends a KeyboardInterrupt as a silent exit 130, whichever signal raised it
        if _interrupted_by is not None and exc.code not in (0, None):
            _exit_interrupted()
        raise
    except (FileExistsError, PermissionError) as exc:
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
        sys.exit(2)
    except Exception:
        # A KeyboardInterrupt raised inside C code (an extension module's import, say) can come
        # out as another exception: after a signal, that is the interruption, not a bug.
        if _interrupted_by is not None:
            _exit_interrupted()
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
