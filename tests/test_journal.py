"""The poison journal: replayed and merged at start, complete on its own, durable before a
poisoning is acknowledged, tolerant of a torn last record, strict about any other damage."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
from conftest import PAGE, make_image, verify

import pagewarden as pw


def test_journal_holds_initial_and_runtime_poison(uffd: None, tmp_path: Path) -> None:
    journal = tmp_path / "poison.journal"
    image = make_image(64 * PAGE, seed=31)
    mem = pw.GuestMemory.anonymous(64 * PAGE)
    with pw.Handler(
        mem, pw.MemorySource(image), poison=pw.PoisonSet([PAGE, 9 * PAGE]), poison_journal=journal
    ) as h:
        assert h.poison_journal == journal
        assert sorted(pw.PoisonSet.load(journal)) == [PAGE, 9 * PAGE]
        h.start()
        h.poison(20 * PAGE)
        # Acknowledged means on disk: read it back through a fresh file object.
        assert sorted(pw.PoisonSet.load(journal)) == [PAGE, 9 * PAGE, 20 * PAGE]
        assert h.wait(timeout=30)

    # A new handler (the next host, or a restarted daemon) replays it with no poison= at all.
    mem2 = pw.GuestMemory.anonymous(64 * PAGE)
    with pw.Handler(mem2, pw.MemorySource(image), poison_journal=journal) as h2:
        h2.start()
        assert h2.wait(timeout=30)
        verify(mem2, mem2.touch(), image, [PAGE, 9 * PAGE, 20 * PAGE])
        assert sorted(h2.poison_set()) == [PAGE, 9 * PAGE, 20 * PAGE]
    assert journal.read_text().count("\n+ ") == 3, "replay must not append duplicates"


def test_torn_tail_is_ignored_with_a_warning(uffd: None, tmp_path: Path) -> None:
    journal = tmp_path / "poison.journal"
    mem = pw.GuestMemory.anonymous(16 * PAGE)
    with pw.Handler(mem, pw.ZeroSource(), poison=pw.PoisonSet([2 * PAGE]), poison_journal=journal):
        pass
    with journal.open("a") as f:
        f.write("+ 0x5000 0x10")  # a crash in the middle of an append
    with pytest.warns(pw.PoisonJournalWarning, match="torn"):
        assert sorted(pw.PoisonSet.load(journal)) == [2 * PAGE]
    mem2 = pw.GuestMemory.anonymous(16 * PAGE)
    with pytest.warns(pw.PoisonJournalWarning, match="torn"):
        h = pw.Handler(mem2, pw.ZeroSource(), poison_journal=journal)
    with h:
        h.start()
        h.poison(7 * PAGE)
    # The torn tail was cut off before appending: the file is whole again.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(pw.PoisonSet.load(journal)) == [2 * PAGE, 7 * PAGE]


def test_damage_before_the_tail_is_an_error(uffd: None, tmp_path: Path) -> None:
    journal = tmp_path / "poison.journal"
    mem = pw.GuestMemory.anonymous(16 * PAGE)
    with pw.Handler(
        mem, pw.ZeroSource(), poison=pw.PoisonSet([PAGE, 4 * PAGE]), poison_journal=journal
    ):
        pass
    lines = journal.read_text().splitlines(keepends=True)
    assert len(lines) == 3
    lines[1] = lines[1].replace("0x1000 ", "0x3000 ")  # checksum no longer matches
    journal.write_text("".join(lines))
    with pytest.raises(pw.PoisonFileError, match="damaged") as info:
        pw.Handler(mem, pw.ZeroSource(), poison_journal=journal)
    assert str(journal) in str(info.value)
    # Nothing was registered: the memory can still be served.
    with pw.Handler(mem, pw.ZeroSource(), prefetch=True) as h:
        h.start()
        assert h.wait(timeout=10)


CHILD = textwrap.dedent(
    """
    import sys
    import pagewarden as pw
    journal, seed = sys.argv[1], int(sys.argv[2])
    mem = pw.GuestMemory.anonymous(4096 * 4096)
    h = pw.Handler(mem, pw.ZeroSource(), prefetch=False, poison_journal=journal)
    h.start()
    print("READY", flush=True)
    import random
    rng = random.Random(seed)
    while True:
        gpa = rng.randrange(4096) * 4096
        h.poison(gpa)
        print(f"ACK {gpa}", flush=True)
    """
)


def test_kill_9_loses_no_acknowledged_poison(uffd: None, tmp_path: Path) -> None:
    journal = tmp_path / "poison.journal"
    rng = random.Random(7)
    acknowledged: set[int] = set()
    for round_ in range(15):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(journal), str(round_)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "READY"
        time.sleep(rng.uniform(0.005, 0.08))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        for line in out.splitlines():
            if line.startswith("ACK ") and line.endswith(tuple("0123456789")):
                acknowledged.add(int(line.split()[1]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pw.PoisonJournalWarning)
            recorded = set(pw.PoisonSet.load(journal))
        lost = acknowledged - recorded
        assert not lost, f"round {round_}: acknowledged poison lost: {sorted(lost)[:5]}"
    assert len(acknowledged) > 15, "the children acknowledged too little to prove anything"
