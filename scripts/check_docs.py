#!/usr/bin/env python3
"""The docs build: checks pagewarden's Markdown (docs/, README.md, CHANGELOG.md, SECURITY.md)
and fails on anything a reader would trip over. Plain Markdown needs no site generator; this is
what stands in for one's strict mode.

- Every code block is closed.
- Every relative link points at a file in the repository, and every `#anchor` at a heading
  of the page it names (anchors as the common Markdown hosts make them).
- Every Python example compiles (blocks with the same `title="NAME"` are joined first, as the
  tutorial's test joins them; `python signature` blocks of the API reference are declarations).
- Every `pagewarden ...` command in a shell or console block is one the CLI accepts (parsed
  with the real argument parser, so a renamed option or a removed command fails here).
- Every page in docs/ is linked from docs/index.md.

External links are not fetched (CI has no general network access); they are listed with -v.

    python scripts/check_docs.py [-v]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "CHANGELOG.md", "SECURITY.md", "docs/*.md"]
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`]*)$")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(
    r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)"
)
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
AUTOLINK = re.compile(r"<(https?://[^>\s]+)>")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
TITLE = re.compile(r'title="([^"]+)"')
SHELL_LANGS = {"sh", "shell", "bash", "console"}


@dataclass
class Block:
    lang: str
    info: str
    text: str
    line: int


@dataclass
class Page:
    path: Path
    headings: list[str] = field(default_factory=list)
    links: list[tuple[int, str]] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)


def slug(text: str) -> str:
    """A heading's anchor, as GitHub, GitLab and gen_api_docs.py make it."""
    text = INLINE_LINK.sub(r"\1", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def parse(path: Path, problems: list[str]) -> Page:
    page = Page(path)
    rel = path.relative_to(ROOT)
    seen: dict[str, int] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            marker, info = fence.group(1), fence.group(2).strip()
            start = i + 1
            body: list[str] = []
            i += 1
            closing = re.compile(rf"^ {{0,3}}{re.escape(marker[0])}{{{len(marker)},}}\s*$")
            while i < len(lines) and not closing.match(lines[i]):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                problems.append(f"{rel}:{start}: code block is never closed")
                break
            lang = info.split()[0] if info else ""
            page.blocks.append(Block(lang, info, "\n".join(body) + "\n", start))
            i += 1
            continue
        heading = HEADING.match(line)
        if heading:
            anchor = slug(heading.group(2))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            page.headings.append(anchor if count == 0 else f"{anchor}-{count}")
        text = CODE_SPAN.sub("", line)
        for match in INLINE_LINK.finditer(text):
            page.links.append((i + 1, match.group(2)))
        for match in AUTOLINK.finditer(text):
            page.links.append((i + 1, match.group(1)))
        ref = REFERENCE_DEF.match(text)
        if ref:
            page.links.append((i + 1, ref.group(1)))
        i += 1
    return page


def check_links(pages: dict[Path, Page], problems: list[str], verbose: bool) -> None:
    for page in pages.values():
        rel = page.path.relative_to(ROOT)
        for line, target in page.links:
            where = f"{rel}:{line}"
            if not target:
                problems.append(f"{where}: empty link target")
                continue
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                if not target.startswith(("https://", "http://", "mailto:")):
                    problems.append(f"{where}: unexpected link scheme: {target}")
                elif verbose:
                    print(f"{where}: external link (not fetched): {target}")
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.path.parent / path_part).resolve() if path_part else page.path
            if ROOT not in dest.parents and dest != ROOT:
                problems.append(f"{where}: link leaves the repository: {target}")
                continue
            if not dest.exists():
                problems.append(
                    f"{where}: broken link: {target} ({dest.relative_to(ROOT)} does not exist)"
                )
                continue
            if anchor:
                if dest.suffix != ".md":
                    problems.append(f"{where}: anchor into a file that is not Markdown: {target}")
                    continue
                target_page = pages.get(dest) or parse(dest, problems)
                if anchor not in target_page.headings:
                    problems.append(
                        f"{where}: no heading `#{anchor}` in {dest.relative_to(ROOT)} "
                        f"(link {target})"
                    )


