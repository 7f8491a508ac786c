"""The source host's page server (``pw.serve``, ``pagewarden serve``) against real sockets:
well-behaved and hostile clients at the same time, stalled readers, the token rules, the CLI,
and another process's memory with a poisoned page.

``RawClient`` speaks protocol 2 from the specification (docs/protocol.md): the preamble, Noise
from the ``noiseprotocol`` package (tests/wire.py) and the frame handshake with
``hmac``/``hashlib``, so these tests also pin the wire format down independently of the Rust
client.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import wire
from conftest import PAGE, SETTLE_LIMIT, pagewarden_process, unavailable

import pagewarden as pw

HEADER = struct.Struct("<BBHIQQ")
MAGIC = b"PGWARDEN"
HELLO, CHALLENGE, AUTH, WELCOME, REJECT = 1, 2, 3, 4, 5
REQUEST, DATA, ZERO, POISON, FAILED = 16, 17, 18, 19, 20
FLAG_URGENT = 1
BULK, URGENT = 0, 1
TOKEN = b"test token: 0123456789abcdef"
MAX_DATA = 4 << 20

Frame = tuple[int, int, int, bytes]


def frame(
    kind: int, guest_address: int = 0, length: int = 0, payload: bytes = b"", flags: int = 0
) -> bytes:
    return HEADER.pack(kind, flags, 0, len(payload), guest_address, length) + payload


class RawClient:
    """A protocol 2 client written from the specification: ``raw`` is the socket, ``sock`` the
    connection frames travel on (the Noise channel once :meth:`handshake` opened it)."""

    def __init__(self, address: tuple[str, int], token: bytes = TOKEN, role: int = BULK) -> None:
        self.raw = socket.create_connection(address, timeout=SETTLE_LIMIT)
        self.sock: wire.Conn = self.raw
        self.token = token
        self.role = role
        self.page_size = 0
        self.memory_size = 0
        self.poison: list[tuple[int, int]] = []

    def close(self) -> None:
        self.raw.close()

    def recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"connection closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    def header(self) -> tuple[int, int, int, int, int]:
        kind, flags, _reserved, payload_len, guest_address, length = HEADER.unpack(
            self.recv_exact(HEADER.size)
        )
        return kind, flags, payload_len, guest_address, length

    def handshake(self) -> None:
        """The preamble and the channel, then HELLO, CHALLENGE (check the server's proof), AUTH,
        WELCOME and the poison list."""
        self.sock = wire.client_channel(self.raw, self.token or None)
        client_nonce = os.urandom(32)
        hello = MAGIC + struct.pack("<HB5x", 2, self.role) + client_nonce
        self.sock.sendall(frame(HELLO, payload=hello))
        kind, _, payload_len, _, _ = self.header()
        assert kind == CHALLENGE, kind
        c = self.recv_exact(payload_len)
        assert c[:8] == MAGIC and struct.unpack("<H", c[8:10])[0] == 2
        self.page_size, self.memory_size = struct.unpack("<QQ", c[16:32])
        server_nonce, proof = c[32:64], c[64:96]
        role = bytes([self.role])
        expected = hmac.new(
            self.token,
            b"pagewarden v2 server proof" + client_nonce + server_nonce + role,
            hashlib.sha256,
        ).digest()
        if not hmac.compare_digest(proof, expected):
            raise PermissionError("the server does not know our token")
        ours = hmac.new(
            self.token,
            b"pagewarden v2 client proof" + server_nonce + client_nonce + role,
            hashlib.sha256,
        ).digest()
        self.sock.sendall(frame(AUTH, payload=ours))
        kind, _, payload_len, _, count = self.header()
        if kind == REJECT:
            raise PermissionError(self.recv_exact(payload_len).decode())
        assert kind == WELCOME, kind
        for _ in range(count):
            kind, _, _, guest_address, length = self.header()
            assert kind == POISON
            self.poison.append((guest_address, length))

    def request(self, guest_address: int, length: int, flags: int = 0) -> list[Frame]:
        """Sends one REQUEST and reads the frames that tile it, checking the tiling."""
        self.sock.sendall(frame(REQUEST, guest_address, length, flags=flags))
        frames: list[Frame] = []
        at = guest_address
        while at < guest_address + length:
            kind, _, payload_len, frame_address, frame_length = self.header()
            assert frame_address == at, f"frame at {frame_address:#x}, expected {at:#x}"
            assert kind in (DATA, ZERO, POISON, FAILED), kind
            payload = self.recv_exact(payload_len)
            frames.append((kind, frame_address, frame_length, payload))
            at += frame_length
        assert at == guest_address + length
        return frames

    def closed_by_server(self) -> bool:
        """True once the server has closed this connection (EOF or reset), reading what's left."""
        try:
            while self.sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            pass
        return True


def pages(frames: list[Frame], page_size: int = PAGE) -> dict[int, tuple[int, bytes]]:
    """Per page: (kind, its bytes for DATA/ZERO)."""
    out: dict[int, tuple[int, bytes]] = {}
    for kind, at, length, payload in frames:
        for off in range(0, length, page_size):
            if kind == DATA:
                out[at + off] = (kind, payload[off : off + page_size])
            elif kind == ZERO:
                out[at + off] = (kind, bytes(page_size))
            else:
                out[at + off] = (kind, b"")
    return out


def image(n_pages: int) -> bytearray:
    """Page i holds the byte (i * 7 + 1) % 256 repeated, except every fifth page is zero."""
    data = bytearray(n_pages * PAGE)
    for i in range(n_pages):
        if i % 5 != 4:
            data[i * PAGE : (i + 1) * PAGE] = bytes([(i * 7 + 1) % 256]) * PAGE
    return data


def settle(server: pw.Server, check: Callable[[dict[str, int]], bool]) -> dict[str, int]:
    """Server.stats() once ``check`` holds (counters trail the connection close by a moment)."""
    deadline = time.monotonic() + SETTLE_LIMIT
    while True:
        st = server.stats()
        if check(st):
            return st
        assert time.monotonic() < deadline, f"stats never settled: {st}"
        time.sleep(0.005)


@pytest.fixture
def served() -> Iterator[tuple[pw.Server, bytearray]]:
    data = image(64)
    with pw.serve(data, poison=pw.PoisonSet([6 * PAGE, 7 * PAGE]), token=TOKEN) as server:
        yield server, data


def check_pages(client: RawClient, data: bytearray, poison: set[int]) -> None:
    got = pages(client.request(0, len(data), flags=FLAG_URGENT))
    for at in range(0, len(data), PAGE):
        kind, page = got[at]
        if at in poison:
            assert kind == POISON, f"page {at:#x}"
        else:
            want = data[at : at + PAGE]
            assert page == want, f"page {at:#x}"
            assert kind == (ZERO if want == bytes(PAGE) else DATA)


def test_a_client_gets_data_zero_and_poison(served: tuple[pw.Server, bytearray]) -> None:
    server, data = served
    c = RawClient(server.address)  # type: ignore[arg-type]
    c.handshake()
    assert (c.page_size, c.memory_size) == (PAGE, len(data))
    assert c.poison == [(6 * PAGE, 2 * PAGE)]
    check_pages(c, data, {6 * PAGE, 7 * PAGE})
    # A range inside one poisoned run, and one that starts in poison and ends in data.
    assert [f[:3] for f in c.request(7 * PAGE, PAGE)] == [(POISON, 7 * PAGE, PAGE)]
    kinds = [f[0] for f in c.request(6 * PAGE, 4 * PAGE)]
    assert kinds == [POISON, DATA, ZERO]
    c.close()
    st = settle(server, lambda s: s["connections_active"] == 0)
    assert st["requests"] == 3 and st["urgent_requests"] == 1
    assert st["pages_poison"] == 2 + 1 + 2
    assert st["protocol_errors"] == st["auth_failures"] == 0


def _garbage(c: RawClient) -> None:
    c.raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


def _wrong_token(c: RawClient) -> None:
    c.token = b"not the token, but long enough"
    with pytest.raises(PermissionError, match="Noise handshake"):
        c.handshake()


def _truncated_preamble(c: RawClient) -> None:
    c.raw.sendall(wire.preamble(wire.NOISE)[:10])
    c.raw.shutdown(socket.SHUT_WR)


def _version_1(c: RawClient) -> None:
    """A client of protocol 1 (plaintext HELLO) is answered in its own framing, with why."""
    hello = MAGIC + struct.pack("<HB5x", 1, BULK) + bytes(32)
    c.raw.sendall(frame(HELLO, payload=hello))
    kind, _, payload_len, _, _ = c.header()
    assert kind == REJECT
    assert "protocol version 1 is not supported" in c.recv_exact(payload_len).decode()


def _plaintext_to_a_token_server(c: RawClient) -> None:
    """Nobody on the path can talk a server down to plaintext: it refuses, saying why."""
    with pytest.raises(PermissionError, match="speaks Noise"):
        wire.client_channel(c.raw, None)


def _tampered_request(c: RawClient) -> None:
    """One bit flipped in a sealed REQUEST: the record does not open, the server closes."""
    c.handshake()
    assert isinstance(c.sock, wire.NoiseChannel)
    record = bytearray(c.sock.seal(frame(REQUEST, 0, PAGE)))
    record[10] ^= 0x04
    c.raw.sendall(bytes(record))


def _truncated_request(c: RawClient) -> None:
    c.handshake()
    c.sock.sendall(frame(REQUEST, 0, PAGE)[:13])
    c.raw.shutdown(socket.SHUT_WR)


def _after_handshake(payload: bytes) -> Callable[[RawClient], None]:
    def hostile(c: RawClient) -> None:
        c.handshake()
        c.sock.sendall(payload)

    return hostile


HOSTILE: dict[str, tuple[Callable[[RawClient], None], str]] = {
    "garbage": (_garbage, "protocol_errors"),
    "wrong-token": (_wrong_token, "auth_failures"),
    "truncated-preamble": (_truncated_preamble, "connection_errors"),
    "version-1": (_version_1, "protocol_errors"),
    "plaintext-client": (_plaintext_to_a_token_server, "protocol_errors"),
    "tampered-request": (_tampered_request, "records_rejected"),
    "truncated-request": (_truncated_request, "connection_errors"),
    "out-of-range": (_after_handshake(frame(REQUEST, 64 * PAGE, PAGE)), "protocol_errors"),
    "wrapping": (_after_handshake(frame(REQUEST, (1 << 64) - PAGE, 2 * PAGE)), "protocol_errors"),
    "misaligned": (_after_handshake(frame(REQUEST, 100, PAGE)), "protocol_errors"),
    "empty": (_after_handshake(frame(REQUEST, 0, 0)), "protocol_errors"),
    "oversized": (_after_handshake(frame(REQUEST, 0, 2 * MAX_DATA)), "protocol_errors"),
    "unknown-flag": (_after_handshake(frame(REQUEST, 0, PAGE, flags=2)), "protocol_errors"),
    "data-from-client": (_after_handshake(frame(DATA, 0, PAGE, bytes(PAGE))), "protocol_errors"),
    "second-hello": (_after_handshake(frame(HELLO, payload=bytes(48))), "protocol_errors"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_peer_is_dropped_and_counted_while_another_client_is_served(
    served: tuple[pw.Server, bytearray], name: str
) -> None:
    server, data = served
    behave, counter = HOSTILE[name]
    good = RawClient(server.address, role=URGENT)  # type: ignore[arg-type]
    good.handshake()
    check_pages(good, data, {6 * PAGE, 7 * PAGE})
    bad = RawClient(server.address)  # type: ignore[arg-type]
    behave(bad)
    assert bad.closed_by_server()
    st = settle(server, lambda s: s[counter] == 1 and s["connections_active"] == 1)
    others = {"protocol_errors", "auth_failures", "connection_errors", "records_rejected"}
    others -= {counter}
    assert all(st[o] == 0 for o in others), st
    # The well-behaved client, connected all along, is still served correctly.
    check_pages(good, data, {6 * PAGE, 7 * PAGE})
    good.close()
    bad.close()


def test_a_client_that_stops_reading_stalls_nobody_and_is_dropped() -> None:
    data = image(2048)  # 8 MiB
    with pw.serve(data, token=TOKEN, write_timeout=1.0) as server:
        stalled = RawClient(server.address)  # type: ignore[arg-type]
        stalled.raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.handshake()
        # 256 MiB of replies asked for and never read: the server's writes to it block.
        stalled.sock.sendall(b"".join(frame(REQUEST, 0, MAX_DATA) for _ in range(64)))
        settle(server, lambda s: s["requests"] >= 1)
        good = RawClient(server.address)  # type: ignore[arg-type]
        good.handshake()
        for _ in range(3):
            got = pages(good.request(0, MAX_DATA))
            assert all(got[a][1] == data[a : a + PAGE] for a in range(0, MAX_DATA, PAGE))
        # The write timeout drops the stalled client; the good one is still connected.
        st = settle(server, lambda s: s["connection_errors"] == 1)
        assert st["connections_active"] == 1
        got = pages(good.request(MAX_DATA, PAGE))
        assert got[MAX_DATA][1] == data[MAX_DATA : MAX_DATA + PAGE]
        good.close()
        stalled.close()


def test_serve_socket_serves_a_connected_socket(served: tuple[pw.Server, bytearray]) -> None:
    server, data = served
    ours, theirs = socket.socketpair()
    server.serve_socket(theirs)
    theirs.close()  # the server holds its own duplicate
    c = RawClient.__new__(RawClient)
    c.raw, c.token, c.role, c.poison = ours, TOKEN, BULK, []
    c.raw.settimeout(SETTLE_LIMIT)
    c.handshake()
    check_pages(c, data, {6 * PAGE, 7 * PAGE})
    c.close()


def test_token_rules() -> None:
    data = bytes(4 * PAGE)
    with pytest.raises(pw.ConfigurationError, match="loopback"):
        pw.serve(data, listen="0.0.0.0:0", insecure_no_token=True)
    with pytest.raises(pw.ConfigurationError, match=r"head -c 32 /dev/urandom \| base64"):
        pw.serve(data)
    with pytest.raises(pw.ConfigurationError, match="at least 16"):
        pw.serve(data, token="short")
    with pytest.raises(TypeError):
        pw.serve(data, token=12345)  # type: ignore[arg-type]
    with pw.serve(data, insecure_no_token=True) as server:
        c = RawClient(server.address, token=b"")  # type: ignore[arg-type]
        c.handshake()
        assert pages(c.request(0, PAGE))[0][0] == ZERO
        c.close()
    server.close()  # idempotent


def test_close_shuts_connections_and_stops_accepting(served: tuple[pw.Server, bytearray]) -> None:
    server, _ = served
    address = server.address
    c = RawClient(address)  # type: ignore[arg-type]
    c.handshake()
    server.close()
    assert c.closed_by_server()
    c.close()
    with pytest.raises(OSError):
        RawClient(address).handshake()  # type: ignore[arg-type]
    assert server.stats()["connections_active"] == 0


# ---------------------------------------------------------------------------------------------
# CLI


def _cli(*args: str) -> subprocess.Popen[str]:
    return pagewarden_process("serve", *args)


def test_cli_serve_prints_its_address_first_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    data = image(16)
    (tmp_path / "guest.img").write_bytes(data)
    (tmp_path / "token").write_bytes(TOKEN + b"\n")
    pw.PoisonSet([3 * PAGE]).save(tmp_path / "poison.json")
    proc = _cli(
        str(tmp_path / "guest.img"),
        "--listen",
        "127.0.0.1:0",
        "--token-file",
        str(tmp_path / "token"),
        "--poison",
        str(tmp_path / "poison.json"),
        "--progress-interval",
        "0.05",
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        m = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", first)
        assert m, f"first line {first!r}"
        port = int(m.group(1))
        assert port != 0
        c = RawClient(("127.0.0.1", port))
        c.handshake()
        assert c.poison == [(3 * PAGE, PAGE)]
        check_pages(c, data, {3 * PAGE})
        c.close()
        time.sleep(0.5)  # room for a few status lines (every 0.05 s while something changes)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=SETTLE_LIMIT)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    summary = out.splitlines()[-1]
    assert summary.startswith(
        "served 1 requests (1 urgent) on 1 connections: 12 pages sent, 3 zero, 1 poison"
    )
    # Progress on stderr, and only while something changes (not a line per interval).
    status = [line for line in err.splitlines() if line.startswith("serving: ")]
    assert status and "1 requests (1 urgent)" in status[-1], err
    assert len(status) <= 3, status


def _blocked_masks(pid: int) -> dict[str, int]:
    """The SigBlk mask of every thread of ``pid`` but the main one, by "name (tid)"."""
    masks = {}
    for task in sorted(os.listdir(f"/proc/{pid}/task")):
        if int(task) == pid:
            continue
        try:
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except FileNotFoundError:
            continue
        name = re.search(r"^Name:\s*(.*)$", status, re.M)
        blocked = re.search(r"^SigBlk:\s*([0-9a-f]+)$", status, re.M)
        assert name and blocked, status
        masks[f"{name.group(1)} ({task})"] = int(blocked.group(1), 16)
    return masks


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serve_stops_cleanly_on_a_signal_and_no_other_thread_can_take_it(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """The kernel hands a process-wide signal to any thread that does not block it, and one at
    its default action there would end the server with no summary (seen once in CI: exit -15).
    Every thread but the main one blocks SIGINT and SIGTERM, and the server stops cleanly."""
    (tmp_path / "guest.img").write_bytes(image(4))
    proc = _cli(str(tmp_path / "guest.img"), "--listen", "127.0.0.1:0", "--insecure-no-token")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening on ")
        masks = _blocked_masks(proc.pid)
        assert len(masks) >= 2, masks  # the accept thread and the log bridge at least
        for thread, mask in masks.items():
            for s in (signal.SIGINT, signal.SIGTERM):
                assert mask & (1 << (s - 1)), f"{thread} can take {s.name}: SigBlk {mask:#x}"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=SETTLE_LIMIT)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines()[-1].startswith("served 0 requests"), out


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("image", ["--token-file", "{tmp}/missing"], "cannot read the token file"),
        ("image", ["--token-file", "{tmp}/short"], "at least 16"),
        ("image", [], "--token-file or --tls-dir is required"),
        (None, ["--token-file", "{tmp}/token"], "does not exist"),
        ("pid", ["--map", "0:zz:4096", "--token-file", "{tmp}/token"], "HOST_ADDR 'zz'"),
        ("pid", ["--map", "0:4096", "--token-file", "{tmp}/token"], "not GUEST_ADDR:HOST_ADDR:LEN"),
        ("pid", ["--token-file", "{tmp}/token"], "at least one --map"),
        ("image", ["--insecure-no-token", "--listen", "0.0.0.0:0"], "loopback"),
    ],
)
def test_cli_serve_bad_input_exits_2_with_a_clear_message(
    tmp_path: Path, setup: str | None, args: list[str], message: str
) -> None:
    (tmp_path / "token").write_text("a good enough token for tests\n")
    (tmp_path / "short").write_text("short\n")
    (tmp_path / "guest.img").write_bytes(bytes(PAGE))
    lead = {
        "image": [str(tmp_path / "guest.img")],
        "pid": ["--pid", str(os.getpid())],
        None: [str(tmp_path / "nope.img")],
    }[setup]
    proc = _cli(*lead, *(a.format(tmp=tmp_path) for a in args))
    out, err = proc.communicate(timeout=SETTLE_LIMIT * 3)
    assert proc.returncode == 2, (out, err)
    assert message in err, err
    assert "Traceback" not in err
    assert out == ""


# ---------------------------------------------------------------------------------------------
# Another process's memory, with a page poisoned by userfaultfd

CHILD = textwrap.dedent(
    """
    import sys
    import pagewarden as pw

    PAGE = 4096
    image = b"".join(bytes([(i * 7 + 1) % 256]) * PAGE for i in range(8))
    mem = pw.GuestMemory.anonymous(8 * PAGE)
    handler = pw.Handler(mem, pw.MemorySource(image), poison=pw.PoisonSet([3 * PAGE]))
    handler.start()
    assert handler.wait(timeout=30)
    print(mem.address, flush=True)
    sys.stdin.read()
    handler.close()
    """
)


def test_serving_another_process_reports_its_uffd_poisoned_page(uffd: None) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        line = child.stdout.readline()
        assert line, "the child exited before printing its address"
        address = int(line)
        source = pw.ProcessMemory(child.pid, [(0, address, 8 * PAGE)])
        try:
            server = pw.serve(source, token=TOKEN)
        except pw.PagewardenError as e:  # pragma: no cover - depends on the machine
            unavailable(f"cannot serve another process's memory here: {e}")
        with server:
            c = RawClient(server.address)  # type: ignore[arg-type]
            c.handshake()
            assert c.poison == []
            got = pages(c.request(0, 8 * PAGE))
            for i in range(8):
                kind, page = got[i * PAGE]
                if i == 3:
                    assert kind == POISON
                else:
                    if kind == FAILED:  # pragma: no cover - ptrace not allowed here
                        unavailable("process_vm_readv on a child is not permitted here (yama?)")
                    assert (kind, page) == (DATA, bytes([(i * 7 + 1) % 256]) * PAGE), f"page {i}"
            assert 3 * PAGE in server.poison_set()
            assert len(server.poison_set()) == 1
            st = server.stats()
            assert st["poison_discovered"] == 1 and st["pages_poison"] == 1
            # A new destination learns of it up front.
            c2 = RawClient(server.address)  # type: ignore[arg-type]
            c2.handshake()
            assert c2.poison == [(3 * PAGE, PAGE)]
            c.close()
            c2.close()
        child.stdin.close()
        assert child.wait(timeout=SETTLE_LIMIT) == 0
    finally:
        child.kill()
        child.wait()
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()


def test_process_memory_maps_are_validated() -> None:
    with pytest.raises(pw.ConfigurationError, match="aligned"):
        pw.serve(pw.ProcessMemory(os.getpid(), [(0, 0x10001, PAGE)]), token=TOKEN)
    with pytest.raises(pw.ConfigurationError, match="overlap"):
        pw.serve(
            pw.ProcessMemory(os.getpid(), [(0, 0x10000, 2 * PAGE), (PAGE, 0x40000, PAGE)]),
            token=TOKEN,
        )


# ---------------------------------------------------------------------------------------------
# Mutual TLS, spoken by an independent TLS 1.3 stack (Python's ssl, OpenSSL)


def test_mutual_tls_with_an_independent_tls_stack(tmp_path: Path) -> None:
    """After the preamble the stream is TLS 1.3 as RFC 8446 defines it: OpenSSL, through
    Python's ``ssl``, completes the handshake with its client certificate and exchanges frames
    with the server's records; a client certificate of another CA is refused and counted."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    pw.make_test_certificates(ours, days=1)
    pw.make_test_certificates(theirs, days=1)
    data = image(16)
    with pw.serve(data, tls_dir=ours) as server:
        assert server.address is not None
        raw = socket.create_connection(server.address, timeout=SETTLE_LIMIT)
        tls = wire.client_channel(raw, None, tls_dir=ours, server_name="127.0.0.1")
        assert tls.version() == "TLSv1.3"  # type: ignore[attr-defined]
        page_size, memory_size, poison = wire.client_handshake(tls, b"")
        assert (page_size, memory_size, poison) == (PAGE, len(data), [])
        tls.sendall(wire.frame(wire.REQUEST, 2 * PAGE, PAGE))
        f = wire.recv_frame(tls)
        want = bytes(data[2 * PAGE : 3 * PAGE])
        assert (f.kind, f.guest_address, f.payload) == (DATA, 2 * PAGE, want)
        tls.close()  # type: ignore[attr-defined]
        # Another CA's client certificate: the TLS handshake fails, nothing is served.
        raw = socket.create_connection(server.address, timeout=SETTLE_LIMIT)
        bad = None
        try:
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                bad = wire.client_channel(raw, None, tls_dir=theirs, server_name="127.0.0.1")
                wire.client_handshake(bad, b"")
        finally:
            (bad or raw).close()  # type: ignore[union-attr]
        settle(server, lambda s: s["auth_failures"] == 1)
        # A token client (Noise) is refused with the reason.
        raw = socket.create_connection(server.address, timeout=SETTLE_LIMIT)
        with pytest.raises(PermissionError, match="speaks TLS"):
            wire.client_channel(raw, TOKEN)
        raw.close()
