"""A test double of Firecracker's UFFD snapshot restore, run as its own process.

It does what Firecracker does, byte for byte on the wire: maps guest memory (private anonymous,
or private hugetlb for 2 MiB pages), creates its own userfaultfd (API handshake asking for
EVENT_REMOVE, as Firecracker does for the balloon), registers every region in MISSING mode,
connects to the handler's socket and sends one message: a JSON array of GuestRegionUffdMapping
objects, no framing, no newline, with the uffd in SCM_RIGHTS. Then, like a guest, it touches
every page (with pagewarden's SIGBUS-tolerant probe, used only to observe), optionally inflates a
balloon (MADV_DONTNEED) and touches those pages again, and writes what it saw to a JSON file.

The ``--handshake`` option sends deliberately malformed handshakes instead. After any handshake
the double goes on as Firecracker does: its restore touches guest memory whatever the handler
made of the message, so a handler that refuses and walks away leaves it blocked on its first page
(the test's timeout then says so). ``--wait-for PATH`` holds the guest back after the handshake
(and after touching ``--touch-first`` pages), with "waiting" on stdout, until PATH exists;
``--touch-pages`` touches only the listed guest addresses (file offsets) instead of every page.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import mmap
import os
import socket
import struct
import sys
import time

import pagewarden as pw

SYS_USERFAULTFD = 323  # x86-64
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFD_API = 0xAA
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFDIO_REGISTER_MODE_MISSING = 1
MAP_HUGETLB = 0x40000
MAP_HUGE_2MB = 21 << 26
MADV_DONTNEED = 4

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.syscall.restype = ctypes.c_long


def check(ok: bool, what: str) -> None:
    if not ok:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def map_region(size: int, page_size: int) -> int:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if page_size == 2 << 20:
        flags |= MAP_HUGETLB | MAP_HUGE_2MB
    address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    check(address not in (None, ctypes.c_void_p(-1).value), "mmap")
    return int(address)


def create_uffd(regions: list[tuple[int, int]]) -> int:
    uffd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    check(uffd >= 0, "userfaultfd")
    api = bytearray(struct.pack("QQQ", UFFD_API, UFFD_FEATURE_EVENT_REMOVE, 0))
    fcntl.ioctl(uffd, UFFDIO_API, api)
    for address, size in regions:
        reg = bytearray(struct.pack("QQQQ", address, size, UFFDIO_REGISTER_MODE_MISSING, 0))
        fcntl.ioctl(uffd, UFFDIO_REGISTER, reg)
    return int(uffd)


def wait_for_file(path: str, timeout: float = 60) -> bool:
    """Waits until ``path`` exists (the test's go signal); False, said on stderr, if it does
    not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            print(f"{path} did not appear within {timeout:.0f} s", file=sys.stderr)
            return False
        time.sleep(0.005)
    return True


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("socket")
    p.add_argument("out")
    p.add_argument("--page-size", type=int, default=4096)
    p.add_argument("--sizes", default="", help="region sizes in pages, comma separated")
    p.add_argument("--balloon", default="", help="guest addresses to DONTNEED, comma separated")
    p.add_argument(
        "--handshake",
        default="good",
        choices=[
            "good",
            "bad-json",
            "no-fd",
            "two-fds",
            "three-fds",
            "overlap",
            "past-file",
            "page-size",
        ],
    )
    p.add_argument("--memfile-size", type=int, default=0)
    p.add_argument(
        "--time-first-touch",
        action="store_true",
        help="with --wait-for: touch page --touch-first first, alone, and report when",
    )
    p.add_argument(
        "--close-uffd",
        action="store_true",
        help="close its own uffd after the handshake (a VMM that keeps no reference)",
    )
    p.add_argument(
        "--balloon-after",
        default="",
        metavar="PATH",
        help="wait until PATH exists before inflating the balloon",
    )
    p.add_argument(
        "--as-uid",
        default="",
        metavar="UID:GID",
        help="after creating the uffd, drop to this user to connect, as a jailed Firecracker",
    )
    p.add_argument(
        "--touch-pages", default="", help="touch only these guest addresses, comma separated"
    )
    p.add_argument(
        "--touch-first",
        type=int,
        default=0,
        help="with --wait-for: touch this many pages of the first region before waiting",
    )
    p.add_argument(
        "--wait-for",
        default="",
        help="after the handshake, wait until this path exists before touching memory",
    )
    args = p.parse_args()
    ps = args.page_size
    sizes = [int(n) * ps for n in args.sizes.split(",")]
    bases = [map_region(size, ps) for size in sizes]
    uffd = create_uffd(list(zip(bases, sizes, strict=True)))
    offsets = []
    offset = 0
    for size in sizes:
        offsets.append(offset)
        offset += size
    mappings = [
        {
            "base_host_virt_addr": base,
            "size": size,
            "offset": off,
            "page_size": ps,
            "page_size_kib": ps,
            "a_field_from_the_future": True,
        }
        for base, size, off in zip(bases, sizes, offsets, strict=True)
    ]
    if args.handshake == "overlap":
        mappings[1]["offset"] = 0
    elif args.handshake == "past-file":
        mappings[-1]["offset"] = args.memfile_size
    elif args.handshake == "page-size":
        for m in mappings:
            m["page_size"] = m["page_size_kib"] = 8192
    payload = json.dumps(mappings).encode()
    if args.handshake == "bad-json":
        payload = payload[:-7]
    extra = [os.memfd_create("guest_mem"), os.memfd_create("bitmap")]
    fds = {"no-fd": [], "two-fds": [uffd, uffd], "three-fds": [uffd, *extra]}.get(
        args.handshake, [uffd]
    )

    if args.as_uid:
        uid, gid = (int(x) for x in args.as_uid.split(":"))
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(200):
        try:
            sock.connect(args.socket)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.02)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
    sock.sendmsg([payload], ancillary if fds else [])
    if args.close_uffd:
        os.close(uffd)
    if args.touch_first:
        first = pw.GuestMemory.from_address(bases[0], sizes[0], page_size=ps, guest_address=0)
        first.touch(pages=[i * ps for i in range(args.touch_first)])
    if args.wait_for:
        print("waiting", flush=True)
        if not wait_for_file(args.wait_for):
            return 3

    report: dict[str, object] = {"regions": [], "balloon": {}}
    if args.wait_for and args.time_first_touch:
        # The first page touched after the wait, timed (CLOCK_MONOTONIC, comparable across
        # processes): how long a vCPU stays blocked across a handler's restart.
        probe = pw.GuestMemory.from_address(bases[0], sizes[0], page_size=ps, guest_address=0)
        first = args.touch_first * ps
        t0 = time.monotonic()
        probe.touch(pages=[first])
        report["first_touch"] = [t0, time.monotonic()]
    memories = [
        pw.GuestMemory.from_address(base, size, page_size=ps, guest_address=off)
        for base, size, off in zip(bases, sizes, offsets, strict=True)
    ]
    chosen = [int(x, 0) for x in args.touch_pages.split(",") if x]
    for mem in memories:
        if args.handshake != "good":
            # Firecracker's restore reads guest memory after the handshake, refused or not.
            r = mem.touch(pages=[mem.guest_address, mem.guest_address + mem.size - ps])
        elif chosen:
            mine = [g for g in chosen if mem.guest_address <= g < mem.guest_address + mem.size]
            r = mem.touch(pages=mine)
        else:
            r = mem.touch(threads=2, order="random", seed=1)
        report["regions"].append(  # type: ignore[attr-defined]
            {
                "checksums": {str(k): v for k, v in r.checksums.items()},
                "sigbus": [[g, a - mem.address, c] for g, a, c in r.sigbus],
                "latency_dist_us_log2": r.latency_dist_us_log2,
                "elapsed_s": r.elapsed_s,
            }
        )
    balloon = [int(x) for x in args.balloon.split(",") if x]
    if balloon and args.balloon_after and not wait_for_file(args.balloon_after):
        return 3
    for gpa in balloon:
        mem = next(m for m in memories if m.guest_address <= gpa < m.guest_address + m.size)
        host = mem.host_address_of(gpa)
        check(libc.madvise(host, ps, MADV_DONTNEED) == 0, "madvise(DONTNEED)")
    after = {}
    for gpa in balloon:
        mem = next(m for m in memories if m.guest_address <= gpa < m.guest_address + m.size)
        r = mem.touch(pages=[gpa])
        after[str(gpa)] = {"checksum": r.checksums.get(gpa), "sigbus": [list(x) for x in r.sigbus]}
    report["balloon"] = after
    with open(args.out, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
