"""Make a plan: a new tag for each site of the suspect tags, and the bytes that give it.

Two ways to change a site's tag:
* `imm` — edit the 4 tag bytes of the instruction that holds the constant (same length, keystone-assembled);
* `stub` — redirect the call (`call rel32` over `call [IAT]`, `jmp rel32` over `jmp [IAT]`, a new rel32 for a call
  to an import thunk) to a small stub in a code cave that sets the new tag and continues to the routine. Used
  where one constant feeds several sites (with `--split shared`), where the tag is not a constant, and for
  untagged ExAllocatePool (`--split untagged`), which the stub turns into ExAllocatePoolWithTag.
The stub is entered with exactly the routine's own entry layout (a `call` pushed the site's return address, a tail
`jmp` left the caller's), so it can set a stack-passed tag at the routine's argument offset and jump on.
"""

from __future__ import annotations

import re
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import apis, tags
from ..errors import DisasmError, PlanError, TagError
from ..sites import model as sm
from ..sites.model import CallSite, DriverScan
from ..sites.wrappers import FIXED as FIXED_WRAPPER
from ..sites.wrappers import MAX_FIXED_SIZE, Wrapper, WrapperCall, find_wrappers
from ..sites.wrappers import PARAM as PARAM_WRAPPER
from . import model
from .asm import assemble, disassemble, retag
from .caves import Cave, CaveSpace, find_caves
from .model import FILE_ONLY, SPLITS, Driver, Patch, Plan, SitePlan
from .newtags import Avoid, pick, prefix_of

if TYPE_CHECKING:
    from ..image import Image

_NOP = {1: b"\x90", 2: b"\x66\x90", 7: b"\x0f\x1f\x80\x00\x00\x00\x00"}
_ICO_NOP = b"\x0f\x1f\x44\x00\x00"
_REG32 = {"r8": "r8d", "rdx": "edx", "r9": "r9d", "rcx": "ecx"}
# `call $+5; pop eax`: keystone mis-assembles `$+5` (it drops the call), so these two are written out.
_PIC = b"\xe8\x00\x00\x00\x00\x58"


@dataclass(frozen=True)
class Options:
    tags: tuple[int, ...]
    prefix: str | None = None
    avoid: Avoid = field(default_factory=Avoid)
    split: frozenset[str] = frozenset()


class _Refused(Exception):
    pass


@dataclass(frozen=True)
class _Shape:
    rva: int  # first byte the redirect replaces
    replaced: bytes
    alternatives: tuple[str, ...]
    kind: str  # "call" or "tail"
    thunk: int | None = None
    displaced_insns: tuple[object, ...] = ()  # sites.semantics.Insn, moved into the stub
    displaced_text: tuple[str, ...] = ()
    jump_reg: str | None = None

    @property
    def displaced(self) -> bool:
        return bool(self.displaced_insns)


def _nops(n: int) -> bytes:
    out = b""
    while n > 0:
        step = 7 if n >= 7 else (2 if n >= 2 else 1)
        out += _NOP[step]
        n -= step
    return out


def _movable(insn: object, arch: str) -> bool:
    """An instruction a stub can execute instead: not a branch, not a push/pop (the stub runs one return address
    deeper), and stack or RIP-relative operands only inside a plain memory operand (re-encoded by `_moved`)."""
    mn = getattr(insn, "mnemonic", "")
    ops = getattr(insn, "op_str", "")
    if mn.startswith(("j", "call", "ret", "push", "pop", "loop", "enter", "leave", "int", "lea")):
        return False
    regs = [t for t in re.split(r"[^a-z0-9]+", ops.replace("ptr", "")) if t]
    if any(r in ("rsp", "esp", "sp", "spl") for r in regs) and not re.search(
        r"\[(rsp|esp)( [+-] 0x[0-9a-f]+| [+-] \d+)?\]", ops
    ):
        return False
    return "rip" not in regs or bool(re.search(r"\[rip [+-] 0x[0-9a-f]+\]", ops))


def _moved(insn: object, arch: str, at: int) -> bytes:
    """`insn` re-encoded to run at `at` inside a stub entered by a call: stack offsets one pointer further,
    RIP-relative displacements re-aimed at the same target."""
    raw: bytes = getattr(insn, "raw")  # noqa: B009
    rva: int = getattr(insn, "rva")  # noqa: B009
    text = f"{getattr(insn, 'mnemonic')} {getattr(insn, 'op_str')}"  # noqa: B009
    ptr = 8 if arch == "x64" else 4
    m = re.search(r"\[(rsp|esp)(?: ([+-]) (0x[0-9a-f]+|\d+))?\]", text)
    if m:
        d = int(m.group(3), 0) if m.group(3) else 0
        d = -d if m.group(2) == "-" else d
        text = text[: m.start()] + f"[{m.group(1)} + {d + ptr:#x}]" + text[m.end() :]
        return assemble(text, arch, at)
    m = re.search(r"\[rip ([+-]) (0x[0-9a-f]+)\]", text)
    if m:
        d = int(m.group(2), 16) * (-1 if m.group(1) == "-" else 1)
        target = rva + len(raw) + d
        out = bytearray(raw)
        disp = target - (at + len(raw))
        off = len(raw) - 4 - _imm_size(raw, arch, rva)
        out[off : off + 4] = struct.pack("<i", disp)
        if disassemble(bytes(out), arch, at)[0].split(" ")[0] != text.split(" ")[0]:
            raise _Refused(f"cannot re-encode `{text}` for the stub")
        return bytes(out)
    return raw


