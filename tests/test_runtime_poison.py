"""Runtime poisoning (Handler.poison / poison_range / record_hardware_poison): a page poisoned
while the VM runs is dropped, marked, and never brought back by a racing fault or prefetch."""

from __future__ import annotations

import ctypes
import random
import threading

import pytest
from conftest import (
    HUGE_PAGE,
    KIND_MODES,
    PAGE,
    Mode,
    make_image,
    make_memory,
    pages_of,
    verify,
)

import pagewarden as pw

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.mincore.restype = ctypes.c_int


def resident(address: int, length: int) -> int:
    """Pages of [address, address + length) resident in memory (mincore)."""
    pages = (length + PAGE - 1) // PAGE
    vec = ctypes.create_string_buffer(pages)
    assert _libc.mincore(address, length, vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec.raw)


@pytest.mark.parametrize(("kind", "mode"), KIND_MODES)
def test_poisoning_a_present_page_drops_it_and_sigbuses(uffd: None, kind: str, mode: Mode) -> None:
    ps = HUGE_PAGE if kind == "hugetlb" else PAGE
    size = 8 * ps
    image = make_image(size, seed=11)
    mem = make_memory(kind, size)
    with pw.Handler(mem, pw.MemorySource(image), mode=mode, prefetch=True) as h:
        h.start()
        assert h.wait(timeout=30)
        victim = 3 * ps
        host = mem.host_address_of(victim)
        assert host is not None
        assert resident(host, ps) == ps // PAGE
        assert h.page_state(victim) == "present"
        assert h.poison(victim + 123) is True  # any address inside the page names it
        assert h.poison(victim) is False
        assert h.page_state(victim) == "poisoned"
        assert resident(host, ps) == 0, "the poisoned page's memory was not returned"
        with pytest.raises(pw.PoisonedPageError) as info:
            mem.read(victim, 8)
        assert info.value.guest_address == victim
        verify(mem, mem.touch(threads=2), image, [victim])
        assert victim in h.poison_set()
        st = h.stats()
        assert st["pages_poisoned_runtime"] == 1
        assert st["pages_resolved"] == st["pages_total"]


def test_poisoning_a_missing_page_marks_it(uffd: None) -> None:
    image = make_image(16 * PAGE, seed=12)
    mem = pw.GuestMemory.anonymous(16 * PAGE)
    with pw.Handler(mem, pw.MemorySource(image), prefetch=False) as h:
        h.start()
        assert h.poison_range(4 * PAGE, 3 * PAGE) == 3
        assert [h.page_state(g) for g in (4 * PAGE, 5 * PAGE, 6 * PAGE)] == ["poisoned"] * 3
        verify(mem, mem.touch(order="random", seed=1), image, [4 * PAGE, 5 * PAGE, 6 * PAGE])
        assert len(h.poison_set()) == 3


@pytest.mark.parametrize("kind", ["anon", "shmem"])
def test_racing_faults_and_prefetch_never_unpoison(uffd: None, kind: str) -> None:
    size = 64 << 20
    image = make_image(size, seed=13)
    mem = make_memory(kind, size)
    pages = pages_of(mem)
    rng = random.Random(5)
    initial = sorted(rng.sample(pages, 20))
    runtime = sorted(set(rng.sample(pages, 200)) - set(initial))
    errors: list[BaseException] = []

    with pw.Handler(mem, pw.MemorySource(image), poison=pw.PoisonSet(initial), prefetch=True) as h:
        h.start()

        def poisoner() -> None:
            try:
                for gpa in runtime:
                    h.poison(gpa)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        t = threading.Thread(target=poisoner)
        t.start()
        first = mem.touch(threads=2, order="random", seed=3)
        t.join()
        assert not errors, errors
        assert h.wait(timeout=60)
        # During the race a page may have been read before it was poisoned; afterwards every
        # poisoned page must SIGBUS and every other page must be right.
        assert set(first.poisoned) >= set(initial)
        verify(mem, mem.touch(threads=2, order="random", seed=4), image, initial + runtime)
        assert sorted(h.poison_set()) == sorted(initial + runtime)
        assert h.stats()["pages_poisoned_runtime"] == len(runtime)


def test_record_hardware_poison_maps_host_to_guest(uffd: None) -> None:
    image = make_image(1024 * PAGE, seed=14)
    mem = pw.GuestMemory.anonymous(1024 * PAGE, guest_address=0x4000_0000)
    with pw.Handler(mem, pw.MemorySource(bytes(0x4000_0000) + image), prefetch=True) as h:
        h.start()
        assert h.wait(timeout=30)
        host = mem.address + 5 * PAGE + 100
        assert mem.guest_address_of(host) == 0x4000_0000 + 5 * PAGE + 100
        assert h.record_hardware_poison(host) == 0x4000_0000 + 5 * PAGE
        # si_addr_lsb = 21: a 2 MiB granule, 512 pages around the address.
        first = h.record_hardware_poison(mem.address + 600 * PAGE, lsb=21)
        assert first == 0x4000_0000 + 512 * PAGE
        assert len(h.poison_set()) == 1 + 512
        result = mem.touch()
        assert len(result.poisoned) == 513
        with pytest.raises(pw.GuestAddressError):
            h.record_hardware_poison(mem.address + mem.size)


def test_runtime_poison_misuse(uffd: None) -> None:
    mem = pw.GuestMemory.anonymous(8 * PAGE)
    h = pw.Handler(mem, pw.ZeroSource(), prefetch=False)
    with pytest.raises(pw.ConfigurationError, match="start"):
        h.poison(0)
    h.start()
    with pytest.raises(pw.GuestAddressError):
        h.poison(8 * PAGE)
    with pytest.raises(pw.GuestAddressError):
        h.poison_range(4 * PAGE, 8 * PAGE)
    with pytest.raises(pw.GuestAddressError):
        h.poison_range(0, 0)
    assert h.stats()["pages_poisoned_runtime"] == 0
    h.close()
    with pytest.raises(pw.HandlerClosedError):
        h.poison(0)
