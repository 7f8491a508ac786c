"""Fault-path benchmarks (pytest-benchmark; off in the test run, on with --benchmark-enable).

Each round registers a fresh region, so every touch is a first-touch fault.
"""

from __future__ import annotations

from typing import Any

import pytest

import pagewarden as pw

PAGES = 4096


def _fresh(source: Any) -> tuple[tuple[pw.GuestMemory, pw.Handler], dict[str, Any]]:
    mem = pw.GuestMemory.anonymous(PAGES * 4096)
    handler = pw.Handler(mem, source, prefetch=False)
    handler.start()
    return (mem, handler), {}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["copy", "zero"])
def test_fault_throughput(benchmark: Any, threads: int, kind: str) -> None:
    source: Any = pw.MemorySource(bytes(range(256)) * (PAGES * 16)) if kind == "copy" else None
    if source is None:
        source = pw.ZeroSource()

    def run(mem: pw.GuestMemory, handler: pw.Handler) -> pw.TouchResult:
        result = mem.touch(threads=threads)
        handler.close()
        return result

    result = benchmark.pedantic(run, setup=lambda: _fresh(source), rounds=5)
    assert result.pages == PAGES and not result.poisoned
