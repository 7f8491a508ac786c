"""The ``pagewarden`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

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


def _cmd_firecracker(args: argparse.Namespace) -> int:
    import logging

    from pagewarden import firecracker, poison_tools

    logging.basicConfig(level=logging.INFO, format="pagewarden: %(message)s")
    poison = poison_tools.load_any(args.poison)[0] if args.poison else None
    result = firecracker.serve(
        args.socket,
        args.memfile,
        poison=poison,
        prefetch=args.prefetch,
        kill_peer_on_error=args.kill_peer,
        poison_journal=args.poison_journal,
        accept_timeout=args.accept_timeout,
        on_ready=lambda: print(f"listening on {args.socket}", flush=True),
    )
    st = result.stats
    print(
        f"Firecracker pid {result.peer.pid} exited: {st.get('faults', 0)} faults, "
        f"{st.get('pages_prefetched', 0)} pages prefetched, "
        f"{st.get('pages_poisoned', 0)} poison markers installed"
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from pagewarden import demo

    parser = argparse.ArgumentParser(
        prog="pagewarden",
        description="Serve guest memory through userfaultfd; keep memory poison across moves.",
    )
    parser.add_argument("--version", action="version", version=f"pagewarden {pw.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("demo", help="a whole local post-copy, verified byte for byte")
    demo.add_arguments(p)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser(
        "bench", help="pagewarden against a C handler, a pure-Python handler and the kernel floor"
    )
    from pagewarden import bench

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
        "from MEMFILE; pages of --poison are answered with UFFDIO_POISON. Exits when "
        "Firecracker does.",
    )
    p.add_argument("socket", help="Unix socket path Firecracker connects to (created 0600)")
    p.add_argument("memfile", help="the snapshot's guest memory file")
    p.add_argument("--poison", help="poison list: JSON poison file, journal or text list")
    p.add_argument("--poison-journal", help="append poison found while serving to this journal")
    p.add_argument(
        "--prefetch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bring in every page in the background (default: on)",
    )
    p.add_argument(
        "--kill-peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="kill Firecracker on a fatal error rather than leave it on bad memory (default: on)",
    )
    p.add_argument("--accept-timeout", type=float, default=None, help="seconds to wait for it")
    p.set_defaults(func=_cmd_firecracker)
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except pw.PagewardenError as e:
        print(f"pagewarden: error: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pagewarden: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
