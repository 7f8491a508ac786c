"""`pagewarden poison show|merge|diff|convert|translate`, and the address space every list
declares."""

from __future__ import annotations

from pathlib import Path

import pytest

import pagewarden as pw
from pagewarden.cli import main


def test_show_convert_merge_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "list.txt"
    text.write_text(
        "# hand-written\n# address-space: image-offset\n0x1000\n8192  # decimal\n\n0x200000\n"
    )
    assert main(["poison", "show", str(text)]) == 0
    out = capsys.readouterr().out
    assert "pages       3" in out and "(text)" in out and "ranges      2" in out
    assert "addresses   image-offset" in out
    assert "|#" in out  # the map marks the start of guest memory

    as_json = tmp_path / "list.json"
    assert main(["poison", "convert", str(text), str(as_json)]) == 0
    assert sorted(pw.PoisonSet.load(as_json)) == [0x1000, 0x2000, 0x200000]
    back = tmp_path / "back.txt"
    assert main(["poison", "convert", str(as_json), str(back), "--to", "text"]) == 0
    assert [ln for ln in back.read_text().splitlines() if not ln.startswith("#")] == [
        "0x1000",
        "0x2000",
        "0x200000",
    ]

    other = tmp_path / "other.json"
    pw.PoisonSet([0x200000, 0x300000]).save(other)
    merged = tmp_path / "merged.json"
    assert main(["poison", "merge", str(merged), str(as_json), str(other)]) == 0
    assert sorted(pw.PoisonSet.load(merged)) == [0x1000, 0x2000, 0x200000, 0x300000]

    capsys.readouterr()
    assert main(["poison", "diff", str(as_json), str(text)]) == 0
    assert "same poison" in capsys.readouterr().out
    assert main(["poison", "diff", str(as_json), str(other)]) == 1
    out = capsys.readouterr().out
    assert "only in" in out and "0x000000300000" in out and "0x000000001000" in out


def test_show_a_journal(uffd: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "j"
    mem = pw.GuestMemory.anonymous(64 << 10)
    with pw.Handler(mem, pw.ZeroSource(), poison=pw.PoisonSet([0x3000]), poison_journal=journal):
        pass
    assert main(["poison", "show", str(journal), "--size", "64K"]) == 0
    out = capsys.readouterr().out
    assert "(journal)" in out and "pages       1" in out


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("0x1000\nnot-an-address\n", "line 2"),
        ("0x1001\n", "aligned"),
        ("# address-space: physical\n0x1000\n", "neither 'image-offset' nor 'guest-physical'"),
        ('{"format": "pagewarden.poison", "version": 1', "truncated"),
        (
            (
                '{"format": "pagewarden.poison", "version": 7, "page_size": 4096, "pages": 0, '
                '"ranges": []}'
            ),
            "version",
        ),
    ],
)
def test_bad_files_are_clear_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, needle: str
) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(content)
    assert main(["poison", "show", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and needle in err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["poison", "show", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err


def test_lists_without_an_address_space_are_refused_where_it_matters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A text list that does not say which addresses it holds can be looked at, but not used
    or combined until it says (or --address-space says for it)."""
    bare = tmp_path / "bare.txt"
    bare.write_text("0x100000000\n")
    assert main(["poison", "show", str(bare)]) == 0
    assert "not stated" in capsys.readouterr().out
    out = tmp_path / "out.json"
    assert main(["poison", "convert", str(bare), str(out)]) == 1
    assert "# address-space: guest-physical" in capsys.readouterr().err
    assert not out.exists()
    assert (
        main(["poison", "convert", str(bare), str(out), "--address-space", "guest-physical"]) == 0
    )
    assert "guest-physical" in out.read_text()
    # A guest-physical JSON list is not a poison file of offsets: PoisonSet.load refuses it.
    with pytest.raises(pw.PoisonFileError, match="guest-physical addresses"):
        pw.PoisonSet.load(out)
    # ... and cannot be merged with one.
    offsets = tmp_path / "offsets.json"
    pw.PoisonSet([0x1000]).save(offsets)
    capsys.readouterr()
    assert main(["poison", "merge", str(tmp_path / "m.json"), str(offsets), str(out)]) == 1
    assert "different address spaces" in capsys.readouterr().err
    # A list that says one space is not taken as the other.
    said = tmp_path / "said.txt"
    said.write_text("# address-space: image-offset\n0x1000\n")
    assert main(["poison", "show", str(said)]) == 0
    assert (
        main(["poison", "convert", str(said), str(out), "--address-space", "guest-physical"]) == 1
    )
    assert "not guest-physical ones" in capsys.readouterr().err


def test_translate_with_firecrackers_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gpas = tmp_path / "gpas.txt"
    gpas.write_text("# address-space: guest-physical\n0x1000\n0x100002000\n")
    offsets = tmp_path / "offsets.json"
    assert main(["poison", "translate", str(gpas), str(offsets), "--mem-size", "5G"]) == 0
    # Above the 1 GiB gap (v1.13+), guest-physical 4 GiB is memory-file offset 3 GiB.
    assert sorted(pw.PoisonSet.load(offsets)) == [0x1000, (3 << 30) + 0x2000]
    back = tmp_path / "back.txt"
    assert main(["poison", "translate", str(offsets), str(back), "--mem-size", "5G"]) == 0
    assert "# address-space: guest-physical" in back.read_text()
    assert "0x100002000" in back.read_text()
    # The older layout (768 MiB gap) puts the same address elsewhere.
    old = tmp_path / "old.json"
    argv = ["poison", "translate", str(gpas), str(old), "--mem-size", "5G"]
    assert main([*argv, "--layout", "firecracker-v1.0"]) == 0
    assert sorted(pw.PoisonSet.load(old)) == [0x1000, 0xD000_0000 + 0x2000]
    # In the gap, or past the end: refused, naming the gap or the end and the layout.
    gpas.write_text("# address-space: guest-physical\n0xc0000000\n")
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "MMIO gap 0xc0000000-0x100000000" in err and "5 GiB" in err
    gpas.write_text("# address-space: guest-physical\n0x180000000\n")
    assert main(argv) == 1
    assert "past the end of RAM (0x180000000)" in capsys.readouterr().err
