"""A keeper: a small process that holds a reference to a VMM's userfaultfd, so that the guest's
registration outlives the handler.

When the last reference to a userfaultfd closes, the kernel drops the registration, and every
page nobody served reads as zeros: a silent corruption, not a hang. Firecracker keeps its own
uffd open for the VM's life, so it needs no keeper; a VMM that closes its uffd after handing it
over, or a Python daemon that embeds a Handler over another process's memory, does. The keeper
holds one duplicate, ignores the signals a service manager stops a handler with, and exits when
the process it watches (the VMM) does. A successor takes the uffd from the keeper exactly as from
Firecracker (``pidfd_getfd``), so re-attach has one path.

Why a process of its own rather than systemd's file-descriptor store: it works wherever
pagewarden runs (under systemd, another supervisor or none), and it keeps the successor's path
the same as for Firecracker. Under systemd the unit needs ``KillMode=process`` (or the keeper
dies with the handler's cgroup on a restart); see docs/firecracker.md.

Run as ``python -m pagewarden.keeper WATCH_PID`` with the uffd as descriptor
``$PAGEWARDEN_KEEPER_FD``; ``Keeper.start`` does that.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass

import pagewarden as pw

FD_ENV = "PAGEWARDEN_KEEPER_FD"


@dataclass(frozen=True)
class Keeper:
    """A running keeper."""

    pid: int
    """The keeper's pid: a successor takes the uffd from it."""
    start_time: int
    """Its start time (``/proc/PID/stat`` field 22), so a reused pid is never taken for it."""

    @classmethod
    def start(cls, uffd: int, watch_pid: int) -> Keeper:
        """Starts a keeper holding a duplicate of ``uffd`` until process ``watch_pid`` exits.
        It runs in a session of its own, so that a signal to the handler's process group
        does not reach it. ConfigurationError if it cannot start."""
        from pagewarden import _native

        env = {**os.environ, FD_ENV: str(uffd)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "pagewarden.keeper", str(watch_pid)],
            pass_fds=[uffd],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        proc.stdout.close()
        if ready.strip() != b"holding":
            proc.kill()
            proc.wait()
            raise pw.ConfigurationError(
                errno.ECHILD, f"the uffd keeper did not start (it said {ready!r})"
            )
        # Not waited for: it outlives this process by design (init reaps it).
        proc.returncode = 0
        return cls(proc.pid, _native._process_start_time(proc.pid))


def main(argv: list[str] | None = None) -> int:
    """The keeper process: holds ``$PAGEWARDEN_KEEPER_FD`` until WATCH_PID exits."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit() or FD_ENV not in os.environ:
        print("usage: python -m pagewarden.keeper WATCH_PID (uffd in $PAGEWARDEN_KEEPER_FD)")
        return 2
    # A service manager's stop, a terminal going away, Ctrl-C in the handler's terminal: none
    # of them may drop the registration. SIGKILL can, which is why it is its own session.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    uffd = int(os.environ[FD_ENV])
    os.set_inheritable(uffd, False)
    try:
        pidfd = os.pidfd_open(int(args[0]))
    except OSError as e:
        print(f"cannot watch process {args[0]}: {e.strerror}", flush=True)
        return 1
    print("holding", flush=True)
    os.close(1)
    select.select([pidfd], [], [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
