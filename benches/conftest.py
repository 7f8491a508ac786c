"""Shared fixtures for the benchmarks: the compiled C baseline, the pure-Python handler and the
CPU placement every contender is pinned to.

Run with ``python -m pytest benches --benchmark-enable`` (they are off in the test run).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

import pagewarden as pw
from pagewarden import bench


def _require_uffd() -> None:
    caps = pw.capabilities()
    if not caps["userfaultfd"] or not caps["poison"]:
        pytest.skip("needs a userfaultfd with UFFDIO_POISON (see `pagewarden info`)")


@pytest.fixture(scope="session")
def c_baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C baseline (``pagewarden/baselines/uffd_baseline.c``) compiled (once per session)."""
    _require_uffd()
    binary = bench.compile_c_baseline(tmp_path_factory.mktemp("c-baseline"))
    if binary is None:
        pytest.skip("the C baseline needs a C compiler (cc, gcc, clang or $CC)")
    return binary


@pytest.fixture(scope="session")
def pure_python() -> ModuleType:
    """The pure-Python handler module."""
    _require_uffd()
    return bench.load_pure_python_handler()


@pytest.fixture(scope="session")
def placement() -> bench.Placement:
    """Handler and faulting threads share one CPU: the stable placement on a nested-virt VM
    (``pagewarden bench`` also measures the handler on a CPU of its own)."""
    _require_uffd()
    return bench.placements()[0]


@pytest.fixture
def pinned_to(placement: bench.Placement) -> Iterator[bench.Placement]:
    """Pins the test thread (and so the threads it starts) to the placement's toucher CPU."""
    with bench.pinned(placement.toucher_cpu):
        yield placement
