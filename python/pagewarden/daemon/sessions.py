"""The session manager: every microVM of a host served by one process, on one Engine, from one
thread.

A session is one Firecracker restore: a socket that Firecracker's ``mem_backend.backend_path``
names, the memory it serves, its poison and prefetch. ``SessionManager`` runs all of them on one
thread of its own ("pagewarden-sessions"), which waits in one ``select`` on every listening
socket, every handshake in progress, every Firecracker's pidfd and every handler's notification
descriptor, while the faults of every session are resolved on a shared ``pw.Engine`` of a fixed
number of native threads. Threads therefore do not grow with sessions (a page server source,
``source=``, brings the threads of its ``RemoteSource``; a poison journal its writer thread).

Calls (``create``, ``get``, ``delete``, ...) may come from any thread: they are handed to the
session thread and wait for its answer. The HTTP API (``pagewarden.daemon.api``) is one client
of this class; a Python service can be another.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import pagewarden as pw
from pagewarden import poison_tools
from pagewarden._quiet import start_quietly
from pagewarden.firecracker import access_order, session
from pagewarden.firecracker.failstop import PeerGuard
from pagewarden.firecracker.handshake import (
    SocketAccess,
    listen,
    parse_mode,
    parse_owner,
    peer_credentials,
)
from pagewarden.firecracker.layout import (
    DEFAULT_FAMILY,
    FAMILIES,
    GuestLayout,
    pages_holding,
    parse_addresses,
)
from pagewarden.firecracker.serve import (
    PREFETCH_MODES,
    _Common,
    prepare,
    reattach,
    release_signals,
    saved_session,
    take_over,
)

log = logging.getLogger("pagewarden.daemon")
_T = TypeVar("_T")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SessionStateName = Literal["listening", "serving", "exited", "failed"]
#: The session thread gives a connected Firecracker this long to send its handshake (it sends
#: it at once; a peer that stalls holds every other session back at most this long).
HANDSHAKE_TIMEOUT = 2.0


class SessionError(pw.PagewardenError):
    """A request the manager refuses; ``status`` is the HTTP status that says why (400 bad
    input, 404 no such session, 409 it exists, 503 draining)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(errno.EINVAL, message)
        self.status = status


