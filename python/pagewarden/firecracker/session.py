"""What a successor needs to take a running microVM over: the state directory (``--state-dir``).

A handler that serves Firecracker with a state directory keeps there, off the fault path:

- ``session.json``: the peer (pid and start time, so that a reused pid is never taken for it),
  the process that holds the uffd (Firecracker itself, or a keeper), the regions of the
  handshake, where the pages come from (memory file or page server) and the prefetch mode. It is
  written once, atomically, right after the handshake is understood, before anything is served.
- ``poison.journal``: every poisoned page (unless ``--poison-journal`` names another file).
- ``removed.journal``: every range the guest removed (balloon), written as the event is read.
- ``lock``: held (flock) by the handler serving the VM, so two handlers never serve one guest.

Present pages are not recorded: a successor treats every other page as missing, and the kernel
answers EEXIST for those that are in.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pagewarden as pw
from pagewarden.firecracker.handshake import GuestRegionMapping

FORMAT = "pagewarden.firecracker-session"
VERSION = 1
STATE_FILE = "session.json"
LOCK_FILE = "lock"
POISON_JOURNAL = "poison.journal"
REMOVED_JOURNAL = "removed.journal"


def _error(path: Path, reason: str) -> pw.ConfigurationError:
    return pw.ConfigurationError(errno.EINVAL, f"state directory {path}: {reason}")


@dataclass
class SessionState:
    """One served microVM, as a successor finds it."""

    peer_pid: int
    """Firecracker's pid."""
    peer_start_time: int
    """Its start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    peer_uid: int
    """Its uid (SO_PEERCRED)."""
    peer_gid: int
    """Its gid."""
    uffd_holder_pid: int
    """The process whose uffd a successor takes: Firecracker, or a keeper."""
    uffd_holder_start_time: int
    """That process's start time."""
    regions: list[GuestRegionMapping]
    """The regions of Firecracker's handshake."""
    memfile: str | None
    """The memory file (absolute path), or None with a page server."""
    memory_size: int
    """Its size (or the page server's memory size)."""
    source: str | None
    """The page server's address, or None."""
    prefetch: str
    """``all``, ``none`` or ``working-set``."""
    handler_pid: int
    """The handler that wrote the state (for messages)."""

    def to_json(self) -> str:
        """The versioned JSON text."""
        body: dict[str, Any] = {"format": FORMAT, "version": VERSION, **asdict(self)}
        return json.dumps(body, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path) -> SessionState:
        """Parses the JSON text; ConfigurationError naming what is wrong."""
        try:
            data = json.loads(text)
        except ValueError as e:
            raise _error(path, f"{STATE_FILE} is not JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise _error(path, f"{STATE_FILE} is not a pagewarden session state")
        if data.get("version") != VERSION:
            raise _error(
                path,
                f"{STATE_FILE} has version {data.get('version')!r}; this pagewarden reads "
                f"{VERSION}: use the pagewarden that wrote it, or --abandon with it",
            )
        try:
            regions = [GuestRegionMapping(**r) for r in data["regions"]]
            return cls(
                peer_pid=int(data["peer_pid"]),
                peer_start_time=int(data["peer_start_time"]),
                peer_uid=int(data["peer_uid"]),
                peer_gid=int(data["peer_gid"]),
                uffd_holder_pid=int(data["uffd_holder_pid"]),
                uffd_holder_start_time=int(data["uffd_holder_start_time"]),
                regions=regions,
                memfile=data["memfile"],
                memory_size=int(data["memory_size"]),
                source=data["source"],
                prefetch=str(data["prefetch"]),
                handler_pid=int(data["handler_pid"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise _error(path, f"{STATE_FILE} is damaged ({type(e).__name__}: {e})") from None


def start_time_of(pid: int) -> int | None:
    """Process ``pid``'s start time, or None when it is not running."""
    from pagewarden import _native

    try:
        return _native._process_start_time(pid)
    except pw.PagewardenError:
        return None


def is_running(pid: int, start_time: int) -> bool:
    """True if process ``pid`` runs and is the one that started at ``start_time``."""
    return start_time_of(pid) == start_time


class StateDir:
    """A state directory, locked by the handler that uses it (``lock()``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).absolute()
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise _error(self.path, f"cannot create it: {e.strerror or e}") from None
        if not self.path.is_dir():
            raise _error(self.path, "not a directory")
        self._lock_fd: int | None = None

    @property
    def poison_journal(self) -> Path:
        """The default poison journal."""
        return self.path / POISON_JOURNAL

    @property
    def removed_journal(self) -> Path:
        """The removed-page journal."""
        return self.path / REMOVED_JOURNAL

    def lock(self) -> None:
        """Takes the directory's lock for this process's life; ConfigurationError when another
        handler holds it (two handlers must never serve one guest)."""
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise pw.ConfigurationError(
                errno.EBUSY,
                f"state directory {self.path} is in use by another pagewarden (pid {holder}): "
                "one handler per microVM",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Releases the lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def load(self) -> SessionState | None:
        """The saved session, or None when there is none."""
        path = self.path / STATE_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise _error(self.path, f"cannot read {STATE_FILE}: {e.strerror or e}") from None
        return SessionState.from_json(text, self.path)

    def save(self, state: SessionState) -> None:
        """Writes the session atomically and durably (temporary file, fsync, rename, fsync of
        the directory)."""
        tmp = self.path / f".{STATE_FILE}.tmp"
        with open(tmp, "w") as f:
            f.write(state.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / STATE_FILE)
        dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def clear(self) -> None:
        """Forgets the session (the VM is gone or abandoned). The poison journal stays: poison
        travels with the VM's image to its next restore."""
        for name in (STATE_FILE, REMOVED_JOURNAL):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
