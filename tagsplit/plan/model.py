"""The plan: which bytes change where, and why. Read and written as JSON.

This module imports only the standard library: the debugger-side code (`tagsplit.live`, running inside WinDbg's
Python through pykd) loads plans with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, PlanError

SCHEMA = 1

IMM = "imm"  # the tag immediate edited in place
STUB = "stub"  # the call redirected through a stub that sets the new tag
FREE_ZERO = "free-zero"  # a free site's tag argument set to 0 (no tag check on free)
REFUSED = "refused"
STRATEGIES = (IMM, STUB, FREE_ZERO, REFUSED)
SPLITS = ("shared", "untagged", "frees", "wrappers")  # what `plan --split` may take

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
    function: str | None
    old_tag: int | None
    new_tag: int | None
    strategy: str
    reason: str
    patches: tuple[Patch, ...] = ()
    stub_rva: int | None = None
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

    def patches(self, scope: str | None = None) -> list[Patch]:
        out = [p for s in self.sites for p in s.patches]
        if scope == CODE:
            out = [p for p in out if p.scope == CODE]
        return sorted(out, key=lambda p: p.rva)

    @property
    def module(self) -> str:
        """The debugger's module name for the driver (`lm` shows the file name without extension)."""
        return Path(self.driver.name).stem


# --- JSON ----------------------------------------------------------------------------------------------------


def _hex(v: int | None) -> str | None:
    return None if v is None else f"{v:#x}"


def _tag_text(v: int | None) -> str | None:
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


U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
MAX_PLAN_FILE = 256 << 20  # a plan for 10,000 sites is ~10 MB; refuse anything absurd unread


def _int(v: Any, what: str, hi: int = U32) -> int:
    if isinstance(v, str):
        try:
            v = int(v, 16) if v.lower().startswith("0x") else int(v)
        except ValueError:
            raise PlanError(f"{what}: expected a number, got {_short(v)}") from None
    if isinstance(v, int) and not isinstance(v, bool):
        if not 0 <= v <= hi:
            raise PlanError(f"{what}: {v:#x} is out of range (0..{hi:#x})")
        return v
    raise PlanError(f"{what}: expected a number, got {_short(v)}")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _opt_int(v: Any, what: str) -> int | None:
    return None if v is None else _int(v, what)


def _bytes(v: Any, what: str) -> bytes:
    if not isinstance(v, str):
        raise PlanError(f"{what}: expected hex bytes, got {_short(v)}")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise PlanError(f"{what}: not hex bytes: {_short(v)}") from None


def _text(v: Any, what: str, default: str = "") -> str:
    if v is None:
        return default
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        raise PlanError(f"{what}: expected text, got {_short(v)}")
    return str(v)


def _opt_text(v: Any, what: str) -> str | None:
    return None if v is None else _text(v, what)


