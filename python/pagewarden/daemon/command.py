"""``pagewarden daemon --api-sock PATH [--metrics HOST:PORT] [--engine-threads N]
[--state-dir DIR]``.

Prints ``metrics on HOST:PORT`` first when ``--metrics`` is given (the port actually bound), then
``api on PATH``; runs until SIGTERM or SIGINT, or until a drain (``PUT /drain``) has seen every
session end. On SIGTERM with ``--state-dir`` serving sessions are detached (their microVMs wait
for the next daemon, which re-attaches them); without it their missing pages are fenced.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import time

import pagewarden as pw
from pagewarden._quiet import PROCESS_SIGNALS
from pagewarden.daemon.api import ApiServer
from pagewarden.daemon.sessions import SessionManager

log = logging.getLogger("pagewarden.daemon")


def default_engine_threads() -> int:
    """Twice the CPUs this process may run on, at least 2 and at most 16. Measured with 64
    microVMs on 2 CPUs (BENCHMARKS.md, "The daemon"): 2 threads, competing with 128 guest
    threads, left the prefetch behind and the guests' p99 at 1 ms; 4 brought it to the
    per-process handlers' 2 us with all memory read sooner."""
    return max(2, min(16, 2 * len(os.sched_getaffinity(0))))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's options."""
    p.add_argument(
        "--api-sock", required=True, metavar="PATH", help="the API's Unix socket (created 0600)"
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (needs pagewarden[metrics])",
    )
    p.add_argument(
        "--engine-threads",
        type=int,
        default=None,
        metavar="N",
        help="native threads that resolve every session's faults and prefetch (default: twice "
        "the CPUs, 2 to 16)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep every session's state under DIR/NAME: a restarted daemon re-attaches the "
        "microVMs that still run; SIGTERM detaches instead of fencing",
    )


def _metrics(address: str, manager: SessionManager) -> str:
    """Starts the metrics listener; returns HOST:PORT as bound."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server

        from pagewarden.metrics import HandlerCollector
    except ImportError:
        raise pw.ConfigurationError(
            errno.ENOPKG, "--metrics needs prometheus-client: pip install 'pagewarden[metrics]'"
        ) from None
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not host:
        raise pw.ConfigurationError(
            errno.EINVAL, f"--metrics {address!r} is not HOST:PORT (e.g. 127.0.0.1:9100)"
        )
    registry = CollectorRegistry()
    registry.register(HandlerCollector(manager.handlers, label="session"))
    # Its thread must not take the signals the daemon is stopped with (pagewarden._quiet).
    old = signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
    try:
        server, _ = start_http_server(int(port_text), host.strip("[]"), registry)
    except OSError as e:
        raise pw.ConfigurationError(
            e.errno or errno.EADDRINUSE, f"--metrics {address}: {e.strerror or e}"
        ) from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return f"{host}:{server.server_port}"


def run(args: argparse.Namespace) -> int:
    """Runs the daemon; returns the exit status."""
    if args.engine_threads is None:
        args.engine_threads = default_engine_threads()
    if args.engine_threads < 1:
        print("pagewarden daemon: error: --engine-threads must be at least 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="pagewarden: %(message)s")
    manager = SessionManager(args.engine_threads, args.state_dir)
    api = None
    stopped_by_signal = False
    try:
        try:
            if args.metrics:
                print(f"metrics on {_metrics(args.metrics, manager)}", flush=True)
            old = signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
            try:
                api = ApiServer(args.api_sock, manager)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
        except (pw.ConfigurationError, OSError) as e:
            message = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            print(f"pagewarden daemon: error: {message}", file=sys.stderr)
            return 2
        api.start()
        print(f"api on {args.api_sock}", flush=True)
        from pagewarden import kvm_check

        kvm_check.tell_delivery(log)
        try:
            while not (manager.draining and manager.active() == 0):
                time.sleep(0.2)
            log.info("drained: every session has ended")
        except BaseException:
            stopped_by_signal = True
            raise
    finally:
        if api is not None:
            api.shutdown()
            api.server_close()
        detach = stopped_by_signal and args.state_dir is not None
        manager.close(detach=detach)
        if detach:
            log.info(
                "detached: the daemon started again with --state-dir %s re-attaches", args.state_dir
            )
    return 0
