"""Parsers and renderers of `!poolused` / `!poolfind` / PoolMon text (tagsplit.snapshots).

Golden tests: every `tests/data/windbg/<name>.txt` (real captured output, see tests/data/windbg/README.md) is parsed
and compared with `<name>.json`. A missing golden fails. After a deliberate parser change, regenerate with

    cd /work/main && python tests/regen_goldens.py [<name>.txt ...]

and review `git diff tests/data/windbg` before committing.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import pickle
import random
import re
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tagsplit.errors import DebuggerOutputError, UsageError
from tagsplit.snapshots import (
    PoolBlock,
    TagUsage,
    detect_format,
    parse_poolfind,
    parse_poolmon,
    parse_poolmon_snapshots,
    parse_poolused,
    parse_poolused_tables,
    parse_snapshot,
    render_poolfind,
    render_poolused,
    sort_usages,
)
from tagsplit.snapshots import parse as parse_module
from tagsplit.snapshots.model import bulk_new

if TYPE_CHECKING:
    from types import ModuleType

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "windbg"
SAMPLES = sorted(DATA.glob("*.txt"))


def _load_regen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("regen_goldens", HERE / "regen_goldens.py")
    if spec is None or spec.loader is None:
        raise ImportError("tests/regen_goldens.py cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


regen = _load_regen()


def _read(name: str) -> str:
    return (DATA / name).read_bytes().decode("utf-8")


# ---------------------------------------------------------------------------------------------------------------------
# Goldens


def test_samples_present() -> None:
    assert len(SAMPLES) >= 15, f"debugger-output samples missing under {DATA}"


@pytest.mark.parametrize("sample", SAMPLES, ids=[p.name for p in SAMPLES])
def test_golden(sample: Path) -> None:
    golden = sample.with_suffix(".json")
    if not golden.is_file():
        pytest.fail(f"{golden} is missing; write it deliberately: python tests/regen_goldens.py {sample.name}")
    actual = regen.dumps(regen.expected(sample.read_bytes().decode("utf-8")))
    wanted = golden.read_text(encoding="utf-8")
    if actual != wanted:
        diff = "".join(
            difflib.unified_diff(
                wanted.splitlines(keepends=True), actual.splitlines(keepends=True), str(golden), "parsed now"
            )
        )
        pytest.fail(f"{sample.name} parses differently from its golden:\n{diff}")


@pytest.mark.parametrize(
    ("name", "tabs"),
    [
        ("poolused_2_live_dump_nickkuo.txt", 8),
        ("poolused_2_cache_notes.txt", 5),
        ("poolused_4_notes.txt", 7),
        ("poolused_1_verbose_hack_hevd.txt", 1),
        ("poolused_default_xp_msdocs.txt", 0),
    ],
)
def test_samples_keep_tab_characters(name: str, tabs: int) -> None:
    assert _read(name).count("\t") == tabs


# ---------------------------------------------------------------------------------------------------------------------
# Layout details seen in the samples


def test_old_layout_description_glued_to_number() -> None:
    usages = {u.tag: u for u in parse_poolused(_read("poolused_default_xp_msdocs.txt"))}
    assert usages["8042"].paged_bytes == 0
    assert usages["8042"].description == "PS/2 kb and mouse , Binary: i8042prt.sys"
    # "        01394 OHCI host ...": the last column is 9 wide, so "0" is the number and "1394" starts the description.
    assert usages["ohci"].paged_bytes == 0
    assert usages["ohci"].description == "1394 OHCI host controller driver"
    # This row is one character short in the documentation; the numbers are still read by whitespace.
    assert (usages["rx.."].nonpaged_outstanding, usages["rx.."].nonpaged_bytes) == (3, 1248)


def test_poolused_total_is_not_a_tag() -> None:
    (table,) = parse_poolused_tables(_read("poolused_default_xp_msdocs.txt"))
    assert all("TOT" not in u.tag for u in table.usages)
    assert table.total is not None
    assert (table.total.nonpaged_outstanding, table.total.nonpaged_bytes) == (3570214, 209120008)
    assert (table.total.paged_outstanding, table.total.paged_bytes) == (38769, 13066104)
    (verbose,) = parse_poolused_tables(_read("poolused_1_verbose_hack_hevd.txt"))
    assert verbose.verbose
    assert verbose.sort == "tag"
    assert [u.tag for u in verbose.usages] == ["Hack"]
    assert verbose.total is not None
    assert verbose.total.nonpaged_bytes == 112


def test_poolused_sort_and_outstanding() -> None:
    (table,) = parse_poolused_tables(_read("poolused_4_msdocs_leak.txt"))
    assert (table.sort, table.verbose) == ("paged", False)
    first = table.usages[0]
    assert (first.tag, first.outstanding_allocs, first.outstanding_bytes) == ("Abc ", 36405, 33930272)
    assert first.nonpaged_allocs is None
    assert not first.verbose
    (table,) = parse_poolused_tables(_read("poolused_2_live_dump_nickkuo.txt"))
    assert table.sort == "nonpaged"
    hack = parse_poolused(_read("poolused_1_verbose_hack_hevd.txt"))[0]
    assert hack.verbose
    assert (hack.nonpaged_allocs, hack.nonpaged_frees, hack.nonpaged_outstanding) == (1, 0, 1)


def test_tags_with_spaces() -> None:
    assert "AGP " in [u.tag for u in parse_poolused(_read("poolused_default_xp_msdocs.txt"))]
    assert "Ggb " in [u.tag for u in parse_poolused(_read("poolused_4_msdocs_leak.txt"))]
    session = {u.tag: u for u in parse_poolmon(_read("poolmon_session_tags_with_spaces_msdocs.txt"))}
    assert (session["Dh 1"].paged_outstanding, session["Dh 2"].paged_bytes) == (2, 912)
    assert parse_poolmon(_read("poolmon_display_msdocs.txt"))[4].tag == "Io  "
    text = (
        "Searching NonPaged pool (823b1000 : 82800000) for Tag: Ab c\n"
        "82721c00 size:   10 previous size:   30  (Free)       rx.\n"
        "82721c10 size:   10 previous size:   30  (Allocated) Ab c\n"
        "82721c20 size:   10 previous size:   30  (Allocated) Mm  \n"
        "82721c30 size:   10 previous size:   30  (Allocated) Mm\n"
        "86620a00 : tag AB C, size     0x600, Nonpaged pool\n"
    )
    assert [b.tag for b in parse_poolfind(text)] == [" rx.", "Ab c", "Mm  ", "Mm  ", "AB C"]


def test_protected_tags() -> None:
    blocks = parse_poolfind(_read("poolfind_classic_x64_protected_amf.txt"))
    assert [b.protected for b in blocks] == [True, True, True, False, True, True, True, False]
    assert [b.tag for b in blocks if not b.allocated] == ["Pro.", "Pro."]
    assert (blocks[0].address, blocks[0].size, blocks[0].pool) == (0xFFFFFA8000C77000, 0x430, "nonpaged")
    marked = parse_poolfind("e1001050 size:   10 previous size:   10  (Allocated) *ObDi (Protected)\n")
    assert (marked[0].tag, marked[0].protected, marked[0].pool) == ("ObDi", True, "unknown")


def test_poolfind_addresses_and_sections() -> None:
    text = (
        "Scanning large pool allocation table for Tag: Tsp1 (827d1000 : 827e9000)\n"
        "fffff800`12345678 size:  400 previous size:    0  (Allocated) Tsp1\n"
        "Searching Paged pool (e1000000 : e4400000) for Tag: Tsp1\n"
        "*ffffe000`00001000 size:   20 previous size:   10  (Free)      Tsp1\n"
    )
    large, paged = parse_poolfind(text)
    assert (large.address, large.size, large.pool) == (0xFFFFF80012345678, 0x400, "large")
    assert (paged.address, paged.pool, paged.allocated, paged.previous_size) == (
        0xFFFFE00000001000,
        "paged",
        False,
        0x10,
    )
    new = parse_poolfind(_read("poolfind_new_x86_wildcard_cache.txt"))
    assert [(b.tag, b.size) for b in new] == [("XPPH", 0x79E8), ("Frag", 0), ("IdeP", 0x600), ("Cont", 0xA000)]
    assert all(b.previous_size is None and b.allocated and not b.protected for b in new)


def test_poolmon_merges_nonpaged_and_paged_rows() -> None:
    first, second = parse_poolmon_snapshots(_read("poolmon_snapshot_reconstructed.txt"))
    tsp1 = {u.tag: u for u in first}["Tsp1"]
    assert (tsp1.nonpaged_allocs, tsp1.nonpaged_frees, tsp1.nonpaged_outstanding, tsp1.nonpaged_bytes) == (
        1200,
        200,
        1000,
        128000,
    )
    assert (tsp1.paged_allocs, tsp1.paged_frees, tsp1.paged_outstanding) == (10, 10, 0)
    agp = {u.tag: u for u in second}["AGP "]
    assert (agp.outstanding_allocs, agp.paged_allocs, agp.paged_outstanding) == (3, None, 0)
    mapped = parse_poolmon(_read("poolmon_mapped_driver_msdocs.txt"))
    assert mapped[0].description == "[ntfs.sys  -  AttrSup.c]"


# ---------------------------------------------------------------------------------------------------------------------
# Empty output, errors


def test_header_without_rows_gives_empty_list() -> None:
    assert parse_poolused(" Sorting by Tag\n\n Tag     Allocs         Used     Allocs         Used\n\n") == []
    table = render_poolused([], 1, "Zzzz")
    assert parse_poolused(table) == []
    assert parse_poolused_tables(table)[0].total is not None
    assert parse_poolfind("Scanning large pool allocation table for Tag: Zzzz (827d1000 : 827e9000)\n") == []
    assert parse_poolfind(render_poolfind([], "Zzzz", 1, new_format=False)) == []
    assert parse_poolfind(render_poolfind([], "Zzzz", 0, new_format=True)) == []
    assert parse_poolmon(_read("poolmon_empty_session_msdocs.txt")) == []


@pytest.mark.parametrize("parse", [parse_poolused, parse_poolfind, parse_poolmon])
@pytest.mark.parametrize("text", ["", "\n\n", "kd> \n", "0: kd> !poolused 2\n....\n"])
def test_no_output_at_all_is_an_error(parse: object, text: str) -> None:
    with pytest.raises(DebuggerOutputError):
        parse(text)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("name", "after", "parse"),
    [
        ("poolused_default_xp_msdocs.txt", " AcpA ", parse_poolused),
        ("poolused_2_live_dump_nickkuo.txt", " EtwB ", parse_poolused),
        ("poolused_1_verbose_hack_hevd.txt", " Hack ", parse_poolused),
        ("poolfind_classic_x86_msdocs.txt", "82712000 ", parse_poolfind),
        ("poolfind_new_win10_rekall_notes.txt", "ffff830da0dc8010 ", parse_poolfind),
        ("poolmon_display_msdocs.txt", " Gxlt ", parse_poolmon),
    ],
)
def test_unparseable_line_names_its_number(name: str, after: str, parse: object) -> None:
    lines = _read(name).split("\n")
    index = next(i for i, line in enumerate(lines) if line.startswith(after)) + 1
    bad = "Some garbage the parser has never seen 1234"
    lines.insert(index, bad)
    with pytest.raises(DebuggerOutputError, match=rf"line {index + 1}: cannot parse: '{bad}'"):
        parse("\n".join(lines))  # type: ignore[operator]


def test_wrong_column_count_is_an_error() -> None:
    text = _read("poolused_1_verbose_hack_hevd.txt").replace(
        " Hack           1           0         1", " Hack           1           0"
    )
    with pytest.raises(DebuggerOutputError, match=r"line 9: cannot parse"):
        parse_poolused(text)


def test_error_line_number_in_a_long_log() -> None:
    blocks = [PoolBlock(0x82000000 + 0x40 * i, 0x40, "Tsp1", "nonpaged", True, False, 0x40) for i in range(30000)]
    lines = render_poolfind(blocks, "Tsp1", 0, new_format=False).split("\n")
    lines[20000] = lines[20000].replace("(Allocated)", "(Allocatd)")
    with pytest.raises(DebuggerOutputError, match=r"^!poolfind output line 20001: cannot parse: '82") as info:
        parse_poolfind("\n".join(lines))
    assert "(Allocatd)" in str(info.value)


def test_several_tables() -> None:
    text = _read("poolused_2_cache_notes.txt") + "\n" + _read("poolused_4_notes.txt")
    tables = parse_poolused_tables(text)
    assert [(t.sort, len(t.usages)) for t in tables] == [("nonpaged", 5), ("paged", 7)]
    with pytest.raises(DebuggerOutputError, match="2 tables"):
        parse_poolused(text)
    with pytest.raises(DebuggerOutputError, match="2 tables"):
        parse_poolmon(_read("poolmon_snapshot_reconstructed.txt"))


def test_duplicate_poolmon_row_is_an_error() -> None:
    text = (
        _read("poolmon_display_msdocs.txt")
        + " Wait Nonp          1 (   0)         0 (   0)        1      16 (     0)     16\n"
    )
    with pytest.raises(DebuggerOutputError, match=r"line 14: a second Nonp row for tag 'Wait'"):
        parse_poolmon(text)


def test_crlf_input() -> None:
    for name in ("poolused_2_live_dump_nickkuo.txt", "poolfind_classic_x86_msdocs.txt", "poolmon_display_msdocs.txt"):
        text = _read(name)
        fmt = detect_format(text)
        assert detect_format(text.replace("\n", "\r\n")) == fmt
        parse = {"poolused": parse_poolused, "poolfind": parse_poolfind, "poolmon": parse_poolmon}[fmt]
        assert parse(text.replace("\n", "\r\n")) == parse(text)


def test_detect_format() -> None:
    assert {detect_format(p.read_text()) for p in SAMPLES} == {"poolused", "poolfind", "poolmon"}
    with pytest.raises(DebuggerOutputError, match="not !poolused"):
        detect_format("hello\n")
    with pytest.raises(DebuggerOutputError, match="mixes"):
        detect_format(_read("poolused_4_notes.txt") + _read("poolfind_new_win10_18362_h0mbre.txt"))


def test_parse_snapshot() -> None:
    snap = parse_snapshot(_read("poolfind_new_win10_18362_h0mbre.txt"), "2020-04-25T10:00:00Z")
    assert (snap.source, len(snap.blocks), snap.usages) == ("poolfind", 13, ())
    snap = parse_snapshot(_read("poolused_4_notes.txt"), "2024-11-14T12:00:00+01:00", "poolused")
    assert (len(snap.usages), snap.blocks) == (7, ())
    with pytest.raises(UsageError):
        parse_snapshot(_read("poolused_4_notes.txt"), "yesterday")
    with pytest.raises(UsageError):
        parse_snapshot(_read("poolused_4_notes.txt"), "2024-11-14", "windbg")


# ---------------------------------------------------------------------------------------------------------------------
# The data classes


def test_bulk_built_objects_are_ordinary_dataclasses() -> None:
    blocks = parse_poolfind(_read("poolfind_classic_x86_msdocs.txt"))
    first = blocks[0]
    assert first == PoolBlock(0x826FA130, 0xC0, "SeSd", "nonpaged", True, False, 0x40)
    assert hash(first) == hash(PoolBlock(0x826FA130, 0xC0, "SeSd", "nonpaged", True, False, 0x40))
    assert pickle.loads(pickle.dumps(first)) == first
    assert copy.deepcopy(first) == first
    assert dataclasses.replace(first, size=1).size == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.size = 1  # type: ignore[misc]
    assert not hasattr(first, "__dict__")
    usage = parse_poolused(_read("poolused_4_notes.txt"))[0]
    assert usage == TagUsage(
        "CM31", 0, 0, 19797, 91705344, None, None, None, None,
        "Internal Configuration manager allocations , Binary: nt!cm",
    )  # fmt: skip
    with pytest.raises(ValueError, match="fewer than"):
        bulk_new(PoolBlock, 2, {f.name: [0] for f in dataclasses.fields(PoolBlock)})


def test_records_behave_like_the_frozen_dataclasses() -> None:
    block = PoolBlock(address=0x1000, size=0x20, tag="Tsp1", pool="paged", allocated=True, protected=False,
                      previous_size=None)  # fmt: skip
    values = (0x1000, 0x20, "Tsp1", "paged", True, False, None)
    assert block == PoolBlock(*values)
    assert block != values  # a plain tuple is not a PoolBlock, whichever side it is on
    assert values != block
    assert not block == values  # noqa: SIM201
    assert hash(block) == hash(values)
    assert [f.name for f in dataclasses.fields(block)] == [
        "address", "size", "tag", "pool", "allocated", "protected", "previous_size",
    ]  # fmt: skip
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(PoolBlock))
    assert dataclasses.is_dataclass(block)
    assert dataclasses.asdict(block) == dict(zip(PoolBlock._fields, values))
    assert dataclasses.replace(block, tag="Tsp2") == PoolBlock(0x1000, 0x20, "Tsp2", "paged", True, False, None)
    assert repr(block) == (
        "PoolBlock(address=4096, size=32, tag='Tsp1', pool='paged', allocated=True, protected=False, "
        "previous_size=None)"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        block.tag = "Tsp2"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        block.extra = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        assert block < block  # type: ignore[operator]
    with pytest.raises(TypeError):
        sorted([block, block])
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(block, protocol)) == block
    assert copy.copy(block) == block
    usage = TagUsage(tag="Abc ", nonpaged_outstanding=1, nonpaged_bytes=16, paged_outstanding=0, paged_bytes=0,
                     nonpaged_allocs=None, nonpaged_frees=None, paged_allocs=None, paged_frees=None,
                     description="")  # fmt: skip
    assert (usage.outstanding_allocs, usage.outstanding_bytes, usage.verbose) == (1, 16, False)
    assert usage != PoolBlock(*values)
    assert {usage: 1}[TagUsage(*usage)] == 1


# ---------------------------------------------------------------------------------------------------------------------
# The fast paths (whole regions and tables read in bulk) must read exactly what the line-by-line patterns read.


def _outcome(parse: Callable[[str], object], text: str) -> tuple[str, object]:
    try:
        return "parsed", parse(text)
    except DebuggerOutputError as e:
        return "error", str(e)


def _both_paths(parse: Callable[[str], object], text: str, piece: int | None = None) -> tuple[object, object]:
    """The outcome of `parse(text)` with the fast paths, and with them turned off."""
    with ExitStack() as stack:
        if piece is not None:
            stack.enter_context(mock.patch.object(parse_module, "_PIECE", piece))
        fast = _outcome(parse, text)
        stack.enter_context(mock.patch.object(parse_module, "_poolfind_fast", return_value=None))
        stack.enter_context(mock.patch.object(parse_module, "_poolused_fast", return_value=None))
        full = _outcome(parse, text)
    return fast, full


def _poolfind_texts() -> list[str]:
    rng = random.Random(5)
    tags = ["Tsp1", "AGP ", " rx.", "Ab c", "Pro.", "Mm  "]
    classic, new = [], []
    for i in range(60):
        pool = "nonpaged" if i < 30 else "paged"
        allocated = rng.random() < 0.8
        classic.append(
            PoolBlock(0xFFFFFA8000C02000 + 0x40 * i, rng.choice((0x20, 0x430, 0x12345)), rng.choice(tags), pool,
                      allocated, allocated and rng.random() < 0.2, rng.choice((0, 0x30, 0x290)))
        )  # fmt: skip
        new.append(PoolBlock(0xFFFF830DA0CE8010 + 0x40 * i, rng.choice((0, 0xB70)), rng.choice(tags), pool, True,
                             False, None))  # fmt: skip
    x86 = [dataclasses.replace(b, address=b.address & 0xFFFFFFFF) for b in classic]
    return [
        render_poolfind(classic, "*", 0, new_format=False),
        render_poolfind(x86, "*", 0, new_format=False),
        render_poolfind(new, "*", 0),
        render_poolfind([dataclasses.replace(b, address=b.address & 0xFFFFFFFF) for b in new], "*", 1),
        _read("poolfind_classic_x86_msdocs.txt"),
        _read("poolfind_new_win10_rekall_notes.txt"),
    ]


def _poolused_texts() -> list[str]:
    rng = random.Random(6)
    usages = [
        TagUsage(tag, *(rng.choice((0, 7, 12345, 10**9)) for _ in range(8)), rng.choice(("", "desc", " x\ty ")))
        for tag in ["Tsp1", "AGP ", " rx.", "Ab c", "kd> ", "0123", "Mm  ", "TOTA"]
    ]
    described = [dataclasses.replace(u, description=u.description or "UNKNOWN") for u in usages]
    return [render_poolused(usages, flags) for flags in (0, 1, 2, 4)] + [
        render_poolused(described, flags) for flags in (0, 1, 2, 5)
    ] + [_read("poolused_2_live_dump_nickkuo.txt"), _read("poolused_default_xp_msdocs.txt")]  # fmt: skip


_INSERTS = [
    "\t",
    " ",
    "  ",
    "*",
    "`",
    "-",
    "0",
    "00",
    "+",
    "_",
    "|",
    ".",
    "e",
    ",",
    "[",
    "\x0b",
    "\r",
    "\xa0",
    "١",
    "x",
]


def _mutated(text: str, rng: random.Random) -> str:
    """`text` with a few small edits: characters inserted, deleted or replaced, lines duplicated or added."""
    lines = text.split("\n")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(lines))
        line = lines[i]
        pos = rng.randint(0, len(line))
        kind = rng.randrange(6)
        if kind == 0:
            lines[i] = line[:pos] + rng.choice(_INSERTS) + line[pos:]
        elif kind == 1 and line:
            lines[i] = line[:pos] + line[pos + 1 :]
        elif kind == 2 and pos < len(line):
            lines[i] = line[:pos] + rng.choice(_INSERTS) + line[pos + 1 :]
        elif kind == 3:
            lines.insert(i, line)
        elif kind == 4:
            lines.insert(i, rng.choice(["", "kd> ", "....", "  ", "TOTAL 1 2 3 4", " Sorting by Tag"]))
        else:
            lines[i] = line.rstrip() + rng.choice([" ", "\t", "  x"])
    return "\n".join(lines)


@pytest.mark.parametrize("piece", [None, 64])
def test_fast_paths_read_like_the_line_patterns(piece: int | None) -> None:
    rng = random.Random(7)
    cases = [(parse_poolfind, t) for t in _poolfind_texts()] + [(parse_poolused, t) for t in _poolused_texts()]
    for parse, text in cases:
        fast, full = _both_paths(parse, text, piece)
        assert fast == full
        assert fast[0] == "parsed"
        for _ in range(40):
            mutated = _mutated(text, rng)
            fast, full = _both_paths(parse, mutated, piece)
            assert fast == full, mutated


_USED = (
    " Sorting by Tag\n\n"
    " Tag       Allocs       Frees      Diff         Used       Allocs       Frees      Diff         Used\n\n"
    " Abcd           5           2         3          768            0           0         0            0\tA driver\n"
    " Mm             1           0         1           16           40          30        10          640\tMemory\n"
    "\nTOTAL           6           2         4          784           40          30        10          640\n"
)
_FOUND = (
    "Searching NonPaged pool (fffffa8000c00000 : fffffa800d810000) for Tag: *\n\n"
    "fffffa8000c03000 size:  430 previous size:   30  (Allocated) Proc (Protected)\n"
    "fffffa8000c03430 size:   20 previous size:  430  (Free)      Pro.\n"
    "fffffa8000c03450 size:   a0 previous size:   20  (Allocated) Mm  \n"
)


@pytest.mark.parametrize(
    ("text", "old", "new"),
    [
        (_USED, "5           2", "5\t          2"),  # TAB between numbers
        (_USED, " Abcd     ", " kd> \t   "),  # a row that also reads as a prompt (noise)
        (_USED, "A driver", "A\tdriver"),  # TAB in the description
        (_USED, "768", "007"),  # leading zeros
        (_USED, "           2         3", "          -2        -3"),  # negative numbers
        (_USED, "         0\tA driver", "10000000000000\tA driver"),  # last number wider than its column
        (_USED, "        640\tMemory", "      01640\tMemory"),  # digits glued to the last number
        (_USED, "          640\tMemory", "            -5\tMemory"),  # the same cut would leave a lone '-'
        (_USED, "\tA driver", ""),  # a row without description
        (_USED, "\tA driver", "   "),
        (_USED, "768", "7٦8"),  # a digit that is not ASCII
        (_USED, "768", "+768"),
        (_USED, "768", "7_68"),
        (_USED, "768", "7\r8"),
        (_USED, "768", "7\x0b8"),
        (
            _USED,
            "\nTOTAL",
            "TOTAL           6           2         4          784           40          30        10          640\n"
            "\nTOTAL",
        ),
        (_USED, "\nTOTAL", "\n TOTAL 1 2"),
        (_FOUND, "fffffa8000c03000", "*fffffa8000c03000"),
        (_FOUND, "fffffa8000c03000", "fffffa80`00c03000"),
        (_FOUND, "fffffa8000c03000", "80c03000"),
        (_FOUND, "fffffa8000c03000", "fa8000c03000"),
        (_FOUND, "fffffa8000c03000", "FFFFFA8000C03000"),
        (_FOUND, "fffffa8000c03000", "fffffa8000c0300g"),
        (_FOUND, "(Free)      Pro.", "(Free)     Pro."),
        (_FOUND, "Mm  \n", "Mm\n"),
        (_FOUND, "Mm  \n", "Mm   \n"),
        (_FOUND, "(Protected)", "(Protected) "),
        (_FOUND, " 430 previous", "12345 previous"),
        (_FOUND, "size:  430", "size:\t430"),
        (
            _FOUND,
            "fffffa8000c03450 size:   a0 previous size:   20  (Allocated) Mm  ",
            "fffffa8000c03450 : tag Mm  , size      0xa0, Nonpaged pool",
        ),
    ],
)
def test_fast_paths_on_odd_lines(text: str, old: str, new: str) -> None:
    assert old in text
    parse = parse_poolused if text is _USED else parse_poolfind
    fast, full = _both_paths(parse, text.replace(old, new, 1))
    assert fast == full


def _recording(func: Callable[..., object]) -> tuple[Callable[..., object], list[object]]:
    results: list[object] = []

    def spy(*args: object, **kwargs: object) -> object:
        results.append(func(*args, **kwargs))
        return results[-1]

    return spy, results


def test_fast_paths_are_taken() -> None:
    """Output as WinDbg prints it goes the fast way (else the benchmark would quietly fall back to the slow one)."""
    for name, parse, texts in [
        ("_poolfind_fast", parse_poolfind, _poolfind_texts()[:4]),
        ("_poolused_fast", parse_poolused, _poolused_texts()[4:8]),  # the layouts with a TAB before each description
    ]:
        spy, results = _recording(getattr(parse_module, name))
        with mock.patch.object(parse_module, name, spy):
            for text in texts:
                assert parse(text)
        assert results
        assert None not in results, name


def _aligned_poolused_texts() -> list[str]:
    """Tables whose numbers all fit their columns (as the benchmark's): `_aligned_numbers` reads them."""
    rng = random.Random(8)
    usages = [
        TagUsage(tag, *(rng.choice((0, 7, 12345, 10**6)) for _ in range(8)), rng.choice(("desc", " x\ty ", "A, b")))
        for tag in ["Tsp1", "AGP ", " rx.", "Ab c", "kd> ", "0123", "Mm  ", "TOTA"]
    ]
    # Its last two numbers have several digits, and the last one with the blanks before it fills its column: were
    # the one before a digit shorter at the end, `_unglue` would cut the last one.
    usages.append(TagUsage("Wide", 12345, 1000000, 12345, 1000000, 12345, 0, 12345, 0, "desc"))
    return [render_poolused(usages, flags) for flags in (0, 1, 2, 4)]


def test_aligned_numbers_are_taken() -> None:
    spy, results = _recording(parse_module._aligned_numbers)
    with mock.patch.object(parse_module, "_aligned_numbers", spy):
        for text in _aligned_poolused_texts():
            assert len(parse_poolused(text)) == 9
    assert results
    assert None not in results


_SAME_LENGTH = [" ", "0", "9", "-", ",", ".", "e", "E", "+", "_", "[", "]", "{", '"', "t", "\t", "\r", "\x0b", "١"]


@pytest.mark.parametrize("text", _aligned_poolused_texts()[:2], ids=["flags 0", "flags 1"])
def test_aligned_numbers_read_like_the_line_patterns(text: str) -> None:
    """Every character of a row's numbers replaced in turn (the row keeps its length, so the piece is still read by
    `_aligned_numbers` unless it refuses it): the fast paths read as the full patterns, or give up."""
    lines = text.split("\n")
    for tag in (" Mm  ", " Wide"):
        index = next(i for i, line in enumerate(lines) if line.startswith(tag))
        line = lines[index]
        for pos in range(5, line.index("\t") + 1):
            for char in _SAME_LENGTH:
                mutated = [*lines[:index], line[:pos] + char + line[pos + 1 :], *lines[index + 1 :]]
                fast, full = _both_paths(parse_poolused, "\n".join(mutated))
                assert fast == full, (tag, pos, char)


def test_hex_words() -> None:
    words = parse_module._hex_words
    assert words(["fffffa8000c77000", "fffff800`12345678"]) == [0xFFFFFA8000C77000, 0xFFFFF80012345678]
    assert words(["826fa130", "00000000"]) == [0x826FA130, 0]
    assert words([]) == []
    for bad in (["826fa130", "fffffa8000c77000"], ["826fa13g"], ["826fa13 "], [" 826fa13"], ["+826fa13"],
                ["````````````````", "fffffa8000c77000"], ["826fa1`0"]):  # fmt: skip
        assert words(bad) is None, bad


# ---------------------------------------------------------------------------------------------------------------------
# Rendering


def test_render_matches_real_verbose_output() -> None:
    sample = _read("poolused_1_verbose_hack_hevd.txt")
    rendered = render_poolused(parse_poolused(sample), 1, "Hack")
    assert sample.endswith(rendered)


def test_render_matches_real_new_poolfind_lines() -> None:
    sample = _read("poolfind_new_amda_nickkuo.txt")
    rendered = render_poolfind(parse_poolfind(sample), "amda")
    rows = [line for line in rendered.split("\n") if " : tag " in line]
    assert rows == [line for line in sample.split("\n") if " : tag " in line]


def test_render_matches_real_classic_poolfind_lines() -> None:
    sample = _read("poolfind_classic_x86_msdocs.txt")
    rendered = render_poolfind(parse_poolfind(sample), "SeSd", 0, new_format=False)
    rows = [line for line in rendered.split("\n") if " size: " in line]
    assert rows == [line for line in sample.split("\n") if " size: " in line]


def test_render_tag_filter_and_errors() -> None:
    usages = parse_poolused(_read("poolused_default_xp_msdocs.txt"))
    assert [u.tag for u in parse_poolused(render_poolused(usages, 0, "Acp*"))] == [
        "AcpA", "AcpB", "AcpD", "AcpF", "AcpM", "AcpO",
    ]  # fmt: skip
    assert [u.tag for u in parse_poolused(render_poolused(usages, 0, "AGP"))] == ["AGP "]
    with pytest.raises(UsageError):
        render_poolused(usages, 6)
    with pytest.raises(UsageError, match="verbose"):
        render_poolused(usages, 1)
    free = PoolBlock(0x1000, 0x20, "Tsp1", "nonpaged", False, False, None)
    with pytest.raises(UsageError, match="new !poolfind format"):
        render_poolfind([free], "Tsp1")
    with pytest.raises(UsageError, match="previous size"):
        render_poolfind([free], "Tsp1", new_format=False)
    with pytest.raises(UsageError):
        render_poolfind([], "Tsp1", pool_type=3)


def test_mixed_formats_in_one_region() -> None:
    text = (
        "Searching NonPaged pool (823b1000 : 82800000) for Tag: Tsp*\n"
        "82721c00 size:   10 previous size:   30  (Free)      Tsp1\n"
        "86620a00 : tag Tsp2, size     0x600, Nonpaged pool\n"
        "82721c10 size:   20 previous size:   10  (Allocated) Tsp3 (Protected)\n"
    )
    assert parse_poolfind(text) == [
        PoolBlock(0x82721C00, 0x10, "Tsp1", "nonpaged", False, False, 0x30),
        PoolBlock(0x86620A00, 0x600, "Tsp2", "nonpaged", True, False, None),
        PoolBlock(0x82721C10, 0x20, "Tsp3", "nonpaged", True, True, 0x10),
    ]


_printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_tags = st.text(_printable, min_size=4, max_size=4)
_descriptions = st.text(_printable, max_size=30).map(str.strip)
_counts = st.integers(0, 2**40)


@st.composite
def _usages(draw: st.DrawFn, verbose: bool) -> list[TagUsage]:
    out = []
    for tag in draw(st.lists(_tags, unique=True, max_size=12)):
        counters: list[int | None] = [draw(_counts) for _ in range(4)] if verbose else [None] * 4
        np_allocs, np_frees, p_allocs, p_frees = counters
        out.append(
            TagUsage(
                tag,
                draw(_counts),
                draw(_counts),
                draw(_counts),
                draw(_counts),
                np_allocs,
                np_frees,
                p_allocs,
                p_frees,
                draw(_descriptions),
            )
        )
    return out


@settings(max_examples=150, deadline=None)
@given(st.data(), st.sampled_from([0, 1, 2, 3, 4, 5, 8, 9, 10, 12, 13]))
def test_poolused_round_trip(data: st.DataObject, flags: int) -> None:
    usages = data.draw(_usages(verbose=bool(flags & 1)))
    text = render_poolused(usages, flags)
    assert parse_poolused(text) == sort_usages(usages, flags)


_pools = st.sampled_from(["nonpaged", "paged", "session", "special", "large"])


@st.composite
def _classic_blocks(draw: st.DrawFn) -> list[PoolBlock]:
    def block(pool: str) -> PoolBlock:
        return PoolBlock(
            draw(st.integers(0, 2**64 - 1)),
            draw(st.integers(0, 0xFFFF)),
            draw(_tags),
            pool,
            draw(st.booleans()),
            draw(st.booleans()),
            draw(st.integers(0, 0xFFFF)),
        )

    unknown = [block("unknown") for _ in range(draw(st.integers(0, 2)))]
    return unknown + [block(draw(_pools)) for _ in range(draw(st.integers(0, 12)))]


@settings(max_examples=200, deadline=None)
@given(_classic_blocks(), st.sampled_from([0, 1, 2, 4]))
def test_poolfind_classic_round_trip(blocks: list[PoolBlock], pool_type: int) -> None:
    assert parse_poolfind(render_poolfind(blocks, "Ts*", pool_type, new_format=False)) == blocks


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.builds(
            PoolBlock,
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**32),
            _tags,
            st.sampled_from(["nonpaged", "paged", "session", "special"]),
            st.just(True),
            st.just(False),
            st.none(),
        ),
        max_size=12,
    ),
    st.sampled_from([0, 1, 2, 4]),
)
def test_poolfind_new_format_round_trip(blocks: list[PoolBlock], pool_type: int) -> None:
    text = render_poolfind(blocks, "0x2020202a", pool_type)
    assert re.search(r"for tag 0x2020202a \(\*   \)", text)
    assert parse_poolfind(text) == blocks
