"""Pure renderers for scan results: the `--json` document and the human table."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from .. import tags
from ..apis import FREE
from . import model

if TYPE_CHECKING:
    from .model import CallSite, DriverScan

SCHEMA = 1


def _hex(v: int | None) -> str | None:
    return None if v is None else f"{v:#x}"


def patchability(site: CallSite) -> str:
    """How `plan` can give this site its own tag: edit the immediate, or redirect the call through a stub."""
    if site.role == FREE:
        return "-"
    ts = site.tag_source
    if ts.kind == model.IMM and ts.imm_offset is not None and not site.shared_with and not ts.other_sources:
        return "in-place"
    return "stub"


def site_json(site: CallSite) -> dict[str, Any]:
    ts = site.tag_source
    src: dict[str, Any] = {
        "kind": ts.kind,
        "rva": _hex(ts.rva),
        "imm_offset": ts.imm_offset,
        "shared_with": [_hex(r) for r in site.shared_with],
    }
    if ts.insn is not None:
        src["bytes"] = ts.insn.raw.hex()
        src["instruction"] = ts.insn.text
    if ts.other_sources:
        src["other_sources"] = [_hex(r) for r in ts.other_sources]
    if ts.param_index is not None:
        src["param"] = ts.param_index
    if ts.detail:
        src["detail"] = ts.detail
    notes = list(site.notes)
    if site.discardable:
        notes.append("in a discardable INIT section: gone after DriverEntry returns")
    if site.pageable:
        notes.append("in a pageable section: may be paged out when the debugger breaks in")
    return {
        "rva": _hex(site.rva),
        "bytes": site.raw.hex(),
        "api": site.api,
        "role": site.role,
        "call": site.call,
        "function_rva": _hex(site.function_rva),
        "function": site.function_name,
        "tag": site.tag,
        "tag_value": tags.hex_value(site.tag_value) if site.tag_value is not None else None,
        "tag_source": src,
        "section": site.section,
        "pageable": site.pageable,
        "discardable": site.discardable,
        "patch": patchability(site),
        "note": "; ".join(notes) if notes else None,
    }


def driver_json(scan: DriverScan) -> dict[str, Any]:
    return {
        "path": scan.path,
        "sha256": scan.sha256,
        "arch": scan.arch,
        "image_base": _hex(scan.image_base),
        "mapped": scan.mapped,
        "is_driver": scan.is_driver,
        "timestamp": _hex(scan.timestamp),
        "size_of_image": _hex(scan.size_of_image),
        "checksum": _hex(scan.checksum),
        "sites": [site_json(s) for s in scan.sites],
        "unexplained_tag_bytes": sorted({_hex(r) for rs in scan.unexplained_tag_bytes.values() for r in rs}),
        "unexplained_by_tag": {
            tags.hex_value(v): [_hex(r) for r in rs] for v, rs in sorted(scan.unexplained_tag_bytes.items()) if rs
        },
        "import_thunks": [{"rva": _hex(r), "called": used} for r, used in scan.import_thunks.items()],
        "stubs": [{"entry": _hex(e), "jump": _hex(j)} for e, j in scan.stubs.items()],
        "warnings": list(scan.warnings),
    }


def document(scans: list[DriverScan], errors: list[dict[str, str]] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema": SCHEMA, "drivers": [driver_json(s) for s in scans]}
    if errors:
        doc["errors"] = errors
    return doc


def _tag_label(value: int | None) -> str:
    if value is None:
        return "(no constant tag)"
    if value == 0:
        return "0 (frees with tag 0: no tag check)"
    shown = tags.display(value)
    protected = " protected" if value & tags.PROTECTED_POOL else ""
    return f"'{shown}' ({tags.hex_value(value)}{protected})"


def _source_text(site: CallSite) -> str:
    ts = site.tag_source
    if ts.kind == model.IMM:
        where = f"imm @{ts.rva:#x}" if ts.rva is not None else "imm"
        if ts.other_sources:
            where += " +" + ",".join(f"{r:#x}" for r in ts.other_sources)
        if site.shared_with:
            where += f" (shared with {len(site.shared_with)})"
        if ts.imm_offset is None and ts.value == 0:
            where += " zero"
        return where
    if ts.kind == model.PARAM:
        return f"param {ts.param_index}"
    return f"{ts.kind}: {ts.detail}" if ts.detail and ts.detail != ts.kind else ts.kind


def render_text(scans: list[DriverScan], wanted: set[int] | None = None, show_all: bool = False) -> str:
    """A table per driver, grouped by tag. With `wanted`, only those tags (and the frees that pass them)."""
    out: list[str] = []
    for scan in scans:
        kind = "driver" if scan.is_driver else "NOT A DRIVER (user-mode image)"
        base = f"{'mapped at' if scan.mapped else 'base'} {scan.image_base:#x}"
        out.append(f"{scan.path}  {scan.arch} {kind}  {base}  sha256 {scan.sha256[:16]}…")
        groups: dict[int | None, list[CallSite]] = defaultdict(list)
        for s in scan.sites:
            value = s.tag_value & ~tags.PROTECTED_POOL if s.tag_value is not None else None
            if wanted is not None and value not in wanted:
                continue
            if s.role == FREE and not show_all and wanted is None:
                continue
            groups[s.tag_value].append(s)
        allocs = sum(1 for s in scan.sites if s.role != FREE)
        frees = len(scan.sites) - allocs
        out.append(f"  {allocs} allocation/lookaside sites, {frees} free sites")
        if wanted is not None and not groups:
            shown = ", ".join(_tag_label(v) for v in sorted(wanted))
            out.append(f"  no call site passes {shown}")
        for value in sorted(groups, key=lambda v: (v is None, v or 0)):
            sites = groups[value]
            n_alloc = sum(1 for s in sites if s.role != FREE)
            out.append("")
            out.append(f"  tag {_tag_label(value)}: {n_alloc} alloc/lookaside, {len(sites) - n_alloc} free")
            out.append(f"    {'RVA':>8}  {'function':<22} {'API':<32} {'call':<8} {'patch':<8} tag source")
            for s in sites:
                fn = s.function_name or (f"sub_{s.function_rva:x}" if s.function_rva is not None else "?")
                flags = []
                if s.discardable:
                    flags.append("INIT")
                elif s.pageable:
                    flags.append("PAGE")
                if s.role == FREE and wanted is not None:
                    flags.append("frees the suspect tag")
                tail = f"  [{', '.join(flags)}]" if flags else ""
                out.append(
                    f"    {s.rva:#8x}  {fn[:22]:<22} {s.api[:32]:<32} {s.call:<8} {patchability(s):<8} "
                    f"{_source_text(s)}{tail}"
                )
        for v, hits in sorted(scan.unexplained_tag_bytes.items()):
            if hits and (wanted is None or v in wanted):
                where = ", ".join(f"{r:#x}" for r in hits[:12]) + (" …" if len(hits) > 12 else "")
                out.append(f"  bytes of {_tag_label(v)} also at {where}: not used as a tag by any call site found")
        for w in scan.warnings:
            out.append(f"  warning: {w}")
        out.append("")
    return "\n".join(out)
