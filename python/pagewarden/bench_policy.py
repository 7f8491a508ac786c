"""``pagewarden bench --only policy``: what Python policies cost on the fault path.

Three handlers serve the same faults (anonymous memory, every page copied from a MemorySource,
prefetch off), interleaved within each repetition, touched by native threads
(``_native._bench_touch``, one 8-byte load per page):

- ``native``: no policy;
- ``notifications``: a policy overriding only ``on_poison``, ``on_event`` and ``on_progress``
  (the handler's fault path is unchanged; this measures what the dispatcher thread costs);
- ``on_fault``: a policy whose ``on_fault`` is consulted on every fault (it returns None, the
  native default), so each fault makes a round trip to the Python dispatcher thread.

Figures are medians of faults per second over the repetitions, for 1 and 2 faulting threads,
with no CPU pinning (the dispatcher is a Python thread the scheduler places).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import pagewarden as pw
from pagewarden import _native

CONTENDERS = ("native", "notifications", "on_fault")


class _Notify(pw.Policy):
    def on_poison(self, guest_addresses: list[int]) -> None:
        pass

    def on_event(self, event: pw.Event) -> None:
        pass

    def on_progress(self, stats: dict[str, Any]) -> None:
        pass


class _PerFault(pw.Policy):
    def on_fault(self, fault: pw.Fault) -> pw.Action | None:
        return None


def _policy(name: str) -> pw.Policy | None:
    return {"native": None, "notifications": _Notify(), "on_fault": _PerFault()}[name]


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _one_run(name: str, image: bytes, threads: int) -> dict[str, float]:
    mem = pw.GuestMemory.anonymous(len(image))
    h = pw.Handler(
        mem,
        pw.MemorySource(image),
        prefetch=False,
        policy=_policy(name),
        policy_timeout=1.0,
        progress_interval=0.1,
    )
    try:
        h.start()
        # Measure the steady state: the dispatcher thread is up and waiting, as in a daemon.
        time.sleep(0.02)
        elapsed, _latencies, sigbus = _native._bench_touch(mem, threads)
        stats = h.stats()
        h.check()
    finally:
        h.close()
    if sigbus:
        raise RuntimeError(f"{sigbus} touches raised SIGBUS in the policy benchmark")
    pages = len(image) // mem.page_size
    return {
        "faults_per_s": pages / elapsed,
        "timeouts": float(stats.get("policy_timeouts", 0)),
    }


def run_policy(pages: int, repetitions: int) -> dict[str, Any]:
    """Runs the policy benchmark; returns its figures (medians of faults/s and the runs)."""
    image = bytes(range(256)) * (pages * 4096 // 256)
    runs: dict[str, dict[str, list[float]]] = {str(t): {c: [] for c in CONTENDERS} for t in (1, 2)}
    timeouts = 0.0
    for rep in range(repetitions):
        _log(f"policy: repetition {rep + 1}/{repetitions}")
        for threads in (1, 2):
            order = CONTENDERS[rep % 3 :] + CONTENDERS[: rep % 3]
            for name in order:
                r = _one_run(name, image, threads)
                runs[str(threads)][name].append(r["faults_per_s"])
                timeouts += r["timeouts"]
    medians = {t: {c: statistics.median(v) for c, v in by.items()} for t, by in runs.items()}
    return {
        "pages": pages,
        "repetitions": repetitions,
        "faults_per_s": medians,
        "runs": runs,
        "on_fault_timeouts": timeouts,
    }


def targets(policy: dict[str, Any]) -> list[tuple[str, float, str, bool, str]]:
    """(name, value, goal, met, note) for the policy figures."""
    out = []
    for t, m in policy["faults_per_s"].items():
        r = m["notifications"] / m["native"]
        out.append(
            (
                f"policy, {t} thread(s): notifications-only / native faults/s",
                r,
                ">= 0.95",
                r >= 0.95,
                f"{m['notifications']:.0f} / {m['native']:.0f}",
            )
        )
        rate = m["on_fault"]
        out.append(
            (
                f"policy, {t} thread(s): faults/s with a per-fault on_fault",
                rate,
                ">= 20k",
                rate >= 20e3,
                f"{rate / m['native']:.2f}x native",
            )
        )
    return out


def render_lines(policy: dict[str, Any]) -> list[str]:
    """The policy section of the text report."""
    lines = [
        "",
        (
            f"Python policies on the fault path: {policy['pages']} faults per run (anonymous "
            "memory, copies from a MemorySource, prefetch off), medians of faults/s over "
            f"{policy['repetitions']} interleaved repetitions, unpinned:"
        ),
        "",
        "| faulting threads | native | notifications only | per-fault on_fault |",
        "|---|---|---|---|",
    ]
    for t, m in policy["faults_per_s"].items():
        lines.append(
            f"| {t} | {m['native']:.0f} | {m['notifications']:.0f} "
            f"({m['notifications'] / m['native']:.2f}x) | {m['on_fault']:.0f} "
            f"({m['on_fault'] / m['native']:.2f}x) |"
        )
    lines.append(
        f"on_fault decisions that missed the deadline (native default applied): "
        f"{policy['on_fault_timeouts']:.0f}"
    )
    return lines
