"""Stage 6: join pool snapshots to the plan's call sites, and rank the sites by how likely they leak.

After the split every new tag belongs to one site (or to the sites of one shared constant), so the per-tag numbers
the debugger prints are per-site numbers. Growth is the least-squares slope of outstanding bytes (and allocations)
over the snapshots' times, per minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import tags
from ..apis import FREE
from ..plan.model import REFUSED, Plan
from ..snapshots.store import parse_time

if TYPE_CHECKING:
    from ..snapshots.model import Snapshot

SCHEMA = 1


@dataclass(frozen=True)
class Series:
    minutes: tuple[float, ...]
    bytes: tuple[int, ...]
    allocs: tuple[int, ...]


@dataclass(frozen=True)
class SiteRow:
    new_tag: int
    sites: tuple[int, ...]  # RVAs of the call sites that pass this tag
    functions: tuple[str, ...]
    apis: tuple[str, ...]
    old_tag: int | None
    outstanding_bytes: int
    outstanding_allocs: int
    growth_bytes_per_min: float | None
    growth_allocs_per_min: float | None
    r2: float | None  # how well a straight line fits the bytes series
    series: Series
    rank: int = 0


@dataclass(frozen=True)
class Report:
    driver: str
    snapshots: int
    span_minutes: float
    rows: tuple[SiteRow, ...]
    old_tags: dict[int, tuple[int, int]]  # original tag -> (outstanding bytes, allocs) in the last snapshot
    evidence: tuple[str, ...]
    conclusion: str
    leaking: SiteRow | None


def _usage_by_tag(s: Snapshot) -> dict[str, tuple[int, int]]:
    """tag -> (outstanding bytes, outstanding allocations); from !poolfind blocks when there are no counters."""
    out: dict[str, tuple[int, int]] = {}
    for u in s.usages:
        out[u.tag] = (u.outstanding_bytes, u.outstanding_allocs)
    if not s.usages:
        for b in s.blocks:
            if b.allocated:
                n, c = out.get(b.tag, (0, 0))
                out[b.tag] = (n + b.size, c + 1)
    return out


def _fit(xs: tuple[float, ...], ys: tuple[int, ...]) -> tuple[float | None, float | None]:
    """Least-squares slope and R² (None with fewer than two distinct times)."""
    n = len(xs)
    if n < 2:
        return None, None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None, None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    syy = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 if syy == 0 else (sxy * sxy) / (sxx * syy)
    return slope, r2


def attribute(plan: Plan, snapshots: list[Snapshot]) -> Report:
    """The report for `plan` from `snapshots` (any order; sorted by time here)."""
    snaps = sorted(snapshots, key=lambda s: parse_time(s.time))
    t0 = parse_time(snaps[0].time) if snaps else None
    minutes = tuple((parse_time(s.time) - t0).total_seconds() / 60 for s in snaps) if t0 else ()
    tables = [_usage_by_tag(s) for s in snaps]

    groups: dict[int, list[int]] = {}
    for site in plan.sites:
        if site.strategy == REFUSED or site.role == FREE or site.new_tag is None:
            continue
        groups.setdefault(site.new_tag & ~tags.PROTECTED_POOL, []).append(site.rva)
    by_rva = {s.rva: s for s in plan.sites}
    rows = []
    for tag, rvas in groups.items():
        name = tags.display(tag)
        values = [t.get(name, (0, 0)) for t in tables]
        series = Series(minutes, tuple(v[0] for v in values), tuple(v[1] for v in values))
        slope_b, r2 = _fit(minutes, series.bytes)
        slope_a, _ = _fit(minutes, series.allocs)
        last = values[-1] if values else (0, 0)
        sites = tuple(sorted(rvas))
        rows.append(
            SiteRow(
                new_tag=tag,
                sites=sites,
                functions=tuple(by_rva[r].function or "?" for r in sites),
                apis=tuple(by_rva[r].api for r in sites),
                old_tag=by_rva[sites[0]].old_tag,
                outstanding_bytes=last[0],
                outstanding_allocs=last[1],
                growth_bytes_per_min=slope_b,
                growth_allocs_per_min=slope_a,
                r2=r2,
                series=series,
            )
        )
    rows.sort(key=lambda r: (-(r.growth_bytes_per_min or 0.0), -r.outstanding_bytes, r.sites))
    ranked = tuple(SiteRow(**{**r.__dict__, "rank": i + 1}) for i, r in enumerate(rows))
    old_tags: dict[int, tuple[int, int]] = {}
    for t in plan.tags:
        v = tables[-1].get(tags.display(t), (0, 0)) if tables else (0, 0)
        old_tags[t & ~tags.PROTECTED_POOL] = v
    span = minutes[-1] if minutes else 0.0
    evidence, leaking, conclusion = _judge(ranked, len(snaps), span)
    return Report(plan.driver.name, len(snaps), span, ranked, old_tags, evidence, conclusion, leaking)


def _describe(r: SiteRow) -> str:
    sites = ", ".join(f"{rva:#x} in {fn}" for rva, fn in zip(r.sites, r.functions))
    return f"'{tags.display(r.new_tag)}' (site {sites}, {r.apis[0]})"


def _judge(rows: tuple[SiteRow, ...], count: int, span: float) -> tuple[tuple[str, ...], SiteRow | None, str]:
    """Plain words on how strong the evidence is, the most likely leaking site, and a one-paragraph conclusion."""
    notes = []
    if count == 0:
        return ("no snapshots",), None, "No snapshots: nothing to attribute yet."
    if not rows:
        return ("the plan splits no site",), None, "The plan gives no site a new tag; there is nothing to attribute."
    seen = [r for r in rows if any(r.series.allocs) or any(r.series.bytes)]
    if not seen:
        notes.append("none of the plan's new tags appears in the snapshots (plan not applied, or sites never ran)")
    if count == 1:
        notes.append("one snapshot: outstanding amounts only, no growth rate; take more snapshots minutes apart")
        top = max(rows, key=lambda r: r.outstanding_bytes)
        if top.outstanding_bytes == 0:
            return tuple(notes), None, "One snapshot and nothing outstanding under the new tags: no leak visible."
        return (
            tuple(notes),
            None,
            f"Largest holder so far: {_describe(top)} with {top.outstanding_bytes} bytes in "
            f"{top.outstanding_allocs} allocations. One snapshot cannot show growth: take another later.",
        )
    growing = [r for r in rows if (r.growth_bytes_per_min or 0) > 0]
    flat = [r for r in rows if not (r.growth_bytes_per_min or 0) > 0]
    if not growing:
        notes.append(f"no new tag grows over {span:.1f} minutes")
        return tuple(notes), None, f"No site leaks: no new tag's outstanding pool grew over {span:.1f} minutes."
    top = growing[0]
    # growth that adds up to less than one allocation over the window, or a poor straight-line fit, is noise
    per_alloc = top.outstanding_bytes / top.outstanding_allocs if top.outstanding_allocs else 0
    total_growth = (top.growth_bytes_per_min or 0) * span
    if per_alloc and total_growth < per_alloc:
        notes.append("the growth adds up to less than one allocation over the window: possibly noise")
    if top.r2 is not None and top.r2 < 0.5:
        notes.append(f"outstanding bytes of the top site fit a straight line poorly (R²={top.r2:.2f})")
    if count < 3:
        notes.append(f"only {count} snapshots: a trend needs three or more")
    runner = growing[1] if len(growing) > 1 else None
    if runner is not None and (runner.growth_bytes_per_min or 0) > 0.5 * (top.growth_bytes_per_min or 0):
        notes.append(f"a second site also grows: {_describe(runner)} at {runner.growth_bytes_per_min:.0f} B/min")
    why = (
        f"its outstanding pool grows by {top.growth_bytes_per_min:.0f} bytes/min "
        f"({top.growth_allocs_per_min or 0:.1f} allocations/min) over {span:.1f} minutes and {count} snapshots, "
        f"now {top.outstanding_bytes} bytes in {top.outstanding_allocs} allocations"
    )
    others = f"; {len(flat)} other site(s) stay flat" if flat else ""
    strength = "" if not notes else " (evidence is thin: see notes)"
    return tuple(notes), top, f"Most likely leak{strength}: {_describe(top)}: {why}{others}."
