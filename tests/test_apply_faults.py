"""Faults at every point of apply and revert: the process killed, or a write failing, at each step.

Three routes, each swept over every fault point:

* `tagsplit apply PLAN --to-file OUT` in a subprocess that `os._exit`s at fault point k (the test-only hook
  `tagsplit.targets.apply.fault_point`, inert unless TAGSPLIT_FAULT_AT is set), for k = 1, 2, ... until a run gets
  past every point; and in-process with TAGSPLIT_FAULT=raise, where step k fails with EIO instead. After each:
  OUT is absent, unchanged or completely patched (never half-written), `tagsplit revert JOURNAL` gives back the
  exact original bytes, and a second apply is harmless.
* `--live` against the pykd stand-in: the debugger connection dies before any write, in the middle of a write
  (torn), at every journal step, during a rollback and during a revert; `revert_live` restores the exact bytes.
* the WinDbg script route: the CLI writing the two scripts is killed at every point (never an apply script without
  its revert script), and a script run dies at each `eb`, before it or in the middle of it (torn), and then the
  revert script too at each of its writes; the revert script restores the original, and refuses a torn range with
  a byte that is neither the original's nor the replacement's.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import pytest
from conftest import BIN
from test_live_pykd import (
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
from test_live_pykd import write_plan as write_plan_file
from windbg_interp import Interp

from tagsplit import live
from tagsplit.cli import main
from tagsplit.emu.pykd_standin import PAGE, PykdStandIn, SimulatedCrash
from tagsplit.errors import TagsplitError
from tagsplit.plan import model as pm
from tagsplit.targets import apply as apply_mod
from tagsplit.targets.script import render_apply, render_revert

if TYPE_CHECKING:
    from tagsplit.plan.model import Plan

ROOT = Path(__file__).resolve().parent.parent
DRIVER = BIN / "patterns_clang_x64.sys"  # its split-all plan has a stub, its redirect, imm and free-zero patches
SPLIT = ["--split", "shared", "--split", "untagged", "--split", "frees"]
MAX_POINTS = 200


@dataclasses.dataclass(frozen=True)
class FileCase:
    driver: Path
    plan: Path
    original: bytes
    expected: bytes  # the complete patched file


def _file_case(root: Path, driver: Path, tag: str) -> FileCase:
    root.mkdir(parents=True, exist_ok=True)
    plan = root / "p.plan.json"
    assert main(["plan", str(driver), "--tag", tag, *SPLIT, "-o", str(plan)]) == 0
    ref = root / "ref.sys"
    assert main(["apply", str(plan), "--to-file", str(ref)]) == 0
    return FileCase(driver, plan, driver.read_bytes(), ref.read_bytes())


@pytest.fixture(scope="module")
def file_case(tmp_path_factory: pytest.TempPathFactory) -> FileCase:
    return _file_case(tmp_path_factory.mktemp("faults"), DRIVER, "PShr")


@pytest.fixture(scope="module")
def file_case_x86(tmp_path_factory: pytest.TempPathFactory) -> FileCase:
    return _file_case(tmp_path_factory.mktemp("faults86"), ROOT / "tagsplit" / "data" / "sample_x86.sys", "Smpl")


def _run_cli(args: list[str], fault_at: int, cwd: Path, fresh: bool = False) -> tuple[int, str]:
    """`tagsplit ARGS` in a child process with TAGSPLIT_FAULT_AT=fault_at: (exit status, stderr).

    The child is forked from this process (tagsplit already imported: ~0.1 s a run) where the OS can fork, else, or
    with `fresh`, a new interpreter (`python -m tagsplit.cli`)."""
    if fresh or not hasattr(os, "fork"):
        env = dict(os.environ, TAGSPLIT_FAULT_AT=str(fault_at))
        env.pop("TAGSPLIT_FAULT", None)
        r = subprocess.run([sys.executable, "-m", "tagsplit.cli", *args], capture_output=True, text=True, env=env,
                           cwd=cwd, timeout=120)
        return r.returncode, r.stderr
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the command, never return into pytest
        code = 99
        try:
            os.close(read_end)
            sys.stderr = open(write_end, "w", closefd=False)  # noqa: SIM115
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            os.environ["TAGSPLIT_FAULT_AT"] = str(fault_at)
            os.environ.pop("TAGSPLIT_FAULT", None)
            apply_mod._fault_count = 0
            os.chdir(cwd)
            code = main(args)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    with open(read_end, "rb") as f:
        err = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def _kill_sweep(make_args: Callable[[Path], list[str]], prepare: Callable[[Path], None], root: Path) -> list[Path]:
    """Run the command once per fault point k = 1, 2, ..., each in its own folder prepared by `prepare`, until a
    run passes every point; returns the folders of the runs that were killed, in order of k."""
    killed: list[Path] = []
    for k in range(1, MAX_POINTS):
        d = root / f"k{k:03d}"
        d.mkdir(parents=True)
        prepare(d)
        code, err = _run_cli(make_args(d), k, d)
        assert "Traceback" not in err, err
        if code != apply_mod.FAULT_EXIT:
            assert code == 0, err
            return killed
        assert f"injected crash at point {k} " in err
        killed.append(d)
    raise AssertionError(f"more than {MAX_POINTS} fault points?")


def _revert_and_reapply(case: FileCase, work: Path, before: bytes | None) -> None:
    out, journal = work / "o.sys", work / "o.sys.journal.json"
    # never half-written: what was there, or the complete patched file
    if out.exists():
        assert out.read_bytes() in {before, case.expected}
    else:
        assert before is None
    # the way back
    if journal.exists():
        assert main(["revert", str(journal)]) == 0
        assert not out.exists() or out.read_bytes() == case.original
    else:  # killed before the journal existed: nothing was written anywhere
        assert (out.read_bytes() if out.exists() else None) == before
    # a second apply is harmless, and reverting it works too
    assert main(["apply", str(case.plan), "--to-file", str(out)]) == 0
    assert out.read_bytes() == case.expected
    assert main(["revert", str(journal)]) == 0
    assert out.read_bytes() == case.original
    assert case.driver.read_bytes() == case.original  # the input was never touched


@pytest.mark.parametrize("existing", [False, True], ids=["new-output", "over-a-patched-output"])
def test_kill_apply_to_file_at_every_point(file_case: FileCase, tmp_path: Path, existing: bool) -> None:
    def prepare(d: Path) -> None:
        if existing:  # a previous apply of the same plan left a patched output and its journal
            assert main(["apply", str(file_case.plan), "--to-file", str(d / "o.sys")]) == 0

    killed = _kill_sweep(lambda d: ["apply", str(file_case.plan), "--to-file", str(d / "o.sys")], prepare, tmp_path)
    assert len(killed) >= 20  # 3 journal steps, 2 per write, 4 for the output file, 3 journal steps
    for d in killed:
        _revert_and_reapply(file_case, d, file_case.expected if existing else None)


def test_kill_in_a_fresh_interpreter(file_case: FileCase, tmp_path: Path) -> None:
    """The hook works the same in `python -m tagsplit.cli` started from scratch (first, a middle and the last point)."""
    total = len(_kill_sweep(lambda d: ["apply", str(file_case.plan), "--to-file", str(d / "o.sys")], lambda d: None,
                            tmp_path / "count"))
    for k in sorted({1, total // 2, total}):
        d = tmp_path / f"fresh{k}"
        d.mkdir()
        code, err = _run_cli(["apply", str(file_case.plan), "--to-file", str(d / "o.sys")], k, d, fresh=True)
        assert code == apply_mod.FAULT_EXIT, err
        assert f"injected crash at point {k} " in err
        assert "Traceback" not in err
        _revert_and_reapply(file_case, d, None)


def _raise_at(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    monkeypatch.setenv("TAGSPLIT_FAULT_AT", str(k))
    monkeypatch.setenv("TAGSPLIT_FAULT", "raise")
    monkeypatch.setattr(apply_mod, "_fault_count", 0)


def _no_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAGSPLIT_FAULT_AT", raising=False)
    monkeypatch.delenv("TAGSPLIT_FAULT", raising=False)


@pytest.mark.parametrize(
    ("case_name", "first"),
    [("file_case", "revert"), ("file_case", "apply"), ("file_case_x86", "revert")],
    ids=["x64-revert-first", "x64-apply-again-first", "x86-revert-first"],
)
def test_failed_step_in_apply_to_file_at_every_point(
    case_name: str,
    first: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    case: FileCase = request.getfixturevalue(case_name)
    points = 0
    for k in range(1, MAX_POINTS):
        work = tmp_path / f"k{k:03d}"
        work.mkdir()
        out = work / "o.sys"
        _raise_at(monkeypatch, k)
        code = main(["apply", str(case.plan), "--to-file", str(out)])
        hit = apply_mod._fault_count >= k
        _no_faults(monkeypatch)
        err = capsys.readouterr().err
        if not hit:
            assert code == 0
            break
        points += 1
        if code == 0:  # a failure after the output was renamed into place, e.g. syncing the folder: still complete
            assert out.read_bytes() == case.expected
        else:
            assert "injected fault" in err
            assert err.count("\n") == 1
            assert "Traceback" not in err
            assert not out.exists() or out.read_bytes() == case.expected
        assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]  # a failed write cleans up after itself
        if first == "apply":
            assert main(["apply", str(case.plan), "--to-file", str(out)]) == 0
            assert out.read_bytes() == case.expected
        _revert_and_reapply(case, work, case.expected if out.exists() else None)
        capsys.readouterr()
    assert points >= 20


def test_revert_of_a_patched_file_killed_at_every_point(file_case: FileCase, tmp_path: Path) -> None:
    def prepare(d: Path) -> None:
        assert main(["apply", str(file_case.plan), "--to-file", str(d / "o.sys")]) == 0

    killed = _kill_sweep(lambda d: ["revert", str(d / "o.sys.journal.json")], prepare, tmp_path)
    assert len(killed) >= 10
    for d in killed:
        out = d / "o.sys"
        assert out.read_bytes() in {file_case.expected, file_case.original}  # never half-restored
        assert main(["revert", str(d / "o.sys.journal.json")]) == 0
        assert out.read_bytes() == file_case.original


def test_kill_while_writing_windbg_scripts_never_leaves_apply_without_revert(tmp_path: Path) -> None:
    plan = tmp_path / "p.plan.json"
    assert main(["plan", str(DRIVER), "--tag", "PShr", *SPLIT, "-o", str(plan)]) == 0
    killed = _kill_sweep(lambda d: ["apply", str(plan), "--windbg-script", str(d / "s.txt")], lambda d: None, tmp_path)
    assert len(killed) >= 6
    for d in killed:
        if (d / "s.txt").exists():
            assert (d / "s.revert.txt").exists()
            assert (d / "s.txt").read_text().endswith("}\n")  # complete
        if (d / "s.revert.txt").exists():
            assert (d / "s.revert.txt").read_text().endswith("}\n")


# --- the live route, against the pykd stand-in ------------------------------------------------------------------


def _memory(s: PykdStandIn, mod: str) -> bytes:
    """The module's memory, page by page (the stand-in's `module_memory` reads byte by byte: too slow here)."""
    info = s.module_info(mod)
    start = s._canon(info.begin)
    if start is None:
        raise LookupError(f"{mod} is not mapped in the stand-in")
    pages = bytearray()
    for n in range(start // PAGE, (start + info.size - 1) // PAGE + 1):
        pages += s._pages[n]
    return bytes(pages[start % PAGE : start % PAGE + info.size])


class _CrashAt:
    """A replacement for `fault_point` that kills the session (SimulatedCrash) at the k-th point."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.count = 0
        self.names: list[str] = []

    def __call__(self, name: str) -> None:
        self.count += 1
        self.names.append(name)
        if self.count == self.k:
            raise SimulatedCrash(f"killed at point {self.k} ({name})")


