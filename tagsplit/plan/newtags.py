"""Choosing new tags: valid by the kernel's rules, recognisable, and colliding with nothing known."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import tags
from ..errors import InputError, TagError

if TYPE_CHECKING:
    from collections.abc import Iterable

# Counters: digits first so the first 99 sites read 'Sm01'..'Sm99', then letters.
_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@dataclass
class Avoid:
    """Tags that must not be used: exact values and pooltag.txt wildcard patterns (`Ul??`, `Aml*`)."""

    values: set[int] = field(default_factory=set)
    patterns: list[str] = field(default_factory=list)

    def __contains__(self, value: int) -> bool:
        plain = value & ~tags.PROTECTED_POOL
        if plain in self.values:
            return True
        text = tags.display(plain)
        return any(fnmatch.fnmatchcase(text, p) for p in self.patterns)

    def add(self, value: int) -> None:
        self.values.add(value & ~tags.PROTECTED_POOL)


_POOLTAG_LINE = re.compile(r"^(\S{1,4}|\S{1,3} ) ?\s*-\s")


def read_avoid_file(path: str | Path, avoid: Avoid) -> int:
    """Add the tags named in a pooltag.txt, a saved !poolused/PoolMon output, a tagsplit plan, or a tag list.

    Returns how many tags or patterns were added.

    Raises:
        InputError: the file cannot be read.
        TagError: nothing in it looks like a tag.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e.strerror or e}") from e
    before = len(avoid.values) + len(avoid.patterns)
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise TagError(f"{p}: JSON that is not a tagsplit plan ({e})") from e
        for s in [*doc.get("sites", []), *doc.get("free_sites", [])]:
            for key in ("new_tag_value", "old_tag_value"):
                if s.get(key):
                    avoid.add(int(s[key], 16))
        for t in doc.get("tags", []):
            avoid.add(int(t, 16))
    else:
        for value in _debugger_tags(text):
            avoid.add(value)
        for line in text.splitlines():
            if line.startswith(("rem", "//", ";")) or not line.strip():
                continue
            m = _POOLTAG_LINE.match(line)
            if m:
                _add_text(m.group(1), avoid)
            elif re.fullmatch(r"\s*(0x[0-9a-fA-F]{1,8}|\S{1,4})\s*", line):
                _add_text(line.strip(), avoid)
    added = len(avoid.values) + len(avoid.patterns) - before
    if added == 0:
        raise TagError(f"{p}: no tags found (expected pooltag.txt, !poolused/PoolMon output, a plan, or a tag list)")
    return added


def _add_text(t: str, avoid: Avoid) -> None:
    if "*" in t or "?" in t:
        avoid.patterns.append(t.ljust(4) if "*" not in t else t)
        return
    with contextlib.suppress(TagError):
        avoid.add(tags.parse(t))


def _debugger_tags(text: str) -> Iterable[int]:
    """Tags from saved !poolused / !poolfind / PoolMon text, when the parsers recognise it."""
    try:
        from ..snapshots import parse as snap
    except ImportError:  # the parsers are optional for planning
        return []
    try:
        kind = snap.detect_format(text)
    except Exception:
        return []
    values: list[int] = []
    try:
        if kind == "poolfind":
            values = [int.from_bytes(b.tag.encode("latin-1"), "little") for b in snap.parse_poolfind(text)]
        elif kind == "poolmon":
            values = [int.from_bytes(u.tag.encode("latin-1"), "little") for u in snap.parse_poolmon(text)]
        else:
            values = [int.from_bytes(u.tag.encode("latin-1"), "little") for u in snap.parse_poolused(text)]
    except Exception:
        return []
    return values


def prefix_of(old: int | None, override: str | None) -> str:
    """Two display characters the new tags start with."""
    if override is not None:
        if len(override) != 2 or any(not 0x21 <= ord(c) <= 0x7E for c in override):
            raise TagError(f"--prefix {override!r}: give exactly two printable, non-space characters")
        return override
    if old is not None and tags.printable(old):
        text = tags.display(old)
        if text[:2].strip() and all(c.isalnum() for c in text[:2]):
            return text[:2]
    return "Ts"


def pick(count: int, prefix: str, avoid: Avoid, protected: bool = False) -> list[int]:
    """`count` new tags `<prefix>01`, `<prefix>02`, … skipping any that are invalid or to be avoided.

    Raises:
        TagError: the prefix has run out of free tags.
    """
    out: list[int] = []
    for hi in _DIGITS:
        for lo in _DIGITS:
            if hi == "0" and lo == "0":
                continue
            value = int.from_bytes((prefix + hi + lo).encode("ascii"), "little")
            if tags.problems(value) or value in avoid:
                continue
            out.append(value | (tags.PROTECTED_POOL if protected else 0))
            avoid.add(value)
            if len(out) == count:
                return out
    raise TagError(f"no free tags left with prefix {prefix!r}; choose another with --prefix")