def _imm_size(raw: bytes, arch: str, rva: int) -> int:
    import capstone

    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if arch == "x64" else capstone.CS_MODE_32)
    cs.detail = True
    insn = next(cs.disasm(raw, rva, 1))
    return len(raw) - insn.disp_offset - 4 if insn.disp_size == 4 else 0


def _reg_name(family: str, arch: str) -> str:
    if arch == "x64":
        return family
    return "e" + family[1:]


class Planner:
    def __init__(self, image: Image, scan: DriverScan, options: Options) -> None:
        self.image = image
        self.scan = scan
        self.options = options
        self.arch = image.arch
        self.caves = CaveSpace(find_caves(image))
        self.slack_ends: dict[str, int] = {}
        self.iat: dict[str, int] = {imp.name: slot for slot, imp in image.imports.items()}
        self.wrappers: tuple[Wrapper, ...] = ()
        self.param_of: dict[int, tuple[int, int]] = {}  # wrapper call RVA -> (wrapper called, tag parameter)

    # --- selection --------------------------------------------------------------------------------------------

    def run(self) -> Plan:
        suspects = {t & ~tags.PROTECTED_POOL for t in self.options.tags}
        if not suspects:
            raise PlanError("give the suspect tag with --tag")
        for t in self.options.tags:
            if tags.problems(t) and t & ~tags.PROTECTED_POOL != _NONE:
                raise TagError(f"tag {tags.hex_value(t)} breaks the tag rules: {'; '.join(tags.problems(t))}")
        untagged = "untagged" in self.options.split
        chosen = [
            s
            for s in self.scan.sites
            if s.role != apis.FREE and (_plain(s.tag_value) in suspects or (untagged and _untagged(s)))
        ]
        wrapper_sites, copies = self._wrapper_sites(suspects)
        {c.rva for c, _w in copies}
        chosen += [w for w in wrapper_sites if w.role != apis.FREE]
        if copies:
            # each caller of a fixed-tag wrapper gets its own copy; the wrapper's own site keeps the old tag
            inside = {w.site for _c, w in copies}
            chosen = [s for s in chosen if s.rva not in inside]
        if not chosen and not copies:
            used = sorted({s.tag for s in self.scan.sites if s.tag and s.role != apis.FREE})
            names = ", ".join(f"'{tags.display(t)}'" for t in sorted(suspects))
            raise TagError(
                f"{self.image.name} has no allocation site with {names}"
                + (f"; its constant tags are {', '.join(repr(u) for u in used)}" if used else "")
                + ("" if untagged else " (untagged ExAllocatePool sites need --split untagged)")
            )
        frees = [s for s in self.scan.sites if s.role == apis.FREE and _plain(s.tag_value) in suspects]
        frees += [w for w in wrapper_sites if w.role == apis.FREE]
        avoid = self.options.avoid
        for s in self.scan.sites:
            if s.tag_value:
                avoid.add(s.tag_value)
        for v in suspects:
            avoid.add(v)

        # Sites fed by one constant: one group (one new tag, edited once) unless `--split shared`.
        groups: dict[int, list[CallSite]] = defaultdict(list)
        singles: list[CallSite] = []
        for s in chosen:
            ts = s.tag_source
            shared = s.shared_with or ts.other_sources
            groupable = ts.kind == sm.IMM and ts.rva is not None and ts.imm_offset is not None and shared
            if groupable and "shared" not in self.options.split and not ts.other_sources:
                groups[ts.rva].append(s)  # type: ignore[index]
                continue
            singles.append(s)
        units: list[list[CallSite]] = [[s] for s in singles] + list(groups.values()) + [[c] for c, _w in copies]
        units.sort(key=lambda u: min(x.rva for x in u))

        new_tags: dict[int, int] = {}
        by_old: dict[int | None, list[list[CallSite]]] = defaultdict(list)
        for u in units:
            by_old[_plain(u[0].tag_value)].append(u)
        for old, us in sorted(by_old.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
            protected = any((x.tag_value or 0) & tags.PROTECTED_POOL for u in us for x in u)
            fresh = pick(len(us), prefix_of(old, self.options.prefix), avoid, protected)
            for u, t in zip(us, fresh):
                for x in u:
                    new_tags[x.rva] = t

        plans: list[SitePlan] = []
        by_rva = {s.rva: s for s in self.scan.sites}
        riding: set[int] = set()
        copy_of = {c.rva: w for c, w in copies}
        for u in units:
            if u[0].rva in copy_of and u[0].call == _COPY:
                plans.append(self._copy_plan(u[0], copy_of[u[0].rva], new_tags[u[0].rva]))
                continue
            unit_plans = self._plan_unit(u, new_tags[u[0].rva])
            plans.extend(unit_plans)
            if len(u) > 1 and unit_plans and unit_plans[0].strategy == model.IMM:
                # other sites fed by the edited constant (typically the matching frees) change with it
                members = {x.rva for x in u}
                for r in u[0].shared_with:
                    if r not in members and r in by_rva:
                        other = by_rva[r]
                        riding.add(r)
                        plans.append(
                            self._site_plan(
                                other,
                                new_tags[u[0].rva],
                                model.IMM,
                                f"its tag comes from the constant edited for site {u[0].rva:#x}, so it changes with it"
                                + (" (a free with the new tag: consistent)" if other.role == apis.FREE else ""),
                                (),
                                tuple(sorted(members)),
                            )
                        )
        frees = [s for s in frees if s.rva not in riding]
        free_plans: list[SitePlan] = []
        if "frees" in self.options.split:
            plans.extend(self._plan_free(s) for s in frees)
        else:
            free_plans = [
                self._site_plan(
                    s,
                    None,
                    model.REFUSED,
                    "left unchanged: frees with the old tag, which is harmless "
                    "unless the tag is protected or a checking kernel is in use; --split frees sets it to 0",
                )
                for s in frees
            ]
        self._widen_slack(plans)
        plans.sort(key=lambda p: p.rva)
        plan = Plan(
            driver=driver_identity(self.image),
            tags=tuple(sorted(self.options.tags)),
            sites=tuple(plans),
            free_sites=tuple(free_plans),
            options={
                "split": sorted(self.options.split),
                "prefix": self.options.prefix,
                "wrappers": [
                    {"rva": f"{w.rva:#x}", "name": w.name, "kind": w.kind, "api": w.api, "callers": len(w.calls)}
                    for w in self.wrappers
                ],
            },
        )
        model.check(plan)
        return plan

    # --- wrappers -----------------------------------------------------------------------------------------------

    def _wrapper_sites(self, suspects: set[int]) -> tuple[list[CallSite], list[tuple[CallSite, Wrapper]]]:
        """Calls of parameter wrappers that pass a suspect tag, and (with `--split wrappers`) the calls of fixed-tag
        wrappers whose tag is suspect, as call sites of their own."""
        self.wrappers = find_wrappers(self.image, self.scan)
        params: list[CallSite] = []
        copies: list[tuple[CallSite, Wrapper]] = []
        for w in self.wrappers:
            for c in w.calls:
                if w.kind == PARAM_WRAPPER and _plain(c.tag_value) in suspects:
                    site = _call_site(
                        c, w, "wrapper", f"passes the tag to {w.name or hex(w.rva)} (parameter {w.param})"
                    )
                    self.param_of[c.rva] = (w.rva if c.via is None else c.via, w.param or 0)
                    params.append(site)
                elif (
                    w.kind == FIXED_WRAPPER
                    and "wrappers" in self.options.split
                    and w.role == apis.ALLOC
                    and _plain(c.tag_value) in suspects
                ):
                    copies.append((_call_site(c, w, _COPY, f"calls {w.name or hex(w.rva)}, a fixed-tag wrapper"), w))
        from ..sites.scan import mark_shared

        # one constant may feed several wrapper calls (as it may feed several pool calls)
        return mark_shared(params), copies

    def _copy_plan(self, site: CallSite, wrapper: Wrapper, new: int) -> SitePlan:
        """This caller calls its own copy of the fixed-tag wrapper, the copy differing only in the tag."""
        try:
            code, text = self._wrapper_copy(wrapper, new, 0)
            cave = self.caves.take(len(code))
            if cave is None:
                raise _Refused(f"no code cave of {len(code)} bytes left for a copy of the wrapper")
            code, text = self._wrapper_copy(wrapper, new, cave.rva)
        except _Refused as e:
            return self._site_plan(site, new, model.REFUSED, f"{wrapper.name or hex(wrapper.rva)}: {e}")
        if cave.kind == "slack":
            self.slack_ends[cave.section] = max(self.slack_ends.get(cave.section, 0), cave.rva + len(code))
        rel = cave.rva - (site.rva + 5)
        redirect = site.raw[:1] + struct.pack("<i", rel)
        patches = (
            Patch(
                cave.rva,
                self.image.read(cave.rva, len(code)),
                code,
                f"stub: copy of {wrapper.name or hex(wrapper.rva)} with tag {tags.display(new)} for this caller",
            ),
            Patch(site.rva, site.raw, redirect, "call redirected to the wrapper's copy"),
        )
        return self._site_plan(
            site,
            new,
            model.STUB,
            f"own copy of the fixed-tag wrapper {wrapper.name or hex(wrapper.rva)}",
            patches,
            stub=(cave, code, text),
        )

    def _wrapper_copy(self, wrapper: Wrapper, new: int, at: int) -> tuple[bytes, tuple[str, ...]]:
        import capstone

        if wrapper.size > MAX_FIXED_SIZE:
            raise _Refused(f"the wrapper is {wrapper.size} bytes, too large to copy safely")
        f = self.image.function_at(wrapper.rva)
        if f is not None:
            unwind = self.image.mem
            u = _unwind_of(self.image, f.rva)
            if u is not None and unwind[u] >> 3 & 0x3:
                raise _Refused("the wrapper has an exception handler")
        body = bytearray(self.image.read(wrapper.rva, wrapper.size))
        lo, hi = wrapper.rva, wrapper.rva + wrapper.size
        cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if self.arch == "x64" else capstone.CS_MODE_32)
        cs.detail = True
        trampolines: dict[int, int] = {}  # IAT slot -> offset of its position-independent jump after the body
        tag_site = next(s for s in self.scan.sites if s.rva == wrapper.site).tag_source
        if tag_site.insn is None or tag_site.imm_offset is None:
            raise _Refused("the wrapper's tag is not an immediate")
        text = []
        for insn in cs.disasm(bytes(body), wrapper.rva):
            off = insn.address - lo
            text.append(f"{insn.mnemonic} {insn.op_str}".strip())
            relocated = self.image.relocated_in(insn.address, insn.size)
            if relocated:
                # x86 `call/jmp [IAT]`: the copy calls a position-independent jump placed after it instead
                slot_va = struct.unpack_from("<I", body, off + insn.size - 4)[0]
                slot = slot_va - self.image.preferred_base
                raw = bytes(body[off : off + insn.size])
                if raw[:2] not in (b"\xff\x15", b"\xff\x25") or insn.size != 6 or slot not in self.image.imports:
                    raise _Refused(f"`{insn.mnemonic} {insn.op_str}` uses an absolute address a copy cannot keep")
                if slot not in trampolines:
                    trampolines[slot] = len(body) + 12 * len(trampolines)
                target = at + trampolines[slot]
                op = b"\xe8" if raw[1] == 0x15 else b"\xe9"
                body[off : off + 6] = op + struct.pack("<i", target - (at + off + 5)) + b"\x90"
                continue
            if insn.disp_size == 4 and "rip" in insn.op_str:
                target = insn.address + insn.size + struct.unpack_from("<i", body, off + insn.disp_offset)[0]
                if lo <= target < hi:
                    raise _Refused("the wrapper takes its own address")
                struct.pack_into("<i", body, off + insn.disp_offset, target - (at + off + insn.size))
            elif (
                insn.group(capstone.CS_GRP_JUMP) or insn.group(capstone.CS_GRP_CALL)
            ) and insn.imm_size and insn.op_str.startswith("0x"):
                target = int(insn.op_str, 16)
                if not lo <= target < hi:
                    if insn.imm_size != 4:
                        raise _Refused(f"a short branch leaves the wrapper (`{insn.mnemonic} {insn.op_str}`)")
                    struct.pack_into("<i", body, off + insn.imm_offset, target - (at + off + insn.size))
        t = tag_site.insn.rva + tag_site.imm_offset - lo
        # the function's bounds may include alignment padding after its last instruction: leave it out
        end = 0
        for insn in cs.disasm(bytes(body), wrapper.rva):
            if insn.mnemonic not in ("nop", "int3") and not (
                insn.mnemonic == "lea" and insn.op_str in ("esi, [esi]", "esi, [esi + eiz]", "edi, [edi]")
            ):
                end = insn.address + insn.size - lo
        if trampolines:
            shift = len(body) - end
            trampolines = {k: v - shift for k, v in trampolines.items()}
            # trampoline targets were computed for the untrimmed body: re-aim the rel32s
            for insn in cs.disasm(bytes(body[:end]), wrapper.rva):
                o = insn.address - lo
                if body[o] in (0xE8, 0xE9) and insn.size == 5 and body[o + 5 : o + 6] == b"\x90":
                    old = at + o + 5 + struct.unpack_from("<i", body, o + 1)[0] - at
                    struct.pack_into("<i", body, o + 1, old - shift - (o + 5))
        body = body[:end]
        if not 0 <= t <= len(body) - 4:
            raise _Refused("the wrapper's tag instruction lies outside it")
        struct.pack_into("<I", body, t, new & 0xFFFFFFFF)
        for slot, pos in sorted(trampolines.items(), key=lambda kv: kv[1]):
            # call $+5; pop eax; jmp [eax + (slot - address of the pop)]; eax is free at a pool routine's entry
            body += _PIC + b"\xff\xa0" + struct.pack("<i", slot - (at + pos + 5))
        return bytes(body), tuple(disassemble(bytes(body), self.arch, at))

    # --- one unit (a site, or the sites of one shared constant) ------------------------------------------------

    def _plan_unit(self, unit: list[CallSite], new: int) -> list[SitePlan]:
        first = unit[0]
        ts = first.tag_source
        if len(unit) > 1:
            try:
                patch = self._imm_patch(first, new)
            except _Refused as e:
                return [self._site_plan(s, new, model.REFUSED, str(e)) for s in unit]
            others = ", ".join(f"{s.rva:#x}" for s in unit[1:])
            out = [
                self._site_plan(
                    first,
                    new,
                    model.IMM,
                    f"one constant feeds {len(unit)} sites ({first.rva:#x}, {others}): they share the new tag; "
                    "--split shared gives each its own through a stub",
                    (patch,),
                    tuple(s.rva for s in unit[1:]),
                )
            ]
            for s in unit[1:]:
                out.append(
                    self._site_plan(
                        s,
                        new,
                        model.IMM,
                        f"shares the constant edited for site {first.rva:#x}",
                        (),
                        tuple(x.rva for x in unit if x.rva != s.rva),
                    )
                )
            return out
        if ts.kind == sm.IMM and ts.imm_offset is not None and not first.shared_with and not ts.other_sources:
            try:
                return [
                    self._site_plan(
                        first, new, model.IMM, "tag immediate edited in place", (self._imm_patch(first, new),)
                    )
                ]
            except _Refused as e:
                reason = str(e)
                try:
                    return [self._stub_plan(first, new, f"{reason}; redirected through a stub instead")]
                except _Refused as e2:
                    return [self._site_plan(first, new, model.REFUSED, f"{reason}; {e2}")]
        why = {
            sm.IMM: "the constant feeds other sites too",
            sm.NONE: "untagged allocation, turned into the tagged routine",
        }.get(ts.kind, f"the tag is not a constant here ({ts.kind}: {ts.detail})")
        try:
            return [self._stub_plan(first, new, why)]
        except _Refused as e:
            return [self._site_plan(first, new, model.REFUSED, f"{why}; {e}")]

    def _plan_free(self, site: CallSite) -> SitePlan:
        ts = site.tag_source
        if ts.kind == sm.IMM and ts.imm_offset is not None and not site.shared_with and not ts.other_sources:
            try:
                return self._site_plan(
                    site,
                    0,
                    model.FREE_ZERO,
                    "frees with tag 0, so no tag check can fail for the retagged blocks",
                    (self._imm_patch(site, 0),),
                )
            except _Refused:
                pass
        try:
            p = self._stub_plan(site, 0, "free's tag set to 0 by a stub")
            return SitePlan(**{**p.__dict__, "strategy": model.FREE_ZERO})
        except _Refused as e:
            return self._site_plan(site, 0, model.REFUSED, f"cannot set the free's tag to 0: {e}")

    # --- in-place edit ------------------------------------------------------------------------------------------

    def _imm_patch(self, site: CallSite, new: int) -> Patch:
        ts = site.tag_source
        insn = ts.insn
        if insn is None or ts.imm_offset is None:
            raise _Refused("no tag immediate to edit")
        if self.image.relocated_in(insn.rva + ts.imm_offset, 4):
            raise _Refused(f"the tag bytes at {insn.rva + ts.imm_offset:#x} are covered by a base relocation")
        sec = self.image.section_at(insn.rva)
        if sec is not None and sec.discardable:
            note = " (INIT: only useful in a patched file)"
        else:
            note = ""
        try:
            new_bytes = retag(insn.raw, insn.text, ts.imm_offset, new, self.arch, insn.rva)
        except DisasmError as e:
            raise _Refused(str(e)) from e
        return Patch(insn.rva, insn.raw, new_bytes, f"tag immediate of `{insn.text}`{note}")

    # --- stubs ------------------------------------------------------------------------------------------------

    def _stub_plan(self, site: CallSite, new: int, why: str) -> SitePlan:
        api = apis.BY_NAME[site.api]
        target_api = api
        if not api.tagged:
            if api.tagged_equivalent is None or api.role == apis.FREE:
                raise _Refused(f"{api.name} takes no tag and has no tagged equivalent to call instead")
            target_api = apis.BY_NAME[api.tagged_equivalent]
            if target_api.name not in self.iat:
                raise _Refused(f"the driver does not import {target_api.name}, which the stub would call")
        shape = self._redirect_shape(site)
        code, text = self._stub_code(site, api, target_api, new, shape, cave_rva=0)
        cave = self.caves.take(len(code))
        if cave is None:
            raise _Refused(f"no code cave of {len(code)} bytes left (only int3 padding and section slack are used)")
        code, text = self._stub_code(site, api, target_api, new, shape, cave_rva=cave.rva)
        if cave.kind == "slack":
            self.slack_ends[cave.section] = max(self.slack_ends.get(cave.section, 0), cave.rva + len(code))
        original_cave = self.image.read(cave.rva, len(code))
        rel = cave.rva - (shape.rva + 5)
        opcode = b"\xe9" if shape.kind == "tail" else b"\xe8"
        replacement = opcode + struct.pack("<i", rel) + _nops(len(shape.replaced) - 5)
        what = f"{site.call} call redirected to the stub"
        if shape.displaced:
            what += f" (with {len(shape.displaced_text)} displaced instruction(s): {'; '.join(shape.displaced_text)})"
        patches = [
            Patch(cave.rva, original_cave, code, f"stub for site {site.rva:#x} in {cave.kind} of {cave.section}"),
            Patch(shape.rva, shape.replaced, replacement, what, shape.alternatives),
        ]
        patches += self._reloc_neutralisation(shape.rva, len(shape.replaced))
        return self._site_plan(site, new, model.STUB, why, tuple(patches), stub=(cave, code, text))

    def _redirect_shape(self, site: CallSite) -> _Shape:
        """Which bytes the redirect replaces, and how the stub must continue."""
        raw = site.raw
        if site.call in (sm.THUNK, "wrapper"):
            if raw[:1] not in (b"\xe8", b"\xe9") or len(raw) != 5:
                raise _Refused("only a direct call or jump to the wrapper can be redirected")
            target = site.rva + 5 + struct.unpack_from("<i", raw, 1)[0]
            return _Shape(site.rva, raw, (), "tail" if raw[0] == 0xE9 else "call", thunk=target)
        if site.call == sm.REGISTER_CALL:
            return self._displaced_shape(site)
        if site.call == sm.TAIL:
            return _Shape(site.rva, raw, self._x86_alt(raw), "tail")
        if len(raw) == 7 and raw[0] == 0x48:
            after = self.image.read(site.rva + 7, 5)
            if after == _ICO_NOP:
                # import-call-optimisation: in memory the loader may have made it `mov r10,[IAT]; call rel32`
                alt = "4c8b15" + raw[3:7].hex() + "e8????????"
                return _Shape(site.rva, raw + after, (alt,), "call")
        if len(raw) == 12 and raw[:3] == b"\x4c\x8b\x15":
            raise _Refused("resident import-call form: make the plan from the driver file")
        return _Shape(site.rva, raw, self._x86_alt(raw), "call")

    def _displaced_shape(self, site: CallSite) -> _Shape:
        """`call reg` is 2-3 bytes: take the instructions just before it into the stub to make room for a call."""
        from ..sites.flow import FunctionCode
        from ..sites.semantics import parse_operands

        text = disassemble(site.raw, self.arch, site.rva)
        ops = parse_operands(text[0].split(" ", 1)[1] if text and " " in text[0] else "")
        if not ops or ops[0].kind != "reg" or ops[0].reg is None:
            raise _Refused("an indirect call through memory cannot be redirected")
        f = self.image.function_at(site.rva)
        begin = f.rva if f else (site.function_rva or site.rva)
        ranges = f.ranges if f else ((begin, site.rva + site.size),)
        code = FunctionCode(self.image.mem, begin, ranges, self._cs())
        k = code.at(site.rva)
        if k is None:
            raise _Refused("the call is not on an instruction boundary of its function")
        span = [code.insns[k]]
        j = k
        while sum(i.size for i in span) < 5:
            if code.branch_preds.get(j) or j == 0:
                raise _Refused("a branch lands between the call and the instructions before it; no room to redirect")
            prev = code.insns[j - 1]
            if prev.rva + prev.size != code.insns[j].rva or not _movable(prev, self.arch):
                raise _Refused(f"`{prev.mnemonic} {prev.op_str}` before the register call cannot be moved to a stub")
            span.insert(0, prev)
            j -= 1
        displaced = span[:-1]
        reg = _reg_name(ops[0].reg, self.arch)
        start = span[0].rva
        replaced = b"".join(i.raw for i in span)
        if self.image.relocated_in(start, len(replaced)):
            raise _Refused("a relocated field lies in the instructions to displace")
        return _Shape(
            start,
            replaced,
            (),
            "call",
            displaced_insns=tuple(displaced),
            jump_reg=reg,
            displaced_text=tuple(f"{i.mnemonic} {i.op_str}".strip() for i in displaced),
        )

    def _cs(self) -> object:
        import capstone

        return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if self.arch == "x64" else capstone.CS_MODE_32)

    def _x86_alt(self, raw: bytes) -> tuple[str, ...]:
        # x86 `call/jmp [abs32]`: the loader relocates abs32, so resident memory holds another address there.
        if self.arch == "x86" and len(raw) == 6 and raw[0] == 0xFF:
            return (raw[:2].hex() + "????????",)
        return ()

    def _reloc_neutralisation(self, rva: int, size: int) -> list[Patch]:
        """In the patched file, relocation entries inside a redirected call would corrupt the new rel32: make them
        IMAGE_REL_BASED_ABSOLUTE (a no-op). Resident memory was relocated already and needs nothing."""
        out = []
        for i, r in enumerate(self.image.relocations):
            if rva <= r < rva + size:
                at = self.image.relocation_entries[i]
                entry = self.image.read(at, 2)
                value = struct.unpack("<H", entry)[0]
                out.append(
                    Patch(at, entry, struct.pack("<H", value & 0x0FFF), "base relocation disabled", (), FILE_ONLY)
                )
            elif r > rva + size:
                break
        return out

    def _stub_code(
        self,
        site: CallSite,
        api: apis.PoolApi,
        target_api: apis.PoolApi,
        new: int,
        shape: _Shape,
        cave_rva: int,
    ) -> tuple[bytes, tuple[str, ...]]:
        thunk = shape.thunk
        ptr = self.image.ptr_size
        lines: list[str] = list(shape.displaced_text)
        if shape.jump_reg is not None:
            # displaced instructions, the new tag, then on through the register the call used
            moved = b""
            for insn in shape.displaced_insns:
                moved += _moved(insn, self.arch, cave_rva + len(moved))
            where = target_api.tag_location(self.arch)
            sp_name = "rsp" if self.arch == "x64" else "esp"
            setter = (
                f"mov {_REG32[where]}, {new:#x}"
                if isinstance(where, str)
                else f"mov dword ptr [{sp_name} + {(where or 0) + ptr:#x}], {new:#x}"
            )
            tail = assemble(f"{setter}; jmp {shape.jump_reg}", self.arch, cave_rva + len(moved))
            shown = disassemble(moved, self.arch, cave_rva)
            return moved + tail, (*shown, setter, f"jmp {shape.jump_reg}")
        lines = []
        where = target_api.tag_location(self.arch)
        if site.rva in self.param_of:
            # a call of a parameter wrapper: the tag goes where the wrapper reads that parameter
            p = self.param_of[site.rva][1]
            where = ("rcx", "rdx", "r8", "r9")[p - 1] if self.arch == "x64" and p <= 4 else ptr * (p - 1)
        untagged = not api.tagged
        if self.arch == "x64":
            if isinstance(where, str):
                lines.append(f"mov {_REG32[where]}, {new:#x}")
            elif where is not None:
                lines.append(f"mov dword ptr [rsp + {where + ptr:#x}], {new:#x}")
            code = assemble("; ".join(lines), self.arch, cave_rva)
            if thunk is not None:
                jmp = assemble(f"jmp {thunk:#x}", self.arch, cave_rva + len(code))
                lines.append(f"jmp {thunk:#x}")
            else:
                slot = self.iat[target_api.name] if untagged else self._slot_of(site)
                disp = slot - (cave_rva + len(code) + 6)
                jmp = b"\xff\x25" + struct.pack("<i", disp)
                lines.append(f"jmp qword ptr [rip + {disp:#x}]    ; [IAT {target_api.name}]")
            code += jmp
            return code, tuple(lines)
        # x86: position-independent (no absolute address that would need a base relocation); eax is free at the
        # call of every pool routine (not an argument, and the routine's return value or dead).
        if untagged:
            assert thunk is None
            slot = self.iat[target_api.name]
            pre = "call $+5; pop eax"
            body = [
                f"push {new:#x}",
                "push dword ptr [esp + 0xc]",
                "push dword ptr [esp + 0xc]",
            ]
            head = _PIC
            mid = assemble("; ".join(body), self.arch, cave_rva + len(head))
            disp = slot - (cave_rva + 5)
            tail_call = b"\xff\x90" + struct.pack("<i", disp)  # call dword ptr [eax + disp]
            ret = b"\xc2" + struct.pack("<H", api.arg_bytes_x86)
            code = head + mid + tail_call + ret
            lines = [
                *pre.split("; "),
                *body,
                f"call dword ptr [eax + {disp:#x}]    ; [IAT {target_api.name}]",
                f"ret {api.arg_bytes_x86:#x}",
            ]
            return code, tuple(lines)
        assert isinstance(where, int)
        lines.append(f"mov dword ptr [esp + {where + ptr:#x}], {new:#x}")
        code = assemble(lines[0], self.arch, cave_rva)
        if thunk is not None:
            code += assemble(f"jmp {thunk:#x}", self.arch, cave_rva + len(code))
            lines.append(f"jmp {thunk:#x}")
            return code, tuple(lines)
        slot = self._slot_of(site)
        pic = _PIC
        base_at = cave_rva + len(code) + 5
        disp = slot - base_at
        code += pic + b"\xff\xa0" + struct.pack("<i", disp)  # jmp dword ptr [eax + disp]
        lines += ["call $+5", "pop eax", f"jmp dword ptr [eax + {disp:#x}]    ; [IAT {api.name}]"]
        return code, tuple(lines)

    def _slot_of(self, site: CallSite) -> int:
        return self.iat[site.api]

    def _widen_slack(self, plans: list[SitePlan]) -> None:
        """A stub in a section's slack must be inside VirtualSize in the patched file (file-only header edit)."""
        for name, end in self.slack_ends.items():
            sec = next(s for s in self.image.sections if s.name == name)
            at = sec.header_offset + 8
            old = self.image.read(at, 4)
            new = struct.pack("<I", end - sec.rva)
            patch = Patch(at, old, new, f"VirtualSize of {name} widened over its stubs", (), FILE_ONLY)
            for i, p in enumerate(plans):
                if p.strategy in (model.STUB, model.FREE_ZERO) and p.stub_rva is not None:
                    cave_sec = self.image.section_at(p.stub_rva)
                    if cave_sec is not None and cave_sec.name == name:
                        plans[i] = SitePlan(**{**p.__dict__, "patches": (*p.patches, patch)})
                        break

    def _site_plan(
        self,
        site: CallSite,
        new: int | None,
        strategy: str,
        reason: str,
        patches: tuple[Patch, ...] = (),
        shared_with: tuple[int, ...] = (),
        stub: tuple[Cave, bytes, tuple[str, ...]] | None = None,
    ) -> SitePlan:
        if new is not None and site.tag_value is not None and site.tag_value & tags.PROTECTED_POOL and new:
            new |= tags.PROTECTED_POOL
        if site.discardable:
            reason += "; the site is in INIT, which is discarded after DriverEntry (live patching cannot reach it)"
        return SitePlan(
            rva=site.rva,
            api=site.api,
            role=site.role,
            function=site.function_name or (f"sub_{site.function_rva:x}" if site.function_rva is not None else None),
            old_tag=site.tag_value,
            new_tag=new,
            strategy=strategy,
            reason=reason,
            patches=patches,
            stub_rva=stub[0].rva if stub else None,
            stub=stub[1] if stub else b"",
            stub_text=stub[2] if stub else (),
            shared_with=shared_with,
            section=site.section,
        )


