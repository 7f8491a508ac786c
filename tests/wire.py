"""pagewarden's page-server protocol (docs/protocol.md) written out independently in Python, for
tests that play a hostile or broken peer on either side of the connection."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from noise.connection import NoiseConnection  # type: ignore[import-untyped]

MAGIC = b"PGWARDEN"
VERSION = 2
HEADER = struct.Struct("<BBHIQQ")  # kind, flags, reserved, payload_len, guest_address, length

# The preamble's protection modes.
PLAIN, NOISE, TLS = 0, 1, 2
NOISE_NAME = b"Noise_NNpsk0_25519_AESGCM_SHA256"

HELLO, CHALLENGE, AUTH, WELCOME, REJECT = 1, 2, 3, 4, 5
REQUEST, DATA, ZERO, POISON, FAILED = 16, 17, 18, 19, 20
FLAG_URGENT = 1
BULK, URGENT = 0, 1

SERVER_LABEL = b"pagewarden v2 server proof"
CLIENT_LABEL = b"pagewarden v2 client proof"


class Conn(Protocol):
    """What the frame functions need of a connection: a socket or a channel over one."""

    def sendall(self, data: bytes, /) -> Any: ...
    def recv(self, n: int, /) -> bytes: ...


def psk_of(token: bytes) -> bytes:
    """Noise's pre-shared key for a token."""
    return hashlib.sha256(b"pagewarden v2 noise psk" + token).digest()


def preamble(mode: int, version: int = VERSION) -> bytes:
    """The client's 24-byte preamble."""
    return MAGIC + struct.pack("<HB13x", version, mode)


def answer(mode: int, refused: str | None = None) -> bytes:
    """The server's 24-byte answer to a preamble (and the reason, when refused)."""
    if refused is None:
        return MAGIC + struct.pack("<HBBH10x", VERSION, mode, 0, 0)
    text = refused.encode()
    return MAGIC + struct.pack("<HBBH10x", VERSION, mode, 1, len(text)) + text


class NoiseChannel:
    """Frames over Noise records (2-byte big-endian length, ciphertext), written from the
    specification on the ``noiseprotocol`` package: an implementation independent of snow."""

    def __init__(self, sock: socket.socket, noise: NoiseConnection) -> None:
        self.sock = sock
        self.noise = noise
        self.pending = b""

    def sendall(self, data: bytes) -> None:
        """Seals ``data`` into records and sends them."""
        out = bytearray()
        for i in range(0, max(len(data), 1), 65519):
            record = self.noise.encrypt(bytes(data[i : i + 65519]))
            out += struct.pack(">H", len(record)) + record
        self.sock.sendall(bytes(out))

    def seal(self, data: bytes) -> bytes:
        """One record (length and ciphertext), sealed but not sent."""
        record: bytes = self.noise.encrypt(data)
        return struct.pack(">H", len(record)) + record

    def recv(self, n: int) -> bytes:
        """Up to ``n`` plaintext bytes; b"" at the end of the stream."""
        while not self.pending:
            head = _recv_or_eof(self.sock, 2)
            if not head:
                return b""
            (length,) = struct.unpack(">H", head)
            self.pending = self.noise.decrypt(recv_exact(self.sock, length))
        out, self.pending = self.pending[:n], self.pending[n:]
        return out

    def close(self) -> None:
        """Closes the socket."""
        self.sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def _recv_or_eof(sock: socket.socket, n: int) -> bytes:
    first = sock.recv(n)
    if not first:
        return b""
    return first + (recv_exact(sock, n - len(first)) if len(first) < n else b"")


def _noise(initiator: bool, token: bytes, prologue: bytes) -> NoiseConnection:
    """A Noise handshake of the token, started, for either end."""
    noise = NoiseConnection.from_name(NOISE_NAME)
    if initiator:
        noise.set_as_initiator()
    else:
        noise.set_as_responder()
    noise.set_psks(psk=psk_of(token))
    noise.set_prologue(prologue)
    noise.start_handshake()
    return noise


def client_channel(
    sock: socket.socket,
    token: bytes | None,
    tls_dir: Path | None = None,
    server_name: str = "localhost",
) -> Conn:
    """The preamble, then Noise (a token), TLS (``tls_dir``) or nothing: a connection to send
    frames on."""
    mode = TLS if tls_dir is not None else NOISE if token else PLAIN
    sock.sendall(preamble(mode))
    reply = recv_exact(sock, 24)
    assert reply[:8] == MAGIC, reply
    if reply[11] == 1:
        (n,) = struct.unpack_from("<H", reply, 12)
        raise PermissionError(recv_exact(sock, n).decode(errors="replace"))
    if tls_dir is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(tls_dir / "ca-cert.pem")
        ctx.load_cert_chain(tls_dir / "client-cert.pem", tls_dir / "client-key.pem")
        return ctx.wrap_socket(sock, server_hostname=server_name)
    if mode == PLAIN:
        return sock
    assert token is not None
    noise = _noise(True, token, preamble(mode) + reply)
    msg = noise.write_message()
    sock.sendall(struct.pack(">H", len(msg)) + msg)
    head = _recv_or_eof(sock, 2)
    if not head:
        raise PermissionError("the server closed the connection in the Noise handshake")
    (n,) = struct.unpack(">H", head)
    noise.read_message(recv_exact(sock, n))
    assert noise.handshake_finished
    return NoiseChannel(sock, noise)


