"""Pool snapshots: parse `!poolused` / `!poolfind` / PoolMon text into frozen data, and render it back."""

from __future__ import annotations

from .model import PoolBlock, PoolTotals, PoolUsedTable, Snapshot, TagUsage
from .parse import (
    detect_format,
    parse_poolfind,
    parse_poolmon,
    parse_poolmon_snapshots,
    parse_poolused,
    parse_poolused_tables,
    parse_snapshot,
)
from .render import render_poolfind, render_poolused, sort_usages

__all__ = [
    "PoolBlock",
    "PoolTotals",
    "PoolUsedTable",
    "Snapshot",
    "TagUsage",
    "detect_format",
    "parse_poolfind",
    "parse_poolmon",
    "parse_poolmon_snapshots",
    "parse_poolused",
    "parse_poolused_tables",
    "parse_snapshot",
    "render_poolfind",
    "render_poolused",
    "sort_usages",
]
