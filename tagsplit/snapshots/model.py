"""What a pool snapshot holds: per-tag usage counters (`!poolused`, PoolMon) and pool blocks (`!poolfind`).

The per-row records, `TagUsage` and `PoolBlock`, are created by the hundred thousand when a log is parsed, so they
are tuples: `typing.NamedTuple` classes that `record` also turns into frozen dataclasses. `records` / `from_rows` make
them with one C call each, 4 to 8 times faster than a frozen dataclass's `__init__` (which sets every field through
`object.__setattr__`), and they need no `__dict__`. What callers see is what the frozen slotted dataclasses gave:
keyword or positional construction with the same field names, attribute access, immutability
(`dataclasses.FrozenInstanceError`), `dataclasses.fields` / `asdict` / `replace`, equality only with an instance of
the same class, the same hash, no ordering, pickling and copying. Being tuples they also unpack, index and have
`len()`; code should not rely on that. (Pickles made before they were tuples do not load.)
The other classes are made once per table or snapshot and stay frozen slotted dataclasses (style.md, lesson 4).
Python 3.9 has no `dataclass(slots=True)`, so each of those lists `__slots__` itself and therefore has no field
defaults; `_Slotted` supplies the pickling support that `slots=True` would add.

Field conventions:
- `tag` is always the four display characters as WinDbg and PoolMon print them (memory byte order, spaces kept,
  unprintable bytes shown as '.'), e.g. 'Abc ' or ' rx.'. `tags.parse(usage.tag)` gives the dword again.
- Counts and byte totals are plain ints. Fields the source does not report are None, never 0.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from itertools import islice, repeat
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

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

_R = TypeVar("_R", bound="tuple[Any, ...]")


class _Slotted:
    """Pickle/copy support for frozen slotted dataclasses (what `dataclass(slots=True)` adds on 3.10+)."""

    __slots__ = ()

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for f, value in zip(fields(self), state):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, value)


def _record_eq(self: tuple[Any, ...], other: object) -> bool:
    if other.__class__ is self.__class__:
        return tuple.__eq__(self, other)
    return False if isinstance(other, tuple) else NotImplemented


def _record_ne(self: tuple[Any, ...], other: object) -> bool:
    if other.__class__ is self.__class__:
        return tuple.__ne__(self, other)
    return True if isinstance(other, tuple) else NotImplemented


def _unordered(self: tuple[Any, ...], other: object) -> bool:
    raise TypeError(f"{type(self).__name__} instances are not ordered")


def record(cls: type[_R]) -> type[_R]:
    """Give the NamedTuple class `cls` the behaviour of the frozen dataclass with the same fields.

    Equality holds only between instances of the same class (a plain tuple with the same values is not equal), the
    hash is the hash of the field values (what a frozen dataclass uses too), `<` and friends raise TypeError, and
    `dataclasses.fields/asdict/replace` and `FrozenInstanceError` work: the class is made a dataclass with no
    generated `__init__`, `__repr__` or `__eq__` (the tuple's `__new__` and `__repr__` already fit).
    """
    methods = {"__eq__": _record_eq, "__ne__": _record_ne, "__hash__": tuple.__hash__}
    methods.update(dict.fromkeys(("__lt__", "__le__", "__gt__", "__ge__"), _unordered))
    for name, method in methods.items():
        setattr(cls, name, method)
    dataclass(frozen=True, init=False, repr=False, eq=False)(cls)
    for f in fields(cls):  # type: ignore[arg-type]
        f.default = MISSING  # the decorator took the tuple's field getters for defaults
    return cls


@record
class TagUsage(NamedTuple):
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


@record
class PoolBlock(NamedTuple):
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


def from_rows(cls: type[_R], rows: Iterable[tuple[Any, ...]]) -> list[_R]:
    """Instances of the record class `cls` (TagUsage, PoolBlock), one per tuple of field values in `rows`.

    The same objects as `[cls(*row) for row in rows]`, made in a C loop (`tuple.__new__`): no Python-level call per
    object. Nothing checks the length or the types of the rows.
    """
    return list(map(tuple.__new__, repeat(cls), rows))


def records(cls: type[_R], *columns: Iterable[Any]) -> list[_R]:
    """`from_rows` for field values given as columns, in field order. Stops at the shortest column."""
    return from_rows(cls, zip(*columns))


def bulk_new(cls: type[_R], count: int, columns: Mapping[str, Iterable[Any]]) -> list[_R]:
    """`count` instances of the record class `cls`, field values taken from `columns` by field name.

    Every column must yield at least `count` values (`itertools.repeat(value, count)` for a constant); extra values
    are ignored.
    """
    names = field_names(cls)
    if set(columns) != set(names):
        raise ValueError(f"bulk_new({cls.__name__}): columns {sorted(columns)} != fields {sorted(names)}")
    objects = records(cls, *(islice(columns[name], count) for name in names))
    if len(objects) < count:
        raise ValueError(f"bulk_new({cls.__name__}): a column has fewer than {count} values")
    return objects
