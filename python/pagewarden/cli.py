"""The ``pagewarden`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import pagewarden as pw


def _cmd_demo(args: argparse.Namespace) -> int:
    from pagewarden import demo

    return 0 if demo.run(args).ok else 1


def _cmd_info(args: argparse.Namespace) -> int:
    caps = pw.capabilities()
    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: object, advice: str = "") -> None:
        rows.append((name, str(value), advice))

    row("kernel", caps["kernel_release"])
    row(
        "userfaultfd",
        "yes" if caps["userfaultfd"] else "no",
        "" if caps["userfaultfd"] else "see the open methods below",
    )
    for method, status in caps["open_methods"].items():
        advice = ""
        if status != "ok" and method == "/dev/userfaultfd":
            advice = "give this user read-write access to /dev/userfaultfd, or run as root"
        elif status != "ok":
            advice = "set vm.unprivileged_userfaultfd=1 or grant CAP_SYS_PTRACE"
        row(f"  open via {method}", status, advice)
    row("vm.unprivileged_userfaultfd", caps["unprivileged_userfaultfd"])
    row(
        "UFFDIO_POISON",
        "yes" if caps["poison"] else "no",
        "" if caps["poison"] else "needs Linux 6.6+",
    )
    row("MINOR mode (shmem / hugetlb)", f"{caps['minor_shmem']} / {caps['minor_hugetlbfs']}")
    free = caps["hugepages_2m_free"]
    row(
        "2 MiB hugepages (reserved / free)",
        f"{caps['hugepages_2m_total']} / {free}",
        "" if free else "echo 64 > /proc/sys/vm/nr_hugepages (as root) for hugetlb guests",
    )
    row("transparent hugepages", caps["transparent_hugepages"])
    row("/dev/kvm", caps["kvm"])
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    for name, value, advice in rows:
        line = f"{name.ljust(width)}  {value.ljust(vwidth)}"
        print(f"{line}  -> {advice}" if advice else line.rstrip())
    print("features: " + ", ".join(caps["features"]))
    return 0


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
    p = sub.add_parser("info", help="what this machine offers (userfaultfd, hugepages, KVM)")
    p.set_defaults(func=_cmd_info)
    from pagewarden import poison_tools

    poison_tools.add_parser(sub)
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
