"""`!poolused` and `!poolfind` text as WinDbg prints it, for an emulated kernel that answers those commands.

The layouts are the Windows 10 era ones in windows-facts.md 2.3/2.4 (column widths measured on those samples), and
the classic `!poolfind` layout of 2.2. What the samples do not show is marked [UNCONFIRMED] below.

Round trips (tested):
- `parse_poolused(render_poolused(usages, flags))` == `sort_usages(usages, flags)` (descriptions stripped, as the
  parser strips them);
- `parse_poolfind(render_poolfind(blocks, tag, pool_type, new_format))` == `blocks`, for blocks the chosen format can
  express (the new format has no free, protected or previous-size information, and no 'large'/'unknown' pool).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .. import tags
from ..errors import UsageError
from . import model

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from .model import PoolBlock, TagUsage

POOLUSED_VERBOSE = 0x1
POOLUSED_SORT_NONPAGED = 0x2
POOLUSED_SORT_PAGED = 0x4
POOLUSED_SESSION = 0x8

# !poolfind PoolType argument -> the pool searched.
POOLFIND_TYPES = {0: model.NONPAGED, 1: model.PAGED, 2: model.SPECIAL, 4: model.SESSION}

_GROUP = "               NonPaged                  Paged"
_HEADER = " Tag     Allocs         Used     Allocs         Used"
_GROUP_VERBOSE = "                            NonPaged                                         Paged"
_HEADER_VERBOSE = " Tag       Allocs       Frees      Diff         Used       Allocs       Frees      Diff         Used"

_CLASSIC_POOL_NAMES = {model.NONPAGED: "NonPaged", model.PAGED: "Paged"}  # others: capitalized [UNCONFIRMED]
_POOL_WORD = re.compile(r"[a-z0-9_]+")


def sort_usages(usages: Iterable[TagUsage], flags: int = 0) -> list[TagUsage]:
    """The order `!poolused <flags>` lists tags in: by tag (ASCII), or by nonpaged (0x2) / paged (0x4) bytes, largest
    first, ties by tag."""
    ordered = sorted(usages, key=lambda u: u.tag)
    if flags & POOLUSED_SORT_NONPAGED:
        ordered.sort(key=lambda u: -u.nonpaged_bytes)
    elif flags & POOLUSED_SORT_PAGED:
        ordered.sort(key=lambda u: -u.paged_bytes)
    return ordered


def render_poolused(usages: Iterable[TagUsage], flags: int = 0, tag_filter: str | None = None) -> str:
    """`!poolused [flags [tag_filter]]` output for `usages`, sorted as WinDbg sorts (see sort_usages).

    Flag 0x1 gives the verbose 8-column layout (needs allocs/frees on every usage); 0x8 (session pool) prints the
    same table [UNCONFIRMED: no sample of session output]. The TOTAL row sums the rows shown [UNCONFIRMED for the
    non-verbose layout: printed like the verbose one]. `tag_filter` takes `*` and `?` like WinDbg.
    Raises:
        UsageError: bad flags (unknown bits, 0x2 with 0x4), a verbose render of usages without allocs/frees, a tag
            that is not 4 printable characters, or a description with a line break.
    """
    if flags & ~0xF or (flags & POOLUSED_SORT_NONPAGED and flags & POOLUSED_SORT_PAGED):
        raise UsageError(f"!poolused flags {flags:#x}: use bits 0x1, 0x2 or 0x4 (not both), 0x8")
    verbose = bool(flags & POOLUSED_VERBOSE)
    rows = sort_usages(usages, flags)
    if tag_filter is not None:
        matcher = _wildcard(tag_filter)
        rows = [u for u in rows if matcher.fullmatch(u.tag)]
    if flags & POOLUSED_SORT_NONPAGED:
        sort_line = " Sorting by NonPaged Pool Consumed"
    elif flags & POOLUSED_SORT_PAGED:
        sort_line = " Sorting by Paged Pool Consumed"
    else:
        sort_line = " Sorting by Tag"
    lines = [sort_line, "", _GROUP_VERBOSE if verbose else _GROUP, _HEADER_VERBOSE if verbose else _HEADER, ""]
    totals = [0] * (8 if verbose else 4)
    for usage in rows:
        _check_tag(usage.tag)
        if "\n" in usage.description or "\r" in usage.description:
            raise UsageError(f"tag {usage.tag!r}: a description cannot hold a line break")
        numbers = _poolused_numbers(usage, verbose)
        totals = [t + n for t, n in zip(totals, numbers)]
        line = f" {usage.tag}{_poolused_columns(numbers, verbose)}"
        lines.append(f"{line}\t{usage.description}" if usage.description else line)
    lines += ["", "TOTAL" + _poolused_columns(totals, verbose)]
    return "\n".join(lines) + "\n"


def _poolused_numbers(usage: TagUsage, verbose: bool) -> list[int]:
    if not verbose:
        return [usage.nonpaged_outstanding, usage.nonpaged_bytes, usage.paged_outstanding, usage.paged_bytes]
    counters = (usage.nonpaged_allocs, usage.nonpaged_frees, usage.paged_allocs, usage.paged_frees)
    if any(c is None for c in counters):
        raise UsageError(f"tag {usage.tag!r}: verbose !poolused needs the allocs and frees counters")
    np_allocs, np_frees, p_allocs, p_frees = (int(c or 0) for c in counters)
    return [
        np_allocs,
        np_frees,
        usage.nonpaged_outstanding,
        usage.nonpaged_bytes,
        p_allocs,
        p_frees,
        usage.paged_outstanding,
        usage.paged_bytes,
    ]


def _poolused_columns(n: Sequence[int], verbose: bool) -> str:
    if verbose:
        return f" {n[0]:11d} {n[1]:11d} {n[2]:9d} {n[3]:12d} {n[4]:12d} {n[5]:11d} {n[6]:9d} {n[7]:12d}"
    return f" {n[0]:9d} {n[1]:12d} {n[2]:10d} {n[3]:12d}"


def _wildcard(pattern: str) -> re.Pattern[str]:
    if "*" not in pattern:
        pattern = pattern.ljust(4)
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern))


def _check_tag(tag: str) -> None:
    if len(tag) != 4 or any(not 0x20 <= ord(c) <= 0x7E for c in tag):
        raise UsageError(f"tag {tag!r}: expected the 4 printable display characters")


def render_poolfind(
    blocks: Iterable[PoolBlock],
    tag: str,
    pool_type: int = 0,
    new_format: bool = True,
    *,
    pool_range: tuple[int, int] | None = None,
    large_table_range: tuple[int, int] | None = None,
) -> str:
    """`!poolfind <tag> <pool_type>` output listing `blocks` in the given order.

    `tag` is what the user typed (`Proc`, `Pr*`, `0x636f7250`); `pool_type` 0 nonpaged, 1 paged, 2 special,
    4 session. The address ranges in the headers default to the 64 KB-aligned span of the blocks.
    New format: a "Scanning large pool" and a "Searching <pool> pool" header, then one line per block (each names its
    own pool). Classic format: blocks with pool 'unknown' come first, before any header; 'large' blocks go under
    "Scanning large pool allocation table", the others under a "Searching <Pool> pool" header that is repeated each
    time the pool changes (as WinDbg repeats it per pool range). Classic names for session and special pool are
    [UNCONFIRMED].
    Raises:
        UsageError: bad tag or pool_type, or a block the chosen format cannot express.
    """
    if pool_type not in POOLFIND_TYPES:
        raise UsageError(f"!poolfind pool type {pool_type}: expected 0, 1, 2 or 4")
    value = tags.parse(tag)
    shown = tags.display(value)
    items = list(blocks)
    addresses = [b.address for b in items]
    span = _span(addresses)
    pool_lo, pool_hi = pool_range or span
    large_lo, large_hi = large_table_range or span
    width = 16 if max([pool_hi, large_hi, *addresses]) > 0xFFFFFFFF else 8
    searched = POOLFIND_TYPES[pool_type]
    if new_format:
        head = f"for tag 0x{value:08x} ({shown})"
        lines = [
            "",
            f"Scanning large pool allocation table {head} ({large_lo:0{width}x} : {large_hi:0{width}x})",
            "",
            "",
            f"Searching {searched} pool ({pool_lo:0{width}x} : {pool_hi:0{width}x}) {head}",
            "",
        ]
        lines += [_new_line(b, width) for b in items]
        return "\n".join(lines) + "\n"

    head = f"for Tag: {shown}"
    scanning = f"Scanning large pool allocation table {head} ({large_lo:0{width}x} : {large_hi:0{width}x})"
    lines = [""]
    section: str | None = None
    for block in items:
        if block.pool == model.UNKNOWN:
            if section is not None:
                raise UsageError(f"block {block.address:#x}: pool 'unknown' blocks must come before all others")
            lines.append(_classic_line(block, width))
            continue
        if section is None:
            lines += [scanning, ""]
            section = model.LARGE
        if block.pool != section:
            if lines[-1]:
                lines.append("")
            if block.pool == model.LARGE:
                lines += [scanning, ""]
            else:
                name = _classic_pool_name(block.pool)
                lines += [f"Searching {name} pool ({pool_lo:0{width}x} : {pool_hi:0{width}x}) {head}", ""]
            section = block.pool
        lines.append(_classic_line(block, width))
    if section is None:
        lines += [scanning, ""]
        section = model.LARGE
    if section == model.LARGE:
        if lines[-1]:
            lines.append("")
        name = _classic_pool_name(searched)
        lines += [f"Searching {name} pool ({pool_lo:0{width}x} : {pool_hi:0{width}x}) {head}", ""]
    elif lines[-1]:
        lines.append("")
    return "\n".join(lines) + "\n"


def _span(addresses: Sequence[int]) -> tuple[int, int]:
    if not addresses:
        return 0, 0
    return min(addresses) & ~0xFFFF, (max(addresses) | 0xFFFF) + 1


def _classic_pool_name(pool: str) -> str:
    if pool in (model.LARGE, model.UNKNOWN) or not _POOL_WORD.fullmatch(pool):
        raise UsageError(f"pool {pool!r} cannot be written as a 'Searching ... pool' header")
    return _CLASSIC_POOL_NAMES.get(pool, pool.capitalize())


def _classic_line(block: PoolBlock, width: int) -> str:
    _check_tag(block.tag)
    if block.previous_size is None or block.address < 0 or block.size < 0 or block.previous_size < 0:
        raise UsageError(f"block {block.address:#x}: classic !poolfind lines need a previous size and no negatives")
    state = "(Allocated)" if block.allocated else "(Free)     "
    protected = " (Protected)" if block.protected else ""
    return (
        f"{block.address:0{width}x} size: {block.size:4x} previous size: {block.previous_size:4x}  "
        f"{state} {block.tag}{protected}"
    )


def _new_line(block: PoolBlock, width: int) -> str:
    _check_tag(block.tag)
    if not block.allocated or block.protected or block.previous_size is not None:
        raise UsageError(
            f"block {block.address:#x}: the new !poolfind format shows no free, protected or previous-size information"
        )
    if block.pool in (model.LARGE, model.UNKNOWN) or not _POOL_WORD.fullmatch(block.pool):
        raise UsageError(f"block {block.address:#x}: pool {block.pool!r} cannot be written in the new format")
    if block.address < 0 or block.size < 0:
        raise UsageError(f"block {block.address:#x}: negative address or size")
    size = f"{block.size:#x}" if block.size else "0"
    return f"{block.address:0{width}x} : tag {block.tag}, size {size:>9}, {block.pool.capitalize()} pool"
