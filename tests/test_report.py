"""Attribution end to end in the emulated kernel: the leaking call site is found from the emulated run.

The emulated kernel runs the sample drivers' real machine code (unicorn) with a pool allocator that keeps books;
the plan is applied through the pykd API, snapshots are parsed from the emulator's own `!poolused` text.
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest
from conftest import BIN

from tagsplit import tags
from tagsplit.cli import main
from tagsplit.emu.kernel import BugCheck, EmulatedKernel
from tagsplit.image import load
from tagsplit.live import apply_live, revert_live
from tagsplit.plan import model as pm
from tagsplit.plan.make import Options, make_plan
from tagsplit.report.attribute import attribute
from tagsplit.report.render import render_csv, render_json, render_text
from tagsplit.sites import scan_image
from tagsplit.snapshots import parse_poolused, store
from tagsplit.snapshots.take import take_live

if TYPE_CHECKING:
    from pathlib import Path

T0 = datetime(2026, 1, 1, 9, 0, tzinfo=timezone.utc)


def _clock():  # type: ignore[no-untyped-def]
    n = itertools.count()
    return lambda: (T0 + timedelta(minutes=next(n))).isoformat().replace("+00:00", "Z")


def _run(driver: Path, workload: str, tmp: Path, tag: str = "Smpl", minutes: int = 5):  # type: ignore[no-untyped-def]
    image = load(driver)
    plan = make_plan(image, scan_image(image), Options((tags.parse(tag),)))
    plan_path = tmp / "plan.json"
    plan_path.write_text(pm.dumps(plan))
    kernel = EmulatedKernel(image)
    apply_live(plan_path, tmp / "journal.json", pykd=kernel.debugger)
    out = tmp / "snaps.jsonl"
    take_live(
        kernel.debugger,
        plan,
        out,
        count=minutes + 1,
        every=60,
        resume=lambda _s: kernel.call(workload, 9),
        clock=_clock(),
        progress=lambda _s: None,
    )
    return plan, kernel, attribute(plan, store.read(out))


@pytest.mark.parametrize(
    "name", ["sample_gcc_x64_O2", "sample_clang_x86", "sample_gcc_x86_pushargs", "sample_clang_x64_tail"]
)
def test_leaking_site_is_identified(name: str, tmp_path: Path) -> None:
    truth = json.loads((BIN / f"{name}.truth.json").read_text())
    _plan, _kernel, report = _run(BIN / f"{name}.sys", "SampleWorkLeaky", tmp_path)
    assert report.leaking is not None, report.conclusion
    # the truth file (from the C source) says which function's allocation leaks
    leak_fn = {leak["function"] for w in truth["workloads"] if w["export"] == "SampleWorkLeaky" for leak in w["leaks"]}
    assert leak_fn
    assert report.leaking.functions[0] in leak_fn
    assert report.leaking.growth_bytes_per_min
    assert report.leaking.growth_bytes_per_min > 0
    assert all((r.growth_bytes_per_min or 0) == 0 for r in report.rows if r is not report.leaking)
    assert "Most likely leak" in report.conclusion
    assert report.leaking.functions[0] in report.conclusion


def test_balanced_workload_reports_no_leak(tmp_path: Path) -> None:
    _, _, report = _run(BIN / "sample_gcc_x64_O2.sys", "SampleWorkBalanced", tmp_path)
    assert report.leaking is None
    assert "No site leaks" in report.conclusion


def test_one_snapshot_is_called_thin_evidence(tmp_path: Path) -> None:
    _, _, report = _run(BIN / "sample_gcc_x64_O2.sys", "SampleWorkLeaky", tmp_path, minutes=0)
    assert report.leaking is None
    assert any("one snapshot" in e for e in report.evidence)


def test_poolused_text_parses_back_to_the_emulator_counters() -> None:
    kernel = EmulatedKernel(BIN / "sample_clang_x86.sys")
    kernel.call("SampleWorkLeaky", 7)
    for flags in ("", "1", "2", "4"):
        text = kernel.debugger.dbgCommand(f"!poolused {flags}".strip()) or ""
        parsed = {u.tag: u for u in parse_poolused(text)}
        for tag, books in kernel.pool.books.items():
            u = parsed[tags.display(tag)]
            assert u.nonpaged_outstanding == books.allocs[0] - books.frees[0]
            assert u.paged_outstanding == books.allocs[1] - books.frees[1]
            assert (u.nonpaged_bytes, u.paged_bytes) == tuple(books.bytes)


def test_poolfind_lists_the_outstanding_blocks() -> None:
    from tagsplit.snapshots import parse_poolfind

    kernel = EmulatedKernel(BIN / "sample_gcc_x64_O2.sys")
    kernel.call("SampleWorkLeaky", 9)
    blocks = parse_poolfind(kernel.debugger.dbgCommand("!poolfind Smpl 0") or "")
    assert len(blocks) == 3
    assert all(b.tag == "Smpl" and b.size == 0x58 for b in blocks)


def test_protected_tag_mismatch_on_free_bugchecks() -> None:
    from tagsplit.emu.kernel import Pool

    pool = Pool(0x10000, 0x10000)
    a = pool.allocate(16, tags.parse("Prot") | tags.PROTECTED_POOL, False, 0)
    with pytest.raises(BugCheck, match="0xc2"):
        pool.free(a, tags.parse("Othr"))
    b = pool.allocate(16, tags.parse("Plai"), False, 0)
    pool.free(b, tags.parse("Othr"))  # unprotected: recorded, not fatal
    assert pool.tag_mismatches


def test_report_formats_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _plan, _, report = _run(BIN / "sample_gcc_x64_O2.sys", "SampleWorkLeaky", tmp_path)
    doc = json.loads(render_json(report))
    assert doc["schema"] == 1
    assert doc["sites"][0]["rank"] == 1
    assert doc["sites"][0]["new_tag"] == tags.display(report.leaking.new_tag)  # type: ignore[union-attr]
    assert {"rva", "new_tag", "outstanding_bytes", "outstanding_allocs", "growth_bytes_per_min"} <= set(doc["sites"][0])
    assert render_csv(report).splitlines()[0].startswith("rank,rva,")
    assert "| rank |" in render_text(report, markdown=True)
    png = tmp_path / "g.png"
    assert (
        main(["report", str(tmp_path / "plan.json"), str(tmp_path / "snaps.jsonl"), "--json", "--plot", str(png)]) == 0
    )
    assert json.loads(capsys.readouterr().out)["leaking_site"] == doc["leaking_site"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_snapshot_from_a_saved_log(tmp_path: Path) -> None:
    log = tmp_path / "kd.log"
    log.write_text(
        "Debug session time: Thu Nov 26 10:00:00.000 2026 (UTC + 0:00)\n"
        "0: kd> !poolused 2\n Sorting by NonPaged Pool Consumed\n\n"
        "               NonPaged                  Paged\n Tag     Allocs         Used     Allocs         Used\n\n"
        " Sm01         3          264          0            0\tUNKNOWN pooltag 'Sm01', please update pooltag.txt\n"
    )
    out = tmp_path / "s.jsonl"
    assert main(["snapshot", "--from", str(log), "-o", str(out)]) == 0
    (snap,) = store.read(out)
    assert snap.time == "2026-11-26T10:00:00Z"
    assert snap.usages[0].tag == "Sm01"
    assert main(["snapshot", "--from", str(log), "--at", "2026-11-26T10:05:00Z", "-o", str(out)]) == 0
    assert [s.time for s in store.read(out)] == ["2026-11-26T10:00:00Z", "2026-11-26T10:05:00Z"]


def test_demo_names_the_leak_from_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--minutes", "3"]) == 0
    out = capsys.readouterr().out
    assert "Most likely leak" in out
    assert "SampleAllocRecord" in out.splitlines()[-1]
    assert "identical to the one loaded" in out
    assert (tmp_path / "sample_x64.growth.png").is_file()


def test_live_revert_restores_the_emulated_driver(tmp_path: Path) -> None:
    _plan, kernel, _ = _run(BIN / "sample_clang_x86.sys", "SampleWorkLeaky", tmp_path, minutes=1)
    revert_live(tmp_path / "journal.json", pykd=kernel.debugger)
    assert kernel.debugger.module_memory(kernel.name) == kernel.loaded_image
