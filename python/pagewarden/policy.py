"""Policies: Python callbacks that steer a Handler without ever blocking a fault.

Subclass :class:`Policy`, override the callbacks you need, and pass an instance as
``Handler(..., policy=...)``. Callbacks run on a dispatcher thread of pagewarden's
(``pagewarden-policy``), never on the thread that resolves faults:

* ``on_fault(fault)`` is consulted for every fault **only if overridden**. Its answer must arrive
  within ``Handler(..., policy_timeout=...)`` seconds (default 0.05); after that the native
  default applies (copy from the source) and a late answer is dropped and counted
  (``stats()["policy_timeouts"]``, ``["policy_late_answers"]``). A Python thread that holds the
  GIL while it touches guest memory therefore waits at most that long, never forever.
* ``on_source_error(guest_address, error)``: what to do when the source cannot produce a page
  (default: fail-stop), under the same deadline.
* ``on_poison(guest_addresses)``: batched, whenever pages become poisoned (known at the start,
  found at the source, poisoned at run time, or decided by the policy).
* ``on_event(event)``: the guest dropped (``remove``), unmapped (``unmap``) or moved (``remap``)
  memory.
* ``on_progress(stats)``: every ``progress_interval`` seconds, with ``Handler.stats()``.
* ``prefetch_order(region)``: guest addresses or ``(guest_address, length)`` ranges of one region
  to prefetch first (a recorded working set, say); called once when the Handler is created.

If a callback raises, the native default applies, the exception is logged on the ``pagewarden``
logger, and the first one is raised from the Handler's next ``wait()``, ``check()``,
``process_events()`` or ``close()`` as :class:`pagewarden.PolicyError` with the original as
``__cause__``.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagewarden._quiet import start_quietly

if TYPE_CHECKING:
    from pagewarden._native import GuestMemory, Handler

__all__ = ["Action", "Event", "Fault", "Policy"]

log = logging.getLogger("pagewarden")


class Action(enum.IntEnum):
    """What to do with a page. ``None`` from a callback means the native default."""

    #: Copy the page from the source (the default for a fault).
    COPY = 1
    #: Map a page of zeros.
    ZERO = 2
    #: Poison the page: every access raises SIGBUS (an MCE in a KVM guest), forever.
    POISON = 3
    #: Leave the page missing and wake the thread, which faults again (and asks again).
    RETRY = 4


@dataclass(frozen=True, slots=True)
class Fault:
    """A guest thread is blocked on a missing page."""

    #: First byte of the page, as a guest address.
    guest_address: int
    #: Bytes in the page (4096, or 2 MiB on hugetlb memory).
    page_size: int
    #: The access was a write.
    write: bool
    #: The faulting thread's id (0 if the kernel did not say).
    thread_id: int


@dataclass(frozen=True, slots=True)
class Event:
    """The guest dropped, unmapped or moved a range of its memory."""

    #: ``"remove"`` (MADV_DONTNEED/MADV_REMOVE, a balloon), ``"unmap"`` or ``"remap"``.
    kind: str
    #: First guest address of the range.
    guest_address: int
    #: Bytes in the range.
    length: int


class Policy:
    """Base class of policies: every method is optional; override what you need."""

    def on_fault(self, fault: Fault) -> Action | None:
        """Decides one fault; None means the native default (copy from the source)."""
        return None

    def on_source_error(self, guest_address: int, error: Exception) -> Action | None:
        """Decides a page the source cannot produce; None means fail-stop (the default).
        ZERO and POISON resolve the page; COPY and RETRY ask the source again."""
        return None

    def on_poison(self, guest_addresses: list[int]) -> None:
        """Pages that became poisoned since the last call (sorted guest addresses)."""

    def on_event(self, event: Event) -> None:
        """The guest dropped, unmapped or moved memory."""

    def on_progress(self, stats: dict[str, Any]) -> None:
        """Called every ``progress_interval`` seconds with ``Handler.stats()``."""

    def prefetch_order(self, region: GuestMemory) -> Iterable[int | tuple[int, int]] | None:
        """Guest addresses or (guest_address, length) ranges of ``region`` to prefetch first;
        None for address order."""
        return None


def _overrides(policy: Policy, name: str) -> bool:
    return getattr(type(policy), name, None) is not getattr(Policy, name)


def _check(policy: object) -> Policy:
    if not isinstance(policy, Policy):
        from pagewarden._native import ConfigurationError

        raise ConfigurationError(
            22, f"policy must be a pagewarden.Policy subclass instance, not {type(policy).__name__}"
        )
    return policy


def _consults(policy: object) -> tuple[bool, bool]:
    """Which decisions the native side must hand to this policy: (faults, source errors)."""
    p = _check(policy)
    return _overrides(p, "on_fault"), _overrides(p, "on_source_error")


def _prefetch_order(policy: object, memory: object) -> list[int | tuple[int, int]] | None:
    """The policy's prefetch order over every region of ``memory`` (one or a list), or None."""
    p = _check(policy)
    if not _overrides(p, "prefetch_order"):
        return None
    regions: list[Any] = [memory] if not isinstance(memory, list | tuple) else list(memory)
    order: list[int | tuple[int, int]] = []
    for region in regions:
        ranges = p.prefetch_order(region)
        if ranges is not None:
            order.extend(ranges)
    return order


