"""pagewarden as Firecracker's page-fault handler, against a test double of Firecracker
(tests/firecracker_double.py) that runs as its own process with its own uffd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import HUGE_PAGE, PAGE, SIGBUS_CODES, make_image, pagewarden_process

import pagewarden as pw
from pagewarden import cli, firecracker

DOUBLE = Path(__file__).with_name("firecracker_double.py")
TOKEN = b"firecracker-test-token-0123456789"


class Served:
    """``firecracker.serve`` on a thread, so the test can run the double meanwhile."""

    def __init__(self, socket_path: Path, memfile: Path | None, **kwargs: Any) -> None:
        self.ready = threading.Event()
        self.result: firecracker.ServeResult | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = firecracker.serve(
                    socket_path, memfile, on_ready=self.ready.set, accept_timeout=60, **kwargs
                )
            except BaseException as e:  # noqa: BLE001 - inspected by the test
                self.error = e
            finally:
                self.ready.set()

        self.thread = threading.Thread(target=run, name="serve")
        self.thread.start()
        assert self.ready.wait(30)

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive(), "serve() did not return after the peer exited"


def _firecracker_cli(*args: str) -> subprocess.Popen[str]:
    return pagewarden_process("firecracker", *args)


def start_double(socket_path: str | Path, out: str | Path, *args: str) -> subprocess.Popen[str]:
    """The double in the background (its output captured as text): for tests that act while
    it runs (``--wait-for`` makes it print "waiting" and hold its guest back)."""
    return subprocess.Popen(
        [sys.executable, str(DOUBLE), str(socket_path), str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_double(socket_path: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DOUBLE), str(socket_path), str(out), *args],
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.parametrize("page_size", [PAGE, pytest.param(HUGE_PAGE, marks=pytest.mark.hugetlb)])
def test_restore_with_poison_and_balloon(uffd: None, tmp_path: Path, page_size: int) -> None:
    sizes = [6, 3] if page_size == HUGE_PAGE else [64, 32]
    total = sum(sizes) * page_size
    image = make_image(total, seed=41)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(image)
    # Poison in both regions, including the first page of the second one.
    poisoned = [2 * page_size, sizes[0] * page_size, (sizes[0] + 2) * page_size]
    clean_balloon = 4 * page_size
    balloon = [clean_balloon, poisoned[0]]
    sock = tmp_path / "uffd.sock"
    served = Served(sock, memfile, poison=pw.PoisonSet(poisoned, page_size=page_size))
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    out = tmp_path / "report.json"
    done = run_double(
        sock,
        out,
        "--page-size",
        str(page_size),
        "--sizes",
        ",".join(map(str, sizes)),
        "--balloon",
        ",".join(map(str, balloon)),
    )
    assert done.returncode == 0, done.stderr
    served.join()
    assert served.error is None, served.error
    result = served.result
    assert result is not None
    assert [r.size for r in result.regions] == [n * page_size for n in sizes]
    assert result.peer.pid > 0

    report = json.loads(out.read_text())
    offset = 0
    for region, n in zip(report["regions"], sizes, strict=True):
        checksums = {int(k): v for k, v in region["checksums"].items()}
        sigbus = {g: (host_offset, code) for g, host_offset, code in region["sigbus"]}
        for gpa in range(offset, offset + n * page_size, page_size):
            if gpa in poisoned:
                assert gpa in sigbus, f"poisoned page {gpa:#x} did not SIGBUS"
                assert sigbus[gpa][0] == gpa - offset, "SIGBUS at the wrong address"
                assert sigbus[gpa][1] in (2, 4)
            else:
                assert checksums[gpa] == pw.page_checksum(image[gpa : gpa + page_size]), (
                    f"page {gpa:#x} has wrong bytes"
                )
        offset += n * page_size
    after = report["balloon"]
    assert after[str(clean_balloon)]["checksum"] == pw.page_checksum(bytes(page_size))
    assert after[str(poisoned[0])]["checksum"] is None
    assert len(after[str(poisoned[0])]["sigbus"]) == 1
    assert result.stats["remove_events"] >= 1
    assert result.poison is not None and sorted(result.poison) == poisoned


REFUSED_HANDSHAKES = [
    ("bad-json", "not valid JSON"),
    ("no-fd", "exactly one descriptor"),
    ("two-fds", "exactly one descriptor"),
    ("three-fds", "secret-hiding"),
    ("overlap", "overlap in file offsets"),
    ("past-file", "past the end of the memory file"),
    ("page-size", "page size 8192 is not supported"),
]


def _refused(
    tmp_path: Path, *double_args: str, memfile_pages: int = 16, **serve_kwargs: Any
) -> tuple[Served, subprocess.CompletedProcess[str], Path]:
    """Serves the double, which is refused after it connected; returns how both ended."""
    tmp_path.mkdir(exist_ok=True)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(make_image(memfile_pages * PAGE, seed=5))
    sock = tmp_path / "uffd.sock"
    served = Served(sock, memfile, **serve_kwargs)
    out = tmp_path / "out.json"
    done = run_double(sock, out, "--sizes", "8,8", *double_args)
    served.join()
    assert not sock.exists(), "the socket was left behind"
    return served, done, out


@pytest.mark.parametrize(("handshake", "needle"), REFUSED_HANDSHAKES)
def test_refused_handshake_kills_the_peer(
    uffd: None, tmp_path: Path, handshake: str, needle: str
) -> None:
    """A refusal after Firecracker connected never leaves it hung: the double, which goes on
    to touch its memory as Firecracker's restore does, is killed (a pidfd opened at accept)."""
    served, done, _ = _refused(tmp_path, "--handshake", handshake, "--memfile-size", str(16 * PAGE))
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr)
    assert isinstance(served.error, pw.ProtocolError), served.error
    assert needle in str(served.error)
    assert "was killed" in str(served.error)


