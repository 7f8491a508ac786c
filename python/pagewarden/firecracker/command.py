"""``pagewarden firecracker SOCKET MEMFILE`` and ``pagewarden-firecracker-handler SOCKET MEMFILE``.

The second takes exactly the two arguments of Firecracker's example handlers, so tooling written
for those can start pagewarden unchanged; options for it come from the environment variable
``PAGEWARDEN_FIRECRACKER_OPTS`` (shell words, as on the command line).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Sequence

import pagewarden as pw
from pagewarden import poison_tools
from pagewarden.demo import parse_size
from pagewarden.firecracker import access_order
from pagewarden.firecracker.handshake import SocketAccess, parse_mode, parse_owner
from pagewarden.firecracker.layout import (
    DEFAULT_FAMILY,
    FAMILIES,
    pages_holding,
    parse_addresses,
)
from pagewarden.firecracker.serve import PREFETCH_MODES, serve

log = logging.getLogger("pagewarden.firecracker")
OPTS_ENV = "PAGEWARDEN_FIRECRACKER_OPTS"


class UsageProblem(Exception):
    """Bad input to the command: the message says what was wrong and what to do (exit 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments and options."""
    p.add_argument("socket", help="Unix socket path Firecracker connects to (created 0600)")
    p.add_argument("memfile", help="the snapshot's guest memory file; - with --source")
    g = p.add_argument_group("poison (never one address space taken for the other)")
    g.add_argument(
        "--poison",
        metavar="FILE",
        help="poison list that says its address space: a JSON poison file or journal "
        "(memory-file offsets), a guest-physical JSON list, or a text list with an "
        "`# address-space: guest-physical|image-offset` line",
    )
    g.add_argument(
        "--poison-gpa",
        action="append",
        default=[],
        metavar="ADDR",
        help="a guest-physical address to poison (as a guest's kernel log or an MCE report "
        "names it; hex or decimal; the page holding it; repeatable)",
    )
    g.add_argument(
        "--poison-gpa-file",
        action="append",
        default=[],
        metavar="FILE",
        help="a list of guest-physical addresses (text, one per line, or a guest-physical "
        "JSON list; repeatable)",
    )
    g.add_argument(
        "--layout",
        choices=sorted(FAMILIES),
        default=DEFAULT_FAMILY,
        help="Firecracker's x86-64 memory layout, to translate guest-physical addresses: "
        + "; ".join(f"{f.name}: {f.versions}" for f in FAMILIES.values())
        + f" (default {DEFAULT_FAMILY})",
    )
    g.add_argument("--poison-journal", help="append poison found while serving to this journal")
    g = p.add_argument_group("prefetch")
    g.add_argument(
        "--prefetch",
        choices=PREFETCH_MODES,
        default="all",
        help="all: every page in the background (default); none: on demand only; "
        "working-set: the pages of --prefetch-order, the rest on demand",
    )
    g.add_argument(
        "--no-prefetch",
        dest="prefetch",
        action="store_const",
        const="none",
        help="the same as --prefetch none",
    )
    g.add_argument(
        "--fault-around",
        type=parse_size,
        default=pw.DEFAULT_FAULT_AROUND,
        metavar="SIZE",
        help="a fault that continues a sequential read brings in the pages after it too, in a "
        "window that doubles from 64K up to SIZE while the guest reads on; 0 turns it off "
        f"(default {pw.DEFAULT_FAULT_AROUND >> 20}M)",
    )
    g.add_argument(
        "--prefetch-order",
        metavar="FILE",
        help="an access order written by --record-access: prefetched first",
    )
    g.add_argument(
        "--record-access",
        metavar="FILE",
        help="write the order of the guest's first faults here when Firecracker exits",
    )
    g = p.add_argument_group("who may connect (the jailer)")
    g.add_argument(
        "--socket-owner",
        metavar="UID[:GID]",
        help="give the socket to this user (and group): the uid the jailer runs Firecracker as",
    )
    g.add_argument(
        "--socket-mode", metavar="MODE", default="0600", help="socket permissions (0600)"
    )
    g.add_argument(
        "--allow-uid",
        action="append",
        type=int,
        metavar="UID",
        help="refuse a peer (SO_PEERCRED) whose uid is not one of these (repeatable)",
    )
    p.add_argument(
        "--kill-peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="kill Firecracker on a refusal or fatal error; with --no-kill-peer its memory is "
        "fenced instead (SIGBUS) (default: on)",
    )
    p.add_argument("--accept-timeout", type=float, default=None, help="seconds to wait for it")
    g = p.add_argument_group("restarts (a handler that can die)")
    g.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep what a successor needs here: started again with the same DIR while "
        "Firecracker lives, pagewarden takes its uffd back and carries on; SIGTERM detaches "
        "(the guest waits) instead of fencing",
    )
    g.add_argument(
        "--keeper",
        action="store_true",
        help="with --state-dir: a keeper process holds the uffd too, for a VMM that closes its "
        "own after the handshake (Firecracker keeps it; not needed there)",
    )
    g.add_argument(
        "--abandon",
        action="store_true",
        help="with --state-dir: give the session's microVM up (take its uffd back, fence what "
        "is missing, unregister) and exit",
    )
    g = p.add_argument_group("pages from a page server")
    g.add_argument(
        "--source",
        metavar="HOST:PORT",
        help="fetch pages from this page server (serving the memory file) instead of MEMFILE",
    )
    g.add_argument(
        "--token-file",
        help="with --source: file holding the page server's token (the stream is authenticated "
        "and encrypted with it)",
    )
    g.add_argument(
        "--tls-dir",
        metavar="DIR",
        help="with --source: x509 directory as QEMU's tls-creds-x509 (ca-cert.pem, "
        "client-cert.pem, client-key.pem): mutual TLS 1.3 instead of the token",
    )
    g.add_argument(
        "--tls-server-name",
        metavar="NAME",
        help="with --tls-dir: the name the page server's certificate must carry (default: the "
        "host of --source)",
    )
    g.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="with --source: a loopback page server started without a token, plaintext (for "
        "testing)",
    )
    g.add_argument(
        "--give-up-after",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="with --source: fail (and kill Firecracker) when the page server stays unreachable "
        "this long (default: 30)",
    )
    g.add_argument(
        "--background",
        choices=("auto", "idle", "normal"),
        help="with --source: how background data is received: auto (default: idle priority, "
        "so faults never wait for a CPU behind it, and normal priority while a busy host would "
        "starve it), idle, or normal",
    )


def _check_source_options(args: argparse.Namespace) -> None:
    if args.source is None:
        if args.memfile == "-":
            raise UsageProblem("MEMFILE - means pages come from a page server: add --source")
        if args.token_file is not None or args.insecure_no_token or args.tls_dir is not None:
            raise UsageProblem("--token-file, --tls-dir and --insecure-no-token are for --source")
        if args.background is not None:
            raise UsageProblem(
                "--background is for --source (a memory file is read on the fault path)"
            )
        if not os.path.isfile(args.memfile):
            raise UsageProblem(
                f"memory file {args.memfile} does not exist or is not a regular file"
            )
        if not os.access(args.memfile, os.R_OK):
            raise UsageProblem(f"memory file {args.memfile} is not readable by this user")
        return
    if args.memfile != "-":
        raise UsageProblem(
            f"with --source, pages come from the page server: give MEMFILE as -, not "
            f"{args.memfile} (the server serves the memory file)"
        )
    if args.token_file is None and args.tls_dir is None and not args.insecure_no_token:
        raise UsageProblem(
            "--source needs --token-file (the file holding the page server's token) or "
            "--tls-dir (an x509 directory) "
            "(--insecure-no-token only for a loopback server started with it, for testing)"
        )
    if args.insecure_no_token and (args.token_file is not None or args.tls_dir is not None):
        raise UsageProblem(
            "--insecure-no-token turns protection off: not with --token-file or --tls-dir"
        )
    if args.tls_server_name is not None and args.tls_dir is None:
        raise UsageProblem("--tls-server-name is for --tls-dir")


def _poison_options(
    args: argparse.Namespace,
) -> tuple[pw.PoisonSet | None, pw.PoisonSet | None]:
    """The poison given, as (memory-file offsets, guest-physical addresses)."""
    offsets: pw.PoisonSet | None = None
    gpas: pw.PoisonSet | None = None

    def join(a: pw.PoisonSet | None, b: pw.PoisonSet) -> pw.PoisonSet:
        if a is None:
            return b
        size = min(a.page_size, b.page_size)
        return a.with_page_size(size) | b.with_page_size(size)

    if args.poison:
        offsets, gpas = poison_tools.load_by_space(args.poison, "--poison")
    for path in args.poison_gpa_file:
        gpas = join(
            gpas,
            poison_tools.load_in_space(
                path, poison_tools.GUEST_PHYSICAL, assume=poison_tools.GUEST_PHYSICAL
            ),
        )
    if args.poison_gpa:
        # A machine-check report names a byte: the page that holds it is poisoned.
        gpas = join(gpas, pages_holding(parse_addresses(args.poison_gpa)))
    return offsets, gpas


def _access(args: argparse.Namespace) -> SocketAccess:
    uid, gid = parse_owner(args.socket_owner) if args.socket_owner else (None, None)
    return SocketAccess(
        owner_uid=uid,
        owner_gid=gid,
        mode=parse_mode(args.socket_mode),
        allowed_uids=None if args.allow_uid is None else frozenset(args.allow_uid),
    )


class _LogFormat(logging.Formatter):
    """``pagewarden: MESSAGE``, with ``warning:`` or ``error:`` before what is more than news."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno <= logging.INFO else f"{record.levelname.lower()}: "
        return f"pagewarden: {level}{record.getMessage()}"


def run(args: argparse.Namespace) -> int:
    """Runs the command; returns the exit status."""

    def error(message: str) -> None:
        print(f"pagewarden firecracker: error: {message}", file=sys.stderr)

    from pagewarden.cli import _read_token, _UsageProblem

    try:
        _check_source_options(args)
        token = (
            _read_token(
                args.token_file,
                remedy="use the page server's token file (the one given to `pagewarden serve "
                "--token-file`)",
            )
            if args.token_file is not None
            else None
        )
        offsets, gpas = _poison_options(args)
        access = _access(args)
        if args.keeper and args.state_dir is None:
            raise UsageProblem("--keeper needs --state-dir: successors find the keeper there")
        if args.abandon and args.state_dir is None:
            raise UsageProblem("--abandon needs --state-dir: the session to give up")
        if args.prefetch == "working-set" and args.prefetch_order is None:
            raise UsageProblem(
                "--prefetch working-set needs --prefetch-order FILE (written by an earlier "
                "restore's --record-access FILE)"
            )
    except (UsageProblem, _UsageProblem, pw.ConfigurationError, pw.PoisonFileError) as e:
        error(str(e.strerror if isinstance(e, OSError) and e.strerror else e))
        return 2
    handler = logging.StreamHandler()
    handler.setFormatter(_LogFormat())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    if args.abandon:
        from pagewarden.firecracker.serve import abandon

        print(abandon(args.state_dir))
        return 0
    from pagewarden import kvm_check

    # A warning when there is poison to install; a note otherwise (a fence after a refusal
    # would not protect the guest either).
    kvm_check.tell_delivery(log, offsets is not None or gpas is not None or args.source is not None)
    with contextlib.ExitStack() as stack:
        source = None
        if args.source is not None:
            # Connect before the socket exists: a page server that cannot be reached stops us
            # before Firecracker can connect, so its snapshot load fails and no microVM runs.
            try:
                source = stack.enter_context(
                    pw.RemoteSource(
                        args.source,
                        token,
                        give_up_after=args.give_up_after,
                        insecure_no_token=args.insecure_no_token,
                        background=args.background or "auto",
                        tls_dir=args.tls_dir,
                        tls_server_name=args.tls_server_name,
                    )
                )
            except pw.ConfigurationError as e:
                error(str(e.strerror or e))  # names the address, or the token rule broken
                return 2
            except pw.PagewardenError as e:
                error(f"cannot use the page server at {args.source}: {e.strerror or e}")
                return 1
            if args.insecure_no_token:
                log.warning(
                    "page server %s: plaintext, no authentication and no encryption "
                    "(--insecure-no-token, loopback only; for testing)",
                    source.address,
                )
            log.info(
                "page server %s: %d MiB of guest memory in %d KiB pages, %d poisoned pages",
                source.address,
                source.memory_size >> 20,
                source.page_size >> 10,
                len(source.poison_set()),
            )
        memory_size = source.memory_size if source is not None else os.stat(args.memfile).st_size
        try:
            order = (
                access_order.load(args.prefetch_order, memory_size) if args.prefetch_order else None
            )
        except pw.ConfigurationError as e:
            error(str(e.strerror or e))
            return 2
        try:
            result = serve(
                args.socket,
                None if source is not None else args.memfile,
                poison=offsets,
                poison_gpa=gpas,
                layout=args.layout,
                access=access,
                prefetch=args.prefetch,
                prefetch_order=order,
                record_access=args.record_access is not None,
                fault_around=args.fault_around,
                kill_peer_on_error=args.kill_peer,
                poison_journal=args.poison_journal,
                state_dir=args.state_dir,
                keeper=args.keeper,
                accept_timeout=args.accept_timeout,
                on_ready=lambda: print(f"listening on {args.socket}", flush=True),
                source=source,
            )
        except (pw.ConfigurationError, pw.GuestAddressError) as e:
            if getattr(e, "peer_stopped", None) is not None:
                raise  # refused after Firecracker connected: exit 1
            # Refused before anything listened (Firecracker's connect fails, nothing hangs), or
            # a successor that will not take over (the guest keeps waiting).
            error(str(e.strerror or e))
            return 2
        if args.record_access is not None and result.access_log is not None:
            page_size = result.regions[0].page_size
            access_order.save(args.record_access, result.access_log, page_size)
            log.info("recorded %d first faults in %s", len(result.access_log), args.record_access)
        st = result.stats
        print(
            ("(re-attached) " if result.resumed else "")
            + f"Firecracker pid {result.peer.pid} exited: {st.get('faults', 0)} faults, "
            f"{st.get('pages_prefetched', 0)} pages prefetched, "
            f"{st.get('pages_poisoned', 0)} poison markers installed"
            + (
                f"; {source.stats()['bytes_received'] >> 20} MiB from {source.address}"
                if source is not None
                else ""
            )
        )
    return 0


def example_main(argv: Sequence[str] | None = None) -> int:
    """``pagewarden-firecracker-handler SOCKET MEMFILE``: Firecracker's example handlers'
    command line; more options from ``PAGEWARDEN_FIRECRACKER_OPTS``."""
    from pagewarden import cli

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or any(a.startswith("-") for a in args):
        print(
            "usage: pagewarden-firecracker-handler SOCKET MEMFILE\n"
            "  the two arguments of Firecracker's example UFFD handlers; other options of "
            f"`pagewarden firecracker` go in ${OPTS_ENV}",
            file=sys.stderr,
        )
        return 2
    try:
        extra = shlex.split(os.environ.get(OPTS_ENV, ""))
    except ValueError as e:
        print(f"pagewarden-firecracker-handler: ${OPTS_ENV}: {e}", file=sys.stderr)
        return 2
    return cli.main(["firecracker", *extra, "--", *args])
