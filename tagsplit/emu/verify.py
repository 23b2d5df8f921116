"""`tagsplit verify`: run the patched machine code and check that every site now passes its new tag.

For each planned site the original and the patched image run from the same starting point with the same made-up
register values, the pool routines hooked. The patched run must reach the same routine (or, for an untagged
ExAllocatePool, its tagged equivalent) with the same arguments except for the tag, which must be the planned new
tag, and must then arrive back at the instruction after the original call with the same stack pointer and
return value. Sites the plan does not change must behave exactly as before, and no byte outside the planned
ranges may differ. The patched image is built the way `apply --to-file` builds it (relocation entries disabled,
VirtualSize widened, checksum recomputed) and then loaded like the kernel would, so this also checks the file route.
"""

from __future__ import annotations

from dataclasses import dataclass

import capstone
import unicorn

from .. import apis
from ..errors import PlanError
from ..image import Image, parse
from ..plan.model import CODE, Plan, SitePlan
from ..sites import model as sm
from ..sites.flow import FunctionCode
from ..sites.model import CallSite
from ..sites.scan import scan_image
from ..targets.file import patched_file_bytes
from .machine import BASE, Call, Machine, Stop
from .mapping import map_image

MAX_STEPS = 5000
_FAKE_ALLOC = 0x5A5A0000


@dataclass(frozen=True)
class Check:
    rva: int
    ok: bool
    detail: str


@dataclass(frozen=True)
class Observed:
    api: str
    args: tuple[int, ...]  # every argument slot, tag slot included
    tag: int | None
    after_sp: int
    after_ax: int