@pytest.mark.parametrize(
    ("handshake", "needle"),
    [h for h in REFUSED_HANDSHAKES if h[0] != "no-fd"],
)
def test_refused_handshake_fences_a_peer_that_may_not_be_killed(
    uffd: None, tmp_path: Path, handshake: str, needle: str
) -> None:
    """Where the peer may not be killed, its memory is fenced: the pages it touches raise
    SIGBUS (never zeros, never a hang), also when the regions were never understood."""
    served, done, out = _refused(
        tmp_path,
        "--handshake",
        handshake,
        "--memfile-size",
        str(16 * PAGE),
        kill_peer_on_error=False,
    )
    assert done.returncode == 0, done.stderr
    assert isinstance(served.error, pw.ProtocolError), served.error
    assert needle in str(served.error) and "fenced" in str(served.error)
    report = json.loads(out.read_text())
    touched = [g for region in report["regions"] for g, _, _ in region["sigbus"]]
    assert sorted(touched) == [0, 7 * PAGE, 8 * PAGE, 15 * PAGE]
    assert all(not region["checksums"] for region in report["regions"]), "a page read as data"


def test_refusals_of_a_good_handshake_kill_the_peer(
    uffd: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other refusals after accept: a peer uid not on the allow-list, poison in no region
    Firecracker registered, guest-physical poison whose layout the handshake contradicts, and
    any exception at all on the way to serving."""
    other = os.getuid() + 1
    cases: list[tuple[str, dict[str, Any], str]] = [
        (
            "uid",
            {"access": firecracker.SocketAccess(allowed_uids=frozenset({other}))},
            "not allowed",
        ),
        # The memory file is 24 pages; Firecracker registers 16 of them.
        ("poison", {"poison": pw.PoisonSet([20 * PAGE])}, "in no region"),
    ]
    for name, kwargs, needle in cases:
        served, done, _ = _refused(tmp_path / name, memfile_pages=24, **kwargs)
        assert done.returncode == -signal.SIGKILL, (name, done.stderr)
        assert needle in str(served.error), (name, served.error)
    # One region of 16 pages in the layout; the handshake sends two of 8.
    # (The layout check is the same for any size: its own tests cover big guests.)
    served, done, _ = _refused(tmp_path / "layout", poison_gpa=pw.PoisonSet([PAGE]))
    assert done.returncode == -signal.SIGKILL
    assert "lays out memory differently" in str(served.error)

    def broken(*_args: Any, **_kwargs: Any) -> pw.Handler:
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(pw, "Handler", broken)
    served, done, _ = _refused(tmp_path / "exception")
    assert done.returncode == -signal.SIGKILL
    assert isinstance(served.error, RuntimeError)


def test_parse_regions_messages() -> None:
    ok = [{"base_host_virt_addr": 0x10000, "size": 0x2000, "offset": 0, "page_size_kib": 4096}]
    regions = firecracker.parse_regions(json.dumps(ok).encode(), 0x2000)
    assert regions == [firecracker.GuestRegionMapping(0x10000, 0x2000, 0, 4096)]
    # Neither page-size field: 4 KiB.
    legacy = [{"base_host_virt_addr": 0x10000, "size": 0x2000, "offset": 0}]
    assert firecracker.parse_regions(json.dumps(legacy).encode(), 0x2000)[0].page_size == 4096
    cases: list[tuple[Any, str]] = [
        ({}, "expected a JSON array"),
        ([], "empty"),
        ([{"size": 4096, "offset": 0}], "region 0: field `base_host_virt_addr` is missing"),
        ([{**ok[0], "size": "big"}], "region 0: field `size` must be a non-negative integer"),
        ([{**ok[0], "base_host_virt_addr": 0x10001}], "not aligned"),
        ([{**ok[0], "page_size": 2 << 20}], "disagree"),
        ([ok[0], {**ok[0], "offset": 0x2000, "page_size_kib": 2 << 20}], "not aligned"),
        ([ok[0], {**ok[0], "offset": 0x1000}], "overlap in host addresses"),
        ([{**ok[0], "size": 0}], "size is 0"),
    ]
    for payload, needle in cases:
        with pytest.raises(pw.ProtocolError, match=needle.replace("(", r"\(")):
            firecracker.parse_regions(json.dumps(payload).encode(), 1 << 30)
    with pytest.raises(pw.ProtocolError, match="UTF-8"):
        firecracker.parse_regions(b"\xff\xfe", 1 << 20)


def test_cli_serves_the_double(uffd: None, tmp_path: Path) -> None:
    image = make_image(24 * PAGE, seed=42)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(image)
    poison_file = tmp_path / "poison.txt"
    poison_file.write_text(f"# address-space: image-offset\n{5 * PAGE:#x}\n")
    sock = tmp_path / "uffd.sock"
    cli = _firecracker_cli(
        str(sock),
        str(memfile),
        "--poison",
        str(poison_file),
        # A byte inside page 9, as a machine-check report names it.
        "--poison-gpa",
        f"{9 * PAGE + 0x123:#x}",
        "--accept-timeout",
        "60",
    )
    assert cli.stdout is not None
    assert cli.stdout.readline().strip() == f"listening on {sock}"
    out = tmp_path / "report.json"
    # One region, as Firecracker lays out a guest below 3 GiB (the layout is checked).
    done = run_double(sock, out, "--sizes", "24")
    assert done.returncode == 0, done.stderr
    stdout, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 0, stderr
    assert "exited" in stdout and "Firecracker connected" in stderr
    report = json.loads(out.read_text())
    sigbus = [g for region in report["regions"] for g, _, _ in region["sigbus"]]
    assert sorted(sigbus) == [5 * PAGE, 9 * PAGE]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_fences_what_is_missing_and_lets_go_of_the_guest(
    uffd: None, tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM to the handler (a service manager stopping it), or SIGHUP (its terminal gone),
    must not leave the microVM hanging on its next missing page with nobody to answer: the
    handler fences what is still missing (SIGBUS, never zeros), lets go of the guest (pages
    already in keep their bytes, a balloon page reads zero instead of hanging) and exits with
    128 + the signal's number."""
    image = make_image(16 * PAGE, seed=7)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(image)
    sock = tmp_path / "uffd.sock"
    go = tmp_path / "go"
    cli = _firecracker_cli(
        str(sock),
        str(memfile),
        "--no-prefetch",
        "--fault-around",
        "0",
        "--accept-timeout",
        "60",
    )
    out = tmp_path / "report.json"
    double = start_double(
        sock,
        out,
        "--sizes",
        "16",
        "--touch-first",
        "4",
        "--balloon",
        str(PAGE),
        "--wait-for",
        str(go),
    )
    try:
        assert cli.stdout is not None and double.stdout is not None
        assert cli.stdout.readline().strip() == f"listening on {sock}"
        # The guest has its first four pages and waits.
        assert double.stdout.readline().strip() == "waiting"
        cli.send_signal(sig)
        _, err = cli.communicate(timeout=30)
        assert cli.returncode == 128 + sig, err
        assert f"terminated ({sig.name})" in err
        assert not sock.exists()
        # The guest runs on without its handler: every page it still lacked raises SIGBUS.
        go.touch()
        _, double_err = double.communicate(timeout=60)
    finally:
        for p in (cli, double):
            p.kill()
            p.wait()
    assert double.returncode == 0, double_err
    report = json.loads(out.read_text())
    (region,) = report["regions"]
    assert sorted(g for g, _, _ in region["sigbus"]) == [i * PAGE for i in range(4, 16)]
    for i in range(4):
        want = pw.page_checksum(image[i * PAGE : (i + 1) * PAGE])
        assert region["checksums"][str(i * PAGE)] == want, f"page {i} lost its bytes"
    assert report["balloon"][str(PAGE)]["checksum"] == pw.page_checksum(bytes(PAGE))


def test_socket_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("precious")
    with pytest.raises(pw.ConfigurationError, match="not a socket"):
        firecracker.listen(path)
    assert path.read_text() == "precious"


def _address(server: pw.Server) -> str:
    assert server.address is not None
    host, port = server.address
    return f"{host}:{port}"


@pytest.mark.parametrize("page_size", [PAGE, pytest.param(HUGE_PAGE, marks=pytest.mark.hugetlb)])
def test_cli_serves_the_double_from_a_page_server(
    uffd: None, tmp_path: Path, page_size: int
) -> None:
    sizes = [4, 2] if page_size == HUGE_PAGE else [16, 8]
    image = make_image(sum(sizes) * page_size, seed=43)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(image)
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN + b"\n")
    # The server knows 4 KiB pages: the last one of page 1, and the first of the second
    # region's page 1; the handler's own list adds page 3.
    server_poison = [2 * page_size - PAGE, (sizes[0] + 1) * page_size]
    local_poison = tmp_path / "poison.txt"
    local_poison.write_text(f"# address-space: image-offset\n{3 * page_size:#x}\n")
    poisoned = sorted({gpa - gpa % page_size for gpa in server_poison} | {3 * page_size})
    sock = tmp_path / "uffd.sock"
    with pw.serve(str(memfile), poison=pw.PoisonSet(server_poison), token=TOKEN) as server:
        handler = _firecracker_cli(
            str(sock),
            "-",
            "--source",
            _address(server),
            "--token-file",
            str(token_file),
            "--poison",
            str(local_poison),
            "--accept-timeout",
            "60",
        )
        assert handler.stdout is not None
        first = handler.stdout.readline().strip()
        if first != f"listening on {sock}":
            handler.kill()
            pytest.fail(f"the handler printed {first!r}; stderr: {handler.communicate()[1]}")
        out = tmp_path / "report.json"
        done = run_double(
            sock, out, "--page-size", str(page_size), "--sizes", ",".join(map(str, sizes))
        )
        assert done.returncode == 0, done.stderr
        stdout, stderr = handler.communicate(timeout=60)
        assert handler.returncode == 0, stderr
        assert server.stats()["pages_sent"] > 0
    assert f"page server {_address(server)}" in stderr
    assert f"from {_address(server)}" in stdout
    report = json.loads(out.read_text())
    offset = 0
    for region, n in zip(report["regions"], sizes, strict=True):
        checksums = {int(k): v for k, v in region["checksums"].items()}
        sigbus = {g: (host_offset, code) for g, host_offset, code in region["sigbus"]}
        pages = range(offset, offset + n * page_size, page_size)
        assert sorted(sigbus) == [gpa for gpa in pages if gpa in poisoned]
        for gpa in pages:
            if gpa in poisoned:
                assert sigbus[gpa][0] == gpa - offset, "SIGBUS at the wrong address"
                assert sigbus[gpa][1] in SIGBUS_CODES
            else:
                assert checksums[gpa] == pw.page_checksum(image[gpa : gpa + page_size]), (
                    f"page {gpa:#x} has wrong bytes"
                )
        offset += n * page_size


