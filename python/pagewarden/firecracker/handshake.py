"""Firecracker's UFFD handshake: the listening socket, who may connect, and the one message.

Firecracker restores a snapshot with an external handler by connecting to the handler's Unix
socket and sending one message: a JSON array of ``GuestRegionUffdMapping`` objects (no framing,
no newline) with exactly one file descriptor, the uffd, in SCM_RIGHTS. Everything here is checked
before anything touches guest memory.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import itertools
import json
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pagewarden as pw

#: The largest handshake accepted; Firecracker's is a few hundred bytes per region.
MAX_HANDSHAKE = 1 << 20
#: Room for this many descriptors in the ancillary data, so that "too many" can be seen.
MAX_FDS = 8
#: Page sizes Firecracker backs guest memory with: 4 KiB, or 2 MiB hugetlbfs.
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
    """SO_PEERCRED of the connected peer (pid 0: the peer is in a pid namespace we cannot see
    into)."""

    pid: int
    uid: int
    gid: int


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


def _descriptor_count_message(count: int) -> str:
    if count == 3:
        # Firecracker's secret-hiding work (guest_memfd) sends the uffd, the guest_memfd and a
        # bitmap memfd: a protocol of its own that this handler does not speak.
        return (
            "got 3 descriptors: that is the handshake of Firecracker's secret-hiding "
            "(guest_memfd) restore, which sends the uffd, the guest_memfd and a bitmap memfd; "
            "pagewarden serves the released protocol (exactly one descriptor, the uffd): restore "
            "without secret hiding"
        )
    return f"expected exactly one descriptor (the uffd), got {count}"


@dataclass
class Message:
    """What the peer sent: the bytes, the descriptors that came with them, and why the message
    is unusable (None when it is a whole JSON value with exactly one descriptor). The caller owns
    ``fds`` and closes them."""

    payload: bytes
    fds: list[int]
    problem: str | None

    def uffd(self) -> int | None:
        """The peer's uffd, when one of the descriptors is one: the first, in every protocol
        Firecracker speaks. Used to fence the peer's memory when a refusal cannot kill it."""
        for fd in self.fds[:1]:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]":
                    return fd
        return None

    def close(self) -> None:
        """Closes every descriptor received."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def receive_message(conn: socket.socket, timeout: float = 10.0) -> Message:
    """Receives the handshake message. Never raises for what the peer sent (a refusal must
    still be able to fence with the uffd that came with a bad message): ``Message.problem``
    says what is wrong. Raises OSError only if the socket itself fails."""
    conn.settimeout(timeout)
    fds: list[int] = []
    chunks: list[bytes] = []
    total = 0
    problem: str | None = None
    while True:
        try:
            data, ancdata, flags, _ = conn.recvmsg(
                65536, socket.CMSG_SPACE(MAX_FDS * struct.calcsize("i"))
            )
        except TimeoutError:
            if not chunks:
                problem = f"nothing received within {timeout} s"
            break
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(cdata) - len(cdata) % struct.calcsize("i")
                fds.extend(struct.unpack(f"{usable // 4}i", cdata[:usable]))
        if flags & socket.MSG_CTRUNC:
            problem = f"more than {MAX_FDS} descriptors were sent; expected exactly one"
            break
        if not data:
            break
        chunks.append(data)
        total += len(data)
        if total > MAX_HANDSHAKE:
            problem = f"the message is larger than {MAX_HANDSHAKE} bytes"
            break
        try:
            json.loads(b"".join(chunks).decode("utf-8"))
            break  # one whole JSON value: the handshake is complete
        except (ValueError, UnicodeDecodeError):
            conn.settimeout(0.2)  # more may follow; a pause ends the message
    if problem is None and not chunks:
        problem = "the peer sent no data"
    if problem is None and len(fds) != 1:
        problem = _descriptor_count_message(len(fds))
    return Message(b"".join(chunks), fds, problem)


def receive_handshake(conn: socket.socket, timeout: float = 10.0) -> tuple[bytes, int]:
    """Receives the handshake: the JSON bytes and exactly one descriptor (the uffd). Any other
    number of descriptors, a truncated message or no data is a ProtocolError; descriptors of a
    refused handshake are closed."""
    message = receive_message(conn, timeout)
    if message.problem is not None:
        message.close()
        raise _fail(message.problem)
    return message.payload, message.fds[0]


def peer_credentials(conn: socket.socket) -> PeerCredentials:
    """The connected peer's pid, uid and gid (SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


