"""`tagsplit demo`: the whole procedure on the bundled sample driver, in the emulated kernel.

scan -> plan -> verify -> load the driver into the emulated kernel -> apply through the pykd API (as `--live`
would inside WinDbg) -> run the driver's own workload routine for a few simulated minutes, taking a `!poolused`
snapshot each minute -> report (and plot) -> revert. The leak is found from what the emulated pool books say
after running the driver's real code; nothing in here knows which site leaks.
"""

from __future__ import annotations

import itertools
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from . import tags
from .cli import DATA
from .emu.kernel import EmulatedKernel
from .emu.verify import verify
from .image import load
from .live import apply_live, revert_live
from .plan import model as pm
from .plan.make import Options, describe, make_plan
from .report.attribute import attribute
from .report.render import plot, render_text
from .sites import scan_image
from .sites.render import render_text as render_scan
from .snapshots import store
from .snapshots.take import take_live

SAMPLES = {"x64": DATA / "sample_x64.sys", "x86": DATA / "sample_x86.sys"}
START = datetime(2026, 1, 1, 9, 0, tzinfo=timezone.utc)


def _step(n: int, text: str) -> None:
    print(f"\n== {n}. {text}")


def run_demo(
    out: Path,
    minutes: int = 6,
    arch: str = "x64",
    driver: str | None = None,
    workload: str = "SampleWorkLeaky",
    tag: str = "Smpl",
    per_minute: int = 12,
    split: frozenset[str] = frozenset(),
) -> int:
    path = Path(driver) if driver else SAMPLES[arch]
    out.mkdir(parents=True, exist_ok=True)
    image = load(path)
    value = tags.parse(tag)

    _step(1, f"scan {path.name} for '{tags.display(value)}'")
    scan = scan_image(image, [value])
    print(render_scan([scan], {value}), end="")

    _step(2, "plan: a new tag for each allocation site")
    plan = make_plan(image, scan, Options((value,), split=split))
    plan_path = out / f"{path.stem}.plan.json"
    plan_path.write_text(pm.dumps(plan), encoding="utf-8")
    (out / f"{path.stem}.pooltag.txt").write_text("\n".join(describe(plan)) + "\n", encoding="utf-8")
    for s in plan.sites:
        new = tags.display(s.new_tag) if s.new_tag else "-"
        print(f"  {s.rva:#8x}  {(s.function or '?'):<22} {s.api:<32} -> '{new}' ({s.strategy})")
    print(f"  plan written to {plan_path}")

    _step(3, "verify: run every patched site in unicorn")
    checks = verify(plan, image, path.read_bytes())
    bad = [c for c in checks if not c.ok]
    print(f"  {len(checks) - len(bad)} of {len(checks)} checks passed")
    if bad:
        for c in bad:
            print(f"  FAIL {c.rva:#x}: {c.detail}")
        return 1

    _step(4, "load the driver into the emulated kernel and let it run a minute before the split")
    kernel = EmulatedKernel(image)
    kernel.call(workload, per_minute)
    print("  " + (kernel.debugger.dbgCommand(f"!poolused 1 {tag}") or "").strip().replace("\n", "\n  "))

    _step(5, "apply the plan through the pykd API (what `!py -m tagsplit.live apply` does in WinDbg)")
    journal = out / f"{path.stem}.journal.json"
    journal.unlink(missing_ok=True)
    outcome = apply_live(plan_path, journal, pykd=kernel.debugger)
    print(f"  {outcome.written} patches written; journal {journal}")

    _step(6, f"run {workload}({per_minute}) each simulated minute for {minutes} minutes, !poolused every minute")
    snaps = out / f"{path.stem}.snapshots.jsonl"
    snaps.unlink(missing_ok=True)
    clock = itertools.count()

    def now() -> str:
        return (START + timedelta(minutes=next(clock))).isoformat().replace("+00:00", "Z")

    take_live(
        kernel.debugger,
        plan,
        snaps,
        count=minutes + 1,
        every=60.0,
        resume=lambda _s: _run_minute(kernel, workload, per_minute),
        clock=now,
        progress=lambda s: print(f"  {s}"),
    )

    _step(7, "report")
    report = attribute(plan, store.read(snaps))
    print(render_text(report), end="")
    try:
        png = plot(report, out / f"{path.stem}.growth.png")
        print(f"  plot written to {png}")
    except Exception as e:  # matplotlib is optional
        print(f"  (no plot: {e})")
    if kernel.pool.tag_mismatches:
        print(
            f"  note: {len(kernel.pool.tag_mismatches)} frees passed the old tag; harmless unless the tag is "
            "protected (plan --split frees sets their tag to 0)"
        )

    _step(8, "revert")
    before = kernel.debugger.module_memory(kernel.name)
    back = revert_live(journal, pykd=kernel.debugger)
    restored = kernel.debugger.module_memory(kernel.name)
    original = kernel.loaded_image
    print(
        f"  {back.written} ranges restored; driver image {'identical to' if restored == original else 'DIFFERS FROM'}"
        f" the one loaded ({len(before)} bytes)"
    )
    print()
    print(report.conclusion)
    return 0


def _run_minute(kernel: EmulatedKernel, workload: str, iterations: int) -> None:
    kernel.call(workload, iterations)


def main() -> int:  # pragma: no cover - convenience
    return run_demo(Path("tagsplit-demo"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
