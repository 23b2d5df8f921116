"""Parsers for WinDbg `!poolused` / `!poolfind` output and PoolMon tables (windows-facts.md section 2).

All functions are pure: text in, frozen records out (model.py). Every line must be either data or a known kind of noise
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

Speed: logs reach 200,000 lines, and parsing must keep up with reading them (benchmarks/bench_report.py: at least
a third of the speed of splitting every line into words). No Python code runs per line, and the data are worked
through in pieces of about 64K characters, so that what is made for a piece is still in the CPU caches when it is
used (`_pieces`).
- Fast paths, for the layouts WinDbg prints (`_poolfind_fast`, `_poolused_fast`). One `Pattern.split` of a piece,
  with a loose pattern of whole data lines, gives the captured fields flat ([gap, field 1, ..., field n, gap, ...]);
  a column is a slice of that list with a step. The gaps hold the other lines; nearly all are the same few strings
  (a newline, a blank line, a header), and each distinct one is checked once to be made of noise lines and to hold
  no data line that the loose pattern missed. `!poolfind` lines are an address and a tail that repeats (sizes and
  tags do): each distinct tail is read once with the full groups, and the addresses of a piece are converted by one
  `bytes.fromhex`. The numbers of a `!poolused` piece whose columns line up, as WinDbg prints them, become the
  text of one JSON array (a comma put where each number of a row ends) that the C decoder converts: no word objects,
  and faster than `int` (`_aligned_numbers`); other pieces are split into words in one go and converted by `int`.
  A fast path reads only lines that the full patterns read the same way; on anything else it gives up (returns None)
  and the full path reads the region: tests/test_snapshot_parsers.py compares the two on mutated logs.
- Full paths: per region, one `Pattern.split` or `findall` with the full patterns, columns converted with `map`.
  When a line is neither data nor noise, the region is scanned again line by line (`_scan`) to name it.
- The records are tuples (model.py), made in one C loop with the cyclic garbage collector paused.
"""

from __future__ import annotations

import json
import re
import sys
from array import array
from datetime import datetime
from functools import cache
from itertools import repeat
from operator import add, itemgetter, truth
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..errors import DebuggerOutputError, UsageError
from . import model
from .model import PoolBlock, PoolTotals, PoolUsedTable, Snapshot, TagUsage, from_rows, gc_paused, records

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

_V = TypeVar("_V")

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
# For `_split_rows`: the data lines alone (the other lines must match _FIND_NOISE).
_FIND_CLASSIC_ROW = re.compile("^(?:" + _CLASSIC + ")$", re.MULTILINE)
_FIND_NEW_ROW = re.compile("^(?:" + _NEW + ")$", re.MULTILINE)
# The fast path (`_poolfind_fast`) reads the layout WinDbg prints: an address of 8 or 16 digits (or 8`8), single
# blanks but in the padding, no '*' marker, nothing after the tag or the pool word. Its lines are matched loosely as
# address + tail, and the distinct tails are then matched in full with the other groups of _CLASSIC / _NEW. The
# narrow layout is a special case of the full one, read the same way: each narrow part takes what the full part takes
# first.
_FIND_FAST_ADDR = r"(.{16}|.{8}`.{8}|.{8})"  # checked to be hex digits by _hex_words (`.` is cheaper to match)
_FIND_CLASSIC_LINE = re.compile("^" + _FIND_FAST_ADDR + "( size: .*)$", re.MULTILINE)
_FIND_NEW_LINE = re.compile("^" + _FIND_FAST_ADDR + "( : tag .*)$", re.MULTILINE)
# Groups: size, previous size, 'A' (Allocated) or None (Free), tag, ' (Protected)' or ''.
_FIND_CLASSIC_TAIL = re.compile(
    r"^(?: size: +([0-9a-fA-F]+) previous size: +([0-9a-fA-F]+)  "
    r"\((?:(A)llocated\) |Free\)      )(.{4})( \(Protected\)|))$",
    re.MULTILINE,
)
# Groups: tag, size, pool word.
_FIND_NEW_TAIL = re.compile(r"^(?: : tag (.{4}), size +(0x[0-9a-fA-F]+|0), ([A-Za-z]+) pool)$", re.MULTILINE)
_FIND_FIRST_ROW = re.compile("previous size:| : tag ")
_FIND_NOISE = _line_pattern(*_NOISE_FIND)

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


