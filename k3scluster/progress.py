"""Long commands with a progress line at least every ``every`` seconds.

A step that runs for minutes (an ISO build, an install) must show that it is alive through
both runners: pulumi-command shows all output, the python runner only stderr lines that start
with ``k3scluster: `` (``tasks.PROGRESS_PREFIX``). The command's own output goes to stderr.
``heartbeat`` does the same around a block that runs a command whose output is its own
(colmena's deploy: its stdout is the step's).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

PROGRESS_EVERY = 30.0


def run_with_progress(
    argv: Sequence[str],
    what: str,
    say: Callable[[str], None],
    *,
    every: float | None = None,
) -> int:
    """Run ``argv`` (stdin closed, its stdout and stderr to this stderr); ``say`` a line
    "<what>: still running after N s" every ``every`` seconds (``PROGRESS_EVERY``); its exit
    status."""
    every = PROGRESS_EVERY if every is None else every
    began = time.monotonic()
    proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=sys.stderr)
    while True:
        try:
            return proc.wait(timeout=every)
        except subprocess.TimeoutExpired:
            say(f"{what}: still running after {time.monotonic() - began:.0f} s")


@contextlib.contextmanager
def heartbeat(
    what: str, say: Callable[[str], None], *, every: float | None = None
) -> Iterator[None]:
    """While the block runs (a command whose output is its own, e.g. colmena's), a thread
    says "<what> still running (N s)" every ``every`` seconds (``PROGRESS_EVERY``)."""
    every = PROGRESS_EVERY if every is None else every
    began = time.monotonic()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            say(f"{what} still running ({time.monotonic() - began:.0f} s)")

    thread = threading.Thread(target=beat, name=f"heartbeat: {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
