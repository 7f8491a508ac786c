"""Embedding in an asyncio program: fileno() + process_events() with add_reader, and
wait_async(), with no thread of the caller blocked."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from conftest import PAGE, make_image, verify

import pagewarden as pw


def test_wait_async_while_the_loop_keeps_running(uffd: None) -> None:
    image = make_image(4096 * PAGE, seed=81)
    mem = pw.GuestMemory.anonymous(4096 * PAGE)

    async def main() -> tuple[bool, int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        with pw.Handler(mem, pw.MemorySource(image), poison=pw.PoisonSet([PAGE])) as h:
            task = asyncio.create_task(ticker())
            h.start()
            threads_before = threading.active_count()
            done = await h.wait_async(timeout=30)
            assert threading.active_count() == threads_before, "wait_async started a thread"
            task.cancel()
            return done, ticks

    done, ticks = asyncio.run(main())
    assert done is True
    assert ticks > 0, "the event loop was blocked"
    verify(mem, mem.touch(), image, [PAGE])


def test_add_reader_and_process_events(uffd: None) -> None:
    mem = pw.GuestMemory.anonymous(256 * PAGE)

    async def main() -> list[bool]:
        seen: list[bool] = []
        finished = asyncio.Event()
        with pw.Handler(mem, pw.ZeroSource()) as h:
            loop = asyncio.get_running_loop()

            def on_ready() -> None:
                seen.append(h.process_events())
                if seen[-1]:
                    finished.set()

            loop.add_reader(h.fileno(), on_ready)
            h.start()
            await asyncio.wait_for(finished.wait(), 30)
            loop.remove_reader(h.fileno())
        return seen

    assert asyncio.run(main())[-1] is True


def test_wait_async_timeout_and_failure(uffd: None, tmp_path: Path) -> None:
    path = tmp_path / "guest.img"
    path.write_bytes(make_image(64 * PAGE, seed=82))
    mem = pw.GuestMemory.anonymous(64 * PAGE)
    with pw.Handler(mem, pw.FileSource(path), prefetch=False) as h:
        h.start()
        assert asyncio.run(h.wait_async(timeout=0.05)) is False
        os.truncate(path, 0)
        assert mem.touch(pages=[0]).poisoned == [0]  # fenced: the source is gone
        with pytest.raises(pw.SourceError):
            asyncio.run(h.wait_async(timeout=10))
    with pytest.raises(pw.ConfigurationError):
        h2 = pw.Handler(pw.GuestMemory.anonymous(PAGE), pw.ZeroSource())
        asyncio.run(h2.wait_async(timeout=-1))
