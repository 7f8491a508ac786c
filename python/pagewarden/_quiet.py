"""Threads of pagewarden's own that never take the signals a process is stopped or steered with.

The kernel hands a signal sent to the process to any one thread that does not block it. Python
runs signal handlers only in the main thread, and a main thread asleep in ``select()`` is not
woken when another thread took the signal: Ctrl-C or SIGTERM could go unanswered. So
pagewarden's threads (Python ones here, native ones in ``sys::spawning_quietly``) start with
these signals blocked, and they always reach the program's own threads.
"""

from __future__ import annotations

import signal
import threading

PROCESS_SIGNALS = frozenset(
    {
        signal.SIGINT,
        signal.SIGTERM,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGALRM,
        signal.SIGCHLD,
        signal.SIGWINCH,
    }
)


def start_quietly(thread: threading.Thread) -> None:
    """Starts ``thread`` with :data:`PROCESS_SIGNALS` blocked in it (it inherits the mask the
    caller holds for the moment it takes to start it; a signal that arrives meanwhile waits
    and is delivered when the caller's mask is restored)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
