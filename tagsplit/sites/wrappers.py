"""Allocation wrappers: the driver's own small allocator functions, and the call sites that use them.

A *parameter* wrapper passes one of its own arguments as the tag (`MyAllocWithTag(size, tag)`): its pool call
site's tag source is `param`, so the constant sits at each caller, and a caller that itself passes its own
parameter on makes a nested wrapper (followed to a bounded depth). A *fixed* wrapper is a small function whose one
pool call uses a constant tag and that is called from several places (`MyAlloc(size)`): one tag for all its
callers, which only a per-caller copy of the wrapper can split. Places that take a wrapper's address (function
pointer tables, `lea`) are reported: calls through them are not followed.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import model
from .flow import FunctionCode
from .refs import direct_branches_to
from .semantics import PARAM_REGS_X64, Loc, RegLoc, StackLoc

if TYPE_CHECKING:
    from ..image import Image
    from .model import CallSite, DriverScan, TagSource

MAX_DEPTH = 3
MAX_FIXED_SIZE = 0x100  # a fixed-tag wrapper copied per caller must be small
_LEA_RIP = re.compile(rb"[\x48\x4c]\x8d[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]", re.S)
PARAM = "param"
FIXED = "fixed"


@dataclass(frozen=True)
class WrapperCall:
    rva: int  # the call (or jmp) instruction in the caller
    size: int
    raw: bytes
    function_rva: int | None
    function_name: str | None
    section: str
    tag_source: TagSource  # what the caller passes (param wrappers), or the wrapper's own constant (fixed)
    depth: int  # 1: calls the wrapper holding the pool call; 2: calls a wrapper of that wrapper, ...
    via: int | None = None  # the wrapper it calls directly, when that is a nested wrapper

    @property
    def tag_value(self) -> int | None:
        return self.tag_source.value


@dataclass(frozen=True)
class Wrapper:
    rva: int
    name: str | None
    kind: str  # param | fixed
    site: int  # the pool call site inside the innermost wrapper
    api: str
    role: str
    param: int | None  # 1-based tag parameter (param wrappers)
    size: int  # bytes of the function (its .pdata range or recovered bounds)
    calls: tuple[WrapperCall, ...]
    address_taken: tuple[int, ...]  # RVAs where the wrapper's address is stored or loaded
    inner: int | None = None  # the wrapper this one passes its tag parameter to (nested)


def _tag_location(arch: str, param: int, tail: bool) -> Loc:
    if arch == "x64" and param <= 4:
        return RegLoc(PARAM_REGS_X64[param - 1])
    ptr = 8 if arch == "x64" else 4
    return StackLoc(ptr * (param - 1) + (ptr if tail else 0))


class _Finder:
    def __init__(self, image: Image, scan: DriverScan) -> None:
        from .scan import _Scanner  # the scanner's function bounds and data-flow context

        self.image = image
        self.scan = scan
        self.scanner = _Scanner(image)
        self.scanner.stubs = {}
        self.codes: dict[int, FunctionCode] = {}

    def code(self, rva: int) -> FunctionCode | None:
        fn = self.scanner._function(rva)
        if fn is None:
            return None
        if fn[0] not in self.codes:
            self.codes[fn[0]] = FunctionCode(self.image.mem, fn[0], fn[1], self.scanner.cs)
        return self.codes[fn[0]]

    def size_of(self, rva: int) -> int:
        code = self.code(rva)
        return sum(e - b for b, e in code.ranges) if code is not None else 0

    def calls_to(self, target: int) -> list[tuple[int, FunctionCode]]:
        out = []
        mem = self.image.mem
        # a tail call to a nearby wrapper may be a short `jmp rel8`
        near = [
            p
            for p in range(max(0, target - 130), min(len(mem) - 1, target + 126))
            if mem[p] == 0xEB and p + 2 + struct.unpack_from("<b", mem, p + 1)[0] == target
        ]
        for src in [s for s, _t, _c in direct_branches_to(self.image, {target})] + near:
            code = self.code(src)
            if code is not None and code.at(src) is not None and code.entry != target:
                out.append((src, code))
        return out

    def address_taken(self, target: int) -> list[int]:
        image = self.image
        out = []
        va = image.base + target
        for r, size in zip(image.relocations, image.relocation_sizes):
            if size == image.ptr_size and int.from_bytes(image.mem[r : r + size], "little") == va:
                out.append(r)
        if image.arch == "x64":
            for sec in image.code_sections():
                for m in _LEA_RIP.finditer(image.mem, sec.rva, sec.end):
                    p = m.start()
                    if p + 7 + struct.unpack_from("<i", image.mem, p + 3)[0] == target:
                        out.append(p)
        return sorted(out)

    def param_origin(self, site: CallSite) -> int | None:
        """The one parameter among the origins of a site's tag, if there is exactly one."""
        from .. import apis
        from .scan import _X64_REG_OF

        code = self.code(site.rva)
        k = code.at(site.rva) if code is not None else None
        api = apis.BY_NAME.get(site.api)
        where = api.tag_location(self.image.arch) if api is not None else None
        if code is None or k is None or where is None:
            return None
        tail = code.insns[k].mnemonic == "jmp"
        loc: Loc = (
            RegLoc(_X64_REG_OF[where])
            if isinstance(where, str)
            else StackLoc(where + (self.image.ptr_size if tail else 0))
        )
        params = {o.param for o in code.origins(k, loc, self.scanner.ctx) if o.kind == "param"}
        return params.pop() if len(params) == 1 else None

    def resolve(self, code: FunctionCode, rva: int, param: int) -> TagSource:
        from .scan import _classify

        k = code.at(rva)
        assert k is not None
        insn = code.insns[k]
        loc = _tag_location(self.image.arch, param, insn.mnemonic == "jmp")
        return _classify(code.origins(k, loc, self.scanner.ctx), code, self.image)

    def call(self, src: int, code: FunctionCode, source: TagSource, depth: int, via: int | None) -> WrapperCall:
        k = code.at(src)
        assert k is not None
        insn = code.insns[k]
        sec = self.image.section_at(src)
        return WrapperCall(
            rva=src,
            size=insn.size,
            raw=insn.raw,
            function_rva=code.entry,
            function_name=self.image.exports.get(code.entry),
            section=sec.name if sec else "?",
            tag_source=source,
            depth=depth,
            via=via,
        )


