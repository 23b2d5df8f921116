"""Throughput of the debugger-output parsers against a plain split-every-line baseline, measured in the same run.

Inputs are generated deterministically in memory:
- a 200,000-line classic `!poolfind` log (x64 addresses, Allocated/Free lines, "(Protected)" suffixes, tags with
  spaces, a nonpaged and a paged section) and the same blocks in the new Windows 10 line format;
- a 10,000-tag `!poolused 2` table (TAB + description layout) and its verbose `!poolused 1` form.

For each input the baseline is `for line in text.splitlines(): line.split()`; the figure of merit is
ratio = parser MB/s / baseline MB/s (target >= 0.33). Each timing is the best of --repeat runs, baseline and
parser interleaved. A last section breaks the classic !poolfind parse down: the line pattern alone and the
construction of the PoolBlock records alone. Nothing is asserted: the numbers are printed.

--clock cpu times with the process's CPU time instead of the wall clock: on a machine that other processes load,
the time this process waits for a core then counts for neither side.

Run: python benchmarks/bench_report.py [--repeat 5] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tagsplit.snapshots import (
    PoolBlock,
    TagUsage,
    parse_poolfind,
    parse_poolused,
    render_poolfind,
    render_poolused,
)
from tagsplit.snapshots import parse as parse_module
from tagsplit.snapshots.model import field_names, gc_paused, records

POOLFIND_LINES = 200_000
POOLUSED_TAGS = 10_000
_TAG_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def _tags(count: int, rng: random.Random) -> list[str]:
    found: dict[str, None] = {"AGP ": None, " rx.": None, "Ab c": None, "Dh 1": None}
    while len(found) < count:
        tag = "".join(rng.choice(_TAG_CHARS) for _ in range(4))
        if rng.random() < 0.05:
            tag = tag[:3] + " "
        found[tag] = None
    return list(found)[:count]


def poolfind_blocks(seed: int = 1) -> list[PoolBlock]:
    """Blocks for a log of exactly POOLFIND_LINES lines once rendered (the rest are headers and blank lines)."""
    rng = random.Random(seed)
    tags = _tags(64, rng)
    # render_poolfind(classic) adds 7 lines around two sections: blank, Scanning, blank, blank, Searching, blank,
    # then the blank after the last section.
    count = POOLFIND_LINES - 8
    blocks = []
    address = 0xFFFFFA8000C02000
    for i in range(count):
        address += rng.choice((0x20, 0x40, 0x60, 0x430, 0x1000))
        allocated = rng.random() > 0.15
        blocks.append(
            PoolBlock(
                address=address,
                size=rng.choice((0x20, 0x40, 0x60, 0xA0, 0x430)),
                tag=rng.choice(tags),
                pool="nonpaged" if i < count // 2 else "paged",
                allocated=allocated,
                protected=allocated and rng.random() < 0.08,
                previous_size=rng.choice((0, 0x10, 0x30, 0x70, 0x290)),
            )
        )
    return blocks


def poolused_usages(seed: int = 2) -> list[TagUsage]:
    rng = random.Random(seed)
    usages = []
    for tag in _tags(POOLUSED_TAGS, rng):
        np_allocs, p_allocs = rng.randrange(10**7), rng.randrange(10**6)
        np_frees, p_frees = rng.randrange(np_allocs + 1), rng.randrange(p_allocs + 1)
        usages.append(
            TagUsage(
                tag=tag,
                nonpaged_outstanding=np_allocs - np_frees,
                nonpaged_bytes=(np_allocs - np_frees) * rng.choice((16, 64, 320, 4096)),
                paged_outstanding=p_allocs - p_frees,
                paged_bytes=(p_allocs - p_frees) * rng.choice((16, 64, 320, 4096)),
                nonpaged_allocs=np_allocs,
                nonpaged_frees=np_frees,
                paged_allocs=p_allocs,
                paged_frees=p_frees,
                description=f"UNKNOWN pooltag '{tag}', please update pooltag.txt",
            )
        )
    return usages


def _summary(usages: list[TagUsage]) -> list[TagUsage]:
    return [
        TagUsage(u.tag, u.nonpaged_outstanding, u.nonpaged_bytes, u.paged_outstanding, u.paged_bytes,
                 None, None, None, None, u.description)
        for u in usages
    ]  # fmt: skip


def _cases() -> list[tuple[str, str, Callable[[str], object], int]]:
    blocks = poolfind_blocks()
    new_blocks = [PoolBlock(b.address, b.size, b.tag, b.pool, True, False, None) for b in blocks]
    usages = poolused_usages()
    return [
        ("!poolfind classic", render_poolfind(blocks, "*", 0, new_format=False), parse_poolfind, len(blocks)),
        ("!poolfind new format", render_poolfind(new_blocks, "*", 0, new_format=True), parse_poolfind, len(blocks)),
        ("!poolused 2", render_poolused(_summary(usages), 2), parse_poolused, len(usages)),
        ("!poolused 1 (verbose)", render_poolused(usages, 1), parse_poolused, len(usages)),
    ]


def _baseline(text: str) -> None:
    for line in text.splitlines():
        line.split()


_clock = time.perf_counter


def _race(funcs: list[Callable[[], object]], repeat: int) -> list[float]:
    """Best time of each function over `repeat` rounds; the rounds interleave the functions so that load on the
    machine hits them alike. The heap is collected before each call and the result is freed after timing."""
    best = [float("inf")] * len(funcs)
    for _ in range(repeat):
        for i, func in enumerate(funcs):
            gc.collect()
            start = _clock()
            result = func()
            best[i] = min(best[i], _clock() - start)
            del result
    return best


def _paused(func: Callable[..., object], *args: object) -> object:
    with gc_paused():  # as the parsers build their records
        return func(*args)


def _floor(text: str, repeat: int) -> None:
    """Parts of the classic !poolfind parse: the line pattern alone and the record construction alone."""
    lines = parse_module._FIND_CLASSIC_LINE  # address + the rest of the line, for the lines WinDbg prints
    full = parse_module._FIND_CLASSIC  # every field, and the noise lines: what reads lines one by one
    blocks = parse_poolfind(text)
    columns = [[getattr(b, name) for b in blocks] for name in field_names(PoolBlock)]
    count = len(blocks)
    del blocks
    base, split, scan, build, parse = _race(
        [
            lambda: _baseline(text),
            lambda: lines.split(text),
            lambda: full.findall(text),
            lambda: _paused(records, PoolBlock, *columns),
            lambda: parse_poolfind(text),
        ],
        repeat,
    )
    print(f"\nclassic !poolfind, {count} blocks: baseline {base:.3f} s, parse_poolfind {parse:.3f} s")
    print(f"  the line pattern alone (one Pattern.split): {split:.3f} s  -> ratio {base / split:.2f}")
    print(f"  (the full line pattern, one multiline findall: {scan:.3f} s  -> ratio {base / scan:.2f})")
    print(f"  building the {count} PoolBlock records from ready values: {build:.3f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="timing runs per figure (best is kept)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall clock or process CPU time")
    args = parser.parse_args(argv)
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter

    cases = _cases()  # only the texts stay alive: the timings should not pay for the generator's objects
    gc.collect()

    print(f"Python {sys.version.split()[0]}, best of {args.repeat} runs, {args.clock} clock")
    header = f"{'input':24} {'lines':>8} {'MB':>6} {'baseline MB/s':>14} {'parser MB/s':>12} {'ratio':>6}  target"
    print(header)
    print("-" * len(header))
    for name, text, parse, expected in cases:
        result = parse(text)
        if not isinstance(result, list) or len(result) != expected:
            raise SystemExit(f"{name}: parsed {len(result) if isinstance(result, list) else result} records")
        del result
        megabytes = len(text.encode()) / 1e6
        base, parsed = _race(
            [lambda text=text: _baseline(text), lambda text=text, parse=parse: parse(text)],  # type: ignore[misc]
            args.repeat,
        )
        ratio = base / parsed
        lines = text.count("\n")
        print(
            f"{name:24} {lines:8d} {megabytes:6.1f} {megabytes / base:14.1f} {megabytes / parsed:12.1f} "
            f"{ratio:6.2f}  {'ok' if ratio >= 1 / 3 else 'BELOW 1/3'}"
        )
    _floor(cases[0][1], args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
