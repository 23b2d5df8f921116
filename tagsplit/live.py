"""The debugger-side entry point: apply, revert or check a plan on the live kernel, from inside WinDbg/KD.

    !py -3.9 -m tagsplit.live apply PLAN [--journal J] [--module NAME] [--allow-local]
    !py -3.9 -m tagsplit.live revert JOURNAL [--module NAME] [--allow-local]
    !py -3.9 -m tagsplit.live status PLAN [--module NAME]

(`python -m tagsplit.live ...` outside the debugger only reports that pykd is missing.) The journal defaults to the
plan's path with `.journal.json` in place of its suffix (`plan.json` -> `plan.journal.json`).

This module imports only the standard library and the stdlib-only parts of tagsplit (`plan.model`,
`targets.apply`, `targets.pykd`, `errors`): never capstone, keystone, pefile or unicorn, which need not exist in the
debugger's Python. `apply_live`, `revert_live` and `status_live` are the library API the `tagsplit apply --live`
command and the tests call (with `pykd=` a stand-in).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from .errors import PlanError, TagsplitError, TargetReadError, UsageError
from .plan.model import CODE, Patch, Plan, load
from .targets.apply import Outcome, apply, read_journal, revert
from .targets.pykd import PykdTarget, _import_pykd

ORIGINAL = "original"
APPLIED = "applied"
DIFFERS = "differs"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class PatchState:
    patch: Patch
    va: int
    state: str  # original / applied / differs / unreadable
    found: bytes = b""
    detail: str = ""


def default_journal(plan_path: str | Path) -> Path:
    """`plan.json` -> `plan.journal.json`, next to the plan."""
    p = Path(plan_path)
    return p.with_name((p.stem if p.suffix else p.name) + ".journal.json")


def open_target(
    plan: Plan, pykd: Any = None, *, module: str | None = None, allow_local: bool = False, read_only: bool = False
) -> PykdTarget:
    """The live target for `plan`'s driver, identity-checked against the plan."""
    return PykdTarget(module or plan.module, plan.driver, pykd, allow_local, read_only=read_only)


def apply_live(
    plan_path: str | Path,
    journal_path: str | Path | None = None,
    pykd: Any = None,
    *,
    module: str | None = None,
    allow_local: bool = False,
) -> Outcome:
    """Apply the plan at `plan_path` to the live kernel; see `tagsplit.targets.apply.apply` for the guarantees.

    Raises:
        TargetUnavailableError: no pykd, not a kernel debugging session, local kernel debugging, a crash dump.
        PlanError: the plan cannot be read, or the loaded driver is another build.
        PatchConflictError: some range differs from the plan; nothing written.
        TargetReadError / TargetWriteError: the target failed; everything written was rolled back.
    """
    plan = load(plan_path)
    target = open_target(plan, pykd, module=module, allow_local=allow_local)
    journal = Path(journal_path) if journal_path is not None else default_journal(plan_path)
    return apply(plan, target, journal)


def revert_live(
    journal_path: str | Path, pykd: Any = None, *, module: str | None = None, allow_local: bool = False
) -> Outcome:
    """Restore every range the journal recorded to its original bytes (verified before any write).

    Raises:
        PlanError: not a journal.
        PatchConflictError: some range holds neither its original nor its replacement; nothing written.
        TargetReadError / TargetWriteError: the target failed.
    """
    journal = Path(journal_path)
    doc = read_journal(journal)
    name = module or doc.get("module")
    if not isinstance(name, str) or not name:
        raise PlanError(f"{journal}: the journal does not name the module; pass --module")
    # No identity check against a plan here: revert checks every range holds its journalled replacement or original.
    target = PykdTarget(name, None, pykd, allow_local)
    return revert(journal, target)


def status_live(plan_path: str | Path, pykd: Any = None, *, module: str | None = None) -> list[PatchState]:
    """The state of each code patch of the plan in the live kernel. Read-only: fine in lkd and on dumps."""
    plan = load(plan_path)
    target = open_target(plan, pykd, module=module, read_only=True)
    base = target.module_base()
    out = []
    for p in plan.patches(scope=CODE):
        va = base + p.rva
        try:
            cur = target.read(va, len(p.original))
        except TargetReadError as e:
            out.append(PatchState(p, va, UNREADABLE, detail=str(e)))
            continue
        if cur == p.replacement:
            state = APPLIED
        elif cur == p.original:
            state = ORIGINAL
        elif p.resident_match(cur):
            out.append(PatchState(p, va, ORIGINAL, cur, "(the loader's resident form)"))
            continue
        else:
            state = DIFFERS
        out.append(PatchState(p, va, state, cur))
    return out


