"""Record and replay: the order in which pages were first faulted (Handler.access_log) becomes
the next restore's prefetch order, so the working set arrives first."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import PAGE, make_image, verify

import pagewarden as pw


def test_record_then_replay(uffd: None, tmp_path: Path) -> None:
    pages = 512
    image = make_image(pages * PAGE, seed=61)
    rng = random.Random(61)
    working_set = [p * PAGE for p in rng.sample(range(pages), 40)]
    poisoned = [working_set[5]]

    mem = pw.GuestMemory.anonymous(pages * PAGE)
    with pw.Handler(
        mem,
        pw.MemorySource(image),
        poison=pw.PoisonSet(poisoned),
        prefetch=False,
        record_access=True,
        fault_around=0,
    ) as h:
        h.start()
        verify(mem, mem.touch(pages=working_set), image, poisoned, touched=working_set)
        log = h.access_log()
    # First faults only, in order; a poisoned page is poison, not a page brought in.
    assert log == [g for g in working_set if g not in poisoned]
    saved = tmp_path / "working-set.json"
    saved.write_text(json.dumps(log))

    mem2 = pw.GuestMemory.anonymous(pages * PAGE)
    order = json.loads(saved.read_text())
    with pw.Handler(
        mem2, pw.MemorySource(image), poison=pw.PoisonSet(poisoned), prefetch_order=order
    ) as h2:
        h2.start()
        assert h2.wait(timeout=30)
        st = h2.stats()
        assert st["pages_prefetched_planned"] == len(order)
        assert st["pages_prefetched"] == pages - len(poisoned)
        verify(mem2, mem2.touch(), image, poisoned)


def test_prefetch_order_ranges_and_errors(uffd: None) -> None:
    mem = pw.GuestMemory.anonymous(64 * PAGE, guest_address=0x100000)
    with pytest.raises(pw.GuestAddressError, match="prefetch_order"):
        pw.Handler(mem, pw.ZeroSource(), prefetch_order=[(0, PAGE)])
    with pytest.raises(pw.GuestAddressError, match="prefetch_order items"):
        pw.Handler(mem, pw.ZeroSource(), prefetch_order=["not an address"])  # type: ignore[list-item]
    with pw.Handler(mem, pw.ZeroSource(), prefetch_order=[(0x100000 + 8 * PAGE, 4 * PAGE)]) as h:
        with pytest.raises(pw.ConfigurationError, match="record_access"):
            h.access_log()
        h.start()
        assert h.wait(timeout=10)
        assert h.stats()["pages_prefetched_planned"] == 4
