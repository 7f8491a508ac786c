"""``pagewarden demo``: a whole local post-copy on this machine.

A synthetic guest image with some poisoned pages is served from a file by a destination handler
with background prefetch, while native threads touch guest memory in random order like vCPUs.
Afterwards every page is verified byte for byte through the kernel path, and every poisoned page
must have raised SIGBUS at its exact address. Exit status 0 only if all of that holds.

With ``--remote`` the image and its poison list are served by ``pagewarden serve`` in a separate
process on loopback (with a freshly generated token), and the destination handler fetches every
page from it through a ``RemoteSource``: the poison reaches the destination over the wire.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pagewarden as pw
from pagewarden._progress import ProgressBar

MIB = 1 << 20


@dataclass
class DemoResult:
    """What the demo found; ``ok`` only if every check passed."""

    pages: int
    page_size: int
    poisoned: int
    wrong_pages: list[int] = field(default_factory=list)
    missing_sigbus: list[int] = field(default_factory=list)
    unexpected_sigbus: list[int] = field(default_factory=list)
    wrong_sigbus_address: list[int] = field(default_factory=list)
    stats: dict[str, object] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every page was right and every poisoned page SIGBUSed."""
        return not (
            self.wrong_pages
            or self.missing_sigbus
            or self.unexpected_sigbus
            or self.wrong_sigbus_address
        )


def parse_size(text: str) -> int:
    """Parses '256M', '1G', '4096' into bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 256M or 1G)") from None


def percentile_us(hist: list[int], q: float) -> str:
    """Upper bound of the log2 µs bucket holding the q-quantile."""
    total = sum(hist)
    if total == 0:
        return "-"
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= q * total:
            return f"<{2 ** (i + 1)} µs"
    return f">={2 ** len(hist)} µs"


def synthetic_image(rng: random.Random, size: int) -> bytes:
    """Deterministic pseudo-random guest bytes (generated in 1 MiB pieces)."""
    piece = MIB
    parts = [rng.randbytes(min(piece, size - off)) for off in range(0, size, piece)]
    return b"".join(parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options (all optional)."""
    p.add_argument("--size", type=parse_size, default=256 * MIB, help="guest size (default 256M)")
    p.add_argument(
        "--poison-rate", type=float, default=0.001, help="fraction of pages poisoned (0.001)"
    )
    p.add_argument("--kind", choices=["anon", "shmem", "hugetlb"], default="anon")
    p.add_argument("--mode", choices=["missing", "minor"], default="missing")
    p.add_argument("--threads", type=int, default=2, help="guest-like faulting threads (2)")
    p.add_argument("--seed", type=int, default=1, help="seed for image, poison and access order")
    p.add_argument("--no-prefetch", action="store_true", help="serve faults only")
    p.add_argument(
        "--remote",
        action="store_true",
        help="serve the image from `pagewarden serve` in another process over loopback TCP",
    )