@dataclass
class SessionSpec:
    """What a session serves: the body of ``PUT /sessions/{name}``."""

    uffd_socket: str
    """The socket to listen on; Firecracker's ``mem_backend.backend_path``."""
    mem_file: str | None = None
    """The snapshot's memory file (None with ``source``)."""
    poison: str | None = None
    """A poison list that says its address space (file path)."""
    poison_gpa: list[int] = field(default_factory=list)
    """Guest-physical addresses to poison."""
    layout: str = DEFAULT_FAMILY
    """Firecracker's layout for ``poison_gpa``."""
    prefetch: str = "all"
    """``all``, ``none`` or ``working-set``."""
    prefetch_order: str | None = None
    """A recorded access order (file path)."""
    fault_around: int = pw.DEFAULT_FAULT_AROUND
    """The largest fault-around window in bytes (0: off), as ``firecracker --fault-around``."""
    source: str | None = None
    """A page server ``host:port`` serving the memory file."""
    token_file: str | None = None
    """With ``source``: the page server's token file."""
    insecure_no_token: bool = False
    """With ``source``: a loopback server without a token, plaintext (testing)."""
    tls_dir: str | None = None
    """With ``source``: an x509 directory (QEMU's tls-creds-x509 layout) for mutual TLS."""
    tls_server_name: str | None = None
    """With ``tls_dir``: the name the page server's certificate must carry."""
    socket_owner: str | None = None
    """``UID[:GID]`` for the socket (the jailer's)."""
    socket_mode: str = "0600"
    """The socket's permissions (octal)."""
    allow_uids: list[int] | None = None
    """Peer uids allowed to connect."""
    kill_peer: bool = True
    """Kill Firecracker on a refusal or fatal error (else fence its memory)."""

    @classmethod
    def from_json(cls, body: Any) -> SessionSpec:
        """Validates a decoded JSON body; SessionError (400) naming the field otherwise."""
        if not isinstance(body, dict):
            raise SessionError(400, "the body must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(body) - known)
        if unknown:
            raise SessionError(
                400, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if "uffd_socket" not in body:
            raise SessionError(400, "field `uffd_socket` is required")

        strings = (
            "uffd_socket", "mem_file", "poison", "layout", "prefetch", "prefetch_order",
            "source", "token_file", "socket_owner", "socket_mode", "tls_dir", "tls_server_name",
        )  # fmt: skip
        for name in (*strings, "insecure_no_token", "kill_peer"):
            value = body.get(name)
            flag = name in ("insecure_no_token", "kill_peer")
            if value is not None and not isinstance(value, bool if flag else str):
                what = "true or false" if flag else "a string"
                raise SessionError(400, f"field `{name}` must be {what}, not {value!r}")
        gpas = body.get("poison_gpa", [])
        if not isinstance(gpas, list):
            raise SessionError(400, "field `poison_gpa` must be a list of addresses")
        try:
            body["poison_gpa"] = parse_addresses(
                [str(a) if isinstance(a, int) and not isinstance(a, bool) else a for a in gpas],
                "poison_gpa",
            )
        except (pw.ConfigurationError, AttributeError, TypeError) as e:
            raise SessionError(400, str(getattr(e, "strerror", None) or e)) from None
        window = body.get("fault_around", pw.DEFAULT_FAULT_AROUND)
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            raise SessionError(
                400, f"field `fault_around` must be a size in bytes (0: off), not {window!r}"
            )
        uids = body.get("allow_uids")
        if uids is not None and (
            not isinstance(uids, list)
            or not all(isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in uids)
        ):
            raise SessionError(400, "field `allow_uids` must be a list of uids")
        spec = cls(**body)
        if spec.prefetch not in PREFETCH_MODES:
            modes = ", ".join(PREFETCH_MODES)
            raise SessionError(400, f"field `prefetch` is {spec.prefetch!r}, not one of {modes}")
        if spec.layout not in FAMILIES:
            layouts = ", ".join(FAMILIES)
            raise SessionError(400, f"field `layout` is {spec.layout!r}, not one of {layouts}")
        if (spec.mem_file is None) == (spec.source is None):
            raise SessionError(400, "give exactly one of `mem_file` and `source`")
        return spec

    def to_json(self) -> dict[str, Any]:
        """The body that recreates the session."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class Session:
    """One served microVM."""

    name: str
    spec: SessionSpec
    state: SessionStateName = "listening"
    created: float = field(default_factory=time.time)
    error: str | None = None
    peer: dict[str, int] | None = None
    resumed: bool = False
    final_stats: dict[str, Any] | None = None
    # Owned by the session thread:
    common: _Common | None = None
    translated: GuestLayout | None = None
    access: SocketAccess = field(default_factory=SocketAccess)
    listener: socket.socket | None = None
    conn: socket.socket | None = None
    guard: PeerGuard | None = None
    handler: pw.Handler | None = None
    source: pw.RemoteSource | None = None

    final_poisoned: int | None = None

    def poisoned_pages(self) -> int | None:
        """Pages of the guest that are poisoned (known, or found while serving)."""
        if self.handler is not None:
            with contextlib.suppress(pw.PagewardenError):
                return len(self.handler.poison_set())
        return self.final_poisoned

    def describe(self) -> dict[str, Any]:
        """What ``GET /sessions/{name}`` returns."""
        stats = self.final_stats
        if self.handler is not None:
            with contextlib.suppress(pw.PagewardenError):
                stats = self.handler.stats()
        out: dict[str, Any] = {
            "name": self.name,
            "state": self.state,
            "uffd_socket": self.spec.uffd_socket,
            "mem_file": self.spec.mem_file,
            "source": self.spec.source,
            "prefetch": self.spec.prefetch,
            "created": self.created,
            "peer": self.peer,
            "resumed": self.resumed,
            "error": self.error,
        }
        if stats is not None:
            out["stats"] = {
                k: stats[k]
                for k in (
                    "faults", "pages_total", "pages_resolved", "pages_missing",
                    "pages_copied", "pages_zeroed", "pages_prefetched", "pages_poisoned",
                    "pages_fenced", "remove_events", "latency_ns_avg", "latency_dist_us_log2",
                )
                if k in stats
            }  # fmt: skip
            out["stats"]["poisoned_pages"] = self.poisoned_pages()
        return out


class SessionManager:
    """Sessions of many microVMs on one Engine and one thread. A context manager; ``close()``
    ends every session (``detach=True``: leaves their guests waiting for a successor, which
    needs ``state_dir``)."""

    def __init__(self, engine_threads: int = 1, state_dir: str | os.PathLike[str] | None = None):
        if engine_threads < 1:
            raise pw.ConfigurationError(errno.EINVAL, "engine_threads must be at least 1")
        self.engine = pw.Engine(engine_threads)
        self.state_dir = None if state_dir is None else Path(state_dir).absolute()
        if self.state_dir is not None:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._sessions: dict[str, Session] = {}
        self._selector = selectors.DefaultSelector()
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, ("wake", ""))
        self._stopping = False
        self._draining = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pagewarden-sessions", daemon=True)
        start_quietly(self._thread)
        if self.state_dir is not None:
            self._call(self._resume_all)

    # -- the API (any thread) -------------------------------------------------------------

    def create(self, name: str, spec: SessionSpec | Mapping[str, Any]) -> dict[str, Any]:
        """Starts a session: checks everything that can be checked before Firecracker connects
        and listens at ``spec.uffd_socket`` (or, with a state directory whose Firecracker still
        runs, re-attaches). SessionError (400/409/503) and nothing changed on bad input."""
        if not NAME.match(name):
            raise SessionError(
                400,
                f"session name {name!r}: 1 to 64 of A-Z a-z 0-9 _ . -, not starting with . - _",
            )
        if not isinstance(spec, SessionSpec):
            spec = SessionSpec.from_json(dict(spec))
        return self._call(lambda: self._create(name, spec))

    def get(self, name: str) -> dict[str, Any]:
        """The session's state and stats; SessionError 404 if there is none."""
        return self._call(lambda: self._find(name).describe())

    def list(self) -> list[dict[str, Any]]:
        """Every session."""
        return self._call(lambda: [s.describe() for s in self._sessions.values()])

    def delete(self, name: str) -> None:
        """Ends a session cleanly (a serving one's missing pages are fenced, its memory
        unregistered) and forgets it; SessionError 404 if there is none."""
        self._call(lambda: self._delete(name))

    def handlers(self) -> dict[str, pw.Handler]:
        """The running handlers by session name (for metrics)."""
        return self._call(
            lambda: {n: s.handler for n, s in self._sessions.items() if s.handler is not None}
        )

    def drain(self) -> int:
        """Refuses new sessions from now on; returns how many are still listening or serving."""

        def go() -> int:
            self._draining = True
            return self._active()

        return self._call(go)

    def active(self) -> int:
        """Sessions listening or serving."""
        return self._call(self._active)

    @property
    def draining(self) -> bool:
        """True once ``drain()`` was called."""
        return self._draining

    def close(self, detach: bool = False) -> int:
        """Ends every session and the thread and the engine. With ``detach`` (and a state
        directory) serving sessions are left waiting for a successor instead of fenced; returns
        how many were."""
        if self._closed:
            return 0
        self._closed = True
        detached = 0
        with contextlib.suppress(pw.HandlerClosedError):
            detached = self._call(lambda: self._close_all(detach))
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._thread.join()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.engine.close()
        return detached

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- the session thread ----------------------------------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        if threading.current_thread() is self._thread:
            return fn()
        if self._stopping:
            raise pw.HandlerClosedError(errno.ESHUTDOWN, "the session manager is closed")
        future: Future[_T] = Future()
        self._calls.put((fn, future))
        os.write(self._wake_w, b"x")
        return future.result()

    def _loop(self) -> None:
        while not self._stopping:
            for key, _ in self._selector.select():
                kind, name = key.data
                if kind == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    self._run_calls()
                    continue
                s = self._sessions.get(name)
                if s is None:
                    continue
                try:
                    if kind == "accept":
                        self._accept(s)
                    elif kind == "handshake":
                        self._handshake(s)
                    elif kind == "exit":
                        self._peer_exited(s)
                    elif kind == "events":
                        self._events(s)
                except Exception as e:  # one session's failure is its own
                    log.exception("session %s: %s", name, e)
                    self._fail(s, str(e))
        self._run_calls()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                future.set_exception(e)

    def _active(self) -> int:
        return sum(s.state in ("listening", "serving") for s in self._sessions.values())

    def _find(self, name: str) -> Session:
        s = self._sessions.get(name)
        if s is None:
            raise SessionError(404, f"no session {name!r}")
        return s

    def _session_state(self, name: str) -> session.StateDir | None:
        if self.state_dir is None:
            return None
        return session.StateDir(self.state_dir / name)

    def _create(self, name: str, spec: SessionSpec) -> dict[str, Any]:
        if self._draining:
            raise SessionError(503, "the daemon is draining: no new sessions")
        if name in self._sessions:
            raise SessionError(409, f"session {name!r} exists; DELETE it first")
        if any(s.spec.uffd_socket == spec.uffd_socket for s in self._sessions.values()):
            raise SessionError(409, f"socket {spec.uffd_socket} is another session's")
        s = Session(name, spec)
        try:
            self._prepare(s)
        except (pw.PagewardenError, OSError) as e:
            self._release(s)
            reason = getattr(e, "strerror", None) or e
            raise SessionError(400, f"session {name!r}: {reason}") from None
        state = s.common.state if s.common is not None else None
        if state is not None:
            (state.path / "spec.json").write_text(json.dumps(spec.to_json()))
        self._sessions[name] = s
        saved = saved_session(s.common) if s.common is not None else None
        if saved is not None:
            self._reattach(s, saved)
        else:
            self._listen(s)
        return s.describe()

    def _prepare(self, s: Session) -> None:
        spec = s.spec
        offsets = gpas = None
        if spec.poison is not None:
            offsets, gpas = poison_tools.load_by_space(spec.poison, "field `poison`")
        if spec.poison_gpa:
            extra = pages_holding(spec.poison_gpa)
            gpas = extra if gpas is None else gpas.with_page_size(4096) | extra
        if spec.source is not None:
            token = None
            if spec.token_file is not None:
                token = Path(spec.token_file).read_bytes().removesuffix(b"\n")
            s.source = pw.RemoteSource(
                spec.source,
                token,
                insecure_no_token=spec.insecure_no_token,
                tls_dir=spec.tls_dir,
                tls_server_name=spec.tls_server_name,
            )
        uid, gid = parse_owner(spec.socket_owner) if spec.socket_owner else (None, None)
        s.access = SocketAccess(
            owner_uid=uid,
            owner_gid=gid,
            mode=parse_mode(spec.socket_mode),
            allowed_uids=None if spec.allow_uids is None else frozenset(spec.allow_uids),
        )
        state = self._session_state(s.name)
        size = s.source.memory_size if s.source is not None else None
        if size is None and spec.mem_file is not None:
            with contextlib.suppress(OSError):
                size = os.stat(spec.mem_file).st_size
        order = None
        if spec.prefetch_order is not None:
            order = access_order.load(spec.prefetch_order, size)
        s.common, s.translated = prepare(
            spec.mem_file if s.source is None else None,
            s.source,
            poison=offsets,
            poison_gpa=gpas,
            layout=spec.layout,
            prefetch=spec.prefetch,  # type: ignore[arg-type]  # checked by SessionSpec
            prefetch_order=order,
            fault_around=spec.fault_around,
            kill_peer_on_error=spec.kill_peer,
            state=state,
            engine=self.engine,
            handshake_timeout=HANDSHAKE_TIMEOUT,
            # The poison lists are in the saved body (spec.json) and read again on a restart;
            # only poison a page server reports while serving needs a journal (and its writer
            # thread), so sessions without one add no thread.
            journal_in_state=spec.source is not None,
        )
        if state is not None:
            state.lock()  # last: nothing after it can fail and leave it held

    def _listen(self, s: Session) -> None:
        s.listener = listen(s.spec.uffd_socket, s.access)
        s.listener.setblocking(False)
        self._selector.register(s.listener, selectors.EVENT_READ, ("accept", s.name))
        s.state = "listening"
        log.info("session %s: listening on %s", s.name, s.spec.uffd_socket)

    def _accept(self, s: Session) -> None:
        assert s.listener is not None and s.common is not None
        try:
            conn, _ = s.listener.accept()
        except BlockingIOError:
            return
        self._unlisten(s)
        conn.setblocking(True)
        peer = peer_credentials(conn)
        s.peer = {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid}
        log.info("session %s: Firecracker connected: pid %d uid %d", s.name, peer.pid, peer.uid)
        s.conn = conn
        s.guard = PeerGuard(conn, peer, s.common.kill)
        # A fence (a refusal of a peer that may not be killed) must not hold every other
        # session's thread until that peer exits.
        s.guard.fence_in_background = True
        self._selector.register(conn, selectors.EVENT_READ, ("handshake", s.name))

    def _handshake(self, s: Session) -> None:
        assert s.conn is not None and s.guard is not None and s.common is not None
        self._selector.unregister(s.conn)
        try:
            handler, _regions, mask = take_over(s.conn, s.guard, s.access, s.translated, s.common)
        except pw.PagewardenError as e:
            self._fail(s, str(e.strerror or e))
            return
        release_signals(mask)
        self._start(s, handler)

    def _reattach(self, s: Session, saved: session.SessionState) -> None:
        assert s.common is not None
        handler, guard, mask = reattach(saved, s.common)
        release_signals(mask)
        guard.fence_in_background = True
        s.guard = guard
        s.peer = {"pid": saved.peer_pid, "uid": saved.peer_uid, "gid": saved.peer_gid}
        s.resumed = True
        self._start(s, handler)

    def _start(self, s: Session, handler: pw.Handler) -> None:
        assert s.guard is not None
        s.handler = handler
        handler.start()
        s.state = "serving"
        if s.guard.pidfd is None:
            self._fail(s, f"Firecracker pid {s.guard.peer.pid} cannot be watched (no pidfd)")
            return
        self._selector.register(s.guard.pidfd, selectors.EVENT_READ, ("exit", s.name))
        self._selector.register(handler.fileno(), selectors.EVENT_READ, ("events", s.name))

    def _events(self, s: Session) -> None:
        handler = s.handler
        if handler is None:
            return
        try:
            handler.process_events()
        except pw.PagewardenError:
            try:
                handler.check()
            except pw.PagewardenError as e:
                # A fatal error: the peer cannot be served correctly any more.
                if s.guard is not None and s.common is not None and s.common.kill:
                    s.guard.fail_stop(str(e))
                self._fail(s, str(e.strerror or e))
                return
            # Stopped without an error: the peer's memory is going away; its exit follows.
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(handler.fileno())

    def _peer_exited(self, s: Session) -> None:
        log.info("session %s: Firecracker exited", s.name)
        self._end(s, "exited")

    def _fail(self, s: Session, error: str) -> None:
        log.error("session %s failed: %s", s.name, error)
        s.error = error
        self._end(s, "failed")

    def _end(self, s: Session, state: SessionStateName, detach: bool = False) -> None:
        self._unlisten(s)
        handler = s.handler
        if handler is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(handler.fileno())
            with contextlib.suppress(pw.PagewardenError):
                s.final_stats = handler.stats()
            s.final_poisoned = s.poisoned_pages()
            if detach:
                handler.detach()
            else:
                handler.close()
            s.handler = None
        if s.guard is not None:
            if s.guard.pidfd is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(s.guard.pidfd)
            s.guard.close()
            s.guard = None
        if s.conn is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s.conn)
            s.conn.close()
            s.conn = None
        if s.common is not None and s.common.state is not None and not detach:
            s.common.state.clear()
            with contextlib.suppress(FileNotFoundError):
                (s.common.state.path / "spec.json").unlink()
        s.state = state
        self._release(s)

    def _release(self, s: Session) -> None:
        if s.source is not None and s.handler is None:
            s.source.close()
            s.source = None
        if s.common is not None and s.common.state is not None and s.handler is None:
            s.common.state.unlock()

    def _unlisten(self, s: Session) -> None:
        if s.listener is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s.listener)
            s.listener.close()
            s.listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s.spec.uffd_socket)

    def _delete(self, name: str) -> None:
        s = self._find(name)
        if s.state in ("listening", "serving"):
            self._end(s, "exited")
        del self._sessions[name]
        log.info("session %s deleted", name)

    def _close_all(self, detach: bool) -> int:
        detached = 0
        for s in list(self._sessions.values()):
            if s.state in ("listening", "serving"):
                leave = detach and s.state == "serving"
                detached += leave
                self._end(s, "exited", detach=leave)
        return detached

    def _resume_all(self) -> None:
        """At start with a state directory: every session a previous daemon left is created
        again from its saved body; those whose Firecracker runs are re-attached."""
        assert self.state_dir is not None
        for spec_file in sorted(self.state_dir.glob("*/spec.json")):
            name = spec_file.parent.name
            try:
                spec = SessionSpec.from_json(json.loads(spec_file.read_text()))
                self._create(name, spec)
                log.info("session %s: restored from %s", name, spec_file.parent)
            except Exception as e:  # noqa: BLE001 - one bad session must not stop the daemon
                log.error("session %s: cannot restore it from %s: %s", name, spec_file, e)
