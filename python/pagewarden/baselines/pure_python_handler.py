"""The pure-Python userfaultfd handler pagewarden is measured against.

It is what a Python user would write by hand with the standard library only: a uffd opened
through ``/dev/userfaultfd`` with ``fcntl.ioctl``, guest memory from ``mmap``, and one Python
thread that polls, reads fault messages with ``os.read`` and answers each with one
``fcntl.ioctl`` (UFFDIO_COPY, ZEROPAGE, POISON, or a ``os.pwrite`` into the shmem page cache
plus UFFDIO_CONTINUE). ``ctypes`` is used only to learn buffer addresses.

Its faulting threads must be native (``pagewarden._native._bench_touch``, which releases the
GIL): a Python thread that touches a missing page blocks in the kernel holding the GIL, and this
handler needs the GIL to answer it, so the process deadlocks (the GIL trap; ``pagewarden
bench`` demonstrates it in a subprocess).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import select
import struct
import threading
import time
from types import TracebackType
from typing import Literal, Self

# The userfaultfd ABI (KERNEL-NOTES.md; the request numbers are _IOWR/_IOR of the structs).
USERFAULTFD_IOC_NEW = 0xAA00
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_CONTINUE = 0xC020AA07
UFFDIO_POISON = 0xC020AA08
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_POISON = 1 << 14
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_MSG_SIZE = 32
SYS_USERFAULTFD = 323  # x86-64

Kind = Literal["anonymous", "shmem", "hugetlb"]
Resolution = Literal["copy", "zero", "poison", "continue"]

PAGE_4K = 4096
PAGE_2M = 2 << 20


def open_userfaultfd(features: int) -> int:
    """Opens a non-blocking uffd (``/dev/userfaultfd``, else the system call) and negotiates
    ``features``; raises OSError naming what to change when neither way is allowed."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        try:
            fd = fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
        finally:
            os.close(dev)
    except OSError:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(SYS_USERFAULTFD, flags)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(
                err,
                "cannot open a userfaultfd: give this user read-write access to "
                "/dev/userfaultfd, or set vm.unprivileged_userfaultfd=1",
            ) from None
    api = bytearray(struct.pack("=QQQ", UFFD_API, features, 0))
    fcntl.ioctl(fd, UFFDIO_API, api, True)
    return int(fd)


class Region:
    """Guest memory mapped by hand with ``mmap``: private anonymous, or a shmem / hugetlb memfd."""

    def __init__(self, kind: Kind, size: int) -> None:
        self.kind: Kind = kind
        self.page_size = PAGE_2M if kind == "hugetlb" else PAGE_4K
        if size <= 0 or size % self.page_size:
            raise ValueError(f"size {size} is not a positive multiple of {self.page_size}")
        self.size = size
        self.memfd = -1
        if kind == "anonymous":
            self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.map.madvise(mmap.MADV_NOHUGEPAGE)
        else:
            memfd_flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if kind == "hugetlb" else 0)
            self.memfd = os.memfd_create("pure-python-guest", memfd_flags)
            os.ftruncate(self.memfd, size)
            self.map = mmap.mmap(self.memfd, size, flags=mmap.MAP_SHARED)
        self._view: ctypes.Array[ctypes.c_char] | None = (ctypes.c_char * size).from_buffer(
            self.map
        )
        self.address = ctypes.addressof(self._view)

    def close(self) -> None:
        """Unmaps the memory and closes the memfd."""
        self._view = None
        self.map.close()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1


def buffer_address(buffer: bytearray | mmap.mmap) -> tuple[int, ctypes.Array[ctypes.c_char]]:
    """The address of a writable buffer's bytes, and the ctypes view that keeps it exported."""
    view = (ctypes.c_char * len(buffer)).from_buffer(buffer)
    return ctypes.addressof(view), view


