"""Code caves: executable memory that is really unused, to hold stubs.

Two kinds, both in executable sections that are neither discardable (INIT) nor pageable (PAGE*):
* `padding`: runs of int3 (0xCC) between functions, which no code executes; not inside any .pdata range and
  free of base relocations;
* `slack`: the tail of a section's last page beyond its VirtualSize. The loader maps whole pages with the
  section's protection; in a patched file the stub lies inside SizeOfRawData and the plan widens VirtualSize.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..image import Image, Section

PAGE = 0x1000
ALIGN = 16


@dataclass(frozen=True)
class Cave:
    rva: int
    size: int
    kind: str
    section: str

    @property
    def end(self) -> int:
        return self.rva + self.size


def _eligible(sec: Section) -> bool:
    return sec.executable and not sec.discardable and not sec.pageable


def find_caves(image: Image, min_size: int = 16) -> list[Cave]:
    out: list[Cave] = []
    covered = sorted((b, e) for f in image.functions for b, e in f.ranges)
    for sec in image.sections:
        if not _eligible(sec):
            continue
        data = image.mem
        end = sec.rva + sec.size
        pos = sec.rva
        while pos < end:
            pos = data.find(b"\xcc" * min_size, pos, end)
            if pos < 0:
                break
            run_end = pos
            while run_end < end and data[run_end] == 0xCC:
                run_end += 1
            # keep the first int3 as a separator after whatever precedes the run
            start = (pos + 1 + ALIGN - 1) // ALIGN * ALIGN
            if (
                run_end - start >= min_size
                and not _overlaps(covered, start, run_end)
                and not image.relocated_in(start, run_end - start)
            ):
                out.append(Cave(start, run_end - start, "padding", sec.name))
            pos = run_end
        slack = _slack(image, sec)
        if slack is not None and slack.size >= min_size:
            out.append(slack)
    return out


def _slack(image: Image, sec: Section) -> Cave | None:
    """The unused tail of the section's last page (and, in the file, of its raw data)."""
    used = sec.virtual_size or sec.size
    if image.section_alignment < PAGE:
        return None
    if image.mapped:
        limit = (used + PAGE - 1) // PAGE * PAGE
    else:
        limit = min((used + PAGE - 1) // PAGE * PAGE, sec.raw_size)
    start = (sec.rva + used + ALIGN - 1) // ALIGN * ALIGN
    stop = sec.rva + limit
    nxt = [s.rva for s in image.sections if s.rva > sec.rva]
    if nxt:
        stop = min(stop, min(nxt))
    if stop - start <= 0 or any(image.mem[start:stop]):
        return None
    return Cave(start, stop - start, "slack", sec.name)


def _overlaps(ranges: list[tuple[int, int]], a: int, b: int) -> bool:
    return any(x < b and a < y for x, y in ranges)


class CaveSpace:
    """Hands out stub space from the caves, lowest address first, deterministically."""

    def __init__(self, caves: list[Cave]) -> None:
        self.free = sorted(caves, key=lambda c: c.rva)

    def take(self, size: int) -> Cave | None:
        need = (size + ALIGN - 1) // ALIGN * ALIGN
        for i, c in enumerate(self.free):
            if c.size >= size:
                used = min(need, c.size)
                self.free[i] = Cave(c.rva + used, c.size - used, c.kind, c.section)
                return Cave(c.rva, size, c.kind, c.section)
        return None
