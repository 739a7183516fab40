"""Ctrl-C (SIGINT) in a JAX program: held back over critical sections, and a clean end.

Python turns SIGINT into a ``KeyboardInterrupt`` raised wherever the main thread happens to be.
Three places made that unsafe here (issue 17):

* inside an orbax save, whose background threads and tensorstore writes outlive the exception:
  they printed tracebacks and could recreate the temporary directory the cleanup had removed;
* inside a callback that swallows it (JAX's garbage-collection hook): the run went on to exit 0;
* in interpreter teardown, with XLA's threads still running: a segfault (exit 139).

:func:`deferred` holds an interrupt back until a critical section (a checkpoint chunk written, a
commit) is over and raises it there; a second Ctrl-C inside the section raises at once. For a
process the CLI owns, :func:`own` sends a swallowed interrupt again a moment later (when the
main thread is back in ordinary code) and counts every SIGINT (:func:`received`), and
:func:`end` finishes the process with ``os._exit``: stdio flushed, no teardown left to race
those threads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)
RESEND_S = 0.05   # a swallowed interrupt is sent again after this long

_received = 0      # SIGINTs seen since own()
_message = ""      # what own() prints when a late SIGINT ends the process


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _counting(signum, frame):
    """The owned process's handler: count the signal, then interrupt as Python's own does."""
    global _received
    _received += 1
    raise KeyboardInterrupt


def _late(signum, frame):
    """The owned process's handler once its work is reported: end it now, status 130."""
    print(_message, file=sys.stderr)
    _exit(INTERRUPTED)


def _resend_swallowed(info, previous=sys.unraisablehook):
    """``sys.unraisablehook`` of the owned process: a ``KeyboardInterrupt`` that Python could
    not raise (it landed in a garbage-collection callback or a ``__del__``, and JAX's runs at
    every collection) is not printed but sent again, to land in ordinary code."""
    if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
        threading.Timer(RESEND_S, os.kill, (os.getpid(), signal.SIGINT)).start()
        return
    previous(info)


def own(message: str) -> None:
    """Take SIGINT over for a process the CLI owns (main thread only): every signal is counted
    and raises ``KeyboardInterrupt`` (again if swallowed); ``message`` is printed if one lands
    after :func:`end`."""
    global _received, _message
    _received, _message = 0, message
    sys.unraisablehook = _resend_swallowed
    signal.signal(signal.SIGINT, _counting)


def received() -> bool:
    """Whether a SIGINT reached the owned process (even one whose exception was swallowed)."""
    return _received > 0


def end(code: int) -> int:
    """Finish the owned process's run with status ``code``: stdio flushed; an interrupted run
    ends here with ``os._exit`` (no teardown); otherwise a SIGINT during teardown ends it at
    once with status 130 instead of interrupting the teardown. Returns ``code``."""
    if code == INTERRUPTED:
        _exit(code)
    _flush()
    signal.signal(signal.SIGINT, _late)
    return code


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more can reach it
            pass


def _exit(code: int):
    _flush()
    os._exit(code)


def _deliver(handler, signum: int) -> None:
    """Run the SIGINT ``handler`` that a :func:`deferred` section held back."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT back for the ``with`` body and deliver it after (to the handler that was in
    place: ``KeyboardInterrupt`` by default); a second SIGINT inside is delivered at once.
    Outside the main thread, or under a handler Python did not install, a no-op."""
    previous = signal.getsignal(signal.SIGINT) if _main_thread() else None
    if previous is None:
        yield
        return
    pending = []

    def hold(signum, frame):
        pending.append(signum)
        if len(pending) > 1:  # asked twice: stop now
            signal.signal(signal.SIGINT, previous)
            _deliver(previous, signum)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if len(pending) == 1:
            _deliver(previous, pending[0])
