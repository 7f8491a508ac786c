"""Handler life cycle: stats, fail-stop on a broken source, garbage collection, the skip policy."""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import make_image, make_memory, pages_of, settled_stats, unavailable, verify

import pagewarden as pw

STAT_NAMES = {
    "faults",
    "pages_copied",
    "pages_zeroed",
    "pages_poisoned",
    "pages_prefetched",
    "pages_faulted_around",
    "eexist",
    "eagain_retries",
    "remove_events",
    "latency_ns_avg",
    "latency_dist_us_log2",
    "blocktime_ms",
    "pages_total",
    "pages_resolved",
}


def test_stats_names_and_consistency(uffd: None) -> None:
    size = 0x80000
    image = make_image(size, 1)
    mem = make_memory("anon", size)
    poison = [0x0, 0x4000]
    with pw.Handler(mem, pw.MemorySource(image), poison=pw.PoisonSet(poison), prefetch=False) as h:
        before = h.stats()
        missing = STAT_NAMES - set(before)
        assert not missing, f"stats() lacks {sorted(missing)}"
        assert before["faults"] == 0
        assert before["pages_resolved"] == len(poison)
        assert before["pages_total"] == size // 4096
        h.start()
        result = mem.touch(threads=2, order="random", seed=2)
        verify(mem, result, image, poison)
        assert h.wait(timeout=30) is True

        def settled(stats: dict[str, Any]) -> None:
            for name, value in stats.items():
                if name == "latency_dist_us_log2":
                    assert isinstance(value, list) and all(isinstance(v, int) for v in value)
                else:
                    assert isinstance(value, int), f"{name}: {value!r}"
                    assert value >= 0, name
            # Every fault was resolved and timed once; no page was served twice. A page came
            # either with its own fault or with an earlier one's fault-around.
            assert stats["faults"] + stats["pages_faulted_around"] >= size // 4096 - len(poison)
            assert sum(stats["latency_dist_us_log2"]) == stats["faults"]
            assert stats["pages_copied"] == size // 4096 - len(poison)
            assert stats["pages_prefetched"] == 0
            assert stats["pages_zeroed"] == 0
            assert stats["remove_events"] == 0
            assert stats["latency_ns_avg"] > 0

        settled_stats(h, settled)
        # The touch report is self-consistent too.
        assert sum(result.latency_dist_us_log2) == result.pages == size // 4096
        assert result.latency_ns_avg > 0
        assert result.elapsed_s > 0


@pytest.mark.parametrize("prefetch", [False, True], ids=["noprefetch", "prefetch"])
def test_source_failure_is_fail_stop(uffd: None, tmp_path: Path, prefetch: bool) -> None:
    """The image file loses its second half after the handler checked its size: pages that
    cannot be read are never answered with zeros; the handler fails loudly."""
    size = 0x40000
    half = size // 2
    image = make_image(size, 3)
    path = tmp_path / "guest.img"
    path.write_bytes(image)
    source = pw.FileSource(path)
    mem = make_memory("anon", size)
    poison = pw.PoisonSet([0x1000])
    with pw.Handler(mem, source, poison=poison, prefetch=prefetch) as h:
        os.truncate(path, half)
        h.start()
        result = mem.touch(order="sequential")
        bad = set(result.poisoned)
        # Every page is either right or inaccessible: never zeros, never stale bytes.
        for gpa, checksum in result.checksums.items():
            assert checksum == pw.page_checksum(image[gpa : gpa + 4096]), hex(gpa)
        assert all(gpa in bad for gpa in range(half, size, 4096))
        assert 0x1000 in bad
        with pytest.raises(pw.SourceError) as info:
            h.wait(timeout=30)
        assert str(path) in str(info.value)
        with pytest.raises(pw.SourceError):
            h.check()
        assert h.page_state(size - 4096) == "fenced"
        assert h.page_state(0x1000) == "poisoned"
        # The failure is not hardware poison.
        assert h.poison_set() == poison
        # The guest's later accesses stay fail-stop.
        again = mem.touch(pages=pages_of(mem)[-4:])
        assert sorted(again.poisoned) == pages_of(mem)[-4:]
        with pytest.raises(pw.PoisonedPageError):
            mem.read(size - 4096, 8)


def test_garbage_collected_handler_fences(uffd: None) -> None:
    """A Handler dropped without close() stops its loop and fences: no hang, no zeros."""
    size = 0x20000
    image = make_image(size, 5)
    mem = make_memory("anon", size)
    h = pw.Handler(mem, pw.MemorySource(image), poison=pw.PoisonSet([0x3000]), prefetch=False)
    h.start()
    verify(mem, mem.touch(pages=[0x1000]), image, [], touched=[0x1000])
    del h
    gc.collect()
    assert mem.read(0x1000, 4096) == image[0x1000:0x2000]
    for gpa in (0x0, 0x3000, size - 0x1000):
        with pytest.raises(pw.PoisonedPageError):
            mem.read(gpa, 8)
    # The memory is free for another handler (it cannot bring back fenced pages' bytes, but
    # it must not hang or fail to start).
    with pw.Handler(mem, pw.MemorySource(image), prefetch=False) as h2:
        h2.start()
        assert h2.running


def test_context_manager_closes_on_error(uffd: None) -> None:
    mem = make_memory("shmem", 0x10000)
    with pytest.raises(KeyError), pw.Handler(mem, pw.ZeroSource(), prefetch=False) as h:
        h.start()
        assert h.running
        raise KeyError("boom")
    assert not h.running
    with pytest.raises(pw.HandlerClosedError):
        h.wait(timeout=1)
    with pytest.raises(pw.PoisonedPageError):
        mem.read(0, 8)  # fenced, not zero


def test_unavailable_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The conftest policy: skip, or fail when PAGEWARDEN_REQUIRE_UFFD=1."""
    monkeypatch.delenv("PAGEWARDEN_REQUIRE_UFFD", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no widget"):
        unavailable("no widget")
    monkeypatch.setenv("PAGEWARDEN_REQUIRE_UFFD", "1")
    with pytest.raises(pytest.fail.Exception, match="no widget"):
        unavailable("no widget")
