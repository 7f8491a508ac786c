"""pagewarden as Firecracker's external page-fault handler, with poison.

Firecracker restores a microVM snapshot with an external handler: it creates the userfaultfd,
registers guest memory with it, connects to the handler's Unix socket and sends one message: a
JSON array of ``GuestRegionUffdMapping`` objects with exactly one file descriptor, the uffd. The
handler then serves every fault from the snapshot's memory file, or from a page server that serves
that file from another host (``source=pw.RemoteSource(...)``). pagewarden also answers every page
of a poison list with ``UFFDIO_POISON``, handles balloon REMOVE events before the faults behind
them, and is fail-stop: a refusal after Firecracker connected, or a fatal error while serving,
kills the peer (or fences its memory) rather than leave it hung or running on wrong memory.

The package's parts: ``handshake`` (the socket, who may connect, the message), ``layout``
(guest-physical addresses and memory-file offsets), ``serve`` (one restore), ``failstop`` (kill
or fence), ``access_order`` (recorded working sets) and ``command`` (``pagewarden firecracker``).
"""

from __future__ import annotations

from pagewarden.firecracker.handshake import (
    GuestRegionMapping,
    PeerCredentials,
    SocketAccess,
    listen,
    parse_regions,
    peer_credentials,
    receive_handshake,
)
from pagewarden.firecracker.layout import GuestLayout, LayoutFamily, RamRegion
from pagewarden.firecracker.serve import ServeResult, serve

__all__ = [
    "GuestLayout",
    "GuestRegionMapping",
    "LayoutFamily",
    "PeerCredentials",
    "RamRegion",
    "ServeResult",
    "SocketAccess",
    "listen",
    "parse_regions",
    "peer_credentials",
    "receive_handshake",
    "serve",
]
