"""`pagewarden firecracker` as operators run it: guest-physical poison on a guest above the MMIO
gap, checks before Firecracker can connect, the jailer's socket, working-set restores, the
example handlers' command line and the host's KVM poison delivery. Against the Firecracker
double (tests/firecracker_double.py), which behaves as the real one does."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PAGE, make_image, pagewarden_process
from test_firecracker import Served, run_double, start_double

import pagewarden as pw
from pagewarden import cli, firecracker, kvm_check
from pagewarden.firecracker import access_order

GiB = 1 << 30


def test_guest_physical_poison_above_the_gap_lands_on_the_right_page(
    uffd: None, tmp_path: Path
) -> None:
    """A guest of 3 GiB + 16 pages: Firecracker registers [0, 3 GiB) and the rest, which the
    guest sees from 4 GiB on. Guest-physical 4 GiB + 2 pages is memory-file offset 3 GiB + 2
    pages; the same number given as an offset would be past the end of the file."""
    low = 3 * GiB
    memfile = tmp_path / "mem.snap"
    tail = make_image(16 * PAGE, seed=3)
    with open(memfile, "wb") as f:  # sparse: only the last 16 pages hold data
        f.truncate(low)
        f.seek(low)
        f.write(tail)
    gpa = 4 * GiB + 2 * PAGE
    offset = low + 2 * PAGE
    sock = tmp_path / "uffd.sock"
    served = Served(sock, memfile, poison_gpa=pw.PoisonSet([gpa]), prefetch="none")
    out = tmp_path / "report.json"
    touch = [0, low + PAGE, offset, low + 3 * PAGE]
    done = run_double(
        sock,
        out,
        "--sizes",
        f"{low // PAGE},16",
        "--touch-pages",
        ",".join(map(str, touch)),
    )
    assert done.returncode == 0, done.stderr
    served.join()
    assert served.error is None, served.error
    report = json.loads(out.read_text())
    sigbus = [g for region in report["regions"] for g, _, _ in region["sigbus"]]
    assert sigbus == [offset]
    second = report["regions"][1]["checksums"]
    for page in (low + PAGE, low + 3 * PAGE):
        want = pw.page_checksum(tail[page - low : page - low + PAGE])
        assert second[str(page)] == want
    assert served.result is not None and served.result.poison is not None
    assert list(served.result.poison) == [offset]

    # The same address as a file offset is refused before anything listens.
    with pytest.raises(pw.GuestAddressError, match="past the end of guest memory"):
        firecracker.serve(tmp_path / "other.sock", memfile, poison=pw.PoisonSet([gpa]))
    assert not (tmp_path / "other.sock").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--poison-gpa", "0x100000"], "past the end of RAM (0x10000)"),
        (["--poison-gpa", "page-two"], "is not an address"),
        (["--poison", "{bare}"], "does not say which addresses it holds"),
        (["--poison", "{offsets_past_end}"], "past the end of guest memory"),
        (["--poison-gpa-file", "{offsets_past_end}"], "image-offset addresses, guest-physical"),
        (["--prefetch", "working-set"], "needs --prefetch-order"),
        (["--prefetch-order", "{order_past_end}"], "past the end of guest memory"),
        (["--socket-mode", "0666"], "every user on the host"),
        (["--socket-mode", "rw"], "not an octal mode"),
        (["--socket-owner", "no-such-user-here"], "no user named"),
    ],
)
def test_cli_refuses_before_firecracker_can_connect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    """Whatever can be checked before accept is, and the socket never exists: Firecracker's
    connect fails (its snapshot load errors out) instead of its restore hanging."""
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(bytes(16 * PAGE))
    bare = tmp_path / "bare.txt"
    bare.write_text("0x1000\n")
    offsets_past_end = tmp_path / "offsets.json"
    pw.PoisonSet([64 * PAGE]).save(offsets_past_end)
    order_past_end = tmp_path / "order.json"
    access_order.save(order_past_end, [0, 32 * PAGE], PAGE)
    names = {"bare": bare, "offsets_past_end": offsets_past_end, "order_past_end": order_past_end}
    sock = tmp_path / "uffd.sock"
    argv = [a.format(**names) for a in args]
    assert cli.main(["firecracker", str(sock), str(memfile), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pagewarden firecracker: error: ") and needle in err, err
    assert not sock.exists()


def test_unreadable_or_odd_memory_file_is_refused_before_listening(tmp_path: Path) -> None:
    odd = tmp_path / "odd.snap"
    odd.write_bytes(bytes(4097))
    with pytest.raises(pw.ConfigurationError, match="not a whole number of 4 KiB pages"):
        firecracker.serve(tmp_path / "s.sock", odd)
    with pytest.raises(pw.ConfigurationError, match="No such file"):
        firecracker.serve(tmp_path / "s.sock", tmp_path / "missing.snap")
    assert not (tmp_path / "s.sock").exists()


def test_jailer_socket_owner_mode_and_allowed_uids(uffd: None, tmp_path: Path) -> None:
    """The jailer runs Firecracker as an unprivileged uid: the socket is given to it (root
    chowns), with the mode asked, and a peer of another uid is refused (and killed)."""
    if os.getuid() != 0:
        pytest.skip("chown to another user needs root")
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(make_image(16 * PAGE, seed=9))
    sock = tmp_path / "uffd.sock"
    access = firecracker.SocketAccess(
        owner_uid=1234, owner_gid=2345, mode=0o660, allowed_uids=frozenset({1234})
    )
    served = Served(sock, memfile, access=access)
    st = sock.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 2345, 0o660)
    # The double runs as root (uid 0): connected, then refused and killed.
    done = run_double(sock, tmp_path / "out.json", "--sizes", "16")
    served.join()
    assert done.returncode == -signal.SIGKILL
    assert "uid 0, which is not allowed to connect (allowed: 1234)" in str(served.error)

    # A peer that really is that uid is served: the double creates its uffd as root and then
    # drops to the jailer's uid to connect, as a jailed Firecracker's identity is at connect.
    with tempfile.TemporaryDirectory(dir="/tmp") as jail:
        os.chown(jail, 1234, 2345)
        sock = Path(jail) / "uffd.sock"
        out = Path(jail) / "out.json"
        served = Served(sock, memfile, access=access)
        done = run_double(sock, out, "--sizes", "16", "--as-uid", "1234:2345")
        served.join()
        assert done.returncode == 0, done.stderr
        assert served.error is None, served.error
        assert served.result is not None and served.result.peer.uid == 1234
        checksums = json.loads(out.read_text())["regions"][0]["checksums"]
        assert len(checksums) == 16


def _wait_until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_working_set_is_recorded_then_prefetched_and_nothing_else(
    uffd: None, tmp_path: Path
) -> None:
    """Restore 1 (on demand) records the order of first faults; restore 2 prefetches exactly
    those pages before the guest runs (they then never fault) and leaves the rest on demand."""
    pages = 64
    image = make_image(pages * PAGE, seed=13)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(image)
    working_set = [40 * PAGE, 3 * PAGE, 4 * PAGE, 5 * PAGE, 17 * PAGE]
    touch = ",".join(map(str, working_set))

    sock = tmp_path / "uffd.sock"
    # Fault-around off: the recorded order is exactly the pages touched.
    served = Served(sock, memfile, prefetch="none", record_access=True, fault_around=0)
    done = run_double(sock, tmp_path / "r1.json", "--sizes", str(pages), "--touch-pages", touch)
    assert done.returncode == 0, done.stderr
    served.join()
    assert served.result is not None and served.result.access_log is not None
    assert sorted(served.result.access_log) == sorted(working_set)
    recorded = tmp_path / "ws.json"
    access_order.save(recorded, served.result.access_log, PAGE)
    order = access_order.load(recorded, pages * PAGE)
    assert sum(length for _, length in order) == len(working_set) * PAGE

    handlers: list[pw.Handler] = []
    go = tmp_path / "go"
    served = Served(
        sock,
        memfile,
        prefetch="working-set",
        prefetch_order=order,
        fault_around=0,
        on_started=lambda h, _r: handlers.append(h),
    )
    out = tmp_path / "r2.json"
    extra = 9 * PAGE  # not in the working set: on demand
    double = start_double(
        sock, out, "--sizes", str(pages), "--touch-pages", f"{touch},{extra}", "--wait-for", str(go)
    )
    try:
        _wait_until(lambda: handlers)
        _wait_until(lambda: handlers[0].stats()["pages_prefetched"] == len(working_set))
        time.sleep(0.1)  # nothing more arrives
        assert handlers[0].stats()["pages_prefetched"] == len(working_set)
        go.touch()
        _, err = double.communicate(timeout=60)
    finally:
        double.kill()
        double.wait()
    served.join()
    assert double.returncode == 0, err
    assert served.result is not None
    assert served.result.stats["pages_prefetched"] == len(working_set)
    assert served.result.stats["faults"] == 1  # only the page outside the working set
    checksums = json.loads(out.read_text())["regions"][0]["checksums"]
    for g in [*working_set, extra]:
        assert checksums[str(g)] == pw.page_checksum(image[g : g + PAGE])


def test_cli_records_and_replays_and_the_example_command_line(uffd: None, tmp_path: Path) -> None:
    """`--record-access` then `--prefetch working-set --prefetch-order`, the second through
    `pagewarden-firecracker-handler SOCKET MEMFILE` with its options in the environment."""
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(make_image(32 * PAGE, seed=17))
    sock = tmp_path / "uffd.sock"
    recorded = tmp_path / "ws.json"
    touch = ",".join(str(p * PAGE) for p in (7, 8, 20))
    proc = pagewarden_process(
        "firecracker", str(sock), str(memfile), "--prefetch", "none", "--fault-around", "0",
        "--record-access",
        str(recorded),
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().startswith("listening on")
    assert run_double(sock, tmp_path / "o1.json", "--sizes", "32", "--touch-pages", touch)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "recorded 3 first faults" in err
    assert json.loads(recorded.read_text())["ranges"] == [[7 * PAGE, 2], [20 * PAGE, 1]]

    script = Path(sys.executable).with_name("pagewarden-firecracker-handler")
    assert script.exists(), "the console script is not installed"
    env = {
        **os.environ,
        "PAGEWARDEN_FIRECRACKER_OPTS": f"--prefetch working-set --prefetch-order {recorded}",
    }
    proc = subprocess.Popen(
        [str(script), str(sock), str(memfile)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().startswith("listening on")
    done = run_double(sock, tmp_path / "o2.json", "--sizes", "32", "--touch-pages", touch)
    assert done.returncode == 0, done.stderr
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "prefetch working-set" in err
    # The working set is prefetched while the guest runs: each page either way, none twice,
    # nothing else prefetched.
    m = re.search(r"exited: (\d+) faults, (\d+) pages prefetched", stdout)
    assert m is not None, stdout
    assert int(m.group(1)) + int(m.group(2)) == 3, stdout
    usage = subprocess.run([str(script), str(sock)], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "SOCKET MEMFILE" in usage.stderr


def test_host_poison_delivery_is_told(kvm: None, capsys: pytest.CaptureFixture[str]) -> None:
    """`pagewarden info` and `kvm-check` say how a vCPU's read of a poisoned page reaches the
    VMM here, as the check's own observations show."""
    report = kvm_check.check(pages=16, poisoned=[5])
    kinds = {o["how"] for o in report["poison_observed_as"]}
    delivery = kvm_check.poison_delivery()
    assert delivery.how in kinds
    assert delivery.protects is (delivery.how != "mmio_exit")
    cli.main(["info"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("poison reaches a KVM guest"))
    assert delivery.how in line
    assert ("NO PROTECTION" in line) is (delivery.protects is False)


def test_firecracker_warns_when_this_host_cannot_protect(
    uffd: None, kvm: None, tmp_path: Path
) -> None:
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(bytes(8 * PAGE))
    cannot = kvm_check.poison_delivery().protects is False
    for poison, warned in ((["--poison-gpa", "0x1000"], True), ([], False)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pagewarden", "firecracker", str(tmp_path / "s.sock"),
             str(memfile), "--accept-timeout", "0.1", *poison],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        _, err = proc.communicate(timeout=60)
        line = next((ln for ln in err.splitlines() if "cannot protect a guest" in ln), None)
        assert (line is not None) is cannot, err
        if line is not None:
            assert line.startswith("pagewarden: warning: ") is warned, line


def test_serve_thread_is_not_left_behind(uffd: None, tmp_path: Path) -> None:
    """A serve() whose peer never connects ends at its accept timeout."""
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(bytes(8 * PAGE))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            firecracker.serve(tmp_path / "s.sock", memfile, accept_timeout=0.2)
        except BaseException as e:  # noqa: BLE001 - inspected below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert isinstance(errors[0], pw.ProtocolError) and "within 0.2 s" in str(errors[0])
