"""``pagewarden demo --remote``: the source side in another process, verified byte for byte."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.usefixtures("uffd")


def test_demo_remote_verifies_every_page() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pagewarden", "demo", "--remote", "--size", "16M"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: every page byte-exact, every poisoned page SIGBUSed" in done.stdout
    assert "page server (pagewarden serve) listening on 127.0.0.1:" in done.stdout
    assert "remote requests urgent / bulk" in done.stdout
