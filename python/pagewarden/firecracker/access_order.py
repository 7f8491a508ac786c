"""A recorded working set: memory-file offsets in the order the guest first touched them.

``pagewarden firecracker --record-access FILE`` writes one when Firecracker exits; a later restore
of the same snapshot with ``--prefetch-order FILE`` brings those pages in first (and, with
``--prefetch working-set``, only those). The file is JSON: runs of consecutive pages, in order::

    {"format": "pagewarden.access-order", "version": 1, "address_space": "image-offset",
     "page_size": 4096, "pages": 3, "ranges": [[4096, 2], [65536, 1]]}
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pagewarden as pw

FORMAT = "pagewarden.access-order"
VERSION = 1


def _error(path: str | os.PathLike[str], reason: str) -> pw.ConfigurationError:
    return pw.ConfigurationError(errno.EINVAL, f"access-order file {os.fspath(path)}: {reason}")


def runs(addresses: Sequence[int], page_size: int) -> list[tuple[int, int]]:
    """Consecutive pages merged into ``(first_address, page_count)`` runs, order kept."""
    out: list[list[int]] = []
    for address in addresses:
        if out and out[-1][0] + out[-1][1] * page_size == address:
            out[-1][1] += 1
        else:
            out.append([address, 1])
    return [(a, n) for a, n in out]


def save(path: str | os.PathLike[str], addresses: Sequence[int], page_size: int) -> None:
    """Writes the access order atomically."""
    ranges = runs(addresses, page_size)
    body = {
        "format": FORMAT,
        "version": VERSION,
        "address_space": "image-offset",
        "page_size": page_size,
        "pages": len(addresses),
        "ranges": ranges,
    }
    tmp = Path(f"{os.fspath(path)}.tmp")
    with open(tmp, "w") as f:
        json.dump(body, f)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | os.PathLike[str], memory_size: int | None = None) -> list[tuple[int, int]]:
    """Reads an access order as ``(offset, length)`` byte ranges; with ``memory_size``, every
    range must lie inside the memory file. ConfigurationError says what is wrong."""
    try:
        data: Any = json.loads(Path(path).read_text())
    except OSError as e:
        raise _error(path, e.strerror or str(e)) from None
    except ValueError as e:
        raise _error(path, f"not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _error(path, f"not an access-order file (its `format` is not {FORMAT!r})")
    if data.get("version") != VERSION:
        raise _error(path, f"version {data.get('version')!r} is not {VERSION}")
    page_size = data.get("page_size")
    if page_size not in (4096, 2 << 20):
        raise _error(path, f"page_size {page_size!r} is not 4096 or 2097152")
    ranges = data.get("ranges")
    if not isinstance(ranges, list):
        raise _error(path, "`ranges` is not a list")
    out: list[tuple[int, int]] = []
    for i, item in enumerate(ranges):
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in item)
            or item[1] == 0
            or item[0] % page_size
        ):
            raise _error(path, f"ranges[{i}] = {item!r} is not [page-aligned offset, pages > 0]")
        start, length = item[0], item[1] * page_size
        if memory_size is not None and start + length > memory_size:
            raise _error(
                path,
                f"ranges[{i}] = {start:#x}+{length:#x} is past the end of guest memory "
                f"({memory_size:#x} bytes): recorded from another snapshot?",
            )
        out.append((start, length))
    return out
