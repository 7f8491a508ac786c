"""``pagewarden poison show|merge|diff|convert``: inspect and edit poison lists.

Every command reads the three forms a poison list takes: a versioned JSON poison file
(``PoisonSet.save``), a poison journal (``Handler(poison_journal=...)``), and a plain text list of
guest addresses (one per line, hexadecimal with ``0x`` or decimal; ``#`` starts a comment).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pagewarden as pw

MAP_WIDTH = 64


def _text_error(path: str | os.PathLike[str], reason: str) -> pw.PoisonFileError:
    return pw.PoisonFileError(22, f"poison file {os.fspath(path)}: {reason}")


def parse_text(text: str, path: str | os.PathLike[str], page_size: int) -> pw.PoisonSet:
    """Parses a plain text list of guest addresses into a set with ``page_size``."""
    poison = pw.PoisonSet(page_size=page_size)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            address = int(line, 0)
        except ValueError:
            raise _text_error(path, f"line {number}: {line!r} is not a guest address") from None
        if address < 0 or address % page_size:
            raise _text_error(
                path,
                f"line {number}: guest address {address:#x} is not aligned to the page size "
                f"{page_size:#x} (use --page-size)",
            )
        poison.add(address)
    return poison


def load_any(path: str | os.PathLike[str], page_size: int = 4096) -> tuple[pw.PoisonSet, str]:
    """Loads a JSON poison file, a journal or a text list; returns the set and the form's name."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise _text_error(path, e.strerror or str(e)) from None
    # JSON files and journals are parsed (with their own error messages) by PoisonSet.load.
    if data.lstrip().startswith(b"{"):
        return pw.PoisonSet.load(path), "json"
    if data.startswith(b"pagewarden-poison-journal"):
        return pw.PoisonSet.load(path), "journal"
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise _text_error(path, "neither JSON, a journal, nor a text list of addresses") from None
    return parse_text(text, path, page_size), "text"


def to_text(poison: pw.PoisonSet) -> str:
    """The plain text form: one guest address per line, in hexadecimal."""
    header = f"# pagewarden poison list, page_size={poison.page_size}, {len(poison)} pages\n"
    return header + "".join(f"{address:#x}\n" for address in poison)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def poison_map(poison: pw.PoisonSet, guest_size: int, width: int = MAP_WIDTH) -> str:
    """A one-line map of guest memory: each cell is 1/width of it; '.' clean, ':' a few poisoned
    pages, '#' more than 1% of the cell's pages poisoned."""
    if guest_size <= 0:
        return ""
    cell = max(guest_size // width, 1)
    counts = [0] * width
    for start, length in poison.ranges():
        address = start
        end = start + length
        while address < end:
            index = min(address // cell, width - 1)
            cell_end = min((index + 1) * cell, end) if index < width - 1 else end
            counts[index] += max((cell_end - address) // poison.page_size, 1)
            address = cell_end
    pages_per_cell = max(cell // poison.page_size, 1)
    chars = []
    for n in counts:
        chars.append("." if n == 0 else "#" if n * 100 > pages_per_cell else ":")
    return "".join(chars)


def show(path: str, guest_size: int | None, page_size: int, limit: int = 20) -> str:
    """The report ``poison show`` prints."""
    poison, form = load_any(path, page_size)
    ranges = poison.ranges()
    lines = [
        f"file        {path} ({form})",
        f"page size   {poison.page_size}",
        f"pages       {len(poison)}",
        f"bytes       {len(poison) * poison.page_size} ({_human(len(poison) * poison.page_size)})",
        f"ranges      {len(ranges)}",
    ]
    for start, length in ranges[:limit]:
        lines.append(
            f"  {start:#014x} .. {start + length:#014x}  {length // poison.page_size} pages"
        )
    if len(ranges) > limit:
        lines.append(f"  ... {len(ranges) - limit} more ranges")
    size = guest_size
    if size is None and ranges:
        end = ranges[-1][0] + ranges[-1][1]
        size = 1 << max(end - 1, 1).bit_length()
    if size:
        lines.append(
            f"map of 0 .. {size:#x} ({_human(size)}), one cell = {_human(size // MAP_WIDTH)}:"
        )
        lines.append(f"  |{poison_map(poison, size)}|")
    return "\n".join(lines)


def _save(poison: pw.PoisonSet, out: str, to: str | None) -> None:
    form = to or ("text" if out.endswith((".txt", ".list")) else "json")
    if form == "text":
        tmp = f"{out}.tmp"
        with open(tmp, "w") as f:
            f.write(to_text(poison))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    else:
        poison.save(out)


def _cmd_show(args: argparse.Namespace) -> int:
    print(show(args.file, args.size, args.page_size))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    merged: pw.PoisonSet | None = None
    for path in args.inputs:
        poison, _ = load_any(path, args.page_size)
        merged = poison if merged is None else merged | poison
    assert merged is not None
    _save(merged, args.out, args.to)
    print(f"{args.out}: {len(merged)} pages in {len(merged.ranges())} ranges", file=sys.stderr)
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    a, _ = load_any(args.a, args.page_size)
    b, _ = load_any(args.b, args.page_size)
    size = min(a.page_size, b.page_size)
    a, b = a.with_page_size(size), b.with_page_size(size)
    only_a = [x for x in a if x not in b]
    only_b = [x for x in b if x not in a]
    for label, addresses in ((f"only in {args.a}", only_a), (f"only in {args.b}", only_b)):
        if addresses:
            diff = pw.PoisonSet(addresses, page_size=size)
            print(f"{label}: {len(diff)} pages")
            for start, length in diff.ranges():
                print(f"  {start:#014x} .. {start + length:#014x}  {length // size} pages")
    if not only_a and not only_b:
        print(f"same poison: {len(a)} pages")
        return 0
    return 1


def _cmd_convert(args: argparse.Namespace) -> int:
    poison, form = load_any(args.input, args.page_size)
    _save(poison, args.output, args.to)
    print(f"{args.input} ({form}) -> {args.output}: {len(poison)} pages", file=sys.stderr)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``poison`` and its subcommands to the CLI."""
    from pagewarden.demo import parse_size

    p = sub.add_parser("poison", help="inspect, merge, compare and convert poison lists")
    psub = p.add_subparsers(dest="poison_command", metavar="SUBCOMMAND", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--page-size", type=int, default=4096, help="page size of text lists (4096)")

    q = psub.add_parser("show", help="count, ranges, bytes and a map of where the poison sits")
    q.add_argument("file")
    q.add_argument("--size", type=parse_size, default=None, help="guest size, for the map")
    common(q)
    q.set_defaults(func=_cmd_show)
    q = psub.add_parser("merge", help="union of poison lists into OUT")
    q.add_argument("out")
    q.add_argument("inputs", nargs="+", metavar="IN")
    q.add_argument("--to", choices=["json", "text"], default=None)
    common(q)
    q.set_defaults(func=_cmd_merge)
    q = psub.add_parser("diff", help="pages in one list and not the other (exit 1 if any)")
    q.add_argument("a")
    q.add_argument("b")
    common(q)
    q.set_defaults(func=_cmd_diff)
    q = psub.add_parser("convert", help="between JSON, journal (read only) and text lists")
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument("--to", choices=["json", "text"], default=None, help="default: by extension")
    common(q)
    q.set_defaults(func=_cmd_convert)
