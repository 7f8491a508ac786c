"""The contenders ``pagewarden bench`` measures pagewarden against, shipped in the package so that
an installed wheel runs the benchmark anywhere (``pip install pagewarden && pagewarden bench
--quick``):

- ``uffd_baseline.c``: a plain C userfaultfd handler (poll + read + ioctl per fault, as in
  userfaultfd(2)) and the kernel bounds, compiled at run time with the machine's C compiler;
  without one, the sections that need it are skipped with a note.
- :mod:`pagewarden.baselines.pure_python_handler`: a pure-Python handler (standard library only).
"""

from __future__ import annotations

from pathlib import Path

C_BASELINE: Path = Path(__file__).resolve().parent / "uffd_baseline.c"
"""The C baseline's source file."""
