"""pagewarden's page-server protocol (docs/protocol.md) written out independently in Python, for
tests that play a hostile or broken peer on either side of the connection."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass

MAGIC = b"PGWARDEN"
VERSION = 1
HEADER = struct.Struct("<BBHIQQ")  # kind, flags, reserved, payload_len, guest_address, length

HELLO, CHALLENGE, AUTH, WELCOME, REJECT = 1, 2, 3, 4, 5
REQUEST, DATA, ZERO, POISON, FAILED = 16, 17, 18, 19, 20
FLAG_URGENT = 1
BULK, URGENT = 0, 1

SERVER_LABEL = b"pagewarden v1 server proof"
CLIENT_LABEL = b"pagewarden v1 client proof"


def frame(
    kind: int, guest_address: int = 0, length: int = 0, payload: bytes = b"", flags: int = 0
) -> bytes:
    """One frame: the 24-byte header and its payload."""
    return HEADER.pack(kind, flags, 0, len(payload), guest_address, length) + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
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


def recv_frame(sock: socket.socket) -> Frame:
    """One frame (header and payload)."""
    kind, flags, _reserved, plen, gpa, length = HEADER.unpack(recv_exact(sock, HEADER.size))
    return Frame(kind, flags, gpa, length, recv_exact(sock, plen) if plen else b"")


def _mac(token: bytes, label: bytes, *parts: bytes) -> bytes:
    m = hmac.new(token, label, hashlib.sha256)
    for p in parts:
        m.update(p)
    return m.digest()


def client_handshake(
    sock: socket.socket, token: bytes, role: int = BULK
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
    sock: socket.socket,
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