def _header_lines(text: str, needle: str, pattern: re.Pattern[str], limit: int = -1) -> list[re.Match[str]]:
    """Matches of a header `pattern` on the lines that contain `needle` (str.find is far cheaper than a scan); the
    first `limit` only if `limit` is not negative."""
    found: list[re.Match[str]] = []
    pos = text.find(needle) if limit else -1
    while pos >= 0:
        start, end = _line_at(text, pos)
        match = pattern.match(text, start, end)
        if match:
            found.append(match)
            if len(found) == limit:
                break  # rather than look for the needle through the rest of the text
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


_PIECE = 1 << 16  # characters


def _pieces(text: str, start: int, end: int, scale: int = 1) -> Iterator[tuple[int, int]]:
    """[start, end) cut at line ends into pieces of about `scale` * _PIECE characters (`start` is a line start).

    The fast paths work piece by piece: the strings and lists made for a piece fit the CPU caches and are freed
    before the next piece, which is faster than holding a million short strings for the whole log.
    """
    size = _PIECE * scale
    while start < end:
        cut = text.find("\n", start + size, end)
        cut = end if cut < 0 else cut + 1
        yield start, cut
        start = cut


def _split_rows(
    row: re.Pattern[str],
    noise: re.Pattern[str],
    text: str,
    start: int,
    end: int,
    not_noise: re.Pattern[str] | None = None,
) -> list[Any] | None:
    """`row.split` of the lines in [start, end): [gap, group 1, ..., group n, gap, ...] with one group run per line
    that `row` (a pattern of whole lines) matches. None unless every other line, all of which are in the gaps,
    matches `noise` (a `_line_pattern`) and none matches `not_noise` (the full data pattern when `row` is a narrow
    version of it: a data line that `row` misses must not pass as noise).

    `start` is a line start. A gap runs from the end of one matched line (before its newline) to the start of the
    next, so it splits at its newlines into the skipped lines and two empty pieces, which pass as blank lines.
    """
    parts: list[Any] = row.split(text[start:end])  # str, or None for a group that did not take part
    for gap in set(parts[:: row.groups + 1]):
        if not_noise is not None and not_noise.search(gap):
            return None
        if len(noise.findall(gap)) != gap.count("\n") + 1:
            return None
    return parts


def _converted(column: Sequence[str], convert: Callable[[str], _V]) -> Iterator[_V]:
    """`map(convert, column)` for a column with few distinct values: `convert` runs once per distinct value."""
    table = {value: convert(value) for value in set(column)}
    return map(table.__getitem__, column)


def _hex(value: str) -> int:
    return int(value, 16)


def _pad_tag(tag: str) -> str:
    return tag.ljust(4)


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
    first = _FIND_FIRST_ROW.search(text, start, end)
    if first is not None:
        blocks = _poolfind_fast(text, start, end, pool, new=first.group() == " : tag ")
        if blocks is not None:
            return blocks
    return _poolfind_full(text, start, end, pool)


def _poolfind_fast(text: str, start: int, end: int, pool: str, new: bool) -> list[PoolBlock] | None:
    """The blocks of a region in one line format and the narrow layout; None if it is not so."""
    line = _FIND_NEW_LINE if new else _FIND_CLASSIC_LINE
    fields: dict[str, tuple[Any, ...]] = {}  # line tail -> the PoolBlock fields after the address
    blocks: list[PoolBlock] = []
    for lo, hi in _pieces(text, start, end):
        parts = _split_rows(line, _FIND_NOISE, text, lo, hi, _FIND_ANY_ROW)
        if parts is None:
            return None
        tails = parts[2::3]
        # Most pieces bring a few new tails (a log has thousands of distinct ones), so look for them right away.
        fresh = set(tails).difference(fields)
        if fresh and not (_add_new_tails if new else _add_classic_tails)(fields, list(fresh), pool):
            return None
        addresses = _hex_words(parts[1::3])
        if addresses is None:
            return None
        blocks += from_rows(PoolBlock, map(add, zip(addresses), map(fields.__getitem__, tails)))
    return blocks


