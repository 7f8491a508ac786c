"""Remote post-copy: a page server in another process (``pagewarden serve``) and RemoteSource in a
Handler, on real userfaultfd and loopback TCP: bytes, poison that travels host to host, a source
that dies and comes back, and hostile servers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wire
from conftest import (
    KIND_MODES,
    MiB,
    Mode,
    make_image,
    make_memory,
    pages_of,
    verify,
)

import pagewarden as pw

pytestmark = pytest.mark.usefixtures("uffd")

TOKEN = b"remote-test-token-0123456789abcdef"


@contextlib.contextmanager
def page_server(
    tmp_path: Path,
    image: bytes | None,
    poison: pw.PoisonSet | None = None,
    listen: str = "127.0.0.1:0",
    extra: list[str] | None = None,
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``pagewarden serve`` in its own process; yields (process, "host:port")."""
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN + b"\n")
    args = [sys.executable, "-m", "pagewarden", "serve"]
    if image is not None:
        img = tmp_path / "source.img"
        if not img.exists():
            img.write_bytes(image)
        args.append(str(img))
    if poison is not None:
        pfile = tmp_path / "source-poison.json"
        poison.save(pfile)
        args += ["--poison", str(pfile)]
    extra = extra or []
    args += ["--listen", listen, *extra]
    if "--insecure-no-token" not in extra:
        args += ["--token-file", str(token_file)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if not first.startswith("listening on "):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"pagewarden serve printed {first!r} first; stderr: {err}")
        yield proc, first.removeprefix("listening on ")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def expected_poison(mem: pw.GuestMemory, small: list[int]) -> list[int]:
    """The pages of ``mem`` that hold any of the 4 KiB pages in ``small``."""
    ps = mem.page_size
    return sorted({gpa - gpa % ps for gpa in small})


@pytest.mark.parametrize(("kind", "mode"), KIND_MODES)
def test_two_processes_bytes_and_poison(kind: str, mode: Mode, tmp_path: Path) -> None:
    size = 8 * MiB
    image = make_image(size, 41)
    small = [0x3000, 0x20_5000, size - 4096]
    poison = pw.PoisonSet(small, page_size=4096)
    with page_server(tmp_path, image, poison) as (_, address):
        mem = make_memory(kind, size)
        with (
            pw.RemoteSource(address, TOKEN) as source,
            pw.Handler(mem, source, mode=mode, prefetch=True) as h,
        ):
            assert source.memory_size == size
            assert source.poison_set() == poison
            h.start()
            result = mem.touch(threads=2, order="random", seed=5)
            assert h.wait(timeout=60)
            h.check()
            want = expected_poison(mem, small)
            verify(mem, result, image, want)
            assert sorted(h.poison_set().with_page_size(mem.page_size)) == want
            stats = source.stats()
            assert stats["urgent_requests"] + stats["bulk_requests"] > 0
            # Every page not poisoned came over the wire (some perhaps twice: a fault may ask
            # again for a page already on its way in the background).
            data_pages = len(pages_of(mem)) - len(want)
            assert stats["bytes_received"] >= data_pages * mem.page_size


def test_three_hops_keep_poison_known_only_on_the_first(tmp_path: Path) -> None:
    size = 4 * MiB
    image = make_image(size, 43)
    known_on_a = [0x1000, 0x10_0000, 0x3F_F000]
    with page_server(tmp_path, image, pw.PoisonSet(known_on_a)) as (_, address_a):
        # Hop A -> B: B's memory is served from A.
        mem_b = pw.GuestMemory.anonymous(size)
        source_b = pw.RemoteSource(address_a, TOKEN)
        hb = pw.Handler(mem_b, source_b, prefetch=True)
        hb.start()
        assert hb.wait(timeout=60)
        hb.check()
        poison_b = hb.poison_set()
        assert sorted(poison_b) == known_on_a
        # Hop B -> C: B serves its memory and the poison it received, as the next source.
        with pw.serve(mem_b, poison=poison_b, token=TOKEN) as server_b:
            assert server_b.address is not None
            host, port = server_b.address
            mem_c = pw.GuestMemory.anonymous(size)
            with (
                pw.RemoteSource(f"{host}:{port}", TOKEN) as source_c,
                pw.Handler(mem_c, source_c, prefetch=True) as hc,
            ):
                hc.start()
                result = mem_c.touch(threads=2, order="random", seed=9)
                assert hc.wait(timeout=60)
                hc.check()
                verify(mem_c, result, image, known_on_a)
                assert sorted(hc.poison_set()) == known_on_a
        hb.close()
        source_b.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_source_killed_and_restarted_blocked_faults_complete(tmp_path: Path) -> None:
    size = 4 * MiB
    image = make_image(size, 47)
    listen = f"127.0.0.1:{_free_port()}"
    mem = pw.GuestMemory.anonymous(size)
    pages = pages_of(mem)
    first, rest = pages[:64], pages[64:]
    with page_server(tmp_path, image, listen=listen) as (proc, address):
        source = pw.RemoteSource(address, TOKEN, give_up_after=60)
        h = pw.Handler(mem, source, prefetch=False)
        h.start()
        verify(mem, mem.touch(first), image, [], touched=first)
        proc.kill()
        proc.wait()
    results: list[pw.TouchResult] = []
    toucher = threading.Thread(target=lambda: results.append(mem.touch(rest, threads=2)))
    toucher.start()
    # The source is gone: the faults wait (no zeros, no failure) while it reconnects.
    toucher.join(timeout=1.0)
    assert toucher.is_alive(), "faults completed while the source was down"
    h.check()
    assert source.stats()["connected"] == 0
    with page_server(tmp_path, image, listen=listen):
        toucher.join(timeout=60)
        assert not toucher.is_alive(), "faults still blocked after the source came back"
    verify(mem, results[0], image, [], touched=rest)
    verify(mem, mem.touch(), image, [])
    stats = source.stats()
    assert stats["reconnects"] >= 1 and stats["requests_resent"] >= 1, stats
    h.check()
    h.close()
    source.close()


