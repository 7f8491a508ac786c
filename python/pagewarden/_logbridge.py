"""Forwards the native core's log records to Python's ``logging`` (logger ``pagewarden``).

One daemon thread, started when pagewarden is imported, waits for records in native code with
the GIL released. The core writes records only for noteworthy happenings (a handler failing, a
page server connection lost or refused), never on the fault path.
"""

from __future__ import annotations

import logging
import threading

from pagewarden import _native
from pagewarden._quiet import start_quietly

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _run() -> None:
    log = logging.getLogger("pagewarden")
    while True:
        records, dropped = _native._log_wait(1.0)
        for level, message in records:
            log.log(level, "%s", message)
        if dropped:
            log.warning("%d native log records were dropped (the queue was full)", dropped)


def start() -> None:
    """Starts the forwarding thread once per process (idempotent)."""
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="pagewarden-log", daemon=True)
            start_quietly(_thread)
