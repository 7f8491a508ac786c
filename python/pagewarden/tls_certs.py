"""``pagewarden tls-certs DIR [--hostname NAME ...] [--days N] [--force]``: a test CA, and a
server and a client certificate signed by it, laid out as QEMU's ``tls-creds-x509`` directory,
for trying mutual TLS between ``pagewarden serve --tls-dir`` and a destination's ``--tls-dir``.

A site with a PKI issues its own certificates into the same five files (docs/protocol.md,
"Certificates"); this command is for trying it, not for production keys.
"""

from __future__ import annotations

import argparse
import sys

import pagewarden as pw


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's options."""
    p.add_argument("directory", metavar="DIR", help="where to write the files (created if missing)")
    p.add_argument(
        "--hostname",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP address the page server is dialled by (repeatable; localhost, "
        "127.0.0.1 and ::1 are always included)",
    )
    p.add_argument(
        "--days", type=int, default=365, help="how long the certificates are valid (default 365)"
    )
    p.add_argument("--force", action="store_true", help="replace an existing set in DIR")


def run(args: argparse.Namespace) -> int:
    """Writes the set; exit status 0, or 2 with the reason on bad input or an existing set."""
    if args.days < 1:
        print("pagewarden tls-certs: error: --days must be at least 1", file=sys.stderr)
        return 2
    try:
        written = pw.make_test_certificates(
            args.directory, args.hostname, days=args.days, force=args.force
        )
    except pw.ConfigurationError as e:
        print(f"pagewarden tls-certs: error: {e.strerror or e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    print(
        "copy ca-cert.pem, server-cert.pem and server-key.pem to the source host (pagewarden "
        "serve --tls-dir), ca-cert.pem, client-cert.pem and client-key.pem to the destination "
        "(--tls-dir); keep ca-key.pem apart",
        file=sys.stderr,
    )
    return 0
