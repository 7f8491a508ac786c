"""Python policies: on_fault decisions with a deadline, notifications, errors raised as
PolicyError, the GIL trap with a policy installed, and many VMs on one Engine."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    KIND_MODES,
    MADV_DONTNEED,
    MiB,
    Mode,
    madvise,
    make_image,
    make_memory,
    pages_of,
    verify,
)

import pagewarden as pw

pytestmark = pytest.mark.usefixtures("uffd")


class Decide(pw.Policy):
    """POISON, ZERO or COPY for chosen pages; records what it saw."""

    def __init__(self, decisions: dict[int, pw.Action]) -> None:
        self.decisions = decisions
        self.faults: list[pw.Fault] = []
        self.poisoned: list[int] = []

    def on_fault(self, fault: pw.Fault) -> pw.Action | None:
        self.faults.append(fault)
        return self.decisions.get(fault.guest_address)

    def on_poison(self, guest_addresses: list[int]) -> None:
        self.poisoned.extend(guest_addresses)


@pytest.mark.parametrize(("kind", "mode"), KIND_MODES)
def test_on_fault_decisions_take_effect(kind: str, mode: Mode) -> None:
    size = 8 * MiB if kind == "hugetlb" else 1 * MiB
    image = make_image(size, 61)
    mem = make_memory(kind, size)
    pages = pages_of(mem)
    known = pages[-1]
    poison_p, zero_p, copy_p = pages[0], pages[1], pages[2]
    policy = Decide({poison_p: pw.Action.POISON, zero_p: pw.Action.ZERO, copy_p: pw.Action.COPY})
    with pw.Handler(
        mem,
        pw.MemorySource(image),
        poison=pw.PoisonSet([known], page_size=mem.page_size),
        mode=mode,
        prefetch=False,
        policy=policy,
        policy_timeout=5.0,
    ) as h:
        h.start()
        result = mem.touch(threads=2)
        expected = bytearray(image)
        expected[zero_p : zero_p + mem.page_size] = bytes(mem.page_size)
        verify(mem, result, bytes(expected), [poison_p, known])
        assert h.wait(timeout=30)
        stats = h.stats()
        assert stats["policy_faults"] >= len(pages) - 1
        assert stats["pages_poisoned_policy"] == 1
        assert stats["policy_timeouts"] == 0
        seen = {f.guest_address for f in policy.faults}
        assert seen == set(pages) - {known}
        assert all(f.page_size == mem.page_size for f in policy.faults)
        # Loads, from the touching threads (UFFD_FEATURE_THREAD_ID names them).
        assert not any(f.write for f in policy.faults)
        assert all(f.thread_id > 0 for f in policy.faults)
        assert len({f.thread_id for f in policy.faults}) <= 2
    # on_poison saw the known page and the one the policy poisoned, each once.
    assert sorted(policy.poisoned) == sorted([poison_p, known])
    assert h.poison_set() == pw.PoisonSet([poison_p, known], page_size=mem.page_size)


def test_a_raising_callback_gets_the_default_then_policy_error() -> None:
    size = 256 * 1024
    image = make_image(size, 67)
    mem = pw.GuestMemory.anonymous(size)

    class Broken(pw.Policy):
        def on_fault(self, fault: pw.Fault) -> pw.Action | None:
            if fault.guest_address == 0x2000:
                raise ValueError("policy bug")
            return None

    h = pw.Handler(mem, pw.MemorySource(image), prefetch=False, policy=Broken())
    h.start()
    # The native default (copy) applied to the page whose callback raised.
    verify(mem, mem.touch(), image, [])
    with pytest.raises(pw.PolicyError) as info:
        h.check()
    assert isinstance(info.value.__cause__, ValueError)
    assert "policy bug" in str(info.value.__cause__)
    h.check()  # reported once
    h.close()


def test_a_wrong_return_value_is_a_policy_error() -> None:
    mem = pw.GuestMemory.anonymous(64 * 1024)

    class Wrong(pw.Policy):
        def on_fault(self, fault: pw.Fault) -> Any:
            return "zero"

    with pw.Handler(mem, pw.ZeroSource(), prefetch=False, policy=Wrong()) as h:
        h.start()
        verify(mem, mem.touch(), None, [])
        with pytest.raises(pw.PolicyError) as info:
            h.check()
        assert isinstance(info.value.__cause__, TypeError)


def test_a_late_answer_is_dropped_and_the_default_applies() -> None:
    size = 64 * 1024
    image = make_image(size, 71)
    mem = pw.GuestMemory.anonymous(size)

    class Slow(pw.Policy):
        def on_fault(self, fault: pw.Fault) -> pw.Action | None:
            time.sleep(0.2)
            return pw.Action.ZERO

    with pw.Handler(
        mem, pw.MemorySource(image), prefetch=False, policy=Slow(), policy_timeout=0.02
    ) as h:
        h.start()
        # ZERO came too late: the bytes are the source's.
        verify(mem, mem.touch(pages_of(mem)[:2]), image, [], touched=pages_of(mem)[:2])
        stats = h.stats()
        assert stats["policy_timeouts"] >= 2
        deadline = time.monotonic() + 10
        while h.stats()["policy_late_answers"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h.stats()["policy_late_answers"] >= 1


def test_gil_trap_with_an_on_fault_policy_completes() -> None:
    """A Python thread that faults on guest memory while holding the GIL, with an on_fault policy
    whose dispatcher needs that GIL: the deadline lets the native default through."""
    script = textwrap.dedent(
        """
        import ctypes, random
        import pagewarden as pw

        class Ask(pw.Policy):
            def on_fault(self, fault):
                return None

        size = 1 << 20
        image = random.Random(3).randbytes(size)
        mem = pw.GuestMemory.anonymous(size)
        h = pw.Handler(mem, pw.MemorySource(image), prefetch=False, policy=Ask(),
                       policy_timeout=0.05)
        h.start()
        # ctypes.string_at copies with the GIL held: the dispatcher cannot run meanwhile.
        for gpa in (0, 0x5000, size - 4096):
            assert ctypes.string_at(mem.host_address_of(gpa), 4096) == image[gpa:gpa + 4096]
        stats = h.stats()
        h.close()
        print("timeouts", stats["policy_timeouts"])
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) >= 1, out.stdout


