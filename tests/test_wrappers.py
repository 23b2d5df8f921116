"""Allocation wrappers: every caller found (against the hand-written truth), split per caller, verified by emulation,
and the leaking caller (not the wrapper) named by the emulated end-to-end run."""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING

import pytest
from conftest import BIN, corpus_param

from tagsplit import tags
from tagsplit.cli import main
from tagsplit.emu.verify import verify
from tagsplit.image import load
from tagsplit.plan.make import Options, make_plan
from tagsplit.sites import scan_image
from tagsplit.sites.wrappers import find_wrappers

if TYPE_CHECKING:
    from pathlib import Path

WRAPPER_BINS = sorted(BIN.glob("wrappers_*.sys"))


@pytest.mark.parametrize("path", WRAPPER_BINS, ids=lambda p: p.stem)
def test_every_wrapper_call_is_found(path: Path) -> None:
    truth = json.loads(path.with_suffix(".truth.json").read_text())
    image = load(path)
    wrappers = find_wrappers(image, scan_image(image))
    got = {(c.function_name, w.name, tags.display_or_none(c.tag_value)) for w in wrappers for c in w.calls}
    direct = [c for c in truth["wrapper_calls"] if c.get("via") != "pointer"]
    want = {(c["caller"], c["wrapper"], c["tag"]) for c in direct}
    assert want <= got, f"missing {want - got}"
    # calls through a function pointer are not followed, but the pointer itself is reported
    for c in truth["wrapper_calls"]:
        if c.get("via") == "pointer":
            w = next(w for w in wrappers if w.name == c["wrapper"])
            assert w.address_taken, f"{c['wrapper']} is called through a pointer; its address must be reported"
    kinds = {w.name: w.kind for w in wrappers}
    assert kinds.get("W_AllocFixed") == "fixed"
    assert kinds.get("W_AllocTag") == "param"


@pytest.mark.parametrize("path", WRAPPER_BINS, ids=lambda p: p.stem)
@pytest.mark.parametrize(("tag", "split"), [("WFix", {"wrappers"}), ("WTa1", set()), ("WNs1", {"shared"})])
def test_wrapper_callers_split_and_verified(path: Path, tag: str, split: set[str]) -> None:
    image = load(path)
    plan = make_plan(image, scan_image(image), Options((tags.parse(tag),), split=frozenset(split)))
    done = [s for s in plan.sites if s.strategy != "refused"]
    for s in plan.sites:
        assert s.strategy != "refused" or "cave" in s.reason, s.reason  # the only refusal: no room for a copy
    assert len({s.new_tag for s in done}) == len(done), "each caller gets its own tag"
    bad = [c for c in verify(plan, image, path.read_bytes()) if not c.ok]
    assert not bad, [(hex(c.rva), c.detail) for c in bad]
    if tag == "WFix" and done:
        assert all(s.function and s.function.startswith(("W_Caller", "DriverEntry")) for s in done)


@pytest.mark.parametrize("name", ["wrappers_gcc_x64_O2", "wrappers_clang_x86"])
def test_demo_names_the_leaking_caller(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "demo",
            "--out",
            str(tmp_path),
            "--minutes",
            "3",
            "--driver",
            str(BIN / f"{name}.sys"),
            "--workload",
            "WrapWorkLeaky",
            "--tag",
            "WFix",
            "--split",
            "wrappers",
        ]
    )
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "Most likely leak" in last
    assert "W_CallerB" in last
    assert "W_AllocFixed" not in last


def test_system_informer_wrapper_callers() -> None:
    path = corpus_param("systeminformer_amd64.sys")
    image = load(path)
    scan = scan_image(image)
    wrappers = find_wrappers(image, scan)
    allocs = [w for w in wrappers if w.api == "ExAllocatePoolWithTag"]
    assert allocs
    assert all(w.kind == "param" for w in allocs)
    passed = Counter(tags.display_or_none(c.tag_value) for w in allocs for c in w.calls if c.tag_source.kind == "imm")
    assert passed["Kpc0"] >= 2
    assert len(passed) > 20
    plan = make_plan(image, scan, Options((tags.parse("KpO0"), tags.parse("KpC2"))))
    assert [s for s in plan.sites if s.strategy == "imm"]
    bad = [c for c in verify(plan, image, path.read_bytes()) if not c.ok]
    assert not bad, [(hex(c.rva), c.detail) for c in bad]
