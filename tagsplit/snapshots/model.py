"""What a pool snapshot holds: per-tag usage counters (`!poolused`, PoolMon) and pool blocks (`!poolfind`).

The classes are frozen and slotted (style.md, lesson 4). Python 3.9 has no `dataclass(slots=True)`, so each class
lists `__slots__` itself and therefore has no field defaults; `_Slotted` supplies the pickling support that
`slots=True` would add. The parsers create instances in bulk with `bulk_new`, which fills the slots column by column
in C loops; the objects are identical to the ones `__init__` makes (the tests check this).

Field conventions:
- `tag` is always the four display characters as WinDbg and PoolMon print them (memory byte order, spaces kept,
  unprintable bytes shown as '.'), e.g. 'Abc ' or ' rx.'. `tags.parse(usage.tag)` gives the dword again.
- Counts and byte totals are plain ints. Fields the source does not report are None, never 0.
"""

from __future__ import annotations

import gc
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, fields
from itertools import repeat
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Mapping

# Snapshot.source values.
POOLUSED = "poolused"
POOLFIND = "poolfind"
POOLMON = "poolmon"
SOURCES = (POOLUSED, POOLFIND, POOLMON)

# PoolBlock.pool values the parsers produce. Other words the debugger prints before " pool" are kept lower-cased.
NONPAGED = "nonpaged"
PAGED = "paged"
SESSION = "session"
SPECIAL = "special"
LARGE = "large"  # classic !poolfind hit listed under "Scanning large pool allocation table": the type is not printed
UNKNOWN = "unknown"  # classic !poolfind line before any "Searching ... pool" / "Scanning ..." header

# PoolUsedTable.sort values ("Sorting by ..." line).
SORT_TAG = "tag"
SORT_NONPAGED = "nonpaged"
SORT_PAGED = "paged"

_T = TypeVar("_T")


class _Slotted:
    """Pickle/copy support for frozen slotted dataclasses (what `dataclass(slots=True)` adds on 3.10+)."""

    __slots__ = ()

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for f, value in zip(fields(self), state):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, value)


@dataclass(frozen=True)
class TagUsage(_Slotted):
    """One tag's pool use: a `!poolused` row, or PoolMon's Nonp and Paged rows for the tag merged.

    - `*_outstanding`: allocations not yet freed. `!poolused` (non-verbose) prints it as "Allocs"; verbose
      `!poolused 1` and PoolMon print it as "Diff". It is stored as printed rather than computed as allocs - frees,
      because the kernel's per-tag counters are 32-bit on many builds and wrap.
    - `*_bytes`: bytes in use ("Used" in `!poolused`, "Bytes" in PoolMon).
    - `*_allocs` / `*_frees`: cumulative allocation and free counts since boot. Only verbose `!poolused 1` and PoolMon
      print them; None otherwise.
    - `description`: the text after the numbers (pooltag.txt description or PoolMon's Mapped_Driver), stripped;
      '' when there is none.

    For a PoolMon snapshot a pool type without a row for the tag has outstanding/bytes 0 and allocs/frees None.
    """

    __slots__ = (
        "description",
        "nonpaged_allocs",
        "nonpaged_bytes",
        "nonpaged_frees",
        "nonpaged_outstanding",
        "paged_allocs",
        "paged_bytes",
        "paged_frees",
        "paged_outstanding",
        "tag",
    )

    tag: str
    nonpaged_outstanding: int
    nonpaged_bytes: int
    paged_outstanding: int
    paged_bytes: int
    nonpaged_allocs: int | None
    nonpaged_frees: int | None
    paged_allocs: int | None
    paged_frees: int | None
    description: str

    @property
    def outstanding_allocs(self) -> int:
        """Allocations not yet freed, nonpaged plus paged."""
        return self.nonpaged_outstanding + self.paged_outstanding

    @property
    def outstanding_bytes(self) -> int:
        """Bytes in use, nonpaged plus paged."""
        return self.nonpaged_bytes + self.paged_bytes

    @property
    def verbose(self) -> bool:
        """Whether the cumulative allocs/frees counters are known (verbose `!poolused`, PoolMon)."""
        return self.nonpaged_allocs is not None


