"""A handler that can die: `pagewarden firecracker --state-dir` killed (SIGKILL) or stopped
(SIGTERM) at random moments while the Firecracker double's two vCPU-like threads fault its
pages in, with and without prefetch, then started again with the same command. Every page must
end byte-exact, every poisoned page must SIGBUS, no thread may stay blocked, and a balloon
REMOVE (while no handler runs, or after the restart) must read zero."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PAGE, make_image, pagewarden_process
from test_firecracker import start_double

import pagewarden as pw
from pagewarden.firecracker import session

PAGES = 2048
POISONED = [7 * PAGE, 1000 * PAGE, 2047 * PAGE]
CLEAN_BALLOON = 12 * PAGE
ROUNDS = int(os.environ.get("PAGEWARDEN_RESTART_ROUNDS", "6"))


def _handler(
    sock: Path, memfile: Path, state: Path, poison: Path, *extra: str
) -> subprocess.Popen[str]:
    return pagewarden_process(
        "firecracker", str(sock), str(memfile), "--state-dir", str(state), "--poison",
        str(poison), "--accept-timeout", "60", *extra,
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.002)


def _check_report(out: Path, image: bytes) -> None:
    report = json.loads(out.read_text())
    (region,) = report["regions"]
    sigbus = sorted(g for g, _, _ in region["sigbus"])
    assert sigbus == POISONED, "exactly the poisoned pages raise SIGBUS"
    checksums = {int(k): v for k, v in region["checksums"].items()}
    wrong = [
        hex(g)
        for g in range(0, PAGES * PAGE, PAGE)
        if g not in POISONED and checksums.get(g) != pw.page_checksum(image[g : g + PAGE])
    ]
    assert not wrong, f"pages with wrong bytes: {wrong[:8]}"
    balloon = report["balloon"]
    assert balloon[str(CLEAN_BALLOON)]["checksum"] == pw.page_checksum(bytes(PAGE))
    assert balloon[str(POISONED[0])]["checksum"] is None
    assert len(balloon[str(POISONED[0])]["sigbus"]) == 1


@pytest.mark.parametrize("prefetch", ["all", "none"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_at_random_moments_and_restarted(
    uffd: None, tmp_path: Path, prefetch: str, sig: signal.Signals
) -> None:
    rng = random.Random(f"{prefetch}-{sig.name}")
    image = make_image(PAGES * PAGE, seed=77)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(image)
    poison = tmp_path / "poison.json"
    pw.PoisonSet(POISONED).save(poison)
    reattached = 0
    for round_ in range(ROUNDS):
        work = tmp_path / f"round{round_}"
        work.mkdir()
        sock, state, out, go = work / "uffd.sock", work / "state", work / "out.json", work / "go"
        extra = ["--prefetch", prefetch]
        first = _handler(sock, memfile, state, poison, *extra)
        double = start_double(
            str(sock),
            str(out),
            "--sizes",
            str(PAGES),
            "--balloon",
            f"{CLEAN_BALLOON},{POISONED[0]}",
            "--balloon-after",
            str(go),
        )
        second = None
        try:
            _wait_for(state / session.STATE_FILE, first)
            delay = rng.uniform(0, 0.06)
            time.sleep(delay)
            first.send_signal(sig)
            _, err1 = first.communicate(timeout=30)
            if sig == signal.SIGTERM:
                assert first.returncode in (143, 0), err1
            # Half the rounds inflate the balloon while no handler runs: the REMOVE waits in
            # the uffd for the successor.
            balloon_early = rng.random() < 0.5
            if balloon_early:
                go.touch()
            if double.poll() is not None:
                # The guest finished before the kill landed: nothing left to take over.
                assert double.returncode == 0, double.communicate()
                assert "exited:" in first.stdout.read() if first.stdout else False, err1
                continue
            second = _handler(sock, memfile, state, poison, *extra)
            go.touch()
            _, double_err = double.communicate(timeout=90)
            try:
                stdout2, err2 = second.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                second.kill()
                stdout2, err2 = second.communicate()
                pytest.fail(
                    f"round {round_}: the successor did not exit: {err2}; the guest ended "
                    f"{double.returncode} ({double_err}); the first handler {first.returncode} "
                    f"({err1})"
                )
            assert double.returncode == 0, (round_, delay, double_err, err2)
            assert second.returncode == 0, (round_, delay, err2)
            assert "re-attached to Firecracker pid" in err2, err2
            reattached += 1
            assert stdout2.startswith("(re-attached) Firecracker pid"), stdout2
            _check_report(out, image)
            # The session is over: its state is gone, its poison journal stays.
            assert not (state / session.STATE_FILE).exists()
            assert sorted(pw.PoisonSet.load(state / session.POISON_JOURNAL)) == POISONED
        finally:
            for p in (first, double, second):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.communicate()
    # The kills must land while the guest still needs its handler, or this tests nothing.
    assert reattached >= ROUNDS * 2 // 3, f"only {reattached} of {ROUNDS} rounds re-attached"


def test_a_restart_finds_the_peer_gone_and_cleans_up(uffd: None, tmp_path: Path) -> None:
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(make_image(64 * PAGE, seed=1))
    state = session.StateDir(tmp_path / "state")
    # A session whose Firecracker was this short-lived process.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    start = session.start_time_of(gone.pid)
    gone.wait()
    assert start is not None
    state.save(
        session.SessionState(
            peer_pid=gone.pid, peer_start_time=start, peer_uid=0, peer_gid=0,
            uffd_holder_pid=gone.pid, uffd_holder_start_time=start, regions=[],
            memfile=str(memfile), memory_size=64 * PAGE, source=None, prefetch="all",
            handler_pid=1,
        )
    )  # fmt: skip
    (tmp_path / "state" / session.REMOVED_JOURNAL).write_bytes(b"stale")
    proc = pagewarden_process(
        "firecracker", str(tmp_path / "s.sock"), str(memfile), "--state-dir",
        str(tmp_path / "state"), "--accept-timeout", "0.2",
    )  # fmt: skip
    _, err = proc.communicate(timeout=60)
    assert f"(Firecracker pid {gone.pid}) is gone: cleaning its state up" in err
    assert "no Firecracker connected" in err  # then it listened for a new one
    assert not (tmp_path / "state" / session.STATE_FILE).exists()
    assert not (tmp_path / "state" / session.REMOVED_JOURNAL).exists()


def test_state_dir_is_locked_and_a_mismatched_command_is_refused(
    uffd: None, tmp_path: Path
) -> None:
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(make_image(64 * PAGE, seed=2))
    other = tmp_path / "other.snap"
    other.write_bytes(make_image(32 * PAGE, seed=3))
    state_dir = tmp_path / "state"
    sock = tmp_path / "uffd.sock"
    poison = tmp_path / "poison.json"
    pw.PoisonSet([]).save(poison)
    # Fault-around off: exactly the two touched pages are in when the guest is given up.
    first = _handler(sock, memfile, state_dir, poison, "--prefetch", "none", "--fault-around", "0")
    go = tmp_path / "go"
    double = start_double(
        str(sock),
        str(tmp_path / "out.json"),
        "--sizes",
        "64",
        "--touch-first",
        "2",
        "--wait-for",
        str(go),
    )
    try:
        assert double.stdout is not None and double.stdout.readline().strip() == "waiting"
        # Another handler on the same state directory is refused while the first serves.
        busy = pagewarden_process("firecracker", str(tmp_path / "x.sock"), str(memfile),
                                  "--state-dir", str(state_dir))  # fmt: skip
        _, err = busy.communicate(timeout=60)
        assert busy.returncode == 2 and "in use by another pagewarden" in err, err
        first.kill()
        first.communicate()
        # A successor started with another memory file is refused and leaves the VM waiting.
        wrong = _handler(sock, other, state_dir, poison)
        _, err = wrong.communicate(timeout=60)
        assert wrong.returncode == 2 and "not the memory file" in err, err
        assert double.poll() is None, "the guest must still be waiting"
        # --abandon gives it up the old way: its missing pages raise SIGBUS, nothing hangs.
        abandon = pagewarden_process("firecracker", str(sock), str(memfile), "--state-dir",
                                     str(state_dir), "--abandon")  # fmt: skip
        stdout, err = abandon.communicate(timeout=60)
        assert abandon.returncode == 0, err
        assert "abandoned Firecracker pid" in stdout
        go.touch()
        _, err = double.communicate(timeout=60)
        assert double.returncode == 0, err
        report = json.loads((tmp_path / "out.json").read_text())
        (region,) = report["regions"]
        assert sorted(g for g, _, _ in region["sigbus"]) == [i * PAGE for i in range(2, 64)]
        assert not (state_dir / session.STATE_FILE).exists()
    finally:
        for p in (first, double):
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.parametrize("keeper", [False, True], ids=["no-keeper", "keeper"])
def test_a_vmm_that_closes_its_uffd_needs_the_keeper(
    uffd: None, tmp_path: Path, keeper: bool
) -> None:
    """A VMM that keeps no reference to its uffd after the handshake: when the handler dies,
    the registration dies with it and unserved pages read as zeros (shown here, without a
    keeper). With --keeper a keeper process holds the uffd, the guest waits, and a successor
    takes the uffd from the keeper."""
    pages = 256
    image = make_image(pages * PAGE, seed=31)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(image)
    poison = tmp_path / "poison.json"
    pw.PoisonSet([]).save(poison)
    sock, state, out, go = (tmp_path / n for n in ("uffd.sock", "state", "out.json", "go"))
    # Fault-around off: pages past the four touched stay missing, to show what they read.
    extra = ["--prefetch", "none", "--fault-around", "0", *(["--keeper"] if keeper else [])]
    first = _handler(sock, memfile, state, poison, *extra)
    double = start_double(
        str(sock),
        str(out),
        "--sizes",
        str(pages),
        "--close-uffd",
        "--touch-first",
        "4",
        "--wait-for",
        str(go),
    )
    second = None
    try:
        assert double.stdout is not None and double.stdout.readline().strip() == "waiting"
        first.kill()
        first.communicate()
        saved = session.StateDir(state).load()
        assert saved is not None
        if keeper:
            assert saved.uffd_holder_pid != saved.peer_pid
            second = _handler(sock, memfile, state, poison, *extra)
        go.touch()
        _, err = double.communicate(timeout=60)
        assert double.returncode == 0, err
        checksums = json.loads(out.read_text())["regions"][0]["checksums"]
        zero = pw.page_checksum(bytes(PAGE))
        served = [
            checksums[str(g)] == pw.page_checksum(image[g : g + PAGE])
            for g in range(4 * PAGE, pages * PAGE, PAGE)
        ]
        if not keeper:
            # The silent-zeros case the keeper exists for.
            assert all(checksums[str(g)] == zero for g in range(4 * PAGE, pages * PAGE, PAGE))
            return
        assert second is not None
        _, err2 = second.communicate(timeout=60)
        assert second.returncode == 0 and "re-attached" in err2, err2
        assert all(served), "pages with wrong bytes after the keeper's hand-over"
        # The keeper ends with the VM it kept.
        deadline = time.monotonic() + 10
        while session.start_time_of(saved.uffd_holder_pid) == saved.uffd_holder_start_time:
            assert time.monotonic() < deadline, "the keeper outlived its VM"
            time.sleep(0.02)
    finally:
        for p in (first, double, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()


def test_a_successor_with_a_page_server_reconnects_and_asks_again(
    uffd: None, tmp_path: Path
) -> None:
    """A destination that re-attaches with --source connects to the page server anew and
    asks for what is still missing, as after a network outage; the server's poison stays."""
    pages = 128
    image = make_image(pages * PAGE, seed=53)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(image)
    token = b"restart-test-token-0123456789abcdef"
    token_file = tmp_path / "token"
    token_file.write_bytes(token)
    poisoned = [40 * PAGE]
    sock, state, out, go = (tmp_path / n for n in ("uffd.sock", "state", "out.json", "go"))
    with pw.serve(str(memfile), poison=pw.PoisonSet(poisoned), token=token) as server:
        assert server.address is not None
        host, port = server.address
        cmd = ["firecracker", str(sock), "-", "--source", f"{host}:{port}", "--token-file",
               str(token_file), "--state-dir", str(state), "--prefetch", "none"]  # fmt: skip
        first = pagewarden_process(*cmd)
        double = start_double(
            str(sock), str(out), "--sizes", str(pages), "--touch-first", "8", "--wait-for", str(go)
        )
        second = None
        try:
            assert double.stdout is not None and double.stdout.readline().strip() == "waiting"
            first.kill()
            first.communicate()
            second = pagewarden_process(*cmd)
            go.touch()
            _, err = double.communicate(timeout=60)
            assert double.returncode == 0, err
            stdout, err2 = second.communicate(timeout=60)
            assert second.returncode == 0 and "re-attached" in err2, err2
            assert f"from {host}:{port}" in stdout
        finally:
            for p in (first, double, second):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.communicate()
    (region,) = json.loads(out.read_text())["regions"]
    assert [g for g, _, _ in region["sigbus"]] == poisoned
    for g in range(0, pages * PAGE, PAGE):
        if g not in poisoned:
            assert region["checksums"][str(g)] == pw.page_checksum(image[g : g + PAGE])
