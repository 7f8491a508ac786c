"""asyncio glue for ``Handler.wait_async``: waits on ``Handler.fileno()`` with the running
loop's ``add_reader``, so no thread is blocked."""

from __future__ import annotations

import asyncio
import contextlib

import pagewarden as pw


async def wait_async(handler: pw.Handler, timeout: float | None = None) -> bool:
    """True once every page is resolved, False after ``timeout`` seconds; raises the handler's
    first fatal error."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bool] = loop.create_future()

    def ready() -> None:
        if done.done():
            return
        try:
            if handler.process_events():
                done.set_result(True)
        except pw.PagewardenError as e:
            done.set_exception(e)

    fd = handler.fileno()
    loop.add_reader(fd, ready)
    try:
        ready()  # already complete (or failed) before anything was signalled
        try:
            return await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            return False
    finally:
        loop.remove_reader(fd)
        if not done.done():
            done.cancel()
        with contextlib.suppress(asyncio.CancelledError, pw.PagewardenError):
            if done.done() and not done.cancelled():
                done.exception()
