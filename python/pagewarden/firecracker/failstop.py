"""Fail-stop for a Firecracker that has handed over its uffd: never a hang, never zeros.

Once Firecracker has connected, it waits on its guest memory: a vCPU (or the snapshot load
itself) that touches a page nobody resolves sleeps forever. So every way out of ``serve`` after
``accept`` ends here: the peer is killed (SIGKILL through a pidfd opened at accept, so a reused
pid is never hit), or, where that is impossible (another user's process, a peer in a pid
namespace we cannot see, ``kill_peer_on_error=False``), its memory is fenced: every page not yet
present is answered with UFFDIO_POISON, so each access raises SIGBUS, and the fence stays up,
answering faults with poison, until the peer exits.

This is the failure path, not the fault path: it runs in Python, once per refused VM.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import struct
import threading
from collections.abc import Sequence

from pagewarden._quiet import start_quietly
from pagewarden.firecracker.handshake import GuestRegionMapping, PeerCredentials

log = logging.getLogger("pagewarden.firecracker")

# linux/userfaultfd.h (6.6+; see src/sys/abi.rs); the fence tests run them on a real uffd.
UFFDIO_WAKE = 0x8010AA02
UFFDIO_POISON = 0xC020AA08
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_MSG_SIZE = 32
#: Seconds to wait for a killed peer to be gone before fencing instead.
KILL_WAIT = 5.0


def _poison(uffd: int, start: int, length: int) -> tuple[int, int]:
    """UFFDIO_POISON over ``[start, start + length)``: (errno or 0, bytes done)."""
    arg = bytearray(struct.pack("QQQq", start, length, 0, 0))
    try:
        fcntl.ioctl(uffd, UFFDIO_POISON, arg)
    except OSError as e:
        done = struct.unpack_from("q", arg, 24)[0]
        return e.errno or errno.EIO, max(done, 0)
    return 0, length


def wake(uffd: int, start: int, length: int) -> None:
    """UFFDIO_WAKE over a range: threads whose faults there were read but never answered (by
    a handler that died) fault again. Errors are ignored (a range already gone)."""
    _wake(uffd, start, length)


def _wake(uffd: int, start: int, length: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(uffd, UFFDIO_WAKE, struct.pack("QQ", start, length))


def fence_range(uffd: int, start: int, length: int, page_size: int) -> int:
    """Poisons every page of the range that is not present (present pages keep their bytes:
    the source put them there); returns the pages fenced."""
    fenced = 0
    address, end = start, start + length
    while address < end:
        err, done = _poison(uffd, address, end - address)
        fenced += done // page_size
        address += done
        if err in (errno.EEXIST, errno.EAGAIN) and done == 0:
            address += page_size  # a present page stops the range: step over it
        elif err not in (0, errno.EEXIST, errno.EAGAIN):
            log.error("fencing %#x+%#x failed: %s", address, end - address, os.strerror(err))
            return fenced
    _wake(uffd, start, length)
    return fenced


def _fence_fault(uffd: int, address: int, page_sizes: Sequence[int]) -> None:
    for page_size in page_sizes:
        page = address & ~(page_size - 1)
        err, _ = _poison(uffd, page, page_size)
        if err == errno.EINVAL:
            continue  # a hugetlb range needs whole huge pages
        if err in (errno.EEXIST, errno.EAGAIN):
            _wake(uffd, page, page_size)
        return


class PeerGuard:
    """What a refusal needs to stop the peer: its pidfd (opened at accept), its connection (None
    when a successor re-attached without one) and, once received, its uffd and regions."""

    def __init__(self, conn: socket.socket | None, peer: PeerCredentials, kill: bool) -> None:
        self.conn = conn
        self.peer = peer
        self.kill_allowed = kill
        self.uffd: int | None = None
        self.regions: list[GuestRegionMapping] | None = None
        self.pidfd: int | None = None
        #: Fence on a thread of its own (a daemon serving many VMs from one thread) instead of
        #: in ``fail_stop`` until the peer exits.
        self.fence_in_background = False
        if peer.pid > 0:
            with contextlib.suppress(OSError):
                self.pidfd = os.pidfd_open(peer.pid)

    def close(self) -> None:
        """Closes the pidfd."""
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def fail_stop(self, reason: str) -> str:
        """Kills the peer, or fences its memory until it exits; returns what was done, for
        the error message."""
        who = f"Firecracker (pid {self.peer.pid})"
        if self.kill_allowed:
            if self.kill():
                log.error("refused %s and killed it: %s", who, reason)
                return f"{who} was killed"
            log.error("cannot kill %s (no permission, or not visible from here)", who)
        if self.uffd is None:
            log.error(
                "%s left without a handler and without its uffd to fence: it will wait on "
                "its memory until it is killed",
                who,
            )
            return f"{who} could not be killed and sent no uffd to fence: kill it"
        log.error("refused %s: %s; fencing its memory (every access: SIGBUS)", who, reason)
        if self.fence_in_background:
            self._fence_on_a_thread()
            return f"{who}'s memory is fenced (SIGBUS on every missing page) until it exits"
        self._fence_until_exit()
        return f"{who}'s memory was fenced (SIGBUS on every missing page) until it exited"

    def _fence_on_a_thread(self) -> None:
        """The fence on a thread that owns duplicates of the descriptors it watches."""
        assert self.uffd is not None
        uffd = os.dup(self.uffd)
        pidfd = None if self.pidfd is None else os.dup(self.pidfd)
        conn = None if self.conn is None else self.conn.dup()
        regions = self.regions

        def run() -> None:
            try:
                fence_until_exit(uffd, regions, conn, pidfd)
            finally:
                os.close(uffd)
                if pidfd is not None:
                    os.close(pidfd)
                if conn is not None:
                    conn.close()

        start_quietly(threading.Thread(target=run, name="pagewarden-fence", daemon=True))

    def kill(self) -> bool:
        """SIGKILLs the peer through its pidfd and waits (up to KILL_WAIT) until it is gone;
        False when it cannot (no pidfd, no permission) or does not go."""
        if self.pidfd is None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return True  # already gone
        except OSError:
            return False
        ready, _, _ = select.select([self.pidfd], [], [], KILL_WAIT)
        return bool(ready)

    def _fence_until_exit(self) -> None:
        assert self.uffd is not None
        fence_until_exit(self.uffd, self.regions, self.conn, self.pidfd)


def fence_until_exit(
    uffd: int,
    regions: Sequence[GuestRegionMapping] | None,
    conn: socket.socket | None,
    pidfd: int | None,
) -> None:
    """Poisons every missing page of ``regions`` (when known), then answers every fault with
    poison until the peer exits: its pidfd is readable, or its end of ``conn`` closes."""
    page_sizes: list[int] = [4096, 2 << 20]
    if regions:
        page_sizes = [regions[0].page_size]
        fenced = sum(fence_range(uffd, r.base_host_virt_addr, r.size, r.page_size) for r in regions)
        log.info("fenced %d missing pages", fenced)
    watched = [uffd] if conn is None else [uffd, conn.fileno()]
    if pidfd is not None:
        watched.append(pidfd)
    if conn is not None:
        conn.setblocking(False)
    # Faults on pages the guest dropped (balloon) or that no region named: poison each.
    while True:
        ready, _, _ = select.select(watched, [], [])
        if pidfd is not None and pidfd in ready:
            return
        if conn is not None and conn.fileno() in ready:
            try:
                if not conn.recv(4096):
                    return  # the peer closed its end: it has exited
            except BlockingIOError:
                pass
            except OSError:
                return
        if uffd in ready:
            try:
                data = os.read(uffd, UFFD_MSG_SIZE * 64)
            except (BlockingIOError, InterruptedError):
                continue
            for i in range(0, len(data) - UFFD_MSG_SIZE + 1, UFFD_MSG_SIZE):
                if data[i] == UFFD_EVENT_PAGEFAULT:
                    (address,) = struct.unpack_from("Q", data, i + 16)
                    _fence_fault(uffd, address, page_sizes)
