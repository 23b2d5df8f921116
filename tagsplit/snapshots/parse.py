"""Parsers for WinDbg `!poolused` / `!poolfind` output and PoolMon tables (windows-facts.md section 2).

All functions are pure: text in, frozen dataclasses out. Every line must be either data or a known kind of noise
(prompts, progress dots, the kd cache preamble, headers, blank lines); anything else raises DebuggerOutputError
naming the 1-based line number and the line, so a format change never turns into silently missing rows.

Layouts handled:
- `!poolused` (any flags): the old layout where the pooltag.txt description is glued to the last number, the newer
  one with a TAB before it, the verbose 8-column layout of flag 1, and the TOTAL row (returned apart, never as a
  tag). The tag column is found from the header line and the tag is read at that fixed position, because tags
  contain spaces ('AGP ', ' rx.', 'Dh 1').
- `!poolfind`: the classic `addr size: X previous size: Y (Allocated|Free) Tag [(Protected)]` lines (optional
  leading '*', x86 and x64 addresses, `fffff800`12345678`) and the new `addr : tag Tag, size 0x..., Nonpaged pool`
  lines.
- PoolMon: `poolmon /n` snapshot files (poolsnap.log; several snapshots appended to one file are separate tables) and
  the interactive display with its "( n)" change columns and the optional Mapped_Driver column.

Speed: logs reach 200,000 lines. Each region between two header lines is matched with one multiline `findall`
whose alternatives are the data line and the noise lines; the number of matches is compared with the number of
lines, so an unknown line costs nothing until it is found, and only then are lines looked at one by one. Objects
are built column by column (`model.bulk_new`).
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import cache
from itertools import repeat
from operator import add, itemgetter
from typing import TYPE_CHECKING, Any

from ..errors import DebuggerOutputError, UsageError
from . import model
from .model import PoolBlock, PoolTotals, PoolUsedTable, Snapshot, TagUsage, bulk_new, gc_paused

if TYPE_CHECKING:
    from collections.abc import Iterable

# --------------------------------------------------------------------------------------------------------------------
# Noise: lines that carry no data. Each entry matches a whole line.

_NOISE_COMMON = (
    r"[ \t]*",  # blank
    r"[ \t]*\.+[ \t]*",  # progress dots
    r"[ \t]*(?:\d*:[ \t]*)?l?kd>.*",  # debugger prompt, with or without the command
    r"\*\*\* CacheSize too low.*",
    r"Max cache size is.*",
    r"Total memory in cache.*",
    r"Number of regions cached.*",
    r"\d+ full reads broken into \d+ partial reads.*",
    r"[ \t]*counts:.*",
    r"[ \t]*bytes :.*",
    r"\*\* Transition PTEs.*",
    r"\*\* Prototype PTEs.*",
    r"Using a machine size of .*",
)

_POOLFIND_HEADER = r"(?:Scanning large pool allocation table for .*|Searching (\w+) pool \(.*)"
_NOISE_POOLFIND = (
    r"Scanning large pool allocation table for .*",
    r"Searching \w+ pool \(.*",
    r"\.\.\.terminating - searched pool to [0-9a-fA-F`]+[ \t]*",
    r"\[snip\][ \t]*",
)

_POOLUSED_HEADER = (
    r"( *)Tag(?P<verbose> +Allocs +Frees +Diff +Used +Allocs +Frees +Diff +Used| +Allocs +Used +Allocs +Used)[ \t]*"
)
_NOISE_POOLUSED = (
    r"[ \t]*Sorting by.*",
    r"[ \t]*Pool Used:[ \t]*",
    r"[ \t]*NonPaged[ \t]+Paged[ \t]*",
)

_POOLMON_HEADER = r"( *)Tag +Type +Allocs +Frees +Diff +Bytes +Per Alloc(?: +Mapped_Driver)?[ \t]*"
_NOISE_POOLMON = (
    r"[ \t]*Memory:.*",
    r"[ \t]*Commit:.*",
    r"[ \t]*[\w ]*pool information[ \t]*",
    r"(?:.*>)?[ \t]*poolmon(?:\.exe)?(?:[ \t].*)?",  # the command line, when pasted with the output
)


def _line_pattern(*alternatives: str) -> re.Pattern[str]:
    return re.compile("^(?:" + "|".join(alternatives) + ")$", re.MULTILINE)


# --------------------------------------------------------------------------------------------------------------------
# !poolfind line formats.

_ADDR = r"([0-9a-fA-F]+(?:`[0-9a-fA-F]+)?)"
# Groups: address, size, previous size, 'A' (Allocated) or '' (Free), tag (1-4 chars: a copy may have lost the
# tag's trailing spaces; greedy, so the common 4-character tag matches at the first try), ' (Protected)' or ''.
# "(Allocated)" is followed by one space and "(Free)" by up to six (the columns line up); an optional '*' marker
# before the tag is taken only when exactly four tag characters (and maybe " (Protected)") follow it.
_CLASSIC = (
    r"[ *]?" + _ADDR + r" size:[ \t]*([0-9a-fA-F]+) previous size:[ \t]*([0-9a-fA-F]+)[ \t]+"
    r"\((?:(A)llocated\) |Free\) {1,6})"
    r"(?:\*(?=.{4}(?: \(Protected\))?[ \t]*$))?"
    r"(.{1,4})((?: \(Protected\))?)[ \t]*"
)
# Groups: address, tag (exactly 4 chars), size ("0x..." or "0"), pool word.
_NEW = _ADDR + r" : tag (.{4}), size[ \t]+(0x[0-9a-fA-F]+|0), (\w+) pool[ \t]*"

_NOISE_FIND = _NOISE_COMMON + _NOISE_POOLFIND
_FIND_CLASSIC = _line_pattern(_CLASSIC, *_NOISE_FIND)
_FIND_NEW = _line_pattern(_NEW, *_NOISE_FIND)
_FIND_BOTH = _line_pattern(_CLASSIC, _NEW, *_NOISE_FIND)
_FIND_HEADER = re.compile(_POOLFIND_HEADER + "$", re.MULTILINE)
_FIND_ANY_ROW = re.compile("^(?:" + _CLASSIC + "|" + _NEW + ")$", re.MULTILINE)

_PU_HEADER = re.compile(_POOLUSED_HEADER + "$", re.MULTILINE)
_PU_NOISE = _line_pattern(*_NOISE_COMMON, *_NOISE_POOLUSED)
_PU_SORT = re.compile(r"[ \t]*Sorting by[ \t]+(.*?)[ \t]*$", re.MULTILINE)
_SORTS = {"tag": model.SORT_TAG, "nonpaged pool consumed": model.SORT_NONPAGED, "paged pool consumed": model.SORT_PAGED}

_PM_HEADER = re.compile(_POOLMON_HEADER + "$", re.MULTILINE)
_PM_NOISE = _line_pattern(*_NOISE_COMMON, *_NOISE_POOLMON)

_first = itemgetter(0)


# --------------------------------------------------------------------------------------------------------------------
# Line bookkeeping.


def _normalize(text: str) -> str:
    return text.replace("\r\n", "\n") if "\r" in text else text


def _line_no(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _line_at(text: str, pos: int) -> tuple[int, int]:
    """Start and end (exclusive, before the newline) of the line holding `pos`."""
    start = text.rfind("\n", 0, pos) + 1
    end = text.find("\n", pos)
    return start, (len(text) if end < 0 else end)


def _error(what: str, text: str, pos: int, reason: str = "cannot parse") -> DebuggerOutputError:
    start, end = _line_at(text, pos)
    return DebuggerOutputError(f"{what} line {_line_no(text, start)}: {reason}: {text[start:end]!r}")


def _header_lines(text: str, needle: str, pattern: re.Pattern[str]) -> list[re.Match[str]]:
    """Matches of a header `pattern` on the lines that contain `needle` (str.find is far cheaper than a scan)."""
    found: list[re.Match[str]] = []
    pos = text.find(needle)
    while pos >= 0:
        start, end = _line_at(text, pos)
        match = pattern.match(text, start, end)
        if match:
            found.append(match)
        pos = text.find(needle, end)
    return found


def _scan(pattern: re.Pattern[str], text: str, start: int, end: int, what: str) -> list[tuple[str, ...]]:
    """`pattern.findall` over the lines in [start, end), which must all match; else raise naming the first bad line.

    `start` is a line start. One match per line: a pattern of whole-line alternatives cannot match twice on one line
    nor across lines, so the count equals the line count exactly when no line was skipped.
    """
    if start >= end:
        return []
    rows: list[tuple[str, ...]] = pattern.findall(text, start, end)
    if len(rows) != text.count("\n", start, end) + 1:
        pos = start
        while pos <= end:
            line_end = text.find("\n", pos, end)
            line_end = end if line_end < 0 else line_end
            if not pattern.fullmatch(text, pos, line_end):
                raise _error(what, text, pos)
            pos = line_end + 1
        raise DebuggerOutputError(f"{what}: lines {_line_no(text, start)}-{_line_no(text, end)} were not all read")
    return rows


def _regions(text: str, headers: list[re.Match[str]]) -> list[tuple[int, int, re.Match[str] | None]]:
    """The prelude before the first header, then one region per header (header line included) up to the next."""
    bounds = [m.start() for m in headers]
    regions: list[tuple[int, int, re.Match[str] | None]] = [(0, bounds[0] if bounds else len(text), None)]
    for i, match in enumerate(headers):
        regions.append((match.start(), bounds[i + 1] if i + 1 < len(bounds) else len(text), match))
    return regions


def _after_line(text: str, match: re.Match[str]) -> int:
    """Start of the line after the one `match` ends on (len(text) + 1 if there is none)."""
    end = text.find("\n", match.end())
    return len(text) + 1 if end < 0 else end + 1


# --------------------------------------------------------------------------------------------------------------------
# !poolfind


def parse_poolfind(text: str) -> list[PoolBlock]:
    """The blocks listed in `!poolfind` output (classic and new formats; several commands may follow each other).

    An output with headers but no hits gives []. Raises:
        DebuggerOutputError: a line that is neither a block nor known noise (message names the line number), or
            a text with no `!poolfind` header and no block line at all.
    """
    text = _normalize(text)
    headers = _header_lines(text, "Scanning large pool allocation table", _FIND_HEADER)
    headers += _header_lines(text, "Searching ", _FIND_HEADER)
    headers.sort(key=lambda m: m.start())
    blocks: list[PoolBlock] = []
    with gc_paused():
        for start, end, header in _regions(text, headers):
            if header is None:
                pool = model.UNKNOWN
            elif header.group(1) is None:
                pool = model.LARGE
            else:
                pool = header.group(1).lower()
            blocks += _poolfind_region(text, start, end, pool)
    if not headers and not blocks:
        raise DebuggerOutputError("!poolfind output: no 'Scanning ...' / 'Searching ... pool' header and no block line")
    return blocks


def _poolfind_region(text: str, start: int, end: int, pool: str) -> list[PoolBlock]:
    what = "!poolfind output"
    classic = text.find("previous size:", start, end) >= 0
    new = text.find(" : tag ", start, end) >= 0
    if classic and new:
        return _poolfind_mixed(_scan(_FIND_BOTH, text, start, end, what), pool)
    rows = list(filter(_first, _scan(_FIND_NEW if new else _FIND_CLASSIC, text, start, end, what)))
    if not rows:
        return []
    count = len(rows)
    if new:
        address, tag, size, pool_word = zip(*rows)
        return bulk_new(
            PoolBlock,
            count,
            {
                "address": map(int, _unticked(address, text, start, end), repeat(16)),
                "size": map(int, size, repeat(16)),
                "tag": tag,
                "pool": map(str.lower, pool_word),
                "allocated": repeat(True, count),
                "protected": repeat(False, count),
                "previous_size": repeat(None, count),
            },
        )
    address, size, previous, state, tag, protected = zip(*rows)
    return bulk_new(
        PoolBlock,
        count,
        {
            "address": map(int, _unticked(address, text, start, end), repeat(16)),
            "size": map(int, size, repeat(16)),
            "tag": map(str.ljust, tag, repeat(4)),
            "pool": repeat(pool, count),
            "allocated": map(bool, state),
            "protected": map(bool, protected),
            "previous_size": map(int, previous, repeat(16)),
        },
    )


def _unticked(column: tuple[str, ...], text: str, start: int, end: int) -> tuple[str, ...]:
    if text.find("`", start, end) < 0:
        return column
    return tuple(a.replace("`", "") for a in column)


def _poolfind_mixed(rows: list[tuple[str, ...]], pool: str) -> list[PoolBlock]:
    """A region holding both line formats (not seen in practice): built row by row to keep the order."""
    blocks = []
    for row in rows:
        if row[0]:
            address, size, previous, state, tag, protected = row[:6]
            blocks.append(
                PoolBlock(
                    int(address.replace("`", ""), 16),
                    int(size, 16),
                    tag.ljust(4),
                    pool,
                    bool(state),
                    bool(protected),
                    int(previous, 16),
                )
            )
        elif row[6]:
            address, tag, size, pool_word = row[6:10]
            address = address.replace("`", "")
            blocks.append(PoolBlock(int(address, 16), int(size, 16), tag, pool_word.lower(), True, False, None))
    return blocks


# --------------------------------------------------------------------------------------------------------------------
# !poolused


@cache
def _poolused_pattern(tag_column: int, columns: int) -> re.Pattern[str]:
    # Groups: tag, the numbers but the last, the blanks before the last number, the last number, the rest of the line
    # (TAB + description in the newer layout, the description glued to the number in the old one, or blanks).
    number = r"[ \t]+(-?\d+)"
    row = " " * tag_column + r"(.{4})" + number * (columns - 1) + r"([ \t]+)(-?\d+)((?:\t|[ ]*(?=[^\s\d])).*|[ \t]*)"
    total = r" ?TOTAL" + r"[ \t]+-?\d+" * columns + r"[ \t]*"
    return _line_pattern(row, total, *_NOISE_COMMON, *_NOISE_POOLUSED)


@cache
def _total_pattern(columns: int) -> re.Pattern[str]:
    return re.compile(r" ?TOTAL" + r"[ \t]+(-?\d+)" * columns + r"[ \t]*")


def parse_poolused_tables(text: str) -> list[PoolUsedTable]:
    """Every `!poolused` table in `text`, in order (one per column header line).

    Raises:
        DebuggerOutputError: no column header line, an unparseable line (message names the line number), or two
            TOTAL rows in one table.
    """
    text = _normalize(text)
    headers = _header_lines(text, "Allocs", _PU_HEADER)
    if not headers:
        raise DebuggerOutputError("!poolused output: no column header line (' Tag    Allocs     Used ...') found")
    tables = []
    with gc_paused():
        previous_end = 0
        for start, end, header in _regions(text, headers):
            if header is None:
                _scan(_PU_NOISE, text, start, end, "!poolused output")
                continue
            tables.append(_poolused_table(text, header, end, _poolused_sort(text, previous_end, start)))
            previous_end = header.end()
    return tables


def parse_poolused(text: str) -> list[TagUsage]:
    """The tag rows of one `!poolused` output; [] when the header is followed by no row. TOTAL is not included
    (see parse_poolused_tables for it, the sort order and the verbose flag).

    Raises:
        DebuggerOutputError: as parse_poolused_tables, or more than one table in `text`.
    """
    tables = parse_poolused_tables(text)
    if len(tables) != 1:
        raise DebuggerOutputError(f"!poolused output: {len(tables)} tables in one text; use parse_poolused_tables")
    return list(tables[0].usages)


def _poolused_sort(text: str, lo: int, hi: int) -> str | None:
    pos = text.rfind("Sorting by", lo, hi)
    if pos < 0:
        return None
    start, end = _line_at(text, pos)
    match = _PU_SORT.match(text, start, end)
    if not match:  # "Sorting by" inside some other line
        return None
    words = " ".join(match.group(1).split()).lower()
    return _SORTS.get(words, words)


def _poolused_table(text: str, header: re.Match[str], end: int, sort: str | None) -> PoolUsedTable:
    what = "!poolused output"
    verbose = "Frees" in header.group("verbose")
    columns = 8 if verbose else 4
    tag_column = len(header.group(1))
    ends = [m.end() for m in re.finditer(r"\S+", header.group(0))]
    last_width = ends[-1] - ends[-2]
    start = _after_line(text, header)
    rows = list(filter(_first, _scan(_poolused_pattern(tag_column, columns), text, start, end, what)))
    usages: list[TagUsage] = []
    if rows:
        cols = list(zip(*rows))
        tag, numbers, gap, last, rest = cols[0], cols[1:columns], cols[columns], cols[columns + 1], cols[columns + 2]
        last, rest = _unglue(gap, last, rest, last_width)
        count = len(tag)
        ints = [map(int, col) for col in (*numbers, last)]
        fields: dict[str, Iterable[Any]]
        if verbose:
            fields = dict(
                zip(
                    (
                        "nonpaged_allocs",
                        "nonpaged_frees",
                        "nonpaged_outstanding",
                        "nonpaged_bytes",
                        "paged_allocs",
                        "paged_frees",
                        "paged_outstanding",
                        "paged_bytes",
                    ),
                    ints,
                )
            )
        else:
            fields = dict(zip(("nonpaged_outstanding", "nonpaged_bytes", "paged_outstanding", "paged_bytes"), ints))
            for name in ("nonpaged_allocs", "nonpaged_frees", "paged_allocs", "paged_frees"):
                fields[name] = repeat(None, count)
        fields.update(tag=tag, description=map(str.strip, rest))
        usages = bulk_new(TagUsage, count, fields)
    return PoolUsedTable(sort, verbose, tuple(usages), _poolused_total(text, start, end, columns))


def _unglue(
    gap: tuple[str, ...], last: tuple[str, ...], rest: tuple[str, ...], width: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split digits that belong to a description glued to the last number (old layout: "        01394 OHCI ...").

    The last column is right-aligned in `width` characters (taken from the header). A number that fits has blanks
    before it and ends exactly there; digits beyond that start the description. A number that overflows its column
    has a single blank before it and is kept whole.
    """
    if max(map(add, map(len, gap), map(len, last)), default=0) <= width:  # C loops; true unless a row overflows
        return last, rest
    bad = [i for i, (g, n) in enumerate(zip(gap, last)) if len(g) > 1 and len(g) + len(n) > width > len(g)]
    if not bad:
        return last, rest
    last_list, rest_list = list(last), list(rest)
    for i in bad:
        keep = width - len(gap[i])
        rest_list[i] = last_list[i][keep:] + rest_list[i]
        last_list[i] = last_list[i][:keep]
    return tuple(last_list), tuple(rest_list)