def _add_classic_tails(fields: dict[str, tuple[Any, ...]], tails: list[str], pool: str) -> bool:
    """Enter the PoolBlock fields after the address (size, tag, pool, allocated, protected, previous_size) of each
    of the distinct classic line `tails` in `fields` (a log has few distinct tails: they repeat sizes and tags);
    False if one is not a narrow tail."""
    parts = _FIND_CLASSIC_TAIL.split("\n".join(tails))
    if len(parts) != 6 * len(tails) + 1:
        return False
    size, previous, state, tag, protected = (parts[i::6] for i in range(1, 6))
    rest = zip(
        map(int, size, repeat(16)),
        tag,
        repeat(pool),
        map(truth, state),
        map(truth, protected),
        map(int, previous, repeat(16)),
    )
    fields.update(zip(tails, rest))
    return True


def _add_new_tails(fields: dict[str, tuple[Any, ...]], tails: list[str], pool: str) -> bool:
    """As _add_classic_tails, for new-format line tails (which name their pool: `pool` is not used)."""
    parts = _FIND_NEW_TAIL.split("\n".join(tails))
    if len(parts) != 4 * len(tails) + 1:
        return False
    tag, size, pool_word = (parts[i::4] for i in range(1, 4))
    rest = zip(
        map(int, size, repeat(16)),
        tag,
        map(str.lower, pool_word),
        repeat(True),
        repeat(False),
        repeat(None),
    )
    fields.update(zip(tails, rest))
    return True


def _hex_words(column: list[str]) -> list[int] | None:
    """`int(a, 16)` for each address of `column` if all are 16 hex digits (a backtick may follow the 8th) or all are
    8; else None.

    `bytes.fromhex` of all the digits, cut into machine words by `array`: much faster than an `int` per address.
    """
    count = len(column)
    digits = "".join(column)
    ticked = "`" in digits
    if ticked:
        digits = digits.replace("`", "")
    for size, code in _WORDS if not ticked else _WORDS[:1]:  # without backticks each has 8 or 16 digits
        if len(digits) == 2 * size * count:
            try:
                raw = bytes.fromhex(digits)
            except ValueError:
                return None
            if len(raw) != size * count:  # fromhex skips white space
                return None
            words = array(code, raw)
            if sys.byteorder == "little":
                words.byteswap()
            return words.tolist()
    return None


# Bytes per address and the unsigned array type of that size.
_WORDS = [(size, code) for size, code in ((8, "Q"), (4, "I")) if array(code).itemsize == size]


def _poolfind_full(text: str, start: int, end: int, pool: str) -> list[PoolBlock]:
    """The blocks of a region, any layout the patterns allow."""
    what = "!poolfind output"
    classic = text.find("previous size:", start, end) >= 0
    new = text.find(" : tag ", start, end) >= 0
    if classic and new:
        return _poolfind_mixed(_scan(_FIND_BOTH, text, start, end, what), pool)
    parts = _split_rows(_FIND_NEW_ROW if new else _FIND_CLASSIC_ROW, _FIND_NOISE, text, start, end)
    if parts is None:  # a line that is neither: name it
        _scan(_FIND_NEW if new else _FIND_CLASSIC, text, start, end, what)
        raise DebuggerOutputError(f"{what}: lines {_line_no(text, start)}-{_line_no(text, end)} were not all read")
    if len(parts) == 1:
        return []
    ticked = text.find("`", start, end) >= 0
    if new:
        # Groups: address, tag, size, pool word.
        return records(
            PoolBlock,
            _addresses(parts[1::5], ticked),
            _converted(parts[3::5], _hex),
            parts[2::5],
            _converted(parts[4::5], str.lower),
            repeat(True),
            repeat(False),
            repeat(None),
        )
    # Groups: address, size, previous size, 'A' (Allocated) or None (Free), tag, ' (Protected)' or ''.
    return records(
        PoolBlock,
        _addresses(parts[1::7], ticked),
        _converted(parts[2::7], _hex),
        _converted(parts[5::7], _pad_tag),
        repeat(pool),
        map(truth, parts[4::7]),
        map(truth, parts[6::7]),
        _converted(parts[3::7], _hex),
    )


