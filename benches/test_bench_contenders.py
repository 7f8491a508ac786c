"""Every fault scenario, run by every contender: pagewarden, the plain C handler, the pure-Python
handler and the kernel floor (pytest-benchmark; off in the test run, on with
``python -m pytest benches --benchmark-enable``).

Each round gets a fresh registered region from ``benchmark.pedantic(setup=...)``; the timed part
is the touch of every page (and, for the in-process contenders, closing the handler). The exact
figures each contender measured itself (faults/s, p50/p99 of one touch, handler CPU per fault)
are in each benchmark's ``extra_info``. ``pagewarden bench`` runs the same scenarios interleaved
and prints the ratios.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import pagewarden as pw
from pagewarden import bench

PAGES = 2048
HUGE_PAGES = 16
ROUNDS = 5
KINDS: list[bench.Kind] = ["copy", "zero", "poison", "continue", "hugetlb"]


def _pages(kind: bench.Kind) -> int:
    if kind == "hugetlb":
        free = int(pw.capabilities()["hugepages_2m_free"])
        if free < HUGE_PAGES:
            pytest.skip(f"needs {HUGE_PAGES} free 2 MiB hugepages ({free} free)")
        return HUGE_PAGES
    return PAGES


def _source(kind: bench.Kind, pages: int) -> mmap.mmap | None:
    if kind in ("copy", "continue", "hugetlb"):
        return bench.pattern(pages * bench.page_size_of(kind))
    return None


def _record(benchmark: Any, run: bench.FaultRun) -> None:
    """Puts the contender's own measurements in ``extra_info`` and checks the SIGBUS count."""
    expected = run.pages if run.kind == "poison" else 0
    assert run.sigbus == expected, f"{run.sigbus} touches raised SIGBUS, expected {expected}"
    summary = bench.summarize([run], run.kind)
    benchmark.extra_info.update(
        faults_per_s=round(summary.rate),
        p50_us=summary.p50_us,
        p99_us=summary.p99_us,
        cpu_us_per_fault=summary.cpu_us_per_fault,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_pagewarden(benchmark: Any, kind: bench.Kind, pinned_to: bench.Placement) -> None:
    pages = _pages(kind)
    source = _source(kind, pages)

    def setup() -> tuple[tuple[bench.Prepared], dict[str, Any]]:
        return (bench.prepare_pagewarden(kind, pages, source, pinned_to),), {}

    run = benchmark.pedantic(lambda p: p.touch(1), setup=setup, rounds=ROUNDS)
    _record(benchmark, run)


@pytest.mark.parametrize("kind", KINDS)
def test_pure_python(
    benchmark: Any, kind: bench.Kind, pinned_to: bench.Placement, pure_python: ModuleType
) -> None:
    pages = _pages(kind)
    source = _source(kind, pages)

    def setup() -> tuple[tuple[bench.Prepared], dict[str, Any]]:
        return (bench.prepare_python(pure_python, kind, pages, source, pinned_to),), {}

    run = benchmark.pedantic(lambda p: p.touch(1), setup=setup, rounds=ROUNDS)
    _record(benchmark, run)


@pytest.mark.parametrize("kind", KINDS)
def test_kernel_floor(benchmark: Any, kind: bench.Kind, pinned_to: bench.Placement) -> None:
    pages = _pages(kind)

    def setup() -> tuple[tuple[bench.Prepared], dict[str, Any]]:
        return (bench.prepare_floor(kind, pages),), {}

    run = benchmark.pedantic(lambda p: p.touch(1), setup=setup, rounds=ROUNDS)
    _record(benchmark, run)


@pytest.mark.parametrize("kind", KINDS)
def test_c_handler(
    benchmark: Any, kind: bench.Kind, placement: bench.Placement, c_baseline: Path
) -> None:
    """The C baseline is its own process: the timed part includes starting it and mapping its
    region; its own figures (in ``extra_info``) do not."""
    pages = _pages(kind)
    run = benchmark.pedantic(
        bench.run_c, args=(c_baseline, kind, pages, 1, placement), rounds=ROUNDS
    )
    _record(benchmark, run)


@pytest.mark.parametrize("contender", ["pagewarden", "C", "C batched", "Python"])
@pytest.mark.parametrize("kind", ["copy", "zero"])
def test_two_faulting_threads(
    benchmark: Any,
    kind: bench.Kind,
    contender: str,
    pinned_to: bench.Placement,
    c_baseline: Path,
    pure_python: ModuleType,
) -> None:
    """Two faulting threads: where a handler can batch the read side and resolve in ranges."""
    source = _source(kind, PAGES)

    def setup() -> tuple[tuple[bench.Prepared], dict[str, Any]]:
        if contender == "pagewarden":
            return (bench.prepare_pagewarden(kind, PAGES, source, pinned_to),), {}
        return (bench.prepare_python(pure_python, kind, PAGES, source, pinned_to),), {}

    if contender in ("C", "C batched"):
        run = benchmark.pedantic(
            bench.run_c,
            args=(c_baseline, kind, PAGES, 2, pinned_to, contender == "C batched"),
            rounds=ROUNDS,
        )
    else:
        run = benchmark.pedantic(lambda p: p.touch(2), setup=setup, rounds=ROUNDS)
    _record(benchmark, run)
