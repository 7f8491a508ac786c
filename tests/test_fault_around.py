"""Fault-around: a guest that reads on from a fault gets the pages after it with it, in a window
that grows while it reads on; a random reader gets only what it touches; poison is never
crossed. Every memory kind and mode, local and remote sources, on real userfaultfd."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import KIND_MODES, MiB, Mode, make_image, make_memory, pages_of, verify
from test_remote import TOKEN, page_server

import pagewarden as pw

pytestmark = pytest.mark.usefixtures("uffd")


def _window(kind: str) -> int:
    # 2 MiB huge pages need a window of several pages to read on at all.
    return 16 * MiB if kind == "hugetlb" else pw.DEFAULT_FAULT_AROUND


def _size(kind: str) -> int:
    return 64 * MiB if kind == "hugetlb" else 8 * MiB


@pytest.mark.parametrize(("kind", "mode"), KIND_MODES)
def test_a_sequential_reader_faults_once_per_window_and_never_reads_poison(
    kind: str, mode: Mode
) -> None:
    size = _size(kind)
    image = make_image(size, 91)
    mem = make_memory(kind, size)
    pages = pages_of(mem)
    # Poison in the middle of where grown windows run, and the last page.
    poisoned = [pages[len(pages) // 3], pages[len(pages) // 3 + 1], pages[-1]]
    poison = pw.PoisonSet(poisoned, page_size=mem.page_size)
    with pw.Handler(
        mem,
        pw.MemorySource(image),
        poison=poison,
        mode=mode,
        prefetch=False,
        fault_around=_window(kind),
    ) as h:
        h.start()
        result = mem.touch(threads=1, order="sequential")
        verify(mem, result, image, poisoned)
        stats = h.stats()
        assert stats["pages_copied"] == len(pages) - len(poisoned)
        assert stats["pages_faulted_around"] > len(pages) // 2, stats
        # One fault per window (plus the poisoned pages and the restart after them), not per page.
        assert stats["faults"] + stats["pages_faulted_around"] >= len(pages) - len(poisoned)
        assert stats["faults"] <= len(pages) // 4, stats
        for gpa in poisoned:
            assert h.page_state(gpa) == "poisoned"


@pytest.mark.parametrize(("kind", "mode"), KIND_MODES)
def test_a_random_reader_gets_only_what_it_touches(kind: str, mode: Mode) -> None:
    size = _size(kind)
    image = make_image(size, 92)
    mem = make_memory(kind, size)
    # Every fourth page, in random order: no fault continues another.
    touched = pages_of(mem)[::4]
    random.Random(3).shuffle(touched)
    with pw.Handler(
        mem, pw.MemorySource(image), mode=mode, prefetch=False, fault_around=_window(kind)
    ) as h:
        h.start()
        result = mem.touch(pages=touched, threads=1, order="sequential")
        verify(mem, result, image, [], touched=touched)
        stats = h.stats()
        assert stats["pages_faulted_around"] == 0
        assert stats["pages_copied"] == len(touched)
        untouched = set(pages_of(mem)) - set(touched)
        assert all(h.page_state(gpa) == "missing" for gpa in untouched)


def test_off_is_one_fault_per_page() -> None:
    size = 2 * MiB
    image = make_image(size, 93)
    mem = pw.GuestMemory.anonymous(size)
    with pw.Handler(mem, pw.MemorySource(image), prefetch=False, fault_around=0) as h:
        h.start()
        verify(mem, mem.touch(), image, [])
        stats = h.stats()
        assert stats["faults"] == size // 4096
        assert stats["pages_faulted_around"] == 0


def test_a_policy_that_decides_faults_sees_every_fault() -> None:
    size = 1 * MiB
    image = make_image(size, 94)
    mem = pw.GuestMemory.anonymous(size)
    seen: list[int] = []

    class Watch(pw.Policy):
        def on_fault(self, fault: pw.Fault) -> pw.Action | None:
            seen.append(fault.guest_address)
            return None

    with pw.Handler(mem, pw.MemorySource(image), prefetch=False, policy=Watch()) as h:
        h.start()
        verify(mem, mem.touch(), image, [])
        assert h.stats()["pages_faulted_around"] == 0
    assert sorted(seen) == pages_of(mem)


def test_the_access_log_holds_each_window_with_its_fault() -> None:
    size = 4 * MiB
    image = make_image(size, 95)
    mem = pw.GuestMemory.anonymous(size)
    with pw.Handler(mem, pw.MemorySource(image), prefetch=False, record_access=True) as h:
        h.start()
        verify(mem, mem.touch(), image, [])
        log = h.access_log()
        # Every page once, in the order the reader went; far fewer faults than pages.
        assert log == pages_of(mem)
        assert h.stats()["faults"] < len(log) // 8


@pytest.mark.parametrize(("kind", "mode"), KIND_MODES)
def test_remote_sequential_reader_on_demand(kind: str, mode: Mode, tmp_path: Path) -> None:
    """On demand from a page server: the windows travel as urgent requests, the poison the
    server knows stays poison, and the guest reads the right bytes."""
    size = _size(kind)
    image = make_image(size, 96)
    small = [size // 3 // 4096 * 4096, size - 4096]
    with page_server(tmp_path, image, pw.PoisonSet(small, page_size=4096)) as (_, address):
        mem = make_memory(kind, size)
        want = sorted({gpa - gpa % mem.page_size for gpa in small})
        with (
            pw.RemoteSource(address, TOKEN) as source,
            pw.Handler(mem, source, mode=mode, prefetch=False, fault_around=_window(kind)) as h,
        ):
            h.start()
            result = mem.touch(threads=1, order="sequential")
            h.check()
            verify(mem, result, image, want)
            stats = h.stats()
            pages = len(pages_of(mem))
            # A request carries at most 4 MiB: two huge pages per window there.
            per_window = 2 if kind == "hugetlb" else 16
            assert stats["pages_faulted_around"] >= pages // 3, stats
            assert stats["faults"] <= pages // per_window + 2 * len(want) + 8, stats
            assert source.stats()["urgent_requests"] <= stats["faults"]
