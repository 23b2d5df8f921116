"""Apply and revert a plan on any Target: verify everything, journal, write, read back, roll back on failure.

Standard library only: this runs inside WinDbg's Python (pykd) as well as in the CLI.

Crash safety: the journal is replaced atomically (temporary file, fsync, rename) and is written before the first
write to the target, so from the first write on there is always a journal that `revert` can use. A target whose
writes only become durable later (the patched file: `commit`) is committed before the journal says `applied`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import InputError, PatchConflictError, PlanError, TargetError, TargetReadError, TargetWriteError
from ..plan.model import CODE, Patch, Plan, digest, parse_json, read_text

if TYPE_CHECKING:
    from pathlib import Path

    from .base import Target

JOURNAL_SCHEMA = 1
MAX_JOURNAL_FILE = 64 << 20

# --- fault injection (tests only) ----------------------------------------------------------------------------
# Inert unless the environment sets TAGSPLIT_FAULT_AT=k. Every step after which a crash would leave a different
# state on disk or in the target calls fault_point(name); the k-th call in the process then either ends the process
# on the spot with os._exit(FAULT_EXIT), as a kill -9 there would, or, with TAGSPLIT_FAULT=raise, raises
# OSError(EIO), as a failed write there would. tests/test_apply_faults.py runs `tagsplit apply` with k = 1, 2, ...
# until a run passes every point. In-process tests replace `fault_point` itself (monkeypatch).
FAULT_EXIT = 86
_fault_count = 0


def fault_point(name: str) -> None:
    """A point where tests may kill the process or fail the step (see above); does nothing unless configured."""
    at = os.environ.get("TAGSPLIT_FAULT_AT")
    if not at:
        return
    global _fault_count
    _fault_count += 1
    if at.strip() != str(_fault_count):
        return
    if os.environ.get("TAGSPLIT_FAULT") == "raise":
        raise OSError(errno.EIO, f"injected fault at point {_fault_count} ({name})")
    sys.stderr.write(f"tagsplit: injected crash at point {_fault_count} ({name})\n")
    sys.stderr.flush()
    os._exit(FAULT_EXIT)


@dataclass(frozen=True)
class Entry:
    rva: int
    original: bytes  # what the target held before tagsplit wrote (what revert restores)
    replacement: bytes
    what: str = ""


@dataclass(frozen=True)
class Outcome:
    written: int  # patches written now
    already: int  # patches that were already in place
    journal: Path


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_journal(path: Path, doc: dict[str, Any]) -> None:
    """Atomically replace the journal: a crash leaves the old or the new one, never half of one."""
    state = doc.get("state", "")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        fault_point(f"journal {state}: before writing")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"journal {state}: written, not yet renamed")
        tmp.replace(path)
        fault_point(f"journal {state}: renamed")
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise InputError(f"{path}: cannot write the journal: {e.strerror or e}") from e
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); best effort, a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_journal(path: Path) -> dict[str, Any]:
    """Read and check a journal; every entry is validated, so `journal_entries` cannot fail on it.

    Raises:
        InputError: the file cannot be read.
        PlanError: not a tagsplit journal, or a corrupt one.
    """
    text = read_text(path, "the journal", MAX_JOURNAL_FILE)
    doc = parse_json(text, path, "a tagsplit journal")
    if not isinstance(doc, dict) or doc.get("tool") != "tagsplit-journal" or doc.get("schema") != JOURNAL_SCHEMA:
        raise PlanError(f"{path}: not a tagsplit journal")
    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise PlanError(f"{path}: journal has no entries")
    for entry in entries:
        try:
            _entry(entry)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            shown = repr(entry)
            raise PlanError(f"{path}: corrupt journal entry {shown[:120]}") from err
    return doc


def _entry(e: Any) -> Entry:
    if not isinstance(e, dict):
        raise TypeError("not an object")
    rva = int(e["rva"], 16)
    original, replacement = bytes.fromhex(e["original"]), bytes.fromhex(e["replacement"])
    what = e.get("what", "")
    if not 0 <= rva <= 0xFFFFFFFF or not original or len(original) != len(replacement) or not isinstance(what, str):
        raise ValueError("rva, length or what")
    return Entry(rva, original, replacement, what)


def journal_entries(doc: dict[str, Any]) -> list[Entry]:
    return [_entry(e) for e in doc["entries"]]


def _order(patches: list[Patch]) -> list[Patch]:
    # Stubs first: no call may be redirected to a stub that is not fully written yet.
    return sorted(patches, key=lambda p: (0 if p.what.startswith("stub") else 1, p.rva))


def _read(target: Target, va: int, size: int) -> bytes:
    try:
        data = target.read(va, size)
    except TargetError:
        raise
    except Exception as e:  # a backend that forgot to translate its errors still must not crash the tool
        raise TargetReadError(f"cannot read {size} bytes at {va:#x}: {e}") from e
    if len(data) != size:
        raise TargetReadError(f"short read at {va:#x}: {len(data)} of {size} bytes")
    return bytes(data)


def apply(
    plan: Plan,
    target: Target,
    journal: Path,
    *,
    scopes: tuple[str, ...] = (CODE,),
    extra: list[Patch] | None = None,
    commit: Callable[[], object] | None = None,
    journal_fields: dict[str, Any] | None = None,
) -> Outcome:
    """Write the plan's patches to `target`; see the module docstring for the guarantees.

    `commit`, if given, makes the writes durable (the patched file's atomic rename); it runs after every write was
    read back and before the journal says `applied`, and a failure there is rolled back like a failed write.
    `journal_fields` are added to the journal (e.g. the output file's path), already in its first version.

    Raises:
        PatchConflictError: some range holds neither the plan's original nor its replacement bytes.
        TargetReadError / TargetWriteError: the target failed; everything written was rolled back.
        InputError: the journal cannot be written, or `commit` failed (rolled back).
    """
    base = target.module_base()
    patches = _order([p for p in plan.patches() if p.scope in scopes] + list(extra or []))
    pending: list[tuple[Patch, bytes]] = []
    entries: list[Entry] = []
    conflicts: list[str] = []
    for p in patches:
        try:
            cur = _read(target, base + p.rva, len(p.original))
        except TargetReadError as e:
            raise TargetReadError(f"{e} (RVA {p.rva:#x}; a paged-out page? `.pagein` it and retry)") from e
        if cur == p.replacement:
            entries.append(Entry(p.rva, p.original, p.replacement, p.what))
        elif cur == p.original or p.resident_match(cur):
            pending.append((p, cur))
            entries.append(Entry(p.rva, cur, p.replacement, p.what))
        else:
            conflicts.append(f"{p.rva:#x}: found {cur.hex()}, plan expects {p.original.hex()}")
    if conflicts:
        more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
        raise PatchConflictError(
            f"{plan.driver.name}: bytes differ from the plan at {'; '.join(conflicts[:3])}{more}; nothing written "
            "(another build of the driver, or patched by someone else?)"
        )
    doc = _journal_doc(plan, target, base, entries, journal)
    doc.update(journal_fields or {})
    if not pending:
        if commit is not None:
            commit()  # before the journal: it never says `applied` of an output that is not there
        if not journal.exists():
            doc["state"] = "applied"
            doc["note"] = "every patch was already in place; originals taken from the plan"
            write_journal(journal, doc)
        return Outcome(0, len(patches), journal)
    write_journal(journal, doc)  # before the first write: a crash from here on can always be reverted
    written: list[tuple[Patch, bytes]] = []
    try:
        for i, (p, cur) in enumerate(pending, 1):
            va = base + p.rva
            # Recorded before the write: a write that fails half-way (torn) must be rolled back too.
            written.append((p, cur))
            fault_point(f"apply: before write {i} of {len(pending)}")
            target.write(va, p.replacement)
            fault_point(f"apply: after write {i} of {len(pending)}")
            back = _read(target, va, len(p.replacement))
            if back != p.replacement:
                raise TargetWriteError(f"read-back at {va:#x} gives {back.hex()}, wrote {p.replacement.hex()}")
        if commit is not None:
            commit()
    except Exception as e:
        failed = _rollback(target, base, written)
        doc["state"] = "rolled-back" if not failed else "rollback-incomplete"
        doc["error"] = str(e)
        write_journal(journal, doc)
        if failed:
            raise TargetWriteError(
                f"{e}; rolling back failed at RVA {', '.join(failed)}: run revert with the journal {journal}"
            ) from e
        if isinstance(e, (TargetError, InputError)):
            raise
        raise TargetWriteError(f"write failed: {e}") from e
    doc["state"] = "applied"
    doc["applied"] = _now()
    write_journal(journal, doc)
    return Outcome(len(pending), len(patches) - len(pending), journal)


def _rollback(target: Target, base: int, written: list[tuple[Patch, bytes]]) -> list[str]:
    """Put back what each range held; returns the RVAs that could not be restored (verified by reading back)."""
    failed: list[str] = []
    for p, cur in reversed(written):
        try:
            fault_point(f"rollback: before restoring {p.rva:#x}")
            target.write(base + p.rva, cur)
            if _read(target, base + p.rva, len(cur)) != cur:
                failed.append(f"{p.rva:#x}")
        except Exception:  # best effort; the journal still holds the originals for `revert`
            failed.append(f"{p.rva:#x}")
    return failed


def _journal_doc(plan: Plan, target: Target, base: int, entries: list[Entry], path: Path) -> dict[str, Any]:
    previous: dict[int, bytes] = {}
    if path.exists():
        try:
            old = read_journal(path)
            if old.get("plan_sha256") == digest(plan):
                previous = {e.rva: e.original for e in journal_entries(old)}
        except (PlanError, InputError):
            pass
    return {
        "tool": "tagsplit-journal",
        "schema": JOURNAL_SCHEMA,
        "state": "started",
        "started": _now(),
        "plan_sha256": digest(plan),
        "driver": {"name": plan.driver.name, "sha256": plan.driver.sha256},
        "module": plan.module,
        "target": target.name,
        "module_base": f"{base:#x}",
        "entries": [
            {
                "rva": f"{e.rva:#x}",
                "va": f"{base + e.rva:#x}",
                # an earlier journal of the same plan knows the true originals of ranges already patched
                "original": previous.get(e.rva, e.original).hex(),
                "replacement": e.replacement.hex(),
                "what": e.what,
            }
            for e in entries
        ],
    }


def _torn(cur: bytes, e: Entry) -> bool:
    """A range left half-written by a crash in the middle of a write: every byte is the original's or the
    replacement's. Only tagsplit could have produced it, so restoring the original is safe."""
    return len(cur) == len(e.original) and all(c in (o, r) for c, o, r in zip(cur, e.original, e.replacement))


def revert(journal: Path, target: Target, *, commit: Callable[[], object] | None = None) -> Outcome:
    """Restore every journalled range to its original bytes. Verifies all ranges before writing any.

    `commit`, as for `apply`, runs after every restore was read back and before the journal says `reverted`.

    Raises:
        PatchConflictError: a range holds neither its original nor its replacement bytes; nothing written.
    """
    doc = read_journal(journal)
    entries = journal_entries(doc)
    base = target.module_base()
    todo: list[Entry] = []
    conflicts: list[str] = []
    for e in entries:
        try:
            cur = _read(target, base + e.rva, len(e.original))
        except TargetReadError as err:
            raise TargetReadError(f"{err} (RVA {e.rva:#x}; a paged-out page? `.pagein` it and retry)") from err
        if cur == e.original:
            continue
        if cur == e.replacement or _torn(cur, e):
            todo.append(e)
        else:
            conflicts.append(f"{e.rva:#x}: found {cur.hex()}")
    if conflicts:
        raise PatchConflictError(
            f"cannot revert: bytes changed since apply at {'; '.join(conflicts[:3])}; nothing written"
        )
    done: list[Entry] = []
    try:
        # Calls back to the allocator first, stubs last: nothing may jump into a stub being erased.
        for i, e in enumerate(sorted(todo, key=lambda e: (e.what.startswith("stub"), e.rva)), 1):
            done.append(e)  # before the write: a torn restore is put back to the replacement on failure
            fault_point(f"revert: before write {i} of {len(todo)}")
            target.write(base + e.rva, e.original)
            fault_point(f"revert: after write {i} of {len(todo)}")
            if _read(target, base + e.rva, len(e.original)) != e.original:
                raise TargetWriteError(f"read-back after revert at {base + e.rva:#x} differs")
        if commit is not None:
            commit()
    except Exception as err:
        for e in reversed(done):
            # best effort; the journal is unchanged, so revert can be retried from any mix of the two
            with contextlib.suppress(Exception):
                target.write(base + e.rva, e.replacement)
        if isinstance(err, (TargetError, InputError)):
            raise
        raise TargetWriteError(f"revert failed: {err}") from err
    doc["state"] = "reverted"
    doc["reverted"] = _now()
    write_journal(journal, doc)
    return Outcome(len(todo), len(entries) - len(todo), journal)
