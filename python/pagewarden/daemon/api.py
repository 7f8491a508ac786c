"""The daemon's HTTP API: HTTP/1.1 with JSON bodies on a Unix socket, like Firecracker's own (drive
it with ``curl --unix-socket``). The HTTP parsing is the standard library's ``http.server``;
requests are served one at a time on one thread (each is a few milliseconds of work for the
session thread), so the API adds one thread whatever the number of sessions.

| method and path | what it does | answers |
|---|---|---|
| ``PUT /sessions/{name}`` | start a session (body: ``SessionSpec``) | 201, 400, 409, 503 |
| ``GET /sessions`` | every session | 200 |
| ``GET /sessions/{name}`` | one session: state, peer, stats | 200, 404 |
| ``DELETE /sessions/{name}`` | end it cleanly and forget it | 204, 404 |
| ``GET /healthz`` | ``{"status": "ok" or "draining", ...}`` | 200 |
| ``PUT /drain`` | refuse new sessions from now on | 202 |

Errors are ``{"error": "..."}`` with a message that says what was wrong.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import stat
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pagewarden as pw
from pagewarden._quiet import start_quietly
from pagewarden.daemon.sessions import SessionError, SessionManager

log = logging.getLogger("pagewarden.daemon")

#: The largest request body accepted.
MAX_BODY = 1 << 20


def native_threads() -> int:
    """Threads of this process, native ones included (``/proc/self/task``)."""
    return len(os.listdir("/proc/self/task"))


class _Handler(BaseHTTPRequestHandler):
    server: ApiServer
    protocol_version = "HTTP/1.1"
    server_version = "pagewarden"

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def _send(self, status: int, body: Any = None) -> None:
        data = b"" if body is None else (json.dumps(body, indent=1) + "\n").encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message})

    def _route(self) -> tuple[str, str | None]:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        parts = path.strip("/").split("/")
        if parts == ["sessions"]:
            return "sessions", None
        if len(parts) == 2 and parts[0] == "sessions" and parts[1]:
            return "session", parts[1]
        return path, None

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None:
            raise SessionError(411, "a body needs Content-Length")
        try:
            n = int(length)
        except ValueError:
            raise SessionError(400, f"Content-Length {length!r} is not a number") from None
        if not 0 <= n <= MAX_BODY:
            raise SessionError(413, f"the body is larger than {MAX_BODY} bytes")
        raw = self.rfile.read(n)
        try:
            return json.loads(raw or b"null")
        except ValueError as e:
            raise SessionError(400, f"the body is not JSON: {e}") from None

    def _dispatch(self, method: str) -> None:
        manager = self.server.manager
        what, name = self._route()
        try:
            if method == "GET" and what == "/healthz":
                self._send(
                    200,
                    {
                        "status": "draining" if manager.draining else "ok",
                        "sessions_active": manager.active(),
                        "threads": native_threads(),
                    },
                )
            elif method == "GET" and what == "sessions":
                self._send(200, manager.list())
            elif what == "session" and name is not None:
                if method == "GET":
                    self._send(200, manager.get(name))
                elif method == "PUT":
                    self._send(201, manager.create(name, self._body()))
                elif method == "DELETE":
                    manager.delete(name)
                    self._send(204)
                else:
                    self._error(405, f"{method} is not allowed on /sessions/{name}")
            elif method == "PUT" and what == "/drain":
                self._send(202, {"status": "draining", "sessions_active": manager.drain()})
            else:
                self._error(404, f"no {method} {what}: see docs/daemon.md for the API")
        except SessionError as e:
            self._error(e.status, str(e.strerror or e))
        except pw.PagewardenError as e:
            self._error(500, str(e.strerror or e))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_POST(self) -> None:
        self._dispatch("POST")


class ApiServer(socketserver.UnixStreamServer):
    """The API on a Unix socket (mode 0600 unless ``mode``), served on one thread by
    ``serve_forever``."""

    def __init__(self, path: str | os.PathLike[str], manager: SessionManager, mode: int = 0o600):
        self.manager = manager
        self.path = Path(path)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise pw.ConfigurationError(
                    17, f"{self.path} exists and is not a socket; refusing to replace it"
                )
            self.path.unlink()
        old = os.umask(0o177)
        try:
            super().__init__(str(self.path), _Handler)
        finally:
            os.umask(old)
        os.chmod(self.path, mode)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = super().get_request()
        conn.settimeout(10)  # a client that stalls mid-request holds the API this long at most
        return conn, addr

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def start(self) -> threading.Thread:
        """Serves on a thread of its own ("pagewarden-api"); returns it."""
        thread = threading.Thread(target=self.serve_forever, name="pagewarden-api", daemon=True)
        start_quietly(thread)
        return thread
