"""Many concurrent restores of one snapshot: one `pagewarden daemon` against one handler process
per microVM (`pagewarden firecracker`, and Firecracker's example handler when its binary is
given). Each microVM is the Firecracker double (tests/firecracker_double.py), whose two threads
read all its memory; all are released at once. Measured per way: the time until every microVM
has read all its memory, the p99 of the guests' page-touch latency (a fault's wait, seen from the
guest), and the handlers' threads and memory (RSS, at the peak).

Run as root: ``python benches/daemon.py [--vms 64] [--mib 16] [--example PATH]``. Takes
``/tmp/pagewarden-timing.lock``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

DOUBLE = Path(__file__).resolve().parent.parent / "tests" / "firecracker_double.py"
PAGE = 4096
ENGINE_THREADS: int | None = None  # the daemon's default


def _api(sock: Path, method: str, path: str, body: Any) -> int:
    data = json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n\r\n".encode()
            + data
        )
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def _tree(pids: list[int]) -> tuple[int, int, int]:
    """Threads, RSS and private (anonymous) RSS in KiB of these processes. RSS also counts the
    memory file's page-cache pages each process maps, which all of them share."""
    threads = rss = anon = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    threads += int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1])
        except OSError:
            pass
    return threads, rss, anon


def _p99(hist: list[int]) -> float:
    total = sum(hist)
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= 0.99 * total:
            return float(2 ** (i + 1))
    return float("nan")


