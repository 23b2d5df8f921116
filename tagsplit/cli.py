"""The `tagsplit` command: a thin argparse layer over the pipeline stages."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import __version__, tags
from .errors import InputError, TagsplitError, UsageError

if TYPE_CHECKING:
    from .sites import DriverScan

# The disassemblers and assemblers (capstone, iced-x86, keystone, unicorn) are imported by the commands that use
# them, not here: `tagsplit --help` and every worker of a folder scan would pay for them otherwise.

DATA = Path(__file__).resolve().parent / "data"
SAMPLE = DATA / "sample_x64.sys"


def _int(text: str) -> int:
    try:
        return int(text.replace("`", ""), 16 if not text.lower().startswith("0x") else 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address: {text!r}") from None


def _tag(text: str) -> int:
    try:
        return tags.parse(text)
    except TagsplitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _driver_files(path: Path, walk_errors: list[str] | None = None) -> list[Path]:
    """The PE files of a folder (recursively, sorted; symlinked folders are not followed), or the file itself.

    Folders that cannot be listed are reported in `walk_errors` (one line each) and skipped.
    """
    if path.is_dir():
        import os

        found: list[Path] = []

        def unlistable(e: OSError) -> None:
            if walk_errors is not None:
                walk_errors.append(f"{e.filename}: cannot list: {e.strerror or e}")

        for folder, _dirs, names in os.walk(path, onerror=unlistable):
            for name in names:
                p = Path(folder) / name
                if p.is_file() and _looks_like_pe(p):
                    found.append(p)
        if not found:
            raise InputError(f"{path}: no PE files (.sys, .dll, .exe) in this folder")
        return sorted(found)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    return [path]


def _looks_like_pe(p: Path) -> bool:
    if p.suffix.lower() in (".sys", ".dll", ".exe", ".drv"):
        return True
    try:
        with p.open("rb") as f:
            return f.read(2) == b"MZ"
    except OSError:
        return True  # let the scan report why it cannot be read


# --- folder scans: one worker process per core -----------------------------------------------------------------
# Each file is read, checked and scanned in a worker; results come back in file order, so the output does not
# depend on timing. With --tag, a file whose bytes hold the tag (or its protected form) nowhere in its code
# sections cannot have a site passing it, nor an unexplained occurrence: it is only checked for sane PE headers
# (a corrupt one is still reported) and never disassembled. One file's failure, even a worker process dying, is
# reported on its own line and the scan goes on.

_Job = tuple[str, Optional[tuple[int, ...]], bool]  # path, wanted tags, whether the byte prefilter applies
_Result = tuple[str, object]  # ("scan", DriverScan) | ("skip", None) | ("error", message)


def _holds_tag_in(buf: Any, ranges: list[tuple[int, int]], wanted: tuple[int, ...]) -> bool:
    """Whether any wanted tag's 4 bytes, plain or with PROTECTED_POOL (which changes only the last byte), occur in
    `buf` (bytes or an mmap) within one of `ranges`: one pass per tag, searching for the 3 bytes both share."""
    import struct

    size = len(buf)
    for tag in wanted:
        plain = struct.pack("<I", tag & ~tags.PROTECTED_POOL & 0xFFFFFFFF)
        prefix, last = plain[:3], (plain[3], plain[3] | 0x80)
        for start, end in ranges:
            lo, hi = max(0, start - 3), min(size, end + 3)
            i = buf.find(prefix, lo, hi)
            while i >= 0:
                if i + 3 < hi and buf[i + 3] in last:
                    return True
                i = buf.find(prefix, i + 1, hi)
    return False


def _tag_bytes_in_code(data: bytes, wanted: tuple[int, ...]) -> bool:
    """Whether the file may hold a wanted tag's bytes inside an executable section (conservatively True)."""
    from .image import code_file_ranges

    ranges = code_file_ranges(data)
    return True if ranges is None else _holds_tag_in(data, ranges, wanted)


