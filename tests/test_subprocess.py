"""A real guest access to a poisoned page dies of SIGBUS: no test harness catches it."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CHILD = textwrap.dedent(
    """
    import ctypes, random, resource, sys
    import pagewarden as pw

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    kind, poisoned = sys.argv[1], int(sys.argv[2], 0)
    size = 0x40000
    image = random.Random(1).randbytes(size)
    if kind == "anon":
        mem = pw.GuestMemory.anonymous(size)
    else:
        mem = pw.GuestMemory.memfd(size)
    h = pw.Handler(mem, pw.MemorySource(image), poison=pw.PoisonSet([poisoned]), prefetch=False)
    h.start()
    # A good page first: a plain load (it faults, and the handler serves it).
    good = ctypes.string_at(mem.host_address_of(0x1000), 8)
    if good != image[0x1000:0x1008]:
        print("WRONG BYTES", good.hex(), image[0x1000:0x1008].hex(), flush=True)
        sys.exit(3)
    print("good page ok", flush=True)
    data = ctypes.string_at(mem.host_address_of(poisoned), 8)
    print("READ POISONED PAGE", data.hex(), flush=True)
    sys.exit(0)
    """
)


@pytest.mark.usefixtures("uffd")
@pytest.mark.parametrize("kind", ["anon", "shmem"])
@pytest.mark.parametrize("poisoned", [0x0, 0x5000, 0x3F000], ids=["first", "middle", "last"])
def test_load_of_poisoned_page_kills_with_sigbus(kind: str, poisoned: int, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.run(
        [sys.executable, str(script), kind, hex(poisoned)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert "good page ok" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)
    assert "READ POISONED PAGE" not in proc.stdout, proc.stdout
    assert proc.returncode == -signal.SIGBUS == -7, (proc.returncode, proc.stdout, proc.stderr)
