"""The native core's log records reach Python's logging (logger "pagewarden"), from a thread of
pagewarden's, without a call into Python on the fault path."""

from __future__ import annotations

import logging
import socket
import struct
import time

import pytest
import wire
from conftest import MiB, pages_of
from test_remote import TOKEN, fake_server

import pagewarden as pw

pytestmark = pytest.mark.usefixtures("uffd")


def wait_for_record(
    caplog: pytest.LogCaptureFixture, text: str, limit: float = 10.0
) -> logging.LogRecord:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for r in caplog.records:
            if r.name == "pagewarden" and text in r.getMessage():
                return r
        time.sleep(0.01)
    pytest.fail(
        f"no 'pagewarden' record containing {text!r}: {[r.getMessage() for r in caplog.records]}"
    )


def test_a_handler_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pagewarden")
    with fake_server("out_of_range", 1 * MiB) as address:
        mem = pw.GuestMemory.anonymous(1 * MiB)
        with (
            pw.RemoteSource(address, TOKEN, give_up_after=1) as source,
            pw.Handler(mem, source, prefetch=False) as h,
        ):
            h.start()
            mem.touch(pages_of(mem)[:1])
            record = wait_for_record(caplog, "failed (fail-stop)")
            assert record.levelno == logging.ERROR
            assert (
                "does not continue" in record.getMessage() or "guest range" in record.getMessage()
            )
            with pytest.raises(pw.ProtocolError):
                h.check()


def test_a_refused_client_is_logged_by_the_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pagewarden")
    with pw.serve(bytes(64 * 1024), token=TOKEN) as server:
        assert server.address is not None
        # A client answers the challenge with a made-up proof (inside a good channel).
        with socket.create_connection(server.address, timeout=10) as sock:
            s = wire.client_channel(sock, TOKEN)
            hello = wire.MAGIC + struct.pack("<HB5x", wire.VERSION, wire.BULK) + bytes(32)
            s.sendall(wire.frame(wire.HELLO, payload=hello))
            assert wire.recv_frame(s).kind == wire.CHALLENGE
            s.sendall(wire.frame(wire.AUTH, payload=bytes(32)))
            assert wire.recv_frame(s).kind == wire.REJECT
        record = wait_for_record(caplog, "authentication failed")
        assert record.levelno == logging.WARNING
        assert server.stats()["auth_failures"] == 1


def test_the_bridge_thread_runs() -> None:
    import threading

    assert any(t.name == "pagewarden-log" and t.daemon for t in threading.enumerate())