def _scan_job(job: _Job) -> _Result:
    """Read, check and scan one file; never raises (a worker must not take the folder scan down)."""
    from .image import code_file_ranges, parse, read_file

    path, wanted, prefilter = job
    try:
        data = read_file(Path(path))
        if prefilter and wanted is not None:
            ranges = code_file_ranges(data)
            if ranges is not None and not _holds_tag_in(data, ranges, wanted):
                return ("skip", None)  # cannot pass the tag, and its headers are sane (else parse says what is wrong)
        from .sites import scan_image

        return ("scan", scan_image(parse(data, path), set(wanted) if wanted is not None else None))
    except TagsplitError as e:
        return ("error", str(e))
    except MemoryError:
        return ("error", f"{path}: out of memory while scanning; skipped")
    except Exception as e:  # a bug: report it for this file and go on with the others
        return ("error", f"{path}: internal error ({type(e).__name__}: {e}); skipped, please report this file")


def _jobs() -> int:
    import os

    env = os.environ.get("TAGSPLIT_JOBS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))  # type: ignore[attr-defined,unused-ignore]
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _pool(workers: int) -> Any:
    import concurrent.futures
    import multiprocessing

    # fork: the workers start with tagsplit already imported (milliseconds instead of a fresh interpreter each)
    ctx = multiprocessing.get_context("fork") if sys.platform.startswith("linux") else multiprocessing.get_context()
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _alone(job: _Job) -> _Result:
    """Run one job in a process of its own, to tell which file killed a worker."""
    from concurrent.futures.process import BrokenProcessPool

    pool = _pool(1)
    try:
        result: _Result = pool.submit(_scan_job, job).result()
        return result
    except BrokenProcessPool:
        return ("error", f"{job[0]}: the scanning process died on this file (a crash in a native library, or out "
                         "of memory); skipped, please report this file")
    finally:
        pool.shutdown(wait=True)


def _scan_chunk(jobs: list[_Job]) -> list[_Result]:
    return [_scan_job(job) for job in jobs]


CHUNK_BYTES = 8 << 20  # files are sent to the workers in runs of up to 8 MiB or 32 files: one round trip each
CHUNK_FILES = 32


def _chunks(jobs: list[_Job]) -> list[tuple[int, int]]:
    """Consecutive [start, end) runs of jobs, by file size (unreadable files count as empty)."""
    import contextlib

    out: list[tuple[int, int]] = []
    start = size = 0
    for i, job in enumerate(jobs):
        with contextlib.suppress(OSError):
            size += Path(job[0]).stat().st_size
        if size >= CHUNK_BYTES or i + 1 - start >= CHUNK_FILES:
            out.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(jobs):
        out.append((start, len(jobs)))
    return out


def _run_jobs(jobs: list[_Job], workers: int, on_result: Callable[[int, _Result], None]) -> None:
    """Run every job in `workers` processes (in this one if workers == 1); `on_result` gets each result in job
    order."""
    from concurrent.futures.process import BrokenProcessPool

    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            on_result(i, _scan_job(job))
        return
    chunks = _chunks(jobs)
    pool = _pool(workers)
    futures: dict[int, Any] = {}
    ready: dict[int, list[_Result]] = {}
    submitted = done = 0
    try:
        while done < len(chunks):
            while submitted < len(chunks) and len(futures) < 64 * workers:  # keep every worker busy
                a, b = chunks[submitted]
                futures[submitted] = pool.submit(_scan_chunk, jobs[a:b])
                submitted += 1
            if done not in ready:
                try:
                    ready[done] = futures[done].result()
                except BrokenProcessPool:
                    # A worker died (segfault, OOM kill). Every unfinished job is re-run alone, which pins the file.
                    pool.shutdown(wait=False, cancel_futures=True)
                    for i, f in sorted(futures.items()):
                        ok = f.done() and not f.cancelled() and f.exception() is None
                        a, b = chunks[i]
                        ready[i] = f.result() if ok else [_alone(job) for job in jobs[a:b]]
                    futures.clear()
                    pool = _pool(workers)
                    continue
                del futures[done]
            a, _ = chunks[done]
            for k, result in enumerate(ready.pop(done)):
                on_result(a + k, result)
            done += 1
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class _Progress:
    """`scanned 12/345 files` on stderr, redrawn at most 10 times a second; only when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.on = total > 1 and sys.stderr.isatty()
        self.last = 0.0
        self.shown = False

    def update(self, done: int, current: str) -> None:
        import shutil
        import time

        if not self.on:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and done < self.total:
            return
        self.last = now
        width = shutil.get_terminal_size((80, 24)).columns - 1
        text = f"scanned {done}/{self.total} files  {current}"
        sys.stderr.write("\r" + text[:width].ljust(min(width, len(text) + 1)) + "\r")
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self.shown = False

    def message(self, text: str) -> None:
        self.clear()
        print(text, file=sys.stderr)


def _scan_folder(files: list[Path], wanted: set[int] | None) -> tuple[list[DriverScan], list[dict[str, str]]]:
    """Scan many files on every core; per-file errors are printed (in file order) and returned, never raised."""
    frozen = tuple(sorted(wanted)) if wanted is not None else None
    # The byte prefilter is exact for printable tags: their bytes cannot come from a sign-extended imm8.
    prefilter = frozen is not None and all(tags.printable(v) for v in frozen)
    jobs: list[_Job] = [(str(f), frozen, prefilter) for f in files]
    from .sites import DriverScan

    scans: list[DriverScan] = []
    errors: list[dict[str, str]] = []
    progress = _Progress(len(jobs))

    def on_result(i: int, result: _Result) -> None:
        kind, payload = result
        if kind == "scan" and isinstance(payload, DriverScan):
            scans.append(payload)
        elif kind == "error":
            errors.append({"path": str(files[i]), "error": str(payload)})
            progress.message(f"tagsplit: {payload}")
        progress.update(i + 1, files[i].name)

    try:
        _run_jobs(jobs, min(_jobs(), len(jobs)), on_result)
    finally:
        progress.clear()
    return scans, errors


def cmd_scan(args: argparse.Namespace) -> int:
    # imported before a folder scan forks its workers, so they start with the scanner loaded
    from .image import load
    from .sites import scan_image
    from .sites.render import document, render_text

    wanted = {t & ~tags.PROTECTED_POOL for t in args.tag} if args.tag else None
    scans: list[DriverScan] = []
    errors: list[dict[str, str]] = []
    many = False
    if args.mapped:
        if args.base is None:
            raise UsageError("--mapped needs --base ADDR, the driver's load address (lm in WinDbg)")
        like = load(args.imports_from) if args.imports_from else None
        image = load(args.mapped, mapped_base=args.base, imports_from=like)
        scans.append(scan_image(image, wanted))
    else:
        if args.base is not None or args.imports_from:
            raise UsageError("--base and --imports-from go with --mapped")
        inputs = args.driver or [str(SAMPLE)]
        walk_errors: list[str] = []
        files = [f for p in inputs for f in _driver_files(Path(p), walk_errors)]
        for line in walk_errors:
            print(f"tagsplit: {line}", file=sys.stderr)
            errors.append({"path": line.split(": cannot list:")[0], "error": line})
        many = len(files) > 1
        if not many:
            scans.append(scan_image(load(files[0]), wanted))
        else:
            scans, file_errors = _scan_folder(files, wanted)
            errors += file_errors
    if wanted is not None and many:
        # A folder scan answers "which drivers use this tag": leave out the ones that do not.
        scans = [s for s in scans if any(_uses(site.tag_value, wanted) for site in s.sites)
                 or any(s.unexplained_tag_bytes.get(v) for v in wanted)]
    if args.json:
        print(json.dumps(document(scans, errors), indent=2))
    else:
        print(render_text(scans, wanted, args.all), end="")
        if wanted is not None and many and not scans:
            print("no driver in the folder uses " + ", ".join(f"'{tags.display(v)}'" for v in sorted(wanted)))
    status = 1 if errors else 0
    for s in scans:
        if not s.is_driver:
            print(f"tagsplit: {s.path}: a user-mode image, not a kernel driver", file=sys.stderr)
            status = 1
    return status


def _uses(value: int | None, wanted: set[int]) -> bool:
    return value is not None and (value & ~tags.PROTECTED_POOL) in wanted


SCAN_EPILOG = textwrap.dedent(
    """\
    examples:
      tagsplit scan                               the bundled sample driver
      tagsplit scan mydrv.sys --tag Leak          the sites that pass 'Leak', and the frees that pass it
      tagsplit scan C:\\Windows\\System32\\drivers --tag Leak   which drivers use 'Leak' (unlike findstr, no false hits)
      tagsplit scan mydrv.sys --all --json        every site, frees included, as JSON
      tagsplit scan --mapped mydrv.bin --base fffff80123450000 --imports-from mydrv.sys
                                                  a memory image written by `.writemem mydrv.bin <start> L?<size>`
    tags are written as PoolMon shows them (Leak, "Ab c", 'Ab ') or as the dword value (0x6b61654c)
    """
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tagsplit",
        description="Find which call site of a driver leaks pool: give each site of a shared pool tag its own tag.",
    )
    parser.add_argument("--version", action="version", version=f"tagsplit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    scan = sub.add_parser(
        "scan",
        help="list the pool call sites of a driver and where each tag comes from (changes nothing)",
        epilog=SCAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scan.add_argument("driver", nargs="*", help="driver files or folders (default: the bundled sample driver)")
    scan.add_argument("--tag", action="append", type=_tag, default=[], help="only this tag (repeatable)")
    scan.add_argument("--all", action="store_true", help="include free sites")
    scan.add_argument("--json", action="store_true", help="print one JSON document")
    scan.add_argument("--mapped", metavar="FILE", help="a memory image of the loaded driver (.writemem)")
    scan.add_argument("--base", type=_int, help="with --mapped: the address the image was loaded at")
    scan.add_argument("--imports-from", metavar="DRIVER", help="with --mapped: take import names from this file")
    scan.set_defaults(func=cmd_scan)

    from . import commands
    from .plan.model import SPLITS

    plan = sub.add_parser(
        "plan",
        help="give each site of the suspect tag its own new tag; writes a reviewable plan (changes nothing)",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("driver", help="the driver file")
    plan.add_argument("--tag", action="append", type=_tag, default=[], help="suspect tag (repeatable)")
    plan.add_argument("--all-tags", action="store_true", help="split every constant tag the driver uses")
    plan.add_argument("-o", "--output", help="plan file (default: patches/<driver>.<tag>.plan.json)")
    plan.add_argument("--prefix", help="two characters the new tags start with (default: the old tag's first two)")
    plan.add_argument("--avoid", action="append", default=[], metavar="FILE",
                      help="tags not to use: pooltag.txt, saved !poolused/PoolMon output, another plan")
    plan.add_argument("--split", action="append", default=[], choices=SPLITS,
                      help="shared: one stub per site where one constant feeds several; untagged: ExAllocatePool "
                           "sites too; frees: set the tag of frees that pass the old tag to 0")
    plan.set_defaults(func=commands.cmd_plan)

    apply_p = sub.add_parser("apply", help="write a plan: patched file, WinDbg script, or live kernel (pykd)",
                             epilog=APPLY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    apply_p.add_argument("plan")
    apply_p.add_argument("--to-file", metavar="OUT.sys", help="write a patched copy of the driver")
    apply_p.add_argument("--windbg-script", metavar="OUT.txt", help="write a WinDbg command script (and its revert)")
    apply_p.add_argument("--live", action="store_true", help="patch resident memory (inside WinDbg/KD via pykd)")
    apply_p.add_argument("--driver", help="the driver file, if not where the plan says")
    apply_p.add_argument("--journal", help="journal file (default: next to the output or the plan)")
    apply_p.add_argument("--allow-local", action="store_true", help="allow local kernel debugging (lkd); unsafe")
    apply_p.set_defaults(func=commands.cmd_apply)

    revert = sub.add_parser("revert", help="restore the original bytes recorded in an apply journal")
    revert.add_argument("journal")
    revert.add_argument("--file", help="the patched file, if it moved")
    revert.set_defaults(func=commands.cmd_revert)

    verify = sub.add_parser("verify", help="run every patched site in an emulator and check its new tag")
    verify.add_argument("plan")
    verify.add_argument("--driver", help="the driver file, if not where the plan says")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=commands.cmd_verify)

    snap = sub.add_parser("snapshot", help="record pool use per tag: from WinDbg (--live) or a saved output (--from)",
                          epilog=SNAPSHOT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    snap.add_argument("--live", metavar="PLAN", help="inside WinDbg/KD: !poolused for the plan's tags")
    snap.add_argument("--from", dest="from_file", metavar="FILE", help="!poolused/!poolfind/PoolMon text (.logopen)")
    snap.add_argument("--at", help="with --from: the time of the output (ISO-8601); default: from the log, or mtime")
    snap.add_argument("--poolfind", action="store_true", help="also list blocks with !poolfind (slow)")
    snap.add_argument("--every", type=float, default=60.0, help="seconds between snapshots")
    snap.add_argument("--count", type=int, default=1, help="how many snapshots")
    snap.add_argument("-o", "--output", default="snapshots.jsonl", help="file to append to (default snapshots.jsonl)")
    snap.set_defaults(func=commands.cmd_snapshot)

    report = sub.add_parser("report", help="which call site holds how much pool, and how fast it grows")
    report.add_argument("plan")
    report.add_argument("snapshots", nargs="+")
    fmt = report.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--csv", action="store_true")
    fmt.add_argument("--markdown", action="store_true")
    report.add_argument("--plot", metavar="PNG", help="outstanding bytes over time per site (needs matplotlib)")
    report.set_defaults(func=commands.cmd_report)

    demo = sub.add_parser("demo", help="the whole procedure on the bundled sample driver, in an emulated kernel")
    demo.add_argument("--out", default="tagsplit-demo", help="folder for the plan, snapshots, report and plot")
    demo.add_argument("--minutes", type=int, default=6)
    demo.add_argument("--arch", choices=("x64", "x86"), default="x64")
    demo.add_argument("--driver", help=argparse.SUPPRESS)
    demo.add_argument("--workload", default="SampleWorkLeaky", help=argparse.SUPPRESS)
    demo.add_argument("--tag", default="Smpl", help=argparse.SUPPRESS)
    demo.add_argument("--split", action="append", default=[], choices=SPLITS, help=argparse.SUPPRESS)
    demo.set_defaults(func=commands.cmd_demo)
    return parser


SNAPSHOT_EPILOG = textwrap.dedent(
    """\
    examples:
      !py -3.9 -m tagsplit.live snapshot plan.json -o snaps.jsonl    inside WinDbg, each time you break in
      tagsplit snapshot --from poolused.log --at 2026-11-26T10:00:00Z -o snaps.jsonl
      tagsplit report plan.json snaps.jsonl --plot growth.png
    """
)


PLAN_EPILOG = textwrap.dedent(
    """\
    examples:
      tagsplit plan mydrv.sys --tag Leak                 one new tag per site: Le01, Le02, ...
      tagsplit plan mydrv.sys --tag Leak --split shared  also split sites that share one constant (stubs)
      tagsplit plan mydrv.sys --tag Leak --avoid pooltag.txt --avoid poolused.log
    then: tagsplit verify PLAN, and tagsplit apply PLAN --live | --windbg-script OUT.txt | --to-file OUT.sys
    """
)
APPLY_EPILOG = textwrap.dedent(
    """\
    examples:
      !py -3.9 -m tagsplit.live apply plan.json       inside WinDbg/KD, broken in (same as apply --live)
      tagsplit apply plan.json --windbg-script split.txt   then `$$><split.txt` in WinDbg; split.revert.txt undoes it
      tagsplit apply plan.json --to-file mydrv.split.sys   a patched copy (test-sign it to load it)
      tagsplit revert mydrv.split.sys.journal.json
    """
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except TagsplitError as e:
        print(f"tagsplit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tagsplit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
