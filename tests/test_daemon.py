"""`pagewarden daemon`: sessions over HTTP on a Unix socket, one shared engine, per-session
metrics, drain, and sessions that survive a daemon restart (--state-dir); and the same session
manager embedded without HTTP. Against the Firecracker double."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import PAGE, make_image, pagewarden_process
from test_firecracker import start_double

import pagewarden as pw
from pagewarden.daemon import SessionError, SessionManager


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (as `curl --unix-socket` does)."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.unix_path)


def api(
    sock: Path, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, Any]:
    conn = UnixHTTPConnection(sock)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload) if payload else None


class Daemon:
    """`pagewarden daemon` in a child process."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.sock = tmp / "api.sock"
        self.proc = pagewarden_process("daemon", "--api-sock", str(self.sock), *extra)
        assert self.proc.stdout is not None
        self.metrics = None
        line = self.proc.stdout.readline().strip()
        if line.startswith("metrics on "):
            self.metrics = line.removeprefix("metrics on ")
            line = self.proc.stdout.readline().strip()
        if line != f"api on {self.sock}":
            self.proc.kill()
            pytest.fail(f"the daemon printed {line!r}: {self.proc.communicate()[1]}")

    def __call__(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return api(self.sock, method, path, body)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[str, str]:
        self.proc.send_signal(sig)
        return self.proc.communicate(timeout=60)


def _checksums_right(out: Path, image: bytes, poisoned: list[int]) -> None:
    (region,) = json.loads(out.read_text())["regions"]
    assert sorted(g for g, _, _ in region["sigbus"]) == poisoned
    for g, v in region["checksums"].items():
        assert v == pw.page_checksum(image[int(g) : int(g) + PAGE]), f"page {int(g):#x}"


def test_a_session_over_the_api(uffd: None, tmp_path: Path) -> None:
    image = make_image(64 * PAGE, seed=71)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(image)
    daemon = Daemon(tmp_path, "--engine-threads", "2")
    try:
        status, health = daemon("GET", "/healthz")
        assert status == 200 and health["status"] == "ok" and health["sessions_active"] == 0
        vm_sock = tmp_path / "vm1.sock"
        status, body = daemon(
            "PUT",
            "/sessions/vm1",
            {"uffd_socket": str(vm_sock), "mem_file": str(memfile), "poison_gpa": ["0x3000"]},
        )
        assert status == 201, body
        assert body["state"] == "listening" and vm_sock.exists()
        out = tmp_path / "out.json"
        double = start_double(vm_sock, out, "--sizes", str(64))
        _, err = double.communicate(timeout=60)
        assert double.returncode == 0, err
        _checksums_right(out, image, [3 * PAGE])
        deadline = time.monotonic() + 10
        while (session := daemon("GET", "/sessions/vm1")[1])["state"] != "exited":
            assert time.monotonic() < deadline, session
            time.sleep(0.02)
        assert session["peer"]["pid"] == double.pid
        assert session["stats"]["pages_resolved"] == 64
        assert daemon("GET", "/sessions")[1][0]["name"] == "vm1"
        assert daemon("DELETE", "/sessions/vm1") == (204, None)
        assert daemon("GET", "/sessions/vm1")[0] == 404
        assert daemon("DELETE", "/sessions/vm1")[0] == 404
        # Drain: new sessions are refused, and with none left the daemon ends (exit 0).
        status, body = daemon("PUT", "/drain")
        assert status == 202 and body["status"] == "draining"
        _, err = daemon.proc.communicate(timeout=30)
        assert daemon.proc.returncode == 0, err
        assert "drained" in err
    finally:
        if daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)


