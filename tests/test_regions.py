"""One handler over several guest regions; close() fences what is still missing."""

from __future__ import annotations

import pytest
from conftest import make_image, make_memory, pages_of, verify

import pagewarden as pw

pytestmark = pytest.mark.usefixtures("uffd")

LOW = 0x0
HIGH = 0x100000
REGION = 0x40000  # 64 pages each
IMAGE_SIZE = HIGH + REGION
POISON_LOW = [LOW, LOW + 0x5000, LOW + REGION - 0x1000]
POISON_HIGH = [HIGH, HIGH + 0x9000, HIGH + REGION - 0x1000]


def two_regions(high_kind: str = "shmem") -> tuple[pw.GuestMemory, pw.GuestMemory]:
    low = make_memory("anon", REGION, guest_address=LOW)
    high = make_memory(high_kind, REGION, guest_address=HIGH)
    assert (low.guest_address, high.guest_address) == (LOW, HIGH)
    return low, high


@pytest.mark.parametrize("high_kind", ["anon", "shmem"])
def test_two_regions_served(high_kind: str) -> None:
    image = make_image(IMAGE_SIZE, 3)
    low, high = two_regions(high_kind)
    poison = pw.PoisonSet(POISON_LOW + POISON_HIGH)
    with pw.Handler([low, high], pw.MemorySource(image), poison=poison, prefetch=True) as h:
        h.start()
        r_low = low.touch(threads=2, order="random", seed=1)
        r_high = high.touch(threads=2, order="random", seed=2)
        assert h.wait(timeout=30) is True
        verify(low, r_low, image, POISON_LOW)
        verify(high, r_high, image, POISON_HIGH)
        assert high.read(HIGH + 0x2000, 16) == image[HIGH + 0x2000 : HIGH + 0x2010]
        assert h.poison_set() == poison
        assert h.page_state(HIGH - 0x1000) is None  # the hole between the regions
        assert h.page_state(IMAGE_SIZE) is None
        for gpa in POISON_LOW + POISON_HIGH:
            assert h.page_state(gpa) == "poisoned"
        stats = h.stats()
        assert stats["pages_total"] == 2 * REGION // 4096
        assert stats["pages_resolved"] == stats["pages_total"]
        assert stats["pages_poisoned"] >= len(poison)


def test_guest_address_translation() -> None:
    low, high = two_regions()
    assert high.host_address_of(HIGH) == high.address
    assert high.host_address_of(HIGH + 0x1234) == high.address + 0x1234
    assert high.host_address_of(LOW) is None
    assert high.host_address_of(HIGH + REGION) is None
    assert high.guest_address_of(high.address + 0x2000) == HIGH + 0x2000
    assert high.guest_address_of(low.address) is None
    assert low.guest_address_of(low.address + REGION - 1) == REGION - 1
    assert (low.kind, high.kind) == ("anonymous", "shmem")


@pytest.mark.parametrize("touch_first", [False, True], ids=["untouched", "touched"])
def test_close_fences_missing_pages(touch_first: bool) -> None:
    image = make_image(IMAGE_SIZE, 5)
    low, high = two_regions()
    poison = pw.PoisonSet(POISON_LOW + POISON_HIGH)
    h = pw.Handler(
        [low, high], pw.MemorySource(image), poison=poison, prefetch=False, fault_around=0
    )
    h.start()
    served = [LOW + 0x1000, LOW + 0x2000, HIGH + 0x1000, HIGH + 0x5000]
    if touch_first:
        for mem in (low, high):
            mine = [g for g in served if mem.host_address_of(g) is not None]
            verify(mem, mem.touch(pages=mine), image, [], touched=mine)
        assert h.wait(timeout=0.05) is False  # most pages are still missing
    h.close()
    assert not h.running
    h.close()  # idempotent
    missing = [
        g
        for g in pages_of(low) + pages_of(high)
        if g not in poison and not (touch_first and g in served)
    ]
    assert missing
    for gpa in missing:
        assert h.page_state(gpa) == "fenced", hex(gpa)
    for gpa in POISON_LOW + POISON_HIGH:
        assert h.page_state(gpa) == "poisoned"
    assert h.stats()["pages_fenced"] == len(missing)
    assert h.stats()["pages_resolved"] == h.stats()["pages_total"]
    # A fenced page never reads as zeros: PoisonedPageError, SIGBUS, EFAULT.
    for gpa in (missing[0], missing[-1]):
        mem = low if low.host_address_of(gpa) is not None else high
        with pytest.raises(pw.PoisonedPageError) as info:
            mem.read(gpa, 8)
        assert info.value.guest_address == gpa
    low_missing = [g for g in missing if g < HIGH]
    verify(low, low.touch(pages=low_missing), image, low_missing, touched=low_missing)
    verify(
        low,
        low.touch(pages=low_missing, via="kernel"),
        image,
        low_missing,
        touched=low_missing,
        via="kernel",
    )
    high_all = high.touch(threads=2, order="random", seed=7)
    fenced_high = [g for g in missing if g >= HIGH]
    verify(high, high_all, image, POISON_HIGH + fenced_high)
    # Pages served before close keep their bytes.
    if touch_first:
        for gpa in served:
            mem = low if gpa < HIGH else high
            assert mem.read(gpa, 4096) == image[gpa : gpa + 4096]
    # Fences are not hardware poison: they are not part of the poison set.
    assert h.poison_set() == poison


def test_close_then_reuse_raises() -> None:
    mem = make_memory("anon", 0x10000)
    h = pw.Handler(mem, pw.ZeroSource(), prefetch=True)
    h.start()
    assert h.wait(timeout=30) is True
    h.close()
    with pytest.raises(pw.HandlerClosedError):
        h.start()
    with pytest.raises(pw.HandlerClosedError):
        h.wait()
    with pytest.raises(pw.HandlerClosedError):
        h.wait(timeout=1)
    # Nothing was missing at close, so nothing was fenced; the zeros stay.
    assert h.stats()["pages_fenced"] == 0
    assert mem.read(0, 0x10000) == bytes(0x10000)