def test_on_event_on_poison_and_on_progress() -> None:
    size = 1 * MiB
    image = make_image(size, 73)
    mem = pw.GuestMemory.anonymous(size)
    seen: dict[str, list[Any]] = {"events": [], "poison": [], "progress": []}

    class Watch(pw.Policy):
        def on_event(self, event: pw.Event) -> None:
            seen["events"].append(event)

        def on_poison(self, guest_addresses: list[int]) -> None:
            seen["poison"].extend(guest_addresses)

        def on_progress(self, stats: dict[str, Any]) -> None:
            seen["progress"].append(stats)

    with pw.Handler(mem, pw.MemorySource(image), policy=Watch(), progress_interval=0.02) as h:
        h.start()
        assert h.wait(timeout=30)
        host = mem.host_address_of(0x10000)
        assert host is not None
        madvise(host, 0x4000, MADV_DONTNEED)
        h.poison(0x20000)
        deadline = time.monotonic() + 10
        while (not seen["events"] or not seen["poison"] or len(seen["progress"]) < 2) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.01)
    assert pw.Event("remove", 0x10000, 0x4000) in seen["events"]
    assert seen["poison"] == [0x20000]
    assert len(seen["progress"]) >= 2
    assert "pages_resolved" in seen["progress"][-1]


