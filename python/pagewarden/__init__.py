"""pagewarden: serve a VM's guest memory through Linux userfaultfd during post-copy live migration
and lazy snapshot restore, and keep hardware memory poison across the move.

Faults are resolved in Rust on native threads without the GIL; Python sets things up, watches and
decides policy. See ``pagewarden.Handler`` to begin.
"""

from __future__ import annotations

from pagewarden import _logbridge
from pagewarden._native import (
    DEFAULT_FAULT_AROUND,
    ConfigurationError,
    Engine,
    FileSource,
    GuestAddressError,
    GuestMemory,
    Handler,
    HandlerClosedError,
    MemorySource,
    PagewardenError,
    PoisonedPageError,
    PoisonFileError,
    PoisonJournalWarning,
    PoisonSet,
    PolicyError,
    ProcessMemory,
    ProtocolError,
    RemoteSource,
    Server,
    SourceError,
    TouchResult,
    UnsupportedError,
    ZeroSource,
    __version__,
    capabilities,
    make_test_certificates,
    page_checksum,
    serve,
)
from pagewarden.policy import Action, Event, Fault, Policy

__all__ = [
    "DEFAULT_FAULT_AROUND",
    "Action",
    "ConfigurationError",
    "Engine",
    "Event",
    "Fault",
    "FileSource",
    "GuestAddressError",
    "GuestMemory",
    "Handler",
    "HandlerClosedError",
    "MemorySource",
    "PagewardenError",
    "PoisonFileError",
    "PoisonJournalWarning",
    "PoisonSet",
    "PoisonedPageError",
    "Policy",
    "PolicyError",
    "ProcessMemory",
    "ProtocolError",
    "RemoteSource",
    "Server",
    "SourceError",
    "TouchResult",
    "UnsupportedError",
    "ZeroSource",
    "__version__",
    "capabilities",
    "make_test_certificates",
    "page_checksum",
    "serve",
]

_logbridge.start()
