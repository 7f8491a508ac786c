"""Shared fixtures and helpers for pagewarden's test suite.

Tests that need a working userfaultfd request the ``uffd`` fixture; tests marked ``hugetlb`` also
need free 2 MiB hugepages. When they are missing the tests are skipped, unless
``PAGEWARDEN_REQUIRE_UFFD=1``, in which case they fail (CI machines must not skip silently).

The helpers below are imported by the test modules (``from conftest import ...``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import pytest

import pagewarden as pw

Mode = Literal["missing", "minor"]

PAGE = 4096
HUGE_PAGE = 2 << 20
MiB = 1 << 20

#: Huge pages one hugetlb test may use at most (16 MiB).
HUGE_PAGES_PER_TEST = 8


def kind_modes(*exclude: tuple[str, str]) -> list[object]:
    """The (kind, mode) pairs the kernel allows (anonymous memory has no MINOR mode) as pytest
    parameters, hugetlb ones marked; ``exclude`` leaves pairs out."""
    pairs = [
        ("anon", "missing"),
        ("shmem", "missing"),
        ("shmem", "minor"),
        ("hugetlb", "missing"),
        ("hugetlb", "minor"),
    ]
    return [
        pytest.param(
            kind,
            mode,
            id=f"{kind}-{mode}",
            marks=(pytest.mark.hugetlb,) if kind == "hugetlb" else (),
        )
        for kind, mode in pairs
        if (kind, mode) not in exclude
    ]


#: Every (kind, mode) pair the kernel allows; for tests that cover them all.
KIND_MODES = kind_modes()

#: si_code values a SIGBUS from a poison marker may carry: BUS_ADRERR without
#: CONFIG_MEMORY_FAILURE, BUS_MCEERR_AR with it.
SIGBUS_CODES = (2, 4)

MADV_DONTNEED = 4


def _require() -> bool:
    return os.environ.get("PAGEWARDEN_REQUIRE_UFFD") == "1"


def unavailable(reason: str) -> None:
    """Skips the test, or fails it when PAGEWARDEN_REQUIRE_UFFD=1."""
    if _require():
        pytest.fail(f"{reason} (PAGEWARDEN_REQUIRE_UFFD=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


@functools.cache
def _uffd_problem() -> str | None:
    """Why userfaultfd cannot be used here, or None if it can (checked once per session)."""
    caps = pw.capabilities()
    if not caps["userfaultfd"]:
        return (
            "userfaultfd is not usable by this process "
            f"(open methods: {caps['open_methods']}, "
            f"vm.unprivileged_userfaultfd={caps['unprivileged_userfaultfd']}); "
            "run as root or allow /dev/userfaultfd"
        )
    if not caps["poison"]:
        return f"the kernel ({caps['kernel_release']}) has no UFFDIO_POISON (needs Linux 6.6)"
    try:
        mem = pw.GuestMemory.anonymous(PAGE)
        handler = pw.Handler(mem, pw.ZeroSource(), prefetch=False)
        handler.close()
    except pw.PagewardenError as e:
        return f"cannot create a pagewarden Handler here: {e}"
    return None


@pytest.fixture
def uffd() -> None:
    """Requires a usable userfaultfd with UFFDIO_POISON."""
    problem = _uffd_problem()
    if problem is not None:
        unavailable(problem)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("hugetlb") is None:
        return
    problem = _uffd_problem()
    if problem is not None:
        unavailable(problem)
    caps = pw.capabilities()
    free = caps["hugepages_2m_free"] or 0
    if free < HUGE_PAGES_PER_TEST:
        unavailable(
            f"needs {HUGE_PAGES_PER_TEST} free 2 MiB hugepages, found {free} "
            "(as root: echo 64 > /proc/sys/vm/nr_hugepages)"
        )
    if not (caps["missing_hugetlbfs"] and caps["minor_hugetlbfs"]):
        unavailable("the kernel lacks userfaultfd support for hugetlbfs")


# ---------------------------------------------------------------------------------------------
# Helpers


def pagewarden_process(*args: str) -> subprocess.Popen[str]:
    """``python -m pagewarden ARGS`` in a child process, its output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "pagewarden", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def kvm(uffd: None) -> None:
    """Requires a usable /dev/kvm (and, through ``uffd``, a usable userfaultfd)."""
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm on this host: KVM is not available")
    status = pw.capabilities()["kvm"]
    if status != "ok":
        unavailable(f"/dev/kvm is present but cannot be opened: {status}")