def _addresses(column: Sequence[str], ticked: bool) -> Iterator[int]:
    if ticked:
        return map(int, map(str.replace, column, repeat("`"), repeat("")), repeat(16))
    return map(int, column, repeat(16))


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


def _poolused_row(tag_column: int, columns: int) -> str:
    # Groups: tag, the numbers but the last (one group each), the blanks before the last number, the last number, the
    # rest of the line (TAB + description in the newer layout, the description glued to the number in the old one, or
    # blanks).
    number = r"[ \t]+(-?\d+)"
    return " " * tag_column + r"(.{4})" + number * (columns - 1) + r"([ \t]+)(-?\d+)((?:\t|[ ]*(?=[^\s\d])).*|[ \t]*)"


def _poolused_total_row(columns: int) -> str:
    return r" ?TOTAL" + r"[ \t]+-?\d+" * columns + r"[ \t]*"


@cache
def _poolused_pattern(tag_column: int, columns: int) -> re.Pattern[str]:
    return _line_pattern(
        _poolused_row(tag_column, columns), _poolused_total_row(columns), *_NOISE_COMMON, *_NOISE_POOLUSED
    )


@cache
def _poolused_fast_patterns(
    tag_column: int, columns: int, width: int
) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """The `_split_rows` patterns of `_poolused_fast`: the loose and the narrow row, the other lines (TOTAL and noise),
    the full row.

    The narrow row is the tag, a blank, the numbers up to the first TAB, and the description. `_poolused_fast` checks
    that the numbers are `columns` numbers separated by blanks (checking the runs of a whole piece at once is cheaper
    than matching a character class); the row ends them with a digit.
    Such a line is a row of the full pattern with blanks for `[ \\t]` and ASCII digits for `\\d`, read the same way:
    blanks and digits alternate, and the rest of the line starts at the TAB. The look-behinds refuse a last number
    that `_unglue` could cut (more than one blank before it and, with them, longer than `width`) and a last number of
    `width` characters or more. A line that only the full row matches (it may match a noise pattern too: a tag can
    be 'kd> '; a row without a description has no TAB) must not pass as noise.
    The loose row is the narrow one without the look-behinds, which take about a sixth of the time of the split:
    `_aligned_numbers` makes the same checks for a whole piece at once.
    Groups of both rows: tag, the numbers, the description (not stripped).
    """
    cut = "|".join(" " * blanks + "[0-9-]" * (width + 1 - blanks) + r"\t" for blanks in range(2, width + 1))
    # `[^\t]*` is the fastest loop (it may run on into the next line: such a run is refused for its newline). `....`
    # is a little faster than `.{4}`, and `(.*)` always ends at the end of the line.
    loose = " " * tag_column + r"(....)( [^\t]*)\t(.*)"
    row = " " * tag_column + r"(....)( [^\t]*)\t(?<=[0-9]\t)(?<![0-9-]{" + str(width) + r"}\t)(?<!" + cut + r")(.*)"
    return (
        re.compile("^" + loose, re.MULTILINE),
        re.compile("^" + row, re.MULTILINE),
        _line_pattern(_poolused_total_row(columns), *_NOISE_COMMON, *_NOISE_POOLUSED),
        re.compile("^(?:" + _poolused_row(tag_column, columns) + ")$", re.MULTILINE),
    )


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
    first = _header_lines(text, "Allocs", _PU_HEADER, limit=1)
    if not first:
        raise DebuggerOutputError("!poolused output: no column header line (' Tag    Allocs     Used ...') found")
    tables = []
    with gc_paused():
        # Nearly always there is one table: read it to the end of the text the fast way, which saves looking for
        # more header lines through the whole text. Another header line makes the fast way give up.
        _scan(_PU_NOISE, text, 0, first[0].start(), "!poolused output")
        table = _poolused_table(text, first[0], len(text), _poolused_sort(text, 0, first[0].start()), fast_only=True)
        if table is not None:
            return [table]
        headers = _header_lines(text, "Allocs", _PU_HEADER)
        previous_end = 0
        for start, end, header in _regions(text, headers):
            if header is None:
                _scan(_PU_NOISE, text, start, end, "!poolused output")
                continue
            table = _poolused_table(text, header, end, _poolused_sort(text, previous_end, start))
            assert table is not None
            tables.append(table)
            previous_end = header.end()
    return tables


