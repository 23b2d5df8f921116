"""Apply and revert through PykdTarget against the pykd stand-in (tagsplit.emu.pykd_standin), on x64 and x86 drivers.

Plans are built by hand from scan results (one `imm` patch per tag immediate, plus a multi-patch `stub` site), then
round-tripped through the plan JSON, so these tests do not depend on the planner. The helpers here are shared with
test_windbg_script.py and test_live_imports.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

from tagsplit import live
from tagsplit.emu.pykd_standin import PykdStandIn, SimulatedCrash
from tagsplit.errors import PatchConflictError, PlanError, TargetError, TargetReadError, TargetWriteError
from tagsplit.image import Image, load
from tagsplit.plan.make import driver_identity
from tagsplit.plan.model import Driver, Patch, Plan, SitePlan, dumps, from_json
from tagsplit.sites import scan_image
from tagsplit.targets.pykd import UNAVAILABLE, PykdTarget, TargetUnavailableError

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "testbins" / "bin"
X64 = [BIN / "sample_clang_x64.sys", ROOT / "tagsplit" / "data" / "sample_x64.sys"]
X86 = [BIN / "sample_clang_x86.sys", BIN / "patterns_gcc_x86_O2.sys"]
DRIVERS = X64 + X86


# --- plans by hand -------------------------------------------------------------------------------------------


def new_tag(i: int) -> int:
    return int.from_bytes(b"Tq" + f"{i:02d}".encode(), "little")


def driver_of(image: Image) -> Driver:
    return driver_identity(image)


def roundtrip(plan: Plan) -> Plan:
    return from_json(json.loads(dumps(plan)))


def imm_sites(image: Image, *, include_discardable: bool = False, first_tag: int = 0) -> list[SitePlan]:
    """One `imm` site per distinct tag immediate (a shared immediate is patched once)."""
    sites: list[SitePlan] = []
    seen: set[int] = set()
    for cs in scan_image(image).sites:
        ts = cs.tag_source
        if ts.kind != "imm" or ts.imm_offset is None or ts.insn is None or ts.insn.rva in seen:
            continue
        sec = image.section_at(ts.insn.rva)
        if sec is not None and sec.discardable and not include_discardable:
            continue  # INIT is gone once the driver is loaded
        seen.add(ts.insn.rva)
        tag = new_tag(first_tag + len(sites))
        raw = ts.insn.raw
        off = ts.imm_offset
        repl = raw[:off] + tag.to_bytes(4, "little") + raw[off + 4 :]
        sites.append(
            SitePlan(
                rva=cs.rva,
                api=cs.api,
                role=cs.role,
                function=cs.function_name,
                old_tag=ts.value,
                new_tag=tag,
                strategy="imm",
                reason="hand-made test plan",
                patches=(Patch(ts.insn.rva, raw, repl, f"tag immediate of site {cs.rva:#x}"),),
                section=cs.section,
            )
        )
    return sites


def make_plan(image: Image, sites: list[SitePlan]) -> Plan:
    old = sorted({s.old_tag for s in sites if s.old_tag is not None})
    return roundtrip(Plan(driver=driver_of(image), tags=tuple(old), sites=tuple(sites)))


def imm_plan(image: Image, **kw: Any) -> Plan:
    return make_plan(image, imm_sites(image, **kw))


def padding(image: Image, size: int, skip: int = 0) -> int:
    """RVA of a 16-aligned run of `size` CC or 00 bytes in a resident code section (the `skip`-th such slot)."""
    for sec in image.code_sections():
        if sec.discardable or sec.pageable:
            continue
        for m in re.finditer(rb"(\xcc{%d,}|\x00{%d,})" % (size + 15, size + 15), image.mem[sec.rva : sec.end]):
            start = sec.rva + m.start()
            rva = (start + 15) & ~15
            while rva + size <= sec.rva + m.end():
                if skip == 0:
                    return rva
                skip -= 1
                rva += 16 * ((size + 15) // 16)
    raise AssertionError(f"{image.name}: no padding of {size} bytes")


def stub_site(image: Image, tag: int) -> SitePlan:
    """An x64 `stub` site: the stub (mov r8d, tag; jmp [IAT]) in code padding, and the `call [IAT]` redirected."""
    assert image.arch == "x64"
    for cs in scan_image(image).sites:
        if cs.role == "alloc" and cs.call == "direct" and cs.raw[:2] == b"\xff\x15":
            break
    else:
        raise AssertionError(f"{image.name}: no direct `call [rip+IAT]` allocation site")
    slot = cs.rva + 6 + struct.unpack_from("<i", cs.raw, 2)[0]
    stub_rva = padding(image, 12)
    stub = b"\x41\xb8" + tag.to_bytes(4, "little") + b"\xff\x25" + struct.pack("<i", slot - (stub_rva + 12))
    redirect = b"\xe8" + struct.pack("<i", stub_rva - (cs.rva + 5)) + b"\x90"
    return SitePlan(
        rva=cs.rva,
        api=cs.api,
        role=cs.role,
        function=cs.function_name,
        old_tag=cs.tag_value,
        new_tag=tag,
        strategy="stub",
        reason="hand-made test plan",
        patches=(
            Patch(stub_rva, image.mem[stub_rva : stub_rva + 12], stub, f"stub for site {cs.rva:#x}"),
            Patch(cs.rva, cs.raw[:6], redirect, f"call to the stub at {stub_rva:#x}"),
        ),
        stub_rva=stub_rva,
        stub=stub,
        stub_text=(f"mov r8d, {tag:#x}", f"jmp qword ptr [rip+{slot:#x}]"),
        section=cs.section,
    )


def stub_plan(image: Image) -> Plan:
    """The stub site plus `imm` patches for every other site (the stub site's immediate stays untouched)."""
    stub = stub_site(image, new_tag(99))
    sites = [s for s in imm_sites(image) if s.rva != stub.rva]
    return make_plan(image, [stub, *sites])


def with_ico_call(image: Image) -> tuple[Image, int, int]:
    """The image with a VS2019-style import call `48 FF 15 disp32 0F 1F 44 00 00` to ExAllocatePoolWithTag put into
    code padding, so that mapping with import_call_optimization=True rewrites it. Returns (image, rva, slot)."""
    slot = next(s for s, imp in image.imports.items() if imp.name == "ExAllocatePoolWithTag")
    rva = padding(image, 12, skip=2)
    mem = bytearray(image.mem)
    mem[rva : rva + 12] = b"\x48\xff\x15" + struct.pack("<i", slot - (rva + 7)) + b"\x0f\x1f\x44\x00\x00"
    return dataclasses.replace(image, mem=bytes(mem)), rva, slot


def ico_site(image: Image, rva: int, *, alternative: bool = True) -> SitePlan:
    """A patch over the 12-byte import call; the resident form is listed as a hex pattern (rel32 unknown)."""
    original = image.mem[rva : rva + 12]
    replacement = b"\xe8" + struct.pack("<i", 0x100) + b"\x0f\x1f\x44\x00\x00\x66\x90"
    alts = ("4c8b15" + original[3:7].hex() + "e8????????",) if alternative else ()
    return SitePlan(
        rva=rva,
        api="ExAllocatePoolWithTag",
        role="alloc",
        function=None,
        old_tag=None,
        new_tag=new_tag(98),
        strategy="stub",
        reason="hand-made test plan",
        patches=(Patch(rva, original, replacement, "redirected import call", alts),),
    )


def x86_redirect_site(image: Image) -> SitePlan:
    """An x86 `call [abs32]` redirected (`E8 rel32 90`). abs32 is relocated, so resident memory holds another value
    there than the plan's original: the plan lists `ff15????????` as the resident alternative, as the planner does."""
    assert image.arch == "x86"
    for cs in scan_image(image).sites:
        if cs.role == "alloc" and cs.call == "direct" and cs.raw[:2] == b"\xff\x15":
            break
    else:
        raise AssertionError(f"{image.name}: no direct `call [abs32]` allocation site")
    assert image.relocated_in(cs.rva + 2, 4)
    redirect = b"\xe8" + struct.pack("<i", 0x200) + b"\x90"
    return SitePlan(
        rva=cs.rva,
        api=cs.api,
        role=cs.role,
        function=cs.function_name,
        old_tag=cs.tag_value,
        new_tag=new_tag(97),
        strategy="stub",
        reason="hand-made test plan",
        patches=(Patch(cs.rva, cs.raw[:6], redirect, "direct call redirected to the stub", ("ff15????????",)),),
    )


# --- stand-in sessions ---------------------------------------------------------------------------------------


def session(path: Path, **map_kw: Any) -> tuple[PykdStandIn, Image, str]:
    image = load(path)
    s = PykdStandIn(is64=image.arch == "x64")
    info = s.map_driver(image, **map_kw)
    return s, image, info.name


def write_plan(tmp_path: Path, plan: Plan, name: str = "plan.json") -> Path:
    p = tmp_path / name
    p.write_text(dumps(plan), encoding="utf-8")
    return p


def changed_ranges(before: bytes, after: bytes) -> set[int]:
    return {i for i, (a, b) in enumerate(zip(before, after)) if a != b}


def planned_bytes(plan: Plan) -> set[int]:
    return {i for p in plan.patches() for i in range(p.rva, p.end)}


def journal_doc(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(params=DRIVERS, ids=lambda p: p.name)
def driver(request: pytest.FixtureRequest) -> Path:
    return request.param


# --- tests ---------------------------------------------------------------------------------------------------


def test_apply_then_revert_changes_only_planned_ranges(driver: Path, tmp_path: Path) -> None:
    s, image, mod = session(driver)
    plan = imm_plan(image)
    assert len(plan.patches()) >= 3
    plan_path = write_plan(tmp_path, plan)
    before = s.module_memory(mod)

    out = live.apply_live(plan_path, pykd=s)
    after = s.module_memory(mod)
    assert (out.written, out.already) == (len(plan.patches()), 0)
    assert out.journal == tmp_path / "plan.journal.json"
    assert changed_ranges(before, after) <= planned_bytes(plan)
    for p in plan.patches():
        assert after[p.rva : p.end] == p.replacement
    doc = journal_doc(out.journal)
    assert doc["state"] == "applied"
    assert int(doc["module_base"], 16) == s.module(mod).begin()

    back = live.revert_live(out.journal, pykd=s)
    assert back.written == len(plan.patches())
    assert s.module_memory(mod) == before
    assert journal_doc(out.journal)["state"] == "reverted"


def test_x86_addresses_are_sign_extended_like_kdlib() -> None:
    s, _, mod = session(X86[0])
    base = s.module(mod).begin()
    assert base >> 32 == 0xFFFFFFFF  # kdlib addr64: a 32-bit kernel address as the debugger reports it
    assert bytes(s.loadBytes(base, 2)) == bytes(s.loadBytes(base & 0xFFFFFFFF, 2)) == b"MZ"
    assert PykdTarget(mod, None, s).read(base, 2) == b"MZ"


def test_journal_is_written_before_the_first_write(driver: Path, tmp_path: Path) -> None:
    s, image, mod = session(driver)
    plan_path = write_plan(tmp_path, imm_plan(image))
    journal = tmp_path / "j.json"
    before = s.module_memory(mod)
    states: list[str] = []
    real_write = s.writeBytes

    def spy(offset: int, values: list[int], phyAddr: bool = False) -> None:
        states.append(journal_doc(journal)["state"] if journal.exists() else "missing")
        real_write(offset, values, phyAddr)

    s.writeBytes = spy  # type: ignore[method-assign]
    s.fail_writes = {1}
    with pytest.raises(TargetWriteError):
        live.apply_live(plan_path, journal, pykd=s)
    assert states[0] == "started"
    doc = journal_doc(journal)
    assert doc["state"] == "rolled-back"
    assert "Memory exception" in doc["error"]
    assert s.module_memory(mod) == before


@pytest.mark.parametrize("which", ["first", "middle", "last"])
def test_a_mismatch_in_any_range_aborts_with_nothing_written(driver: Path, tmp_path: Path, which: str) -> None:
    s, image, mod = session(driver)
    plan = imm_plan(image)
    patches = plan.patches()
    p = {"first": patches[0], "middle": patches[len(patches) // 2], "last": patches[-1]}[which]
    base = s.module(mod).begin()
    s.poke(base + p.rva, bytes([p.original[0] ^ 0xFF]))  # another build, or patched by someone else
    before = s.module_memory(mod)
    plan_path = write_plan(tmp_path, plan)
    with pytest.raises(PatchConflictError, match=f"{p.rva:#x}.*nothing written"):
        live.apply_live(plan_path, pykd=s)
    assert s.writes == 0
    assert s.module_memory(mod) == before
    assert not (tmp_path / "plan.journal.json").exists()


def test_a_failure_in_the_middle_rolls_back_everything(driver: Path, tmp_path: Path) -> None:
    _, image, _ = session(driver)
    plan = imm_plan(image)
    n = len(plan.patches())
    plan_path = write_plan(tmp_path, plan)
    for k in range(1, n + 1):  # write #k of n fails
        s, _, mod = session(driver)
        before = s.module_memory(mod)
        s.fail_writes = {k}
        journal = tmp_path / f"j{k}.json"
        with pytest.raises(TargetWriteError):
            live.apply_live(plan_path, journal, pykd=s)
        assert s.module_memory(mod) == before, f"write {k} of {n}"
        assert journal_doc(journal)["state"] == "rolled-back"


def test_a_torn_write_is_rolled_back_too(driver: Path, tmp_path: Path) -> None:
    # The failing write itself changed a byte before it failed: the engine must restore that range as well.
    s, image, mod = session(driver)
    plan = imm_plan(image)
    before = s.module_memory(mod)
    s.torn_writes = {2}
    with pytest.raises(TargetWriteError):
        live.apply_live(write_plan(tmp_path, plan), pykd=s)
    assert s.module_memory(mod) == before


def test_a_silently_partial_write_is_caught_by_read_back_and_rolled_back(driver: Path, tmp_path: Path) -> None:
    s, image, mod = session(driver)
    plan = imm_plan(image)
    before = s.module_memory(mod)
    s.partial_writes = True  # pykd never checks WriteVirtual's written count
    with pytest.raises(TargetWriteError, match="read-back"):
        live.apply_live(write_plan(tmp_path, plan), pykd=s)
    assert s.module_memory(mod) == before
    assert journal_doc(tmp_path / "plan.journal.json")["state"] == "rolled-back"


def test_a_paged_out_page_gives_a_clear_error_and_nothing_is_written(driver: Path, tmp_path: Path) -> None:
    s, image, mod = session(driver)
    plan = imm_plan(image)
    p = plan.patches()[len(plan.patches()) // 2]
    base = s.module(mod).begin()
    s.page_out(base + p.rva)
    with pytest.raises(TargetReadError, match=r"not present.*\.pagein /f"):
        live.apply_live(write_plan(tmp_path, plan), pykd=s)
    assert s.writes == 0
    assert not (tmp_path / "plan.journal.json").exists()


def test_pageable_section_paged_out(tmp_path: Path) -> None:
    # patterns_gcc_x86_O2 has an allocation site in PAGE; the pager took the whole section away.
    s, image, mod = session(BIN / "patterns_gcc_x86_O2.sys")
    plan = imm_plan(image)
    page = next(sec for sec in image.sections if sec.pageable)
    assert any(page.rva <= p.rva < page.end for p in plan.patches())
    s.page_out(s.module(mod).begin() + page.rva, page.size)
    with pytest.raises(TargetReadError, match=r"\.pagein"):
        live.apply_live(write_plan(tmp_path, plan), pykd=s)
    assert s.writes == 0


def test_discarded_init_is_reported_not_written(tmp_path: Path) -> None:
    s, image, mod = session(X64[0], discard_init=True)
    plan = imm_plan(image, include_discardable=True)
    before = s.module_memory(mod)
    with pytest.raises(TargetReadError, match="discarded INIT"):
        live.apply_live(write_plan(tmp_path, plan), pykd=s)
    assert s.writes == 0
    assert s.module_memory(mod) == before


def test_apply_twice_is_harmless(driver: Path, tmp_path: Path) -> None:
    s, image, mod = session(driver)
    plan = imm_plan(image)
    plan_path = write_plan(tmp_path, plan)
    before = s.module_memory(mod)
    live.apply_live(plan_path, pykd=s)
    applied, writes = s.module_memory(mod), s.writes
    again = live.apply_live(plan_path, pykd=s)
    assert (again.written, again.already) == (0, len(plan.patches()))
    assert s.writes == writes  # nothing written the second time
    assert s.module_memory(mod) == applied
    assert journal_doc(again.journal)["state"] == "applied"
    live.revert_live(again.journal, pykd=s)
    assert s.module_memory(mod) == before


def test_revert_twice_is_harmless(driver: Path, tmp_path: Path) -> None:
    s, image, mod = session(driver)
    plan_path = write_plan(tmp_path, imm_plan(image))
    before = s.module_memory(mod)
    out = live.apply_live(plan_path, pykd=s)
    live.revert_live(out.journal, pykd=s)
    writes = s.writes
    again = live.revert_live(out.journal, pykd=s)
    assert again.written == 0
    assert s.writes == writes
    assert s.module_memory(mod) == before


@pytest.mark.parametrize("torn", [False, True], ids=["between-writes", "torn-range"])
def test_revert_after_a_crash_restores_exact_originals(driver: Path, tmp_path: Path, torn: bool) -> None:
    s, image, mod = session(driver)
    plan = imm_plan(image)
    plan_path = write_plan(tmp_path, plan)
    before = s.module_memory(mod)
    k = len(plan.patches()) // 2 + 1
    s.crash_writes = {k}  # the debugger connection dies before write #k
    with pytest.raises(SimulatedCrash):
        live.apply_live(plan_path, pykd=s)
    journal = tmp_path / "plan.journal.json"
    assert journal_doc(journal)["state"] == "started"
    assert changed_ranges(before, s.module_memory(mod))  # some patches were written
    if torn:  # ... and patch k got its first changed byte before the connection died
        p = sorted(plan.patches(), key=lambda p: p.rva)[k - 1]
        i = next(i for i in range(len(p.original)) if p.original[i] != p.replacement[i])
        s.poke(s.module(mod).begin() + p.rva + i, p.replacement[i : i + 1])
    s.crash_writes = set()
    out = live.revert_live(journal, pykd=s)  # a new session on the same target
    assert out.written >= 1
    assert s.module_memory(mod) == before
    assert journal_doc(journal)["state"] == "reverted"


@pytest.mark.parametrize("field", ["timestamp", "checksum", "size_of_image", "arch"])
def test_another_build_is_refused(driver: Path, tmp_path: Path, field: str) -> None:
    s, image, mod = session(driver)
    plan = imm_plan(image)
    d = plan.driver
    if field == "arch":
        other = dataclasses.replace(d, arch="x86" if d.arch == "x64" else "x64")
    else:
        other = dataclasses.replace(d, **{field: getattr(d, field) + 0x1000})
    plan = dataclasses.replace(plan, driver=other)
    with pytest.raises(PlanError, match=f"another build of {mod}"):
        live.apply_live(write_plan(tmp_path, plan), pykd=s)
    assert s.writes == 0


def test_local_kernel_debugging_is_refused_unless_allowed(tmp_path: Path) -> None:
    s, image, _mod = session(X64[0])
    s.local = True
    plan_path = write_plan(tmp_path, imm_plan(image))
    with pytest.raises(TargetUnavailableError, match="local kernel debugging"):
        live.apply_live(plan_path, pykd=s)
    assert s.writes == 0
    assert all(st.state == live.ORIGINAL for st in live.status_live(plan_path, pykd=s))  # reading is fine
    out = live.apply_live(plan_path, pykd=s, allow_local=True)
    assert out.written == len(imm_plan(image).patches())


@pytest.mark.parametrize("what", ["user-mode", "dump"])
def test_other_sessions_are_refused(tmp_path: Path, what: str) -> None:
    s, image, _ = session(X64[0])
    if what == "dump":
        s.dump = True
    else:
        s.kernel = False
    with pytest.raises(TargetUnavailableError):
        live.apply_live(write_plan(tmp_path, imm_plan(image)), pykd=s)
    assert s.writes == 0


def test_module_not_loaded(tmp_path: Path) -> None:
    s, image, _ = session(X64[0])
    with pytest.raises(TargetError, match="not loaded"):
        live.apply_live(write_plan(tmp_path, imm_plan(image)), pykd=s, module="nosuchdrv")


def test_import_call_optimised_memory_matches_the_resident_alternative(tmp_path: Path) -> None:
    image, rva, _slot = with_ico_call(load(X64[0]))
    s = PykdStandIn()
    mod = s.map_driver(image, import_call_optimization=True).name
    base = s.module(mod).begin()
    resident = s.peek(base + rva, 12)
    assert resident[:3] == b"\x4c\x8b\x15"
    assert resident[7] == 0xE8
    target = base + rva + 12 + struct.unpack_from("<i", resident, 8)[0]
    assert target == s.export_address("ExAllocatePoolWithTag")
    before = s.module_memory(mod)

    without = make_plan(image, [ico_site(image, rva, alternative=False)])
    with pytest.raises(PatchConflictError):
        live.apply_live(write_plan(tmp_path, without, "without.json"), pykd=s)
    assert s.writes == 0

    plan = make_plan(image, [ico_site(image, rva), *imm_sites(image)])
    out = live.apply_live(write_plan(tmp_path, plan), pykd=s)
    assert out.written == len(plan.patches())
    entry = next(e for e in journal_doc(out.journal)["entries"] if int(e["rva"], 16) == rva)
    assert bytes.fromhex(entry["original"]) == resident  # the journal keeps what memory really held
    assert [st.state for st in live.status_live(tmp_path / "plan.json", pykd=s)] == ["applied"] * out.written
    live.revert_live(out.journal, pykd=s)
    assert s.module_memory(mod) == before  # the exact resident form is back, not the file form


def test_relocated_x86_call_is_journalled_and_restored_exactly(tmp_path: Path) -> None:
    s, image, mod = session(X86[0])
    site = x86_redirect_site(image)
    (p,) = site.patches
    base = s.module(mod).begin()
    resident = s.peek(base + p.rva, 6)
    assert resident != p.original  # rebased: abs32 points at the IAT slot at the load address
    before = s.module_memory(mod)
    out = live.apply_live(write_plan(tmp_path, make_plan(image, [site, *imm_sites(image)])), pykd=s)
    entry = next(e for e in journal_doc(out.journal)["entries"] if int(e["rva"], 16) == p.rva)
    assert bytes.fromhex(entry["original"]) == resident
    live.revert_live(out.journal, pykd=s)
    assert s.module_memory(mod) == before


def test_stub_site_is_written_before_the_redirect_and_rolled_back_together(tmp_path: Path) -> None:
    s, image, mod = session(X64[0])
    plan = stub_plan(image)
    stub, redirect = next(site for site in plan.sites if site.strategy == "stub").patches
    assert redirect.rva < stub.rva  # sorting by address alone would redirect first
    base = s.module(mod).begin()
    before = s.module_memory(mod)

    s.fail_writes = {2}  # the redirect fails after the stub was written
    with pytest.raises(TargetWriteError):
        live.apply_live(write_plan(tmp_path, plan), pykd=s)
    # the stub landed first; the failed redirect wrote nothing; rollback restored redirect range, then the stub
    assert [(va - base, data) for va, data in s.write_log] == [
        (stub.rva, stub.replacement),
        (redirect.rva, redirect.original),
        (stub.rva, stub.original),
    ]
    assert s.module_memory(mod) == before

    s.fail_writes = set()
    s.write_log.clear()
    out = live.apply_live(tmp_path / "plan.json", pykd=s)
    order = [va - base for va, _ in s.write_log]
    assert order.index(stub.rva) < order.index(redirect.rva)
    s.write_log.clear()
    live.revert_live(out.journal, pykd=s)
    order = [va - base for va, _ in s.write_log]
    assert order.index(redirect.rva) < order.index(stub.rva)  # nothing may call into a stub being erased
    assert s.module_memory(mod) == before


def test_status_reports_each_patch(tmp_path: Path) -> None:
    s, image, mod = session(X86[0])
    plan = imm_plan(image)
    plan_path = write_plan(tmp_path, plan)
    assert {st.state for st in live.status_live(plan_path, pykd=s)} == {live.ORIGINAL}
    live.apply_live(plan_path, pykd=s)
    p = plan.patches()[0]
    s.poke(s.module(mod).begin() + p.rva, b"\x90")
    states = live.status_live(plan_path, pykd=s)
    assert [st.state for st in states] == [live.DIFFERS] + [live.APPLIED] * (len(states) - 1)


def test_pykd_target_refuses_bytes_for_writebytes_like_pykd() -> None:
    s, _, mod = session(X64[0])
    base = s.module(mod).begin()
    with pytest.raises(TypeError):
        s.writeBytes(base + 0x1000, b"\x90")  # type: ignore[arg-type]
    assert isinstance(s.loadBytes(base, 2), list)
    PykdTarget(mod, None, s).write(base + 0x1000, s.peek(base + 0x1000, 2))  # a list goes through


def test_pykd_missing_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pykd", None)
    with pytest.raises(TargetUnavailableError) as e:
        PykdTarget("drv")
    assert str(e.value) == UNAVAILABLE


def test_cli_prints_one_line_per_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s, image, mod = session(X64[0])
    plan = imm_plan(image)
    p = plan.patches()[0]
    s.poke(s.module(mod).begin() + p.rva, b"\x90")
    plan_path = write_plan(tmp_path, plan)
    assert live.main(["apply", str(plan_path)], pykd=s) == PatchConflictError.exit_code
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("tagsplit: error: ")
    assert "nothing written" in err[0]
    assert live.main(["status", str(plan_path)], pykd=s) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(plan.patches()) + 1
    assert "differs" in out[0]
    assert live.main(["apply"], pykd=s) != 0
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert live.main(["revert", str(tmp_path / "missing.json")], pykd=s) != 0
    assert capsys.readouterr().err.startswith("tagsplit: error: ")


def test_cli_apply_status_revert(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s, image, mod = session(X86[1])
    plan_path = write_plan(tmp_path, imm_plan(image))
    before = s.module_memory(mod)
    assert live.main(["apply", str(plan_path)], pykd=s) == 0
    assert "journal" in capsys.readouterr().out
    assert live.main(["status", str(plan_path)], pykd=s) == 0
    assert "applied" in capsys.readouterr().out.splitlines()[-1]
    assert live.main(["revert", str(tmp_path / "plan.journal.json")], pykd=s) == 0
    assert s.module_memory(mod) == before


def test_dbgcommand_hook_for_later_readouts() -> None:
    s, _, mod = session(X64[0])
    t = PykdTarget(mod, None, s)
    assert t.command("!poolused 2") == ""  # nothing captured: pykd returns None
    s.commands["!poolused"] = lambda cmd: f"answer to {cmd}"
    assert t.command("!poolused 2 Tq*") == "answer to !poolused 2 Tq*"
    assert s.dbgCommand("!poolfind Tq00") is None
