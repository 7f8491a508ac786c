"""pagewarden as Firecracker's external page-fault handler, with poison.

Firecracker restores a microVM snapshot with an external handler: it creates the userfaultfd,
registers guest memory with it, connects to the handler's Unix socket and sends one message: a
JSON array of ``GuestRegionUffdMapping`` objects (no framing, no newline) with exactly one file
descriptor, the uffd, in SCM_RIGHTS. The handler then serves every fault from the snapshot's
memory file, or from a page server that serves that file from another host
(``source=pw.RemoteSource(...)``). pagewarden also answers every page of a poison list with
``UFFDIO_POISON``, handles balloon REMOVE events before the faults behind them, and is
fail-stop: on a fatal error it kills the peer rather than let it run on missing or wrong memory.

Guest addresses here are offsets in the memory file (the same on every host), so a poison list
written on one host applies on the next.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import select
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pagewarden as pw

log = logging.getLogger("pagewarden.firecracker")

#: The largest handshake accepted; Firecracker's is a few hundred bytes per region.
MAX_HANDSHAKE = 1 << 20
#: Room for this many descriptors in the ancillary data, so that "too many" can be seen.
MAX_FDS = 8
PAGE_SIZES = (4096, 2 << 20)


@dataclass(frozen=True)
class GuestRegionMapping:
    """One region of Firecracker's handshake."""

    base_host_virt_addr: int
    """Start of the region in Firecracker's address space."""
    size: int
    """Bytes in the region."""
    offset: int
    """Offset of the region's first byte in the memory file (its guest address here)."""
    page_size: int
    """Page size in bytes (4096, or 2 MiB for hugetlbfs-backed memory)."""


@dataclass(frozen=True)
class PeerCredentials:
    """SO_PEERCRED of the connected peer."""

    pid: int
    uid: int
    gid: int


@dataclass
class ServeResult:
    """What ``serve`` did."""

    peer: PeerCredentials
    regions: list[GuestRegionMapping]
    stats: dict[str, Any] = field(default_factory=dict)
    poison: pw.PoisonSet | None = None


def _fail(message: str) -> pw.ProtocolError:
    return pw.ProtocolError(errno.EPROTO, f"Firecracker handshake: {message}")


