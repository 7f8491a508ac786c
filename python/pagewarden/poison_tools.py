"""``pagewarden poison show|merge|diff|convert|translate``: inspect and edit poison lists.

Every command reads the three forms a poison list takes: a versioned JSON poison file
(``PoisonSet.save``), a poison journal (``Handler(poison_journal=...)``), and a plain text list of
addresses (one per line, hexadecimal with ``0x`` or decimal; ``#`` starts a comment).

Every list names its addresses in one of two spaces, and the two are never taken for each other:
``image-offset`` (offsets in the guest memory image or Firecracker's memory file: what pagewarden
calls guest addresses; JSON poison files and journals are always this) and ``guest-physical``
(what a guest's kernel log or a machine-check report names: a ``pagewarden.poison-gpa`` JSON file,
or a text list). A text list says which in a comment line ``# address-space: guest-physical``
(or ``image-offset``); one that does not say is refused where the space matters, unless the
command is told (``--address-space``, or an option such as ``--poison-gpa-file`` whose name says
it).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pagewarden as pw

MAP_WIDTH = 64
IMAGE_OFFSET = "image-offset"
GUEST_PHYSICAL = "guest-physical"
ADDRESS_SPACES = (IMAGE_OFFSET, GUEST_PHYSICAL)
#: The JSON ``format`` of a guest-physical list (an image-offset file is "pagewarden.poison").
GPA_FORMAT = "pagewarden.poison-gpa"
_SPACE_LINE = re.compile(r"^\s*#\s*address-space\s*:\s*(\S+)\s*$", re.IGNORECASE)
# Text lists written by earlier pagewarden versions (from a PoisonSet: image offsets).
_OLD_HEADER = "# pagewarden poison list, page_size="


def _text_error(path: str | os.PathLike[str], reason: str) -> pw.PoisonFileError:
    return pw.PoisonFileError(22, f"poison file {os.fspath(path)}: {reason}")


def text_address_space(text: str, path: str | os.PathLike[str]) -> str | None:
    """The address space a text list declares (``# address-space: ...``), or None."""
    found: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        if number == 1 and raw.startswith(_OLD_HEADER):
            found = IMAGE_OFFSET
        m = _SPACE_LINE.match(raw)
        if m is None:
            continue
        space = m.group(1).lower()
        if space not in ADDRESS_SPACES:
            raise _text_error(
                path,
                f"line {number}: address space {m.group(1)!r} is neither "
                f"{IMAGE_OFFSET!r} nor {GUEST_PHYSICAL!r}",
            )
        if found is not None and found != space and not raw.startswith(_OLD_HEADER):
            raise _text_error(path, f"line {number}: a second, different address space")
        found = space
    return found


def parse_text(text: str, path: str | os.PathLike[str], page_size: int) -> pw.PoisonSet:
    """Parses a plain text list of addresses into a set with ``page_size`` (the address space
    is read separately: ``text_address_space``)."""
    poison = pw.PoisonSet(page_size=page_size)
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            address = int(line, 0)
        except ValueError:
            raise _text_error(path, f"line {number}: {line!r} is not an address") from None
        if address < 0 or address % page_size:
            raise _text_error(
                path,
                f"line {number}: address {address:#x} is not aligned to the page size "
                f"{page_size:#x} (use --page-size)",
            )
        poison.add(address)
    return poison


@dataclass
class PoisonList:
    """A poison list read from a file: the pages, the file's form and its address space."""

    poison: pw.PoisonSet
    """The pages, in ``space``."""
    form: str
    """``json``, ``json-gpa``, ``journal`` or ``text``."""
    space: str | None
    """``image-offset``, ``guest-physical``, or None for a text list that does not say."""


def _load_gpa_json(data: bytes, path: str | os.PathLike[str]) -> pw.PoisonSet:
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or obj.get("format") != GPA_FORMAT:
        raise _text_error(path, "not a guest-physical poison list")
    if obj.get("address_space", GUEST_PHYSICAL) != GUEST_PHYSICAL:
        raise _text_error(
            path, f"format {GPA_FORMAT!r} with address_space {obj['address_space']!r}"
        )
    # The same validation as an image-offset file: the two differ only in what they name.
    obj["format"] = "pagewarden.poison"
    obj.pop("address_space", None)
    return pw.PoisonSet.from_json(json.dumps(obj), os.fspath(path))


def load_list(path: str | os.PathLike[str], page_size: int = 4096) -> PoisonList:
    """Reads a JSON poison file, a guest-physical JSON list, a journal or a text list."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise _text_error(path, e.strerror or str(e)) from None
    # JSON files and journals are parsed (with their own error messages) by PoisonSet.load.
    if data.lstrip().startswith(b"{"):
        if GPA_FORMAT.encode() in data[:200]:
            return PoisonList(_load_gpa_json(data, path), "json-gpa", GUEST_PHYSICAL)
        return PoisonList(pw.PoisonSet.load(path), "json", IMAGE_OFFSET)
    if data.startswith(b"pagewarden-poison-journal"):
        return PoisonList(pw.PoisonSet.load(path), "journal", IMAGE_OFFSET)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise _text_error(path, "neither JSON, a journal, nor a text list of addresses") from None
    space = text_address_space(text, path)
    return PoisonList(parse_text(text, path, page_size), "text", space)


def space_remedy() -> str:
    """What to add to a text list that does not say its address space."""
    return (
        f"add the line `# address-space: {GUEST_PHYSICAL}` (addresses from the guest's kernel "
        f"log or a machine-check report) or `# address-space: {IMAGE_OFFSET}` (offsets in the "
        "memory image or Firecracker's memory file) to it"
    )


def load_in_space(
    path: str | os.PathLike[str],
    space: str,
    page_size: int = 4096,
    assume: str | None = None,
) -> pw.PoisonSet:
    """Reads a poison list that must name ``space`` addresses. A text list that does not say
    is taken as ``assume`` when given (an option whose name states the space), and refused
    otherwise; a list in the other space is refused. PoisonFileError says what to do."""
    return _in_space(load_list(path, page_size), path, space, assume)


def _in_space(
    loaded: PoisonList, path: str | os.PathLike[str], space: str, assume: str | None = None
) -> pw.PoisonSet:
    found = loaded.space or assume
    if found is None:
        raise _text_error(
            path, f"the text list does not say which addresses it holds: {space_remedy()}"
        )
    if found != space:
        hint = (
            "give it with --poison-gpa-file (pagewarden firecracker translates it with the VM's "
            "layout), or translate it with `pagewarden poison translate`"
            if found == GUEST_PHYSICAL
            else "give it with --poison, or translate it with `pagewarden poison translate`"
        )
        raise _text_error(path, f"it lists {found} addresses, {space} addresses are needed: {hint}")
    return loaded.poison


def load_by_space(
    path: str | os.PathLike[str], what: str = "poison"
) -> tuple[pw.PoisonSet | None, pw.PoisonSet | None]:
    """Reads a list that says its address space; returns it as (image offsets, None) or (None,
    guest-physical addresses). A text list that does not say is a PoisonFileError naming
    ``what`` (the option or field it came from) and the remedy."""
    loaded = load_list(path)
    if loaded.space is None:
        raise pw.PoisonFileError(
            errno.EINVAL,
            f"{what} {os.fspath(path)}: the text list does not say which addresses it holds: "
            f"{space_remedy()}",
        )
    if loaded.space == IMAGE_OFFSET:
        return loaded.poison, None
    return None, loaded.poison


def load_any(path: str | os.PathLike[str], page_size: int = 4096) -> tuple[pw.PoisonSet, str]:
    """Loads a poison list of image offsets (a JSON poison file, a journal or a text list that
    says ``# address-space: image-offset``); returns the set and the form's name."""
    loaded = load_list(path, page_size)
    return _in_space(loaded, path, IMAGE_OFFSET), loaded.form


def to_text(poison: pw.PoisonSet, space: str = IMAGE_OFFSET) -> str:
    """The plain text form: one address per line, in hexadecimal, after a header that names
    the address space."""
    header = (
        f"# pagewarden poison list, page_size={poison.page_size}, {len(poison)} pages\n"
        f"# address-space: {space}\n"
    )
    return header + "".join(f"{address:#x}\n" for address in poison)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_list(poison: pw.PoisonSet, path: str, space: str, form: str | None = None) -> None:
    """Writes ``poison`` (addresses in ``space``) as JSON (default, or by a ``.txt``/``.list``
    extension: text), atomically."""
    form = form or ("text" if path.endswith((".txt", ".list")) else "json")
    if form == "text":
        _atomic_write(path, to_text(poison, space))
    elif space == IMAGE_OFFSET:
        poison.save(path)
    else:
        obj = json.loads(poison.to_json())
        obj["format"] = GPA_FORMAT
        obj["address_space"] = GUEST_PHYSICAL
        _atomic_write(path, json.dumps(obj) + "\n")


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


def _declared(path: str, page_size: int, declared: str | None) -> PoisonList:
    """Reads a list; ``declared`` (``--address-space``) names the space of a text list that
    does not say, and must agree with one that does."""
    loaded = load_list(path, page_size)
    if declared is not None:
        if loaded.space is not None and loaded.space != declared:
            raise _text_error(
                path, f"it says it lists {loaded.space} addresses, not {declared} ones"
            )
        loaded.space = declared
    return loaded


def _spaced(path: str, page_size: int, declared: str | None) -> PoisonList:
    """Like ``_declared``, and the space must be known (a command that writes or compares
    lists must not mix the two)."""
    loaded = _declared(path, page_size, declared)
    if loaded.space is None:
        raise _text_error(
            path,
            "the text list does not say which addresses it holds: "
            f"{space_remedy()}, or pass --address-space",
        )
    return loaded


def show(path: str, guest_size: int | None, page_size: int, limit: int = 20) -> str:
    """The report ``poison show`` prints."""
    loaded = load_list(path, page_size)
    poison, form = loaded.poison, loaded.form
    ranges = poison.ranges()
    space = loaded.space or "not stated (a text list without an `# address-space:` line)"
    lines = [
        f"file        {path} ({form})",
        f"addresses   {space}",
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


def _cmd_show(args: argparse.Namespace) -> int:
    print(show(args.file, args.size, args.page_size))
    return 0


def _one_space(lists: list[tuple[str, PoisonList]]) -> str:
    spaces = {loaded.space for _, loaded in lists}
    if len(spaces) > 1:
        named = ", ".join(f"{path}: {loaded.space}" for path, loaded in lists)
        raise pw.PoisonFileError(
            errno.EINVAL,
            f"the lists name different address spaces ({named}): translate one first with "
            "`pagewarden poison translate`",
        )
    (space,) = spaces
    assert space is not None
    return space


def _cmd_merge(args: argparse.Namespace) -> int:
    lists = [(path, _spaced(path, args.page_size, args.address_space)) for path in args.inputs]
    space = _one_space(lists)
    merged = lists[0][1].poison
    for _, loaded in lists[1:]:
        merged = merged | loaded.poison
    save_list(merged, args.out, space, args.to)
    print(
        f"{args.out}: {len(merged)} pages in {len(merged.ranges())} ranges ({space})",
        file=sys.stderr,
    )
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    la = _spaced(args.a, args.page_size, args.address_space)
    lb = _spaced(args.b, args.page_size, args.address_space)
    _one_space([(args.a, la), (args.b, lb)])
    size = min(la.poison.page_size, lb.poison.page_size)
    a, b = la.poison.with_page_size(size), lb.poison.with_page_size(size)
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
    loaded = _spaced(args.input, args.page_size, args.address_space)
    assert loaded.space is not None
    save_list(loaded.poison, args.output, loaded.space, args.to)
    print(
        f"{args.input} ({loaded.form}, {loaded.space}) -> {args.output}: "
        f"{len(loaded.poison)} pages",
        file=sys.stderr,
    )
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    from pagewarden.firecracker.layout import GuestLayout

    loaded = _spaced(args.input, args.page_size, args.address_space)
    layout = GuestLayout.firecracker(args.mem_size, args.layout)
    if loaded.space == GUEST_PHYSICAL:
        out, space = layout.to_offsets(loaded.poison), IMAGE_OFFSET
    else:
        out, space = layout.to_guest_physical(loaded.poison), GUEST_PHYSICAL
    save_list(out, args.output, space, args.to)
    print(
        f"{args.input} ({loaded.space}) -> {args.output} ({space}): {len(out)} pages; "
        f"{layout.describe()}",
        file=sys.stderr,
    )
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``poison`` and its subcommands to the CLI."""
    from pagewarden.demo import parse_size
    from pagewarden.firecracker.layout import DEFAULT_FAMILY, FAMILIES

    p = sub.add_parser("poison", help="inspect, merge, compare, convert and translate poison lists")
    psub = p.add_subparsers(dest="poison_command", metavar="SUBCOMMAND", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--page-size", type=int, default=4096, help="page size of text lists (4096)")
        q.add_argument(
            "--address-space",
            choices=ADDRESS_SPACES,
            help="what the addresses of text lists that do not say are: image-offset (the "
            "memory image or Firecracker's memory file) or guest-physical",
        )

    def to(q: argparse.ArgumentParser) -> None:
        q.add_argument("--to", choices=["json", "text"], default=None, help="default: by extension")

    q = psub.add_parser(
        "show", help="address space, count, ranges, bytes and a map of where the poison sits"
    )
    q.add_argument("file")
    q.add_argument("--size", type=parse_size, default=None, help="guest size, for the map")
    q.add_argument("--page-size", type=int, default=4096, help="page size of text lists (4096)")
    q.set_defaults(func=_cmd_show)
    q = psub.add_parser("merge", help="union of poison lists (of one address space) into OUT")
    q.add_argument("out")
    q.add_argument("inputs", nargs="+", metavar="IN")
    to(q)
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
    to(q)
    common(q)
    q.set_defaults(func=_cmd_convert)
    q = psub.add_parser(
        "translate",
        help="guest-physical addresses to memory-file offsets, or back, for a Firecracker VM",
        description="Translate a list of guest-physical addresses into offsets in a "
        "Firecracker x86-64 VM's memory file (or a list of offsets into guest-physical "
        "addresses), with the layout of the VM's memory size; an address in an MMIO gap or "
        "past the end of RAM is refused.",
    )
    q.add_argument("input")
    q.add_argument("output")
    q.add_argument(
        "--mem-size",
        type=parse_size,
        required=True,
        help="the VM's memory size (its memory file's size), e.g. 5G",
    )
    q.add_argument(
        "--layout",
        choices=sorted(FAMILIES),
        default=DEFAULT_FAMILY,
        help=f"Firecracker's layout (default {DEFAULT_FAMILY})",
    )
    to(q)
    common(q)
    q.set_defaults(func=_cmd_translate)
