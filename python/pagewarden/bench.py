"""``pagewarden bench``: pagewarden against a C handler, a pure-Python handler and the kernel floor.

Every fault scenario is run by four contenders on the same workload, interleaved within each
repetition (the order rotates), on a fresh registered region per run:

- ``pagewarden``: a ``Handler`` (prefetch off), its native event loop resolving every fault;
- ``C``: ``pagewarden/baselines/uffd_baseline.c``, compiled with the machine's C compiler into a
  temporary directory at the start of the run: one thread, poll + read + ioctl per fault, in its
  own process;
- ``Python``: ``pagewarden.baselines.pure_python_handler``, one Python thread, ``os.read`` +
  ``fcntl.ioctl``;
- ``floor``: the same touches with no userfaultfd at all (first-touch faults; for poison, the
  SIGBUS of an already installed marker).

The faulting threads are native in every case (``pagewarden._native._bench_touch``, or the C
program's own identical loop): one 8-byte load per page, each timed. Every contender is pinned
the same way, in two placements: handler and faulting threads on one CPU (the software cost of a
fault), and the handler on a CPU of its own (adding cross-CPU wake-ups, which under nested
virtualization cost tens of µs and, left to the scheduler, make runs bimodal). Reported figures
are medians over the repetitions; 2 faulting threads also run ``C batched``, the C loop resolving
contiguous faults with one ranged ioctl, to show what batching is worth. The bulk figures
(prefetch bandwidth, pre-poisoning, PoisonSet) are measured against kernel bounds taken by the C
program in the same run. Remote post-copy (``--only remote``) runs a page server in another
process on loopback and measures background push against a raw native TCP stream, and fault
latency idle, under push, and under push without the urgent channel. ``--only policy`` measures
faults/s with a per-fault Python ``on_fault`` and with a notifications-only policy against no
policy. BENCHMARKS.md has a full run and what limits each number.

The C baseline and the pure-Python handler ship in the package (``pagewarden.baselines``), so an
installed wheel runs the benchmark anywhere; without a C compiler (``$CC``, or cc, gcc or clang)
the sections that need the C program (faults, bulk) are skipped with a note and the others run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import mmap
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, cast

import pagewarden as pw
from pagewarden import _native, baselines

Kind = Literal["copy", "zero", "poison", "continue", "hugetlb"]
Contender = Literal["pagewarden", "C", "Python", "floor", "C batched"]
CONTENDERS: tuple[Contender, ...] = ("pagewarden", "C", "Python", "floor")
BATCHED: Contender = "C batched"


def contenders_for(threads: int) -> tuple[Contender, ...]:
    """The contenders of a scenario: the batching experiment only where faults can batch."""
    return (*CONTENDERS, BATCHED) if threads > 1 else CONTENDERS


PAGE_4K = 4096
PAGE_2M = 2 << 20
MIB = 1 << 20
GIB = 1 << 30
MADV_DONTNEED = 4
UFFD_THREAD_NAME = "pagewarden-uffd"

KIND_TITLES: dict[Kind, str] = {
    "copy": "UFFDIO_COPY 4K anon",
    "zero": "ZEROPAGE 4K anon",
    "poison": "POISON 4K (fault->SIGBUS)",
    "continue": "CONTINUE 4K shmem MINOR",
    "hugetlb": "COPY 2M hugetlb",
}


class BenchError(pw.PagewardenError):
    """The benchmark cannot run here (a missing dependency, or a baseline that does not build)."""


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class Config:
    """Sizes and repetitions of one run."""

    quick: bool
    repetitions: int
    pages: int
    huge_pages: int
    busy_python_pages: int
    busy_threads: int
    prefetch_bytes: int
    prepoison_pages: int
    poisonset_pages: int
    gil_timeout_s: float
    remote_bytes: int = 512 * MIB
    remote_touches: int = 2000
    policy_pages: int = 32768

    @staticmethod
    def make(quick: bool, repetitions: int | None = None) -> Config:
        """The quick (under a minute) or full configuration."""
        if quick:
            return Config(
                True,
                repetitions or 3,
                2048,
                16,
                48,
                4,
                64 * MIB,
                1 << 18,
                1 << 20,
                3.0,
                128 * MIB,
                500,
                8192,
            )
        return Config(False, repetitions or 7, 8192, 32, 192, 4, 256 * MIB, 1 << 20, 1 << 20, 5.0)


@dataclass(frozen=True)
class Scenario:
    """One fault workload: how faults are resolved, and how many threads fault."""

    kind: Kind
    threads: int

    @property
    def name(self) -> str:
        """A short identifier, e.g. ``copy-1t``."""
        return f"{self.kind}-{self.threads}t"


@dataclass(frozen=True)
class Placement:
    """Where the handler thread and the faulting threads run. On this kind of machine (nested
    virtualization) a wake-up across CPUs costs tens of µs and varies run to run, so every
    contender is pinned the same way and the two shapes are reported separately."""

    key: str
    handler_cpu: int
    toucher_cpu: int
    title: str


def placements() -> list[Placement]:
    """``one-cpu`` (handler and faulting threads share a CPU: the software cost of a fault) and,
    with two CPUs or more, ``two-cpus`` (the handler on its own CPU, as a deployment dedicates a
    core to it: adds the cross-CPU wake-ups)."""
    cpus = sorted(os.sched_getaffinity(0))
    out = [Placement("one-cpu", cpus[0], cpus[0], f"handler and faulting threads on CPU {cpus[0]}")]
    if len(cpus) > 1:
        out.append(
            Placement(
                "two-cpus",
                cpus[1],
                cpus[0],
                f"handler on CPU {cpus[1]}, faulting threads on CPU {cpus[0]}",
            )
        )
    return out


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Pins the calling thread to ``cpu`` meanwhile; threads it creates inherit the pinning."""
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("copy", 1),
    Scenario("copy", 2),
    Scenario("zero", 1),
    Scenario("zero", 2),
    Scenario("poison", 1),
    Scenario("continue", 1),
    Scenario("hugetlb", 1),
)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class FaultRun:
    """One contender's run of one scenario."""

    contender: str
    kind: str
    threads: int
    pages: int
    page_size: int
    elapsed_s: float
    latencies_ns: list[int]
    handler_cpu_ns: int | None
    sigbus: int

    @property
    def rate(self) -> float:
        """Faults (touched pages) per second of wall time."""
        return self.pages / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def cpu_per_fault_ns(self) -> float | None:
        """Handler CPU time per fault, in ns (None for the floor)."""
        if self.handler_cpu_ns is None or not self.pages:
            return None
        return self.handler_cpu_ns / self.pages


@dataclass
class Summary:
    """Medians over the repetitions of one contender on one scenario."""

    contender: str
    scenario: str
    runs: int
    rate: float
    p50_us: float
    p99_us: float
    cpu_us_per_fault: float | None
    rates: list[float] = field(default_factory=list)
    histogram_log2_us: list[int] = field(default_factory=list)


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank quantile of already sorted values."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def log2_histogram(latencies_ns: Sequence[int]) -> list[int]:
    """Counts per [2^i, 2^(i+1)) µs bucket (bucket 0 also holds everything below 1 µs)."""
    hist = [0] * 24
    for ns in latencies_ns:
        us = ns // 1000
        hist[min(us.bit_length() - 1 if us > 0 else 0, 23)] += 1
    return hist


def summarize(runs: Sequence[FaultRun], scenario: str) -> Summary:
    """Medians of rate, p50, p99 and CPU per fault over ``runs``."""
    p50s, p99s, cpus = [], [], []
    hist = [0] * 24
    for run in runs:
        ordered = sorted(run.latencies_ns)
        p50s.append(percentile(ordered, 0.50) / 1000)
        p99s.append(percentile(ordered, 0.99) / 1000)
        cpu = run.cpu_per_fault_ns
        if cpu is not None:
            cpus.append(cpu / 1000)
        for i, n in enumerate(log2_histogram(run.latencies_ns)):
            hist[i] += n
    rates = [r.rate for r in runs]
    return Summary(
        contender=runs[0].contender,
        scenario=scenario,
        runs=len(runs),
        rate=statistics.median(rates),
        p50_us=statistics.median(p50s),
        p99_us=statistics.median(p99s),
        cpu_us_per_fault=statistics.median(cpus) if cpus else None,
        rates=rates,
        histogram_log2_us=hist,
    )


# ---------------------------------------------------------------------------------------------
# Locating and building the baselines


def find_c_compiler() -> str | None:
    """The C compiler to build the baseline with: ``$CC``, else cc, gcc or clang on PATH."""
    env = os.environ.get("CC")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def compile_c_baseline(workdir: Path) -> Path | None:
    """Compiles the C baseline (``pagewarden/baselines/uffd_baseline.c``) into ``workdir``;
    returns the binary, or None when this machine has no C compiler."""
    compiler = find_c_compiler()
    if compiler is None:
        return None
    binary = workdir / "uffd_baseline"
    cmd = [compiler, "-O2", "-pthread", "-o", str(binary), str(baselines.C_BASELINE)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(2, f"compiling the C baseline failed:\n{done.stderr.strip()}")
    return binary


def load_pure_python_handler() -> ModuleType:
    """The pure-Python handler module (``pagewarden.baselines.pure_python_handler``)."""
    from pagewarden.baselines import pure_python_handler

    return pure_python_handler


# ---------------------------------------------------------------------------------------------
# Helpers


def thread_cpu_ns(native_id: int) -> int:
    """CPU time of thread ``native_id`` of this process, in ns (its thread CPU clock)."""
    return time.clock_gettime_ns(((~native_id) << 3) | 6)


def _threads_named(name: str) -> set[int]:
    found = set()
    for entry in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{entry}/comm") as f:
                if f.read().strip() == name:
                    found.add(int(entry))
        except OSError:
            continue
    return found


def start_and_find_loop_thread(handler: pw.Handler) -> int:
    """Starts ``handler`` and returns the thread id of its new ``pagewarden-uffd`` thread."""
    before = _threads_named(UFFD_THREAD_NAME)
    handler.start()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        new = _threads_named(UFFD_THREAD_NAME) - before
        if new:
            return max(new)
        time.sleep(0.0005)
    raise BenchError(2, "the handler's pagewarden-uffd thread did not appear")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def madvise_dontneed(address: int, length: int) -> None:
    """``madvise(MADV_DONTNEED)`` (ctypes releases the GIL, so a REMOVE event can be read)."""
    if _libc.madvise(address, length, MADV_DONTNEED) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_DONTNEED): {os.strerror(err)}")


