"""The WinDbg command scripts (tagsplit.targets.script) run by a strict interpreter of the emitted command subset
(tests/windbg_interp.py) against the pykd stand-in's memory, on x64 and x86 drivers."""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

import pytest
from test_live_pykd import (
    DRIVERS,
    X64,
    X86,
    changed_ranges,
    ico_site,
    imm_plan,
    imm_sites,
    make_plan,
    planned_bytes,
    session,
    stub_plan,
    with_ico_call,
    x86_redirect_site,
)
from windbg_interp import Interp, ScriptError, condense, parse

from tagsplit.emu.pykd_standin import PykdStandIn
from tagsplit.errors import PlanError
from tagsplit.image import load
from tagsplit.plan.model import Plan, digest
from tagsplit.targets.script import render_apply, render_revert

if TYPE_CHECKING:
    from pathlib import Path


def run(s: PykdStandIn, text: str) -> list[str]:
    return Interp(s).run_script(text)


def oks(out: list[str]) -> list[str]:
    return [line for line in out if line.startswith("tagsplit: OK")]


@pytest.fixture(params=DRIVERS, ids=lambda p: p.name)
def driver(request: pytest.FixtureRequest) -> Path:
    return request.param


def test_apply_script_writes_exactly_the_plan(driver: Path) -> None:
    s, image, mod = session(driver)
    plan = imm_plan(image)
    before = s.module_memory(mod)
    out = run(s, render_apply(plan))
    after = s.module_memory(mod)
    n = len(plan.patches())
    assert len(oks(out)) == n
    assert out[-1] == f"tagsplit: applied - all {n} patches verified"
    assert not [line for line in out if "DIFFERS" in line or "FAILED" in line]
    assert changed_ranges(before, after) <= planned_bytes(plan)
    for p in plan.patches():
        assert after[p.rva : p.end] == p.replacement
    assert s.writes == n


@pytest.mark.parametrize("which", [0, -1])
def test_a_mismatch_aborts_the_script_with_nothing_written(driver: Path, which: int) -> None:
    s, image, mod = session(driver)
    plan = imm_plan(image)
    p = plan.patches()[which]
    s.poke(s.module(mod).begin() + p.end - 1, bytes([p.original[-1] ^ 0x55]))
    before = s.module_memory(mod)
    out = run(s, render_apply(plan))
    differs = [line for line in out if line.startswith("tagsplit: DIFFERS")]
    assert len(differs) == 1
    assert f"+{p.rva:#x} " in differs[0]
    assert out[-1].startswith("tagsplit: nothing written")
    assert s.writes == 0
    assert s.module_memory(mod) == before


def test_another_build_is_refused_by_the_script(driver: Path) -> None:
    s, image, _mod = session(driver)
    plan = imm_plan(image)
    plan = dataclasses.replace(plan, driver=dataclasses.replace(plan.driver, timestamp=plan.driver.timestamp ^ 1))
    out = run(s, render_apply(plan))
    assert any("another build" in line for line in out)
    assert s.writes == 0


def test_a_paged_out_range_stops_the_script_before_any_write() -> None:
    s, image, mod = session(X86[1])
    plan = imm_plan(image)
    p = plan.patches()[-1]
    s.page_out(s.module(mod).begin() + p.rva)
    out = run(s, render_apply(plan))
    assert any(line.startswith("tagsplit: NOT PRESENT") and ".pagein /f" in line for line in out)
    assert s.writes == 0


def test_apply_twice_is_harmless(driver: Path) -> None:
    s, image, mod = session(driver)
    plan = imm_plan(image)
    text = render_apply(plan)
    run(s, text)
    applied, writes = s.module_memory(mod), s.writes
    out = run(s, text)
    assert len(oks(out)) == len(plan.patches())
    assert s.writes == writes  # every range already held its replacement: no eb ran
    assert s.module_memory(mod) == applied


def test_revert_script_restores_and_is_harmless_twice(driver: Path) -> None:
    s, image, mod = session(driver)
    plan = imm_plan(image)
    before = s.module_memory(mod)
    run(s, render_apply(plan))
    out = run(s, render_revert(plan))
    assert len(oks(out)) == len(plan.patches())
    assert out[-1].startswith("tagsplit: reverted")
    assert s.module_memory(mod) == before
    writes = s.writes
    out = run(s, render_revert(plan))
    assert s.writes == writes
    assert out[-1].startswith("tagsplit: reverted")


def test_revert_script_refuses_foreign_bytes() -> None:
    s, image, mod = session(X64[1])
    plan = imm_plan(image)
    run(s, render_apply(plan))
    p = plan.patches()[1]
    s.poke(s.module(mod).begin() + p.rva, b"\xcc")
    writes = s.writes
    out = run(s, render_revert(plan))
    assert any("DIFFERS" in line and f"+{p.rva:#x} " in line for line in out)
    assert s.writes == writes


