"""Type stubs for pagewarden's native core (``pagewarden._native``)."""

import socket
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self, final

from typing_extensions import Buffer

from pagewarden.policy import Policy

__version__: str
DEFAULT_FAULT_AROUND: int
"""The largest fault-around window a Handler uses unless told otherwise (bytes)."""
__all__ = [
    "DEFAULT_FAULT_AROUND",
    "ConfigurationError",
    "Engine",
    "FileSource",
    "GuestAddressError",
    "GuestMemory",
    "Handler",
    "HandlerClosedError",
    "MemorySource",
    "PagewardenError",
    "PoisonFileError",
    "PoisonJournalWarning",
    "PoisonSet",
    "PoisonedPageError",
    "PolicyError",
    "ProcessMemory",
    "ProtocolError",
    "RemoteSource",
    "Server",
    "SourceError",
    "TouchResult",
    "UnsupportedError",
    "ZeroSource",
    "__version__",
    "_bench_poison_lookups",
    "_bench_tcp_stream",
    "_bench_touch",
    "_bench_touch_pages",
    "_log_wait",
    "_process_start_time",
    "_take_uffd",
    "capabilities",
    "kvm_check",
    "make_test_certificates",
    "page_checksum",
    "serve",
]

class PagewardenError(OSError):
    """Root of every pagewarden error (an OSError; ``errno`` says the kind)."""

class UnsupportedError(PagewardenError):
    """The kernel or this process's permissions do not allow it."""

class PoisonedPageError(PagewardenError):
    """A guest page is poisoned; ``guest_address`` names it."""

    guest_address: int

class SourceError(PagewardenError):
    """The page source cannot produce a page."""

class ProtocolError(PagewardenError):
    """A peer broke the wire protocol."""

class PoisonFileError(PagewardenError):
    """A poison file is unreadable, corrupt, truncated, of another version or misaligned."""

class HandlerClosedError(PagewardenError):
    """The handler is closed, or its event loop has stopped."""

class PolicyError(PagewardenError):
    """A Python policy callback raised; the original is the ``__cause__``."""

class GuestAddressError(PagewardenError):
    """A guest address or range outside guest memory, or not page aligned."""

class PoisonJournalWarning(UserWarning):
    """A poison journal had a torn last record (a crash mid-append); it was ignored and cut off."""

class ConfigurationError(PagewardenError):
    """A bad argument: a size that is not a page multiple, an unknown mode, overlapping regions."""

def capabilities() -> dict[str, Any]:
    """The machine's userfaultfd capabilities (kernel features, open methods, hugepages, KVM)."""

def _log_wait(timeout: float) -> tuple[list[tuple[int, str]], int]:
    """The native core's log records (waits up to ``timeout`` s); and how many were dropped."""

def _take_uffd(pid: int, start_time: int | None = None) -> int:
    """Takes process ``pid``'s userfaultfd (pidfd_getfd); the caller owns the descriptor."""

