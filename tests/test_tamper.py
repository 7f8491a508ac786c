"""A man in the middle between a page server and a RemoteSource, on real userfaultfd.

The attacker sits on the TCP path and works on the server's records as they pass: flips a bit,
cuts the connection inside a record, replays an earlier record, swaps two, drops one, or puts in
a record recorded from another connection. Whatever it does, no page reaches guest memory with
bytes the server did not send: the record fails to open, the connection closes, the pages are
asked again on a new one, and every page ends right. An attacker that never stops only delays
until ``give_up_after``; then the handler fail-stops (SIGBUS, never wrong bytes). Both
protections are attacked: Noise (a token) and TLS 1.3 (x509).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import MiB, make_image, pages_of, verify

import pagewarden as pw

pytestmark = pytest.mark.usefixtures("uffd")

TOKEN = b"tamper-test-token-0123456789abcdef"
# Records this big carry page data (a page and more; the handshakes' records are smaller).
DATA_RECORD = 4096

ATTACKS = ("flip", "truncate", "replay", "reorder", "drop", "foreign")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


class Attacker:
    """A TCP relay that attacks the server's data records: the ``every``-th data record of a
    connection, ``budget`` times in all (``budget=None``: every data record, forever)."""

    def __init__(
        self, upstream: tuple[str, int], attack: str, tls: bool, budget: int | None, every: int
    ) -> None:
        self.upstream = upstream
        self.attack = attack
        self.tls = tls
        self.budget = budget
        self.every = every
        self.done = 0
        self.connections = 0
        # Data records seen, as (connection, index on it, record bytes), for "foreign".
        self.seen: list[tuple[int, int, bytes]] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        self._start(self._accept)

    @property
    def address(self) -> str:
        """ "host:port" to give the RemoteSource."""
        return f"127.0.0.1:{self.listener.getsockname()[1]}"

    def _start(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.socks += [client, server]
            with self.lock:
                self.connections += 1
                conn = self.connections
            self._start(self._pump, client, server)
            self._start(self._attack_answers, conn, server, client)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _record(self, src: socket.socket) -> bytes:
        if self.tls:
            head = _recv_exact(src, 5)
            return head + _recv_exact(src, struct.unpack(">H", head[3:5])[0])
        head = _recv_exact(src, 2)
        return head + _recv_exact(src, struct.unpack(">H", head)[0])

    def _take_turn(self) -> bool:
        with self.lock:
            if self.budget is not None and self.done >= self.budget:
                return False
            self.done += 1
            return True

    def _attack_answers(self, conn: int, src: socket.socket, dst: socket.socket) -> None:
        try:
            dst.sendall(_recv_exact(src, 24))  # the preamble's answer
            if not self.tls:
                dst.sendall(self._record(src))  # Noise's handshake reply
            index = 0
            held: bytes | None = None
            mine: list[bytes] = []
            while True:
                record = self._record(src)
                if len(record) < DATA_RECORD:
                    dst.sendall(record)
                    continue
                index += 1
                with self.lock:
                    self.seen.append((conn, index, record))
                mine.append(record)
                if held is not None:  # reorder: the later record first, then the held one
                    dst.sendall(record + held)
                    held = None
                    continue
                if index % self.every or not self._turn_for(conn, index, mine):
                    dst.sendall(record)
                    continue
                if self.attack == "flip":
                    b = bytearray(record)
                    b[len(b) // 2] ^= 0x10
                    dst.sendall(bytes(b))
                elif self.attack == "truncate":
                    dst.sendall(record[: len(record) // 2])
                    break
                elif self.attack == "replay":
                    dst.sendall(mine[-2] + record)
                elif self.attack == "reorder":
                    held = record
                elif self.attack == "drop":
                    pass
                elif self.attack == "foreign":
                    dst.sendall(self._foreign(conn, index) or record)
        except (OSError, ConnectionError):
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _turn_for(self, conn: int, index: int, mine: list[bytes]) -> bool:
        if self.attack == "replay" and len(mine) < 2:
            return False
        if self.attack == "foreign" and self._foreign(conn, index) is None:
            return False
        return self._take_turn()

    def _foreign(self, conn: int, index: int) -> bytes | None:
        """A data record of another connection, at the same position if there is one (the
        same sequence number under another key)."""
        with self.lock:
            others = [(i, r) for c, i, r in self.seen if c != conn]
        same = [r for i, r in others if i == index]
        return same[0] if same else (others[0][1] if others else None)

    def close(self) -> None:
        """Stops relaying and closes every socket."""
        self.stop.set()
        self.listener.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()
        for t in self.threads:
            t.join(timeout=5)


@pytest.fixture(params=["noise", "tls"])
def security(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, object]:
    """Keyword arguments that protect both ends: a token, or an x509 directory."""
    if request.param == "noise":
        return {"token": TOKEN}
    tls = tmp_path / "x509"
    pw.make_test_certificates(tls, days=1)
    return {"tls_dir": tls}


def _serve(image: bytes, security: dict[str, object]) -> pw.Server:
    return pw.serve(image, **security)  # type: ignore[arg-type]


@contextlib.contextmanager
def _attacker(
    server: pw.Server, security: dict[str, object], attack: str, **kw: object
) -> Iterator[Attacker]:
    assert server.address is not None
    a = Attacker(server.address, attack, tls="tls_dir" in security, **kw)  # type: ignore[arg-type]
    try:
        yield a
    finally:
        a.close()


@pytest.mark.parametrize("attack", ATTACKS)
def test_tampering_on_the_path_never_reaches_guest_memory(
    attack: str, security: dict[str, object]
) -> None:
    size = 16 * MiB
    image = make_image(size, 77)
    budget = 3
    with (
        _serve(image, security) as server,
        _attacker(server, security, attack, budget=budget, every=5) as mitm,
    ):
        mem = pw.GuestMemory.anonymous(size)
        with (
            pw.RemoteSource(mitm.address, give_up_after=30, **security) as source,  # type: ignore[arg-type]
            pw.Handler(mem, source, prefetch=True) as h,
        ):
            h.start()
            result = mem.touch(threads=2, order="random", seed=11)
            assert h.wait(timeout=60)
            h.check()
            # Every page holds the server's bytes: nothing the attacker made reached it.
            verify(mem, result, image, [])
            st = source.stats()
            assert mitm.done == budget, "the attacker did not get its turns"
            assert st["reconnects"] >= 1, st
            if attack != "truncate":
                # Each attack was caught by a record failing to open (not by luck in the
                # frame checks above it).
                assert st["records_rejected"] >= 1, st
            assert len(h.poison_set()) == 0


def test_an_attacker_who_never_stops_gets_a_fail_stop_not_wrong_bytes(
    security: dict[str, object],
) -> None:
    size = 4 * MiB
    image = make_image(size, 78)
    with (
        _serve(image, security) as server,
        _attacker(server, security, "flip", budget=None, every=1) as mitm,
    ):
        mem = pw.GuestMemory.anonymous(size)
        with (
            pw.RemoteSource(mitm.address, give_up_after=1.0, **security) as source,  # type: ignore[arg-type]
            pw.Handler(mem, source, prefetch=False) as h,
        ):
            h.start()
            touched = pages_of(mem)[:64:4]
            result = mem.touch(touched)
            # The whole run of 16 pages an urgent request asks for comes in one data
            # record: every touched page is fenced, none holds the attacker's bytes.
            assert sorted(result.poisoned) == touched
            assert source.stats()["records_rejected"] >= 1
            with pytest.raises(pw.SourceError, match="give_up_after"):
                h.check()