def parse_poolused(text: str) -> list[TagUsage]:
    """The tag rows of one `!poolused` output; [] when the header is followed by no row. TOTAL is not included
    (see parse_poolused_tables for it, the sort order and the verbose flag).

    Raises:
        DebuggerOutputError: as parse_poolused_tables, or more than one table in `text`.
    """
    with gc_paused():  # also while copying the rows (a list the collector would scan with them)
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


def _poolused_table(
    text: str, header: re.Match[str], end: int, sort: str | None, fast_only: bool = False
) -> PoolUsedTable | None:
    """The table under `header` up to `end`; None if `fast_only` and `_poolused_fast` cannot read it."""
    verbose = "Frees" in header.group("verbose")
    columns = 8 if verbose else 4
    tag_column = len(header.group(1))
    ends = [m.end() for m in re.finditer(r"\S+", header.group(0))]
    last_width = ends[-1] - ends[-2]
    start = _after_line(text, header)
    fast = _poolused_fast(text, start, end, tag_column, columns, last_width)
    if fast is None and fast_only:
        return None
    if fast is not None and len(fast[1]) <= 1:
        usages, totals = fast
        total = _totals(_total_pattern(columns).fullmatch(totals[0]), columns) if totals else None
    else:  # two TOTAL rows are an error: _poolused_total finds the second one's line number
        usages = fast[0] if fast else _poolused_full(text, start, end, tag_column, columns, last_width)
        total = _poolused_total(text, start, end, columns)
    return PoolUsedTable(sort, verbose, tuple(usages), total)


def _usages(tag: Iterable[str], numbers: Sequence[Iterable[int]], description: Iterable[str]) -> list[TagUsage]:
    """TagUsage records from columns: tags, the numbers of a row in printed order (4 or 8 columns), descriptions."""
    counters: list[Iterable[int | None]]
    if len(numbers) == 8:
        np_allocs, np_frees, np_outstanding, np_bytes, p_allocs, p_frees, p_outstanding, p_bytes = numbers
        counters = [np_allocs, np_frees, p_allocs, p_frees]
    else:
        np_outstanding, np_bytes, p_outstanding, p_bytes = numbers
        counters = [repeat(None)] * 4
    return records(TagUsage, tag, np_outstanding, np_bytes, p_outstanding, p_bytes, *counters, description)


