"""plan + apply --to-file + verify on every sample driver and every corpus driver that uses tags.

Re-scanning the patched file must find every split site with its own new tag, the file may differ from the
original only inside planned ranges (plus the recomputed checksum), revert must give back the exact original, and
`verify` (the patched code run in unicorn) must pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BIN, corpus_drivers

from tagsplit import tags
from tagsplit.cli import main
from tagsplit.emu.verify import verify
from tagsplit.image import load
from tagsplit.plan import model as pm
from tagsplit.plan.make import Options, make_plan
from tagsplit.sites import scan_image

DRIVERS = sorted(BIN.glob("*.sys")) + [p for p in corpus_drivers() if "arm64" not in p.name]
SPLIT_ALL = frozenset({"shared", "untagged", "frees"})


def _constant_tags(scan) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
    return tuple(
        sorted({s.tag_value for s in scan.sites if s.tag_value and s.role != "free" and tags.printable(s.tag_value)})
    )


@pytest.mark.parametrize("split", [frozenset(), SPLIT_ALL], ids=["default", "split-all"])
@pytest.mark.parametrize("path", DRIVERS, ids=lambda p: p.name)
def test_plan_apply_rescan_verify(path: Path, split: frozenset, tmp_path: Path) -> None:
    image = load(path)
    scan = scan_image(image)
    wanted = _constant_tags(scan)
    if not wanted:
        pytest.skip(f"{path.name} uses no constant tag")
    plan = make_plan(image, scan, Options(wanted, split=split))
    plan_file = tmp_path / "p.plan.json"
    plan_file.write_text(pm.dumps(plan))
    assert pm.load(plan_file) == plan  # the JSON round-trips exactly

    out = tmp_path / "patched.sys"
    assert main(["apply", str(plan_file), "--to-file", str(out), "--driver", str(path)]) == 0
    original, patched = path.read_bytes(), out.read_bytes()

    # only planned ranges (as file offsets) and the checksum may differ
    allowed = set()
    for p in plan.patches():
        for rva in range(p.rva, p.end):
            off = image.rva_to_offset(rva)
            allowed.add(rva if off is None else off)
    pe_off = int.from_bytes(original[0x3C:0x40], "little")
    allowed.update(range(pe_off + 88, pe_off + 92))
    diffs = [i for i, (a, b) in enumerate(zip(original, patched)) if a != b]
    assert len(original) == len(patched)
    assert not [hex(d) for d in diffs if d not in allowed]

    # every split alloc site now passes its new tag; distinct tags per unit of the plan
    rescan = {s.rva: s for s in scan_image(load(out)).sites}
    for sp in plan.sites:
        if sp.strategy in ("imm", "stub") and sp.role != "free":
            # a redirect that took the instructions before a register call along starts earlier than the call
            at = next((p.rva for p in sp.patches if p.rva <= sp.rva < p.end), sp.rva)
            got = rescan.get(at)
            assert got is not None, f"site {sp.rva:#x} vanished from the patched file"
            assert got.tag_value == sp.new_tag, (hex(sp.rva), got.tag_value, sp.new_tag)
        if sp.strategy == "free-zero":
            at = next((p.rva for p in sp.patches if p.rva <= sp.rva < p.end), sp.rva)
            assert rescan[at].tag_value == 0
    if "shared" in split:
        units = [
            sp.new_tag
            for sp in plan.sites
            if sp.strategy in ("imm", "stub") and sp.role != "free" and not sp.shared_with
        ]
        assert len(units) == len(set(units)), "two split sites got the same new tag"

    # the patched code runs right
    bad = [c for c in verify(plan, image, original) if not c.ok]
    assert not bad, [(hex(c.rva), c.detail) for c in bad]

    # and reverting gives back the exact original file
    assert main(["revert", str(tmp_path / "patched.sys.journal.json")]) == 0
    assert out.read_bytes() == original


def test_apply_twice_is_harmless(tmp_path: Path) -> None:
    drv = BIN / "sample_gcc_x64_O2.sys"
    plan_file = tmp_path / "p.plan.json"
    assert main(["plan", str(drv), "--tag", "Smpl", "-o", str(plan_file)]) == 0
    out = tmp_path / "o.sys"
    assert main(["apply", str(plan_file), "--to-file", str(out)]) == 0
    first = out.read_bytes()
    assert main(["apply", str(plan_file), "--to-file", str(out)]) == 0
    assert out.read_bytes() == first
    journal = tmp_path / "o.sys.journal.json"
    assert main(["revert", str(journal)]) == 0
    assert main(["revert", str(journal)]) == 0
    assert out.read_bytes() == drv.read_bytes()


def test_new_tags_follow_the_rules_and_avoid_known_tags(tmp_path: Path) -> None:
    drv = BIN / "patterns_clang_x64.sys"
    avoid = tmp_path / "pooltag.txt"
    avoid.write_text("rem test\nPS01 - x.sys - taken\nPS0? - y.sys - wildcard\n")
    plan_file = tmp_path / "p.plan.json"
    assert (
        main(["plan", str(drv), "--tag", "PShr", "--avoid", str(avoid), "--split", "shared", "-o", str(plan_file)]) == 0
    )
    plan = pm.load(plan_file)
    new = [s.new_tag for s in plan.sites if s.new_tag]
    assert new
    assert all(not tags.problems(t) for t in new)
    shown = {tags.display(t) for t in new}
    assert not any(t.startswith("PS0") for t in shown), shown
    assert (tmp_path / "p.pooltag.txt").read_text().count(" - patterns_clang_x64.sys - site ") == len(plan.sites)


def test_protected_tag_keeps_its_bit(tmp_path: Path) -> None:
    image = load(BIN / "patterns_gcc_x64_O2.sys")
    scan = scan_image(image)
    plan = make_plan(image, scan, Options((tags.parse("Prot"),)))
    allocs = [s for s in plan.sites if s.role == "alloc"]
    assert allocs
    assert all(s.new_tag and s.new_tag & tags.PROTECTED_POOL for s in allocs)


def test_committed_plans_for_the_bundled_samples_are_current() -> None:
    """patches/ holds the plans for the bundled samples; regenerate with
    `tagsplit plan tagsplit/data/sample_x64.sys --tag Smpl -o patches/sample_x64.Smpl.plan.json` (and x86)."""
    root = Path(__file__).resolve().parent.parent
    for arch in ("x64", "x86"):
        committed = root / "patches" / f"sample_{arch}.Smpl.plan.json"
        assert committed.is_file(), f"missing {committed}"
        image = load(root / "tagsplit" / "data" / f"sample_{arch}.sys")
        fresh = json.loads(pm.dumps(make_plan(image, scan_image(image), Options((tags.parse("Smpl"),)))))
        doc = json.loads(committed.read_text())
        fresh["driver"]["path"] = doc["driver"]["path"]
        assert doc == fresh, f"{committed} is stale: regenerate it (see this test's docstring)"
