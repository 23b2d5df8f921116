"""The `plan`, `apply`, `revert` and `verify` commands: glue between the CLI and the pipeline stages."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import tags
from .errors import InputError, PlanError, TagsplitError, UsageError
from .image import Image, load, parse, read_file
from .plan import model as pm
from .plan.model import CODE, FILE_ONLY, Patch, Plan

if TYPE_CHECKING:
    import argparse


def _driver_for(plan: Plan, plan_path: Path, override: str | None) -> tuple[Image, bytes]:
    """The driver file the plan was made from, found and checked by its sha256."""
    candidates = [Path(override)] if override else [Path(plan.driver.path), plan_path.parent / plan.driver.name,
                                                     plan_path.parent / Path(plan.driver.path).name]
    for c in candidates:
        if c.is_file():
            # Read once: the image and the bytes a patched copy is made from must be the same, even if the file
            # changes while we read it.
            data = read_file(c)
            image = parse(data, str(c))
            if image.sha256 != plan.driver.sha256:
                raise PlanError(
                    f"{c} is not the build the plan was made for (sha256 {image.sha256[:12]}…, plan "
                    f"{plan.driver.sha256[:12]}…); make a new plan for this driver"
                )
            return image, data
    if override:
        raise InputError(f"{override}: no such driver file")
    raise InputError(f"cannot find {plan.driver.name} (looked at {plan.driver.path}); give it with --driver")


def _default_plan_path(image: Image, values: list[int]) -> Path:
    stem = Path(image.path).stem
    label = "all" if len(values) > 3 else "-".join(
        "".join(c if c.isalnum() else "_" for c in tags.display(v)) for v in values
    )
    return Path("patches") / f"{stem}.{label}.plan.json"


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan.make import Options, describe, make_plan
    from .plan.newtags import Avoid, read_avoid_file
    from .sites import scan_image

    image = load(args.driver)
    scan = scan_image(image)
    values = list(args.tag)
    if args.all_tags:
        values += sorted({s.tag_value for s in scan.sites if s.tag_value and s.role != "free"
                          and tags.printable(s.tag_value)})
    if not values and "untagged" not in args.split:
        raise UsageError("give the suspect tag with --tag TAG (or --all-tags)")
    avoid = Avoid()
    for f in args.avoid:
        read_avoid_file(f, avoid)
    out = Path(args.output) if args.output else _default_plan_path(image, values)
    _check_writable(out)
    plan = make_plan(image, scan, Options(tuple(dict.fromkeys(values)), args.prefix, avoid, frozenset(args.split)))
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(out, pm.dumps(plan))
    pooltag = out.with_name(out.name.replace(".plan.json", "") + ".pooltag.txt")
    _atomic_write(pooltag, "\n".join(describe(plan)) + "\n")
    print(render_plan(plan))
    print(f"plan written to {out}; pooltag.txt lines for the new tags in {pooltag}")
    return 0 if any(s.strategy != pm.REFUSED for s in plan.sites) else 1


def render_plan(plan: Plan) -> str:
    lines = [f"{plan.driver.name} ({plan.driver.arch}): {len(plan.sites)} sites"]
    lines.append(f"  {'RVA':>8}  {'function':<22} {'API':<30} {'old':<6} {'new':<6} {'strategy':<9} reason")
    for s in plan.sites:
        old = tags.display(s.old_tag) if s.old_tag else "-"
        new = tags.display(s.new_tag) if s.new_tag else ("0" if s.new_tag == 0 else "-")
        fn = (s.function or "?")[:22]
        lines.append(f"  {s.rva:#8x}  {fn:<22} {s.api[:30]:<30} {old:<6} {new:<6} {s.strategy:<9} {s.reason}")
        if s.stub_rva is not None:
            lines.append(f"  {'':8}  stub at {s.stub_rva:#x}: {'; '.join(s.stub_text)}")
    for s in plan.free_sites:
        lines.append(f"  {s.rva:#8x}  {(s.function or '?')[:22]:<22} {s.api[:30]:<30} frees the old tag: {s.reason}")
    return "\n".join(lines)


def _check_writable(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path()
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{parent}: not a folder")
    probe = parent if parent.exists() else next((p for p in parent.parents if p.exists()), Path())
    if not os.access(probe, os.W_OK):
        raise InputError(f"{out}: cannot write there (permission denied)")
    if out.exists() and (out.is_dir() or not os.access(out, os.W_OK)):
        raise InputError(f"{out}: cannot overwrite")


def _atomic_write(path: Path, text: str) -> None:
    """Replace `path` with `text`, never leaving it half-written (temporary file, fsync, rename)."""
    from .targets.file import atomic_write

    atomic_write(path, text.encode("utf-8"))


def cmd_apply(args: argparse.Namespace) -> int:
    plan_path = Path(args.plan)
    plan = pm.load(plan_path)
    modes = [m for m in (args.to_file, args.windbg_script, args.live) if m]
    if len(modes) != 1:
        raise UsageError("choose one of --to-file OUT.sys, --windbg-script OUT.txt, --live")
    if args.live:
        from .live import apply_live

        journal = Path(args.journal) if args.journal else None
        outcome = apply_live(plan_path, journal, allow_local=args.allow_local)
        print(f"{plan.module}: {outcome.written} patches written ({outcome.already} already in place); "
              f"journal {outcome.journal}")
        return 0
    image, data = _driver_for(plan, plan_path, args.driver)
    if args.windbg_script:
        from .targets.script import render_apply, render_revert

        out = Path(args.windbg_script)
        _check_writable(out)
        revert = out.with_name(out.stem + ".revert" + (out.suffix or ".txt"))
        apply_text, revert_text = render_apply(plan), render_revert(plan)
        # The way back first: a crash between the two writes must never leave an apply script without its revert.
        _atomic_write(revert, revert_text)
        _atomic_write(out, apply_text)
        print(f"WinDbg script written to {out} (run it with `$$><{out}` while broken in); revert with {revert}")
        return 0
    from .targets.apply import apply
    from .targets.file import PatchedFile

    out = Path(args.to_file)
    if out.resolve() == Path(image.path).resolve():
        raise InputError(f"{out}: refusing to overwrite the input driver; choose another output file")
    _check_writable(out)
    target = PatchedFile(image, data)
    checksum = _checksum_patch(plan, image, data)
    journal = Path(args.journal) if args.journal else out.with_name(out.name + ".journal.json")
    # The journal names the output from its first version on, and says `applied` only once the output file has been
    # renamed into place: a crash anywhere leaves the old output (or none) and a journal `revert` can use.
    outcome = apply(
        plan,
        target,
        journal,
        scopes=(CODE, FILE_ONLY),
        extra=[checksum],
        commit=lambda: target.commit(out),
        journal_fields={"output": str(out.resolve()), "input": str(Path(image.path).resolve())},
    )
    print(f"{out}: {outcome.written} patches written ({outcome.already} already in place), checksum "
          f"{int.from_bytes(checksum.replacement, 'little'):#x}; journal {journal}")
    print("to load it: test-sign it (see README, 'Loading a patched driver')")
    return 0


def _checksum_patch(plan: Plan, image: Image, data: bytes) -> Patch:
    from .targets.file import PatchedFile, patched_file_bytes

    final = PatchedFile(image, patched_file_bytes(plan, image, data))
    at, _, new = final.checksum_field()
    return Patch(at, data[at : at + 4], new, "PE checksum recomputed", (), FILE_ONLY)


def cmd_revert(args: argparse.Namespace) -> int:
    from .targets.apply import read_journal, revert

    journal = Path(args.journal)
    doc = read_journal(journal)
    kind = doc.get("target")
    if kind == "file":
        from .targets.file import PatchedFile

        recorded = doc.get("output")
        out = Path(args.file or (recorded if isinstance(recorded, str) else ""))
        if not out.is_file():
            state = doc.get("state")
            if not args.file and recorded and state in ("started", "rolled-back"):
                # apply stopped before the output was renamed into place: no patched file was ever written
                print(f"{out}: nothing to revert: the patched file was never written (journal state {state})")
                return 0
            raise InputError(f"{out}: the patched file is not there; nothing to revert (give it with --file)")
        data = read_file(out)  # read once: the buffer restored is the one that was checked
        target = PatchedFile(parse(data, str(out)), data)
        outcome = revert(journal, target, commit=lambda: target.commit(out, in_place=True))
        print(f"{out}: {outcome.written} ranges restored ({outcome.already} were already original)")
        return 0
    if kind in ("pykd", "emu"):
        from .live import revert_live

        outcome = revert_live(journal)
        print(f"{outcome.written} ranges restored ({outcome.already} were already original)")
        return 0
    raise PlanError(f"{journal}: journal of target {kind!r}; a WinDbg script is reverted with its .revert script")


def cmd_verify(args: argparse.Namespace) -> int:
    from .emu.verify import verify

    plan_path = Path(args.plan)
    plan = pm.load(plan_path)
    image, data = _driver_for(plan, plan_path, args.driver)
    checks = verify(plan, image, data)
    bad = [c for c in checks if not c.ok]
    if args.json:
        print(json.dumps({"ok": not bad, "checks": [
            {"rva": None if c.rva < 0 else f"{c.rva:#x}", "ok": c.ok, "detail": c.detail} for c in checks]}, indent=2))
    else:
        for c in checks:
            where = "plan" if c.rva < 0 else f"{c.rva:#x}"
            print(f"  {'ok  ' if c.ok else 'FAIL'} {where:>8}  {c.detail}")
        print(f"{plan.driver.name}: {len(checks) - len(bad)} of {len(checks)} checks passed"
              + ("" if not bad else "; do not apply this plan"))
    return 0 if not bad else 1


def run(func: object, args: argparse.Namespace) -> int:
    try:
        return func(args)  # type: ignore[operator,no-any-return]
    except TagsplitError as e:
        print(f"tagsplit: error: {e}", file=sys.stderr)
        return e.exit_code


def cmd_snapshot(args: argparse.Namespace) -> int:
    from .snapshots.take import take_from_file, take_live

    out = Path(args.output)
    if bool(args.live) == bool(args.from_file):
        raise UsageError("give --live PLAN (inside WinDbg) or --from FILE (a saved !poolused/!poolfind/PoolMon output)")
    if args.from_file:
        snap = take_from_file(Path(args.from_file), out, args.at)
        print(f"{out}: snapshot at {snap.time} from {snap.source} ({len(snap.usages)} tags, {len(snap.blocks)} blocks)")
        return 0
    if args.count > 1:
        raise UsageError("--count above 1 needs the target to run between snapshots; in WinDbg, `g`, break in and "
                         "run `snapshot --live` again (or log with .logopen and use --from)")
    plan = pm.load(args.live)
    from .targets.pykd import _import_pykd

    pykd = _import_pykd()
    take_live(pykd, plan, out, poolfind=args.poolfind)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report.attribute import attribute
    from .report.render import plot, render_csv, render_json, render_text
    from .snapshots import store

    plan = pm.load(args.plan)
    snaps = [s for f in args.snapshots for s in store.read(Path(f))]
    report = attribute(plan, snaps)
    if args.json:
        print(render_json(report), end="")
    elif args.csv:
        print(render_csv(report), end="")
    else:
        print(render_text(report, markdown=args.markdown), end="")
    if args.plot:
        plot(report, Path(args.plot))
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out), minutes=args.minutes, arch=args.arch, driver=args.driver,
                    workload=args.workload, tag=args.tag, split=frozenset(args.split))