def check_python(page: Page, problems: list[str]) -> None:
    rel = page.path.relative_to(ROOT)
    titled: dict[str, tuple[int, str]] = {}
    for block in page.blocks:
        # API signatures (`python signature`) are declarations, not code to run.
        if block.lang not in ("python", "py") or "signature" in block.info.split():
            continue
        title = TITLE.search(block.info)
        if title is None:
            sources = [(block.line, block.text)]
        else:
            name = title.group(1)
            first, text = titled.get(name, (block.line, ""))
            titled[name] = (first, text + ("\n" if text else "") + block.text)
            continue
        for line, text in sources:
            try:
                compile(text, f"{rel}:{line}", "exec")
            except SyntaxError as e:
                problems.append(f"{rel}:{line + (e.lineno or 1)}: Python example: {e.msg}")
    for name, (line, text) in titled.items():
        try:
            compile(text, name, "exec")
        except SyntaxError as e:
            problems.append(
                f"{rel}:{line}: Python file {name} (joined blocks), line {e.lineno}: {e.msg}"
            )


def shell_commands(block: Block) -> list[tuple[int, str]]:
    """(line, command) of every command line in a shell or console block."""
    commands: list[tuple[int, str]] = []
    pending = ""
    pending_line = 0
    for offset, raw in enumerate(block.text.splitlines()):
        line = raw.rstrip()
        if block.lang == "console" and not pending:
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        if not pending:
            pending_line = block.line + offset + 1
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        try:
            shlex.split(pending + line, comments=True)
        except ValueError:
            pending += line + "\n"  # a quoted string goes on on the next line
            continue
        commands.append((pending_line, pending + line))
        pending = ""
    if pending:
        commands.append((pending_line, pending))
    return commands


def check_cli(page: Page, problems: list[str]) -> None:
    from pagewarden.cli import build_parser

    rel = page.path.relative_to(ROOT)
    for block in page.blocks:
        if block.lang not in SHELL_LANGS:
            continue
        for line, command in shell_commands(block):
            for segment in re.split(r"\s*(?:;|&&|\|\||\|)\s*", command):
                try:
                    words = shlex.split(segment, comments=True)
                except ValueError as e:
                    problems.append(f"{rel}:{line}: cannot split `{segment}`: {e}")
                    continue
                if words[:3] == ["python3", "-m", "pagewarden"]:
                    words = ["pagewarden", *words[3:]]
                if not words or words[0] != "pagewarden":
                    continue
                stderr = io.StringIO()
                try:
                    with (
                        contextlib.redirect_stderr(stderr),
                        contextlib.redirect_stdout(io.StringIO()),
                    ):
                        build_parser().parse_args(words[1:])
                except SystemExit as e:
                    if e.code not in (0, None):
                        message = stderr.getvalue().strip().splitlines()
                        problems.append(
                            f"{rel}:{line}: the CLI rejects `{segment}`: "
                            + (message[-1] if message else f"exit {e.code}")
                        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="list external links")
    args = parser.parse_args()
    files: list[Path] = []
    for pattern in PAGES:
        found = sorted(ROOT.glob(pattern))
        if not found:
            print(f"check_docs: nothing matches {pattern}", file=sys.stderr)
            return 1
        files += found
    problems: list[str] = []
    pages = {path.resolve(): parse(path.resolve(), problems) for path in files}
    check_links(pages, problems, args.verbose)
    for page in pages.values():
        check_python(page, problems)
        check_cli(page, problems)
    index = pages.get((ROOT / "docs" / "index.md").resolve())
    if index is None:
        problems.append("docs/index.md is missing")
    else:
        linked = {
            (index.path.parent / target.partition("#")[0]).resolve()
            for _, target in index.links
            if target.partition("#")[0]
        }
        for path in pages:
            if path.parent == index.path.parent and path != index.path and path not in linked:
                problems.append(f"{path.relative_to(ROOT)}: not linked from docs/index.md")
    for problem in problems:
        print(problem, file=sys.stderr)
    blocks = sum(len(p.blocks) for p in pages.values())
    links = sum(len(p.links) for p in pages.values())
    if problems:
        print(f"check_docs: {len(problems)} problems", file=sys.stderr)
        return 1
    print(f"docs: {len(pages)} pages, {links} links, {blocks} code blocks checked, no problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
