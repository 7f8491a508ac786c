"""The ``pagewarden`` command line."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence

import pagewarden as pw


def _cmd_demo(args: argparse.Namespace) -> int:
    from pagewarden import demo

    return 0 if demo.run(args).ok else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from pagewarden import bench

    return bench.run(args)


def _cmd_kvm_check(args: argparse.Namespace) -> int:
    from pagewarden import kvm_check

    return kvm_check.run(args)


class _UsageProblem(Exception):
    """Bad input to a command: the message says what was wrong and what to do (exit 2)."""


def _parse_int(text: str, what: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise _UsageProblem(f"{what} {text!r} is not a number (decimal, or hex with 0x)") from None
    if value < 0:
        raise _UsageProblem(f"{what} {text!r} is negative")
    return value


def _parse_map(text: str) -> tuple[int, int, int]:
    parts = text.split(":")
    if len(parts) != 3:
        raise _UsageProblem(
            f"--map {text!r} is not GUEST_ADDR:HOST_ADDR:LEN "
            "(e.g. --map 0:0x7f0000000000:0x40000000)"
        )
    guest, host, length = (
        _parse_int(p, f"--map {name}")
        for p, name in zip(parts, ("GUEST_ADDR", "HOST_ADDR", "LEN"), strict=True)
    )
    return guest, host, length


def _read_token(path: str, remedy: str | None = None) -> bytes:
    """The token in ``path`` without one trailing newline; ``remedy`` replaces the hint on how
    to create one."""
    try:
        with open(path, "rb") as f:
            token = f.read()
    except OSError as e:
        raise _UsageProblem(
            f"cannot read the token file {path}: {e.strerror or e}; "
            + (
                remedy
                or f"create one with `head -c 32 /dev/urandom | base64 > {path}` and copy it to "
                "the destination"
            )
        ) from None
    if token.endswith(b"\n"):
        token = token[:-1]
    if len(token) < 16:
        raise _UsageProblem(
            f"the token in {path} is {len(token)} bytes, a token has at least 16; "
            + (remedy or f"create one with `head -c 32 /dev/urandom | base64 > {path}`")
        )
    return token


def _cmd_daemon(args: argparse.Namespace) -> int:
    from pagewarden.daemon import command

    return command.run(args)


def _cmd_firecracker(args: argparse.Namespace) -> int:
    from pagewarden.firecracker import command

    return command.run(args)


def _serve_source(args: argparse.Namespace) -> str | pw.ProcessMemory:
    import os

    if args.pid is not None:
        if args.image is not None:
            raise _UsageProblem("give either IMAGE or --pid with --map, not both")
        if not args.map:
            raise _UsageProblem("--pid needs at least one --map GUEST_ADDR:HOST_ADDR:LEN")
        page_size = _parse_int(args.page_size, "--page-size")
        return pw.ProcessMemory(args.pid, [_parse_map(m) for m in args.map], page_size=page_size)
    if args.map:
        raise _UsageProblem("--map is for --pid; an IMAGE file needs no maps")
    if args.image is None:
        raise _UsageProblem("give a guest memory IMAGE file, or --pid PID with --map")
    if not os.path.isfile(args.image):
        raise _UsageProblem(f"image {args.image} does not exist or is not a regular file")
    return str(args.image)


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds the command like KeyboardInterrupt does, so that every
    context manager on the way closes (a handler fences what is still missing and lets go of the
    guest, a page server child is stopped) instead of the process vanishing mid-way."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# A service manager's stop, and the terminal going away.
_UNWINDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signals_unwind() -> Iterator[None]:
    """Turns SIGTERM and SIGHUP into :class:`_Terminated` in the main thread for the block (the
    default action would end the process at once: a Firecracker guest would hang on its next
    missing page, with nobody left to answer it). Elsewhere (``main()`` called on another
    thread) it changes nothing, as Python only lets the main thread set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, _frame: object) -> None:
        raise _Terminated(signum)

    old = {sig: signal.signal(sig, terminated) for sig in _UNWINDING_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _cmd_serve(args: argparse.Namespace) -> int:
    from pagewarden import poison_tools

    try:
        source = _serve_source(args)
        if args.token_file is None and args.tls_dir is None and not args.insecure_no_token:
            raise _UsageProblem(
                "--token-file or --tls-dir is required: create a token with "
                "`head -c 32 /dev/urandom | base64 > token` and give the same file to the "
                "destination, or an x509 directory (`pagewarden tls-certs DIR` for a test set); "
                "--insecure-no-token only on a loopback address, for testing"
            )
        token = _read_token(args.token_file) if args.token_file is not None else None
        poison = poison_tools.load_any(args.poison)[0] if args.poison else None
        server = pw.serve(
            source,
            poison=poison,
            listen=args.listen,
            token=token,
            insecure_no_token=args.insecure_no_token,
            background=args.background,
            tls_dir=args.tls_dir,
        )
    except (_UsageProblem, pw.ConfigurationError, pw.PoisonFileError, pw.SourceError) as e:
        message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"pagewarden serve: error: {message}", file=sys.stderr)
        return 2
    try:
        address = server.address
        assert address is not None
        host, port = address
        shown = f"[{host}]" if ":" in host else host
        interval = args.progress_interval
        last: tuple[int, ...] = ()
        try:
            # From the moment the address is out, SIGINT or SIGTERM means "stop with a summary".
            # They reach this thread promptly: pagewarden's own threads block them.
            if args.insecure_no_token:
                print(
                    "pagewarden serve: warning: plaintext: no authentication and no encryption "
                    "(--insecure-no-token, loopback only; for testing)",
                    file=sys.stderr,
                    flush=True,
                )
            print(f"listening on {shown}:{port}", flush=True)
            while True:
                time.sleep(interval if interval > 0 else 3600.0)
                if interval <= 0:
                    continue
                st = server.stats()
                now = (st["connections_active"], st["requests"], st["bytes_sent"])
                if now != last:
                    last = now
                    print(
                        f"serving: {st['connections_active']} connections, {st['requests']} "
                        f"requests ({st['urgent_requests']} urgent), "
                        f"{st['bytes_sent'] / (1 << 20):.1f} MiB sent, "
                        f"{st['pages_poison']} poison pages, {st['auth_failures']} auth failures",
                        file=sys.stderr,
                        flush=True,
                    )
        except KeyboardInterrupt:
            pass
        except _Terminated as e:
            if e.signum != signal.SIGTERM:
                raise
    finally:
        server.close()
    st = server.stats()
    print(
        f"served {st['requests']} requests ({st['urgent_requests']} urgent) on "
        f"{st['connections_accepted']} connections: {st['pages_sent']} pages sent, "
        f"{st['pages_zero']} zero, {st['pages_poison']} poison "
        f"({st['poison_discovered']} discovered), {st['pages_failed']} failed; "
        f"{st['auth_failures']} auth failures, {st['protocol_errors']} protocol errors",
        flush=True,
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    """Prints capabilities() as a table: what this machine offers, what is missing and what to
    do about it. Exits 0 when pagewarden can serve and poison guest memory here, 1 otherwise."""
    import os
    import platform
    import textwrap

    caps = pw.capabilities()
    ops = "docs/operations.md"
    # (check, what this machine has, status, what to do); status "ok", "MISSING" or "" (a fact).
    rows: list[tuple[str, str, str, str]] = []

    def yes(flag: object) -> str:
        return "yes" if flag else "no"

    def row(check: str, value: object, status: str = "", todo: str = "") -> None:
        rows.append((check, "-" if value is None else str(value), status, todo))

    uffd = bool(caps["userfaultfd"])
    methods: dict[str, str] = caps["open_methods"]
    dev, syscall = methods.get("/dev/userfaultfd", "?"), methods.get("userfaultfd(2)", "?")
    row(
        "userfaultfd (kernel-mode faults)",
        yes(uffd),
        "ok" if uffd else "MISSING",
        "" if uffd else f"allow one of the two ways to open it that follow ({ops}, Permissions)",
    )
    row(
        "  open via /dev/userfaultfd",
        dev,
        "ok" if dev == "ok" else ("" if uffd else "MISSING"),
        ""
        if dev == "ok" or uffd
        else "give this user read-write access to /dev/userfaultfd (setfacl -m u:USER:rw "
        "/dev/userfaultfd, or a udev rule and a group), or run as root",
    )
    row(
        "  open via userfaultfd(2)",
        syscall,
        "ok" if syscall == "ok" else ("" if uffd else "MISSING"),
        ""
        if syscall == "ok" or uffd
        else "needs CAP_SYS_PTRACE, or sysctl vm.unprivileged_userfaultfd=1 (system-wide: "
        "prefer /dev/userfaultfd)",
    )
    row("vm.unprivileged_userfaultfd", caps["unprivileged_userfaultfd"])
    if uffd:
        poison = bool(caps["poison"])
        row(
            "UFFDIO_POISON",
            yes(poison),
            "ok" if poison else "MISSING",
            "" if poison else "needs Linux 6.6 or newer",
        )
        missing = caps["missing_shmem"] and caps["missing_hugetlbfs"]
        row(
            "MISSING mode on shmem / hugetlb",
            f"{yes(caps['missing_shmem'])} / {yes(caps['missing_hugetlbfs'])}",
            "ok" if missing else "MISSING",
            "" if missing else "memfd guests need Linux 4.11+ with CONFIG_HUGETLB_PAGE/SHMEM",
        )
        minor = caps["minor_shmem"] and caps["minor_hugetlbfs"]
        row(
            "MINOR mode on shmem / hugetlb",
            f"{yes(caps['minor_shmem'])} / {yes(caps['minor_hugetlbfs'])}",
            "ok" if minor else "MISSING",
            "" if minor else "mode='minor' needs Linux 5.13 (hugetlb) / 5.14 (shmem)",
        )
    else:
        poison = False
        row("UFFDIO_POISON, MISSING/MINOR modes", "unknown until a uffd opens")
    total, free = caps["hugepages_2m_total"], caps["hugepages_2m_free"]
    row(
        "2 MiB hugepages reserved / free",
        f"{'-' if total is None else total} / {'-' if free is None else free}",
        "ok" if free else "",
        ""
        if free
        else "only for hugetlb guests: as root, echo 64 > /proc/sys/vm/nr_hugepages (128 MiB)",
    )
    thp = caps["transparent_hugepages"]
    row(
        "transparent hugepages",
        thp,
        "",
        "fine: pagewarden sets MADV_NOHUGEPAGE on what it registers; do the same on a VMM's own "
        "mapping (GuestMemory.from_address)"
        if thp == "always"
        else "",
    )
    kvm = caps["kvm"]
    if kvm == "ok":
        kvm_todo = ""
    elif "No such file" in kvm:
        kvm_todo = "only to run KVM guests here: load kvm_intel or kvm_amd"
    else:
        kvm_todo = "only to run KVM guests here: give this user read-write access (group kvm)"
    row("/dev/kvm", kvm, "ok" if kvm == "ok" else "", kvm_todo)
    if kvm == "ok":
        from pagewarden import kvm_check

        delivery = kvm_check.poison_delivery()
        row(
            "poison reaches a KVM guest's VMM as",
            delivery.how,
            {True: "ok", False: "NO PROTECTION", None: ""}[delivery.protects],
            delivery.summary if delivery.protects is not True else "",
        )

    print(
        f"pagewarden {pw.__version__} on Linux {caps['kernel_release']} ({platform.machine()}), "
        f"Python {platform.python_version()}, uid {os.getuid()}"
    )
    print()
    header = ("check", "this machine", "status")
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(3)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for check, value, status, _ in rows:
        cells = (check, value, status)
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    todo = [(check.strip(), what) for check, _, _, what in rows if what]
    if todo:
        print()
        print("what to do:")
        for check, what in todo:
            print(textwrap.fill(what, 96, initial_indent=f"  {check}: ", subsequent_indent="    "))
    if caps["features"]:
        print()
        print(
            textwrap.fill(
                " ".join(caps["features"]),
                96,
                initial_indent="features UFFDIO_API offers: ",
                subsequent_indent="  ",
            )
        )
    print()
    if uffd and poison:
        print("ready: pagewarden can serve guest memory and keep poison here")
        return 0
    why = "no usable userfaultfd" if not uffd else "the kernel has no UFFDIO_POISON"
    print(f"not ready: {why} (see what to do above, and {ops})")
    return 1


# Commands that need neither demo nor bench: started by service managers, where a restart's
# latency is a guest's wait.
_LEAN_COMMANDS = ("firecracker", "serve", "daemon")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests). With ``only`` (a command
    name) the commands whose modules are slow to import (demo, bench) are left out unless they
    are that one: a successor that re-attaches to a waiting guest starts sooner."""
    parser = argparse.ArgumentParser(
        prog="pagewarden",
        description="Serve guest memory through userfaultfd; keep memory poison across moves.",
    )
    parser.add_argument("--version", action="version", version=f"pagewarden {pw.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if only in (None, "demo"):
        from pagewarden import demo

        p = sub.add_parser("demo", help="a whole local post-copy, verified byte for byte")
        demo.add_arguments(p)
        p.set_defaults(func=_cmd_demo)
    if only in (None, "bench"):
        from pagewarden import bench

        p = sub.add_parser(
            "bench",
            help="pagewarden against a C handler, a pure-Python handler and the kernel floor",
        )
        bench.add_arguments(p)
        p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("info", help="what this machine offers (userfaultfd, hugepages, KVM)")
    p.set_defaults(func=_cmd_info)
    from pagewarden import poison_tools

    poison_tools.add_parser(sub)
    p = sub.add_parser(
        "firecracker",
        help="serve a Firecracker snapshot restore (external UFFD handler), with poison",
        description="Listen on SOCKET for Firecracker's UFFD handshake and serve guest memory "
        "from MEMFILE, or with --source from a page server (pagewarden serve) that serves the "
        "memory file; poisoned pages (memory-file offsets, or guest-physical addresses "
        "translated with the VM's layout) are answered with UFFDIO_POISON. A refusal after "
        "Firecracker connected kills it (or fences its memory). Exits when Firecracker does.",
    )
    from pagewarden.firecracker import command as firecracker_command

    firecracker_command.add_arguments(p)
    p.set_defaults(func=_cmd_firecracker)
    p = sub.add_parser(
        "daemon",
        help="one daemon for every microVM on a host: sessions over an HTTP API, metrics",
        description="Serve the Firecracker restores of a host from one process: sessions are "
        "created over HTTP/1.1 with JSON on a Unix socket (PUT /sessions/NAME), their faults "
        "resolved on one shared engine; per-session Prometheus metrics with --metrics. "
        "See docs/daemon.md.",
    )
    from pagewarden.daemon import command as daemon_command

    daemon_command.add_arguments(p)
    p.set_defaults(func=_cmd_daemon)
    p = sub.add_parser(
        "serve",
        help="serve guest memory to post-copy destinations (the source host's page server)",
        description="Serve a guest memory IMAGE file, or the memory of process --pid named by "
        "--map, over pagewarden's page protocol (docs/protocol.md). The first line printed is "
        "'listening on HOST:PORT'; runs until SIGINT or SIGTERM, then prints a summary.",
    )
    p.add_argument(
        "image", nargs="?", help="guest memory image (byte at offset X = guest address X)"
    )
    p.add_argument("--pid", type=int, help="serve the memory of this process (needs --map)")
    p.add_argument(
        "--map",
        action="append",
        metavar="GUEST_ADDR:HOST_ADDR:LEN",
        help="with --pid: guest range at HOST_ADDR in that process (hex or decimal; repeatable)",
    )
    p.add_argument(
        "--progress-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="print a status line to stderr this often while something changes (0: never)",
    )
    p.add_argument(
        "--page-size",
        default="4096",
        help="with --pid: the page size to serve (4096, or 0x200000 for hugetlb-backed memory)",
    )
    p.add_argument(
        "--poison",
        help="poison list of image offsets: JSON poison file, journal, or text list with an "
        "`# address-space: image-offset` line",
    )
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default 127.0.0.1:0)")
    p.add_argument(
        "--token-file",
        help="file holding the shared token (at least 16 bytes): connections are authenticated "
        "and encrypted with it",
    )
    p.add_argument(
        "--tls-dir",
        metavar="DIR",
        help="x509 directory as QEMU's tls-creds-x509 (ca-cert.pem, server-cert.pem, "
        "server-key.pem): mutual TLS 1.3 instead of the token",
    )
    p.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="serve plaintext without a token (loopback addresses only; for testing)",
    )
    p.add_argument(
        "--background",
        choices=("auto", "idle", "normal"),
        default="auto",
        help="how background streams are scheduled: auto (default: idle priority, so fault "
        "requests never wait for a CPU behind them, and normal priority while a busy host "
        "would starve them), idle, or normal",
    )
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser(
        "tls-certs",
        help="a test CA and certificates for mutual TLS between serve and a destination",
        description="Write a test CA, a server certificate (for the names given and localhost) "
        "and a client certificate, signed by it, to DIR in the layout of QEMU's "
        "tls-creds-x509: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, "
        "client-key.pem (and ca-key.pem). For trying --tls-dir; a site with a PKI issues its own.",
    )
    from pagewarden import tls_certs

    tls_certs.add_arguments(p)
    p.set_defaults(func=tls_certs.run)
    p = sub.add_parser(
        "kvm-check",
        help="a real vCPU (/dev/kvm) reads guest pages served by pagewarden, some poisoned",
        description="Run a tiny real-mode guest on /dev/kvm over guest memory served by a "
        "Handler with poisoned pages; report what the guest read, how the VMM learned of the "
        "poison and whether a machine check can be injected. Exit status 0 only when every "
        "clean page read right and no poison leaked.",
    )
    from pagewarden import kvm_check

    kvm_check.add_arguments(p)
    p.set_defaults(func=_cmd_kvm_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    words = list(sys.argv[1:] if argv is None else argv)
    first = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(first if first in _LEAN_COMMANDS else None)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        with _signals_unwind():
            return int(args.func(args))
    except pw.PagewardenError as e:
        print(f"pagewarden: error: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pagewarden: interrupted", file=sys.stderr)
        return 130
    except _Terminated as e:
        name = signal.Signals(e.signum).name
        print(f"pagewarden: terminated ({name})", file=sys.stderr)
        return 128 + e.signum


if __name__ == "__main__":
    sys.exit(main())
