"""pagewarden's threads never take the signals a process is stopped or steered with.

The kernel hands a signal sent to a process to any one thread that does not block it. Python
runs handlers only in the main thread, and a main thread asleep in ``select()`` is not woken when
another thread took the signal, so a signal landing on one of pagewarden's threads could leave
Ctrl-C or SIGTERM unanswered (or, at its default action, end the process mid-way). Every thread
pagewarden starts, native or Python, blocks them from its first instruction.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

from conftest import SETTLE_LIMIT

from pagewarden._quiet import PROCESS_SIGNALS

# A process that starts one of each kind of thread pagewarden has: handlers on a private and on
# a shared engine, a policy dispatcher, a poison journal writer, a page server with a
# connection, a remote source's receivers and supervisor, and the log bridge. It prints the
# blocked-signal mask of every thread, then sleeps in select() until SIGINT.
CHILD = textwrap.dedent(
    """
    import json, os, select, sys, tempfile, time
    import pagewarden as pw

    class Quiet(pw.Policy):
        def on_poison(self, guest_addresses):
            pass

    size = 64 * 4096
    image = bytes(range(256)) * (size // 256)
    tmp = tempfile.mkdtemp()
    with pw.serve(image, insecure_no_token=True) as server:
        host, port = server.address
        source = pw.RemoteSource(f"{host}:{port}", insecure_no_token=True)
        engine = pw.Engine(threads=2)
        handlers = [
            pw.Handler(pw.GuestMemory.anonymous(size), source, prefetch=False,
                       policy=Quiet(), poison_journal=os.path.join(tmp, "journal")),
            pw.Handler(pw.GuestMemory.anonymous(size), pw.ZeroSource(), engine=engine),
        ]
        for h in handlers:
            h.start()
        assert handlers[0].wait(timeout=0) is False
        # A native thread names itself once it runs: on a busy machine, wait for all of them.
        expected = sys.argv[1].split(",")
        deadline = time.monotonic() + 30
        while True:
            masks = {}
            for task in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{task}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                masks[f"{fields['Name'].strip()} ({task})"] = [
                    int(task) == os.getpid(), int(fields["SigBlk"].strip(), 16)]
            names = " ".join(masks)
            if all(e in names for e in expected) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        try:
            print(json.dumps(masks), flush=True)  # the parent sends SIGINT once it reads this
            select.select([], [], [], 60)
            print("not interrupted", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        for h in handlers:
            h.close()
        source.close()
        engine.close()
    """
)

# Names as /proc shows them (15 characters).
THREADS = (
    "pagewarden-uffd",
    "pw-engine-0",
    "pw-engine-1",
    "pagewarden-jour",
    "pagewarden-acce",
    "pagewarden-serv",
    "pagewarden-urge",
    "pagewarden-bulk",
    "pagewarden-remo",
)


def test_no_pagewarden_thread_takes_process_signals_and_ctrl_c_reaches_main(uffd: None) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, ",".join(THREADS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first, proc.stderr.read() if proc.stderr else ""
        masks = json.loads(first)
        names = " ".join(masks)
        for expected in THREADS:
            assert expected in names, f"no {expected} thread among {names}"
        assert sum(1 for _, (is_main, _) in masks.items() if not is_main) >= 10, names
        for thread, (is_main, mask) in masks.items():
            for sig in PROCESS_SIGNALS:
                taken = not mask & (1 << (sig - 1))
                if is_main:
                    assert taken, f"the main thread was left blocking {sig.name}"
                else:
                    assert not taken, f"{thread} can take {sig.name}: SigBlk {mask:#x}"
            for sig in (signal.SIGBUS, signal.SIGSEGV):
                assert not mask & (1 << (sig - 1)), f"{thread} blocks {sig.name}"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=SETTLE_LIMIT)
    finally:
        proc.kill()
        proc.wait()
    assert out.strip() == "interrupted", err
    assert proc.returncode == 0, err