def _int_field(entry: dict[str, Any], name: str, index: int) -> int:
    if name not in entry:
        raise _fail(f"region {index}: field `{name}` is missing")
    value = entry[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(f"region {index}: field `{name}` must be a non-negative integer, not {value!r}")
    if value >= 1 << 64:
        raise _fail(f"region {index}: field `{name}` = {value} does not fit in 64 bits")
    return value


def parse_regions(
    payload: bytes, memfile_size: int, memory_name: str = "the memory file"
) -> list[GuestRegionMapping]:
    """Parses and validates the handshake's JSON before anything touches memory: page size 4 KiB
    or 2 MiB and the same for every region, aligned, non-overlapping (in Firecracker's address
    space and in the file), each inside the first ``memfile_size`` bytes of the memory file
    (``memory_name`` names it in messages). Raises ProtocolError naming the field and the
    region."""
    try:
        data = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _fail(f"not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise _fail(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(data, list):
        raise _fail(f"expected a JSON array of regions, got {type(data).__name__}")
    if not data:
        raise _fail("the array of regions is empty")
    regions: list[GuestRegionMapping] = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise _fail(f"region {index}: expected an object, got {type(entry).__name__}")
        base = _int_field(entry, "base_host_virt_addr", index)
        size = _int_field(entry, "size", index)
        offset = _int_field(entry, "offset", index)
        # Both page-size fields carry bytes (page_size_kib is a historical misnomer); older
        # senders have only one of them, or neither (then 4 KiB).
        sizes = {
            _int_field(entry, name, index)
            for name in ("page_size", "page_size_kib")
            if name in entry
        }
        if len(sizes) > 1:
            raise _fail(f"region {index}: page_size and page_size_kib disagree: {sorted(sizes)}")
        page_size = sizes.pop() if sizes else 4096
        if page_size not in PAGE_SIZES:
            raise _fail(f"region {index}: page size {page_size} is not supported (4096 or 2097152)")
        if size == 0:
            raise _fail(f"region {index}: size is 0")
        for name, value in (("base_host_virt_addr", base), ("size", size), ("offset", offset)):
            if value % page_size:
                raise _fail(
                    f"region {index}: {name} = {value:#x} is not aligned to the page size "
                    f"{page_size:#x}"
                )
        if base + size > 1 << 64 or base == 0:
            raise _fail(f"region {index}: host range {base:#x}+{size:#x} is not a valid range")
        if offset + size > memfile_size:
            raise _fail(
                f"region {index}: offset {offset:#x} + size {size:#x} = {offset + size:#x} is past "
                f"the end of {memory_name} ({memfile_size:#x} bytes)"
            )
        regions.append(GuestRegionMapping(base, size, offset, page_size))
    if len({r.page_size for r in regions}) != 1:
        raise _fail(
            "regions have different page sizes: "
            + ", ".join(f"region {i}: {r.page_size}" for i, r in enumerate(regions))
        )
    for what in ("host addresses", "file offsets"):

        def start(i: int, what: str = what) -> int:
            r = regions[i]
            return r.base_host_virt_addr if what == "host addresses" else r.offset

        ordered = sorted(range(len(regions)), key=start)
        for a, b in itertools.pairwise(ordered):
            if start(a) + regions[a].size > start(b):
                raise _fail(f"regions {a} and {b} overlap in {what}")
    return regions


def receive_handshake(conn: socket.socket, timeout: float = 10.0) -> tuple[bytes, int]:
    """Receives the handshake: the JSON bytes and exactly one descriptor (the uffd). Any other
    number of descriptors, a truncated message or no data is a ProtocolError; descriptors of a
    refused handshake are closed."""
    conn.settimeout(timeout)
    fds: list[int] = []
    chunks: list[bytes] = []
    total = 0
    try:
        while True:
            try:
                data, ancdata, flags, _ = conn.recvmsg(
                    65536, socket.CMSG_SPACE(MAX_FDS * struct.calcsize("i"))
                )
            except TimeoutError:
                if chunks:
                    break
                raise _fail(f"nothing received within {timeout} s") from None
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(cdata) - len(cdata) % struct.calcsize("i")
                    fds.extend(struct.unpack(f"{usable // 4}i", cdata[:usable]))
            if flags & socket.MSG_CTRUNC:
                raise _fail(f"more than {MAX_FDS} descriptors were sent; expected exactly one")
            if not data:
                break
            chunks.append(data)
            total += len(data)
            if total > MAX_HANDSHAKE:
                raise _fail(f"the message is larger than {MAX_HANDSHAKE} bytes")
            payload = b"".join(chunks)
            try:
                json.loads(payload.decode("utf-8"))
                break  # one whole JSON value: the handshake is complete
            except (ValueError, UnicodeDecodeError):
                conn.settimeout(0.2)  # more may follow; a pause ends the message
        if not chunks:
            raise _fail("the peer sent no data")
        if len(fds) != 1:
            raise _fail(f"expected exactly one descriptor (the uffd), got {len(fds)}")
        return b"".join(chunks), fds.pop()
    finally:
        for fd in fds:
            os.close(fd)


def peer_credentials(conn: socket.socket) -> PeerCredentials:
    """The connected peer's pid, uid and gid (SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


def listen(socket_path: str | os.PathLike[str]) -> socket.socket:
    """Creates the handler's socket, usable by its owner only (mode 0600). A stale socket at the
    path is replaced; any other file there is refused."""
    path = Path(socket_path)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise pw.ConfigurationError(
                errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it"
            )
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(1)
    return sock


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        log.error("killed Firecracker (pid %d): its memory can no longer be served correctly", pid)


def _page_source(
    memfile: str | os.PathLike[str] | None, source: pw.RemoteSource | None
) -> tuple[pw.FileSource | pw.RemoteSource, int, str]:
    """The source of the pages, the size of the memory file it serves and how messages name it."""
    path = None if memfile is None or os.fspath(memfile) == "-" else memfile
    if source is not None:
        if path is not None:
            raise pw.ConfigurationError(
                errno.EINVAL,
                f"memfile {os.fspath(path)!r} and a remote source were both given: pages come "
                "from the page server, so pass memfile as None (or '-')",
            )
        # The page server serves the memory file itself: its guest address X is the file's
        # offset X, the numbering of the handshake's `offset`s.
        return source, source.memory_size, f"the page server's memory at {source.address}"
    if path is None:
        raise pw.ConfigurationError(
            errno.EINVAL, "memfile is required unless a remote source is given"
        )
    return pw.FileSource(path), os.stat(path).st_size, "the memory file"


def serve(
    socket_path: str | os.PathLike[str],
    memfile: str | os.PathLike[str] | None,
    poison: pw.PoisonSet | None = None,
    prefetch: bool = True,
    kill_peer_on_error: bool = True,
    poison_journal: str | os.PathLike[str] | None = None,
    accept_timeout: float | None = None,
    on_ready: Callable[[], None] | None = None,
    on_started: Callable[[pw.Handler, ServeResult], None] | None = None,
    source: pw.RemoteSource | None = None,
) -> ServeResult:
    """Serves one Firecracker restore: listens on ``socket_path``, takes the handshake, serves
    every fault from ``memfile`` (poisoned pages with UFFDIO_POISON), prefetches in the
    background when ``prefetch``, handles balloon REMOVE events, and returns when the peer
    exits. ``on_ready`` is called once the socket listens; ``on_started`` once the handler runs.

    With ``source`` (a connected ``pw.RemoteSource``, which the caller closes), pages come from
    a page server that serves the memory file instead, ``memfile`` is None (or ``"-"``), every
    region must lie inside the server's ``memory_size``, and the poison the server announced is
    installed up front together with ``poison``.

    A bad handshake raises ProtocolError before anything touches memory. A fatal error while
    serving (including a page server that stays unreachable longer than the source's
    ``give_up_after``) kills the peer (unless ``kill_peer_on_error`` is False) and is raised:
    the VM is never left running on zeros."""
    page_source, memfile_size, memory_name = _page_source(memfile, source)
    sock = listen(socket_path)
    try:
        if on_ready is not None:
            on_ready()
        sock.settimeout(accept_timeout)
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            raise pw.ProtocolError(
                errno.ETIMEDOUT,
                f"no Firecracker connected to {socket_path} within {accept_timeout} s",
            ) from None
        with conn:
            peer = peer_credentials(conn)
            log.info("Firecracker connected: pid %d uid %d gid %d", peer.pid, peer.uid, peer.gid)
            payload, uffd = receive_handshake(conn)
            try:
                regions = parse_regions(payload, memfile_size, memory_name)
                memories = [
                    pw.GuestMemory.remote(
                        peer.pid, r.base_host_virt_addr, r.size, r.page_size, guest_address=r.offset
                    )
                    for r in regions
                ]
                page_size = regions[0].page_size
                initial = (
                    poison if poison is not None else pw.PoisonSet(page_size=min(page_size, 4096))
                )
                handler = pw.Handler(
                    memories,
                    page_source,
                    poison=initial,
                    prefetch=prefetch,
                    poison_journal=poison_journal,
                    uffd=uffd,
                )
            finally:
                os.close(uffd)  # the handler holds its own duplicate
            result = ServeResult(peer=peer, regions=regions)
            log.info(
                "serving %d regions (%d MiB, %d KiB pages), %d poisoned pages",
                len(regions),
                sum(r.size for r in regions) >> 20,
                page_size >> 10,
                # With a page server, its announced poison has joined the initial set.
                len(handler.poison_set()),
            )
            with handler:
                handler.start()
                if on_started is not None:
                    on_started(handler, result)
                _run_until_peer_exits(handler, peer, kill_peer_on_error)
                result.stats = handler.stats()
                result.poison = handler.poison_set()
            return result
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


def _fail_stop(handler: pw.Handler, peer: PeerCredentials, kill: bool) -> None:
    """Raises the handler's fatal error, if it has one, after killing the peer (when asked)."""
    try:
        handler.check()
    except pw.PagewardenError:
        if kill:
            _kill(peer.pid)
        raise


def _run_until_peer_exits(handler: pw.Handler, peer: PeerCredentials, kill: bool) -> None:
    try:
        pidfd = os.pidfd_open(peer.pid)
    except OSError:
        # Old kernel, or the peer is already gone: poll with kill(pid, 0).
        while True:
            _fail_stop(handler, peer, kill)
            try:
                os.kill(peer.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    try:
        # Sleep until the peer exits or the handler signals (completion, failure, stop).
        watched = [pidfd, handler.fileno()]
        while True:
            ready, _, _ = select.select(watched, [], [])
            if pidfd in ready:
                return
            try:
                handler.process_events()
            except pw.PagewardenError:
                _fail_stop(handler, peer, kill)
                # No fatal error: the loop stopped because the peer's memory is going away.
                watched = [pidfd]
    finally:
        os.close(pidfd)