def _poolused_fast(
    text: str, start: int, end: int, tag_column: int, columns: int, width: int
) -> tuple[list[TagUsage], list[str]] | None:
    """The rows of a table body [start, end) if all are in the narrow layout, and its TOTAL lines; else None.

    The numbers of a piece are read in one go from the runs after the tags, which the row patterns hardly check: by
    `_aligned_numbers` when the columns line up, else by `_split_numbers`.
    """
    loose, row, other, full_row = _poolused_fast_patterns(tag_column, columns, width)
    total = _total_pattern(columns)
    usages: list[TagUsage] = []
    totals: list[str] = []
    pattern = loose
    # Larger pieces than for !poolfind: a !poolused row is longer, and fewer rounds of this loop are faster
    # (bench_report.py: 4 times _PIECE is a few per cent faster than _PIECE).
    for lo, hi in _pieces(text, start, end, 4):
        # The loose row takes every line that the narrow one takes: if other lines are left, the narrow one leaves
        # them too.
        parts = _split_rows(pattern, other, text, lo, hi, full_row)
        if parts is None:
            return None
        flat = _aligned_numbers(parts[2::4], columns, width)
        if flat is None:
            if pattern is loose:
                # The columns do not line up (a number wider than its column, say), and `_split_numbers` needs the
                # narrow row's look-behinds. Later pieces may not line up either: they are split with the narrow row
                # at once, one split each (`_aligned_numbers` still reads those that line up).
                pattern = row
                parts = _split_rows(row, other, text, lo, hi, full_row)
                if parts is None:
                    return None
            flat = _split_numbers(parts[2::4], columns)
            if flat is None:
                return None
        gaps = parts[::4]  # the other lines: a TOTAL row can only be there
        for gap in set(gaps):
            if "TOTAL" in gap:
                totals += [line for line in gap.split("\n") if total.fullmatch(line)] * gaps.count(gap)
        usages += _usages(parts[1::4], [flat[i::columns] for i in range(columns)], map(str.strip, parts[3::4]))
    return usages, totals


_JSON = json.JSONDecoder()
_NUMBER_END = re.compile(r"[0-9-](?![0-9-])")


def _aligned_numbers(runs: list[str], columns: int, width: int) -> list[int] | None:
    """The numbers of `runs` (of loose or narrow rows), row after row, if every run has the columns of the first one
    and ends its last number as the narrow row does; else None (also for a number that JSON does not read: '007').

    WinDbg right-aligns each column in a fixed width, so this is the usual case, and the one that needs no word
    objects: a comma put at the blank after each number of the first run, in every run, and commas between the
    runs, make the json_text of one JSON array, which the C decoder converts faster than `int` converts words (the
    conversion is most of the time of a parse). A number that is longer than its column moves the ones after it:
    such a piece goes the narrow way, with `_split_numbers`.

    JSON reads the numbers as the full row does: the json_text is only ASCII digits, '-', blanks and the commas, the
    array must hold exactly `columns` values per run (one per comma-separated part), and JSON numbers made of those
    characters are `-?[0-9]+` (without leading zeros) with the value `int` gives them. What the narrow row's
    look-behinds check is checked for all runs at once: each ends with a digit, and the last number starts after
    the same blank in each, no more than `width` characters from the end (so `_unglue` leaves it whole).
    """
    count = len(runs)
    if not count:
        return []
    length = len(runs[0])
    stride = length + 1  # a run and the comma after it
    ends = [m.end() for m in _NUMBER_END.finditer(runs[0])]
    if len(ends) != columns or ends[-1] != length or length - ends[-2] > width:
        return None
    try:
        json_text = bytearray(",".join(runs), "ascii")
    except UnicodeEncodeError:
        return None
    separators = b"," * (count - 1)
    # Without the digits, '-' and blanks, only the commas put between the runs may be left, and they must be where
    # runs of the first one's length put them.
    if json_text.translate(None, b"0123456789- ") != separators or json_text[stride - 1 :: stride] != separators:
        return None
    if not (json_text[length - 1 :: stride].isdigit() and json_text[ends[-2] - 1 :: stride].isdigit()):
        return None
    blanks = b" " * count
    commas = b"," * count
    for end in ends[:-1]:
        if json_text[end::stride] != blanks:
            return None
        json_text[end::stride] = commas
    json_text[0] = ord("[")  # in the place of the blank that starts every run
    json_text.append(ord("]"))
    try:
        numbers: list[int] = _JSON.decode(json_text.decode())
    except ValueError:
        return None
    return numbers if len(numbers) == count * columns else None


