"""Poison is never lost: across prefetch, repeated touches, MADV_DONTNEED and migrations."""

from __future__ import annotations

import ctypes
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    KIND_MODES,
    MADV_DONTNEED,
    MiB,
    Mode,
    kind_modes,
    madvise,
    make_image,
    make_memory,
    pages_of,
    pick_poison,
    settled_stats,
    verify,
    wait_for_state,
)

import pagewarden as pw

pytestmark = pytest.mark.usefixtures("uffd")


def size_of(kind: str) -> int:
    return 16 * MiB if kind == "hugetlb" else 2 * MiB


@pytest.mark.parametrize(("kind", "mode"), KIND_MODES)
def test_poison_survives_prefetch_and_retouch(kind: str, mode: Mode) -> None:
    size = size_of(kind)
    image = make_image(size, 31)
    mem = make_memory(kind, size)
    poisoned = pick_poison(mem, 31)
    poison = pw.PoisonSet(poisoned, page_size=mem.page_size)
    with pw.Handler(mem, pw.MemorySource(image), poison=poison, mode=mode, prefetch=True) as h:
        h.start()
        assert h.wait(timeout=30) is True
        for gpa in poisoned:
            assert h.page_state(gpa) == "poisoned"
        for seed in (1, 2):
            result = mem.touch(threads=2, order="random", seed=seed)
            verify(mem, result, image, poisoned)
        kernel = mem.touch(threads=2, order="random", via="kernel", seed=3)
        verify(mem, kernel, image, poisoned, via="kernel")
        for gpa in poisoned:
            assert h.page_state(gpa) == "poisoned"
        assert h.poison_set() == poison
    # After close the markers stay: the pages still SIGBUS, the others keep their bytes.
    result = mem.touch(threads=2, order="random", seed=4)
    verify(mem, result, image, poisoned)


DONTNEED_KINDS = kind_modes(("hugetlb", "minor"))