def make_image(size: int, seed: int) -> bytes:
    """A deterministic guest memory image: the byte at offset X is guest address X."""
    return random.Random(seed).randbytes(size)


def make_memory(kind: str, size: int, guest_address: int = 0) -> pw.GuestMemory:
    """A GuestMemory of kind "anon", "shmem" or "hugetlb"."""
    if kind == "anon":
        return pw.GuestMemory.anonymous(size, guest_address=guest_address)
    if kind == "shmem":
        return pw.GuestMemory.memfd(size, guest_address=guest_address)
    if kind == "hugetlb":
        return pw.GuestMemory.memfd(size, hugepages=True, guest_address=guest_address)
    raise ValueError(kind)


def pages_of(mem: pw.GuestMemory) -> list[int]:
    """Guest addresses of every page of ``mem``."""
    return list(range(mem.guest_address, mem.guest_address + mem.size, mem.page_size))


def expected_checksum(image: bytes, gpa: int, page_size: int) -> int:
    page = image[gpa : gpa + page_size]
    assert len(page) == page_size, f"image too short for page {gpa:#x}"
    return pw.page_checksum(page)


def verify(
    mem: pw.GuestMemory,
    result: pw.TouchResult,
    image: bytes | None,
    poison: Iterable[int],
    touched: Sequence[int] | None = None,
    via: str = "load",
) -> None:
    """Checks a TouchResult: every non-poisoned touched page matches ``image`` (all zero when
    ``image`` is None), and exactly the poisoned touched pages failed (SIGBUS for loads, with the
    right address and si_code)."""
    ps = mem.page_size
    touched = pages_of(mem) if touched is None else list(touched)
    poison_set = set(poison)
    # A page listed n times is touched n times, and reported n times if poisoned.
    want_poisoned = sorted(gpa for gpa in touched if gpa in poison_set)
    assert sorted(result.poisoned) == want_poisoned, (
        f"poisoned pages: got {[hex(g) for g in sorted(result.poisoned)]}, "
        f"want {[hex(g) for g in want_poisoned]}"
    )
    want_data = set(touched) - poison_set
    assert set(result.checksums) == want_data
    assert result.pages == len(want_poisoned) + len(want_data)
    zero = pw.page_checksum(bytes(ps))
    wrong = []
    for gpa in sorted(want_data):
        want = zero if image is None else expected_checksum(image, gpa, ps)
        if result.checksums[gpa] != want:
            wrong.append(gpa)
    assert not wrong, f"{len(wrong)} pages with wrong bytes, first {wrong[0]:#x}"
    if via == "load":
        assert sorted(g for g, _, _ in result.sigbus) == want_poisoned
        for gpa, si_addr, si_code in result.sigbus:
            assert si_addr == mem.host_address_of(gpa), (
                f"SIGBUS for {gpa:#x} at {si_addr:#x}, want {mem.host_address_of(gpa):#x}"
            )
            assert si_code in SIGBUS_CODES, f"si_code {si_code} for {gpa:#x}"
    else:
        assert result.sigbus == []


def pick_poison(mem: pw.GuestMemory, seed: int, extra: int = 3) -> list[int]:
    """The first and last page of ``mem`` plus ``extra`` others, sorted."""
    pages = pages_of(mem)
    chosen = {pages[0], pages[-1]}
    rng = random.Random(seed)
    while len(chosen) < min(len(pages), 2 + extra):
        chosen.add(rng.choice(pages))
    return sorted(chosen)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) through ctypes (the GIL is released during the call)."""
    if _libc.madvise(address, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({address:#x}, {length:#x}, {advice}): {os.strerror(err)}")


#: How long a helper waits for state that trails a wake-up (a hang detector, not a speed test).
SETTLE_LIMIT = 10.0


def settled_stats(
    h: pw.Handler, check: Callable[[dict[str, Any]], None], limit: float = SETTLE_LIMIT
) -> dict[str, Any]:
    """Handler.stats() once ``check`` (which asserts) passes on it.

    The handler updates a counter just after the ioctl that wakes the faulting thread, so a
    check made right after a touch may run ahead of it. A wrong count stays wrong: ``check``'s
    last AssertionError is raised after ``limit`` seconds.
    """
    deadline = time.monotonic() + limit
    while True:
        stats = h.stats()
        try:
            check(stats)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)
        else:
            return stats


def wait_for_state(h: pw.Handler, gpa: int, state: str, limit: float = SETTLE_LIMIT) -> bool:
    """Polls page_state until it is ``state`` (a state change may trail the wake-up)."""
    deadline = time.monotonic() + limit
    while h.page_state(gpa) != state:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True
