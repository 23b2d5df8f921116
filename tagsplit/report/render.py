"""Pure renderers for a report: text, JSON, CSV, Markdown; and the growth plot (matplotlib, optional)."""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING, Any

from .. import tags
from ..errors import InputError
from .attribute import SCHEMA, Report, SiteRow

if TYPE_CHECKING:
    from pathlib import Path


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:+.0f}"


def row_json(r: SiteRow) -> dict[str, Any]:
    return {
        "rank": r.rank,
        "rva": f"{r.sites[0]:#x}",
        "sites": [f"{s:#x}" for s in r.sites],
        "function": r.functions[0],
        "api": r.apis[0],
        "new_tag": tags.display(r.new_tag),
        "new_tag_value": tags.hex_value(r.new_tag),
        "old_tag": tags.display(r.old_tag) if r.old_tag is not None else None,
        "outstanding_bytes": r.outstanding_bytes,
        "outstanding_allocs": r.outstanding_allocs,
        "growth_bytes_per_min": None if r.growth_bytes_per_min is None else round(r.growth_bytes_per_min, 3),
        "growth_allocs_per_min": None if r.growth_allocs_per_min is None else round(r.growth_allocs_per_min, 3),
        "r2": None if r.r2 is None else round(r.r2, 4),
        "series": {
            "minutes": [round(m, 4) for m in r.series.minutes],
            "bytes": list(r.series.bytes),
            "allocs": list(r.series.allocs),
        },
    }


def render_json(report: Report) -> str:
    doc = {
        "schema": SCHEMA,
        "driver": report.driver,
        "snapshots": report.snapshots,
        "span_minutes": round(report.span_minutes, 4),
        "sites": [row_json(r) for r in report.rows],
        "original_tags": {
            tags.display(t): {"outstanding_bytes": b, "outstanding_allocs": a} for t, (b, a) in report.old_tags.items()
        },
        "evidence": list(report.evidence),
        "conclusion": report.conclusion,
        "leaking_site": f"{report.leaking.sites[0]:#x}" if report.leaking else None,
    }
    return json.dumps(doc, indent=2) + "\n"


def render_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "rank",
            "rva",
            "function",
            "api",
            "new_tag",
            "old_tag",
            "outstanding_bytes",
            "outstanding_allocs",
            "growth_bytes_per_min",
            "growth_allocs_per_min",
            "r2",
        ]
    )
    for r in report.rows:
        j = row_json(r)
        w.writerow(
            [
                j["rank"],
                " ".join(j["sites"]),
                " ".join(r.functions),
                j["api"],
                j["new_tag"],
                j["old_tag"],
                j["outstanding_bytes"],
                j["outstanding_allocs"],
                j["growth_bytes_per_min"],
                j["growth_allocs_per_min"],
                j["r2"],
            ]
        )
    return buf.getvalue()


def _table(report: Report, md: bool) -> list[str]:
    head = ["rank", "site", "function", "API", "new tag", "outstanding bytes", "allocs", "bytes/min", "allocs/min"]
    rows = [
        [
            str(r.rank),
            ",".join(f"{s:#x}" for s in r.sites),
            ",".join(r.functions),
            r.apis[0],
            tags.display(r.new_tag),
            str(r.outstanding_bytes),
            str(r.outstanding_allocs),
            _rate(r.growth_bytes_per_min),
            "-" if r.growth_allocs_per_min is None else f"{r.growth_allocs_per_min:+.1f}",
        ]
        for r in report.rows
    ]
    if md:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return out
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(head))]
    out += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)) for row in rows]
    return out


def render_text(report: Report, markdown: bool = False) -> str:
    out = []
    title = f"{report.driver}: {report.snapshots} snapshot(s) over {report.span_minutes:.1f} minutes"
    out.append(f"## {title}" if markdown else title)
    out.append("")
    out += _table(report, markdown)
    out.append("")
    for t, (b, a) in report.old_tags.items():
        out.append(
            f"original tag '{tags.display(t)}': {b} bytes in {a} allocations still under it "
            "(allocated before the split, or by sites not split)"
        )
    for note in report.evidence:
        out.append(f"{'- ' if markdown else 'note: '}{note}")
    out.append("")
    out.append(f"**{report.conclusion}**" if markdown else report.conclusion)
    return "\n".join(out) + "\n"


def plot(report: Report, path: Path) -> Path:
    """A PNG of outstanding bytes over time per site.

    Raises:
        InputError: matplotlib is not installed, or the file cannot be written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError("--plot needs matplotlib: pip install 'tagsplit[plot]'") from e
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in report.rows:
        label = f"{tags.display(r.new_tag)}  {r.functions[0]} @{r.sites[0]:#x}"
        width = 3.0 if report.leaking is not None and r is report.leaking else 1.2
        ax.plot(r.series.minutes, r.series.bytes, marker="o", markersize=3, label=label, linewidth=width)
    ax.set_xlabel("minutes since the first snapshot")
    ax.set_ylabel("outstanding bytes")
    ax.set_title(f"{report.driver}: outstanding pool per call site")
    if report.leaking is not None:
        last = report.leaking.series
        ax.annotate(
            "likely leak",
            (last.minutes[-1], last.bytes[-1]),
            textcoords="offset points",
            xytext=(-60, 10),
            arrowprops={"arrowstyle": "->"},
        )
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise InputError(f"{path}: cannot write the plot: {e.strerror or e}") from e
    finally:
        plt.close(fig)
    return path