@dataclass(frozen=True)
class SocketAccess:
    """Who may connect to the handler's socket: its owner and mode (the file system's check)
    and, optionally, the uids a connected peer must have (SO_PEERCRED, checked on accept)."""

    owner_uid: int | None = None
    """chown the socket to this uid (None: leave it to the creating user)."""
    owner_gid: int | None = None
    """chown the socket to this gid (None: leave it)."""
    mode: int = 0o600
    """The socket's permission bits (default 0600: its owner only)."""
    allowed_uids: frozenset[int] | None = None
    """A peer whose uid is not here is refused (None: any peer that could connect)."""

    def __post_init__(self) -> None:
        if not 0 <= self.mode <= 0o777:
            raise pw.ConfigurationError(
                errno.EINVAL, f"socket mode {self.mode:#o} is not a permission mode (0 to 0777)"
            )
        if self.mode & 0o007:
            raise pw.ConfigurationError(
                errno.EINVAL,
                f"socket mode {self.mode:#o} lets every user on the host connect and hand "
                "pagewarden a uffd; use an owner (--socket-owner) or group instead",
            )

    def check_peer(self, peer: PeerCredentials) -> None:
        """Raises ProtocolError if ``peer``'s uid is not allowed."""
        if self.allowed_uids is not None and peer.uid not in self.allowed_uids:
            allowed = ", ".join(str(u) for u in sorted(self.allowed_uids))
            raise pw.ProtocolError(
                errno.EACCES,
                f"peer pid {peer.pid} runs as uid {peer.uid}, which is not allowed to connect "
                f"(allowed: {allowed})",
            )


def parse_owner(text: str) -> tuple[int, int | None]:
    """``UID[:GID]`` (numbers or names) as numeric ids; ConfigurationError naming what is wrong."""
    user, _, group = text.partition(":")

    def resolve(name: str, what: str) -> int:
        if name.isdigit():
            return int(name)
        try:
            if what == "user":
                return pwd.getpwnam(name).pw_uid
            return grp.getgrnam(name).gr_gid
        except KeyError:
            raise pw.ConfigurationError(
                errno.EINVAL, f"socket owner {text!r}: no {what} named {name!r} on this host"
            ) from None

    if not user:
        raise pw.ConfigurationError(
            errno.EINVAL, f"socket owner {text!r} is not UID[:GID] (e.g. 1000:1000 or fc:fc)"
        )
    return resolve(user, "user"), resolve(group, "group") if group else None


def parse_mode(text: str) -> int:
    """An octal permission mode such as ``0660`` or ``660``."""
    try:
        return int(text, 8)
    except ValueError:
        raise pw.ConfigurationError(
            errno.EINVAL, f"socket mode {text!r} is not an octal mode (e.g. 0600 or 0660)"
        ) from None


def listen(
    socket_path: str | os.PathLike[str], access: SocketAccess | None = None
) -> socket.socket:
    """Creates the handler's socket, usable by its owner only (mode 0600) unless ``access``
    says otherwise. A stale socket at the path is replaced; any other file there is refused.
    The socket is never reachable with looser permissions than asked, not even for a moment:
    it is bound under a umask that allows nothing, then chowned, then chmodded."""
    access = access or SocketAccess()
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
    try:
        if access.owner_uid is not None or access.owner_gid is not None:
            uid = -1 if access.owner_uid is None else access.owner_uid
            gid = -1 if access.owner_gid is None else access.owner_gid
            try:
                os.chown(path, uid, gid)
            except PermissionError:
                raise pw.ConfigurationError(
                    errno.EPERM,
                    f"cannot give {path} to uid {uid} gid {gid}: only root (CAP_CHOWN) can",
                ) from None
        os.chmod(path, access.mode)
        sock.listen(1)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return sock