def test_regions_past_the_page_servers_memory_are_refused(uffd: None, tmp_path: Path) -> None:
    with (
        pw.serve(bytes(16 * PAGE), token=TOKEN) as server,
        pw.RemoteSource(_address(server), TOKEN) as source,
    ):
        sock = tmp_path / "uffd.sock"
        served = Served(sock, None, source=source)
        done = run_double(
            sock,
            tmp_path / "out.json",
            "--sizes",
            "8,8",
            "--handshake",
            "past-file",
            "--memfile-size",
            str(16 * PAGE),
        )
        served.join()
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert isinstance(served.error, pw.ProtocolError), served.error
    assert f"past the end of the page server's memory at {_address(server)}" in str(served.error)


def test_page_server_gone_for_good_kills_firecracker(uffd: None, tmp_path: Path) -> None:
    image = make_image(4096 * PAGE, seed=44)
    with pw.serve(image, token=TOKEN) as server:
        source = pw.RemoteSource(_address(server), TOKEN, give_up_after=0.5)
        with source:
            sock = tmp_path / "uffd.sock"
            # The server goes away as soon as the handler runs, while the guest still faults.
            served = Served(
                sock, None, source=source, prefetch=False, on_started=lambda h, r: server.close()
            )
            done = run_double(sock, tmp_path / "out.json", "--sizes", "4096")
            served.join()
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert isinstance(served.error, pw.SourceError), served.error