_NONE = int.from_bytes(b"None", "little")
_COPY = "wrapper-copy"


def _call_site(c: WrapperCall, w: Wrapper, call: str, note: str) -> CallSite:
    return CallSite(
        rva=c.rva,
        size=c.size,
        raw=c.raw,
        api=w.api,
        role=w.role,
        call=call,
        function_rva=c.function_rva,
        function_name=c.function_name,
        section=c.section,
        tag_source=c.tag_source,
        notes=(note,),
    )


def _unwind_of(image: Image, begin: int) -> int | None:
    """The UNWIND_INFO RVA of the .pdata entry that starts at `begin`."""
    for sec in image.sections:
        if sec.name == ".pdata":
            data = image.read(sec.rva, sec.size - sec.size % 12)
            return next((u for b, _e, u in struct.iter_unpack("<III", data) if b == begin), None)
    return None


def _plain(v: int | None) -> int | None:
    return None if v is None else v & ~tags.PROTECTED_POOL


def _untagged(site: CallSite) -> bool:
    return site.tag_source.kind == sm.NONE and site.role == apis.ALLOC


def driver_identity(image: Image) -> Driver:
    """What a plan records to recognise the driver it was made for."""
    return Driver(
        path=str(Path(image.path)),
        name=Path(image.path).name,
        sha256=image.sha256,
        arch=image.arch,
        timestamp=image.timestamp,
        size_of_image=image.size_of_image,
        checksum=image.checksum,
        image_base=image.preferred_base,
    )


def make_plan(image: Image, scan: DriverScan, options: Options) -> Plan:
    """A plan for `image`.

    Raises:
        TagError: no site uses the tag, or a tag breaks the rules.
        PlanError: the plan would be inconsistent (overlapping patches).
    """
    if image.mapped:
        raise PlanError("make the plan from the driver file, not from a memory image")
    return Planner(image, scan, options).run()


def describe(plan: Plan) -> list[str]:
    """pooltag.txt lines for the new tags, so PoolMon /g and !poolused name each site."""
    out = []
    for s in plan.sites:
        if s.new_tag is None or s.strategy == model.REFUSED or s.role == apis.FREE:
            continue
        fn = f" in {s.function}" if s.function else ""
        out.append(f"{tags.display(s.new_tag)} - {plan.driver.name} - site {s.rva:#x}{fn} ({s.api})")
    return out


__all__ = ["SPLITS", "Options", "describe", "disassemble", "make_plan"]
