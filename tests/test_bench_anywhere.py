"""``pagewarden bench`` from an installed package, anywhere: the C baseline's source and the
pure-Python handler ship in ``pagewarden.baselines`` (scripts/wheel-test runs this file against
the installed wheel), the C program is compiled at run time, and a machine without a C compiler
skips the sections that need it with a note instead of failing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pagewarden as pw
from pagewarden import baselines, bench


def test_the_baselines_ship_in_the_package() -> None:
    assert baselines.C_BASELINE.is_file()
    assert baselines.C_BASELINE.read_text().count("UFFDIO_COPY") > 0
    pph = bench.load_pure_python_handler()
    assert pph.__name__ == "pagewarden.baselines.pure_python_handler"
    assert hasattr(pph, "PythonHandler")
    # Nothing is looked up outside the package.
    assert Path(pw.__file__).resolve().parent in baselines.C_BASELINE.resolve().parents


def _bench(tmp_path: Path, *args: str, path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "PAGEWARDEN_BENCHES")}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(
        [sys.executable, "-m", "pagewarden", "bench", "--quick", "--repetitions", "1", *args],
        cwd=tmp_path,  # not a checkout: nothing next to the working directory helps
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_without_a_c_compiler_the_sections_that_need_it_are_skipped_with_a_note(
    tmp_path: Path,
) -> None:
    done = _bench(tmp_path, "--only", "faults", "--only", "policy", path=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "no C compiler" in done.stdout, done.stdout
    assert "needs the repository" not in done.stdout + done.stderr
    # The sections that do not need it ran.
    assert "Python policies" in done.stdout or "on_fault" in done.stdout, done.stdout


def test_with_a_compiler_the_c_baseline_builds_from_the_package(tmp_path: Path) -> None:
    if bench.find_c_compiler() is None:
        # A machine without a compiler is covered by the test above; here there is nothing to
        # build with (CI images have gcc: scripts/test installs nothing else).
        assert _bench(tmp_path, "--only", "gil").returncode == 0
        return
    binary = bench.compile_c_baseline(tmp_path)
    assert binary is not None and binary.is_file() and os.access(binary, os.X_OK)
