"""Serving one Firecracker restore: check everything that can be checked before Firecracker
connects, take its handshake, serve its memory, and end in fail-stop on any refusal after it has
handed over its uffd.

Guest addresses here are offsets in the memory file (the same on every host), so a poison list
written on one host applies on the next; guest-physical poison is translated with the VM's
layout (``pagewarden.firecracker.layout``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import pagewarden as pw
from pagewarden.firecracker.failstop import PeerGuard
from pagewarden.firecracker.handshake import (
    GuestRegionMapping,
    PeerCredentials,
    SocketAccess,
    listen,
    parse_regions,
    peer_credentials,
    receive_message,
)
from pagewarden.firecracker.layout import DEFAULT_FAMILY, GuestLayout

log = logging.getLogger("pagewarden.firecracker")

PrefetchMode = Literal["all", "none", "working-set"]
PREFETCH_MODES: tuple[PrefetchMode, ...] = ("all", "none", "working-set")


@dataclass
class ServeResult:
    """What ``serve`` did."""

    peer: PeerCredentials
    regions: list[GuestRegionMapping]
    stats: dict[str, Any] = field(default_factory=dict)
    poison: pw.PoisonSet | None = None
    access_log: list[int] | None = None
    """Memory-file offsets in the order of their first fault (with ``record_access``)."""


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        log.error("killed Firecracker (pid %d): its memory can no longer be served correctly", pid)


def _page_source(
    memfile: str | os.PathLike[str] | None, source: pw.RemoteSource | None
) -> tuple[pw.FileSource | pw.RemoteSource, int, str]:
    """The source of the pages, the size of the memory file it serves and how messages name it.
    Opens the memory file now, so that an unreadable one stops us before Firecracker can
    connect."""
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
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise pw.ConfigurationError(
            e.errno or errno.ENOENT, f"memory file {os.fspath(path)}: {e.strerror or e}"
        ) from None
    if size == 0 or size % 4096:
        raise pw.ConfigurationError(
            errno.EINVAL,
            f"memory file {os.fspath(path)} is {size} bytes, not a whole number of 4 KiB pages: "
            "is it a Firecracker snapshot's memory file?",
        )
    try:
        file_source = pw.FileSource(path)
    except pw.PagewardenError as e:
        raise pw.ConfigurationError(
            e.errno or errno.EIO, f"memory file {os.fspath(path)}: {e.strerror or e}"
        ) from None
    return file_source, size, "the memory file"


def _prefetch_mode(prefetch: bool | PrefetchMode, order: object) -> PrefetchMode:
    mode: PrefetchMode = ("all" if prefetch else "none") if isinstance(prefetch, bool) else prefetch
    if mode not in PREFETCH_MODES:
        raise pw.ConfigurationError(
            errno.EINVAL, f"prefetch {prefetch!r} is not one of {', '.join(PREFETCH_MODES)}"
        )
    if mode == "working-set" and order is None:
        raise pw.ConfigurationError(
            errno.EINVAL,
            "prefetch 'working-set' needs a prefetch order (a recorded access order: "
            "--prefetch-order FILE, written by an earlier restore's --record-access FILE)",
        )
    return mode


def _initial_poison(
    poison: pw.PoisonSet | None,
    poison_gpa: pw.PoisonSet | None,
    memory_size: int,
    layout: str,
) -> tuple[pw.PoisonSet | None, GuestLayout | None]:
    """The poison to install, in memory-file offsets, checked against the memory's size; and
    the layout guest-physical poison was translated with (to be checked against the
    handshake)."""
    if poison is not None:
        for start, length in poison.ranges():
            if start + length > memory_size:
                raise pw.GuestAddressError(
                    errno.EINVAL,
                    f"poison at memory-file offset {max(start, memory_size):#x} is past the end "
                    f"of guest memory ({memory_size:#x} bytes); if these are guest-physical "
                    "addresses, give them with --poison-gpa / --poison-gpa-file",
                )
    if poison_gpa is None:
        return poison, None
    translated = GuestLayout.firecracker(memory_size, layout)
    offsets = translated.to_offsets(poison_gpa)
    if offsets and poison is not None and offsets.page_size != poison.page_size:
        size = min(offsets.page_size, poison.page_size)
        offsets, poison = offsets.with_page_size(size), poison.with_page_size(size)
    return (offsets if poison is None else poison | offsets), translated


def serve(
    socket_path: str | os.PathLike[str],
    memfile: str | os.PathLike[str] | None,
    poison: pw.PoisonSet | None = None,
    prefetch: bool | PrefetchMode = True,
    kill_peer_on_error: bool = True,
    poison_journal: str | os.PathLike[str] | None = None,
    accept_timeout: float | None = None,
    on_ready: Callable[[], None] | None = None,
    on_started: Callable[[pw.Handler, ServeResult], None] | None = None,
    source: pw.RemoteSource | None = None,
    *,
    poison_gpa: pw.PoisonSet | None = None,
    layout: str = DEFAULT_FAMILY,
    access: SocketAccess | None = None,
    prefetch_order: Iterable[int | tuple[int, int]] | None = None,
    record_access: bool = False,
) -> ServeResult:
    """Serves one Firecracker restore: listens on ``socket_path``, takes the handshake, serves
    every fault from ``memfile`` (poisoned pages with UFFDIO_POISON), handles balloon REMOVE
    events, and returns when the peer exits. ``on_ready`` is called once the socket listens;
    ``on_started`` once the handler runs.

    ``poison`` names memory-file offsets; ``poison_gpa`` names guest-physical addresses, which
    are translated with Firecracker's x86-64 ``layout`` (``layout.FAMILIES``) for a guest of the
    memory file's size, and the handshake must then show that layout's regions. ``prefetch`` is
    ``"all"`` (or True: every page in the background), ``"none"`` (or False: on demand), or
    ``"working-set"`` (only ``prefetch_order``, the pages an earlier restore recorded with
    ``record_access``; the rest on demand). ``prefetch_order`` is brought in first in every mode
    that prefetches. ``access`` sets the socket's owner, mode and allowed peer uids.

    With ``source`` (a connected ``pw.RemoteSource``, which the caller closes), pages come from
    a page server that serves the memory file instead, ``memfile`` is None (or ``"-"``), every
    region must lie inside the server's ``memory_size``, and the poison the server announced is
    installed up front together with ``poison``.

    Everything that can be checked before Firecracker connects is (the memory file, the poison,
    its translation, the prefetch order): a problem raises before the socket exists, so
    Firecracker's connect fails instead of its restore hanging. Once a peer has connected, every
    refusal (a peer uid not allowed, a bad handshake, regions that do not fit, any exception)
    ends in fail-stop: the peer is killed, or, where it cannot be (``kill_peer_on_error=False``,
    no permission), its memory is fenced (SIGBUS) until it exits; then the error is raised. A
    fatal error while serving (including a page server that stays unreachable longer than the
    source's ``give_up_after``) kills the peer (unless ``kill_peer_on_error`` is False, when its
    missing pages are fenced) and is raised: the VM is never left running on zeros."""
    order = None if prefetch_order is None else list(prefetch_order)
    mode = _prefetch_mode(prefetch, order)
    page_source, memfile_size, memory_name = _page_source(memfile, source)
    initial, translated = _initial_poison(poison, poison_gpa, memfile_size, layout)
    for item in order or ():
        start, length = item if isinstance(item, tuple) else (item, 1)
        if start + length > memfile_size:
            raise pw.GuestAddressError(
                errno.EINVAL,
                f"prefetch order range {start:#x}+{length:#x} is past the end of {memory_name} "
                f"({memfile_size:#x} bytes)",
            )
    sock = listen(socket_path, access)
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
            guard = PeerGuard(conn, peer, kill_peer_on_error)
            try:
                handler, regions = _take_over(
                    conn,
                    guard,
                    access or SocketAccess(),
                    memfile_size,
                    memory_name,
                    translated,
                    initial,
                    page_source,
                    mode,
                    order,
                    record_access,
                    poison_journal,
                )
                result = ServeResult(peer=peer, regions=regions)
                with handler:
                    handler.start()
                    if on_started is not None:
                        on_started(handler, result)
                    _run_until_peer_exits(handler, peer, kill_peer_on_error)
                    result.stats = handler.stats()
                    result.poison = handler.poison_set()
                    if record_access:
                        result.access_log = handler.access_log()
                return result
            finally:
                guard.close()
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


def _take_over(
    conn: socket.socket,
    guard: PeerGuard,
    access: SocketAccess,
    memfile_size: int,
    memory_name: str,
    translated: GuestLayout | None,
    initial: pw.PoisonSet | None,
    page_source: pw.FileSource | pw.RemoteSource,
    mode: PrefetchMode,
    order: list[int | tuple[int, int]] | None,
    record_access: bool,
    poison_journal: str | os.PathLike[str] | None,
) -> tuple[pw.Handler, list[GuestRegionMapping]]:
    """From an accepted connection to a Handler that owns the peer's uffd. Any exception on
    the way (including KeyboardInterrupt) ends in the peer's fail-stop before it propagates."""
    message = None
    try:
        # The message first, even from a peer that will be refused: its uffd is what fences
        # the peer when it cannot be killed.
        message = receive_message(conn)
        guard.uffd = message.uffd()
        access.check_peer(guard.peer)
        if message.problem is not None:
            raise pw.ProtocolError(errno.EPROTO, f"Firecracker handshake: {message.problem}")
        uffd = message.fds[0]
        regions = parse_regions(message.payload, memfile_size, memory_name)
        guard.regions = regions
        if translated is not None:
            translated.check_handshake([(r.offset, r.size) for r in regions])
        page_size = regions[0].page_size
        if initial is not None:
            _check_covered(initial, regions)
        memories = [
            pw.GuestMemory.remote(
                guard.peer.pid, r.base_host_virt_addr, r.size, r.page_size, guest_address=r.offset
            )
            for r in regions
        ]
        handler = pw.Handler(
            memories,
            page_source,
            poison=initial if initial is not None else pw.PoisonSet(page_size=min(page_size, 4096)),
            prefetch=mode == "all",
            poison_journal=poison_journal,
            uffd=uffd,
            prefetch_order=order if mode != "none" else None,
            record_access=record_access,
        )
        log.info(
            "serving %d regions (%d MiB, %d KiB pages), %d poisoned pages, prefetch %s",
            len(regions),
            sum(r.size for r in regions) >> 20,
            page_size >> 10,
            # With a page server, its announced poison has joined the initial set.
            len(handler.poison_set()),
            mode,
        )
        return handler, regions
    except BaseException as e:
        done = guard.fail_stop(str(e))
        if isinstance(e, pw.PagewardenError):
            raise type(e)(e.errno or errno.EPROTO, f"{e.strerror or e} ({done})") from None
        raise
    finally:
        if message is not None:
            message.close()  # the handler holds its own duplicate of the uffd


def _check_covered(poison: pw.PoisonSet, regions: list[GuestRegionMapping]) -> None:
    """Every poisoned page must be inside a region of the handshake: poison that names no
    guest memory is a list for another VM."""
    spans = sorted((r.offset, r.offset + r.size) for r in regions)
    for start, length in poison.ranges():
        address, end = start, start + length
        while address < end:
            span = next((s for s in spans if s[0] <= address < s[1]), None)
            if span is None:
                raise pw.GuestAddressError(
                    errno.EINVAL,
                    f"poison at memory-file offset {address:#x} is in no region Firecracker "
                    "registered ("
                    + ", ".join(f"{a:#x}-{b:#x}" for a, b in spans)
                    + "): is the poison list for this snapshot?",
                )
            address = span[1]


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