_CODES = {None: 0, Action.COPY: 1, Action.ZERO: 2, Action.POISON: 3, Action.RETRY: 4}


class _Dispatcher(threading.Thread):
    """Runs a handler's policy callbacks; the native side never waits for it past a deadline."""

    def __init__(self, handler: Handler, policy: Policy, hub: Any, progress_interval: float):
        super().__init__(name="pagewarden-policy", daemon=True)
        # A weak reference: the handler owns this thread, not the other way round.
        self._handler = weakref.ref(handler)
        self._policy = policy
        self._hub = hub
        self._interval = progress_interval
        self._reported: set[int] = set()

    def _failed(self, where: str, exc: BaseException) -> None:
        log.error("policy callback %s raised; the native default applied", where, exc_info=exc)
        handler = self._handler()
        if handler is not None:
            handler._policy_failed(exc)

    def _decide(self, where: str, call: Any, *args: Any) -> int:
        try:
            action = call(*args)
            code = _CODES.get(action)
            if code is None:
                raise TypeError(f"{where} returned {action!r}; return a pagewarden.Action or None")
            return code
        except Exception as exc:  # noqa: BLE001 - every callback error is reported, not lost
            self._failed(where, exc)
            return 0

    def _poison(self, on_poison: Any) -> None:
        handler = self._handler()
        if handler is None:
            return
        now = set(handler.poison_set())
        new = sorted(now - self._reported)
        self._reported |= now
        if new:
            try:
                on_poison(new)
            except Exception as exc:  # noqa: BLE001
                self._failed("on_poison", exc)

    def run(self) -> None:
        p = self._policy
        hub = self._hub
        on_fault = p.on_fault if _overrides(p, "on_fault") else None
        on_source_error = p.on_source_error
        on_poison = p.on_poison if _overrides(p, "on_poison") else None
        on_event = p.on_event if _overrides(p, "on_event") else None
        on_progress = p.on_progress if _overrides(p, "on_progress") else None
        next_progress = time.monotonic() + self._interval
        if on_poison is not None:
            self._poison(on_poison)
        while True:
            wait = 0.5 if on_progress is None else max(0.0, next_progress - time.monotonic())
            items, poison_changed, stopped = hub.next(min(wait, 0.5))
            answers = []
            events = []
            for item in items:
                tag = item[0]
                if tag == 0:
                    fault = Fault(item[2], item[3], item[4], item[5])
                    answers.append((item[1], self._decide("on_fault", on_fault, fault)))
                elif tag == 1:
                    code = self._decide("on_source_error", on_source_error, item[2], item[4])
                    answers.append((item[1], code))
                else:
                    events.append(Event(item[1], item[2], item[3]))
            # Decisions first: threads are blocked on them.
            if answers:
                hub.answer(answers)
            if on_event is not None:
                for event in events:
                    try:
                        on_event(event)
                    except Exception as exc:  # noqa: BLE001
                        self._failed("on_event", exc)
            if poison_changed and on_poison is not None:
                self._poison(on_poison)
            if on_progress is not None and time.monotonic() >= next_progress:
                next_progress = time.monotonic() + self._interval
                handler = self._handler()
                if handler is not None:
                    try:
                        on_progress(handler.stats())
                    except Exception as exc:  # noqa: BLE001
                        self._failed("on_progress", exc)
            if stopped:
                if on_poison is not None:
                    self._poison(on_poison)
                return


def _start_dispatcher(
    handler: Handler, policy: Policy, hub: Any, progress_interval: float
) -> _Dispatcher:
    """Starts the dispatcher thread of ``handler`` (called by Handler.start)."""
    d = _Dispatcher(handler, policy, hub, progress_interval)
    start_quietly(d)
    return d
