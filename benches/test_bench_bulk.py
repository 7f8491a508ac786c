"""Bulk figures: background prefetch, pre-poisoning a large poison set, PoisonSet lookups and
memory (pytest-benchmark; on with ``python -m pytest benches --benchmark-enable``).

The kernel bounds they are compared with (ranged UFFDIO_COPY, ranged UFFDIO_POISON, memcpy) are
measured by the C program in ``test_c_*``; ``pagewarden bench`` prints the ratios.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import pagewarden as pw
from pagewarden import _native, bench

PREFETCH_BYTES = 64 << 20
PREPOISON_PAGES = 1 << 18
ROUNDS = 5


def test_prefetch(benchmark: Any) -> None:
    """A whole region brought in by background prefetch from a MemorySource, no faults."""
    source = bench.pattern(PREFETCH_BYTES)

    def setup() -> tuple[tuple[pw.Handler], dict[str, Any]]:
        mem = pw.GuestMemory.anonymous(PREFETCH_BYTES)
        return (pw.Handler(mem, pw.MemorySource(source), prefetch=True),), {}

    def run(handler: pw.Handler) -> dict[str, Any]:
        handler.start()
        assert handler.wait(timeout=60)
        stats = handler.stats()
        handler.close()
        return stats

    stats = benchmark.pedantic(run, setup=setup, rounds=ROUNDS)
    assert stats["pages_prefetched"] == PREFETCH_BYTES // 4096
    benchmark.extra_info["bytes"] = PREFETCH_BYTES


def test_c_copy_bound(benchmark: Any, c_baseline: Path) -> None:
    """The UFFDIO_COPY bandwidth bound: 4 MiB ranged copies, in the C program."""
    out = benchmark.pedantic(
        bench.run_c_json, args=(c_baseline, "copybw", PREFETCH_BYTES, 4 << 20), rounds=ROUNDS
    )
    benchmark.extra_info["gib_s"] = PREFETCH_BYTES / (out["elapsed_ns"] / 1e9) / (1 << 30)


def test_c_memcpy(benchmark: Any, c_baseline: Path) -> None:
    """A plain memcpy of the same bytes (fresh and populated destination), in the C program."""
    out = benchmark.pedantic(
        bench.run_c_json, args=(c_baseline, "memcpy", PREFETCH_BYTES), rounds=ROUNDS
    )
    benchmark.extra_info["fresh_gib_s"] = PREFETCH_BYTES / (out["fresh_ns"] / 1e9) / (1 << 30)
    benchmark.extra_info["prefaulted_gib_s"] = (
        PREFETCH_BYTES / (out["prefaulted_ns"] / 1e9) / (1 << 30)
    )


@pytest.mark.parametrize("layout", list(bench.PREPOISON_PATTERNS))
def test_prepoison(benchmark: Any, layout: str) -> None:
    """Handler construction installing a large known poison set with ranged UFFDIO_POISON."""
    stride, run = bench.prepoison_layout(layout, PREPOISON_PAGES)
    runs = PREPOISON_PAGES // run
    poison = pw.PoisonSet()
    for r in range(runs):
        poison.add_range(r * stride * 4096, run * 4096)

    def setup() -> tuple[tuple[pw.GuestMemory], dict[str, Any]]:
        return (pw.GuestMemory.anonymous(runs * stride * 4096),), {}

    def construct(mem: pw.GuestMemory) -> int:
        handler = pw.Handler(mem, pw.ZeroSource(), poison=poison, prefetch=False)
        poisoned = int(handler.stats()["pages_poisoned"])
        handler.close()
        return poisoned

    assert benchmark.pedantic(construct, setup=setup, rounds=3) == PREPOISON_PAGES
    benchmark.extra_info["pages"] = PREPOISON_PAGES


@pytest.mark.parametrize("layout", list(bench.PREPOISON_PATTERNS))
def test_c_prepoison(benchmark: Any, layout: str, c_baseline: Path) -> None:
    """The kernel bound: one ranged UFFDIO_POISON per run, in the C program."""
    stride, run = bench.prepoison_layout(layout, PREPOISON_PAGES)
    out = benchmark.pedantic(
        bench.run_c_json,
        args=(c_baseline, "prepoison", PREPOISON_PAGES, stride, run),
        rounds=3,
    )
    benchmark.extra_info["pages_per_s"] = PREPOISON_PAGES / (out["elapsed_ns"] / 1e9)


@pytest.mark.parametrize("ascending", [False, True], ids=["random", "ascending"])
@pytest.mark.parametrize("shape", ["dense", "random 1/2", "clustered", "sparse"])
def test_poisonset(benchmark: Any, shape: str, ascending: bool) -> None:
    """1M native membership lookups x 8 in a set of 1M poisoned pages; memory in extra_info."""
    poison, span_pages = bench.poisonset_of(shape, 1 << 20)
    lookups, _hits, _seconds = benchmark(
        _native._bench_poison_lookups, poison, span_pages * 4096, 1 << 20, 8, 7, ascending
    )
    memory = poison.memory_bytes()
    benchmark.extra_info.update(
        lookups=lookups, memory_bytes=memory, bits_per_guest_page=memory * 8 / span_pages
    )