def _process_start_time(pid: int) -> int:
    """Process ``pid``'s start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""

def page_checksum(data: bytes) -> int:
    """The checksum ``GuestMemory.touch`` reports for a page with these bytes."""

def kvm_check(
    pages: int = 32, poisoned: Sequence[int] | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """Runs a real vCPU over guest memory a Handler serves with poisoned pages; the report."""

# Benchmark helpers (private; used by ``pagewarden bench`` and ``benches/``).
def _bench_touch(memory: GuestMemory, threads: int = 1) -> tuple[float, list[int], int]:
    """Touches every page once from native threads; (seconds, per-page ns, SIGBUS count)."""

def _bench_touch_pages(
    memory: GuestMemory,
    pages: Sequence[int],
    interval_us: int = 0,
    max_seconds: float | None = None,
    cpu: int | None = None,
) -> tuple[list[int], list[int], int]:
    """Touches chosen pages one at a time; (monotonic start ns, latency ns, SIGBUS count)."""

def _bench_tcp_stream(
    total_bytes: int,
    chunk: int = ...,
    sender_cpu: int | None = None,
    receiver_cpu: int | None = None,
    place: str = "none",
) -> float:
    """Streams bytes over loopback TCP between two native threads; the seconds it took. With
    ``place`` "copy" or "minor" the receiver also puts each chunk into memory ("copy":
    UFFDIO_COPY into anonymous memory; "minor": memfd write + UFFDIO_CONTINUE)."""

def _bench_poison_lookups(
    poison: PoisonSet,
    span: int,
    count: int = ...,
    repeat: int = 8,
    seed: int = 1,
    ascending: bool = False,
) -> tuple[int, int, float]:
    """Native membership lookups of random addresses in [0, span); (lookups, hits, seconds)."""

@final
class TouchResult:
    """What ``GuestMemory.touch`` saw."""

    @property
    def pages(self) -> int: ...
    @property
    def checksums(self) -> dict[int, int]: ...
    @property
    def poisoned(self) -> list[int]: ...
    @property
    def sigbus(self) -> list[tuple[int, int, int]]: ...
    @property
    def latency_dist_us_log2(self) -> list[int]: ...
    @property
    def latency_ns_avg(self) -> int: ...
    @property
    def elapsed_s(self) -> float: ...

@final
class GuestMemory:
    """A range of guest addresses backed by a local mapping."""

    @staticmethod
    def anonymous(size: int, guest_address: int = 0) -> GuestMemory:
        """Private anonymous memory (MISSING mode only)."""
    @staticmethod
    def memfd(size: int, hugepages: bool = False, guest_address: int = 0) -> GuestMemory:
        """A shared memfd: shmem (4 KiB pages) or hugetlb (2 MiB pages)."""
    @staticmethod
    def from_address(
        address: int, size: int, page_size: int = 4096, guest_address: int = 0
    ) -> GuestMemory:
        """The caller's existing, entirely mapped range at host ``address``."""
    @staticmethod
    def remote(
        pid: int, address: int, size: int, page_size: int = 4096, guest_address: int = 0
    ) -> GuestMemory:
        """Memory of process ``pid`` at its ``address``, served through a uffd it handed over."""
    @property
    def pid(self) -> int | None: ...
    @property
    def address(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def page_size(self) -> int: ...
    @property
    def guest_address(self) -> int: ...
    @property
    def kind(self) -> Literal["anonymous", "shmem", "hugetlb", "external", "remote"]: ...
    def guest_address_of(self, host_address: int) -> int | None:
        """The guest address of a host address inside this memory, or None."""
    def host_address_of(self, guest_address: int) -> int | None:
        """The host address of a guest address inside this memory, or None."""
    def read(self, guest_address: int, length: int) -> bytes:
        """Reads through the kernel path with the GIL released; PoisonedPageError on poison."""
    def touch(
        self,
        pages: Iterable[int] | None = None,
        threads: int = 1,
        order: Literal["sequential", "random"] = "sequential",
        via: Literal["load", "kernel"] = "load",
        seed: int = 0,
    ) -> TouchResult:
        """Touches pages from native threads like a guest would; reports what each page gave."""

@final
class PoisonSet:
    """A set of poisoned guest pages (guest addresses with a page size)."""

    def __new__(
        cls, guest_addresses: Iterable[int] | None = None, page_size: int = 4096
    ) -> Self: ...
    @property
    def page_size(self) -> int: ...
    def add(self, guest_address: int) -> bool:
        """Adds a page-aligned guest address; True if it was new."""
    def add_range(self, guest_address: int, length: int) -> int:
        """Adds a page-aligned range; returns the number of new pages."""
    def __contains__(self, key: object, /) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[int]: ...
    def __or__(self, value: PoisonSet, /) -> PoisonSet: ...
    def __ror__(self, value: PoisonSet, /) -> PoisonSet: ...
    def __eq__(self, value: object, /) -> bool: ...
    def ranges(self) -> list[tuple[int, int]]:
        """Sorted, coalesced (start guest address, length in bytes) pairs."""
    def intersects(self, guest_address: int, length: int) -> bool:
        """True if any page overlapping the range is poisoned."""
    def with_page_size(self, page_size: int) -> PoisonSet:
        """The same poison at another page size."""
    def union(self, other: PoisonSet) -> PoisonSet:
        """The union, at the smaller page size."""
    def memory_bytes(self) -> int:
        """Approximate bytes of memory the set holds."""
    def save(self, path: str | PathLike[str]) -> None:
        """Writes versioned JSON atomically."""
    @staticmethod
    def load(path: str | PathLike[str]) -> PoisonSet:
        """Reads a saved set; PoisonFileError on a bad file."""
    def to_json(self) -> str:
        """The JSON text ``save`` writes."""
    @staticmethod
    def from_json(text: str, name: str = "<string>") -> PoisonSet:
        """Parses JSON text as ``load`` does."""

@final
class FileSource:
    """A guest memory image file: the byte at offset X is guest address X."""

    def __new__(cls, path: str | PathLike[str]) -> Self: ...
    @property
    def path(self) -> Path: ...

@final
class MemorySource:
    """Bytes of a C-contiguous buffer, served without a copy."""

    def __new__(cls, buffer: Buffer) -> Self: ...
    def __len__(self) -> int: ...

@final
class ZeroSource:
    """Every page reads zero."""

    def __new__(cls) -> Self: ...

@final
class RemoteSource:
    """Pages from a page server on another host (``pagewarden serve``), for a Handler."""

    def __new__(
        cls,
        address: str | None = None,
        token: bytes | str | None = None,
        *,
        connect: Callable[[], socket.socket] | None = None,
        give_up_after: float = 30.0,
        insecure_no_token: bool = False,
        window: int = 16777216,
        urgent_channel: bool = True,
        background: Literal["auto", "idle", "normal"] = "auto",
        tls_dir: str | PathLike[str] | None = None,
        tls_server_name: str | None = None,
    ) -> Self: ...
    @property
    def address(self) -> str:
        """ "host:port" of the server."""
    @property
    def page_size(self) -> int:
        """The server's page size in bytes."""
    @property
    def memory_size(self) -> int:
        """Bytes of guest memory the server serves, from guest address 0."""
    def poison_set(self) -> PoisonSet:
        """The poison the server announced when this source connected."""
    def stats(self) -> dict[str, int]:
        """Counters: requests, bytes and pages received, reconnects, connected."""
    def close(self) -> None:
        """Closes both connections and stops the source's threads. Idempotent."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]: ...

@final
class Engine:
    """Native threads that run the event loops of many handlers (``Handler(..., engine=)``)."""

    def __new__(cls, threads: int = 1) -> Self: ...
    @property
    def threads(self) -> int:
        """Number of native threads."""
    @property
    def handlers(self) -> int:
        """Handlers running on this engine now."""
    def close(self) -> None:
        """Stops the handlers still on it (fail-stop), ends the threads, waits. Idempotent."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]: ...

@final
class Handler:
    """Serves guest memory through userfaultfd, keeping poison poisoned."""

    def __new__(
        cls,
        memory: GuestMemory | Iterable[GuestMemory],
        source: FileSource | MemorySource | ZeroSource | RemoteSource,
        poison: PoisonSet | None = None,
        mode: Literal["missing", "minor"] = "missing",
        prefetch: bool = True,
        poison_journal: str | PathLike[str] | None = None,
        uffd: int | None = None,
        prefetch_order: Iterable[int | tuple[int, int]] | None = None,
        record_access: bool = False,
        engine: Engine | None = None,
        policy: Policy | None = None,
        policy_timeout: float = 0.05,
        progress_interval: float = 1.0,
        resumed: bool = False,
        removed_journal: str | PathLike[str] | None = None,
        fault_around: int = 1048576,
    ) -> Self: ...
    def _policy_failed(self, exc: BaseException) -> None:
        """Records the first exception a policy callback raised (for the dispatcher)."""
    def access_log(self) -> list[int]:
        """Guest addresses in the order of their first fault (needs ``record_access=True``)."""
    def start(self) -> None:
        """Starts serving (on ``engine``, else on a native thread of its own); returns at once."""
    def wait(self, timeout: float | None = None) -> bool:
        """True once every page is resolved; False on timeout; raises the first fatal error."""
    def fileno(self) -> int:
        """Readable when the handler completes, fails or stops (for add_reader/selectors)."""
    def process_events(self) -> bool:
        """Non-blocking: True once every page is resolved; raises the first fatal error."""
    def wait_async(self, timeout: float | None = None) -> Coroutine[Any, Any, bool]:
        """``wait()`` for asyncio, driven by ``add_reader`` on ``fileno()``."""
    def check(self) -> None:
        """Raises the handler's first fatal error, if any."""
    def stats(self) -> dict[str, Any]:
        """Counters and the latency histogram."""
    def poison_set(self) -> PoisonSet:
        """Initial poison plus poison discovered during the run."""
    def page_state(
        self, guest_address: int
    ) -> (
        Literal[
            "missing",
            "in_flight",
            "present",
            "poisoned",
            "removed",
            "fenced",
            "requested",
            "urgent",
        ]
        | None
    ):
        """The state of the page holding ``guest_address``."""
    def poison(self, guest_address: int) -> bool:
        """Poisons the page holding ``guest_address`` now; True if it was not poisoned yet."""
    def poison_range(self, guest_address: int, length: int) -> int:
        """Poisons every page overlapping the range; returns the number newly poisoned."""
    def record_hardware_poison(self, host_address: int, lsb: int = 12) -> int:
        """Poisons the guest page(s) of a hardware memory error at ``host_address``."""
    @property
    def poison_journal(self) -> Path | None: ...
    @property
    def running(self) -> bool: ...
    def mark_present_from_pagemap(self, pid: int) -> int:
        """Marks present every page process ``pid`` has (``/proc/PID/pagemap``), for a handler
        that took a guest over; before ``start()``; returns the pages marked."""
    def detach(self) -> None:
        """Stops serving and leaves the guest as it is (registered, nothing fenced) for a
        successor that takes the uffd over; ``close()`` afterwards does nothing more."""
    def close(self) -> None:
        """Stops the loop; pages still missing are fenced (SIGBUS, never zeros). Idempotent."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]: ...

@final
class ProcessMemory:
    """Memory of another process to serve: ``pid`` and (guest, host, length) maps."""

    def __new__(
        cls, pid: int, maps: Sequence[tuple[int, int, int]], page_size: int = 4096
    ) -> Self: ...
    @property
    def pid(self) -> int: ...
    @property
    def maps(self) -> list[tuple[int, int, int]]: ...
    @property
    def page_size(self) -> int: ...

@final
class Server:
    """A running page server (from ``serve``); a context manager."""

    @property
    def address(self) -> tuple[str, int] | None: ...
    def stats(self) -> dict[str, int]:
        """Connection, request, page and error counters."""
    def poison_set(self) -> PoisonSet:
        """Initial poison plus source pages found unreadable while serving."""
    def serve_socket(self, sock: int | _HasFileno) -> None:
        """Serves an already-connected stream socket (duplicated) like an accepted one."""
    def close(self) -> None:
        """Stops accepting, shuts connections down, joins the threads. Idempotent."""
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Literal[False]: ...

class _HasFileno(Protocol):
    def fileno(self) -> int: ...

def serve(
    source: str | PathLike[str] | GuestMemory | ProcessMemory | Buffer,
    poison: PoisonSet | None = None,
    listen: str = "127.0.0.1:0",
    token: bytes | str | None = None,
    insecure_no_token: bool = False,
    handshake_timeout: float = 10.0,
    write_timeout: float = 30.0,
    background: Literal["auto", "idle", "normal"] = "auto",
    tls_dir: str | PathLike[str] | None = None,
) -> Server:
    """Starts a page server for ``source`` on native threads."""

def make_test_certificates(
    directory: str | PathLike[str],
    hostnames: Sequence[str] = ...,
    days: int = 365,
    force: bool = False,
) -> list[Path]:
    """Makes a test CA and server and client certificates (QEMU's tls-creds-x509 layout)."""