def test_source_gone_for_good_fail_stops_after_give_up(tmp_path: Path) -> None:
    size = 1 * MiB
    image = make_image(size, 53)
    with page_server(tmp_path, image) as (proc, address):
        source = pw.RemoteSource(address, TOKEN, give_up_after=0.5)
        h = pw.Handler(mem := pw.GuestMemory.anonymous(size), source, prefetch=False)
        h.start()
        proc.kill()
        proc.wait()
    t0 = time.monotonic()
    result = mem.touch(pages_of(mem)[:4])
    # Fenced, never zeros: every page SIGBUSes.
    assert sorted(result.poisoned) == pages_of(mem)[:4]
    assert time.monotonic() - t0 < 30
    with pytest.raises(pw.SourceError, match="unreachable"):
        h.check()
    h.close()
    source.close()


@contextlib.contextmanager
def fake_server(behaviour: str, size: int = 1 * MiB) -> Iterator[str]:
    """A page server that authenticates properly and then misbehaves."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                if behaviour == "garbage":
                    conn.sendall(os.urandom(4096))
                    conn.recv(1)
                    return
                chan = wire.server_channel(conn, TOKEN)
                wire.server_handshake(chan, TOKEN, 4096, size)
                while not stop.is_set():
                    f = wire.recv_frame(chan)
                    if behaviour == "out_of_range":
                        reply = wire.frame(wire.DATA, size, 4096, bytes(4096))
                    elif behaviour == "wrong_length":
                        reply = wire.frame(wire.DATA, f.guest_address, 4096, bytes(100))
                    elif behaviour == "other_page":
                        reply = wire.frame(
                            wire.DATA, f.guest_address ^ 0x1000, 4096, b"\xee" * 4096
                        )
                    else:  # truncated
                        reply = wire.frame(wire.DATA, f.guest_address, 4096, b"\xee" * 4096)[:2000]
                    # A truncated frame still travels in a whole record (it opens); the frame
                    # inside it is cut short.
                    chan.sendall(reply)
                    if behaviour == "truncated":
                        return
            except (OSError, AssertionError, PermissionError):
                return

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        t.join()
        listener.close()


@pytest.mark.parametrize("behaviour", ["out_of_range", "wrong_length", "other_page"])
def test_hostile_server_changes_nothing_in_guest_memory(behaviour: str) -> None:
    size = 1 * MiB
    with fake_server(behaviour, size) as address:
        mem = pw.GuestMemory.anonymous(size)
        with (
            pw.RemoteSource(address, TOKEN, give_up_after=1) as source,
            pw.Handler(mem, source, prefetch=False) as h,
        ):
            h.start()
            result = mem.touch(pages_of(mem)[:8])
            # Nothing the server sent was written: each page is fenced (SIGBUS), none holds the
            # server's bytes or zeros.
            assert sorted(result.poisoned) == pages_of(mem)[:8]
            with pytest.raises(pw.ProtocolError):
                h.check()


def test_truncated_answer_is_a_lost_connection_not_data() -> None:
    size = 1 * MiB
    with fake_server("truncated", size) as address:
        mem = pw.GuestMemory.anonymous(size)
        with (
            pw.RemoteSource(address, TOKEN, give_up_after=0.5) as source,
            pw.Handler(mem, source, prefetch=False) as h,
        ):
            h.start()
            result = mem.touch(pages_of(mem)[:2])
            assert sorted(result.poisoned) == pages_of(mem)[:2]
            with pytest.raises(pw.PagewardenError):
                h.check()


def test_garbage_server_is_refused_at_connect() -> None:
    with fake_server("garbage") as address, pytest.raises(pw.ProtocolError):
        pw.RemoteSource(address, TOKEN)


def test_wrong_token_is_refused_at_connect(tmp_path: Path) -> None:
    with (
        page_server(tmp_path, bytes(64 * 1024)) as (_, address),
        pytest.raises(pw.ProtocolError, match="token"),
    ):
        pw.RemoteSource(address, b"not-the-right-token-at-all")


def test_token_rules() -> None:
    with pytest.raises(pw.ConfigurationError, match="token is required"):
        pw.RemoteSource("127.0.0.1:1")
    with pytest.raises(pw.ConfigurationError, match="at least 16"):
        pw.RemoteSource("127.0.0.1:1", b"short")
    with pytest.raises(pw.ConfigurationError, match="loopback"):
        pw.RemoteSource("192.0.2.1:1", insecure_no_token=True)


def test_insecure_loopback_without_token(tmp_path: Path) -> None:
    image = make_image(256 * 1024, 59)
    with page_server(tmp_path, image, extra=["--insecure-no-token"]) as (_, address):
        mem = pw.GuestMemory.anonymous(len(image))
        with (
            pw.RemoteSource(address, insecure_no_token=True) as source,
            pw.Handler(mem, source) as h,
        ):
            h.start()
            assert h.wait(timeout=30)
            verify(mem, mem.touch(), image, [])


def _relay(a: socket.socket, b: socket.socket) -> None:
    """Copies bytes from ``a`` to ``b`` until either side closes."""
    try:
        while data := a.recv(1 << 16):
            b.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)


def test_connect_callable_through_a_tunnel(tmp_path: Path) -> None:
    """An operator hands in connected sockets (here the local end of a Unix-socket "tunnel"
    relayed to the server) instead of an address."""
    size = 1 * MiB
    image = make_image(size, 103)
    opened: list[socket.socket] = []
    with page_server(tmp_path, image, pw.PoisonSet([0x8000])) as (_, address):
        host, port = address.rsplit(":", 1)

        def tunnel() -> socket.socket:
            near, far = socket.socketpair()
            upstream = socket.create_connection((host, int(port)))
            opened.extend([far, upstream])
            for a, b in ((far, upstream), (upstream, far)):
                threading.Thread(target=_relay, args=(a, b), daemon=True).start()
            return near

        mem = pw.GuestMemory.anonymous(size)
        with (
            pw.RemoteSource(token=TOKEN, connect=tunnel) as source,
            pw.Handler(mem, source) as h,
        ):
            assert len(opened) == 4  # two connections, each a tunnel
            h.start()
            assert h.wait(timeout=30)
            verify(mem, mem.touch(), image, [0x8000])
    for s in opened:
        s.close()
    with pytest.raises(pw.ConfigurationError, match="loopback"):
        pw.RemoteSource(connect=tunnel, insecure_no_token=True)
    with pytest.raises(pw.ConfigurationError, match="address"):
        pw.RemoteSource(token=TOKEN)


def test_closing_the_source_under_a_waiting_fault_fences_it(tmp_path: Path) -> None:
    size = 1 * MiB
    image = make_image(size, 107)
    with page_server(tmp_path, image) as (proc, address):
        source = pw.RemoteSource(address, TOKEN, give_up_after=60)
        mem = pw.GuestMemory.anonymous(size)
        h = pw.Handler(mem, source, prefetch=False)
        h.start()
        proc.send_signal(signal.SIGSTOP)  # the server stops answering
        try:
            results: list[pw.TouchResult] = []
            toucher = threading.Thread(target=lambda: results.append(mem.touch([0x5000])))
            toucher.start()
            deadline = time.monotonic() + 10
            while h.page_state(0x5000) != "urgent" and time.monotonic() < deadline:
                time.sleep(0.005)
            assert h.page_state(0x5000) == "urgent"
            source.close()
            toucher.join(timeout=30)
            assert not toucher.is_alive(), "the fault still waits after the source was closed"
            assert results[0].poisoned == [0x5000]  # fenced, never zeros
            with pytest.raises(pw.SourceError, match="closed"):
                h.check()
        finally:
            proc.send_signal(signal.SIGCONT)
        h.close()


def test_poison_found_at_the_source_is_journaled(tmp_path: Path) -> None:
    """The server discovers a poisoned page only when it reads it (a uffd poison marker in the
    memory it serves); the destination journals it, so the next hop knows it too."""
    from pagewarden import poison_tools

    size = 512 * 1024
    image = make_image(size, 113)
    src_mem = pw.GuestMemory.anonymous(size)
    hidden = 0x9000
    with pw.Handler(src_mem, pw.MemorySource(image), poison=pw.PoisonSet([hidden])) as hs:
        hs.start()
        assert hs.wait(timeout=30)
        # Served without telling the server about the poison: it finds it by reading.
        with pw.serve(src_mem, token=TOKEN) as server:
            assert server.address is not None
            host, port = server.address
            journal = tmp_path / "poison.journal"
            mem = pw.GuestMemory.anonymous(size)
            with (
                pw.RemoteSource(f"{host}:{port}", TOKEN) as source,
                pw.Handler(mem, source, poison_journal=journal) as h,
            ):
                h.start()
                assert h.wait(timeout=30)
                verify(mem, mem.touch(), image, [hidden])
                assert h.stats()["pages_poisoned_source"] == 1
            assert list(server.poison_set()) == [hidden]
    assert list(poison_tools.load_any(str(journal))[0]) == [hidden]


def _threads_named(prefix: str, exclude: set[int]) -> dict[int, int]:
    """{tid: scheduling policy} of this process's threads whose name starts with ``prefix``."""
    found = {}
    for task in os.listdir("/proc/self/task"):
        tid = int(task)
        if tid in exclude:
            continue
        try:
            name = Path(f"/proc/self/task/{task}/comm").read_text().strip()
            if name.startswith(prefix):
                found[tid] = os.sched_getscheduler(tid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


@pytest.mark.parametrize("background", ["auto", "idle", "normal", None])
def test_background_priority_on_both_hosts(background: str | None) -> None:
    """``background="auto"`` (the default, None here) and ``"idle"`` move background data
    under SCHED_IDLE on both hosts (auto: unless a busy host starved it, which its counters
    say); ``"normal"`` at normal priority. Fault traffic (the urgent connection) is at normal
    priority either way."""
    image = make_image(4 * MiB, 61)
    before = set(map(int, os.listdir("/proc/self/task")))
    want = os.SCHED_OTHER if background == "normal" else os.SCHED_IDLE
    chosen = {} if background is None else {"background": background}
    with pw.serve(image, token=TOKEN, **chosen) as server:  # type: ignore[arg-type]
        assert server.address is not None
        address = "%s:%d" % server.address  # noqa: UP031
        mem = pw.GuestMemory.anonymous(len(image))
        with (
            pw.RemoteSource(address, TOKEN, **chosen) as source,  # type: ignore[arg-type]
            pw.Handler(mem, source) as h,
        ):
            h.start()
            assert h.wait(timeout=60)
            verify(mem, mem.touch(), image, [])
            # The push is done: both bulk threads have long set their priority.
            promoted = source.stats()["background_promotions"] > 0
            if not promoted:
                assert list(_threads_named("pagewarden-bulk", before).values()) == [want]
            served = sorted(_threads_named("pagewarden-serv", before).values())
            if not promoted:
                assert served == sorted([os.SCHED_OTHER, want]), served
            assert set(_threads_named("pagewarden-urge", before).values()) == {os.SCHED_OTHER}


def test_background_priority_is_checked() -> None:
    with pytest.raises(pw.ConfigurationError, match=r'background must be "auto".*not "low"'):
        pw.serve(bytes(4096), insecure_no_token=True, background="low")  # type: ignore[arg-type]
    with pytest.raises(pw.ConfigurationError, match=r'background must be "auto".*not "low"'):
        pw.RemoteSource("127.0.0.1:9", insecure_no_token=True, background="low")  # type: ignore[arg-type]


def test_a_guest_reading_right_behind_the_push_waits_for_it_and_reads_right() -> None:
    """A thread that reads the guest in order from the start, as the push streams it, faults on
    pages the background stream is answering at that moment: those faults wait for that answer
    (``faults_joined_background``) instead of asking again, and every page reads right."""
    size = 32 * MiB
    image = make_image(size, 71)
    with pw.serve(image, token=TOKEN) as server:
        assert server.address is not None
        address = "%s:%d" % server.address  # noqa: UP031
        mem = pw.GuestMemory.anonymous(size)
        with (
            pw.RemoteSource(address, TOKEN) as source,
            pw.Handler(mem, source, prefetch=True) as h,
        ):
            h.start()
            result = mem.touch(order="sequential")
            assert h.wait(timeout=60)
            h.check()
            verify(mem, result, image, [])
            stats = source.stats()
            assert stats["faults_joined_background"] > 0, stats
            # Joined faults are not asked again on the urgent connection, so next to nothing
            # crosses the wire twice.
            assert stats["urgent_requests"] < h.stats()["faults"], (stats, h.stats())
            assert stats["bytes_received"] <= size * 1.01, stats
