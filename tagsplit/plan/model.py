"""The plan: which bytes change where, and why. Read and written as JSON.

This module imports only the standard library: the debugger-side code (`tagsplit.live`, running inside WinDbg's
Python through pykd) loads plans with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import InputError, PlanError

SCHEMA = 1

IMM = "imm"  # the tag immediate edited in place
STUB = "stub"  # the call redirected through a stub that sets the new tag
FREE_ZERO = "free-zero"  # a free site's tag argument set to 0 (no tag check on free)
REFUSED = "refused"
STRATEGIES = (IMM, STUB, FREE_ZERO, REFUSED)

CODE = "code"  # applies to resident memory and to the file
FILE_ONLY = "file"  # applies only to a patched file (e.g. a base-relocation entry neutralised)


@dataclass(frozen=True)
class Patch:
    rva: int
    original: bytes
    replacement: bytes
    what: str = ""
    # Other contents the range may have in resident memory, as hex patterns where `??` is any byte: the kernel
    # loader rewrites import-call-optimised calls to `mov r10,[IAT]; call rel32`, and rel32 depends on where the
    # kernel export lies.
    resident_alternatives: tuple[str, ...] = ()
    scope: str = CODE

    def __post_init__(self) -> None:
        if len(self.original) != len(self.replacement) or not self.original:
            raise PlanError(f"patch at {self.rva:#x}: original and replacement differ in length")
        for alt in self.resident_alternatives:
            if len(alt) != 2 * len(self.original) or any(c not in "0123456789abcdef?" for c in alt):
                raise PlanError(f"patch at {self.rva:#x}: malformed resident alternative {alt!r}")

    def resident_match(self, data: bytes) -> bool:
        """Whether `data` is one of the resident alternatives (not the original itself)."""
        h = data.hex()
        return any(
            len(h) == len(alt) and all(a == "?" or a == c for a, c in zip(alt, h)) for alt in self.resident_alternatives
        )

    @property
    def end(self) -> int:
        return self.rva + len(self.original)


@dataclass(frozen=True)
class SitePlan:
    rva: int
    api: str
    role: str
    function: Optional[str]
    old_tag: Optional[int]
    new_tag: Optional[int]
    strategy: str
    reason: str
    patches: tuple[Patch, ...] = ()
    stub_rva: Optional[int] = None
    stub: bytes = b""
    stub_text: tuple[str, ...] = ()
    shared_with: tuple[int, ...] = ()
    section: str = ""


@dataclass(frozen=True)
class Driver:
    path: str
    name: str
    sha256: str
    arch: str
    timestamp: int
    size_of_image: int
    checksum: int
    image_base: int


@dataclass(frozen=True)
class Plan:
    driver: Driver
    tags: tuple[int, ...]  # the suspect tags the plan splits
    sites: tuple[SitePlan, ...]
    free_sites: tuple[SitePlan, ...] = ()  # frees that pass a suspect tag and are left unchanged
    options: dict[str, Any] = field(default_factory=dict)

    def patches(self, scope: Optional[str] = None) -> list[Patch]:
        out = [p for s in self.sites for p in s.patches]
        if scope == CODE:
            out = [p for p in out if p.scope == CODE]
        return sorted(out, key=lambda p: p.rva)

    @property
    def module(self) -> str:
        """The debugger's module name for the driver (`lm` shows the file name without extension)."""
        return Path(self.driver.name).stem


# --- JSON ----------------------------------------------------------------------------------------------------


def _hex(v: Optional[int]) -> Optional[str]:
    return None if v is None else f"{v:#x}"


def _tag_text(v: Optional[int]) -> Optional[str]:
    if v is None:
        return None
    raw = (v & 0x7FFFFFFF).to_bytes(4, "little")
    return "".join(chr(b) if 0x20 <= b <= 0x7E else "." for b in raw)


def _patch_json(p: Patch) -> dict[str, Any]:
    d: dict[str, Any] = {"rva": _hex(p.rva), "original": p.original.hex(), "replacement": p.replacement.hex()}
    if p.what:
        d["what"] = p.what
    if p.resident_alternatives:
        d["resident_alternatives"] = list(p.resident_alternatives)
    if p.scope != CODE:
        d["scope"] = p.scope
    return d


def _site_json(s: SitePlan) -> dict[str, Any]:
    d: dict[str, Any] = {
        "rva": _hex(s.rva),
        "api": s.api,
        "role": s.role,
        "function": s.function,
        "section": s.section,
        "old_tag": _tag_text(s.old_tag),
        "old_tag_value": None if s.old_tag is None else f"0x{s.old_tag:08x}",
        "new_tag": _tag_text(s.new_tag),
        "new_tag_value": None if s.new_tag is None else f"0x{s.new_tag:08x}",
        "strategy": s.strategy,
        "reason": s.reason,
        "patches": [_patch_json(p) for p in s.patches],
    }
    if s.shared_with:
        d["shared_with"] = [_hex(r) for r in s.shared_with]
    if s.stub_rva is not None:
        d["stub"] = {"rva": _hex(s.stub_rva), "bytes": s.stub.hex(), "code": list(s.stub_text)}
    return d


def to_json(plan: Plan) -> dict[str, Any]:
    d = plan.driver
    return {
        "schema": SCHEMA,
        "tool": "tagsplit",
        "driver": {
            "path": d.path,
            "name": d.name,
            "sha256": d.sha256,
            "arch": d.arch,
            "timestamp": _hex(d.timestamp),
            "size_of_image": _hex(d.size_of_image),
            "checksum": _hex(d.checksum),
            "image_base": _hex(d.image_base),
        },
        "tags": [f"0x{t:08x}" for t in plan.tags],
        "tags_display": [_tag_text(t) for t in plan.tags],
        "options": plan.options,
        "sites": [_site_json(s) for s in plan.sites],
        "free_sites": [_site_json(s) for s in plan.free_sites],
    }


