"""A handler restart under a running guest: `pagewarden firecracker --state-dir` is killed
(SIGKILL) while the Firecracker double waits, a vCPU-like thread of the double then blocks on a
missing page, and the same command is started again. Measured per run:

- start to re-attached: from starting the successor to its "re-attached" log line;
- start to first fault served: from starting the successor to the blocked thread's page arriving;
- longest block: how long that thread waited in all (kill, restart and re-attach).

Run as root: ``python benches/restart.py [--runs 7] [--pages 4096] [--busy]`` (``--busy`` keeps
one CPU busy with another process, as on a production host). Takes
``/tmp/pagewarden-timing.lock``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOUBLE = Path(__file__).resolve().parent.parent / "tests" / "firecracker_double.py"
PAGE = 4096


def one_run(work: Path, memfile: Path, pages: int) -> dict[str, float]:
    """One kill-and-restart; the three times in milliseconds."""
    sock, state, out, go = work / "uffd.sock", work / "state", work / "out.json", work / "go"
    cmd = [sys.executable, "-m", "pagewarden", "firecracker", str(sock), str(memfile),
           "--state-dir", str(state), "--prefetch", "none"]  # fmt: skip
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert first.stdout is not None and first.stdout.readline().startswith("listening on")
    double = subprocess.Popen(
        [sys.executable, str(DOUBLE), str(sock), str(out), "--sizes", str(pages),
         "--touch-first", "16", "--wait-for", str(go), "--time-first-touch"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert double.stdout is not None and double.stdout.readline().strip() == "waiting"
    first.kill()
    first.wait()
    go.touch()
    time.sleep(0.05)  # the double's thread is blocked on page 16 now
    started = time.monotonic()
    second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert second.stderr is not None
    reattached = None
    for line in second.stderr:
        if "re-attached to Firecracker" in line:
            reattached = time.monotonic()
            break
    assert reattached is not None, "the successor did not re-attach"
    _, err = double.communicate(timeout=120)
    assert double.returncode == 0, err
    second.wait(timeout=60)
    t0, t1 = json.loads(out.read_text())["first_touch"]
    return {
        "start_to_reattached_ms": (reattached - started) * 1000,
        "start_to_first_fault_ms": (t1 - started) * 1000,
        "longest_block_ms": (t1 - t0) * 1000,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--pages", type=int, default=4096, help="guest pages (4 KiB)")
    p.add_argument("--busy", action="store_true", help="keep one CPU busy meanwhile")
    args = p.parse_args()
    busy = None
    with open("/tmp/pagewarden-timing.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if args.busy:
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            with tempfile.TemporaryDirectory() as tmp:
                memfile = Path(tmp) / "mem.snap"
                memfile.write_bytes(os.urandom(args.pages * PAGE))
                runs = []
                for i in range(args.runs):
                    work = Path(tmp) / f"run{i}"
                    work.mkdir()
                    runs.append(one_run(work, memfile, args.pages))
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    print(
        f"restart under a waiting guest, {args.runs} runs{' (one CPU busy)' if args.busy else ''}"
    )
    for key in runs[0]:
        values = sorted(r[key] for r in runs)
        print(
            f"  {key:26} min {values[0]:7.1f}  median {statistics.median(values):7.1f}  "
            f"max {values[-1]:7.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