def _torn_crash(s: PykdStandIn, k: int) -> None:
    """writeBytes call #k writes its first changed byte, then the connection dies."""
    real = s.writeBytes

    def write(offset: int, values: list[int], phyAddr: bool = False) -> None:
        if s.writes + 1 == k:
            s.writes += 1
            old = s.peek(offset, len(values))
            i = next((i for i in range(len(values)) if old[i] != values[i]), 0)
            s.poke(offset + i, bytes(values[i : i + 1]))
            raise SimulatedCrash(f"torn write #{k}")
        real(offset, values, phyAddr)

    s.writeBytes = write  # type: ignore[method-assign]


def _ico_session() -> tuple[PykdStandIn, Plan, str]:
    image, rva, _ = with_ico_call(session(X64[0])[1])
    s = PykdStandIn()
    mod = s.map_driver(image, import_call_optimization=True).name
    return s, make_plan(image, [ico_site(image, rva), *imm_sites(image)]), mod


def _stub_session() -> tuple[PykdStandIn, Plan, str]:
    s, image, mod = session(X64[0])
    return s, stub_plan(image), mod


def _x86_session() -> tuple[PykdStandIn, Plan, str]:
    s, image, mod = session(X86[1])
    return s, imm_plan(image), mod


_BUILDERS: dict[str, Callable[[], tuple[PykdStandIn, Plan, str]]] = {
    "x64-stub": _stub_session,
    "x64-import-call-optimised": _ico_session,
    "x86": _x86_session,
}