# --- command line --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting: one line per error, as everywhere here."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="tagsplit.live",
        description="Apply, revert or check a tagsplit plan on the live kernel (inside WinDbg/KD, broken in).",
        epilog="examples:\n  !py -3.9 -m tagsplit.live apply C:\\work\\plan.json\n"
        "  !py -3.9 -m tagsplit.live status C:\\work\\plan.json\n"
        "  !py -3.9 -m tagsplit.live revert C:\\work\\plan.journal.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("apply", help="write the plan's patches (verify all, journal, write, read back)")
    a.add_argument("plan")
    a.add_argument("--journal", help="journal path (default: <plan>.journal.json next to the plan)")
    a.add_argument("--module", help="debugger module name, if not the driver file name without extension")
    a.add_argument("--allow-local", action="store_true", help="allow local kernel debugging (racy; not recommended)")
    r = sub.add_parser("revert", help="restore the original bytes recorded in a journal")
    r.add_argument("journal")
    r.add_argument("--module", help="debugger module name, if not the one the journal records")
    r.add_argument("--allow-local", action="store_true", help="allow local kernel debugging (racy; not recommended)")
    s = sub.add_parser("status", help="show per patch whether it is original, applied or differs")
    s.add_argument("plan")
    s.add_argument("--module", help="debugger module name, if not the driver file name without extension")
    n = sub.add_parser("snapshot", help="append a !poolused snapshot of the plan's tags to a snapshot file")
    n.add_argument("plan")
    n.add_argument("-o", "--output", default="snapshots.jsonl", help="file to append to (default snapshots.jsonl)")
    n.add_argument("--poolfind", action="store_true", help="also list the blocks with !poolfind (slow)")
    return ap


def _print_status(states: list[PatchState]) -> int:
    counts: dict[str, int] = {}
    for st in states:
        counts[st.state] = counts.get(st.state, 0) + 1
        what = f"  {st.patch.what}" if st.patch.what else ""
        extra = f"  found {st.found.hex()}" if st.state == DIFFERS else f"  {st.detail}" if st.detail else ""
        print(f"rva {st.patch.rva:#07x}  va {st.va:#x}  {len(st.patch.original):2d} bytes  {st.state:10s}{what}{extra}")
    summary = ", ".join(f"{counts[k]} {k}" for k in (APPLIED, ORIGINAL, DIFFERS, UNREADABLE) if k in counts)
    print(f"tagsplit: {summary or 'no code patches in the plan'}")
    return 1 if counts.get(DIFFERS) or counts.get(UNREADABLE) else 0


def main(argv: list[str] | None = None, pykd: Any = None) -> int:
    """Run one command; every error is one line on stderr and a non-zero return."""
    try:
        args = _parser().parse_args(argv)
        if args.cmd == "apply":
            out = apply_live(args.plan, args.journal, pykd, module=args.module, allow_local=args.allow_local)
            print(
                f"tagsplit: applied {out.written} patches ({out.already} already in place); journal {out.journal}; "
                "run `status` again before each readout"
            )
            return 0
        if args.cmd == "revert":
            out = revert_live(args.journal, pykd, module=args.module, allow_local=args.allow_local)
            print(f"tagsplit: reverted {out.written} patches ({out.already} already original); journal {out.journal}")
            return 0
        if args.cmd == "status":
            return _print_status(status_live(args.plan, pykd, module=args.module))
        if args.cmd == "snapshot":
            from .plan.model import load as load_plan
            from .snapshots.take import take_live

            take_live(pykd if pykd is not None else _import_pykd(), load_plan(args.plan), Path(args.output),
                      poolfind=args.poolfind)
            return 0
        raise UsageError(f"unknown command {args.cmd!r}")
    except TagsplitError as e:
        print(f"tagsplit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tagsplit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # inside the debugger a traceback helps nobody: one line, non-zero
        print(f"tagsplit: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