def _tag_slot(api: apis.PoolApi, arch: str) -> tuple[str, int] | None:
    where = api.tag_location(arch)
    if where is None:
        return None
    if isinstance(where, str):
        return ("reg", ("rcx", "rdx", "r8", "r9").index(where))
    # stack: call-time offset; the Call records slots above the return address
    ptr = 8 if arch == "x64" else 4
    return ("stack", where // ptr)


def _observe(
    machine: Machine,
    start: int,
    site: CallSite,
    site_end: int,
    seed: int,
    forced: dict[int, int] | None = None,
    entry: int | None = None,
) -> Observed | None:
    """Run from `start`; the first pool call made after execution reaches the site is the site's call.

    `forced` maps conditional branches (RVA) to the RVA execution must continue at: a directed run along one
    control-flow path, for sites that made-up inputs do not reach on their own.
    """
    machine.calls.clear()
    machine.prepare(seed)
    state = {"at_site": 0, "hit": 0}
    entry = site.rva if entry is None else entry
    site_va = machine.base + entry
    hooks = []

    def on_branch(uc: unicorn.Uc, address: int, size: int, data: object) -> None:
        if not state["at_site"] and forced:
            uc.reg_write(machine.pc_reg, machine.base + forced[address - machine.base])

    for rva in forced or {}:
        hooks.append(
            machine.uc.hook_add(unicorn.UC_HOOK_CODE, on_branch, begin=machine.base + rva, end=machine.base + rva)
        )

    def on_site(uc: object, address: int, size: int, data: object) -> None:
        state["at_site"] = 1

    def pool_handler(m: Machine, call: Call) -> int:
        if state["at_site"]:
            state["hit"] = len(m.calls)
            m.stop()
        return _FAKE_ALLOC

    hook = machine.uc.hook_add(unicorn.UC_HOOK_CODE, on_site, begin=site_va, end=site_va)
    for name in machine.address_of:
        if apis.lookup(name[1]) is not None:
            machine.handlers[name[1]] = pool_handler
    try:
        machine.run(machine.base + start, count=MAX_STEPS)
    except (RuntimeError, Stop):
        return None
    finally:
        machine.uc.hook_del(hook)
        for h in hooks:
            machine.uc.hook_del(h)
    if not state["hit"]:
        return None
    call = machine.calls[state["hit"] - 1]
    api = apis.lookup(call.name)
    if api is None:
        return None
    if site.call in (sm.TAIL, "wrapper-tail") or (site.call == sm.THUNK and site.raw[:1] == b"\xe9"):
        # a tail jump returns to the function's caller: compare where the routine would return to
        after_sp, after_ax = call.sp, call.ret
    else:
        pc = int(machine.uc.reg_read(machine.pc_reg))
        try:
            if pc != machine.base + site_end:  # unicorn would run a whole loop back to `until` otherwise
                machine.run(pc, until=machine.base + site_end, count=20_000)
        except RuntimeError:
            return None
        if int(machine.uc.reg_read(machine.pc_reg)) != machine.base + site_end:
            return None
        after_sp, after_ax = machine.sp, machine.reg("rax")
    # only the routine's own arguments: above them lie the caller's locals, which may hold a copy of the tag
    if machine.arch == "x64":
        args = call.regs[: min(4, api.nargs)] + call.stack[4 : api.nargs]
    else:
        args = call.stack[: api.arg_bytes_x86 // 4]
    slot = _tag_slot(api, machine.arch)
    tag = None
    if slot is not None:
        kind, i = slot
        tag = (call.regs[i] if kind == "reg" else call.stack[i]) & 0xFFFFFFFF
    return Observed(call.name, args, tag, after_sp, after_ax)


def _starts(code: FunctionCode, site: CallSite) -> list[int]:
    """Where to start running: the tag instruction, the start of the call's block, the function entry."""
    out: list[int] = []
    ts = site.tag_source
    if ts.rva is not None:
        out.append(ts.rva)
    k = code.at(site.rva)
    if k is not None:
        j = k
        while j > 0 and not code.branch_preds.get(j) and code.predecessors(j) == [j - 1]:
            j -= 1
        out.append(code.insns[j].rva)
        out.append(site.rva)
    out.append(code.entry)
    return list(dict.fromkeys(out))


def _path(code: FunctionCode, start: int, goal: int) -> dict[int, int] | None:
    """Conditional branches to force, and where, so that a run from `start` follows a CFG path to `goal`."""
    a, b = code.at(start), code.at(goal)
    if a is None or b is None:
        return None
    succ: dict[int, list[int]] = {}
    for k in range(len(code.insns)):
        for p in code.predecessors(k):
            succ.setdefault(p, []).append(k)
    prev: dict[int, int] = {a: a}
    queue = [a]
    while queue and b not in prev:
        nxt = []
        for k in queue:
            for t in succ.get(k, ()):
                if t not in prev:
                    prev[t] = k
                    nxt.append(t)
        queue = nxt
    if b not in prev:
        return None
    forced: dict[int, int] = {}
    k = b
    while k != a:
        p = prev[k]
        insn = code.insns[p]
        if insn.mnemonic.startswith("j") and insn.mnemonic != "jmp":
            forced[insn.rva] = code.insns[k].rva
        k = p
    return forced


def _compare(orig: Observed, new: Observed, api: apis.PoolApi, arch: str, site_plan: SitePlan | None) -> str:
    """Empty when the patched run is right; otherwise what differs."""
    if new.after_sp != orig.after_sp:
        return f"stack pointer after the call differs ({new.after_sp:#x} vs {orig.after_sp:#x})"
    if new.after_ax != orig.after_ax:
        return "return value differs"
    if site_plan is None:
        return "" if (new.api, new.args) == (orig.api, orig.args) else "an unchanged site behaves differently"
    if not api.tagged and api.tagged_equivalent:
        if new.api != api.tagged_equivalent:
            return f"reached {new.api}, expected {api.tagged_equivalent}"
        n = api.nargs if arch == "x64" else api.arg_bytes_x86 // 4
        same = new.args[:n] == orig.args[:n]
        if not same:
            return "pool type or size differs"
    else:
        if new.api != orig.api:
            return f"reached {new.api}, expected {orig.api}"
        slot = _tag_slot(api, arch)
        skip = slot[1] if slot else -1  # x64: regs then stack[4:], so a stack slot i sits at index i
        for i, (a, b) in enumerate(zip(orig.args, new.args)):
            if i != skip and a != b:
                return f"argument slot {i} differs ({b:#x} vs {a:#x})"
    want = site_plan.new_tag
    if want is not None and new.tag != want & 0xFFFFFFFF:
        return f"tag is {new.tag if new.tag is None else hex(new.tag)}, plan says {want:#010x}"
    return ""


def verify(plan: Plan, image: Image, data: bytes) -> list[Check]:
    """Run every planned site (and every unchanged one) in the original and the patched image.

    Raises:
        PlanError: the plan does not belong to this driver.
    """
    if plan.driver.sha256 != image.sha256:
        raise PlanError(f"{image.name} is not the build the plan was made for (sha256 differs)")
    base = BASE[image.arch]
    patched_file = patched_file_bytes(plan, image, data)
    patched_image = parse(patched_file, image.path + " (patched)")
    orig_machine = Machine(image, base)
    patched_machine = Machine(patched_image, base, memory=None)
    checks: list[Check] = []

    # file route and live route must give the same resident code
    live = bytearray(map_image(image, base, orig_machine._resolve))
    for p in plan.patches(CODE):
        live[p.rva : p.end] = p.replacement
    from_file = map_image(patched_image, base, patched_machine._resolve)
    file_only = {r for p in plan.patches() if p.scope != CODE for r in range(p.rva, p.end)}
    reloc = next((s for s in image.sections if s.name.lower() == ".reloc"), None)
    diffs = [
        i
        for i in range(len(live))
        if live[i] != from_file[i]
        and i not in file_only
        and not (reloc and reloc.rva <= i < reloc.end)
        and not (0x40 <= i < 0x400)  # header: checksum and VirtualSize
    ]
    checks.append(
        Check(
            -1,
            not diffs,
            "file and live routes give the same resident code"
            if not diffs
            else f"file and live routes differ at {', '.join(hex(d) for d in diffs[:5])}",
        )
    )
    planned = {r for p in plan.patches() for r in range(p.rva, p.end)}
    orig_map = map_image(image, base, orig_machine._resolve)
    outside = [i for i in range(len(live)) if live[i] != orig_map[i] and i not in planned]
    checks.append(
        Check(
            -1,
            not outside,
            "no byte outside the planned ranges changed"
            if not outside
            else f"bytes changed outside the plan at {', '.join(hex(d) for d in outside[:5])}",
        )
    )

    scan = scan_image(image)
    by_rva = {s.rva: s for s in scan.sites}
    plans = {s.rva: s for s in plan.sites if s.strategy != "refused"}
    codes: dict[int, FunctionCode] = {}
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if image.arch == "x64" else capstone.CS_MODE_32)
    for site in scan.sites:
        sp = plans.get(site.rva)
        if site.discardable and sp is None:
            continue
        api = apis.BY_NAME[site.api]
        if site.function_rva is None:
            continue
        f = image.function_at(site.rva)
        if f is not None:
            ranges = f.ranges
        else:
            ends = [x.rva + x.size for x in scan.sites if x.function_rva == site.function_rva]
            ranges = ((site.function_rva, max(ends)),)
        code = codes.get(site.function_rva)
        if code is None:
            code = codes[site.function_rva] = FunctionCode(image.mem, site.function_rva, ranges, cs)
        result = _check_site(orig_machine, patched_machine, code, site, sp, api, image.arch)
        if sp is not None or not result.ok:
            checks.append(result)
    for rva, sp in plans.items():
        if rva in by_rva:
            continue
        # a call of one of the driver's own allocation wrappers (split at the caller)
        pseudo = _caller_site(image, sp, plans)
        fn = image.function_at(rva)
        if pseudo is None or (fn is None and pseudo.function_rva is None):
            checks.append(Check(rva, False, "planned site is not a call in the driver"))
            continue
        entry = fn.rva if fn is not None else (pseudo.function_rva or rva)
        span: tuple[tuple[int, int], ...] = fn.ranges if fn is not None else ((entry, rva + pseudo.size),)
        code = FunctionCode(image.mem, entry, span, cs)
        checks.append(_check_site(orig_machine, patched_machine, code, pseudo, sp, apis.BY_NAME[sp.api], image.arch))
    return checks


def _caller_site(image: Image, sp: SitePlan, plans: dict[int, SitePlan]) -> CallSite | None:
    """A plan site that is not a pool call of its own (a wrapper's caller), as a CallSite to run and check."""
    from ..sites.model import Instruction, TagSource
    from ..sites.refs import FunctionStarts

    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if image.arch == "x64" else capstone.CS_MODE_32)
    insn = next(cs.disasm_lite(image.read(sp.rva, 16), sp.rva, 1), None)
    if insn is None or insn[2] not in ("call", "jmp"):
        return None
    raw = image.read(sp.rva, insn[1])
    source = TagSource(sm.COMPUTED, detail="set inside the wrapper")
    group = [sp] + [plans[r] for r in sp.shared_with if r in plans]
    owner = next((g for g in group if g.strategy == "imm" and g.patches), None)
    if sp.strategy == "imm" and owner is not None:
        p = owner.patches[0]
        text = next(cs.disasm_lite(p.original, p.rva, 1))
        off = next(i for i in range(len(p.original)) if p.original[i] != p.replacement[i])
        source = TagSource(
            sm.IMM, value=sp.old_tag, insn=Instruction(p.rva, p.original, f"{text[2]} {text[3]}"), imm_offset=off
        )
    fn = image.function_at(sp.rva)
    if fn is not None:
        entry: int | None = fn.rva
    else:
        b = FunctionStarts(image).bounds(sp.rva)
        entry = b[0] if b else None
    call = "wrapper-tail" if raw[:1] == b"\xe9" else "wrapper"
    return CallSite(
        rva=sp.rva,
        size=len(raw),
        raw=raw,
        api=sp.api,
        role=sp.role,
        call=call,
        function_rva=entry,
        function_name=sp.function,
        section=sp.section,
        tag_source=source,
    )