def _poolused_total(text: str, start: int, end: int, columns: int) -> PoolTotals | None:
    found: PoolTotals | None = None
    pattern = _total_pattern(columns)
    pos = text.find("TOTAL", start, end)
    while pos >= 0:
        line_start, line_end = _line_at(text, pos)
        match = pattern.fullmatch(text, line_start, line_end)
        if match:
            if found is not None:
                raise _error("!poolused output", text, line_start, "a second TOTAL row in one table")
            n = list(map(int, match.groups()))
            if columns == 8:
                found = PoolTotals(n[2], n[3], n[6], n[7], n[0], n[1], n[4], n[5])
            else:
                found = PoolTotals(n[0], n[1], n[2], n[3], None, None, None, None)
        pos = text.find("TOTAL", line_end, end)
    return found


# --------------------------------------------------------------------------------------------------------------------
# PoolMon


@cache
def _poolmon_pattern(tag_column: int) -> re.Pattern[str]:
    # Groups: tag, type, allocs, frees, diff, bytes, per alloc, mapped driver. "( n)" are the interactive display's
    # change columns; a /n snapshot has none.
    change = r"(?: \([ \t]*-?\d+\))?"
    row = (
        " " * tag_column
        + r"(.{4}) (Nonp|Paged)[ \t]+(\d+)"
        + change
        + r"[ \t]+(\d+)"
        + change
        + r"[ \t]+(-?\d+)[ \t]+(-?\d+)"
        + change
        + r"[ \t]+(-?\d+)((?:[ \t]+\S.*)?)[ \t]*"
    )
    return _line_pattern(row, *_NOISE_COMMON, *_NOISE_POOLMON)