_PATTERN_BLOCK = bytes((i * 7 + 1) & 0xFF for i in range(PAGE_4K)) * 256  # 1 MiB


def pattern(size: int) -> mmap.mmap:
    """``size`` bytes (a multiple of 4 KiB) of a repeating, non-zero pattern (every page written,
    so present), in a private anonymous mapping: page aligned like the C program's source. (A
    bytearray's bytes start 16 bytes into a page, which makes every UFFDIO_COPY read across
    page boundaries: about 6% slower for 2 MiB pages here.)"""
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    rewrite_pattern(buffer)
    return buffer


def rewrite_pattern(buffer: mmap.mmap) -> None:
    """Writes the pattern over ``buffer`` again, in place. Every contender copies from a source
    written just before its run (the C program writes its own), so none copies from colder
    memory than another."""
    view = memoryview(buffer)
    block = len(_PATTERN_BLOCK)
    for offset in range(0, len(buffer), block):
        end = min(offset + block, len(buffer))
        view[offset:end] = _PATTERN_BLOCK[: end - offset]


def page_size_of(kind: Kind) -> int:
    """The page size a kind of scenario faults at."""
    return PAGE_2M if kind == "hugetlb" else PAGE_4K


# ---------------------------------------------------------------------------------------------
# The four contenders


@dataclass
class Prepared:
    """A contender ready to be touched: a fresh region, its handler started (if any) and pinned.
    ``close`` releases everything; ``touch`` runs the workload and then closes."""

    contender: str
    kind: Kind
    pages: int
    memory: pw.GuestMemory
    handler: Any = None
    loop_thread: int = 0
    region: Any = None

    def handler_cpu_ns(self) -> int | None:
        """CPU time used so far by the handler thread (None for the floor)."""
        if self.contender == "pagewarden":
            return thread_cpu_ns(self.loop_thread)
        if self.contender == "Python":
            return int(self.handler.cpu_ns())
        return None

    def touch(self, threads: int) -> FaultRun:
        """Touches every page from ``threads`` native threads (which inherit the calling
        thread's CPU pinning), then closes."""
        try:
            cpu0 = self.handler_cpu_ns()
            elapsed, latencies, sigbus = _native._bench_touch(self.memory, threads)
            cpu1 = self.handler_cpu_ns()
            if self.contender == "pagewarden":
                self.handler.check()
            elif self.contender == "Python" and self.handler.error is not None:
                raise BenchError(2, f"the pure-Python handler failed: {self.handler.error!r}")
        finally:
            self.close()
        cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
        ps = page_size_of(self.kind)
        return FaultRun(
            self.contender, self.kind, threads, self.pages, ps, elapsed, latencies, cpu, sigbus
        )

    def close(self) -> None:
        """Closes the handler and releases the region."""
        if self.handler is not None:
            self.handler.close()
        if self.region is not None:
            self.region.close()


def _fresh_memory(kind: Kind, size: int) -> pw.GuestMemory:
    if kind in ("copy", "zero", "poison"):
        return pw.GuestMemory.anonymous(size)
    return pw.GuestMemory.memfd(size, hugepages=kind == "hugetlb")


def _all_poisoned(size: int) -> pw.PoisonSet:
    poison = pw.PoisonSet()
    poison.add_range(0, size)
    return poison


def prepare_pagewarden(
    kind: Kind,
    pages: int,
    source: mmap.mmap | None,
    placement: Placement,
    realtime: bool = False,
) -> Prepared:
    """pagewarden's Handler (prefetch off) on a fresh region, started, its event-loop thread
    pinned to the placement's handler CPU. With ``realtime`` that thread runs at SCHED_FIFO
    priority 1 (needs CAP_SYS_NICE; PermissionError otherwise). Call it with the calling thread
    pinned to the toucher CPU (see ``pinned``)."""
    size = pages * page_size_of(kind)
    if source is not None:
        rewrite_pattern(source)
    memory = _fresh_memory(kind, size)
    src: pw.MemorySource | pw.ZeroSource
    src = pw.ZeroSource() if source is None else pw.MemorySource(source)
    handler = pw.Handler(
        memory,
        src,
        poison=_all_poisoned(size) if kind == "poison" else None,
        mode="minor" if kind == "continue" else "missing",
        prefetch=False,
        # Every page its own fault, as for the other contenders: the cost of one fault.
        fault_around=0,
    )
    prepared = Prepared("pagewarden", kind, pages, memory, handler)
    try:
        prepared.loop_thread = start_and_find_loop_thread(handler)
        os.sched_setaffinity(prepared.loop_thread, {placement.handler_cpu})
        if realtime:
            os.sched_setscheduler(prepared.loop_thread, os.SCHED_FIFO, os.sched_param(1))
        if kind == "poison":
            # The markers were installed up front; a DONTNEED drops them (as a balloon would) but
            # not the poison state, so every touch is a MISSING fault that the handler answers
            # with UFFDIO_POISON, as the other contenders do.
            madvise_dontneed(memory.address, size)
    except BaseException:
        prepared.close()
        raise
    return prepared


def prepare_python(
    pph: ModuleType, kind: Kind, pages: int, source: mmap.mmap | None, placement: Placement
) -> Prepared:
    """The pure-Python handler (a Python thread) on a fresh region mapped by hand, started and
    pinned to the placement's handler CPU; the faulting threads stay native."""
    ps = page_size_of(kind)
    size = pages * ps
    region_kind = {"continue": "shmem", "hugetlb": "hugetlb"}.get(kind, "anonymous")
    resolution = {"hugetlb": "copy"}.get(kind, kind)
    if source is not None:
        rewrite_pattern(source)
    region = pph.Region(region_kind, size)
    try:
        handler = pph.PythonHandler(region, resolution, source)
    except BaseException:
        region.close()
        raise
    memory = pw.GuestMemory.from_address(region.address, size, ps)
    prepared = Prepared("Python", kind, pages, memory, handler, region=region)
    try:
        handler.start()
        os.sched_setaffinity(handler.native_id, {placement.handler_cpu})
    except BaseException:
        prepared.close()
        raise
    return prepared


def prepare_floor(kind: Kind, pages: int) -> Prepared:
    """A fresh region with no userfaultfd round trip: first touches are ordinary faults
    (anonymous read faults map the zero page; shmem and hugetlb allocate), or for poison the
    SIGBUS of markers installed up front (the handler is never started)."""
    size = pages * page_size_of(kind)
    memory = _fresh_memory(kind, size)
    handler = None
    if kind == "poison":
        handler = pw.Handler(memory, pw.ZeroSource(), poison=_all_poisoned(size), prefetch=False)
    return Prepared("floor", kind, pages, memory, handler)


def run_pagewarden(
    kind: Kind,
    pages: int,
    threads: int,
    source: mmap.mmap | None,
    placement: Placement,
    realtime: bool = False,
) -> FaultRun:
    """One run of pagewarden's Handler on a fresh region."""
    with pinned(placement.toucher_cpu):
        return prepare_pagewarden(kind, pages, source, placement, realtime).touch(threads)


def run_python(
    pph: ModuleType,
    kind: Kind,
    pages: int,
    threads: int,
    source: mmap.mmap | None,
    placement: Placement,
) -> FaultRun:
    """One run of the pure-Python handler with native faulting threads."""
    with pinned(placement.toucher_cpu):
        return prepare_python(pph, kind, pages, source, placement).touch(threads)


def run_floor(kind: Kind, pages: int, threads: int, placement: Placement) -> FaultRun:
    """The kernel floor: the same touches with no userfaultfd round trip."""
    with pinned(placement.toucher_cpu):
        return prepare_floor(kind, pages).touch(threads)


def run_c(
    binary: Path,
    kind: Kind,
    pages: int,
    threads: int,
    placement: Placement,
    batched: bool = False,
) -> FaultRun:
    """One run of the C baseline (its own process, its own toucher threads); ``batched`` runs
    its batching experiment instead of the plain poll + read + ioctl loop."""
    cmd = [str(binary), "fault", kind, str(pages), str(threads)]
    cmd += [str(placement.handler_cpu), str(placement.toucher_cpu)]
    if batched:
        cmd.append("batched")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise BenchError(2, f"C baseline failed ({' '.join(cmd)}): {done.stderr.strip()}")
    out = json.loads(done.stdout)
    return FaultRun(
        BATCHED if batched else "C",
        kind,
        threads,
        pages,
        int(out["page_size"]),
        out["elapsed_ns"] / 1e9,
        [int(x) for x in out["lat_ns"]],
        int(out["handler_cpu_ns"]),
        int(out["sigbus"]),
    )


# ---------------------------------------------------------------------------------------------
# A busy Python process, and the GIL trap


@contextlib.contextmanager
def busy_python_threads(count: int) -> Iterator[None]:
    """``count`` Python threads of this process running pure-Python loops meanwhile."""
    stop = threading.Event()

    def spin() -> None:
        total = 0
        while not stop.is_set():
            for i in range(2000):
                total += i * i

    workers = [threading.Thread(target=spin, name=f"busy-{i}", daemon=True) for i in range(count)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.05)
        yield
    finally:
        stop.set()
        for w in workers:
            w.join()


GIL_DEMO = r"""
import ctypes, sys, time
import pagewarden as pw
size = 16 * 4096
if sys.argv[1] == "Python":
    from pagewarden.baselines import pure_python_handler as pph
    region = pph.Region("anonymous", size)
    handler = pph.PythonHandler(region, "zero")
    handler.start()
    address = region.address
else:
    memory = pw.GuestMemory.anonymous(size)
    handler = pw.Handler(memory, pw.ZeroSource(), prefetch=False)
    handler.start()
    address = memory.address
t0 = time.perf_counter()
ctypes.string_at(address, 8)  # a Python thread loads guest memory, holding the GIL
print(f"{time.perf_counter() - t0:.6f}", flush=True)
handler.close()
"""


@dataclass
class GilDemo:
    """Whether a Python thread touching a missing page got its answer."""

    contender: str
    deadlocked: bool
    seconds: float
    detail: str