def run(args: argparse.Namespace) -> DemoResult:
    """Runs the demo and prints its report; returns the result."""
    out = sys.stdout
    page_size = 2 * MIB if args.kind == "hugetlb" else 4096
    size = args.size
    if size <= 0 or size % page_size:
        raise pw.ConfigurationError(
            22, f"--size {size} is not a positive multiple of the page size {page_size}"
        )
    if not 0 <= args.poison_rate < 1:
        raise pw.ConfigurationError(22, f"--poison-rate {args.poison_rate} is not in [0, 1)")
    pages = size // page_size
    rng = random.Random(args.seed)
    n_poison = max(1, round(pages * args.poison_rate)) if args.poison_rate > 0 else 0
    poisoned_pages = sorted(rng.sample(range(pages), min(n_poison, pages)))
    poison = pw.PoisonSet([i * page_size for i in poisoned_pages], page_size=page_size)

    print(
        f"pagewarden demo: {size // MIB} MiB {args.kind} guest, {page_size // 1024} KiB pages, "
        f"mode {args.mode}, {len(poison)} poisoned pages, {args.threads} guest threads, "
        f"prefetch {'off' if args.no_prefetch else 'on'}"
        + (", pages from a page server in another process" if args.remote else ""),
        file=out,
    )
    with tempfile.TemporaryDirectory(prefix="pagewarden-demo-") as tmp:
        image_path = os.path.join(tmp, "guest.img")
        t0 = time.monotonic()
        image = synthetic_image(rng, size)
        with open(image_path, "wb") as f:
            f.write(image)
        print(f"  source image written to {image_path} in {time.monotonic() - t0:.1f} s", file=out)

        if args.kind == "anon":
            mem = pw.GuestMemory.anonymous(size)
        else:
            mem = pw.GuestMemory.memfd(size, hugepages=args.kind == "hugetlb")
        result = DemoResult(pages=pages, page_size=page_size, poisoned=len(poison))
        stack = contextlib.ExitStack()
        source: pw.FileSource | pw.RemoteSource
        if args.remote:
            from pagewarden._server_process import ServerProcess, write_token

            token_path = os.path.join(tmp, "token")
            poison_path = os.path.join(tmp, "poison.json")
            token = write_token(Path(token_path))
            poison.save(poison_path)
            server = stack.enter_context(
                ServerProcess(Path(image_path), Path(token_path), Path(poison_path))
            )
            print(f"  page server (pagewarden serve) listening on {server.address}", file=out)
            source = stack.enter_context(pw.RemoteSource(server.address, token))
            # The poison comes from the server, announced when the source connected.
            handler_poison = None
        else:
            source = pw.FileSource(image_path)
            handler_poison = poison
        started = time.monotonic()
        with (
            stack,
            pw.Handler(
                mem, source, poison=handler_poison, mode=args.mode, prefetch=not args.no_prefetch
            ) as handler,
        ):
            handler.start()
            touched: list[pw.TouchResult] = []
            errors: list[BaseException] = []

            def guest() -> None:
                try:
                    touched.append(mem.touch(threads=args.threads, order="random", seed=args.seed))
                except BaseException as e:  # noqa: BLE001 - re-raised on the main thread below
                    errors.append(e)

            worker = threading.Thread(target=guest, name="demo-guest")
            worker.start()
            bar = ProgressBar(pages, "post-copy")
            while worker.is_alive() or not handler.wait(timeout=0.1):
                st = handler.stats()
                bar.update(
                    int(st["pages_resolved"]),
                    f"faults {st['faults']}  prefetched {st['pages_prefetched']}  "
                    f"poisoned {st['pages_poisoned']}",
                )
                worker.join(timeout=0.1)
                handler.check()
            result.elapsed_s = time.monotonic() - started
            st = handler.stats()
            bar.finish(int(st["pages_resolved"]), f"done in {result.elapsed_s:.2f} s")
            if errors:
                raise errors[0]
            touch = touched[0]
            result.stats = dict(st)

            # Verification through the kernel path: bytes for healthy pages, PoisonedPageError
            # for poisoned ones; and what the guest threads saw.
            vbar = ProgressBar(pages, "verify   ")
            poisoned_set = set(poisoned_pages)
            chunk = max(page_size, 4 * MIB)
            for start in range(0, size, chunk):
                try:
                    data = mem.read(start, chunk)
                    for off in range(0, chunk, page_size):
                        index = (start + off) // page_size
                        if index in poisoned_set:
                            result.missing_sigbus.append(index)
                        elif (
                            data[off : off + page_size]
                            != image[start + off : start + off + page_size]
                        ):
                            result.wrong_pages.append(index)
                except pw.PoisonedPageError:
                    for off in range(0, chunk, page_size):
                        gpa = start + off
                        index = gpa // page_size
                        try:
                            data = mem.read(gpa, page_size)
                        except pw.PoisonedPageError:
                            if index not in poisoned_set:
                                result.unexpected_sigbus.append(index)
                            continue
                        if index in poisoned_set:
                            result.missing_sigbus.append(index)
                        elif data != image[gpa : gpa + page_size]:
                            result.wrong_pages.append(index)
                vbar.update(min(start + chunk, size) // page_size)
            for gpa, checksum in touch.checksums.items():
                if gpa // page_size in poisoned_set:
                    result.missing_sigbus.append(gpa // page_size)
                elif checksum != pw.page_checksum(image[gpa : gpa + page_size]):
                    result.wrong_pages.append(gpa // page_size)
            for gpa, si_addr, _code in touch.sigbus:
                if si_addr != mem.host_address_of(gpa):
                    result.wrong_sigbus_address.append(gpa // page_size)
            if sorted(g // page_size for g in touch.poisoned) != poisoned_pages:
                seen = {g // page_size for g in touch.poisoned}
                result.missing_sigbus.extend(sorted(poisoned_set - seen))
                result.unexpected_sigbus.extend(sorted(seen - poisoned_set))
            vbar.finish(pages, "done")
            if handler.poison_set() != poison:
                result.unexpected_sigbus.append(-1)
            remote_stats = dict(source.stats()) if isinstance(source, pw.RemoteSource) else None
        if args.remote:
            print(f"  page server: {server.summary}", file=out)

        codes: dict[int, int] = {}
        for _gpa, _addr, code in touch.sigbus:
            codes[code] = codes.get(code, 0) + 1
        hist = list(st["latency_dist_us_log2"])
        rows = [
            ("pages", f"{pages} x {page_size // 1024} KiB = {size // MIB} MiB"),
            ("pages brought in by faults", f"{st['faults']}"),
            ("pages brought in by prefetch", f"{st['pages_prefetched']}"),
            ("poisoned pages (markers installed)", f"{len(poison)} ({st['pages_poisoned']})"),
            (
                "poisoned pages hit by the guest",
                f"{len(touch.poisoned)}  SIGBUS si_code "
                + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())),
            ),
            (
                "fault latency (handler) avg / p50 / p99",
                (
                    f"{int(st['latency_ns_avg']) / 1000:.1f} µs / {percentile_us(hist, 0.5)} / "
                    f"{percentile_us(hist, 0.99)}"
                ),
            ),
            ("touch latency (guest) avg", f"{touch.latency_ns_avg / 1000:.1f} µs"),
            ("EEXIST / EAGAIN", f"{st['eexist']} / {st['eagain_retries']}"),
            *(
                [
                    (
                        "remote requests urgent / bulk",
                        (
                            f"{remote_stats['urgent_requests']} / "
                            f"{remote_stats['bulk_requests']}, "
                            f"{int(remote_stats['bytes_received']) / MIB:.0f} MiB received"
                        ),
                    )
                ]
                if remote_stats is not None
                else []
            ),
            (
                "throughput",
                (
                    f"{size / MIB / result.elapsed_s:.0f} MiB/s "
                    f"({pages / result.elapsed_s:.0f} pages/s), {result.elapsed_s:.2f} s"
                ),
            ),
            ("pages wrong", f"{len(result.wrong_pages)}"),
            (
                "poisoned pages that did not SIGBUS",
                f"{len(result.missing_sigbus) + len(result.wrong_sigbus_address)}",
            ),
            ("healthy pages that SIGBUSed", f"{len(result.unexpected_sigbus)}"),
        ]
        width = max(len(k) for k, _ in rows)
        print(file=out)
        for k, v in rows:
            print(f"  {k.ljust(width)}  {v}", file=out)
        verdict = (
            "OK: every page byte-exact, every poisoned page SIGBUSed" if result.ok else "FAILED"
        )
        print(f"\n{verdict}", file=out)
    return result