def parse_poolmon_snapshots(text: str) -> list[list[TagUsage]]:
    """Every PoolMon table in `text` (a poolsnap.log gets one appended per `poolmon /n` run), tags in table order.

    A tag's Nonp and Paged rows are merged into one TagUsage.
    Raises:
        DebuggerOutputError: no header line, an unparseable line (message names the line number), or a tag with two
            rows of the same type in one table.
    """
    text = _normalize(text)
    headers = _header_lines(text, "Per Alloc", _PM_HEADER)
    if not headers:
        raise DebuggerOutputError("PoolMon output: no header line (' Tag  Type     Allocs ...') found")
    tables = []
    for start, end, header in _regions(text, headers):
        if header is None:
            _scan(_PM_NOISE, text, start, end, "PoolMon output")
            continue
        body = _after_line(text, header)
        tables.append(_poolmon_table(text, body, end, _poolmon_pattern(len(header.group(1)))))
    return tables


def parse_poolmon(text: str) -> list[TagUsage]:
    """The tags of one PoolMon table (`poolmon /n` snapshot file or a copy of the display); [] for a header alone.

    Raises:
        DebuggerOutputError: as parse_poolmon_snapshots, or more than one table in `text`.
    """
    tables = parse_poolmon_snapshots(text)
    if len(tables) != 1:
        raise DebuggerOutputError(f"PoolMon output: {len(tables)} tables in one text; use parse_poolmon_snapshots")
    return tables[0]


