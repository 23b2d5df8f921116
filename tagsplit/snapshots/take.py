"""Taking snapshots: from a live debugger (pykd, or the emulated kernel's stand-in) or from saved text."""

from __future__ import annotations

import re
import sys
from typing import TYPE_CHECKING, Any, Callable

from .. import tags
from ..errors import InputError
from . import store
from .model import Snapshot
from .parse import parse_snapshot

if TYPE_CHECKING:
    from pathlib import Path

    from ..plan.model import Plan


def _plan_tags(plan: Plan) -> list[str]:
    out: dict[str, None] = {}
    for s in plan.sites:
        if s.new_tag is not None and s.new_tag:
            out[tags.display(s.new_tag)] = None
    for t in plan.tags:
        out[tags.display(t)] = None
    return list(out)


def poolused_text(pykd: Any, plan: Plan) -> str:
    """`!poolused 1 <tag>` for each tag of the plan (new and original): cheap, read from the tag table."""
    parts = []
    for t in _plan_tags(plan):
        shown = t if " " not in t else t.replace(" ", "?")
        text = pykd.dbgCommand(f"!poolused 1 {shown}") or ""
        parts.append(text)
    return _merge_poolused(parts)


def _merge_poolused(parts: list[str]) -> str:
    """One verbose table from several single-tag outputs (header from the first, every row, no TOTAL)."""
    header: list[str] = []
    rows: list[str] = []
    for text in parts:
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith("Tag "):
                if not header:
                    header = lines[: i + 2]
                rows += [x for x in lines[i + 1 :] if x.strip() and not x.lstrip().startswith("TOTAL")]
                break
    return "\n".join(header + rows) + "\n"


def take_live(
    pykd: Any,
    plan: Plan,
    out: Path,
    *,
    poolfind: bool = False,
    every: float = 0.0,
    count: int = 1,
    resume: Callable[[float], None] | None = None,
    clock: Callable[[], str] = store.now,
    progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> list[Snapshot]:
    """Take `count` snapshots `every` seconds apart and append them to `out`.

    Between snapshots `resume(seconds)` lets the target run (the emulated kernel runs its workload; on a real
    kernel there is no portable way to break in again after a delay from a script, so `--count` above 1 needs a
    resume function and the CLI refuses it for pykd).
    """
    taken = []
    for i in range(count):
        if i and resume is not None:
            resume(every)
        text = poolused_text(pykd, plan)
        snap = parse_snapshot(text, clock(), "poolused")
        if poolfind:
            blocks = []
            for t in _plan_tags(plan):
                for pool_type in (0, 1):
                    progress(f"!poolfind {t} {pool_type} (slow on a real kernel)…")
                    found = pykd.dbgCommand(f"!poolfind {t} {pool_type}") or ""
                    if found.strip():
                        blocks += list(parse_snapshot(found, snap.time, "poolfind").blocks)
            snap = Snapshot(snap.time, snap.source, snap.usages, tuple(blocks))
        store.append(out, snap)
        taken.append(snap)
        progress(f"snapshot {i + 1}/{count} at {snap.time}: {len(snap.usages)} tags")
    return taken


_PROMPT = re.compile(r"^\s*(?:\d+: )?k[dl]> ?(.*)$", re.M)


def command_output(text: str) -> str:
    """From a debugger log (.logopen) the output of its last !poolused / !poolfind command; other text as it is."""
    prompts = list(_PROMPT.finditer(text))
    if not prompts:
        return text
    for i in range(len(prompts) - 1, -1, -1):
        command = prompts[i].group(1).strip()
        if command.startswith(("!poolused", "!poolfind")):
            end = prompts[i + 1].start() if i + 1 < len(prompts) else len(text)
            return text[prompts[i].end() : end].lstrip("\r\n")
    return text


def take_from_file(path: Path, out: Path, at: str | None = None) -> Snapshot:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from e
    snap = parse_snapshot(command_output(text), store.time_of_log(text, path, at))
    store.append(out, snap)
    return snap