def server_channel(sock: socket.socket, token: bytes | None) -> Conn:
    """A server's side of :func:`client_channel` (Noise with a token, else plaintext)."""
    theirs = recv_exact(sock, 24)
    assert theirs[:8] == MAGIC, theirs
    mode = NOISE if token else PLAIN
    ours = answer(mode)
    sock.sendall(ours)
    if mode == PLAIN:
        return sock
    assert token is not None
    noise = _noise(False, token, theirs + ours)
    (n,) = struct.unpack(">H", recv_exact(sock, 2))
    noise.read_message(recv_exact(sock, n))
    msg = noise.write_message()
    sock.sendall(struct.pack(">H", len(msg)) + msg)
    return NoiseChannel(sock, noise)


def frame(
    kind: int, guest_address: int = 0, length: int = 0, payload: bytes = b"", flags: int = 0
) -> bytes:
    """One frame: the 24-byte header and its payload."""
    return HEADER.pack(kind, flags, 0, len(payload), guest_address, length) + payload


def recv_exact(sock: Conn, n: int) -> bytes:
    """Exactly ``n`` bytes, or ConnectionError at the end of the stream."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


@dataclass
class Frame:
    kind: int
    flags: int
    guest_address: int
    length: int
    payload: bytes


def recv_frame(sock: Conn) -> Frame:
    """One frame (header and payload)."""
    kind, flags, _reserved, plen, gpa, length = HEADER.unpack(recv_exact(sock, HEADER.size))
    return Frame(kind, flags, gpa, length, recv_exact(sock, plen) if plen else b"")


def _mac(token: bytes, label: bytes, *parts: bytes) -> bytes:
    m = hmac.new(token, label, hashlib.sha256)
    for p in parts:
        m.update(p)
    return m.digest()


def client_handshake(
    sock: Conn, token: bytes, role: int = BULK
) -> tuple[int, int, list[tuple[int, int]]]:
    """Authenticates as a client; returns (page_size, memory_size, poison ranges)."""
    nonce = os.urandom(32)
    hello = MAGIC + struct.pack("<HB5x", VERSION, role) + nonce
    sock.sendall(frame(HELLO, payload=hello))
    f = recv_frame(sock)
    if f.kind == REJECT:
        raise PermissionError(f.payload.decode(errors="replace"))
    assert f.kind == CHALLENGE, f.kind
    p = f.payload
    assert p[:8] == MAGIC
    page_size, memory_size = struct.unpack_from("<QQ", p, 16)
    server_nonce, proof = p[32:64], p[64:96]
    if not hmac.compare_digest(
        proof, _mac(token, SERVER_LABEL, nonce, server_nonce, bytes([role]))
    ):
        raise PermissionError("the server's proof does not verify")
    sock.sendall(frame(AUTH, payload=_mac(token, CLIENT_LABEL, server_nonce, nonce, bytes([role]))))
    f = recv_frame(sock)
    if f.kind == REJECT:
        raise PermissionError(f.payload.decode(errors="replace"))
    assert f.kind == WELCOME, f.kind
    poison = []
    for _ in range(f.length):
        p2 = recv_frame(sock)
        assert p2.kind == POISON
        poison.append((p2.guest_address, p2.length))
    return page_size, memory_size, poison


def server_handshake(
    sock: Conn,
    token: bytes,
    page_size: int,
    memory_size: int,
    poison: list[tuple[int, int]] | None = None,
) -> int:
    """Authenticates a client as a server would; returns its role."""
    f = recv_frame(sock)
    assert f.kind == HELLO and f.payload[:8] == MAGIC
    role = f.payload[10]
    client_nonce = f.payload[16:48]
    nonce = os.urandom(32)
    proof = _mac(token, SERVER_LABEL, client_nonce, nonce, bytes([role]))
    payload = MAGIC + struct.pack("<H6xQQ", VERSION, page_size, memory_size) + nonce + proof
    sock.sendall(frame(CHALLENGE, payload=payload))
    f = recv_frame(sock)
    assert f.kind == AUTH
    want = _mac(token, CLIENT_LABEL, nonce, client_nonce, bytes([role]))
    if not hmac.compare_digest(f.payload, want):
        sock.sendall(frame(REJECT, payload=b"authentication failed"))
        raise PermissionError("wrong token")
    poison = poison or []
    sock.sendall(frame(WELCOME, length=len(poison)))
    for a, n in poison:
        sock.sendall(frame(POISON, a, n))
    return role
