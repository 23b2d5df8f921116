"""Snapshot files: one JSON object per line, appended as snapshots are taken (`tagsplit snapshot`)."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import DebuggerOutputError, InputError
from .model import PoolBlock, Snapshot, TagUsage

SCHEMA = 1


def to_json(s: Snapshot, label: str = "") -> dict[str, Any]:
    doc: dict[str, Any] = {"schema": SCHEMA, "time": s.time, "source": s.source}
    if label:
        doc["label"] = label
    doc["usages"] = [
        {
            "tag": u.tag,
            "nonpaged_outstanding": u.nonpaged_outstanding,
            "nonpaged_bytes": u.nonpaged_bytes,
            "paged_outstanding": u.paged_outstanding,
            "paged_bytes": u.paged_bytes,
            "nonpaged_allocs": u.nonpaged_allocs,
            "nonpaged_frees": u.nonpaged_frees,
            "paged_allocs": u.paged_allocs,
            "paged_frees": u.paged_frees,
        }
        for u in s.usages
    ]
    if s.blocks:
        doc["blocks"] = [
            {
                "address": f"{b.address:#x}",
                "size": b.size,
                "tag": b.tag,
                "pool": b.pool,
                "allocated": b.allocated,
                "protected": b.protected,
            }
            for b in s.blocks
        ]
    return doc


def from_json(doc: Any, where: str) -> Snapshot:
    try:
        if doc.get("schema") != SCHEMA:
            raise ValueError(f"schema {doc.get('schema')!r}")
        usages = tuple(
            TagUsage(
                tag=str(u["tag"]),
                nonpaged_outstanding=int(u["nonpaged_outstanding"]),
                nonpaged_bytes=int(u["nonpaged_bytes"]),
                paged_outstanding=int(u["paged_outstanding"]),
                paged_bytes=int(u["paged_bytes"]),
                nonpaged_allocs=u.get("nonpaged_allocs"),
                nonpaged_frees=u.get("nonpaged_frees"),
                paged_allocs=u.get("paged_allocs"),
                paged_frees=u.get("paged_frees"),
                description="",
            )
            for u in doc.get("usages", [])
        )
        blocks = tuple(
            PoolBlock(
                address=int(b["address"], 16),
                size=int(b["size"]),
                tag=str(b["tag"]),
                pool=str(b["pool"]),
                allocated=bool(b["allocated"]),
                protected=bool(b.get("protected", False)),
                previous_size=None,
            )
            for b in doc.get("blocks", [])
        )
        time = str(doc["time"])
        parse_time(time)
        return Snapshot(time, str(doc["source"]), usages, blocks)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise DebuggerOutputError(f"{where}: not a tagsplit snapshot ({e})") from e


def append(path: Path, snapshot: Snapshot, label: str = "") -> None:
    line = json.dumps(to_json(snapshot, label), separators=(",", ":")) + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise InputError(f"{path}: cannot append the snapshot: {e.strerror or e}") from e


def read(path: Path) -> list[Snapshot]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read snapshots: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise DebuggerOutputError(f"{path}: not a snapshot file (not UTF-8)") from e
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as e:
            raise DebuggerOutputError(f"{path}:{n}: not a JSON snapshot line ({e.args[0]})") from e
        out.append(from_json(doc, f"{path}:{n}"))
    return out


def parse_time(text: str) -> datetime:
    t = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


_SESSION_TIME = re.compile(r"Debug session time:\s+\w{3} (\w{3}\s+\d+ \d+:\d+:\d+(?:\.\d+)? \d{4})")


def time_of_log(text: str, path: Path, at: str | None) -> str:
    """The snapshot's time: `--at`, else the last `Debug session time:` line (`.time`), else the file's mtime."""
    if at:
        parse_time(at)
        return at
    hits = _SESSION_TIME.findall(text)
    if hits:
        stamp = re.sub(r"\s+", " ", hits[-1])
        fmt = "%b %d %H:%M:%S.%f %Y" if "." in stamp else "%b %d %H:%M:%S %Y"
        return datetime.strptime(stamp, fmt).replace(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")
    mtime = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).replace(microsecond=0)
    return mtime.isoformat().replace("+00:00", "Z")