def find_wrappers(image: Image, scan: DriverScan) -> tuple[Wrapper, ...]:
    """The wrappers of the driver's pool call sites, each with its callers and where its tag comes from."""
    finder = _Finder(image, scan)
    out: list[Wrapper] = []
    by_function: dict[int, list[CallSite]] = {}
    for s in scan.sites:
        if s.function_rva is not None:
            by_function.setdefault(s.function_rva, []).append(s)
    for fn, sites in sorted(by_function.items()):
        if fn == image.entry_rva:
            continue
        for s in sites:
            ts = s.tag_source
            if ts.kind == model.PARAM and ts.param_index is not None:
                out.extend(_param_wrappers(finder, fn, s, ts.param_index))
            elif ts.kind == model.COMPUTED and "param" in ts.detail:
                # the tag is a parameter or something else (System Informer: the caller's tag, or a default when
                # it passes 0): still a parameter wrapper, its callers are where the tags come from
                p = finder.param_origin(s)
                if p is not None:
                    out.extend(_param_wrappers(finder, fn, s, p))
            elif ts.kind == model.IMM and len([x for x in sites if x.role == s.role]) == 1:
                w = _fixed_wrapper(finder, fn, s)
                if w is not None:
                    out.append(w)
    return tuple(out)


def _param_wrappers(finder: _Finder, fn: int, site: CallSite, param: int) -> list[Wrapper]:
    """The wrapper `fn` and, for callers that pass their own parameter on, those callers as nested wrappers."""
    out: list[Wrapper] = []
    level: list[tuple[int, int, int | None]] = [(fn, param, None)]
    seen = {fn}
    depth = 1
    while level and depth <= MAX_DEPTH:
        nxt: list[tuple[int, int, int | None]] = []
        for rva, p, inner in level:
            calls = []
            for src, code in finder.calls_to(rva):
                source = finder.resolve(code, src, p)
                calls.append(finder.call(src, code, source, depth, inner))
                if source.kind == model.PARAM and source.param_index and code.entry not in seen:
                    seen.add(code.entry)
                    nxt.append((code.entry, source.param_index, rva))
            out.append(
                Wrapper(
                    rva=rva,
                    name=finder.image.exports.get(rva),
                    kind=PARAM,
                    site=site.rva,
                    api=site.api,
                    role=site.role,
                    param=p,
                    size=finder.size_of(rva),
                    calls=tuple(calls),
                    address_taken=tuple(finder.address_taken(rva)),
                    inner=inner,
                )
            )
        level = nxt
        depth += 1
    return out


def _fixed_wrapper(finder: _Finder, fn: int, site: CallSite) -> Wrapper | None:
    size = finder.size_of(fn)
    if size > MAX_FIXED_SIZE:
        return None
    calls = finder.calls_to(fn)
    if len(calls) < 2:
        return None
    return Wrapper(
        rva=fn,
        name=finder.image.exports.get(fn),
        kind=FIXED,
        site=site.rva,
        api=site.api,
        role=site.role,
        param=None,
        size=size,
        calls=tuple(finder.call(src, code, site.tag_source, 1, None) for src, code in calls),
        address_taken=tuple(finder.address_taken(fn)),
    )