def _list(v: Any, what: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise PlanError(f"{what}: expected a list, got {_short(v)}")
    return v


def _dict(v: Any, what: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise PlanError(f"{what}: expected an object, got {_short(v)}")
    return v


def _patch(d: Any, where: str) -> Patch:
    if not isinstance(d, dict):
        raise PlanError(f"{where}: expected an object")
    rva = _int(d.get("rva"), f"{where}.rva")
    alts = []
    for i, a in enumerate(_list(d.get("resident_alternatives"), f"{where}.resident_alternatives")):
        if not isinstance(a, str):
            raise PlanError(f"{where}.resident_alternatives[{i}]: expected a hex pattern, got {_short(a)}")
        alts.append(a.lower())
    scope = d.get("scope", CODE)
    if scope not in (CODE, FILE_ONLY):
        raise PlanError(f"{where}.scope: unknown scope {_short(scope)}")
    return Patch(
        rva,
        _bytes(d.get("original"), f"{where}.original"),
        _bytes(d.get("replacement"), f"{where}.replacement"),
        _text(d.get("what"), f"{where}.what"),
        tuple(alts),
        scope,
    )


def _site(d: Any, where: str) -> SitePlan:
    if not isinstance(d, dict):
        raise PlanError(f"{where}: expected an object")
    strategy = d.get("strategy")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise PlanError(f"{where}.strategy: {_short(strategy)} is not one of {', '.join(STRATEGIES)}")
    patches = _list(d.get("patches"), f"{where}.patches")
    stub = _dict(d.get("stub"), f"{where}.stub")
    if stub and stub.get("rva") is None:
        raise PlanError(f"{where}.stub: a stub needs its rva")
    code = _list(stub.get("code"), f"{where}.stub.code")
    shared = _list(d.get("shared_with"), f"{where}.shared_with")
    return SitePlan(
        rva=_int(d.get("rva"), f"{where}.rva"),
        api=_text(d.get("api"), f"{where}.api"),
        role=_text(d.get("role"), f"{where}.role"),
        function=_opt_text(d.get("function"), f"{where}.function"),
        old_tag=_opt_int(d.get("old_tag_value"), f"{where}.old_tag_value"),
        new_tag=_opt_int(d.get("new_tag_value"), f"{where}.new_tag_value"),
        strategy=strategy,
        reason=_text(d.get("reason"), f"{where}.reason"),
        patches=tuple(_patch(p, f"{where}.patches[{i}]") for i, p in enumerate(patches)),
        stub_rva=_opt_int(stub.get("rva"), f"{where}.stub.rva") if stub else None,
        stub=_bytes(stub.get("bytes", ""), f"{where}.stub.bytes") if stub else b"",
        stub_text=tuple(_text(c, f"{where}.stub.code[{i}]") for i, c in enumerate(code)),
        shared_with=tuple(_int(r, f"{where}.shared_with[{i}]") for i, r in enumerate(shared)),
        section=_text(d.get("section"), f"{where}.section"),
    )


def from_json(doc: Any) -> Plan:
    """A plan from its JSON document; everything is checked, nothing trusted.

    Raises:
        PlanError: the document is not a valid plan.
    """
    if not isinstance(doc, dict) or doc.get("tool", "tagsplit") != "tagsplit":
        raise PlanError("not a tagsplit plan")
    if doc.get("schema") != SCHEMA:
        schema = _short(doc.get("schema"))
        raise PlanError(f"plan schema {schema} is not supported (this tagsplit reads schema {SCHEMA})")
    d = doc.get("driver")
    if not isinstance(d, dict):
        raise PlanError("plan has no driver identity")
    sha = d.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha):
        raise PlanError("plan driver.sha256 is missing or malformed")
    driver = Driver(
        path=_text(d.get("path"), "driver.path"),
        name=_text(d.get("name"), "driver.name"),
        sha256=sha,
        arch=_text(d.get("arch"), "driver.arch"),
        timestamp=_int(d.get("timestamp"), "driver.timestamp"),
        size_of_image=_int(d.get("size_of_image"), "driver.size_of_image"),
        checksum=_int(d.get("checksum"), "driver.checksum"),
        image_base=_int(d.get("image_base"), "driver.image_base", U64),
    )
    if driver.arch not in ("x64", "x86"):
        raise PlanError(f"plan driver.arch {driver.arch!r} is not x64 or x86")
    if "\0" in driver.path or "\0" in driver.name:
        raise PlanError("plan driver.path or driver.name holds a NUL character")
    sites = doc.get("sites")
    if not isinstance(sites, list):
        raise PlanError("plan has no sites list")
    free = _list(doc.get("free_sites"), "free_sites")
    plan = Plan(
        driver=driver,
        tags=tuple(_int(t, f"tags[{i}]") for i, t in enumerate(_list(doc.get("tags"), "tags"))),
        sites=tuple(_site(s, f"sites[{i}]") for i, s in enumerate(sites)),
        free_sites=tuple(_site(s, f"free_sites[{i}]") for i, s in enumerate(free)),
        options=dict(_dict(doc.get("options"), "options")),
    )
    check(plan)
    return plan


def check(plan: Plan) -> None:
    """Patches must not overlap, and must lie inside the image."""
    last: Patch | None = None
    for p in plan.patches():
        if p.rva < 0 or p.end > plan.driver.size_of_image:
            raise PlanError(f"patch at {p.rva:#x} lies outside the image")
        if last is not None and p.rva < last.end:
            raise PlanError(f"patches at {last.rva:#x} and {p.rva:#x} overlap")
        last = p


def read_text(path: str | Path, what: str, limit: int = MAX_PLAN_FILE) -> str:
    """A small UTF-8 document (plan, journal): regular files only, at most `limit` bytes.

    Raises:
        InputError: cannot be read, not a regular file, or larger than `limit`.
        PlanError: not UTF-8 text.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{p}: cannot read {what}: not a regular file")
            data = f.read(limit + 1)
    except IsADirectoryError as e:
        raise InputError(f"{p}: cannot read {what}: is a directory") from e
    except OSError as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{p}: cannot read {what}: {e.strerror or e}") from e
    if len(data) > limit:
        raise InputError(f"{p}: cannot read {what}: larger than {limit >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanError(f"{p}: not {what} (not UTF-8 text)") from e


def parse_json(text: str, path: str | Path, what: str) -> Any:
    """json.loads with every failure as a PlanError (bad syntax, absurd nesting)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: not {what} (invalid JSON at line {e.lineno}: {e.msg})") from e
    except (ValueError, RecursionError) as e:  # e.g. an integer of 5000 digits, or 100,000 nested brackets
        raise PlanError(f"{path}: not {what} ({type(e).__name__}: {str(e)[:80]})") from e


def load(path: str | Path) -> Plan:
    """Read a plan file.

    Raises:
        InputError: the file cannot be read.
        PlanError: the file is not a valid plan.
    """
    p = Path(path)
    text = read_text(p, "a plan")
    return from_json(parse_json(text, p, "a plan"))