def run_way(
    way: str, vms: int, mib: int, memfile: Path, work: Path, example: str | None, prefetch: str
) -> dict[str, float]:
    pages = mib * 256
    go = work / "go"
    handlers: list[subprocess.Popen[bytes]] = []
    socks = [work / f"vm{i}.sock" for i in range(vms)]
    if way == "daemon":
        api = work / "api.sock"
        d = subprocess.Popen(
            [sys.executable, "-m", "pagewarden", "daemon", "--api-sock", str(api),
             *(["--engine-threads", str(ENGINE_THREADS)] if ENGINE_THREADS else [])],
            stdout=subprocess.PIPE,
            stderr=open(work / "daemon.log", "wb"),  # noqa: SIM115 - the child owns it
        )  # fmt: skip
        assert d.stdout is not None and d.stdout.readline().startswith(b"api on")
        handlers.append(d)
        for i, sock in enumerate(socks):
            body = {"uffd_socket": str(sock), "mem_file": str(memfile), "prefetch": prefetch}
            assert _api(api, "PUT", f"/sessions/vm{i}", body) == 201
    else:
        for sock in socks:
            cmd = (
                [str(example), str(sock), str(memfile)]
                if way == "example"
                else [
                    sys.executable,
                    "-m",
                    "pagewarden",
                    "firecracker",
                    str(sock),
                    str(memfile),
                    "--prefetch",
                    prefetch,
                ]
            )
            log = open(work / f"{sock.stem}.log", "wb")  # noqa: SIM115 - the child owns it
            handlers.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
        deadline = time.monotonic() + 60
        while not all(s.exists() for s in socks):
            assert time.monotonic() < deadline, "a handler did not listen"
            time.sleep(0.01)
    doubles = [
        subprocess.Popen(
            [
                sys.executable,
                str(DOUBLE),
                str(sock),
                str(work / f"out{i}.json"),
                "--sizes",
                str(pages),
                "--wait-for",
                str(go),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i, sock in enumerate(socks)
    ]
    for d in doubles:
        assert d.stdout is not None and d.stdout.readline().strip() == b"waiting"
    peak = [0, 0, 0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now = _tree([h.pid for h in handlers])
            peak[:] = [max(a, b) for a, b in zip(peak, now, strict=True)]
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.monotonic()
    go.touch()
    for i, d in enumerate(doubles):
        _, err = d.communicate(timeout=600)
        # Firecracker's example handler panics when its peer closes the socket at exit, and its
        # panic hook SIGKILLs the peer: a microVM that wrote its whole report first is done.
        done = (work / f"out{i}.json").exists() and way == "example" and d.returncode == -9
        assert d.returncode == 0 or done, f"{way}: microVM {i} ended with {d.returncode}: {err!r}"
    elapsed = time.monotonic() - started
    stop.set()
    sampler.join()
    hist = [0] * 40
    for i in range(vms):
        for region in json.loads((work / f"out{i}.json").read_text())["regions"]:
            for b, n in enumerate(region["latency_dist_us_log2"]):
                hist[b] += n
    for h in handlers:
        if h.poll() is None:
            h.send_signal(signal.SIGTERM)
    for h in handlers:
        try:
            h.wait(timeout=30)
        except subprocess.TimeoutExpired:
            h.kill()
            h.wait()
    return {
        "all_read_s": elapsed,
        "touch_p99_us": _p99(hist),
        "threads": peak[0],
        "rss_mib": peak[1] / 1024,
        "anon_mib": peak[2] / 1024,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vms", type=int, default=64)
    p.add_argument("--mib", type=int, default=16, help="guest memory per microVM")
    p.add_argument("--example", help="Firecracker's uffd_on_demand_handler binary, as a third way")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument(
        "--prefetch", choices=("all", "none"), default="all", help="pagewarden's prefetch (all)"
    )
    p.add_argument("--busy", action="store_true", help="keep one CPU busy meanwhile")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (logs, reports)")
    p.add_argument(
        "--engine-threads", type=int, help="the daemon's (default: the daemon's default)"
    )
    p.add_argument("--ways", default="daemon,processes,example", help="which ways, comma separated")
    args = p.parse_args()
    global ENGINE_THREADS
    ENGINE_THREADS = args.engine_threads
    ways = [w for w in args.ways.split(",") if w != "example" or args.example]
    with open("/tmp/pagewarden-timing.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
        try:
            results = _measure(args, ways)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    _print(args, results)
    return 0


def _measure(args: argparse.Namespace, ways: list[str]) -> dict[str, list[dict[str, float]]]:
    """Every way, ``args.rounds`` times, interleaved."""
    results: dict[str, list[dict[str, float]]] = {w: [] for w in ways}
    with contextlib.ExitStack() as stack:
        tmp = args.keep or stack.enter_context(tempfile.TemporaryDirectory())
        Path(tmp).mkdir(parents=True, exist_ok=True)
        memfile = Path(tmp) / "mem.snap"
        memfile.write_bytes(os.urandom(args.mib << 20))
        for r in range(args.rounds):
            for way in ways:
                work = Path(tmp) / f"{way}{r}"
                work.mkdir()
                results[way].append(
                    run_way(way, args.vms, args.mib, memfile, work, args.example, args.prefetch)
                )
    return results


def _print(args: argparse.Namespace, results: dict[str, list[dict[str, float]]]) -> None:
    """The table: medians over the rounds (by total time), and the spread of the times."""
    print(
        f"{args.vms} concurrent restores of a {args.mib} MiB snapshot, {args.rounds} round(s), "
        f"pagewarden prefetch {args.prefetch}{', one CPU busy' if args.busy else ''}"
    )
    print(
        f"{'way':10} {'all read, s (min-max)':>24} {'touch p99, us':>14} {'threads':>8} "
        f"{'RSS, MiB':>9} {'private, MiB':>13}"
    )
    for way, runs in results.items():
        ordered = sorted(runs, key=lambda x: x["all_read_s"])
        mid = ordered[len(runs) // 2]
        low, high = ordered[0]["all_read_s"], ordered[-1]["all_read_s"]
        spread = f"{mid['all_read_s']:.2f} ({low:.2f}-{high:.2f})"
        print(
            f"{way:10} {spread:>24} {mid['touch_p99_us']:14.0f} "
            f"{int(mid['threads']):8d} {mid['rss_mib']:9.1f} {mid['anon_mib']:13.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
