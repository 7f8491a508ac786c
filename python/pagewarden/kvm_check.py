"""``pagewarden kvm-check``: what a real vCPU sees of a poisoned page on this host.

A minimal VMM of pagewarden's own runs a tiny real-mode guest on ``/dev/kvm``. Its guest memory
is served by a :class:`pagewarden.Handler` (no prefetch, so the vCPU faults every page in) from a
built-in image, with some data pages poisoned. The guest reads the first and last word of every
data page and reports them through port I/O; the VMM notes how KVM tells it about each poisoned
page (SIGBUS, a memory-fault exit, an MMIO exit, ...), answers that load with all ones and lets
the guest go on. Then it injects a machine check (``KVM_X86_SET_MCE``) if KVM supports it.

Exit status 0 only when every clean page read right and no poisoned byte reached the guest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

import pagewarden as pw
from pagewarden import _native

DEFAULT_PAGES = 32


def _page_list(text: str) -> list[int]:
    try:
        pages = [int(part, 0) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a list of page indices: {text!r} (use e.g. 3,17,30)"
        ) from None
    if not pages:
        raise argparse.ArgumentTypeError("give at least one page index")
    return pages


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The check's options (all optional)."""
    p.add_argument(
        "--pages",
        type=int,
        default=DEFAULT_PAGES,
        help=f"data pages the guest reads, 16 to 224 (default {DEFAULT_PAGES})",
    )
    p.add_argument(
        "--poison",
        type=_page_list,
        default=None,
        metavar="I,J,...",
        help="indices of the data pages to poison (default: three spread over the range)",
    )
    p.add_argument(
        "--timeout", type=float, default=10.0, help="seconds before the vCPU is stopped (10)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def check(
    pages: int = DEFAULT_PAGES, poisoned: Sequence[int] | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """Runs the check and returns its report (see ``pagewarden._native.kvm_check``)."""
    return _native.kvm_check(
        pages=pages, poisoned=None if poisoned is None else list(poisoned), timeout=timeout
    )


@dataclass(frozen=True)
class PoisonDelivery:
    """How this host's KVM tells a VMM that a vCPU touched a poisoned page."""

    protects: bool | None
    """True: the VMM learns of the poison (SIGBUS or a fault exit) and the guest never reads
    it; False: the read becomes an MMIO exit, which a VMM such as Firecracker answers with
    zeros, so poison cannot protect a guest here; None: not known (no usable /dev/kvm)."""
    how: str
    """``sigbus``, ``memory_fault_exit``, ``efault``, ``mmio_exit`` or ``unknown``."""
    summary: str
    """One sentence for an operator, with what to do."""


MMIO_SUMMARY = (
    "this host's KVM turns a vCPU's read of a poisoned page into an MMIO exit (as nested KVM "
    "such as kvm_pvm does) instead of a SIGBUS: Firecracker answers such a read with zeros, "
    "so poison cannot protect a guest on this host; restore poisoned VMs on hosts where "
    "`pagewarden info` says poison reaches the VMM as SIGBUS"
)


def poison_delivery(timeout: float = 5.0) -> PoisonDelivery:
    """Runs a small kvm-check (a few milliseconds) and says how poison reaches a VMM here."""
    try:
        report = check(pages=16, poisoned=[5], timeout=timeout)
    except pw.PagewardenError as e:
        return PoisonDelivery(None, "unknown", f"not known: KVM check failed ({e.strerror or e})")
    kinds = [o["how"] for o in report["poison_observed_as"]]
    if "mmio_exit" in kinds:
        return PoisonDelivery(False, "mmio_exit", MMIO_SUMMARY)
    for how, text in (
        ("sigbus", "SIGBUS to the vCPU thread (Firecracker exits with status 149)"),
        ("memory_fault_exit", "a KVM memory-fault exit at the guest-physical address"),
        ("efault", "KVM_RUN failing with EFAULT"),
    ):
        if how in kinds:
            return PoisonDelivery(True, how, f"poison reaches the VMM as {text}")
    return PoisonDelivery(None, "unknown", "not known: the check's vCPU never read the poison")


def tell_delivery(logger: logging.Logger, warn: bool = True) -> PoisonDelivery:
    """Logs, when this host's KVM turns poisoned reads into MMIO (poison cannot protect a
    guest here), a warning (``warn``) or a note; returns what was found."""
    delivery = poison_delivery()
    if delivery.protects is False:
        logger.log(logging.WARNING if warn else logging.INFO, "%s", delivery.summary)
    return delivery


def _hex_list(values: Sequence[int], limit: int = 6) -> str:
    shown = ", ".join(f"{v:#x}" for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def describe_observations(observations: Sequence[dict[str, Any]]) -> list[str]:
    """One line per way the VMM learned of poison, with how many loads it covered."""
    lines: list[str] = []
    kinds: Counter[str] = Counter()
    for o in observations:
        how = o["how"]
        if how == "sigbus":
            kinds[f"SIGBUS {o['si_code_name']} (si_code {o['si_code']}) at the host address"] += 1
        elif how == "memory_fault_exit":
            kinds[f"KVM_RUN {o['errno_name']} with KVM_EXIT_MEMORY_FAULT at the gpa"] += 1
        elif how == "efault":
            kinds["KVM_RUN EFAULT without fault information"] += 1
        elif how == "mmio_exit":
            kinds["KVM_EXIT_MMIO (a read) at the poisoned guest physical address"] += 1
        else:
            kinds[how] += 1
    for text, count in kinds.items():
        lines.append(f"{text} ({count} load{'s' if count != 1 else ''})")
    return lines or ["nothing"]


def _mce_line(mce: dict[str, Any]) -> str:
    if not mce["supported"]:
        return "not supported (no KVM_CAP_MCE)"
    head = f"supported (up to {mce['max_banks']} banks; MCG_CAP {mce['mcg_cap']:#x})"
    if mce["delivered"]:
        return (
            f"{head}; injected and delivered: the guest's #MC handler read MCi_ADDR "
            f"{mce['guest_mci_addr']:#x}"
        )
    for step in ("setup", "cr4_mce", "injected"):
        if mce[step] != "ok":
            return f"{head}; {step}: {mce[step]}"
    return f"{head}; injected, but the guest's #MC handler did not run"


def format_report(r: dict[str, Any]) -> str:
    """The human-readable table."""
    poisoned = r["poisoned_pages"]
    clean = r["data_pages"] - len(poisoned)
    if not r["vcpu_ran"]:
        ran = "no"
    elif r["guest_completed"]:
        ran = "yes, to its final HLT"
    else:
        ran = f"yes, stopped: {r['stop_reason']}"
    exits = r["exits"]
    ran += f" ({exits['total']} exits in {r['elapsed_s'] * 1000:.1f} ms)"
    observed = describe_observations(r["poison_observed_as"])
    h = r["handler"]
    rows: list[tuple[str, str]] = [
        ("kernel", r["kernel_release"]),
        (
            "KVM",
            (
                f"API {r['kvm_api_version']}, memory-fault exits "
                f"{'available' if r['memory_fault_info'] else 'not available'}"
            ),
        ),
        ("vCPU ran", ran),
        ("pages checked", f"{r['pages_checked']} of {r['data_pages']}"),
        ("pages correct", f"{r['pages_correct']} of {clean} clean pages"),
        (
            "poisoned pages",
            (
                f"{len(poisoned)} ({_hex_list(poisoned)}); "
                f"the VMM observed {r['poisoned_pages_observed']} of them"
            ),
        ),
        ("poison data leaks", str(r["poison_data_leaks"])),
        ("poison observed as", observed[0]),
        *(("", line) for line in observed[1:]),
        ("machine check injection", _mce_line(r["mce"])),
        ("poison intact after run", "yes" if r["poison_intact_after_run"] else "NO"),
        (
            "handler",
            (
                f"{h['faults']} faults served, {h['pages_copied']} pages copied, "
                f"{h['pages_poisoned']} poison markers"
            ),
        ),
    ]
    for w in r["wrong_pages"]:
        got = ", ".join(f"{v:#010x}" for v in w["got"])
        want = ", ".join(f"{v:#010x}" for v in w["expected"])
        rows.append(("wrong page", f"{w['guest_address']:#x}: got {got}, want {want}"))
    for e in r["errors"]:
        rows.append(("error", e))
    width = max(len(k) for k, _ in rows)
    lines = [
        (
            f"pagewarden kvm-check: a real vCPU reads {r['data_pages']} guest pages served by "
            f"userfaultfd, {len(poisoned)} of them poisoned"
        ),
        "",
    ]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    verdict = (
        "OK: every clean page right, no poisoned byte reached the guest" if r["ok"] else "FAILED"
    )
    lines += ["", verdict]
    return "\n".join(lines)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Runs the check, prints the table (or JSON with ``--json``); returns the exit status."""
    out = sys.stdout if out is None else out
    try:
        report = check(args.pages, args.poison, args.timeout)
    except pw.PagewardenError as e:
        if not args.json:
            raise
        error = {"ok": False, "error": str(e.strerror or e), "error_type": type(e).__name__}
        print(json.dumps(error, indent=2), file=out)
        return 1
    if args.json:
        print(json.dumps(report, indent=2), file=out)
    else:
        print(format_report(report), file=out)
        if any(o["how"] == "mmio_exit" for o in report["poison_observed_as"]):
            print(f"pagewarden kvm-check: warning: {MMIO_SUMMARY}", file=sys.stderr)
    return 0 if report["ok"] else 1
