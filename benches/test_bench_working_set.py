"""pytest-benchmark: the working-set touch after a restore, address-order prefetch against a
replayed access log (see benches/working_set.py)."""

from __future__ import annotations

from typing import Any

from working_set import measure


def test_working_set_replay(benchmark: Any) -> None:
    result = benchmark.pedantic(lambda: measure(64, 0.05, 1), rounds=3)
    # Replay brings the working set in before the guest asks for most of it.
    assert result["recorded order"][1] <= result["address order"][1]
