"""docs/tutorial.md works as written: its files are extracted and its commands run in order, in
an empty directory, and each command's output must match what the page shows.

The page is read as a literate script. A fenced block whose info string has a ``title="NAME"``
writes the file NAME (a later block with the same title appends to it). A ``console`` block holds
commands (lines that start with ``$ ``), each followed by the standard output it must print; a
line that is just ``...`` stands for any number of lines. ``python3`` and ``pagewarden`` at the
start of a command run with this interpreter, so the commands exercise the package under test.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TUTORIAL = Path(__file__).resolve().parent.parent / "docs" / "tutorial.md"
FENCE = re.compile(r"^(`{3,}|~{3,})\s*(.*)$")
TITLE = re.compile(r'title="([^"]+)"')


@dataclass
class Block:
    info: str
    text: str
    line: int


def read_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, info, start = m.group(1), m.group(2).strip(), i + 1
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].startswith(fence[0] * len(fence)):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path}:{start}: code block is never closed")
        blocks.append(Block(info, "\n".join(body) + "\n", start))
        i += 1
    return blocks


def console_steps(block: Block) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) pairs of a console block."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif steps:
            steps[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"tutorial.md:{block.line}: output before any command: {line!r}")
    return steps


def output_matches(expected: list[str], actual: str) -> bool:
    """Whether ``actual`` is ``expected`` line by line, a line ``...`` matching any lines."""
    pattern = "".join(
        r"(?:.*\n)*?" if line == "..." else re.escape(line.rstrip()) + r"[ \t]*\n"
        for line in expected
    )
    text = "".join(line.rstrip() + "\n" for line in actual.splitlines())
    return re.fullmatch(pattern, text) is not None


def localize(command: str) -> str:
    """The command with ``python3``/``pagewarden`` at its start bound to this interpreter."""
    python = shlex.quote(sys.executable)
    command = re.sub(r"^python3(?=\s)", python, command)
    return re.sub(r"^pagewarden(?=\s)", f"{python} -m pagewarden", command)


def test_tutorial_blocks_are_well_formed() -> None:
    assert TUTORIAL.is_file(), f"{TUTORIAL} is missing (the tests expect docs/ beside tests/)"
    blocks = read_blocks(TUTORIAL)
    files: dict[str, str] = {}
    for block in blocks:
        title = TITLE.search(block.info)
        if title is not None:
            name = title.group(1)
            files[name] = files[name] + "\n" + block.text if name in files else block.text
    assert set(files) >= {"source.py", "destination.py", "crash.py"}, sorted(files)
    for name, text in files.items():
        compile(text, name, "exec")
    consoles = [b for b in blocks if b.info == "console"]
    assert consoles, "the tutorial shows no commands"
    for block in consoles:
        assert console_steps(block), f"tutorial.md:{block.line}: a console block with no command"


@pytest.mark.usefixtures("uffd")
def test_tutorial_runs_as_written(tmp_path: Path) -> None:
    files: dict[str, str] = {}
    ran = 0
    for block in read_blocks(TUTORIAL):
        title = TITLE.search(block.info)
        if title is not None:
            name = title.group(1)
            files[name] = files[name] + "\n" + block.text if name in files else block.text
            (tmp_path / name).write_text(files[name], encoding="utf-8")
            continue
        if block.info != "console":
            continue
        for command, expected in console_steps(block):
            proc = subprocess.run(
                ["bash", "-c", localize(command)],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=90,
                check=False,
            )
            where = f"tutorial.md:{block.line}: `{command}`"
            assert proc.returncode == 0, (
                f"{where} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
            assert output_matches(expected, proc.stdout), (
                f"{where} printed:\n{proc.stdout}\nbut the tutorial shows:\n"
                + "\n".join(expected)
                + f"\nstderr:\n{proc.stderr}"
            )
            ran += 1
    assert ran >= 6, f"only {ran} tutorial commands ran"


@pytest.mark.parametrize(
    ("expected", "actual", "ok"),
    [
        (["a", "b"], "a\nb\n", True),
        (["a", "b"], "a\nb", True),
        (["a", "b"], "a\nc\n", False),
        (["...", "b"], "x\ny\nb\n", True),
        (["...", "b"], "b\n", True),
        (["a", "..."], "a\n", True),
        (["a"], "a\nb\n", False),
        (["a."], "ab\n", False),
    ],
)
def test_output_matching(expected: list[str], actual: str, ok: bool) -> None:
    assert output_matches(expected, actual) is ok