@dataclass(frozen=True)
class PoolTotals(_Slotted):
    """The TOTAL row of `!poolused` (never reported as a tag). Same meaning as the TagUsage fields."""

    __slots__ = (
        "nonpaged_allocs",
        "nonpaged_bytes",
        "nonpaged_frees",
        "nonpaged_outstanding",
        "paged_allocs",
        "paged_bytes",
        "paged_frees",
        "paged_outstanding",
    )

    nonpaged_outstanding: int
    nonpaged_bytes: int
    paged_outstanding: int
    paged_bytes: int
    nonpaged_allocs: int | None
    nonpaged_frees: int | None
    paged_allocs: int | None
    paged_frees: int | None


@dataclass(frozen=True)
class PoolUsedTable(_Slotted):
    """One `!poolused` command's output.

    `sort` is 'tag' | 'nonpaged' | 'paged' from the "Sorting by" line (any other wording lower-cased), None when the
    text has no such line. `verbose` is True for the 8-column layout of flag 1. `total` is the TOTAL row if printed.
    """

    __slots__ = ("sort", "total", "usages", "verbose")

    sort: str | None
    verbose: bool
    usages: tuple[TagUsage, ...]
    total: PoolTotals | None


@dataclass(frozen=True)
class PoolBlock(_Slotted):
    """One `!poolfind` hit.

    - `address`: as printed. Classic output prints the POOL_HEADER address; whether the new format prints the header
      or the data address is unconfirmed (windows-facts.md 2.3).
    - `size`: as printed, in bytes (classic: block size including the header; new format: its "size 0x..." field).
    - `previous_size`: classic output only ("previous size:"); None in the new format.
    - `tag`: the four display characters printed (a freed protected block shows e.g. 'Pro.').
    - `pool`: 'nonpaged' | 'paged' | 'session' | 'special' (from the new-format line, or from the classic
      "Searching ... pool" header above the line), 'large' for a classic hit under "Scanning large pool allocation
      table", 'unknown' for a classic line before any header.
    - `allocated`: False for classic "(Free)" lines. The new format has no free marker; its lines are allocated.
    - `protected`: the classic "(Protected)" suffix (PROTECTED_POOL bit set in the tag).
    """

    __slots__ = ("address", "allocated", "pool", "previous_size", "protected", "size", "tag")

    address: int
    size: int
    tag: str
    pool: str
    allocated: bool
    protected: bool
    previous_size: int | None


@dataclass(frozen=True)
class Snapshot(_Slotted):
    """Pool state at one moment: `time` is ISO-8601, `source` 'poolused' | 'poolfind' | 'poolmon'.

    A `!poolused` or PoolMon snapshot fills `usages`; a `!poolfind` snapshot fills `blocks`.
    """

    __slots__ = ("blocks", "source", "time", "usages")

    time: str
    source: str
    usages: tuple[TagUsage, ...]
    blocks: tuple[PoolBlock, ...]


def field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while creating many objects that form no cycles (it would rescan them repeatedly)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def bulk_new(cls: type[_T], count: int, columns: Mapping[str, Iterable[Any]]) -> list[_T]:
    """`count` instances of the frozen slotted dataclass `cls`, field values taken column by column.

    Equivalent to `[cls(*row) for row in zip(*columns)]` but without a Python-level call per object: each column is
    stored by mapping the slot descriptor's `__set__` over the objects (a C loop). Every column must yield at least
    `count` values (`itertools.repeat(value, count)` for a constant).
    """
    names = field_names(cls)
    if set(columns) != set(names):
        raise ValueError(f"bulk_new({cls.__name__}): columns {sorted(columns)} != fields {sorted(names)}")
    objects: list[_T] = list(map(object.__new__, repeat(cls, count)))
    for name in names:
        deque(map(getattr(cls, name).__set__, objects, columns[name]), maxlen=0)
        if objects and not hasattr(objects[-1], name):
            raise ValueError(f"bulk_new({cls.__name__}): column {name!r} has fewer than {count} values")
    return objects