@functools.cache
def _base(case: str) -> tuple[PykdStandIn, Plan, str]:
    return _BUILDERS[case]()


def _fresh(case: str) -> tuple[PykdStandIn, Plan, str]:
    """A new debugging session on a freshly loaded driver (a copy of one built once per case)."""
    s, plan, mod = _base(case)
    return copy.deepcopy(s), plan, mod


LIVE = {name: functools.partial(_fresh, name) for name in _BUILDERS}


def _live_recovers(s: PykdStandIn, plan: Plan, mod: str, plan_path: Path, journal: Path, before: bytes) -> None:
    """After a crash: revert (if a journal exists) restores the exact bytes; apply + revert again work."""
    s.crash_writes = set()
    s.fail_writes = set()
    s.__dict__.pop("writeBytes", None)  # undo _torn_crash
    if journal.exists():
        live.revert_live(journal, pykd=s)
    assert _memory(s, mod) == before
    out = live.apply_live(plan_path, journal, pykd=s)
    after = _memory(s, mod)
    for p in plan.patches():
        assert after[p.rva : p.end] == p.replacement
    assert out.written + out.already == len(plan.patches())
    again = live.apply_live(plan_path, journal, pykd=s)
    assert again.written == 0  # a second apply writes nothing
    live.revert_live(journal, pykd=s)
    assert _memory(s, mod) == before