def test_stub_written_before_redirect_and_erased_after_it() -> None:
    s, image, mod = session(X64[0])
    plan = stub_plan(image)
    stub, redirect = next(site for site in plan.sites if site.strategy == "stub").patches
    base = s.module(mod).begin()
    before = s.module_memory(mod)
    run(s, render_apply(plan))
    order = [va - base for va, _ in s.write_log]
    assert order.index(stub.rva) < order.index(redirect.rva)
    s.write_log.clear()
    run(s, render_revert(plan))
    order = [va - base for va, _ in s.write_log]
    assert order.index(redirect.rva) < order.index(stub.rva)
    assert s.module_memory(mod) == before


def test_import_call_optimised_memory_and_the_file_form_on_revert() -> None:
    image, rva, _ = with_ico_call(load(X64[0]))
    s = PykdStandIn()
    mod = s.map_driver(image, import_call_optimization=True).name
    base = s.module(mod).begin()
    before = s.module_memory(mod)
    plan = make_plan(image, [ico_site(image, rva), *imm_sites(image)])
    out = run(s, render_apply(plan))
    assert out[-1].endswith("patches verified")
    text = render_revert(plan)
    assert "restores the plan's original" in text  # the script says what it cannot know
    run(s, text)
    after = s.module_memory(mod)
    # everything is back, except that the import call is now the file form (equivalent code)
    assert changed_ranges(before, after) <= set(range(rva, rva + 12))
    assert s.peek(base + rva, 12) == image.mem[rva : rva + 12]


def test_relocated_x86_call_is_checked_and_restored_for_the_load_address() -> None:
    # The file form of `call [abs32]` holds the IAT address at the preferred base; in a rebased driver that would be
    # wrong code. The scripts compute module + (abs32 - ImageBase) instead of accepting or restoring the file form.
    s, image, mod = session(X86[0])
    site = x86_redirect_site(image)
    (p,) = site.patches
    plan = make_plan(image, [site, *imm_sites(image)])
    base = s.module(mod).begin()
    before = s.module_memory(mod)
    assert s.peek(base + p.rva, 6) != p.original
    apply_text, revert_text = render_apply(plan), render_revert(plan)
    assert run(s, apply_text)[-1].endswith("patches verified")
    out = run(s, revert_text)
    assert out[-1].startswith("tagsplit: reverted")
    assert s.module_memory(mod) == before  # the relocated abs32, not the file's

    # ... and a call through some other address is not taken for the resident form
    s.poke(base + p.rva + 2, b"\x00\x10\x00\x00")
    out = run(s, apply_text)
    assert any(line.startswith("tagsplit: DIFFERS") and f"+{p.rva:#x} " in line for line in out)


def test_x86_kernel_addresses_and_sign_extension() -> None:
    # The x86 module base is 0xffffffff8a3c0000 as the debugger reports it; every value compared is a word/byte,
    # so the kernel-mode sign extension of constants >= 0x80000000 never changes a comparison.
    s, image, mod = session(X86[0])
    assert s.module(mod).begin() >> 32 == 0xFFFFFFFF
    plan = imm_plan(image)
    text = render_apply(plan)
    assert not re.search(r"0x[89a-f][0-9a-f]{7}\b", text.split("r $t0 = 0", 1)[1])  # no 32-bit constants
    assert run(s, text)[-1].endswith("patches verified")


def test_script_text_survives_condensing() -> None:
    image = load(X64[0])
    plan = stub_plan(image)
    for text in (render_apply(plan), render_revert(plan)):
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("$$"):
                assert not re.search(r'[;{}"]', stripped[2:]), line  # a comment ends at ';' once condensed
            assert not stripped.startswith((".else", ".elsif", "{", "*")), line
        parse(condense(text))  # balanced, only the supported commands
        assert digest(plan) in text


def test_interpreter_is_strict() -> None:
    s = PykdStandIn()
    with pytest.raises(ScriptError):
        Interp(s).run_script(".if (1) {\n r $t0 = 1\n}\n.else {\n r $t0 = 2\n}\n")  # .else after a line break
    with pytest.raises(ScriptError, match="missing"):
        Interp(s).run_script(".if (1) { r $t0 = 1; $$ the comment swallows the brace }\n")
    with pytest.raises(ScriptError):
        Interp(s).run_script("ed nt!PoolHitTag 0\n")
    with pytest.raises(ScriptError, match="Couldn't resolve"):
        Interp(s).run_script("r $t0 = nosuchmodule+0x10\n")
    it = Interp(s)
    it.run_script("r $t0 = 0x80000000\nr $t1 = 0x0`80000000\nr $t2 = 1 or 0 and 0\n")
    assert it.t[:3] == [0xFFFFFFFF80000000, 0x80000000, 1]


def test_module_names_masm_would_misread() -> None:
    image = load(X64[0])
    plan = imm_plan(image)
    assert "eb !e1000+0x" in render_apply(plan, module="e1000")  # would read as the number 0xe1000
    assert "eb !rax+0x" in render_apply(plan, module="rax")
    with pytest.raises(PlanError):
        render_apply(plan, module="my-drv")
    odd: Plan = dataclasses.replace(plan, driver=dataclasses.replace(plan.driver, name="bad name.sys"))
    with pytest.raises(PlanError):
        render_revert(odd)