def dumps(plan: Plan) -> str:
    return json.dumps(to_json(plan), indent=2) + "\n"


def digest(plan: Plan) -> str:
    return hashlib.sha256(dumps(plan).encode()).hexdigest()


def _int(v: Any, what: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, str):
        try:
            return int(v, 16) if v.lower().startswith("0x") else int(v)
        except ValueError:
            pass
    raise PlanError(f"{what}: expected a number, got {v!r}")


def _opt_int(v: Any, what: str) -> Optional[int]:
    return None if v is None else _int(v, what)


def _bytes(v: Any, what: str) -> bytes:
    if not isinstance(v, str):
        raise PlanError(f"{what}: expected hex bytes, got {v!r}")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise PlanError(f"{what}: not hex bytes: {v!r}") from None


def _patch(d: Any, where: str) -> Patch:
    if not isinstance(d, dict):
        raise PlanError(f"{where}: expected an object")
    rva = _int(d.get("rva"), f"{where}.rva")
    alts = tuple(str(a).lower() for a in d.get("resident_alternatives", []))
    scope = d.get("scope", CODE)
    if scope not in (CODE, FILE_ONLY):
        raise PlanError(f"{where}.scope: unknown scope {scope!r}")
    return Patch(
        rva,
        _bytes(d.get("original"), f"{where}.original"),
        _bytes(d.get("replacement"), f"{where}.replacement"),
        str(d.get("what", "")),
        alts,
        scope,
    )


def _site(d: Any, where: str) -> SitePlan:
    if not isinstance(d, dict):
        raise PlanError(f"{where}: expected an object")
    strategy = d.get("strategy")
    if strategy not in STRATEGIES:
        raise PlanError(f"{where}.strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    patches = d.get("patches", [])
    if not isinstance(patches, list):
        raise PlanError(f"{where}.patches: expected a list")
    stub = d.get("stub") or {}
    return SitePlan(
        rva=_int(d.get("rva"), f"{where}.rva"),
        api=str(d.get("api", "")),
        role=str(d.get("role", "")),
        function=d.get("function"),
        old_tag=_opt_int(d.get("old_tag_value"), f"{where}.old_tag_value"),
        new_tag=_opt_int(d.get("new_tag_value"), f"{where}.new_tag_value"),
        strategy=strategy,
        reason=str(d.get("reason", "")),
        patches=tuple(_patch(p, f"{where}.patches[{i}]") for i, p in enumerate(patches)),
        stub_rva=_opt_int(stub.get("rva"), f"{where}.stub.rva") if stub else None,
        stub=_bytes(stub.get("bytes", ""), f"{where}.stub.bytes") if stub else b"",
        stub_text=tuple(stub.get("code", [])) if stub else (),
        shared_with=tuple(_int(r, f"{where}.shared_with") for r in d.get("shared_with", [])),
        section=str(d.get("section", "")),
    )


def from_json(doc: Any) -> Plan:
    """A plan from its JSON document; everything is checked, nothing trusted.

    Raises:
        PlanError: the document is not a valid plan.
    """
    if not isinstance(doc, dict) or doc.get("tool", "tagsplit") != "tagsplit":
        raise PlanError("not a tagsplit plan")
    if doc.get("schema") != SCHEMA:
        raise PlanError(f"plan schema {doc.get('schema')!r} is not supported (this tagsplit reads schema {SCHEMA})")
    d = doc.get("driver")
    if not isinstance(d, dict):
        raise PlanError("plan has no driver identity")
    sha = d.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise PlanError("plan driver.sha256 is missing or malformed")
    driver = Driver(
        path=str(d.get("path", "")),
        name=str(d.get("name", "")),
        sha256=sha,
        arch=str(d.get("arch", "")),
        timestamp=_int(d.get("timestamp"), "driver.timestamp"),
        size_of_image=_int(d.get("size_of_image"), "driver.size_of_image"),
        checksum=_int(d.get("checksum"), "driver.checksum"),
        image_base=_int(d.get("image_base"), "driver.image_base"),
    )
    if driver.arch not in ("x64", "x86"):
        raise PlanError(f"plan driver.arch {driver.arch!r} is not x64 or x86")
    sites = doc.get("sites")
    if not isinstance(sites, list):
        raise PlanError("plan has no sites list")
    plan = Plan(
        driver=driver,
        tags=tuple(_int(t, "tags") for t in doc.get("tags", [])),
        sites=tuple(_site(s, f"sites[{i}]") for i, s in enumerate(sites)),
        free_sites=tuple(_site(s, f"free_sites[{i}]") for i, s in enumerate(doc.get("free_sites", []))),
        options=dict(doc.get("options", {})),
    )
    check(plan)
    return plan


def check(plan: Plan) -> None:
    """Patches must not overlap, and must lie inside the image."""
    last: Optional[Patch] = None
    for p in plan.patches():
        if p.rva < 0 or p.end > plan.driver.size_of_image:
            raise PlanError(f"patch at {p.rva:#x} lies outside the image")
        if last is not None and p.rva < last.end:
            raise PlanError(f"patches at {last.rva:#x} and {p.rva:#x} overlap")
        last = p


def load(path: str | Path) -> Plan:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{p}: cannot read plan: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise PlanError(f"{p}: not a plan (not UTF-8 text)") from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"{p}: not a plan (invalid JSON at line {e.lineno}: {e.msg})") from e
    return from_json(doc)