def _poolmon_table(text: str, start: int, end: int, pattern: re.Pattern[str]) -> list[TagUsage]:
    merged: dict[str, list[tuple[int, int, int, int, str] | None]] = {}
    rows = filter(_first, _scan(pattern, text, start, end, "PoolMon output"))
    for tag, kind, allocs, frees, diff, used, _per_alloc, mapped in rows:
        entry = merged.setdefault(tag, [None, None])
        slot = 0 if kind == "Nonp" else 1
        if entry[slot] is not None:
            raise _poolmon_duplicate(text, start, end, pattern, tag, kind)
        entry[slot] = (int(allocs), int(frees), int(diff), int(used), mapped.strip())
    usages = []
    for tag, (nonpaged, paged) in merged.items():
        description = next((r[4] for r in (nonpaged, paged) if r is not None and r[4]), "")
        usages.append(
            TagUsage(
                tag=tag,
                nonpaged_outstanding=nonpaged[2] if nonpaged else 0,
                nonpaged_bytes=nonpaged[3] if nonpaged else 0,
                paged_outstanding=paged[2] if paged else 0,
                paged_bytes=paged[3] if paged else 0,
                nonpaged_allocs=nonpaged[0] if nonpaged else None,
                nonpaged_frees=nonpaged[1] if nonpaged else None,
                paged_allocs=paged[0] if paged else None,
                paged_frees=paged[1] if paged else None,
                description=description,
            )
        )
    return usages


