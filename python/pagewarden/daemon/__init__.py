"""One daemon for every microVM on a host: sessions over an HTTP API, shared threads, metrics.

``SessionManager`` (``pagewarden.daemon.sessions``) serves the Firecracker restores of a host from
one process, one thread and one ``pw.Engine``; a Python service can host it directly. ``api``
puts it behind HTTP/1.1 with JSON on a Unix socket (``pagewarden daemon --api-sock PATH``), as
Firecracker's own API is, and ``metrics`` exports per-session Prometheus series.
"""

from __future__ import annotations

from pagewarden.daemon.sessions import SessionError, SessionManager, SessionSpec

__all__ = ["SessionError", "SessionManager", "SessionSpec"]