def test_on_source_error_decides_instead_of_fail_stop(tmp_path: Path) -> None:
    size = 256 * 1024
    image = make_image(size, 79)
    path = tmp_path / "guest.img"
    path.write_bytes(image)
    mem = pw.GuestMemory.anonymous(size)
    errors: list[tuple[int, Exception]] = []

    class Zeros(pw.Policy):
        def on_source_error(self, guest_address: int, error: Exception) -> pw.Action | None:
            errors.append((guest_address, error))
            return pw.Action.ZERO

    with pw.Handler(mem, pw.FileSource(path), prefetch=False, policy=Zeros()) as h:
        h.start()
        # The image loses its second half after the handler validated it.
        os.truncate(path, size // 2)
        pages = pages_of(mem)
        expected = image[: size // 2] + bytes(size // 2)
        verify(mem, mem.touch(), expected, [])
        h.check()
        assert errors and all(isinstance(e, pw.SourceError) for _, e in errors)
        assert {gpa for gpa, _ in errors} <= set(pages[len(pages) // 2 :])


def test_without_on_source_error_a_source_error_fail_stops(tmp_path: Path) -> None:
    size = 64 * 1024
    path = tmp_path / "guest.img"
    path.write_bytes(make_image(size, 83))
    mem = pw.GuestMemory.anonymous(size)

    class Quiet(pw.Policy):
        def on_progress(self, stats: dict[str, Any]) -> None:
            pass

    with pw.Handler(mem, pw.FileSource(path), prefetch=False, policy=Quiet()) as h:
        h.start()
        os.truncate(path, 0)
        result = mem.touch(pages_of(mem)[:1])
        assert result.poisoned == [0]  # fenced, never zeros
        with pytest.raises(pw.SourceError):
            h.check()


def test_prefetch_order_from_the_policy() -> None:
    size = 1 * MiB
    image = make_image(size, 89)
    mem = pw.GuestMemory.anonymous(size)
    last = pages_of(mem)[-8:]

    class Hot(pw.Policy):
        def prefetch_order(self, region: pw.GuestMemory) -> list[int]:
            assert region is mem
            return last

    with pw.Handler(mem, pw.MemorySource(image), policy=Hot()) as h:
        h.start()
        assert h.wait(timeout=30)
        assert h.stats()["pages_prefetched_planned"] == len(last)
        verify(mem, mem.touch(), image, [])
    with pytest.raises(pw.ConfigurationError, match="not both"):
        pw.Handler(mem, pw.MemorySource(image), policy=Hot(), prefetch_order=[0])


def test_policy_must_be_a_policy() -> None:
    mem = pw.GuestMemory.anonymous(4096)
    with pytest.raises(pw.ConfigurationError, match="Policy"):
        pw.Handler(mem, pw.ZeroSource(), policy=object())  # type: ignore[arg-type]
    with pytest.raises(pw.ConfigurationError, match="policy_timeout"):
        pw.Handler(mem, pw.ZeroSource(), policy=pw.Policy(), policy_timeout=0)


def native_thread_names() -> list[str]:
    """The kernel's names (15 characters at most) of this process's threads."""
    tasks = Path("/proc/self/task")
    return [(t / "comm").read_text().strip() for t in tasks.iterdir()]


def test_two_vms_on_one_engine() -> None:
    size = 2 * MiB
    images = [make_image(size, 97), make_image(size, 101)]
    mems = [pw.GuestMemory.anonymous(size), pw.GuestMemory.memfd(size)]
    poison = [[0x3000], [0x1F_F000]]
    with pw.Engine(threads=1) as engine:
        handlers = [
            pw.Handler(m, pw.MemorySource(img), poison=pw.PoisonSet(p), engine=engine)
            for m, img, p in zip(mems, images, poison, strict=True)
        ]
        for h in handlers:
            h.start()
        assert engine.handlers == 2
        # One native thread serves both: no per-handler threads. (A new thread shows its
        # creator's name until it has run far enough to set its own.)
        deadline = time.monotonic() + 10
        while "pw-engine" not in (names := native_thread_names()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert names.count("pw-engine") == 1, names
        assert "pagewarden-uffd" not in names, names
        results: list[pw.TouchResult | None] = [None, None]

        def touch(i: int) -> None:
            results[i] = mems[i].touch(threads=2, order="random", seed=i)

        threads = [threading.Thread(target=touch, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for i in range(2):
            r = results[i]
            assert r is not None
            verify(mems[i], r, images[i], poison[i])
            assert handlers[i].wait(timeout=30)
        for h in handlers:
            h.close()
        deadline = time.monotonic() + 10
        while engine.handlers and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.handlers == 0
    with pytest.raises(pw.HandlerClosedError):
        h2 = pw.Handler(pw.GuestMemory.anonymous(4096), pw.ZeroSource(), engine=engine)
        h2.start()


def test_a_dropped_handler_ends_its_dispatcher() -> None:
    import gc

    mem = pw.GuestMemory.anonymous(64 * 1024)
    h = pw.Handler(mem, pw.ZeroSource(), policy=Decide({}))
    h.start()
    assert h.wait(timeout=30)
    dispatcher = next(t for t in threading.enumerate() if t.name == "pagewarden-policy")
    del h
    gc.collect()
    dispatcher.join(timeout=10)
    assert not dispatcher.is_alive()


def test_closing_the_engine_fail_stops_its_running_handlers() -> None:
    mem = pw.GuestMemory.anonymous(64 * 1024)
    engine = pw.Engine(threads=2)
    h = pw.Handler(mem, pw.ZeroSource(), prefetch=False, engine=engine)
    h.start()
    engine.close()
    assert engine.handlers == 0
    with pytest.raises(pw.HandlerClosedError, match="Engine was closed"):
        h.check()
    with pytest.raises(pw.HandlerClosedError):
        h.wait(timeout=1)
    # Fenced, never zeros.
    assert mem.touch(pages_of(mem)[:2]).poisoned == pages_of(mem)[:2]
    h.close()


def test_on_fault_sees_write_faults() -> None:
    import ctypes

    size = 64 * 1024
    image = make_image(size, 109)
    mem = pw.GuestMemory.anonymous(size)
    policy = Decide({})
    with pw.Handler(mem, pw.MemorySource(image), prefetch=False, policy=policy) as h:
        h.start()
        host = mem.host_address_of(0x3000)
        assert host is not None
        ctypes.memset(host, 0xAB, 1)  # a store (ctypes releases the GIL for the call)
        assert ctypes.string_at(host, 2) == bytes([0xAB, image[0x3001]])
        h.check()
    assert [(f.guest_address, f.write) for f in policy.faults] == [(0x3000, True)]