# White space that bytes.split() splits at besides blanks (a run holds no TAB), and what int() takes besides -?[0-9]+.
_NOT_IN_RUNS = (b"\n", b"\r", b"\v", b"\f", b"+", b"_")


def _split_numbers(runs: list[str], columns: int) -> list[int] | None:
    """The numbers of `runs`, row after row, if each run holds `columns` of them (`-?[0-9]+`, apart by blanks);
    else None.

    The runs joined with '|' between rows, as bytes (faster to split and to convert), are split into words at blanks
    (no other white space, '+' or '_' may be there), which must give `columns` words then '|' for every row, and `int`
    must take every word: then each is `-?[0-9]+`.
    """
    count = len(runs)
    joined = " | ".join(runs).encode()
    if any(space in joined for space in _NOT_IN_RUNS):
        return None
    words = joined.split()
    if len(words) != count * (columns + 1) - 1 or words[columns :: columns + 1].count(b"|") != count - 1:
        return None
    del words[columns :: columns + 1]
    try:
        return list(map(int, words))
    except ValueError:
        return None


def _poolused_full(text: str, start: int, end: int, tag_column: int, columns: int, width: int) -> list[TagUsage]:
    """The rows of a table body [start, end), any layout the full patterns allow.

    Raises:
        DebuggerOutputError: a line that is not a row, TOTAL or noise.
    """
    rows = list(filter(_first, _scan(_poolused_pattern(tag_column, columns), text, start, end, "!poolused output")))
    if not rows:
        return []
    cols = list(zip(*rows))
    gap, printed = cols[columns], cols[columns + 1]
    last, rest = _unglue(list(map(add, map(len, gap), map(len, printed))), printed, cols[columns + 2], width)
    return _usages(cols[0], [map(int, column) for column in (*cols[1:columns], last)], map(str.strip, rest))


def _unglue(
    spans: list[int], last: Sequence[str], rest: Sequence[str], width: int
) -> tuple[Sequence[str], Sequence[str]]:
    """Split digits that belong to a description glued to the last number (old layout: "        01394 OHCI ...").

    `spans[i]` is the length of the blanks before row i's last number plus the number. The last column is
    right-aligned in `width` characters (taken from the header). A number that fits has blanks before it and ends
    exactly there; digits beyond that start the description. A number that overflows its column has a single blank
    before it and is kept whole, and so is one whose cut would leave a lone '-'.
    """
    if max(spans, default=0) <= width:  # true unless a row overflows
        return last, rest
    bad = [
        i
        for i, (span, n) in enumerate(zip(spans, last))
        if span - len(n) > 1 and span > width > span - len(n) and n[: width - (span - len(n))] != "-"
    ]
    if not bad:
        return last, rest
    last_list, rest_list = list(last), list(rest)
    for i in bad:
        keep = width - (spans[i] - len(last[i]))
        rest_list[i] = last_list[i][keep:] + rest_list[i]
        last_list[i] = last_list[i][:keep]
    return last_list, rest_list


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
            found = _totals(match, columns)
        pos = text.find("TOTAL", line_end, end)
    return found


def _totals(match: re.Match[str] | None, columns: int) -> PoolTotals:
    assert match is not None
    n = list(map(int, match.groups()))
    if columns == 8:
        return PoolTotals(n[2], n[3], n[6], n[7], n[0], n[1], n[4], n[5])
    return PoolTotals(n[0], n[1], n[2], n[3], None, None, None, None)


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
    if _header_lines(text, "Allocs", _PU_HEADER, limit=1):
        found.append(model.POOLUSED)
    if (
        _header_lines(text, "Scanning large pool allocation table", _FIND_HEADER, limit=1)
        or _header_lines(text, "Searching ", _FIND_HEADER, limit=1)
        or _FIND_ANY_ROW.search(text)
    ):
        found.append(model.POOLFIND)
    if _header_lines(text, "Per Alloc", _PM_HEADER, limit=1):
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