@pytest.mark.parametrize("prefetch", [False, True], ids=["noprefetch", "prefetch"])
@pytest.mark.parametrize(("kind", "mode"), DONTNEED_KINDS)
def test_dontneed_of_poisoned_page_stays_poisoned(kind: str, mode: Mode, prefetch: bool) -> None:
    size = size_of(kind)
    image = make_image(size, 41)
    mem = make_memory(kind, size)
    ps = mem.page_size
    poisoned = pick_poison(mem, 41)
    poison = pw.PoisonSet(poisoned, page_size=ps)
    with pw.Handler(mem, pw.MemorySource(image), poison=poison, mode=mode, prefetch=prefetch) as h:
        h.start()
        first = mem.touch(threads=2, order="random", seed=1)
        assert h.wait(timeout=30) is True
        verify(mem, first, image, poisoned)
        before = h.stats()
        victim = poisoned[len(poisoned) // 2]
        host = mem.host_address_of(victim)
        assert host is not None
        # Drops the marker (and raises a REMOVE event the running handler reads).
        madvise(host, ps, MADV_DONTNEED)
        assert h.page_state(victim) == "poisoned"
        again = mem.touch(pages=[victim], seed=2)
        verify(mem, again, image, poisoned, touched=[victim])
        # Once more, through the kernel path.
        madvise(host, ps, MADV_DONTNEED)
        kernel = mem.touch(pages=[victim], via="kernel")
        verify(mem, kernel, image, poisoned, touched=[victim], via="kernel")
        assert h.page_state(victim) == "poisoned"
        assert h.poison_set() == poison

        def repoisoned(after: dict[str, Any]) -> None:
            assert after["remove_events"] >= before["remove_events"] + 2
            assert after["pages_poisoned"] >= before["pages_poisoned"] + 2

        settled_stats(h, repoisoned)
        # Everything else is as it was.
        whole = mem.touch(threads=2, order="random", seed=3)
        verify(mem, whole, image, poisoned)
        assert h.wait(timeout=30) is True


@pytest.mark.parametrize("prefetch", [False, True], ids=["noprefetch", "prefetch"])
def test_dontneed_of_range_with_poison_anon(prefetch: bool) -> None:
    """DONTNEED over a range mixing poisoned and present pages: the poisoned ones still SIGBUS,
    the others read zero (anonymous memory the guest discarded)."""
    size = 1 * MiB
    image = make_image(size, 43)
    mem = make_memory("anon", size)
    poisoned = [0x0, 0x5000, 0x7000, size - 4096]
    poison = pw.PoisonSet(poisoned)
    with pw.Handler(mem, pw.MemorySource(image), poison=poison, prefetch=prefetch) as h:
        h.start()
        verify(mem, mem.touch(threads=2, order="random", seed=9), image, poisoned)
        assert h.wait(timeout=30) is True
        host = mem.host_address_of(0x4000)
        assert host is not None
        madvise(host, 0x5000, MADV_DONTNEED)  # 0x4000..0x9000: poison at 0x5000 and 0x7000
        span = list(range(0x3000, 0xA000, 0x1000))
        result = mem.touch(pages=span, threads=2, order="random", seed=10)
        zero = pw.page_checksum(bytes(4096))
        assert sorted(result.poisoned) == [0x5000, 0x7000]
        for gpa in (0x4000, 0x6000, 0x8000):
            assert result.checksums[gpa] == zero, f"page {gpa:#x} should read zero"
        for gpa in (0x3000, 0x9000):
            assert result.checksums[gpa] == pw.page_checksum(image[gpa : gpa + 4096])
        assert h.poison_set() == poison
        assert h.stats()["remove_events"] >= 1


@pytest.mark.parametrize("prefetch", [False, True], ids=["noprefetch", "prefetch"])
def test_dontneed_of_present_anon_page_reads_zero(prefetch: bool) -> None:
    size = 1 * MiB
    image = make_image(size, 47)
    mem = make_memory("anon", size)
    poisoned = [0x0, size - 4096]
    poison = pw.PoisonSet(poisoned)
    with pw.Handler(mem, pw.MemorySource(image), poison=poison, prefetch=prefetch) as h:
        h.start()
        verify(mem, mem.touch(threads=2, order="random", seed=5), image, poisoned)
        assert h.wait(timeout=30) is True
        victim = 0x3000
        assert h.page_state(victim) == "present"
        assert mem.read(victim, 4096) == image[victim : victim + 4096]
        host = mem.host_address_of(victim)
        assert host is not None
        madvise(host, 4096, MADV_DONTNEED)
        result = mem.touch(pages=[victim, 0x4000])
        assert result.poisoned == []
        assert result.checksums[victim] == pw.page_checksum(bytes(4096))
        assert result.checksums[0x4000] == pw.page_checksum(image[0x4000:0x5000])
        assert mem.read(victim, 4096) == bytes(4096)
        assert wait_for_state(h, victim, "present")

        def zeroed(stats: dict[str, Any]) -> None:
            assert stats["remove_events"] >= 1
            assert stats["pages_zeroed"] >= 1

        settled_stats(h, zeroed)
        assert h.poison_set() == poison
        assert h.wait(timeout=30) is True


@pytest.mark.parametrize("mode", ["missing", "minor"])
def test_dontneed_of_present_shmem_page_keeps_bytes(mode: Mode) -> None:
    """On shared memory DONTNEED only unmaps: the page cache keeps the source's bytes."""
    size = 1 * MiB
    image = make_image(size, 53)
    mem = make_memory("shmem", size)
    poison = pw.PoisonSet([0x1000])
    with pw.Handler(mem, pw.MemorySource(image), poison=poison, mode=mode, prefetch=True) as h:
        h.start()
        assert h.wait(timeout=30) is True
        host = mem.host_address_of(0x8000)
        assert host is not None
        madvise(host, 0x4000, MADV_DONTNEED)
        result = mem.touch(threads=2, order="random", seed=6)
        verify(mem, result, image, [0x1000])


@pytest.mark.parametrize("mode", ["missing", "minor"])
def test_dontneed_of_missing_shmem_page_keeps_source_bytes(mode: Mode) -> None:
    """madvise(2): after MADV_DONTNEED on a shared mapping, accesses "repopulate the memory
    contents from the up-to-date contents of the underlying mapped file". On the source host
    the page would still hold its bytes, so the destination must serve the source's bytes for
    a page the guest DONTNEEDs before it was fetched, not zeros."""
    size = 1 * MiB
    image = make_image(size, 57)
    mem = make_memory("shmem", size)
    poison = pw.PoisonSet([0x1000])
    with pw.Handler(mem, pw.MemorySource(image), poison=poison, mode=mode, prefetch=False) as h:
        h.start()
        host = mem.host_address_of(0x8000)
        assert host is not None
        assert h.page_state(0x8000) == "missing"
        madvise(host, 0x4000, MADV_DONTNEED)  # 0x8000..0xC000, never fetched
        result = mem.touch(threads=2, order="random", seed=8)
        verify(mem, result, image, [0x1000])


def test_dontneed_storm_while_prefetching() -> None:
    """A guest discarding random anonymous ranges while pages are faulted and prefetched:
    poisoned pages always SIGBUS, other pages hold the source's bytes or (once discarded)
    zeros, never anything else, and nothing hangs."""
    size = 2 * MiB
    ps = 4096
    image = make_image(size, 59)
    mem = make_memory("anon", size)
    poisoned = pick_poison(mem, 59, extra=6)
    poison = pw.PoisonSet(poisoned)
    zero = pw.page_checksum(bytes(ps))
    discarded: set[int] = set()
    rng = random.Random(59)
    ranges = []
    for _ in range(150):
        first = rng.randrange(0, size // ps)
        count = min(rng.randrange(1, 9), size // ps - first)
        ranges.append((first * ps, count * ps))
        discarded.update(range(first * ps, (first + count) * ps, ps))

    def discard() -> None:
        for gpa, length in ranges:
            host = mem.host_address_of(gpa)
            assert host is not None
            madvise(host, length, MADV_DONTNEED)

    def check(result: pw.TouchResult) -> None:
        assert sorted(result.poisoned) == poisoned
        assert [g for g, _, _ in result.sigbus] == sorted(g for g, _, _ in result.sigbus)
        for gpa, checksum in result.checksums.items():
            want = pw.page_checksum(image[gpa : gpa + ps])
            assert checksum == want or (gpa in discarded and checksum == zero), hex(gpa)

    with pw.Handler(mem, pw.MemorySource(image), poison=poison, prefetch=True) as h:
        h.start()
        discarder = threading.Thread(target=discard, daemon=True)
        discarder.start()
        for seed in range(3):
            check(mem.touch(threads=2, order="random", seed=seed))
        discarder.join(60)
        assert not discarder.is_alive(), "madvise(MADV_DONTNEED) is stuck"
        assert h.wait(timeout=30) is True
        check(mem.touch(threads=2, order="random", seed=9))
        check(mem.touch(threads=2, order="random", via="kernel", seed=10))
        for gpa in poisoned:
            assert h.page_state(gpa) == "poisoned"
        assert h.poison_set() == poison
        assert h.stats()["remove_events"] >= 1
        h.check()


@pytest.mark.parametrize(("kind", "mode"), KIND_MODES)
def test_read_of_poisoned_page_raises(kind: str, mode: Mode) -> None:
    size = size_of(kind)
    image = make_image(size, 61)
    mem = make_memory(kind, size)
    ps = mem.page_size
    poisoned = pick_poison(mem, 61)
    poison = pw.PoisonSet(poisoned, page_size=ps)
    good = next(gpa for gpa in pages_of(mem) if gpa not in poison and gpa + ps in poison)
    with pw.Handler(mem, pw.MemorySource(image), poison=poison, mode=mode, prefetch=False) as h:
        h.start()
        for gpa in poisoned:
            with pytest.raises(pw.PoisonedPageError) as info:
                mem.read(gpa, 8)
            assert info.value.guest_address == gpa
            assert isinstance(info.value, pw.PagewardenError)
            assert isinstance(info.value, OSError)
            assert f"{gpa:#x}" in str(info.value)
        # Unaligned, inside a poisoned page.
        with pytest.raises(pw.PoisonedPageError) as info:
            mem.read(poisoned[1] + 100, 16)
        assert info.value.guest_address == poisoned[1]
        # Starting on a good page and running into a poisoned one.
        with pytest.raises(pw.PoisonedPageError) as info:
            mem.read(good + ps - 16, 32)
        assert info.value.guest_address == good + ps
        # The good page itself reads right, and becomes present (the handler may record that
        # just after it woke the reader).
        assert mem.read(good, ps) == image[good : good + ps]
        assert wait_for_state(h, good, "present")
        for gpa in poisoned:
            assert h.page_state(gpa) == "poisoned"


def test_poison_survives_two_migrations(tmp_path: Path) -> None:
    """Host A -> host B -> host C: B serves C from its own guest memory, and the poison set B
    knows (saved to a file, loaded again) keeps the poisoned pages poisoned on C."""
    size = 2 * MiB
    image = make_image(size, 71)
    poisoned = [0x0, 0x3000, 0x4000, 0x10000, size - 4096]
    on_a = pw.PoisonSet(poisoned)

    mem_b = make_memory("anon", size)
    with pw.Handler(mem_b, pw.MemorySource(image), poison=on_a, prefetch=True) as hb:
        hb.start()
        assert hb.wait(timeout=30) is True
        found = hb.poison_set()
    assert found == on_a
    path = tmp_path / "poison.json"
    found.save(path)
    loaded = pw.PoisonSet.load(path)
    assert loaded == on_a

    # B's guest memory (still mapped, poison markers in place) is C's source.
    # (A memoryview cast to "B": MemorySource rejects the bare ctypes array; see test_sources.)
    view = memoryview((ctypes.c_ubyte * size).from_address(mem_b.address)).cast("B")
    mem_c = make_memory("shmem", size)
    with pw.Handler(mem_c, pw.MemorySource(view), poison=loaded, prefetch=True) as hc:
        hc.start()
        result = mem_c.touch(threads=2, order="random", seed=7)
        assert hc.wait(timeout=30) is True
        verify(mem_c, result, image, poisoned)
        assert hc.poison_set() == on_a
        hc.check()
    assert mem_b.size == size  # B's memory outlived C's handler