class PythonHandler:
    """One Python thread serving ``region``'s faults: poll, ``os.read`` up to 64 messages,
    one ``fcntl.ioctl`` per fault. ``source`` (a writable buffer as large as the region) is needed
    for "copy" and "continue". A context manager; ``close()`` stops and joins the thread."""

    def __init__(
        self,
        region: Region,
        resolution: Resolution,
        source: bytearray | mmap.mmap | None = None,
    ) -> None:
        if resolution in ("copy", "continue") and (source is None or len(source) < region.size):
            raise ValueError(f"resolution {resolution!r} needs a source of {region.size} bytes")
        if resolution == "continue" and region.kind != "shmem":
            raise ValueError("resolution 'continue' needs shmem memory")
        self.region = region
        self.resolution: Resolution = resolution
        self.source = source
        self.faults = 0
        self.native_id = 0
        self.error: BaseException | None = None
        features = UFFD_FEATURE_POISON
        mode = UFFDIO_REGISTER_MODE_MISSING
        if region.kind == "shmem":
            features |= UFFD_FEATURE_MISSING_SHMEM
            if resolution == "continue":
                features |= UFFD_FEATURE_MINOR_SHMEM
                mode |= UFFDIO_REGISTER_MODE_MINOR
        elif region.kind == "hugetlb":
            features |= UFFD_FEATURE_MISSING_HUGETLBFS
        self.uffd = open_userfaultfd(features)
        reg = bytearray(struct.pack("=QQQQ", region.address, region.size, mode, 0))
        fcntl.ioctl(self.uffd, UFFDIO_REGISTER, reg, True)
        self._source_address = 0
        self._source_view: ctypes.Array[ctypes.c_char] | None = None
        if source is not None:
            self._source_address, self._source_view = buffer_address(source)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pure-python-uffd", daemon=True)

    def start(self) -> None:
        """Starts the handler thread and waits until it is serving."""
        self._thread.start()
        self._ready.wait()

    def cpu_ns(self) -> int:
        """CPU time the handler thread has used so far (its thread CPU clock), in ns."""
        return thread_cpu_ns(self.native_id)

    def close(self) -> None:
        """Stops and joins the thread, closes the uffd (unregistering the region)."""
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join()
        for fd in (self._stop_r, self._stop_w, self.uffd):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = self.uffd = -1
        self._source_view = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self) -> None:
        self.native_id = threading.get_native_id()
        try:
            self._serve()
        except BaseException as e:
            self.error = e
            raise

    def _serve(self) -> None:
        region = self.region
        uffd, stop = self.uffd, self._stop_r
        page_mask = ~(region.page_size - 1)
        base, page_size = region.address, region.page_size
        arg = bytearray(40)
        arg32 = memoryview(arg)[:32]
        poller = select.poll()
        poller.register(uffd, select.POLLIN)
        poller.register(stop, select.POLLIN)
        self._ready.set()
        while True:
            if any(fd == stop for fd, _ in poller.poll()):
                return
            try:
                data = os.read(uffd, UFFD_MSG_SIZE * 64)
            except BlockingIOError:
                continue
            for offset in range(0, len(data), UFFD_MSG_SIZE):
                if data[offset] != UFFD_EVENT_PAGEFAULT:
                    continue
                (address,) = struct.unpack_from("=Q", data, offset + 16)
                page = address & page_mask
                self._resolve(page, page - base, page_size, arg, arg32)
                self.faults += 1

    def _resolve(
        self, page: int, offset: int, page_size: int, arg: bytearray, arg32: memoryview
    ) -> None:
        uffd = self.uffd
        try:
            if self.resolution == "copy":
                struct.pack_into(
                    "=QQQQq", arg, 0, page, self._source_address + offset, page_size, 0, 0
                )
                fcntl.ioctl(uffd, UFFDIO_COPY, arg, True)
            elif self.resolution == "zero":
                struct.pack_into("=QQQq", arg, 0, page, page_size, 0, 0)
                fcntl.ioctl(uffd, UFFDIO_ZEROPAGE, arg32, True)
            elif self.resolution == "poison":
                struct.pack_into("=QQQq", arg, 0, page, page_size, 0, 0)
                fcntl.ioctl(uffd, UFFDIO_POISON, arg32, True)
            else:
                assert self.source is not None
                view = memoryview(self.source)[offset : offset + page_size]
                os.pwrite(self.region.memfd, view, offset)
                struct.pack_into("=QQQq", arg, 0, page, page_size, 0, 0)
                fcntl.ioctl(uffd, UFFDIO_CONTINUE, arg32, True)
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
            # Mapped meanwhile: wake whoever waits on it.
            fcntl.ioctl(uffd, UFFDIO_WAKE, struct.pack("=QQ", page, page_size))


def thread_cpu_ns(native_id: int) -> int:
    """The CPU time of thread ``native_id`` of this process, in ns, from its thread CPU clock
    (the clock id Linux derives from a thread id, as pthread_getcpuclockid does)."""
    return time.clock_gettime_ns(((~native_id) << 3) | 6)
