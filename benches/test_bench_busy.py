"""The case the product exists for: faults inside a busy Python process, and the GIL trap
(pytest-benchmark; on with ``python -m pytest benches --benchmark-enable``).

Four Python threads of this process run pure-Python loops while native threads fault. pagewarden
resolves faults without the GIL; the pure-Python handler has to win the GIL for every poll, read
and ioctl. p50/p99 of one touch are in ``extra_info``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from pagewarden import bench

PAGES = 2048
PYTHON_PAGES = 48  # the pure-Python handler needs ~a GIL switch interval per fault when busy
BUSY_THREADS = 4
ROUNDS = 3


def _record(benchmark: Any, run: bench.FaultRun) -> None:
    summary = bench.summarize([run], run.kind)
    benchmark.extra_info.update(
        faults_per_s=round(summary.rate), p50_us=summary.p50_us, p99_us=summary.p99_us
    )


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_pagewarden(benchmark: Any, busy: bool, pinned_to: bench.Placement) -> None:
    source = bench.pattern(PAGES * 4096)

    def setup() -> tuple[tuple[bench.Prepared], dict[str, Any]]:
        return (bench.prepare_pagewarden("copy", PAGES, source, pinned_to),), {}

    with bench.busy_python_threads(BUSY_THREADS if busy else 0):
        run = benchmark.pedantic(lambda p: p.touch(1), setup=setup, rounds=ROUNDS)
    _record(benchmark, run)


@pytest.mark.parametrize("busy", [False, True], ids=["idle", "busy"])
def test_pure_python(
    benchmark: Any, busy: bool, pinned_to: bench.Placement, pure_python: ModuleType
) -> None:
    source = bench.pattern(PYTHON_PAGES * 4096)

    def setup() -> tuple[tuple[bench.Prepared], dict[str, Any]]:
        return (bench.prepare_python(pure_python, "copy", PYTHON_PAGES, source, pinned_to),), {}

    with bench.busy_python_threads(BUSY_THREADS if busy else 0):
        run = benchmark.pedantic(lambda p: p.touch(1), setup=setup, rounds=ROUNDS)
    _record(benchmark, run)


def test_gil_trap_pagewarden(benchmark: Any, pure_python: ModuleType) -> None:
    """A Python thread (holding the GIL) loads a missing guest page; pagewarden answers it. Run
    in a subprocess with a timeout, so a regression cannot hang the benchmark run."""
    demo = benchmark.pedantic(bench.gil_demo, args=("pagewarden", 10.0), rounds=ROUNDS)
    assert not demo.deadlocked, demo.detail
    benchmark.extra_info["touch_s"] = demo.seconds


def test_gil_trap_pure_python(pure_python: ModuleType) -> None:
    """The same with the pure-Python handler deadlocks (the subprocess is killed at 3 s)."""
    demo = bench.gil_demo("Python", 3.0)
    assert demo.deadlocked, demo.detail
