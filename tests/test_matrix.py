"""Serving guest memory: memory kind x fault mode x prefetch x source, with poison."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    HUGE_PAGE,
    KIND_MODES,
    MiB,
    Mode,
    make_image,
    make_memory,
    pages_of,
    pick_poison,
    settled_stats,
    verify,
)

import pagewarden as pw

pytestmark = pytest.mark.usefixtures("uffd")


def size_of(kind: str) -> int:
    return 16 * MiB if kind == "hugetlb" else 4 * MiB


def poison_for(mem: pw.GuestMemory, seed: int) -> pw.PoisonSet:
    return pw.PoisonSet(pick_poison(mem, seed), page_size=mem.page_size)


def make_source(kind: str, image: bytes, tmp_path: Path) -> pw.FileSource | pw.MemorySource:
    if kind == "file":
        path = tmp_path / "guest.img"
        path.write_bytes(image)
        return pw.FileSource(path)
    return pw.MemorySource(image)


@pytest.mark.parametrize("source_kind", ["memory", "file"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["noprefetch", "prefetch"])
@pytest.mark.parametrize(("kind", "mode"), KIND_MODES)
def test_serve_matrix(
    kind: str, mode: Mode, prefetch: bool, source_kind: str, tmp_path: Path
) -> None:
    size = size_of(kind)
    seed = zlib.crc32(f"{kind}-{mode}-{prefetch}-{source_kind}".encode()) & 0xFFFF
    image = make_image(size, seed)
    mem = make_memory(kind, size)
    ps = mem.page_size
    assert ps == (HUGE_PAGE if kind == "hugetlb" else 4096)
    poison = poison_for(mem, seed)
    poisoned = list(poison)
    assert pages_of(mem)[0] in poisoned and pages_of(mem)[-1] in poisoned
    source = make_source(source_kind, image, tmp_path)
    with pw.Handler(mem, source, poison=poison, mode=mode, prefetch=prefetch) as h:
        h.start()
        assert h.running
        if prefetch:
            # Touch a few pages only (one of them poisoned): prefetch must bring in the rest.
            few = sorted({pages_of(mem)[1], pages_of(mem)[2], poisoned[0], pages_of(mem)[-2]})
            first = mem.touch(pages=few, threads=2, order="random", seed=seed)
            verify(mem, first, image, poisoned, touched=few)
            assert h.wait(timeout=30) is True
            assert h.stats()["pages_prefetched"] > 0
        result = mem.touch(threads=2, order="random", seed=seed + 1)
        assert h.wait(timeout=30) is True
        verify(mem, result, image, poisoned)
        assert h.poison_set() == poison
        for gpa in poisoned:
            assert h.page_state(gpa) == "poisoned"
        good = [gpa for gpa in pages_of(mem) if gpa not in poison]
        assert good and all(h.page_state(gpa) == "present" for gpa in good)

        def settled(stats: dict[str, Any]) -> None:
            assert stats["pages_total"] == size // ps
            assert stats["pages_resolved"] == stats["pages_total"]
            assert stats["pages_missing"] == 0
            assert stats["pages_poisoned"] >= len(poison)
            assert stats["pages_copied"] == stats["pages_total"] - len(poison)
            if not prefetch:
                assert stats["pages_prefetched"] == 0
                # Each page faulted, or came with an earlier fault (fault-around).
                came = stats["faults"] + stats["pages_faulted_around"]
                assert came >= stats["pages_total"] - len(poison)

        settled_stats(h, settled)
    assert not h.running


@pytest.mark.parametrize(
    ("kind", "mode"), [("anon", "missing"), ("shmem", "missing"), ("shmem", "minor")]
)
def test_touch_via_kernel(kind: str, mode: Mode) -> None:
    """process_vm_readv (how KVM and vhost reach guest memory) gets EFAULT on poison."""
    size = 2 * MiB
    image = make_image(size, 7)
    mem = make_memory(kind, size)
    poison = poison_for(mem, 7)
    with pw.Handler(mem, pw.MemorySource(image), poison=poison, mode=mode, prefetch=False) as h:
        h.start()
        result = mem.touch(threads=2, order="random", via="kernel", seed=3)
        verify(mem, result, image, list(poison), via="kernel")
        assert h.wait(timeout=30) is True
        # A second pass, now through loads: the same pages SIGBUS.
        again = mem.touch(threads=2, order="random", seed=4)
        verify(mem, again, image, list(poison))


@pytest.mark.parametrize("prefetch", [False, True], ids=["noprefetch", "prefetch"])
def test_anon_minor_rejected(prefetch: bool) -> None:
    size = 1 * MiB
    image = make_image(size, 11)
    mem = pw.GuestMemory.anonymous(size)
    poison = poison_for(mem, 11)
    with pytest.raises(pw.ConfigurationError, match="minor") as info:
        pw.Handler(mem, pw.MemorySource(image), poison=poison, mode="minor", prefetch=prefetch)
    assert isinstance(info.value, pw.PagewardenError)
    assert isinstance(info.value, OSError)
    # The failed attempt left the memory alone: a MISSING handler serves it.
    with pw.Handler(mem, pw.MemorySource(image), poison=poison, prefetch=prefetch) as h:
        h.start()
        result = mem.touch(threads=2, order="random", seed=1)
        assert h.wait(timeout=30) is True
        verify(mem, result, image, list(poison))


ZERO_KINDS = [
    pytest.param("anon", "missing", id="anon-missing"),
    pytest.param("shmem", "missing", id="shmem-missing"),
    pytest.param("shmem", "minor", id="shmem-minor"),
    pytest.param("hugetlb", "missing", id="hugetlb-missing", marks=pytest.mark.hugetlb),
    pytest.param("hugetlb", "minor", id="hugetlb-minor", marks=pytest.mark.hugetlb),
]


@pytest.mark.parametrize("prefetch", [False, True], ids=["noprefetch", "prefetch"])
@pytest.mark.parametrize(("kind", "mode"), ZERO_KINDS)
def test_zero_source(kind: str, mode: Mode, prefetch: bool) -> None:
    size = 8 * MiB if kind == "hugetlb" else 1 * MiB
    mem = make_memory(kind, size)
    poison = pw.PoisonSet([pages_of(mem)[1]], page_size=mem.page_size)
    with pw.Handler(mem, pw.ZeroSource(), poison=poison, mode=mode, prefetch=prefetch) as h:
        h.start()
        result = mem.touch(threads=2, order="random", seed=5)
        assert h.wait(timeout=30) is True
        verify(mem, result, None, list(poison))
        zero = pw.page_checksum(bytes(mem.page_size))
        assert set(result.checksums.values()) == {zero}

        def zeroed(stats: dict[str, Any]) -> None:
            assert stats["pages_zeroed"] > 0
            assert stats["pages_zeroed"] == stats["pages_total"] - 1
            assert stats["pages_copied"] == 0

        settled_stats(h, zeroed)
        assert mem.read(0, 64) == bytes(64)


@pytest.mark.hugetlb
def test_small_page_poison_on_hugetlb_poisons_the_huge_page() -> None:
    """A 4 KiB poisoned page inside a huge page poisons the whole huge page."""
    size = 8 * MiB
    image = make_image(size, 21)
    mem = make_memory("hugetlb", size)
    small = pw.PoisonSet([HUGE_PAGE + 5 * 4096])
    with pw.Handler(mem, pw.MemorySource(image), poison=small, prefetch=True) as h:
        h.start()
        assert h.wait(timeout=30) is True
        result = mem.touch(order="random", seed=2)
        verify(mem, result, image, [HUGE_PAGE])
        assert h.page_state(HUGE_PAGE) == "poisoned"
        # poison_set() keeps the initial set as given (the hardware poison was one small page).
        found = h.poison_set()
        assert found == small
        assert found.with_page_size(HUGE_PAGE) == pw.PoisonSet([HUGE_PAGE], page_size=HUGE_PAGE)


def test_touch_pages_accepts_any_iterable() -> None:
    """The stub declares ``touch(pages: Iterable[int] | None)``."""
    size = 0x10000
    image = make_image(size, 23)
    mem = make_memory("anon", size)
    poison = pw.PoisonSet([0x2000])
    want = [0x1000, 0x2000, 0x3000]
    with pw.Handler(mem, pw.MemorySource(image), poison=poison, prefetch=False) as h:
        h.start()
        for pages in (
            tuple(want),
            range(0x1000, 0x4000, 0x1000),
            set(want),
            iter(want),
            (g for g in want),
            poison,
        ):
            result = mem.touch(pages=pages)
            touched = [0x2000] if pages is poison else want
            verify(mem, result, image, [0x2000], touched=touched)
