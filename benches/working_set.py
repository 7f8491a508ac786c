"""Record and replay of a working set: how long a guest waits for the pages it touches first
when the background prefetch runs in address order, and when it runs the recorded working set
first (``Handler(..., prefetch_order=previous_handler.access_log())``).

Run: ``python benches/working_set.py [--size-mib 256] [--fraction 0.05] [--repetitions 5]``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import statistics
import time

import pagewarden as pw

PAGE = 4096


def measure(
    size_mib: int = 256, fraction: float = 0.05, repetitions: int = 5, seed: int = 2
) -> dict[str, tuple[float, float]]:
    """Median (touch seconds, faults) of the working-set touch, per way of prefetching."""
    pages = size_mib * 256
    image = mmap.mmap(-1, pages * PAGE)
    image.write(os.urandom(pages * PAGE))
    rng = random.Random(seed)
    working_set = [p * PAGE for p in rng.sample(range(pages), max(1, int(pages * fraction)))]
    runs: dict[str, list[tuple[float, int]]] = {"address order": [], "recorded order": []}
    for _ in range(repetitions):
        for way in runs:
            mem = pw.GuestMemory.anonymous(pages * PAGE)
            order = working_set if way == "recorded order" else None
            with pw.Handler(mem, pw.MemorySource(image), prefetch_order=order) as handler:
                handler.start()
                started = time.perf_counter()
                mem.touch(pages=working_set)
                elapsed = time.perf_counter() - started
                runs[way].append((elapsed, int(handler.stats()["faults"])))
                handler.wait(timeout=60)
    return {
        way: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
        for way, v in runs.items()
    }


def main() -> None:
    """Prints the comparison."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--repetitions", type=int, default=5)
    args = p.parse_args()
    result = measure(args.size_mib, args.fraction, args.repetitions)
    for way, (seconds, faults) in result.items():
        print(f"{way:15}  working-set touch {seconds * 1000:7.1f} ms  faults {faults:7.0f}")
    base, replay = result["address order"][0], result["recorded order"][0]
    print(f"replay speed-up: {base / replay:.1f}x")


if __name__ == "__main__":
    main()