@pytest.mark.parametrize("case", sorted(LIVE))
def test_live_apply_killed_at_every_point(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    points = 0
    for k in range(1, MAX_POINTS):
        s, plan, mod = LIVE[case]()
        plan_path = write_plan_file(tmp_path, plan, f"p{k}.json")
        journal = tmp_path / f"p{k}.journal.json"
        before = _memory(s, mod)
        crash = _CrashAt(k)
        monkeypatch.setattr(apply_mod, "fault_point", crash)
        try:
            live.apply_live(plan_path, journal, pykd=s)
        except SimulatedCrash:
            points += 1
        finally:
            monkeypatch.undo()
        if crash.count < k:
            break
        _live_recovers(s, plan, mod, plan_path, journal, before)
    assert points >= 3 + 2 * len(plan.patches())


@pytest.mark.parametrize("torn", [False, True], ids=["dies-before-the-write", "torn-write"])
@pytest.mark.parametrize("case", sorted(LIVE))
def test_live_connection_dies_at_every_write(case: str, torn: bool, tmp_path: Path) -> None:
    _, plan, _ = LIVE[case]()
    n = len(plan.patches())
    for k in range(1, n + 1):
        s, plan, mod = LIVE[case]()
        plan_path = write_plan_file(tmp_path, plan, f"p{k}.json")
        journal = tmp_path / f"p{k}.journal.json"
        before = _memory(s, mod)
        if torn:
            _torn_crash(s, k)
        else:
            s.crash_writes = {k}
        with pytest.raises(SimulatedCrash):
            live.apply_live(plan_path, journal, pykd=s)
        assert pm.load(plan_path) == plan
        _live_recovers(s, plan, mod, plan_path, journal, before)


@pytest.mark.parametrize("case", sorted(LIVE))
def test_live_crash_during_rollback(case: str, tmp_path: Path) -> None:
    """Write #j fails, and the connection dies at rollback write #m: revert still restores everything."""
    _, plan, _ = LIVE[case]()
    n = len(plan.patches())
    for j in range(1, n + 1):
        for m in sorted({j + 1, j + (j + 1) // 2, 2 * j}):  # the rollback makes j writes after the failed one
            s, plan, mod = LIVE[case]()
            plan_path = write_plan_file(tmp_path, plan, f"p{j}_{m}.json")
            journal = tmp_path / f"p{j}_{m}.journal.json"
            before = _memory(s, mod)
            s.fail_writes = {j}
            s.crash_writes = {m}
            with pytest.raises((SimulatedCrash, TagsplitError)):
                live.apply_live(plan_path, journal, pykd=s)
            _live_recovers(s, plan, mod, plan_path, journal, before)


@pytest.mark.parametrize("torn", [False, True], ids=["dies-before-the-write", "torn-write"])
@pytest.mark.parametrize("case", sorted(LIVE))
def test_live_revert_dies_at_every_write(case: str, torn: bool, tmp_path: Path) -> None:
    _, plan, _ = LIVE[case]()
    for k in range(1, len(plan.patches()) + 1):
        s, plan, mod = LIVE[case]()
        plan_path = write_plan_file(tmp_path, plan, f"p{k}.json")
        journal = tmp_path / f"p{k}.journal.json"
        before = _memory(s, mod)
        live.apply_live(plan_path, journal, pykd=s)
        if torn:
            _torn_crash(s, s.writes + k)
        else:
            s.crash_writes = {s.writes + k}
        with pytest.raises(SimulatedCrash):
            live.revert_live(journal, pykd=s)
        _live_recovers(s, plan, mod, plan_path, journal, before)


# --- the WinDbg script route ------------------------------------------------------------------------------------


def _script_runs(s: PykdStandIn, text: str) -> list[str]:
    return Interp(s).run_script(text)


@pytest.mark.parametrize("case", ["x64-stub", "x86"])
def test_script_killed_at_every_eb_then_revert_script(case: str) -> None:
    _, plan, _ = LIVE[case]()
    apply_text, revert_text = render_apply(plan), render_revert(plan)
    for k in range(1, len(plan.patches()) + 1):
        s, _, mod = LIVE[case]()
        before = _memory(s, mod)
        s.crash_writes = {k}
        with pytest.raises(SimulatedCrash):
            _script_runs(s, apply_text)
        s.crash_writes = set()
        out = _script_runs(s, revert_text)
        assert out[-1].startswith("tagsplit: reverted"), out
        assert _memory(s, mod) == before
        # a second run of the apply script is harmless, and so is reverting again
        assert _script_runs(s, apply_text)[-1].endswith("patches verified")
        writes = s.writes
        assert _script_runs(s, apply_text)[-1].endswith("patches verified")
        assert s.writes == writes
        _script_runs(s, revert_text)
        assert _memory(s, mod) == before


@pytest.mark.parametrize("case", ["x64-stub", "x86"])
def test_script_torn_eb_then_revert_script(case: str) -> None:
    _, plan, _ = LIVE[case]()
    for k in range(1, len(plan.patches()) + 1):
        s, _, mod = LIVE[case]()
        before = _memory(s, mod)
        _torn_crash(s, k)
        with pytest.raises(SimulatedCrash):
            _script_runs(s, render_apply(plan))
        s.__dict__.pop("writeBytes", None)  # undo _torn_crash
        out = _script_runs(s, render_revert(plan))
        assert out[-1].startswith("tagsplit: reverted"), out
        assert _memory(s, mod) == before


def _x86_relocated_session() -> tuple[PykdStandIn, Plan, str]:
    """x86 with a redirected `call [abs32]`: its resident form holds the relocated abs32, which revert recomputes
    with `ed` after its `eb` (a second write per range that can be torn too)."""
    s, image, mod = session(X86[0])
    return s, make_plan(image, [x86_redirect_site(image), *imm_sites(image)]), mod


_SCRIPT_CASES = ["x64-stub", "x86", "x86-relocated-call", "x64-import-call-optimised"]


@functools.cache
def _script_base(case: str) -> tuple[PykdStandIn, Plan, str]:
    return _x86_relocated_session() if case == "x86-relocated-call" else _base(case)


def _script_fresh(case: str) -> tuple[PykdStandIn, Plan, str]:
    s, plan, mod = _script_base(case)
    return copy.deepcopy(s), plan, mod


def _reverted_by_script(case: str, plan: Plan, before: bytes, after: bytes) -> None:
    """`after` is `before`, except that a range the loader had rewritten with import call optimisation may now hold
    the file form, which the script restores there (equivalent code, see script.py). A relocated field is the exact
    resident value: the file form there would be wrong code in the rebased driver."""
    if case != "x64-import-call-optimised":
        assert after == before
        return
    for p in plan.patches():
        assert after[p.rva : p.end] in {before[p.rva : p.end], p.original}, hex(p.rva)
    assert changed_ranges(before, after) <= planned_bytes(plan)


# not "x86": k x j runs of its 26 patches take 45 s; its imm patches are covered by the 9-patch x86 case
@pytest.mark.parametrize("torn", [False, True], ids=["dies-before-the-write", "torn-write"])
@pytest.mark.parametrize("case", [c for c in _SCRIPT_CASES if c != "x86"])
def test_script_apply_dies_then_revert_dies_then_revert_script(case: str, torn: bool) -> None:
    """The debugger dies at the apply script's k-th write, then at the revert script's j-th write (an `eb`, or the
    `ed` of a relocated field: dying before it leaves the file form of the field), before the write or in the
    middle of it, for every k and j; the revert script run again restores the original every time."""
    _, plan, _ = _script_fresh(case)
    apply_text, revert_text = render_apply(plan), render_revert(plan)
    runs = 0

    def die_at(s: PykdStandIn, n: int | None) -> None:
        s.__dict__.pop("writeBytes", None)  # undo _torn_crash
        s.crash_writes = set()
        if n is not None and torn:
            _torn_crash(s, n)
        elif n is not None:
            s.crash_writes = {n}

    for k in range(1, len(plan.patches()) + 1):
        for j in range(1, MAX_POINTS):
            s, _, mod = _script_fresh(case)
            before = _memory(s, mod)
            die_at(s, k)
            with pytest.raises(SimulatedCrash):
                _script_runs(s, apply_text)
            die_at(s, s.writes + j)
            try:
                out = _script_runs(s, revert_text)
            except SimulatedCrash:
                runs += 1
            else:  # fewer than j writes: the revert completed
                assert out[-1].startswith("tagsplit: reverted"), out
                _reverted_by_script(case, plan, before, _memory(s, mod))
                break
            die_at(s, None)
            out = _script_runs(s, revert_text)
            assert out[-1].startswith("tagsplit: reverted"), out
            _reverted_by_script(case, plan, before, _memory(s, mod))
            writes = s.writes
            assert _script_runs(s, revert_text)[-1].startswith("tagsplit: reverted")
            assert s.writes == writes  # nothing left to restore
    assert runs >= len(plan.patches())


@pytest.mark.parametrize("case", _SCRIPT_CASES)
def test_script_revert_refuses_a_torn_range_with_a_foreign_byte(case: str) -> None:
    """A byte that is neither the replacement's nor the original's (nor the resident form's) is never written over,
    torn range or not: DIFFERS, and nothing is written anywhere."""
    _, plan, _ = _script_fresh(case)
    for k, p in enumerate(_apply_order(plan), 1):
        s, _, mod = _script_fresh(case)
        _torn_crash(s, k)
        with pytest.raises(SimulatedCrash):
            _script_runs(s, render_apply(plan))
        s.__dict__.pop("writeBytes", None)
        # the last byte no resident form wildcards (a loader-computed byte cannot be checked, as in the apply guard)
        alts = p.resident_alternatives
        i = max(i for i in range(len(p.original)) if all("?" not in a[2 * i : 2 * i + 2] for a in alts))
        va = s.module(mod).begin() + p.rva + i
        known = {p.original[i], p.replacement[i], s.peek(va, 1)[0], *(int(a[2 * i : 2 * i + 2], 16) for a in alts)}
        s.poke(va, bytes([next(b for b in (0xCC, 0x00, 0xF4, 0x90) if b not in known)]))
        memory, writes = _memory(s, mod), s.writes
        out = _script_runs(s, render_revert(plan))
        differs = [line for line in out if line.startswith("tagsplit: DIFFERS")]
        assert len(differs) == 1, out
        assert f"+{p.rva:#x} " in differs[0]
        assert out[-1].startswith("tagsplit: nothing written"), out
        assert (s.writes, _memory(s, mod)) == (writes, memory)


def _apply_order(plan: Plan) -> list[pm.Patch]:
    """The patches in the order the apply script writes them: stubs first (script.render_apply)."""
    return sorted(plan.patches(), key=lambda p: (not p.what.startswith("stub"), p.rva))


# --- the input changes under apply ------------------------------------------------------------------------------


def test_driver_changed_between_plan_and_apply_is_refused(file_case: FileCase, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    drv = tmp_path / DRIVER.name
    shutil.copy(DRIVER, drv)
    plan = tmp_path / "p.plan.json"
    assert main(["plan", str(drv), "--tag", "PShr", "-o", str(plan)]) == 0
    data = bytearray(drv.read_bytes())
    data[0x500] ^= 0xFF
    drv.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["apply", str(plan), "--to-file", str(tmp_path / "o.sys")]) == 2
    err = capsys.readouterr().err
    assert "not the build the plan was made for" in err
    assert not (tmp_path / "o.sys").exists()
    assert not (tmp_path / "o.sys.journal.json").exists()


def test_driver_changed_while_apply_reads_it(file_case: FileCase, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes checked against the plan are the bytes patched: a change right after the read cannot slip in."""
    import tagsplit.commands as commands

    drv = tmp_path / DRIVER.name
    shutil.copy(DRIVER, drv)
    plan = tmp_path / "p.plan.json"
    assert main(["plan", str(drv), "--tag", "PShr", *SPLIT, "-o", str(plan)]) == 0
    real = commands.read_file

    def read_then_change(p: Path, *a: Any) -> bytes:
        data = real(p, *a)
        if p == drv:
            drv.write_bytes(BIN.joinpath("patterns_gcc_x64_O2.sys").read_bytes())  # another build lands
        return data

    monkeypatch.setattr(commands, "read_file", read_then_change)
    assert main(["apply", str(plan), "--to-file", str(tmp_path / "o.sys")]) == 0
    assert (tmp_path / "o.sys").read_bytes() == file_case.expected
