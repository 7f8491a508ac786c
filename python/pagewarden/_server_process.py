"""``pagewarden serve`` in a child process, for ``demo --remote`` and the remote benchmarks.

The page server runs in its own process so that it shares neither the GIL nor the CPU accounting
of the destination it serves, as on two hosts; it talks to the destination over loopback TCP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Self

from pagewarden import PagewardenError

# Pins the child before anything else runs, so every thread the server starts inherits the CPU.
_PINNED_MAIN = (
    "import os, sys\n"
    "cpu = int(sys.argv.pop(1))\n"
    "if cpu >= 0:\n"
    "    os.sched_setaffinity(0, {cpu})\n"
    "from pagewarden.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def write_token(path: Path) -> bytes:
    """Writes a fresh random token (32 bytes, hex) to ``path`` (mode 0600) and returns it."""
    token = os.urandom(32).hex().encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token + b"\n")
    return token


class ServerProcess:
    """``pagewarden serve IMAGE`` on 127.0.0.1 (any free port) in a child process, optionally
    pinned to one CPU. ``address`` is "host:port"; ``stop()`` sends SIGTERM and returns the
    server's summary line. A context manager.

    The stream is protected with the token (Noise), or with mutual TLS when ``tls_dir`` is
    given, or not at all when ``token_file`` is None (``--insecure-no-token``, loopback)."""

    def __init__(
        self,
        image: Path,
        token_file: Path | None,
        poison_file: Path | None = None,
        cpu: int | None = None,
        tls_dir: Path | None = None,
        background: str | None = None,
    ) -> None:
        args = [sys.executable, "-c", _PINNED_MAIN, str(-1 if cpu is None else cpu), "serve"]
        args += [str(image), "--listen", "127.0.0.1:0"]
        if tls_dir is not None:
            args += ["--tls-dir", str(tls_dir)]
        elif token_file is not None:
            args += ["--token-file", str(token_file)]
        else:
            args += ["--insecure-no-token"]
        if background is not None:
            args += ["--background", background]
        if poison_file is not None:
            args += ["--poison", str(poison_file)]
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.summary = ""
        assert self.process.stdout is not None
        first = self.process.stdout.readline().strip()
        if not first.startswith("listening on "):
            self.process.kill()
            _, err = self.process.communicate(timeout=10)
            raise PagewardenError(
                2, f"pagewarden serve did not start (printed {first!r}): {err.strip()[-500:]}"
            )
        self.address = first.removeprefix("listening on ")

    def stop(self) -> str:
        """Stops the server (SIGTERM) and returns its last line of output, the summary."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            out, _ = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        lines = [line for line in (out or "").splitlines() if line.strip()]
        if lines:
            self.summary = lines[-1]
        return self.summary

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