def gil_demo(contender: str, timeout_s: float) -> GilDemo:
    """Runs the GIL-trap demonstration for ``contender`` in a subprocess with a timeout."""
    cmd = [sys.executable, "-c", GIL_DEMO, contender]
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return GilDemo(
            contender,
            True,
            time.monotonic() - t0,
            f"deadlocked: no answer in {timeout_s:g} s (killed)",
        )
    if done.returncode != 0:
        return GilDemo(
            contender, False, time.monotonic() - t0, f"failed: {done.stderr.strip()[-300:]}"
        )
    seconds = float(done.stdout.strip())
    return GilDemo(contender, False, seconds, f"answered in {seconds * 1e6:.0f} µs")


# ---------------------------------------------------------------------------------------------
# Bulk: prefetch, pre-poisoning, PoisonSet


def run_c_json(binary: Path, *args: object) -> dict[str, Any]:
    """Runs the C program in a bulk mode and returns its JSON report."""
    cmd = [str(binary), *(str(a) for a in args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise BenchError(2, f"C baseline failed ({' '.join(cmd)}): {done.stderr.strip()}")
    return cast(dict[str, Any], json.loads(done.stdout))


def timed_prefetch(
    memory: pw.GuestMemory,
    source: Any,
    timeout: float,
    mode: Literal["missing", "minor"] = "missing",
) -> float:
    """Seconds a Handler with prefetch (no faults) in ``mode`` takes from start() until every
    page of ``memory`` is in from ``source``."""
    handler = pw.Handler(memory, source, prefetch=True, mode=mode)
    try:
        t0 = time.perf_counter()
        handler.start()
        if not handler.wait(timeout=timeout):
            raise BenchError(2, f"prefetch did not finish in {timeout:.0f} s")
        return time.perf_counter() - t0
    finally:
        handler.close()


def prefetch_gib_s(source: mmap.mmap) -> float:
    """pagewarden's background prefetch of a whole anonymous region from a MemorySource, no
    faults: GiB/s from start() to wait() returning."""
    size = len(source)
    rewrite_pattern(source)
    elapsed = timed_prefetch(pw.GuestMemory.anonymous(size), pw.MemorySource(source), 120)
    return size / elapsed / GIB


def on_demand_reader_gib_s(source: mmap.mmap, fault_around: int, cpu: int) -> tuple[float, int]:
    """A guest thread reading a whole anonymous region in order, on demand (no prefetch) from a
    MemorySource, with the handler's ``fault_around`` window: (GiB/s of the reader, faults)."""
    size = len(source)
    rewrite_pattern(source)
    memory = pw.GuestMemory.anonymous(size)
    handler = pw.Handler(memory, pw.MemorySource(source), prefetch=False, fault_around=fault_around)
    try:
        handler.start()
        t0 = time.perf_counter()
        _, _, sigbus = _native._bench_touch_pages(
            memory, list(range(size // PAGE_4K)), max_seconds=120.0, cpu=cpu
        )
        elapsed = time.perf_counter() - t0
        if sigbus:
            raise BenchError(2, f"{sigbus} reads of healthy pages raised SIGBUS")
        faults = int(handler.stats()["faults"])
    finally:
        handler.close()
    return size / elapsed / GIB, faults


PREPOISON_PATTERNS: dict[str, tuple[int, int]] = {
    # name: (stride in pages, run length in pages)
    "dense": (0, 0),  # one run of every page
    "clustered": (256, 64),  # 64-page runs every 1 MiB
    "sparse": (16, 1),  # one page in 16
}


def prepoison_layout(pattern_name: str, pages: int) -> tuple[int, int]:
    """(stride, run) in pages for a pre-poisoning pattern of ``pages`` poisoned pages."""
    stride, run = PREPOISON_PATTERNS[pattern_name]
    return (pages, pages) if run == 0 else (stride, run)


def prepoison_pagewarden(pattern_name: str, pages: int) -> tuple[float, float]:
    """Seconds to construct a Handler that installs ``pages`` poisoned pages laid out as
    ``pattern_name``, and seconds for the same Handler with no poison (registration alone)."""
    stride, run = prepoison_layout(pattern_name, pages)
    runs = pages // run
    span = runs * stride * PAGE_4K
    if run == 1:
        poison = pw.PoisonSet([r * stride * PAGE_4K for r in range(runs)])
    else:
        poison = pw.PoisonSet()
        for r in range(runs):
            poison.add_range(r * stride * PAGE_4K, run * PAGE_4K)
    times = []
    for with_poison in (True, False):
        mem = pw.GuestMemory.anonymous(span)
        t0 = time.perf_counter()
        handler = pw.Handler(
            mem, pw.ZeroSource(), poison=poison if with_poison else None, prefetch=False
        )
        times.append(time.perf_counter() - t0)
        handler.close()
        del handler, mem
    return times[0], times[1]


@dataclass
class PoisonSetFigures:
    """Memory and lookup speed of a PoisonSet of one shape."""

    shape: str
    pages: int
    span_pages: int
    memory_bytes: int
    bits_per_guest_page: float
    bytes_per_poisoned_page: float
    lookups_per_s: float
    ascending_lookups_per_s: float


def poisonset_of(shape: str, pages: int, seed: int = 7) -> tuple[pw.PoisonSet, int]:
    """A set of ``pages`` poisoned 4 KiB pages of one shape, and its span in pages: "dense"
    (one run), "random 1/2" (half the pages of the span, at random), "clustered" (64-page runs
    in random 256-page slots) or "sparse" (uniformly over a 1 TiB guest)."""
    rng = random.Random(seed)
    if shape == "dense":
        poison = pw.PoisonSet()
        poison.add_range(0, pages * PAGE_4K)
        return poison, pages
    if shape == "clustered":
        span = pages * 4
        poison = pw.PoisonSet()
        for slot in rng.sample(range(span // 64), pages // 64):
            poison.add_range(slot * 64 * PAGE_4K, 64 * PAGE_4K)
        return poison, span
    if shape == "random 1/2":
        span = pages * 2
    elif shape == "sparse":
        span = 1 << 28
    else:
        raise BenchError(22, f"unknown PoisonSet shape {shape!r}")
    return pw.PoisonSet([p * PAGE_4K for p in rng.sample(range(span), pages)]), span


def poisonset_figures(shape: str, pages: int, seed: int = 7) -> PoisonSetFigures:
    """Memory and native lookup rates (random and ascending order) of ``poisonset_of``."""
    poison, span = poisonset_of(shape, pages, seed)
    lookups, _hits, seconds = _native._bench_poison_lookups(
        poison, span * PAGE_4K, 1 << 20, 8, seed
    )
    ascending, _hits, ascending_s = _native._bench_poison_lookups(
        poison, span * PAGE_4K, 1 << 20, 8, seed, ascending=True
    )
    mem_bytes = poison.memory_bytes()
    return PoisonSetFigures(
        shape,
        pages,
        span,
        mem_bytes,
        mem_bytes * 8 / span,
        mem_bytes / pages,
        lookups / seconds,
        ascending / ascending_s,
    )


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class Report:
    """Everything one run measured (what ``--json`` writes). ``faults`` and ``busy`` are keyed by
    placement, then scenario (or "<handler> idle|busy"), then contender."""

    machine: dict[str, Any]
    config: dict[str, Any]
    placements: list[Placement] = field(default_factory=list)
    faults: dict[str, dict[str, dict[str, Summary]]] = field(default_factory=dict)
    busy: dict[str, dict[str, Summary]] = field(default_factory=dict)
    gil: list[GilDemo] = field(default_factory=list)
    bulk: dict[str, Any] = field(default_factory=dict)
    poisonset: list[PoisonSetFigures] = field(default_factory=list)
    remote: dict[str, Any] = field(default_factory=dict)
    policy: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def _machine() -> dict[str, Any]:
    caps = pw.capabilities()
    return {
        "kernel": caps["kernel_release"],
        "cpus": os.cpu_count(),
        "cpu_model": next(
            (
                line.split(":", 1)[1].strip()
                for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")
            ),
            "?",
        ),
        "python": platform.python_version(),
        "pagewarden": pw.__version__,
        "hugepages_2m_free": caps["hugepages_2m_free"],
        "clocksource": _read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        "loadavg_before": _read("/proc/loadavg"),
    }


def _check_environment() -> None:
    caps = pw.capabilities()
    if not caps["userfaultfd"]:
        methods = "; ".join(f"{k}: {v}" for k, v in caps["open_methods"].items())
        raise pw.UnsupportedError(
            95,
            f"pagewarden bench needs a userfaultfd ({methods}); run as root or give this user "
            "read-write access to /dev/userfaultfd (see `pagewarden info`)",
        )
    if not caps["poison"]:
        raise pw.UnsupportedError(95, "pagewarden bench needs UFFDIO_POISON (Linux 6.6+)")


def _run_one(
    contender: Contender,
    binary: Path,
    pph: ModuleType,
    kind: Kind,
    pages: int,
    threads: int,
    source: mmap.mmap | None,
    placement: Placement,
) -> FaultRun:
    if contender == "pagewarden":
        return run_pagewarden(kind, pages, threads, source, placement)
    if contender == "C":
        return run_c(binary, kind, pages, threads, placement)
    if contender == BATCHED:
        return run_c(binary, kind, pages, threads, placement, batched=True)
    if contender == "Python":
        return run_python(pph, kind, pages, threads, source, placement)
    return run_floor(kind, pages, threads, placement)


def run_faults(
    config: Config,
    binary: Path,
    pph: ModuleType,
    report: Report,
    scenarios: Sequence[Scenario],
) -> None:
    """Runs every scenario's contenders in every placement, interleaved (the contender order
    rotates), ``config.repetitions`` times; stores the medians in ``report.faults``."""
    runs: dict[tuple[str, str, str], list[FaultRun]] = {}
    sources: dict[int, mmap.mmap] = {}

    def source_for(kind: Kind, pages: int) -> mmap.mmap | None:
        if kind not in ("copy", "continue", "hugetlb"):
            return None
        size = pages * page_size_of(kind)
        if size not in sources:
            sources[size] = pattern(size)
        return sources[size]

    turn = 0
    for rep in range(config.repetitions):
        _log(f"fault scenarios: repetition {rep + 1}/{config.repetitions}")
        for placement in report.placements:
            for scenario in scenarios:
                kind, threads = scenario.kind, scenario.threads
                pages = config.huge_pages if kind == "hugetlb" else config.pages
                source = source_for(kind, pages)
                turn += 1
                contenders = contenders_for(threads)
                k = turn % len(contenders)
                for contender in contenders[k:] + contenders[:k]:
                    run = _run_one(contender, binary, pph, kind, pages, threads, source, placement)
                    expect_sigbus = pages if kind == "poison" else 0
                    if run.sigbus != expect_sigbus:
                        raise BenchError(
                            2,
                            f"{contender} {scenario.name}: {run.sigbus} touches raised SIGBUS, "
                            f"expected {expect_sigbus}",
                        )
                    key = (placement.key, scenario.name, contender)
                    runs.setdefault(key, []).append(run)
    for placement in report.placements:
        report.faults[placement.key] = {
            scenario.name: {
                c: summarize(runs[(placement.key, scenario.name, c)], scenario.name)
                for c in contenders_for(scenario.threads)
            }
            for scenario in scenarios
        }


BUSY_NAMES = ("pagewarden idle", "pagewarden busy", "Python idle", "Python busy")
REALTIME = "pagewarden busy, loop SCHED_FIFO"


def run_busy(config: Config, pph: ModuleType, report: Report) -> None:
    """Fault latency (UFFDIO_COPY, one faulting thread) with the process idle and with
    ``config.busy_threads`` Python threads running pure-Python loops, for pagewarden and the
    pure-Python handler, in every placement. The busy threads are not pinned. Where allowed, also
    pagewarden busy with its event-loop thread at SCHED_FIFO priority 1: what is left of the
    busy tail once the loop thread no longer waits for a CPU behind the busy threads."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        realtime = True
    except PermissionError:
        realtime = False
        report.skipped.append(f"{REALTIME}: needs CAP_SYS_NICE")
    source = pattern(config.pages * PAGE_4K)
    small = pattern(config.busy_python_pages * PAGE_4K)
    runs: dict[tuple[str, str], list[FaultRun]] = {}
    for rep in range(config.repetitions):
        _log(f"busy Python process: repetition {rep + 1}/{config.repetitions}")
        for placement in report.placements:
            for busy in (False, True):
                with busy_python_threads(config.busy_threads if busy else 0):
                    state = "busy" if busy else "idle"
                    runs.setdefault((placement.key, f"pagewarden {state}"), []).append(
                        run_pagewarden("copy", config.pages, 1, source, placement)
                    )
                    runs.setdefault((placement.key, f"Python {state}"), []).append(
                        run_python(pph, "copy", config.busy_python_pages, 1, small, placement)
                    )
                    if busy and realtime:
                        runs.setdefault((placement.key, REALTIME), []).append(
                            run_pagewarden("copy", config.pages, 1, source, placement, True)
                        )
    for placement in report.placements:
        report.busy[placement.key] = {
            name: summarize(runs[(placement.key, name)], name)
            for name in (*BUSY_NAMES, REALTIME)
            if (placement.key, name) in runs
        }


def run_bulk(config: Config, binary: Path, report: Report) -> None:
    """Prefetch bandwidth against the UFFDIO_COPY bound and memcpy; pre-poisoning against ranged
    UFFDIO_POISON; PoisonSet memory and lookups."""
    size = config.prefetch_bytes
    source = pattern(size)
    pw_rates, bound, fresh, warm = [], [], [], []
    for rep in range(config.repetitions):
        _log(f"prefetch bandwidth: repetition {rep + 1}/{config.repetitions}")
        pw_rates.append(prefetch_gib_s(source))
        out = run_c_json(binary, "copybw", size, 4 * MIB)
        bound.append(size / (out["elapsed_ns"] / 1e9) / GIB)
        out = run_c_json(binary, "memcpy", size)
        fresh.append(size / (out["fresh_ns"] / 1e9) / GIB)
        warm.append(size / (out["prefaulted_ns"] / 1e9) / GIB)
    # Fault-around: the same copy done by a sequential reader's faults, window by window, against
    # one fault per page and against the background prefetch above.
    cpu = sorted(os.sched_getaffinity(0))[0]
    around: dict[str, list[tuple[float, int]]] = {"per page": [], "fault-around": []}
    for rep in range(config.repetitions):
        _log(f"on-demand sequential reader: repetition {rep + 1}/{config.repetitions}")
        for name in list(around)[rep % 2 :] + list(around)[: rep % 2]:
            window = 0 if name == "per page" else pw.DEFAULT_FAULT_AROUND
            around[name].append(on_demand_reader_gib_s(source, window, cpu))
    report.bulk["fault_around"] = {
        name: {
            "gib_s": statistics.median(r[0] for r in runs),
            "faults": statistics.median(r[1] for r in runs),
            "runs": [r[0] for r in runs],
        }
        for name, runs in around.items()
    }
    report.bulk["fault_around_window"] = pw.DEFAULT_FAULT_AROUND
    del source
    report.bulk["prefetch"] = {
        "bytes": size,
        "pagewarden_gib_s": statistics.median(pw_rates),
        "uffdio_copy_bound_gib_s": statistics.median(bound),
        "memcpy_fresh_gib_s": statistics.median(fresh),
        "memcpy_prefaulted_gib_s": statistics.median(warm),
        "pagewarden_runs": pw_rates,
        "bound_runs": bound,
    }
    prepoison: dict[str, Any] = {}
    reps = max(1, min(config.repetitions, 3))
    for name in PREPOISON_PATTERNS:
        pages = config.prepoison_pages
        stride, run = prepoison_layout(name, pages)
        _log(f"pre-poisoning {pages} pages ({name})")
        ours, empty, kernel = [], [], []
        for _ in range(reps):
            with_poison, without = prepoison_pagewarden(name, pages)
            ours.append(with_poison)
            empty.append(without)
            out = run_c_json(binary, "prepoison", pages, stride, run)
            kernel.append(out["elapsed_ns"] / 1e9)
        t, t0, tk = statistics.median(ours), statistics.median(empty), statistics.median(kernel)
        prepoison[name] = {
            "pages": pages,
            "span_pages": pages // run * stride,
            "ioctls": pages // run,
            "handler_s": t,
            "handler_no_poison_s": t0,
            "c_ranged_poison_s": tk,
            "pagewarden_pages_per_s": pages / t,
            "pagewarden_net_pages_per_s": pages / max(t - t0, 1e-9),
            "c_pages_per_s": pages / tk,
        }
    report.bulk["prepoison"] = prepoison
    _log("PoisonSet memory and lookups")
    for shape in ("dense", "random 1/2", "clustered", "sparse"):
        report.poisonset.append(poisonset_figures(shape, config.poisonset_pages))


# ---------------------------------------------------------------------------------------------
# Remote post-copy: a page server in another process, over loopback TCP

REMOTE_LATENCY_NAMES = (
    "idle",
    "under push, urgent channel",
    "under push, no urgent channel",
    "under push, plaintext",
    "under push, TLS",
)
# How each remote contender's stream is protected: RemoteSource keyword arguments by name, the
# token (Noise, the default) unless named otherwise.
REMOTE_PROTECTIONS = ("noise", "plaintext", "TLS")


def _protection_of(name: str) -> str:
    return "plaintext" if "plaintext" in name else "TLS" if "TLS" in name else "noise"


def remote_placement() -> tuple[int | None, int]:
    """(server CPU, destination CPU): the page server's process on the second CPU and every
    destination thread (handler loop, receivers, faulting thread) on the first, like two hosts
    of one CPU each; with a single CPU both share it."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[1] if len(cpus) > 1 else cpus[0]), cpus[0]


def remote_image(path: Path, size: int, zero_half: bool, seed: int = 11) -> None:
    """Writes a ``size``-byte guest image of incompressible (random) bytes to ``path``; with
    ``zero_half`` half of its 4 KiB pages, chosen at random, are zero (a server answers those
    with ZERO frames, no payload)."""
    rng = random.Random(seed)
    pages = size // PAGE_4K
    zero = set(rng.sample(range(pages), pages // 2)) if zero_half else set()
    with open(path, "wb") as f:
        for start in range(0, pages, 256):
            block = bytearray(rng.randbytes(256 * PAGE_4K))
            for k in range(start, min(start + 256, pages)):
                if k in zero:
                    off = (k - start) * PAGE_4K
                    block[off : off + PAGE_4K] = bytes(PAGE_4K)
            f.write(block[: (min(start + 256, pages) - start) * PAGE_4K])


def remote_push_mib_s(
    address: str, connect: dict[str, Any], size: int, minor: bool = False
) -> tuple[float, dict[str, Any]]:
    """A Handler with a RemoteSource (``connect``: its keyword arguments) and prefetch bringing
    a whole ``size``-byte guest in, no faults: MiB/s from start() to wait() returning, and the
    source's counters. The guest is anonymous memory, or with ``minor`` a memfd in MINOR mode."""
    with pw.RemoteSource(address, **connect) as source:
        if minor:
            elapsed = timed_prefetch(pw.GuestMemory.memfd(size), source, 300, mode="minor")
        else:
            elapsed = timed_prefetch(pw.GuestMemory.anonymous(size), source, 300)
        stats = dict(source.stats())
    return size / elapsed / MIB, stats


@dataclass
class TouchSample:
    """Per-touch latencies of one remote latency run and what the handler counted."""

    latencies_ns: list[int]
    faults: int
    push_s: float | None
    handler_histogram: list[int]


def remote_touch_run(
    address: str,
    connect: dict[str, Any],
    size: int,
    touches: int,
    push: bool,
    urgent_channel: bool,
    cpu: int,
    seed: int,
) -> TouchSample:
    """One faulting thread touching ``touches`` random pages one at a time, each load timed
    natively (``_bench_touch_pages``: what a guest thread sees, network round trip included).

    Idle (``push`` false): prefetch off. Under push: prefetch on, bringing the whole guest in
    meanwhile, with the touched pages left for the end of its order (``prefetch_order=`` every
    other page first), so that each touch made during the push is a real fault; only touches
    that started before the push finished count."""
    pages = size // PAGE_4K
    rng = random.Random(seed)
    order = rng.sample(range(pages), min(touches, pages))
    rest: list[tuple[int, int]] = []
    previous = 0
    for k in sorted(order):
        if k > previous:
            rest.append((previous * PAGE_4K, (k - previous) * PAGE_4K))
        previous = k + 1
    if previous < pages:
        rest.append((previous * PAGE_4K, (pages - previous) * PAGE_4K))
    with pw.RemoteSource(address, urgent_channel=urgent_channel, **connect) as source:
        memory = pw.GuestMemory.anonymous(size)
        handler = pw.Handler(memory, source, prefetch=push, prefetch_order=rest if push else None)
        try:
            finished: list[int] = []

            def waiter() -> None:
                with contextlib.suppress(pw.PagewardenError):
                    if handler.wait(timeout=300):
                        finished.append(time.monotonic_ns())

            started = time.monotonic_ns()
            handler.start()
            watcher = threading.Thread(target=waiter, name="bench-remote-wait")
            if push:
                watcher.start()
            starts, latencies, sigbus = _native._bench_touch_pages(
                memory, order, max_seconds=300.0, cpu=cpu
            )
            if push:
                watcher.join()
                if not finished:
                    handler.check()
                    raise BenchError(2, "the remote push did not finish in 300 s")
            handler.check()
            stats = handler.stats()
        finally:
            handler.close()
    if sigbus:
        raise BenchError(2, f"{sigbus} touches of healthy remote pages raised SIGBUS")
    if push:
        # Until the push has brought in everything else, every touched page is still missing and
        # each touch faults; then the push sweeps the touched pages up and none faults. So the
        # touches made under push are the first `faults` (and none after the push ended).
        end = finished[0]
        latencies = [
            ns for t, ns in zip(starts[: stats["faults"]], latencies, strict=False) if t < end
        ]
    return TouchSample(
        latencies,
        int(stats["faults"]),
        (finished[0] - started) / 1e9 if push else None,
        list(stats["latency_dist_us_log2"]),
    )


@contextlib.contextmanager
def busy_cpu() -> Iterator[None]:
    """Another process keeping a CPU busy (a Python loop, unpinned), as on a production host."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.05)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def remote_sequential_run(
    address: str, connect: dict[str, Any], size: int, reader: bool, cpu: int
) -> dict[str, float]:
    """The whole guest pushed with prefetch (default settings), alone or with a guest thread
    reading every page in order from the start meanwhile (each page's first 8 bytes, timed
    natively): seconds from start() until every page is in and the reader is done, and the
    faults the handler resolved."""
    with pw.RemoteSource(address, **connect) as source:
        memory = pw.GuestMemory.anonymous(size)
        handler = pw.Handler(memory, source, prefetch=True)
        try:
            started = time.perf_counter()
            handler.start()
            slow = 0
            if reader:
                pages = list(range(size // PAGE_4K))
                _, latencies, sigbus = _native._bench_touch_pages(
                    memory, pages, max_seconds=300.0, cpu=cpu
                )
                if sigbus:
                    raise BenchError(2, f"{sigbus} reads of healthy remote pages raised SIGBUS")
                slow = sum(1 for ns in latencies if ns > 20_000)
            if not handler.wait(timeout=300):
                handler.check()
                raise BenchError(2, "the remote push did not finish in 300 s")
            elapsed = time.perf_counter() - started
            handler.check()
            stats = handler.stats()
        finally:
            handler.close()
    return {
        "seconds": elapsed,
        "faults": float(stats["faults"]),
        "slow_pages": float(slow),
        "jumps": float(stats["prefetch_jumps"]),
    }


def run_remote(config: Config, report: Report) -> None:
    """Remote post-copy on loopback against a page server in another process: the raw TCP
    stream bound against background push throughput (random image, and half-zero), and fault
    latency idle, under a full push with the urgent channel, and under a push with fault
    requests queued behind the bulk stream. The contenders of a measurement are interleaved
    within each repetition; figures are medians over the repetitions."""
    size = config.remote_bytes
    server_cpu, dest_cpu = remote_placement()
    throughput: dict[str, list[float]] = {
        "raw TCP": [],
        # The kernel's share of a push on the destination's one CPU, with no protocol: the raw
        # stream's receiver also places every MiB (UFFDIO_COPY; page-cache write + CONTINUE).
        "raw TCP + UFFDIO_COPY": [],
        "raw TCP + shmem write + CONTINUE": [],
        "push random": [],
        "push random, MINOR shmem": [],
        "push half-zero": [],
        "push random, plaintext": [],
        "push random, TLS": [],
    }
    received: dict[str, int] = {}
    samples: dict[str, list[TouchSample]] = {name: [] for name in REMOTE_LATENCY_NAMES}
    with tempfile.TemporaryDirectory(prefix="pagewarden-bench-remote-") as tmp:
        from pagewarden._server_process import ServerProcess, write_token

        work = Path(tmp)
        token = write_token(work / "token")
        pw.make_test_certificates(work / "x509", days=1)
        connect: dict[str, dict[str, Any]] = {
            "noise": {"token": token},
            "plaintext": {"insecure_no_token": True},
            "TLS": {"tls_dir": work / "x509"},
        }
        _log(f"remote: writing two {size >> 20} MiB images")
        remote_image(work / "random.img", size, zero_half=False)
        remote_image(work / "half-zero.img", size, zero_half=True)
        with (
            ServerProcess(work / "random.img", work / "token", cpu=server_cpu) as random_server,
            ServerProcess(work / "half-zero.img", work / "token", cpu=server_cpu) as half_server,
            ServerProcess(work / "random.img", None, cpu=server_cpu) as plain_server,
            ServerProcess(
                work / "random.img", None, cpu=server_cpu, tls_dir=work / "x509"
            ) as tls_server,
            pinned(dest_cpu),
        ):
            servers = {"noise": random_server, "plaintext": plain_server, "TLS": tls_server}
            # One untimed push from each server first: the servers' first reads of their images
            # and the first connections are not what is measured.
            _log("remote post-copy: warm-up")
            for protection, server in (*servers.items(), ("noise", half_server)):
                remote_push_mib_s(server.address, connect[protection], size)
            for rep in range(config.repetitions):
                _log(f"remote post-copy: repetition {rep + 1}/{config.repetitions}")
                for name, place in (
                    ("raw TCP", "none"),
                    ("raw TCP + UFFDIO_COPY", "copy"),
                    ("raw TCP + shmem write + CONTINUE", "minor"),
                ):
                    seconds = _native._bench_tcp_stream(
                        size, MIB, server_cpu, dest_cpu, place=place
                    )
                    throughput[name].append(size / seconds / MIB)
                for name, server in (
                    ("push random", random_server),
                    ("push random, MINOR shmem", random_server),
                    ("push half-zero", half_server),
                    ("push random, plaintext", plain_server),
                    ("push random, TLS", tls_server),
                ):
                    protection = _protection_of(name)
                    rate, stats = remote_push_mib_s(
                        server.address, connect[protection], size, minor="MINOR" in name
                    )
                    throughput[name].append(rate)
                    received[name] = int(stats["bytes_received"])
                names = list(REMOTE_LATENCY_NAMES)
                k = rep % len(names)
                for name in names[k:] + names[:k]:
                    samples[name].append(
                        remote_touch_run(
                            servers[_protection_of(name)].address,
                            connect[_protection_of(name)],
                            size,
                            config.remote_touches,
                            push=name != "idle",
                            urgent_channel="no urgent" not in name,
                            cpu=dest_cpu,
                            seed=rep,
                        )
                    )
            sequential: dict[str, dict[str, list[dict[str, float]]]] = {}
            for host in ("idle", "one CPU busy"):
                seq_runs: dict[str, list[dict[str, float]]] = {
                    "push only": [],
                    "sequential reader": [],
                }
                _log(f"remote post-copy: a sequential reader during the push, {host}")
                with busy_cpu() if host != "idle" else contextlib.nullcontext():
                    for rep in range(config.repetitions):
                        for name in list(seq_runs)[rep % 2 :] + list(seq_runs)[: rep % 2]:
                            seq_runs[name].append(
                                remote_sequential_run(
                                    random_server.address,
                                    connect["noise"],
                                    size,
                                    reader=name != "push only",
                                    cpu=dest_cpu,
                                )
                            )
                sequential[host] = seq_runs
            report.remote["sequential_runs"] = sequential
            report.remote["server_summary"] = random_server.stop()
    latency: dict[str, Any] = {}
    for name, runs in samples.items():
        # Pooled over the repetitions: under push without the urgent channel a run holds only a
        # few dozen faults, too few for a p99 of its own.
        pooled = sorted(ns for sample in runs for ns in sample.latencies_ns)
        latency[name] = {
            "p50_us": percentile(pooled, 0.50) / 1000,
            "p99_us": percentile(pooled, 0.99) / 1000,
            "samples": len(pooled),
            # Each repetition's own p99 (meaningful where a run holds hundreds of faults).
            "p99_runs_us": [percentile(sorted(s.latencies_ns), 0.99) / 1000 for s in runs],
            "touches": [len(s.latencies_ns) for s in runs],
            "faults": [s.faults for s in runs],
            "push_s": [s.push_s for s in runs],
            "histogram_log2_us": log2_histogram(pooled),
            "handler_histogram_log2_us": [
                sum(s.handler_histogram[i] for s in runs) for i in range(24)
            ],
        }
    report.remote.update(
        {
            "bytes": size,
            "server_cpu": server_cpu,
            "destination_cpu": dest_cpu,
            "throughput_mib_s": {k: statistics.median(v) for k, v in throughput.items()},
            "throughput_runs": throughput,
            "bytes_received": received,
            "latency": latency,
            "sequential": {
                host: {
                    "push_s": statistics.median(r["seconds"] for r in runs["push only"]),
                    "reader_total_s": statistics.median(
                        r["seconds"] for r in runs["sequential reader"]
                    ),
                    "faults": statistics.median(r["faults"] for r in runs["sequential reader"]),
                    "slow_pages": statistics.median(
                        r["slow_pages"] for r in runs["sequential reader"]
                    ),
                    "pages": size // PAGE_4K,
                }
                for host, runs in report.remote.pop("sequential_runs").items()
            },
        }
    )


# ---------------------------------------------------------------------------------------------
# Targets and output


def _target(report: Report, name: str, value: float, goal: str, met: bool, note: str = "") -> None:
    report.targets.append({"target": name, "value": value, "goal": goal, "met": met, "note": note})


def evaluate_targets(report: Report) -> None:
    """The issue's goals, as ratios measured in this run (reported, never asserted)."""
    for placement, scenarios in report.faults.items():
        for name in ("copy-1t", "copy-2t", "zero-1t", "zero-2t"):
            s = scenarios.get(name)
            if s:
                ratio = s["pagewarden"].rate / s["C"].rate
                _target(
                    report, f"[{placement}] faults/s {name} vs C", ratio, ">= 1.0", ratio >= 1.0
                )
        for name, s in scenarios.items():
            ours, c, py = (s[k].cpu_us_per_fault for k in ("pagewarden", "C", "Python"))
            if ours is None or c is None or py is None:
                continue
            _target(report, f"[{placement}] CPU/fault {name} vs C", ours / c, "<= 1.0", ours <= c)
            _target(
                report,
                f"[{placement}] CPU/fault {name} vs Python",
                ours / py,
                "well below: <= 0.5",
                ours <= 0.5 * py,
                f"above C: pagewarden {(ours - c) * 1000:+.0f} ns, "
                f"Python {(py - c) * 1000:+.0f} ns",
            )
    for placement, busy in report.busy.items():
        idle, loaded = busy["pagewarden idle"], busy["pagewarden busy"]
        r = loaded.p99_us / idle.p99_us
        note = ""
        if REALTIME in busy:
            rt = busy[REALTIME].p99_us / idle.p99_us
            note = f"{rt:.2f} with the loop thread at SCHED_FIFO"
        _target(report, f"[{placement}] p99 busy / idle, pagewarden", r, "<= 1.5", r <= 1.5, note)
        r = busy["Python busy"].p99_us / loaded.p99_us
        _target(report, f"[{placement}] p99 busy, Python / pagewarden", r, ">= 10", r >= 10)
    for demo in report.gil:
        want_deadlock = demo.contender == "Python"
        _target(
            report,
            f"GIL trap, {demo.contender} handler",
            demo.seconds,
            "deadlocks" if want_deadlock else "answered",
            demo.deadlocked == want_deadlock,
            demo.detail,
        )
    pre = report.bulk.get("prefetch")
    if pre:
        r = pre["pagewarden_gib_s"] / pre["uffdio_copy_bound_gib_s"]
        _target(report, "prefetch / UFFDIO_COPY bound", r, ">= 0.8", r >= 0.8)
    around = report.bulk.get("fault_around")
    if around and pre:
        fa = around["fault-around"]
        r = fa["gib_s"] / pre["pagewarden_gib_s"]
        _target(
            report,
            "on-demand sequential reader with fault-around / prefetch",
            r,
            ">= 0.67",
            r >= 0.67,
            f"{fa['gib_s']:.2f} vs {pre['pagewarden_gib_s']:.2f} GiB/s; one fault per page: "
            f"{around['per page']['gib_s']:.2f} GiB/s",
        )
    for name, p in report.bulk.get("prepoison", {}).items():
        rate = p["pagewarden_pages_per_s"]
        _target(
            report,
            f"pre-poisoning, {name} (pages/s)",
            rate,
            ">= 10M",
            rate >= 10e6,
            f"kernel bound for this layout {p['c_pages_per_s'] / 1e6:.1f}M",
        )
    remote = report.remote
    if remote.get("throughput_mib_s"):
        tp = remote["throughput_mib_s"]
        for name, least, bound in (
            ("push random", 0.7, "raw TCP + UFFDIO_COPY"),
            ("push half-zero", 0.7, "raw TCP + UFFDIO_COPY"),
            ("push random, MINOR shmem", 0.85, "raw TCP + shmem write + CONTINUE"),
        ):
            if name not in tp:  # a report from before the MINOR row
                continue
            r = tp[name] / tp["raw TCP"]
            note = f"{tp[name]:.0f} / {tp['raw TCP']:.0f} MiB/s"
            if bound in tp:
                note += (
                    f"; the kernel's share alone (raw TCP receiver placing the bytes) "
                    f"{tp[bound]:.0f} MiB/s = {tp[bound] / tp['raw TCP']:.2f}x"
                )
            _target(
                report,
                f"remote {name} / raw TCP stream",
                r,
                f">= {least}",
                r >= least,
                note,
            )
        for name in ("push random", "push random, TLS"):
            if name not in tp:  # a report from before the encrypted stream
                continue
            r = tp[name] / tp["raw TCP"]
            _target(
                report,
                f"remote {name} (encrypted) / raw plaintext TCP",
                r,
                ">= 0.6",
                r >= 0.6,
                f"{tp[name]:.0f} / {tp['raw TCP']:.0f} MiB/s",
            )
        lat = remote["latency"]
        idle = lat["idle"]["p99_us"]
        urgent, queued = (lat[n]["p99_us"] for n in REMOTE_LATENCY_NAMES[1:3])
        plain = lat.get("under push, plaintext", {}).get("p99_us", 0.0)
        for name in ("under push, urgent channel", "under push, TLS"):
            if not plain or name not in lat:
                continue
            r = lat[name]["p99_us"] / plain
            _target(
                report,
                f"remote fault p99 {name} (encrypted) / plaintext",
                r,
                "<= 1.2",
                r <= 1.2,
                f"{lat[name]['p99_us']:.0f} / {plain:.0f} µs",
            )
        r = urgent / idle if idle else 0.0
        _target(
            report,
            "remote fault p99 under push / idle",
            r,
            "<= 3",
            r <= 3.0,
            f"{urgent:.0f} / {idle:.0f} µs",
        )
        # Reliably: every repetition's p99 under push against the same repetition's idle p99.
        pushed = lat["under push, urgent channel"].get("p99_runs_us", [])
        calm = lat["idle"].get("p99_runs_us", [])
        ratios = [p / i for p, i in zip(pushed, calm, strict=False) if i > 0]
        if ratios:
            within = sum(1 for x in ratios if x <= 3.0)
            _target(
                report,
                "remote fault p99 under push / idle, worst repetition",
                max(ratios),
                "<= 3 in every run",
                within == len(ratios),
                f"{within} of {len(ratios)} runs within 3x",
            )
        for host, x in remote.get("sequential", {}).items():
            r = x["reader_total_s"] / x["push_s"]
            _target(
                report,
                f"remote sequential reader during the push, {host}: total / push only",
                r,
                "<= 1.1",
                r <= 1.1,
                f"{x['reader_total_s']:.2f} / {x['push_s']:.2f} s",
            )
            pct = 100 * x["faults"] / x["pages"]
            _target(
                report,
                f"remote sequential reader during the push, {host}: faults, % of pages",
                pct,
                "<= 1",
                pct <= 1.0,
                f"{x['faults']:.0f} of {x['pages']} pages",
            )
        r = queued / urgent if urgent else 0.0
        _target(
            report,
            "remote fault p99 under push: no urgent channel / urgent",
            r,
            "> 1 (the urgent channel helps)",
            r > 1.0,
            f"{queued:.0f} / {urgent:.0f} µs",
        )
    if report.policy:
        from pagewarden.bench_policy import targets as policy_targets

        for name, value, goal, met, note in policy_targets(report.policy):
            _target(report, name, value, goal, met, note)
    for f in report.poisonset:
        if f.shape == "sparse":
            _target(
                report,
                "PoisonSet lookups/s (sparse, random order)",
                f.lookups_per_s,
                ">= 50M",
                f.lookups_per_s >= 50e6,
                f"ascending order: {f.ascending_lookups_per_s / 1e6:.0f}M/s",
            )
            _target(
                report,
                "PoisonSet bits per guest page (sparse)",
                f.bits_per_guest_page,
                "far below 1: <= 0.1",
                f.bits_per_guest_page <= 0.1,
            )
        elif f.shape in ("dense", "random 1/2"):
            _target(
                report,
                f"PoisonSet bits per guest page ({f.shape})",
                f.bits_per_guest_page,
                "<= 1",
                f.bits_per_guest_page <= 1.0 + 1e-2,
                "within 1% (container headers)" if f.bits_per_guest_page > 1.0 else "",
            )


def _rate(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def _us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Aligned text columns with a separator under the header (a markdown table)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _fault_table(scenarios: dict[str, dict[str, Summary]]) -> str:
    rows = []
    for name, s in scenarios.items():
        ours = s["pagewarden"]
        kind, threads = name.rsplit("-", 1)
        title = f"{KIND_TITLES[cast(Kind, kind)]}, {threads[:-1]} thr"
        for contender in s:
            x = s[contender]
            mine = contender == "pagewarden"
            rows.append(
                [
                    title if mine else "",
                    contender,
                    _rate(x.rate),
                    _us(x.p50_us),
                    _us(x.p99_us),
                    _us(x.cpu_us_per_fault),
                    _ratio(ours.rate, s["C"].rate)
                    if mine
                    else (f"({_ratio(x.rate, s['C'].rate)})" if contender == BATCHED else ""),
                    _ratio(ours.rate, s["Python"].rate) if mine else "",
                    _ratio(ours.rate, s["floor"].rate) if mine else "",
                    _ratio(ours.cpu_us_per_fault, s["C"].cpu_us_per_fault) if mine else "",
                    _ratio(ours.cpu_us_per_fault, s["Python"].cpu_us_per_fault) if mine else "",
                ]
            )
    header = [
        "scenario",
        "handler",
        "faults/s",
        "p50 µs",
        "p99 µs",
        "CPU µs/fault",
        "rate vs C",
        "vs Python",
        "vs floor",
        "CPU vs C",
        "CPU vs Python",
    ]
    return format_table(rows, header)


def render(report: Report) -> str:
    """The human-readable report (markdown tables)."""
    out: list[str] = []
    m, c = report.machine, report.config
    out.append(
        f"pagewarden {m['pagewarden']}, Linux {m['kernel']}, {m['cpus']} CPUs ({m['cpu_model']}), "
        f"Python {m['python']}. Medians of {c['repetitions']} interleaved repetitions; "
        f"{c['pages']} pages per 4 KiB run, {c['huge_pages']} per 2 MiB run. Load average "
        f"before: {m['loadavg_before'].split(' ')[0]}, after: "
        f"{m.get('loadavg_after', '?').split(' ')[0]}."
    )
    if report.faults:
        out.append("")
        out.append(
            "faults/s: pages touched per second; p50/p99: one touch (fault round trip), µs; "
            "CPU: the handler thread's CPU time per fault. 'rate vs X' is pagewarden's faults/s "
            "over X's (higher is better); 'CPU vs X' its CPU per fault over X's (lower is "
            "better). 'C batched' (2 faulting threads only) is an experiment, not a baseline: "
            "the C loop reading up to 64 messages per wake and resolving contiguous pages with "
            "one ranged ioctl; its own rate over the plain C loop's."
        )
    for placement in report.placements:
        scenarios = report.faults.get(placement.key)
        if not scenarios:
            continue
        out.append("")
        out.append(f"Fault path, {placement.key} ({placement.title}):")
        out.append("")
        out.append(_fault_table(scenarios))
    for placement in report.placements:
        busy = report.busy.get(placement.key)
        if not busy:
            continue
        out.append("")
        out.append(
            f"Tail latency inside a busy Python process, {placement.key}: UFFDIO_COPY, 1 faulting "
            f"thread; busy = {c['busy_threads']} unpinned Python threads running pure-Python "
            f"loops; the pure-Python handler serves {c['busy_python_pages']} pages per run:"
        )
        out.append("")
        rows = []
        for who in ("pagewarden", "Python"):
            idle, loaded = busy[f"{who} idle"], busy[f"{who} busy"]
            rows.append(
                [
                    who,
                    _us(idle.p50_us),
                    _us(idle.p99_us),
                    _us(loaded.p50_us),
                    _us(loaded.p99_us),
                    _ratio(loaded.p99_us, idle.p99_us),
                    _rate(loaded.rate),
                ]
            )
        if REALTIME in busy:
            rt = busy[REALTIME]
            rows.append(
                [
                    "pagewarden, loop thread SCHED_FIFO",
                    "",
                    "",
                    _us(rt.p50_us),
                    _us(rt.p99_us),
                    _ratio(rt.p99_us, busy["pagewarden idle"].p99_us),
                    _rate(rt.rate),
                ]
            )
        rows.append(
            [
                "Python / pagewarden",
                "",
                _ratio(busy["Python idle"].p99_us, busy["pagewarden idle"].p99_us),
                "",
                _ratio(busy["Python busy"].p99_us, busy["pagewarden busy"].p99_us),
                "",
                "",
            ]
        )
        header = ["handler", "idle p50", "idle p99", "busy p50", "busy p99", "busy/idle p99"]
        out.append(format_table(rows, [*header, "busy faults/s"]))
    if report.gil:
        out.append("")
        out.append(
            "The GIL trap: a Python thread loads a missing guest page (ctypes.string_at, GIL "
            "held); run in a subprocess with a timeout:"
        )
        out.append("")
        out.append(
            format_table([[d.contender, d.detail] for d in report.gil], ["handler", "outcome"])
        )
    pre = report.bulk.get("prefetch")
    if pre:
        out.append("")
        out.append(f"Bulk copy of {pre['bytes'] >> 20} MiB into fresh anonymous memory, GiB/s:")
        out.append("")
        bound = pre["uffdio_copy_bound_gib_s"]
        rows = [
            [
                "pagewarden prefetch (MemorySource, no faults)",
                f"{pre['pagewarden_gib_s']:.2f}",
                _ratio(pre["pagewarden_gib_s"], bound),
            ],
            ["C: UFFDIO_COPY in 4 MiB ranges (the bound)", f"{bound:.2f}", "1.00x"],
            [
                "C: memcpy into fresh memory (first-touch faults)",
                f"{pre['memcpy_fresh_gib_s']:.2f}",
                _ratio(pre["memcpy_fresh_gib_s"], bound),
            ],
            [
                "C: memcpy into populated memory",
                f"{pre['memcpy_prefaulted_gib_s']:.2f}",
                _ratio(pre["memcpy_prefaulted_gib_s"], bound),
            ],
        ]
        around = report.bulk.get("fault_around")
        if around:
            window = report.bulk.get("fault_around_window", 0) >> 10
            pages = pre["bytes"] // PAGE_4K
            for name, label in (
                (
                    "fault-around",
                    f"pagewarden on demand, sequential reader, fault-around {window} KiB",
                ),
                ("per page", "pagewarden on demand, sequential reader, one fault per page"),
            ):
                x = around[name]
                rows.append(
                    [
                        f"{label} ({100 * x['faults'] / pages:.1f}% of pages fault)",
                        f"{x['gib_s']:.2f}",
                        _ratio(x["gib_s"], bound),
                    ]
                )
        out.append(format_table(rows, ["what", "GiB/s", "vs bound"]))
    prepoison = report.bulk.get("prepoison")
    if prepoison:
        out.append("")
        out.append(
            "Pre-poisoning: Handler construction installing the known poison (registration "
            "included; 'net' subtracts a Handler with no poison) against the C program's ranged "
            "UFFDIO_POISON, one ioctl per run, on a registered range:"
        )
        out.append("")
        rows = [
            [
                name,
                str(p["pages"]),
                str(p["ioctls"]),
                f"{p['pagewarden_pages_per_s'] / 1e6:.1f}M",
                f"{p['pagewarden_net_pages_per_s'] / 1e6:.1f}M",
                f"{p['c_pages_per_s'] / 1e6:.1f}M",
                _ratio(p["pagewarden_pages_per_s"], p["c_pages_per_s"]),
            ]
            for name, p in prepoison.items()
        ]
        header = ["layout", "pages", "runs", "pages/s", "net pages/s", "C pages/s", "vs C"]
        out.append(format_table(rows, header))
    if report.poisonset:
        out.append("")
        out.append(
            "PoisonSet, 1M poisoned 4 KiB pages (lookups: native loop over 1M guest addresses "
            "drawn uniformly from the span, in random and in ascending order):"
        )
        out.append("")
        rows = [
            [
                f.shape,
                f"{f.span_pages:,}",
                f"{f.memory_bytes:,}",
                f"{f.bytes_per_poisoned_page:.3f}",
                f"{f.bits_per_guest_page:.4f}",
                f"{f.lookups_per_s / 1e6:.0f}M",
                f"{f.ascending_lookups_per_s / 1e6:.0f}M",
            ]
            for f in report.poisonset
        ]
        header = ["shape", "span (pages)", "bytes", "bytes/poisoned page", "bits/guest page"]
        out.append(format_table(rows, [*header, "lookups/s random", "ascending"]))
    remote = report.remote
    if remote.get("throughput_mib_s"):
        tp = remote["throughput_mib_s"]
        out.append("")
        out.append(
            f"Remote post-copy over loopback TCP, {remote['bytes'] >> 20} MiB guest: the page "
            f"server (`pagewarden serve`) in its own process on CPU {remote['server_cpu']}, "
            f"the destination (handler loop, receivers, faulting thread) on CPU "
            f"{remote['destination_cpu']}. Push: Handler(RemoteSource, prefetch=True) from "
            "start() to wait(); raw TCP: one native thread streaming 1 MiB writes to another, "
            "in the clear. The stream is encrypted with the token (Noise) unless named "
            "otherwise."
        )
        out.append("")
        labels = {
            "push random": "push, random image",
            "push half-zero": "push, half the pages zero",
            "push random, plaintext": "push, random image, plaintext (--insecure-no-token)",
            "push random, TLS": "push, random image, mutual TLS 1.3 (--tls-dir)",
        }
        labels = {
            "raw TCP + UFFDIO_COPY": "raw TCP, receiver UFFDIO_COPYs each MiB (kernel bound, anon)",
            "raw TCP + shmem write + CONTINUE": (
                "raw TCP, receiver writes each MiB to a memfd + CONTINUE (kernel bound, MINOR)"
            ),
            **labels,
            "push random, MINOR shmem": "push, random image, into a memfd in MINOR mode",
        }
        rows = [["raw TCP stream (native, 1 MiB writes/reads)", f"{tp['raw TCP']:.0f}", "1.00x"]]
        rows += [
            [label, f"{tp[name]:.0f}", _ratio(tp[name], tp["raw TCP"])]
            for name, label in labels.items()
            if name in tp
        ]
        out.append(format_table(rows, ["what", "MiB/s", "vs raw TCP"]))
        out.append("")
        out.append(
            "Fault latency seen by a faulting thread (each 8-byte load of a random missing page "
            "timed natively, one at a time; percentiles pooled over the repetitions). Idle: "
            "prefetch off. Under push: prefetch bringing the rest of the guest in meanwhile (the "
            "touched pages last), every touch a fault. No urgent channel: "
            "RemoteSource(urgent_channel=False), fault requests queued behind the bulk stream. "
            "Plaintext and TLS: the urgent channel, under push, with that protection instead "
            "of the token's:"
        )
        out.append("")
        lat = remote["latency"]
        idle = lat["idle"]
        rows = []
        for name in REMOTE_LATENCY_NAMES:
            if name not in lat:  # a report from before this contender
                continue
            x = lat[name]
            rows.append(
                [
                    name,
                    _us(x["p50_us"]),
                    _us(x["p99_us"]),
                    _ratio(x["p99_us"], idle["p99_us"]),
                    str(x["samples"]),
                ]
            )
        header = ["faulting thread", "p50 µs", "p99 µs", "p99 vs idle", "faults timed"]
        out.append(format_table(rows, header))
        seq = remote.get("sequential")
        if seq:
            out.append("")
            out.append(
                "A guest thread reading every page in order from the start while the push runs "
                "(default settings), against the push alone, on an idle host and with another "
                "process keeping a CPU busy; faults are the handler's, slow pages those whose "
                "first read took over 20 µs:"
            )
            out.append("")
            rows = []
            for host, x in seq.items():
                rows.append(
                    [
                        host,
                        f"{x['push_s']:.2f}",
                        f"{x['reader_total_s']:.2f}",
                        _ratio(x["reader_total_s"], x["push_s"]),
                        f"{x['faults']:.0f} ({100 * x['faults'] / x['pages']:.1f}%)",
                        f"{x['slow_pages']:.0f}",
                    ]
                )
            header = ["host", "push only s", "with the reader s", "ratio", "faults", "slow pages"]
            out.append(format_table(rows, header))
    if report.policy:
        from pagewarden.bench_policy import render_lines

        out.extend(render_lines(report.policy))
    if report.targets:
        out.append("")
        out.append("Targets (goals measured as ratios in this run; never asserted by tests):")
        out.append("")
        rows = []
        for t in report.targets:
            v = t["value"]
            value = f"{v / 1e6:.1f}M" if v >= 1e6 else f"{v:.0f}" if v >= 100 else f"{v:.3f}"
            rows.append([t["target"], value, t["goal"], "met" if t["met"] else "MISSED", t["note"]])
        out.append(format_table(rows, ["target", "value", "goal", "", "note"]))
    for skipped in report.skipped:
        out.append(f"skipped: {skipped}")
    return "\n".join(out)


COLORS = {"pagewarden": "#1f77b4", "C": "#2ca02c", "Python": "#d62728", "floor": "#7f7f7f"}


def _plot_throughput(ax: Any, scenarios: dict[str, dict[str, Summary]], title: str) -> None:
    for kind, style in (("copy", "-"), ("zero", "--")):
        for contender in ("pagewarden", "C", "Python"):
            xs, ys = [], []
            for threads in (1, 2):
                s = scenarios.get(f"{kind}-{threads}t")
                if s:
                    xs.append(threads)
                    ys.append(s[contender].rate / 1e3)
            if xs:
                ax.plot(
                    xs,
                    ys,
                    style,
                    marker="o",
                    color=COLORS[contender],
                    label=f"{contender}, {kind}",
                )
    ax.set_xticks([1, 2])
    ax.set_xlabel("faulting threads")
    ax.set_ylabel("k faults/s")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _plot_histograms(
    ax: Any, summaries: dict[str, Summary], names: Sequence[str], title: str
) -> None:
    """Tail plots: the fraction of faults at least as slow as x, from the log2 histograms."""
    for name in names:
        s = summaries[name]
        total = sum(s.histogram_log2_us) or 1
        tail = [sum(s.histogram_log2_us[i:]) / total for i in range(24)]
        xs = [2**i for i in range(24) if tail[i] > 0]
        ys = [t for t in tail if t > 0]
        ax.step(
            xs,
            ys,
            where="post",
            color=COLORS.get(name.split()[0], "black"),
            linestyle=":" if "SCHED_FIFO" in name else "--" if "busy" in name else "-",
            label=name,
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlim(1, 2**18)
    ax.set_ylim(1e-4, 1.5)
    ax.axhline(0.01, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("touch latency, µs (log2 buckets)")
    ax.set_ylabel("fraction of faults at least this slow (dotted: p99)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _plot_remote(axes: Any, remote: dict[str, Any]) -> None:
    """Remote post-copy: throughput against the raw TCP stream, and the faulting thread's
    latency tails idle and under push (with and without the urgent channel)."""
    tp = remote["throughput_mib_s"]
    names = ["raw TCP", "push random", "push half-zero"]
    ax = axes[0]
    ax.bar(names, [tp[n] for n in names], color=["#7f7f7f", "#1f77b4", "#aec7e8"])
    ax.set_ylabel("MiB/s")
    ax.set_title(f"Remote push, {remote['bytes'] >> 20} MiB guest, loopback", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1]
    styles = {"idle": "-", "under push, urgent channel": "--", "under push, no urgent channel": ":"}
    for name, x in remote["latency"].items():
        hist = x["histogram_log2_us"]
        total = sum(hist) or 1
        tail = [sum(hist[i:]) / total for i in range(24)]
        xs = [2**i for i in range(24) if tail[i] > 0]
        ys = [t for t in tail if t > 0]
        ax.step(xs, ys, where="post", color="#1f77b4", linestyle=styles.get(name, "-"), label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(1e-4, 1.5)
    ax.axhline(0.01, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("touch latency, µs (log2 buckets)")
    ax.set_ylabel("fraction of faults at least this slow (dotted: p99)")
    ax.set_title("Remote fault latency, idle vs under push", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.axis("off")


def write_plot(report: Report, path: Path) -> None:
    """Throughput against faulting threads, latency histograms (idle and in a busy Python
    process) and every scenario's rate, one row per placement, as a PNG."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise BenchError(
            2,
            "--plot needs matplotlib: pip install 'pagewarden[bench]' (or pip install matplotlib)",
        ) from None
    rows = [p for p in report.placements if p.key in report.faults]
    remote = bool(report.remote.get("latency"))
    if not rows and not remote:
        raise BenchError(2, "nothing to plot: the report has no fault or remote figures")
    nrows = len(rows) + int(remote)
    fig, axes = plt.subplots(nrows, 4, figsize=(22, 5 * nrows), squeeze=False)
    if remote:
        _plot_remote(axes[len(rows)], report.remote)
    for r, placement in enumerate(rows):
        scenarios = report.faults[placement.key]
        label = f"{placement.key}: {placement.title}"
        _plot_throughput(axes[r][0], scenarios, f"Fault throughput, 4 KiB anon\n{label}")
        if "copy-1t" in scenarios:
            _plot_histograms(
                axes[r][1],
                scenarios["copy-1t"],
                CONTENDERS,
                f"Latency, UFFDIO_COPY 4 KiB, 1 thread\n{label}",
            )
        busy = report.busy.get(placement.key)
        if busy:
            _plot_histograms(
                axes[r][2],
                busy,
                [n for n in (*BUSY_NAMES, REALTIME) if n in busy],
                f"Latency, idle vs {report.config['busy_threads']} busy Python threads\n{label}",
            )
        ax = axes[r][3]
        names = [n for n in scenarios if not n.endswith("-2t")]
        width = 0.2
        for i, contender in enumerate(CONTENDERS):
            ax.bar(
                [k + (i - 1.5) * width for k in range(len(names))],
                [scenarios[n][contender].rate / 1e3 for n in names],
                width,
                color=COLORS[contender],
                label=contender,
            )
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.removesuffix("-1t") for n in names], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("k faults/s (log)")
        ax.set_title(f"Every scenario, 1 faulting thread\n{label}", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    m = report.machine
    fig.suptitle(f"pagewarden bench: Linux {m['kernel']}, {m['cpus']} CPUs, {m['cpu_model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_report(path: Path) -> Report:
    """A report saved with ``--json``, for printing and plotting again."""
    try:
        data = json.loads(path.read_text())
        report = Report(
            machine=data["machine"],
            config=data["config"],
            placements=[Placement(**p) for p in data["placements"]],
            gil=[GilDemo(**d) for d in data["gil"]],
            bulk=data["bulk"],
            poisonset=[PoisonSetFigures(**f) for f in data["poisonset"]],
            remote=data.get("remote", {}),
            policy=data.get("policy", {}),
            targets=data["targets"],
            skipped=data["skipped"],
        )
        report.faults = {
            placement: {
                scenario: {c: Summary(**v) for c, v in contenders.items()}
                for scenario, contenders in scenarios.items()
            }
            for placement, scenarios in data["faults"].items()
        }
        report.busy = {
            placement: {name: Summary(**v) for name, v in runs.items()}
            for placement, runs in data["busy"].items()
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(
            22, f"{path} is not a report written by `pagewarden bench --json`: {e}"
        ) from e
    return report


SECTIONS = ("faults", "busy", "gil", "bulk", "remote", "policy")


def run_sections(config: Config, report: Report, sections: set[str]) -> None:
    """Runs the chosen sections of the benchmark into ``report``. The faults and bulk sections
    need a C compiler for the C baseline; without one they are skipped with a note."""
    if sections & {"faults", "busy", "gil", "bulk"}:
        pph = load_pure_python_handler()
        with tempfile.TemporaryDirectory(prefix="pagewarden-bench-") as tmp:
            binary = compile_c_baseline(Path(tmp))
            if binary is None and sections & {"faults", "bulk"}:
                report.skipped.append(
                    "faults and bulk: the C baseline is compiled at run time and this machine has "
                    "no C compiler (cc, gcc, clang or $CC; e.g. apt-get install gcc)"
                )
            if "faults" in sections and binary is not None:
                scenarios = list(SCENARIOS)
                free = int(pw.capabilities()["hugepages_2m_free"])
                if free < config.huge_pages:
                    scenarios = [s for s in scenarios if s.kind != "hugetlb"]
                    report.skipped.append(
                        f"2 MiB hugetlb copy: needs {config.huge_pages} free 2 MiB hugepages, "
                        f"{free} free (as root: echo 64 > /proc/sys/vm/nr_hugepages)"
                    )
                run_faults(config, binary, pph, report, scenarios)
            if "busy" in sections:
                run_busy(config, pph, report)
            if "gil" in sections:
                _log("GIL trap demonstration")
                for contender in ("pagewarden", "Python"):
                    report.gil.append(gil_demo(contender, config.gil_timeout_s))
            if "bulk" in sections and binary is not None:
                run_bulk(config, binary, report)
    if "remote" in sections:
        run_remote(config, report)
    if "policy" in sections:
        from pagewarden.bench_policy import run_policy

        report.policy = run_policy(config.policy_pages, config.repetitions)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark as ``args`` say; returns the exit status (0 unless it could not run:
    missed targets are reported, not failed)."""
    if args.plot is not None:
        try:
            import matplotlib  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        except ImportError:
            raise BenchError(
                2,
                "--plot needs matplotlib: pip install 'pagewarden[bench]' (or run without --plot)",
            ) from None
    if args.from_json is not None:
        report = load_report(Path(args.from_json))
        report.targets = []
        evaluate_targets(report)
        print(render(report))
        if args.plot is not None:
            write_plot(report, Path(args.plot))
            _log(f"wrote {args.plot}")
        return 0
    if args.repetitions is not None and args.repetitions < 1:
        raise BenchError(22, "--repetitions must be at least 1")
    _check_environment()
    config = Config.make(args.quick, args.repetitions)
    sections = set(args.only or SECTIONS)
    report = Report(machine=_machine(), config=asdict(config), placements=placements())
    started = time.monotonic()
    run_sections(config, report, sections)
    evaluate_targets(report)
    report.machine["elapsed_s"] = round(time.monotonic() - started, 1)
    report.machine["loadavg_after"] = _read("/proc/loadavg")
    print(render(report))
    print(f"\n(ran {report.machine['elapsed_s']} s)")
    if args.json is not None:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1) + "\n")
        _log(f"wrote {args.json}")
    if args.plot is not None:
        write_plot(report, Path(args.plot))
        _log(f"wrote {args.plot}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``pagewarden bench``'s options to ``parser``."""
    parser.description = (
        "Measure pagewarden's fault path against a plain C userfaultfd handler, a pure-Python "
        "handler and the kernel floor (every contender on the same workload, interleaved), a "
        "busy Python process, the GIL trap, prefetch bandwidth, pre-poisoning, PoisonSet and "
        "remote post-copy over loopback and Python policies on the fault path. The C baseline "
        "ships as source and is compiled at run time; without a C compiler the sections that "
        "need it (faults, bulk) are skipped with a note. Run as root for every scenario."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller runs and 3 repetitions (under a minute)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw throughput and latency plots (needs matplotlib: pagewarden[bench])",
    )
    parser.add_argument(
        "--repetitions",
        type=int,
        metavar="N",
        help="interleaved repetitions (default 7, or 3 with --quick)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=SECTIONS,
        metavar="SECTION",
        help=f"run only this section (repeatable): {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--from-json",
        metavar="FILE",
        help="measure nothing: print (and with --plot, draw) a run saved with --json",
    )