def _check_site(
    orig: Machine,
    patched: Machine,
    code: FunctionCode,
    site: CallSite,
    sp: SitePlan | None,
    api: apis.PoolApi,
    arch: str,
) -> Check:
    site_end = site.rva + site.size
    entry = site.rva
    if sp is not None:
        for p in sp.patches:
            if p.rva <= site.rva < p.end:
                # a redirect may also cover the 5-byte NOP after the call, or instructions moved into the stub
                site_end = max(site_end, p.end)
                entry = p.rva
    ts = site.tag_source
    in_place = ts.kind == sm.IMM and ts.value is not None
    attempts: list[tuple[int, int, dict[int, int] | None]] = [
        (start, seed, None) for start in _starts(code, site) for seed in (1, 2, 3)
    ]
    for start in _starts(code, site):
        path = _path(code, start, site.rva)
        if path is not None:
            attempts.append((start, 1, path))
    for start, seed, forced in attempts:
        if in_place and ts.rva is not None and start > ts.rva and ts.rva < site.rva:
            continue  # the constant must be set by the run itself
        if start > entry and start <= site.rva:
            start = entry
        a = _observe(orig, start, site, site_end, seed, forced, entry)
        if a is None or (in_place and a.tag != (ts.value or 0) & 0xFFFFFFFF):
            continue
        b = _observe(patched, start, site, site_end, seed, forced, entry)
        if b is None:
            return Check(site.rva, False, f"from {start:#x} the patched code never came back to {site_end:#x}")
        if sp is None:
            if a.tag != b.tag or a.args != b.args or a.api != b.api:
                return Check(site.rva, False, "a site the plan leaves alone behaves differently")
            return Check(site.rva, True, "unchanged")
        problem = _compare(a, b, api, arch, sp)
        if problem:
            return Check(site.rva, False, f"from {start:#x}: {problem}")
        old = "none" if a.tag is None else f"{a.tag:#010x}"
        return Check(site.rva, True, f"from {start:#x}: {b.api} gets tag {b.tag:#010x} (was {old})")
    if sp is None:
        return Check(site.rva, True, "unchanged (not reachable from a simple start; bytes untouched)")
    return Check(site.rva, False, "could not run the site from its tag instruction, block or function entry")
