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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pagewarden as pw
from pagewarden import DEFAULT_FAULT_AROUND
from pagewarden.firecracker import session
from pagewarden.firecracker.failstop import PeerGuard, wake
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
    resumed: bool = False
    """True when the microVM was taken over from an earlier handler (``state_dir``)."""


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
    state_dir: str | os.PathLike[str] | None = None,
    keeper: bool = False,
    fault_around: int = DEFAULT_FAULT_AROUND,
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
    that prefetches. ``fault_around`` is the Handler's (bytes, 0 for off): a guest reading on
    from a fault gets the pages after it with it, in a window that grows while it reads on.
    ``access`` sets the socket's owner, mode and allowed peer uids.

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
    missing pages are fenced) and is raised: the VM is never left running on zeros.

    With ``state_dir`` (``pagewarden.firecracker.session``), what a successor needs is kept
    there, and a handler that dies (SIGKILL, a crash) leaves the guest waiting instead of
    fenced: started again with the same ``state_dir`` while Firecracker lives, ``serve`` takes
    Firecracker's uffd back (pidfd_getfd), wakes the threads whose faults were read but never
    answered, and carries on without listening (``ServeResult.resumed``). An interruption
    (KeyboardInterrupt, or the CLI's SIGTERM) then detaches: the guest waits, the state stays.
    If the saved Firecracker is gone, its state is cleaned up and ``serve`` listens anew. With
    ``keeper`` (for a VMM that closes its uffd after handing it over; Firecracker does not), a
    keeper process (``pagewarden.keeper``) holds the uffd too, so that the registration outlives
    the handler, and a successor takes the uffd from it."""
    state = None if state_dir is None else session.StateDir(state_dir)
    common, translated = prepare(
        memfile,
        source,
        poison=poison,
        poison_gpa=poison_gpa,
        layout=layout,
        prefetch=prefetch,
        prefetch_order=prefetch_order,
        record_access=record_access,
        poison_journal=poison_journal,
        kill_peer_on_error=kill_peer_on_error,
        on_started=on_started,
        state=state,
        keeper=keeper,
        fault_around=fault_around,
    )
    if state is not None:
        state.lock()
    try:
        saved = saved_session(common)
        if saved is not None:
            return _resume(saved, common)
        return _listen_and_serve(socket_path, access, accept_timeout, on_ready, translated, common)
    finally:
        if state is not None:
            state.unlock()


def prepare(
    memfile: str | os.PathLike[str] | None,
    source: pw.RemoteSource | None,
    *,
    poison: pw.PoisonSet | None = None,
    poison_gpa: pw.PoisonSet | None = None,
    layout: str = DEFAULT_FAMILY,
    prefetch: bool | PrefetchMode = True,
    prefetch_order: Iterable[int | tuple[int, int]] | None = None,
    record_access: bool = False,
    poison_journal: str | os.PathLike[str] | None = None,
    kill_peer_on_error: bool = True,
    on_started: Callable[[pw.Handler, ServeResult], None] | None = None,
    state: session.StateDir | None = None,
    keeper: bool = False,
    engine: pw.Engine | None = None,
    handshake_timeout: float = 10.0,
    journal_in_state: bool = True,
    fault_around: int = DEFAULT_FAULT_AROUND,
) -> tuple[_Common, GuestLayout | None]:
    """Everything about one restore that can be checked before Firecracker connects (the
    memory, the poison and its translation, the prefetch order): raises ConfigurationError or
    GuestAddressError on a problem. Returns what serving needs and the layout guest-physical
    poison was translated with (to be checked against the handshake)."""
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
    if state is not None and poison_journal is None and journal_in_state:
        poison_journal = state.poison_journal
    common = _Common(
        page_source,
        memfile if source is None else None,
        memfile_size,
        memory_name,
        initial,
        mode,
        order,
        record_access,
        poison_journal,
        kill_peer_on_error,
        on_started,
        state,
        keeper,
        engine,
        handshake_timeout,
        fault_around,
    )
    return common, translated


def saved_session(common: _Common) -> session.SessionState | None:
    """The session of ``common``'s state directory whose Firecracker still runs, to re-attach
    to; a session whose Firecracker is gone is cleaned up (and None returned)."""
    state = common.state
    if state is None:
        return None
    saved = state.load()
    if saved is not None:
        if _alive(saved):
            return saved
        log.warning(
            "the microVM of the saved session in %s (Firecracker pid %d) is gone: "
            "cleaning its state up",
            state.path,
            saved.peer_pid,
        )
    state.clear()
    return None


@dataclass
class _Common:
    """What serving one VM needs, fresh or resumed."""

    page_source: pw.FileSource | pw.RemoteSource
    memfile: str | os.PathLike[str] | None
    memfile_size: int
    memory_name: str
    initial: pw.PoisonSet | None
    mode: PrefetchMode
    order: list[int | tuple[int, int]] | None
    record_access: bool
    poison_journal: str | os.PathLike[str] | None
    kill: bool
    on_started: Callable[[pw.Handler, ServeResult], None] | None
    state: session.StateDir | None
    keeper: bool
    engine: pw.Engine | None
    handshake_timeout: float
    fault_around: int = DEFAULT_FAULT_AROUND

    def handler(
        self, guard: PeerGuard, regions: list[GuestRegionMapping], uffd: int, resumed: bool
    ) -> pw.Handler:
        """The Handler for ``regions`` on ``uffd``."""
        page_size = regions[0].page_size
        memories = _memories(guard.peer.pid, regions)
        initial = self.initial
        return pw.Handler(
            memories,
            self.page_source,
            poison=initial if initial is not None else pw.PoisonSet(page_size=min(page_size, 4096)),
            prefetch=self.mode == "all",
            poison_journal=self.poison_journal,
            uffd=uffd,
            prefetch_order=self.order if self.mode != "none" else None,
            record_access=self.record_access,
            resumed=resumed,
            removed_journal=None if self.state is None else self.state.removed_journal,
            engine=self.engine,
            fault_around=self.fault_around,
        )

    def memfile_path(self) -> str | None:
        """The memory file's absolute path (None with a page server)."""
        return None if self.memfile is None else os.path.abspath(self.memfile)


_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_Mask = set[int | signal.Signals]


def _hold_signals() -> _Mask:
    """Holds SIGINT, SIGTERM and SIGHUP back from the creation of a Handler until ``_run``
    has it in hand (``_run`` releases them): a Handler dropped before anything closes or
    detaches it would be fenced, where a stop with a state directory must leave the guest
    waiting. Returns the mask to restore."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)


def release_signals(mask: _Mask) -> None:
    """Restores the signal mask ``_hold_signals`` returned (pending signals are taken now)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _memories(pid: int, regions: Sequence[GuestRegionMapping]) -> list[pw.GuestMemory]:
    """Firecracker's guest memory, region by region, named by memory-file offset."""
    return [
        pw.GuestMemory.remote(
            pid, r.base_host_virt_addr, r.size, r.page_size, guest_address=r.offset
        )
        for r in regions
    ]


def _alive(saved: session.SessionState) -> bool:
    return session.is_running(saved.peer_pid, saved.peer_start_time) and session.is_running(
        saved.uffd_holder_pid, saved.uffd_holder_start_time
    )


def _listen_and_serve(
    socket_path: str | os.PathLike[str],
    access: SocketAccess | None,
    accept_timeout: float | None,
    on_ready: Callable[[], None] | None,
    translated: GuestLayout | None,
    common: _Common,
) -> ServeResult:
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
            guard = PeerGuard(conn, peer, common.kill)
            try:
                handler, regions, mask = take_over(
                    conn, guard, access or SocketAccess(), translated, common
                )
                return _run(handler, guard, peer, regions, False, common, mask)
            finally:
                guard.close()
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


def _resume(saved: session.SessionState, common: _Common) -> ServeResult:
    """Takes a running microVM over from a handler that died or detached, and serves it."""
    handler, guard, mask = reattach(saved, common)
    try:
        return _run(handler, guard, guard.peer, saved.regions, True, common, mask)
    finally:
        guard.close()


def reattach(saved: session.SessionState, common: _Common) -> tuple[pw.Handler, PeerGuard, _Mask]:
    """Takes the uffd of a running microVM back from the process that holds it, builds its
    Handler (not started) and wakes the faults a dead handler had read. Returns it with the
    peer's guard (the caller closes it) and the signal mask to restore once the handler is in
    hand (``release_signals``). A failure ends in the peer's fail-stop, an interruption leaves
    it waiting; a command that names other memory is refused without touching it."""
    state = common.state
    assert state is not None
    where = common.memfile_path()
    if saved.memory_size != common.memfile_size or (
        saved.memfile is not None and saved.memfile != where
    ):
        # The command names other memory than the VM's: refuse without touching the VM, which
        # waits for a successor started correctly.
        raise pw.ConfigurationError(
            errno.EINVAL,
            f"state directory {state.path} holds the session of Firecracker pid "
            f"{saved.peer_pid} served from {saved.memfile or saved.source} "
            f"({saved.memory_size:#x} bytes), not {common.memory_name} "
            f"({common.memfile_size:#x} bytes): start the same command again, or --abandon",
        )
    peer = PeerCredentials(saved.peer_pid, saved.peer_uid, saved.peer_gid)
    guard = PeerGuard(None, peer, common.kill)
    uffd = None
    handler: pw.Handler | None = None
    held = False
    mask: _Mask = set()
    try:
        if not session.is_running(saved.peer_pid, saved.peer_start_time):
            raise pw.ConfigurationError(
                errno.ESRCH, f"Firecracker pid {saved.peer_pid} exited meanwhile"
            )
        from pagewarden import _native

        uffd = _native._take_uffd(saved.uffd_holder_pid, saved.uffd_holder_start_time)
        guard.uffd, guard.regions = uffd, saved.regions
        mask = _hold_signals()
        held = True
        handler = common.handler(guard, saved.regions, uffd, resumed=True)
        # What the predecessor served is in Firecracker's page tables: counted as present,
        # so that stats and prefetch start from there (a page the map misses is met with
        # EEXIST, as without it).
        try:
            present = handler.mark_present_from_pagemap(saved.peer_pid)
        except pw.PagewardenError as e:
            present = 0
            log.warning("cannot read Firecracker's page map (%s): present pages are found "
                        "as they are met", e.strerror or e)  # fmt: skip
        log.info("%d pages were served before the restart", present)
        # Threads whose faults the dead handler read but never answered sleep until their
        # range is woken: they fault again, and this handler reads those faults.
        for r in saved.regions:
            wake(uffd, r.base_host_virt_addr, r.size)
    except BaseException as e:
        if held:
            release_signals(mask)
        # Interrupted: the state stays, the guest waits for the next attempt.
        instead = _give_up(e, handler, guard, state, True, "re-attach failed: ")
        guard.close()
        if instead is not None:
            raise instead from None
        raise
    finally:
        if uffd is not None:
            os.close(uffd)  # the handler holds its own duplicate
    log.info(
        "re-attached to Firecracker pid %d (left by handler pid %d): %d regions, %d MiB, "
        "%d poisoned pages, prefetch %s",
        saved.peer_pid,
        saved.handler_pid,
        len(saved.regions),
        sum(r.size for r in saved.regions) >> 20,
        len(handler.poison_set()),
        common.mode,
    )
    return handler, guard, mask


def _run(
    handler: pw.Handler,
    guard: PeerGuard,
    peer: PeerCredentials,
    regions: list[GuestRegionMapping],
    resumed: bool,
    common: _Common,
    mask: _Mask,
) -> ServeResult:
    """Serves until the peer exits. An interruption with a state directory detaches (the guest
    waits for a successor); otherwise the handler closes (what is missing is fenced). Restores
    the signal ``mask`` first thing inside its handling."""
    detached = False
    try:
        release_signals(mask)
        result = ServeResult(peer=peer, regions=regions, resumed=resumed)
        handler.start()
        if common.on_started is not None:
            common.on_started(handler, result)
        _run_until_peer_exits(handler, guard, common.kill)
        result.stats = handler.stats()
        result.poison = handler.poison_set()
        if common.record_access:
            result.access_log = handler.access_log()
        return result
    except BaseException as e:
        if common.state is not None and not isinstance(e, Exception):
            handler.detach()
            detached = True
            log.info(
                "detached from Firecracker pid %d: it waits for a successor started with the "
                "same --state-dir (%s)",
                guard.peer.pid,
                common.state.path,
            )
        raise
    finally:
        handler.close()
        if common.state is not None and not detached:
            common.state.clear()


def take_over(
    conn: socket.socket,
    guard: PeerGuard,
    access: SocketAccess,
    translated: GuestLayout | None,
    common: _Common,
) -> tuple[pw.Handler, list[GuestRegionMapping], _Mask]:
    """From an accepted connection to a Handler that owns the peer's uffd, returned with the
    signal mask to restore once ``_run`` has it (``_hold_signals``). Any exception on the way
    ends in the peer's fail-stop before it propagates, but an interruption after the state was
    saved, which leaves the guest waiting for a successor."""
    message = None
    saved = held = False
    mask: _Mask = set()
    handler = None
    try:
        # The message first, even from a peer that will be refused: its uffd is what fences
        # the peer when it cannot be killed.
        message = receive_message(conn, common.handshake_timeout)
        guard.uffd = message.uffd()
        access.check_peer(guard.peer)
        if message.problem is not None:
            raise pw.ProtocolError(errno.EPROTO, f"Firecracker handshake: {message.problem}")
        uffd = message.fds[0]
        regions = parse_regions(message.payload, common.memfile_size, common.memory_name)
        guard.regions = regions
        if translated is not None:
            translated.check_handshake([(r.offset, r.size) for r in regions])
        if common.initial is not None:
            _check_covered(common.initial, regions)
        if common.state is not None:
            _save_session(common, guard, regions, uffd)
            saved = True
        mask = _hold_signals()
        held = True
        handler = common.handler(guard, regions, uffd, resumed=False)
        log.info(
            "serving %d regions (%d MiB, %d KiB pages), %d poisoned pages, prefetch %s",
            len(regions),
            sum(r.size for r in regions) >> 20,
            regions[0].page_size >> 10,
            # With a page server, its announced poison has joined the initial set.
            len(handler.poison_set()),
            common.mode,
        )
        return handler, regions, mask
    except BaseException as e:
        if held:
            release_signals(mask)
        # Interrupted (SIGTERM, Ctrl-C) after the state was written: a planned stop, so the
        # guest waits for a successor, as it would a moment later.
        instead = _give_up(e, handler, guard, common.state, saved)
        if instead is not None:
            raise instead from None
        raise
    finally:
        if message is not None:
            message.close()  # the handler holds its own duplicate of the uffd


def _give_up(
    e: BaseException,
    handler: pw.Handler | None,
    guard: PeerGuard,
    state: session.StateDir | None,
    interruption_waits: bool,
    prefix: str = "",
) -> BaseException | None:
    """Ends a take-over that ``e`` broke off. An interruption (not an Exception) leaves the
    guest waiting for a successor when ``interruption_waits`` (the handler, if any, detaches);
    anything else ends in the peer's fail-stop and forgets the session. Returns the exception to
    raise instead of ``e`` (one that says what the fail-stop did), or None to raise ``e``."""
    if interruption_waits and not isinstance(e, Exception):
        if handler is not None:
            handler.detach()
        return None
    if handler is not None:
        handler.close()
    done = guard.fail_stop(str(e))
    if state is not None:
        state.clear()
    return _after_connect(e, done, prefix) if isinstance(e, pw.PagewardenError) else None


def _after_connect(e: pw.PagewardenError, done: str, prefix: str = "") -> pw.PagewardenError:
    """``e`` with what the fail-stop did; its ``peer_stopped`` attribute says so (a refusal
    after the peer connected, as opposed to one before anything listened)."""
    refused = type(e)(e.errno or errno.EPROTO, f"{prefix}{e.strerror or e} ({done})")
    refused.peer_stopped = done  # type: ignore[attr-defined]
    return refused


def _save_session(
    common: _Common, guard: PeerGuard, regions: list[GuestRegionMapping], uffd: int
) -> None:
    """Writes what a successor needs, before anything is served (the pidfd opened at accept
    pins the pid, so the start time read now is the peer's); starts the keeper first when
    asked."""
    assert common.state is not None
    peer = guard.peer
    start = session.start_time_of(peer.pid)
    if start is None:
        raise pw.ConfigurationError(
            errno.ESRCH, f"Firecracker pid {peer.pid} is not visible from here (pid namespace?)"
        )
    source = common.page_source
    holder, holder_start = peer.pid, start
    if common.keeper:
        from pagewarden.keeper import Keeper

        kept = Keeper.start(uffd, peer.pid)
        holder, holder_start = kept.pid, kept.start_time
        log.info("uffd keeper pid %d holds the registration for successors", kept.pid)
    common.state.save(
        session.SessionState(
            peer_pid=peer.pid,
            peer_start_time=start,
            peer_uid=peer.uid,
            peer_gid=peer.gid,
            uffd_holder_pid=holder,
            uffd_holder_start_time=holder_start,
            regions=regions,
            memfile=common.memfile_path(),
            memory_size=common.memfile_size,
            source=source.address if isinstance(source, pw.RemoteSource) else None,
            prefetch=common.mode,
            handler_pid=os.getpid(),
        )
    )


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


def _fail_stop(handler: pw.Handler, guard: PeerGuard, kill: bool) -> None:
    """Raises the handler's fatal error, if it has one, after killing the peer (when asked)
    through the pidfd taken when it connected."""
    try:
        handler.check()
    except pw.PagewardenError:
        if kill and guard.kill():
            log.error(
                "killed Firecracker (pid %d): its memory can no longer be served correctly",
                guard.peer.pid,
            )
        raise


def _run_until_peer_exits(handler: pw.Handler, guard: PeerGuard, kill: bool) -> None:
    pidfd = guard.pidfd
    if pidfd is None:
        # Old kernel, or a peer we cannot see: poll with kill(pid, 0).
        while True:
            _fail_stop(handler, guard, kill)
            try:
                os.kill(guard.peer.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
    # Sleep until the peer exits or the handler signals (completion, failure, stop).
    watched = [pidfd, handler.fileno()]
    while True:
        ready, _, _ = select.select(watched, [], [])
        if pidfd in ready:
            return
        try:
            handler.process_events()
        except pw.PagewardenError:
            _fail_stop(handler, guard, kill)
            # No fatal error: the loop stopped because the peer's memory is going away.
            watched = [pidfd]


def abandon(state_dir: str | os.PathLike[str]) -> str:
    """Gives up the microVM of a state directory the old way: takes its uffd back, fences every
    page that is not present (each access: SIGBUS, never zeros), unregisters its memory and
    forgets the session (the poison journal stays). Returns what was done, for a message.
    ConfigurationError when another handler serves it."""
    state = session.StateDir(state_dir)
    state.lock()
    try:
        saved = state.load()
        if saved is None:
            return f"no session in {state.path}: nothing to abandon"
        if not _alive(saved):
            state.clear()
            return (
                f"Firecracker pid {saved.peer_pid} of the session in {state.path} is gone: "
                "state cleaned up"
            )
        from pagewarden import _native

        uffd = _native._take_uffd(saved.uffd_holder_pid, saved.uffd_holder_start_time)
        try:
            memories = _memories(saved.peer_pid, saved.regions)
            page_size = saved.regions[0].page_size
            # Never started: closing it fences what is missing and unregisters, which also
            # wakes threads left waiting on faults the dead handler had read.
            handler = pw.Handler(
                memories,
                pw.ZeroSource(),
                poison=pw.PoisonSet(page_size=min(page_size, 4096)),
                prefetch=False,
                poison_journal=state.poison_journal,
                uffd=uffd,
                resumed=True,
                removed_journal=state.removed_journal,
            )
            handler.close()
        finally:
            os.close(uffd)
        state.clear()
        return (
            f"abandoned Firecracker pid {saved.peer_pid}: its missing pages are fenced (SIGBUS) "
            "and its memory unregistered"
        )
    finally:
        state.unlock()
