"""Run another ``mris`` command as a child process (its own progress bars and summary, exactly
what a user typing it sees); used by ``mris demo`` and ``mris evaluate`` for their stages.

Signals: a child is never left running. While the child runs, SIGINT, SIGTERM and SIGHUP to
this process (those not ignored, e.g. SIGHUP under ``nohup``) are caught and passed on to the
child as ONE SIGTERM; this process waits for the child to end, at most ``MRIS_STOP_GRACE_S``
seconds (default 20) after the signal, then kills it (SIGKILL). Then it puts its previous
handlers back and sends the signal to itself again, so it ends as it would have without a
child: under ``mris`` (``mris.cli.main``) one line "interrupted (SIGTERM)" and exit 128 + the
signal number; a bare interpreter dies of the signal.

Why always SIGTERM, and only once: the child stays in our process group, so Ctrl-C in a
terminal (SIGINT to the whole foreground group) and Ctrl-Z reach it directly, as in any shell
pipeline. Passing SIGINT on as well would make it arrive twice (a second KeyboardInterrupt while
the first one unwinds, or uvicorn's "second Ctrl-C: exit without the graceful shutdown"). A
SIGTERM on top of the terminal's SIGINT is harmless: ``mris.cli.main`` ignores SIGTERM once it is
interrupted, and uvicorn treats it as the same graceful shutdown. A signal sent to us alone
(``kill PID``, ``docker stop``) reaches the child only through this. SIGHUP is passed on as
SIGTERM too, so ``mris serve`` under ``mris demo --serve`` stops instead of reloading its index.
A second signal to this process is not passed on again (the child is already stopping; the
terminal's Ctrl-C reaches it directly).

Nested runs (``mris demo`` -> ``mris evaluate`` -> ``mris train``): each child's grace is 5 s
shorter than its parent's (``MRIS_STOP_GRACE_S`` in its environment, at least 1 s), so an inner run
kills its own child before the outer one kills the inner run, and no grandchild is orphaned.

Signal handlers can only be set in the main thread; elsewhere the child is just waited for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from mris.errors import MrisError
from mris.progress import console

GRACE_ENV = "MRIS_STOP_GRACE_S"
DEFAULT_GRACE_S = 20.0
NESTED_GRACE_STEP_S = 5.0
FORWARDED_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)
_POLL_S = 0.25  # how often the wait looks at the grace deadline


def stop_grace_s() -> float:
    """Seconds a stopped child may take before it is killed (``MRIS_STOP_GRACE_S``, >= 1)."""
    try:
        return max(1.0, float(os.environ.get(GRACE_ENV) or DEFAULT_GRACE_S))
    except ValueError:
        return DEFAULT_GRACE_S


class _Forwarder:
    """The handler installed while a child runs: remembers the first signal, starts the grace
    period and sends the child one SIGTERM."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.child: subprocess.Popen | None = None
        self.signum: int | None = None
        self.deadline: float | None = None
        self._forwarded = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            self.deadline = time.monotonic() + self.grace_s
        self.forward()

    def forward(self) -> None:
        if self.signum is not None and self.child is not None and not self._forwarded:
            self._forwarded = True
            self.child.send_signal(signal.SIGTERM)  # a no-op once the child has been reaped


def _wait_forwarding(
    command: list[str], env: dict[str, str], forwarder: _Forwarder, name: str
) -> int:
    """Run ``command`` with ``forwarder`` handling the signals; returns its exit code. The signal
    that came meanwhile is ``forwarder.signum`` (read it after this returns: one that lands while
    the handlers are put back is still recorded)."""
    if threading.current_thread() is not threading.main_thread():
        with subprocess.Popen(command, env=env) as child:
            return child.wait()
    previous = {}
    for signum in FORWARDED_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN and handler is not None:  # ignored stays ignored (nohup)
            previous[signum] = signal.signal(signum, forwarder)
    child = None
    try:
        child = subprocess.Popen(command, env=env)
        forwarder.child = child
        forwarder.forward()  # a signal that came while the child was starting
        while True:
            try:
                return child.wait(timeout=_POLL_S)
            except subprocess.TimeoutExpired:
                if forwarder.deadline is not None and time.monotonic() >= forwarder.deadline:
                    console.print(
                        f"[yellow]'mris {name}' did not stop within {forwarder.grace_s:g} s: "
                        "killing it[/]"
                    )
                    child.kill()
                    forwarder.deadline = None
    finally:
        if (
            child is not None and child.poll() is None
        ):  # an error of ours: still never leave it running
            child.kill()
            child.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def run_mris(*args: str) -> None:
    """``mris ARGS...`` with this interpreter; a failure raises ``MrisError`` naming the command
    (the child has already printed its own one-line error). A signal while it runs stops the
    child and then this process (module docstring)."""
    command = [sys.executable, "-m", "mris.cli", *args]
    console.print(f"[dim]$ mris {' '.join(args)}[/]")
    grace_s = stop_grace_s()
    env = {**os.environ, GRACE_ENV: f"{max(1.0, grace_s - NESTED_GRACE_STEP_S):g}"}
    forwarder = _Forwarder(grace_s)
    returncode = _wait_forwarding(command, env, forwarder, args[0])
    if forwarder.signum is not None:
        signal.raise_signal(
            forwarder.signum
        )  # the previous handler decides: KeyboardInterrupt, or death by the signal
    if returncode != 0:
        how = (
            f"was killed by {_signal_name(-returncode)}"
            if returncode < 0
            else f"failed with exit code {returncode}"
        )
        raise MrisError(f"'mris {args[0]}' {how}")