def test_memfile_and_source_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(pw.ConfigurationError, match="memfile is required"):
        firecracker.serve(tmp_path / "uffd.sock", "-")
    with (
        pw.serve(bytes(4 * PAGE), token=TOKEN) as server,
        pw.RemoteSource(_address(server), TOKEN) as source,
        pytest.raises(pw.ConfigurationError, match="both given"),
    ):
        firecracker.serve(tmp_path / "uffd.sock", tmp_path / "mem.snap", source=source)
    assert not (tmp_path / "uffd.sock").exists()


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (
            ["-", "--source", "{address}", "--token-file", "{tmp}/wrong"],
            1,
            "does not know the token",
        ),
        (["-", "--source", "{address}", "--token-file", "{tmp}/none"], 2, "cannot read"),
        (["-", "--source", "{address}", "--token-file", "{tmp}/short"], 2, "at least 16"),
        (["-", "--source", "{address}"], 2, "--source needs --token-file"),
        (["-", "--source", "127.0.0.1:{closed}", "--token-file", "{tmp}/token"], 1, "refused"),
        (["-", "--source", "127.0.0.1", "--token-file", "{tmp}/token"], 2, "address"),
        (["{tmp}/token", "--source", "{address}", "--token-file", "{tmp}/token"], 2, "as -"),
        (["-"], 2, "add --source"),
        (["{tmp}/token", "--background", "normal"], 2, "--background is for --source"),
    ],
)
def test_cli_source_problems_exit_before_listening(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], status: int, needle: str
) -> None:
    (tmp_path / "token").write_bytes(TOKEN + b"\n")
    (tmp_path / "wrong").write_bytes(b"not-the-page-servers-token\n")
    (tmp_path / "short").write_bytes(b"short\n")
    sock = tmp_path / "uffd.sock"
    with (
        pw.serve(bytes(4 * PAGE), token=TOKEN) as server,
        pw.serve(bytes(PAGE), token=TOKEN) as closed,
    ):
        closed_port = _address(closed).rsplit(":", 1)[1]
        closed.close()
        argv = [a.format(tmp=tmp_path, address=_address(server), closed=closed_port) for a in args]
        assert cli.main(["firecracker", str(sock), *argv]) == status
    err = capsys.readouterr().err
    assert err.startswith("pagewarden firecracker: error: ") and needle in err, err
    if any("{closed}" in a for a in args):
        assert f"127.0.0.1:{closed_port}" in err, "the message does not name the server"
    assert not sock.exists(), "the handler listened although it cannot serve"