def _poolmon_duplicate(
    text: str, start: int, end: int, pattern: re.Pattern[str], tag: str, kind: str
) -> DebuggerOutputError:
    seen = 0
    for match in pattern.finditer(text, start, end):
        if match.group(1) == tag and match.group(2) == kind:
            seen += 1
            if seen == 2:
                return _error("PoolMon output", text, match.start(), f"a second {kind} row for tag {tag!r}")
    return DebuggerOutputError(f"PoolMon output: a second {kind} row for tag {tag!r}")


# --------------------------------------------------------------------------------------------------------------------
# Format detection and snapshots


def detect_format(text: str) -> str:
    """'poolused', 'poolfind' or 'poolmon', from the header lines (or, for `!poolfind`, a block line).

    Raises:
        DebuggerOutputError: none of the three, or more than one in the same text.
    """
    text = _normalize(text)
    found = []
    if _header_lines(text, "Allocs", _PU_HEADER):
        found.append(model.POOLUSED)
    if (
        _header_lines(text, "Scanning large pool allocation table", _FIND_HEADER)
        or _header_lines(text, "Searching ", _FIND_HEADER)
        or _FIND_ANY_ROW.search(text)
    ):
        found.append(model.POOLFIND)
    if _header_lines(text, "Per Alloc", _PM_HEADER):
        found.append(model.POOLMON)
    if not found:
        raise DebuggerOutputError("not !poolused, !poolfind or PoolMon output (no header line or block line found)")
    if len(found) > 1:
        raise DebuggerOutputError(f"the text mixes {' and '.join(found)} output; split it first")
    return found[0]


def parse_snapshot(text: str, time: str, source: str | None = None) -> Snapshot:
    """A Snapshot taken at `time` (ISO-8601) from `!poolused`, `!poolfind` or PoolMon text (`source` detected if None).

    Raises:
        UsageError: `time` is not ISO-8601, or `source` is not one of model.SOURCES.
        DebuggerOutputError: see the parse_* functions and detect_format.
    """
    try:
        datetime.fromisoformat(time[:-1] + "+00:00" if time.endswith("Z") else time)
    except ValueError as e:
        raise UsageError(f"snapshot time {time!r} is not ISO-8601") from e
    kind = detect_format(text) if source is None else source
    if kind == model.POOLFIND:
        return Snapshot(time, kind, (), tuple(parse_poolfind(text)))
    if kind == model.POOLUSED:
        return Snapshot(time, kind, tuple(parse_poolused(text)), ())
    if kind == model.POOLMON:
        return Snapshot(time, kind, tuple(parse_poolmon(text)), ())
    raise UsageError(f"snapshot source {source!r}: expected one of {', '.join(model.SOURCES)}")