@pytest.mark.parametrize(
    ("name", "body", "status", "needle"),
    [
        ("vm", "not json", 400, "not JSON"),
        ("vm", {"mem_file": "{mem}"}, 400, "`uffd_socket` is required"),
        ("vm", {"uffd_socket": "{sock}", "mem_file": "{mem}", "colour": 1}, 400, "colour"),
        ("vm", {"uffd_socket": "{sock}"}, 400, "exactly one of `mem_file` and `source`"),
        ("vm", {"uffd_socket": "{sock}", "mem_file": "{mem}", "prefetch": "some"}, 400, "prefetch"),
        ("vm", {"uffd_socket": "{sock}", "mem_file": "{tmp}/nope"}, 400, "No such file"),
        ("vm", {"uffd_socket": "{sock}", "mem_file": "{mem}", "poison_gpa": ["0x100000"]}, 400,
         "past the end of RAM"),
        ("vm", {"uffd_socket": "{sock}", "mem_file": "{mem}", "poison_gpa": ["x"]}, 400,
         "not an address"),
        ("vm", {"uffd_socket": 5, "mem_file": "{mem}"}, 400, "must be a string"),
        ("../etc", {"uffd_socket": "{sock}", "mem_file": "{mem}"}, 404, "no PUT"),
        ("-x", {"uffd_socket": "{sock}", "mem_file": "{mem}"}, 400, "session name"),
        ("taken", {"uffd_socket": "{sock}", "mem_file": "{mem}"}, 409, "exists"),
        ("vm", {"uffd_socket": "{tmp}/taken.sock", "mem_file": "{mem}"}, 409, "another session's"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_and_change_nothing(
    uffd: None, tmp_path: Path, name: str, body: Any, status: int, needle: str
) -> None:
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(bytes(16 * PAGE))
    with SessionManager() as manager:
        from pagewarden.daemon.api import ApiServer

        server = ApiServer(tmp_path / "api.sock", manager)
        server.start()
        try:
            taken = {"uffd_socket": str(tmp_path / "taken.sock"), "mem_file": str(memfile)}
            assert manager.create("taken", taken)["state"] == "listening"
            values = {"mem": str(memfile), "sock": str(tmp_path / "vm.sock"), "tmp": str(tmp_path)}
            if isinstance(body, dict):
                body = {k: v.format(**values) if isinstance(v, str) else v for k, v in body.items()}
                got, answer = api(server.path, "PUT", f"/sessions/{name}", body)
            else:
                got, answer = api(server.path, "PUT", f"/sessions/{name}", raw=body.encode())
            assert got == status, answer
            assert needle in answer["error"], answer
            assert [s["name"] for s in manager.list()] == ["taken"]
            assert not (tmp_path / "vm.sock").exists()
        finally:
            server.shutdown()
            server.server_close()


def test_sixteen_vms_share_the_engine_and_have_metrics(uffd: None, tmp_path: Path) -> None:
    """16 microVMs on a 2-thread engine: the daemon's threads do not grow with them, and every
    session has its own series in the metrics."""
    pages = 32
    image = make_image(pages * PAGE, seed=73)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(image)
    daemon = Daemon(tmp_path, "--engine-threads", "2", "--metrics", "127.0.0.1:0")
    doubles = []
    go = tmp_path / "go"
    try:
        idle_threads = daemon("GET", "/healthz")[1]["threads"]
        for i in range(16):
            sock = tmp_path / f"vm{i}.sock"
            status, body = daemon(
                "PUT", f"/sessions/vm{i}", {"uffd_socket": str(sock), "mem_file": str(memfile),
                                            "prefetch": "none"},
            )  # fmt: skip
            assert status == 201, body
            doubles.append(
                start_double(
                    sock,
                    tmp_path / f"out{i}.json",
                    "--sizes",
                    str(pages),
                    "--touch-first",
                    "3",
                    "--wait-for",
                    str(go),
                )
            )
        for d in doubles:
            assert d.stdout is not None and d.stdout.readline().strip() == "waiting"
        health = daemon("GET", "/healthz")[1]
        assert health["sessions_active"] == 16
        assert health["threads"] <= 24, health
        # Not one more per microVM: at most the engine's two (if they start with the first
        # session) and two to spare.
        assert health["threads"] - idle_threads <= 4, (idle_threads, health)
        assert daemon.metrics is not None
        with urllib.request.urlopen(f"http://{daemon.metrics}/metrics", timeout=30) as r:
            text = r.read().decode()
        for i in range(16):
            # Pages 0 and 1 fault; page 1 reads on from page 0, so fault-around brings page 2
            # with it.
            assert f'pagewarden_faults_total{{session="vm{i}"}} 2.0' in text
        go.touch()
        for i, d in enumerate(doubles):
            _, err = d.communicate(timeout=60)
            assert d.returncode == 0, err
            _checksums_right(tmp_path / f"out{i}.json", image, [])
    finally:
        for d in doubles:
            if d.poll() is None:
                d.kill()
                d.communicate()
        daemon.stop()


def test_sessions_survive_a_daemon_restart(uffd: None, tmp_path: Path) -> None:
    """With --state-dir a daemon killed (or stopped) while a microVM waits is started again and
    re-attaches it: every page arrives."""
    pages = 64
    image = make_image(pages * PAGE, seed=79)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(image)
    state = tmp_path / "state"
    daemon = Daemon(tmp_path, "--state-dir", str(state))
    go = tmp_path / "go"
    vm_sock, out = tmp_path / "vm.sock", tmp_path / "out.json"
    double = None
    second = None
    try:
        status, body = daemon(
            "PUT",
            "/sessions/vm",
            {"uffd_socket": str(vm_sock), "mem_file": str(memfile), "prefetch": "none"},
        )
        assert status == 201, body
        double = start_double(
            vm_sock, out, "--sizes", str(pages), "--touch-first", "4", "--wait-for", str(go)
        )
        assert double.stdout is not None and double.stdout.readline().strip() == "waiting"
        daemon.stop(signal.SIGKILL)
        second = Daemon(tmp_path, "--state-dir", str(state))
        session = second("GET", "/sessions/vm")[1]
        assert session["state"] == "serving" and session["resumed"], session
        go.touch()
        _, err = double.communicate(timeout=60)
        assert double.returncode == 0, err
        _checksums_right(out, image, [])
        # Stopped (SIGTERM) with nothing to serve: the session had ended, nothing to keep.
        deadline = time.monotonic() + 10
        while second("GET", "/sessions/vm")[1]["state"] != "exited":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        _, err = second.stop()
        assert second.proc.returncode in (0, 143), err
        assert not (state / "vm" / "session.json").exists()
    finally:
        for p in (double, daemon.proc, second.proc if second else None):
            if p is not None and p.poll() is None:
                p.kill()
                p.communicate()


def test_the_session_manager_embedded_without_http(uffd: None, tmp_path: Path) -> None:
    """A Python service hosts sessions with the same class the daemon uses."""
    image = make_image(32 * PAGE, seed=83)
    memfile = tmp_path / "mem.snap"
    memfile.write_bytes(image)
    with SessionManager(engine_threads=1) as manager:
        sock = tmp_path / "vm.sock"
        manager.create("vm", {"uffd_socket": str(sock), "mem_file": str(memfile)})
        with pytest.raises(SessionError, match="exists") as e:
            manager.create(
                "vm", {"uffd_socket": str(tmp_path / "b.sock"), "mem_file": str(memfile)}
            )
        assert e.value.status == 409
        out = tmp_path / "out.json"
        double = start_double(sock, out, "--sizes", str(32))
        _, err = double.communicate(timeout=60)
        assert double.returncode == 0, err
        _checksums_right(out, image, [])
        deadline = time.monotonic() + 10
        while manager.get("vm")["state"] != "exited":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert manager.get("vm")["stats"]["pages_resolved"] == 32
        assert manager.drain() == 0
        with pytest.raises(SessionError, match="draining"):
            manager.create(
                "other", {"uffd_socket": str(tmp_path / "c.sock"), "mem_file": str(memfile)}
            )
