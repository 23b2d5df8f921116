"""Fuzz tagsplit's readers of untrusted input: the PE loader and scanner, the plan and journal loaders, and every
debugger-output parser. Any exception other than tagsplit's own errors (TagsplitError) is a bug; so is a broken
property (a plan that does not survive its own JSON, a revert that does not restore, a folder-scan prefilter that
would skip a driver the scanner reports).

    python benchmarks/fuzz.py [--target T ...] [--seconds N] [--engine mutate|atheris] [--seed S] [--save]

Engines:
  mutate   (default) structure-aware mutation of the seeds: PE header fields set to boundary values, section tables
           and data directories pointed anywhere, truncation and splicing; line-level edits of debugger output;
           subtree replacement in plan/journal JSON. Pure Python, deterministic for a given --seed.
  atheris  coverage-guided libFuzzer (`pip install atheris`), one child process per target, seeded with the same
           seeds; inputs are the raw bytes of the file/text.
Every distinct failure (exception type and the innermost tagsplit function) is printed with its traceback once;
with --save its smallest input so far is written to tests/regressions/<target>/, where tests/test_fuzz.py replays it
on every test run. Failures already in the regression corpus (known bugs marked xfail there) are not reported again.

Seeds: testbins/bin/*.sys, tagsplit/data/*.sys and ../shared/corpus/github/*/*.sys (if present); tests/data/windbg
samples; plans made by the planner for the sample drivers, and the journals of applying them.

This module is also the harness of tests/test_fuzz.py (the bounded pass in the test suite).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import random
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tagsplit import tags  # noqa: E402
from tagsplit.errors import TagsplitError  # noqa: E402
from tagsplit.image import Image, code_file_ranges, parse  # noqa: E402
from tagsplit.plan import model as pm  # noqa: E402
from tagsplit.sites import scan_image  # noqa: E402

REGRESSIONS = ROOT / "tests" / "regressions"
WINDBG = ROOT / "tests" / "data" / "windbg"
CORPUS = ROOT.parent / "shared" / "corpus" / "github"
MAPPED_BASE = 0xFFFFF80012340000
SLOW = 5.0  # seconds: an input that takes longer is reported as a finding ("slow")


class PropertyBroken(AssertionError):
    """A fuzz property does not hold (not an exception tagsplit raised)."""


# --- seeds -------------------------------------------------------------------------------------------------------


@functools.cache
def pe_seeds() -> tuple[bytes, ...]:
    files = sorted((ROOT / "testbins" / "bin").glob("*.sys")) + sorted((ROOT / "tagsplit" / "data").glob("*.sys"))
    if CORPUS.is_dir():
        files += [p for p in sorted(CORPUS.glob("*/*.sys")) if p.stat().st_size <= 128 << 10]
    return tuple(p.read_bytes() for p in files)


@functools.cache
def text_seeds(kind: str) -> tuple[str, ...]:
    files = sorted(WINDBG.glob(f"{kind}_*.txt")) if kind else sorted(WINDBG.glob("*.txt"))
    return tuple(p.read_text(encoding="utf-8", errors="replace") for p in files)


@functools.cache
def _seed_images() -> dict[str, tuple[Image, bytes]]:
    """The sample drivers plans are made for, by sha256 (fuzzed plans and journals are applied to them)."""
    out = {}
    for p in [ROOT / "tagsplit" / "data" / "sample_x64.sys", ROOT / "tagsplit" / "data" / "sample_x86.sys",
              ROOT / "testbins" / "bin" / "patterns_clang_x64.sys"]:
        data = p.read_bytes()
        image = parse(data, str(p))
        out[image.sha256] = (image, data)
    return out


@functools.cache
def plan_seeds() -> tuple[bytes, ...]:
    """Plan documents (JSON bytes): the committed ones and split-all plans of the seed drivers (stubs, frees)."""
    from tagsplit.plan.make import Options, make_plan

    docs = [p.read_bytes() for p in sorted((ROOT / "patches").glob("*.plan.json"))]
    for image, _ in _seed_images().values():
        scan = scan_image(image)
        wanted = tuple(sorted({s.tag_value for s in scan.sites if s.tag_value and s.role != "free"
                               and tags.printable(s.tag_value)}))
        plan = make_plan(image, scan, Options(wanted, split=frozenset({"shared", "untagged", "frees"})))
        docs.append(pm.dumps(plan).encode())
    return tuple(docs)


@functools.cache
def journal_seeds() -> tuple[bytes, ...]:
    """Journals of applying the plan seeds to patched files (states applied and reverted)."""
    from tagsplit.targets.apply import apply, revert
    from tagsplit.targets.file import PatchedFile

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, doc in enumerate(plan_seeds()):
            plan = pm.from_json(json.loads(doc))
            image, data = _seed_images()[plan.driver.sha256]
            journal = Path(tmp) / f"j{i}.json"
            target = PatchedFile(image, data)
            apply(plan, target, journal, scopes=(pm.CODE, pm.FILE_ONLY))
            out.append(journal.read_bytes())
            revert(journal, target)
            out.append(journal.read_bytes())
    return tuple(out)


# --- targets -----------------------------------------------------------------------------------------------------


def run_pe(data: bytes) -> None:
    """parse + scan + render; the folder-scan prefilter must agree with the scan (never skip a user of a tag)."""
    from tagsplit.cli import _tag_bytes_in_code
    from tagsplit.sites.render import document, render_text

    ranges = code_file_ranges(data)  # never raises
    image = parse(data, "fuzz.sys")
    scan = scan_image(image)
    render_text([scan], None, True)  # what `tagsplit scan` prints of it, text and JSON
    json.dumps(document([scan]))
    if ranges is not None:
        for sec in image.code_sections():
            if sec.raw_size and not any(a <= sec.raw_offset and sec.raw_offset + sec.raw_size <= b for a, b in ranges):
                raise PropertyBroken(f"code_file_ranges misses section {sec.name!r} at file offset {sec.raw_offset:#x}")
    used = {s.tag_value & ~tags.PROTECTED_POOL for s in scan.sites if s.tag_value is not None}
    used |= {v for v, hits in scan.unexplained_tag_bytes.items() if hits}
    for v in sorted(used):
        if tags.printable(v) and not _tag_bytes_in_code(data, (v,)):
            raise PropertyBroken(f"the prefilter would skip this driver for tag {tags.display(v)!r} it uses")


def run_pe_mapped(data: bytes) -> None:
    scan_image(parse(data, "fuzz.bin", mapped_base=MAPPED_BASE))


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def run_poolused(data: bytes) -> None:
    from tagsplit.snapshots import parse_poolused, parse_poolused_tables

    text = _text(data)
    for f in (parse_poolused, parse_poolused_tables):
        with contextlib.suppress(TagsplitError):
            f(text)


def run_poolfind(data: bytes) -> None:
    from tagsplit.snapshots import parse_poolfind

    parse_poolfind(_text(data))


def run_poolmon(data: bytes) -> None:
    from tagsplit.snapshots import parse_poolmon, parse_poolmon_snapshots

    text = _text(data)
    for f in (parse_poolmon, parse_poolmon_snapshots):
        with contextlib.suppress(TagsplitError):
            f(text)


def run_snapshot(data: bytes) -> None:
    """detect_format, then the parser it picks, through parse_snapshot."""
    from tagsplit.snapshots import detect_format, parse_snapshot

    text = _text(data)
    with contextlib.suppress(TagsplitError):
        detect_format(text)
    parse_snapshot(text, "2026-01-01T00:00:00Z")


def run_plan(data: bytes) -> None:
    """Load a plan as `tagsplit apply` does; a plan that loads must survive its JSON, render as WinDbg scripts, and
    apply + revert on its driver must give back the exact original bytes."""
    from tagsplit.targets.apply import apply, revert
    from tagsplit.targets.file import PatchedFile
    from tagsplit.targets.script import render_apply, render_revert

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # pm.load reports this as a PlanError
    plan = pm.from_json(pm.parse_json(text, "fuzz.plan.json", "a plan"))
    text = pm.dumps(plan)
    if pm.dumps(pm.from_json(json.loads(text))) != text:
        raise PropertyBroken("the plan does not survive its own JSON")
    pm.digest(plan)
    for render in (render_apply, render_revert):
        with contextlib.suppress(TagsplitError):
            render(plan)
    seed = _seed_images().get(plan.driver.sha256)
    if seed is None:
        return
    image, original = seed
    target = PatchedFile(image, original)
    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / "j.json"
        try:
            apply(plan, target, journal, scopes=(pm.CODE, pm.FILE_ONLY))
        except TagsplitError:
            if bytes(target.buf) != original:
                raise PropertyBroken("a failed apply left bytes changed") from None
            return
        revert(journal, target)
    if bytes(target.buf) != original:
        raise PropertyBroken("apply then revert does not give back the original bytes")


def run_journal(data: bytes) -> None:
    """read_journal + revert against a patched file: only clear errors, and nothing written unless it reverts."""
    from tagsplit.targets.apply import journal_entries, read_journal, revert
    from tagsplit.targets.file import PatchedFile

    image, original = next(iter(_seed_images().values()))
    with tempfile.TemporaryDirectory() as tmp:
        journal = Path(tmp) / "j.json"
        journal.write_bytes(data)
        doc = read_journal(journal)
        journal_entries(doc)
        target = PatchedFile(image, original)
        with contextlib.suppress(TagsplitError):
            revert(journal, target)


# --- mutators ----------------------------------------------------------------------------------------------------

INTERESTING = (0, 1, 2, 4, 0x7F, 0x80, 0xFF, 0x100, 0x200, 0x400, 0xFFF, 0x1000, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x100000, 0x1000000, 0x10000000, 0x3FFFFFFF, 0x40000000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE,
               0xFFFFFFFF)


def _pe_fields(d: bytes) -> list[tuple[int, int]]:
    """(offset, width) of the header fields worth mutating: e_lfanew, file/optional header fields, data
    directories, section table entries (found with struct; empty if the headers are unreadable)."""
    out = [(0x3C, 4)]
    try:
        pe = struct.unpack_from("<I", d, 0x3C)[0]
        count, opt_size = struct.unpack_from("<H12xH", d, pe + 6)
        magic = struct.unpack_from("<H", d, pe + 24)[0]
    except struct.error:
        return [(o, w) for o, w in out if o + w <= len(d)]
    opt = pe + 24
    out += [(pe + 4, 2), (pe + 6, 2), (pe + 20, 2), (opt, 2), (opt + 16, 4), (opt + 56, 4), (opt + 60, 4)]
    dirs = opt + (112 if magic == 0x20B else 96)
    out += [(dirs + 8 * i + k, 4) for i in range(16) for k in (0, 4)]
    table = opt + opt_size
    for i in range(min(count, 96)):
        out += [(table + 40 * i + k, 4) for k in (8, 12, 16, 20, 36)]
    return [(o, w) for o, w in out if o + w <= len(d)]


def mutate_bytes(rng: random.Random, seeds: tuple[bytes, ...]) -> bytes:
    d = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 4)):
        if not d:
            break
        r = rng.random()
        fields = _pe_fields(bytes(d)) if r < 0.45 else []
        if fields:
            off, width = rng.choice(fields)
            v = rng.choice(INTERESTING) if rng.random() < 0.7 else rng.getrandbits(32)
            if rng.random() < 0.2:
                v = len(d) + rng.choice((-4, 0, 4, 0x1000))  # relative to the file size
            struct.pack_into("<I" if width == 4 else "<H", d, off, v & (0xFFFFFFFF if width == 4 else 0xFFFF))
        elif r < 0.65:
            d[rng.randrange(len(d))] = rng.getrandbits(8)
        elif r < 0.75 and len(d) > 8:
            at = rng.randrange(len(d) - 4)
            struct.pack_into("<I", d, at, rng.choice(INTERESTING))
        elif r < 0.83:
            del d[rng.randrange(len(d)) :]
        elif r < 0.9:
            at = rng.randrange(len(d) + 1)
            d[at:at] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        else:  # splice another seed's tail
            other = rng.choice(seeds)
            at = rng.randrange(len(d) + 1)
            d[at:] = other[rng.randrange(len(other) + 1) :]
    return bytes(d)


_TEXT_BITS = ("\t", " ", "\n", "\r\n", "`", "0", "9", "x", "(", ")", ":", "*", "kd> ", "0: kd> ", "TOTAL", "Tag",
              "\x00", "\u00e9", "-", "+", ".", "fffff800`12345678", "0x10", "99999999999999999999", "Nonpaged",
              "Paged", "Allocated", "Free", "(Protected)", "size:", "previous size:", "Searching", "Per Alloc",
              "Sorting by", " Tag  ", "\ufeff", "\x0c", "-1")


def mutate_text(rng: random.Random, seeds: tuple[str, ...]) -> bytes:
    lines = rng.choice(seeds).split("\n")
    for _ in range(rng.randint(1, 6)):
        if not lines:
            lines = [""]
        i = rng.randrange(len(lines))
        r = rng.random()
        if r < 0.15:
            del lines[i]
        elif r < 0.3:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif r < 0.55:
            line = lines[i]
            at = rng.randrange(len(line) + 1)
            lines[i] = line[:at] + rng.choice(_TEXT_BITS) + line[at + rng.randint(0, 3) :]
        elif r < 0.7:
            line = lines[i]
            if line:
                at = rng.randrange(len(line))
                lines[i] = line[:at] + str(rng.choice((0, 1, -1, 10**30, 2**64, 255, 0x7FFFFFFF))) + line[at + 1 :]
        elif r < 0.8:
            other = rng.choice(seeds).split("\n")
            lines.insert(i, rng.choice(other))
        elif r < 0.9:
            lines[i] = lines[i][: rng.randrange(len(lines[i]) + 1)]
        else:
            line = lines[i]
            cols = line.split()
            if len(cols) > 1:
                a, b = rng.randrange(len(cols)), rng.randrange(len(cols))
                cols[a], cols[b] = cols[b], cols[a]
                lines[i] = " ".join(cols)
    return "\n".join(lines).encode("utf-8", errors="surrogatepass")


_JSON_VALUES: tuple[Any, ...] = (None, True, False, 0, -1, 1, 2**32, 2**64, -(2**70), 1.5, "", "0x", "0xzz", "zz",
                                 "0x7fffffff", "-0x10", "90", "9" * 50, [], {}, [1], {"a": 1}, "1e5", "\u0000",
                                 "../../etc/passwd", "a" * 300, "ff15????????", "00" * 16, [[[]]])


def _paths(o: Any, pre: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [pre]
    if isinstance(o, dict):
        for k, v in o.items():
            out += _paths(v, (*pre, k))
    elif isinstance(o, list):
        for i, v in enumerate(o):
            out += _paths(v, (*pre, i))
    return out


def mutate_json(rng: random.Random, seeds: tuple[bytes, ...]) -> bytes:
    doc = json.loads(rng.choice(seeds))
    for _ in range(rng.randint(1, 4)):
        paths = _paths(doc)[1:]
        if not paths:
            break
        path = rng.choice(paths)
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        r = rng.random()
        if r < 0.5:
            parent[path[-1]] = copy.deepcopy(rng.choice(_JSON_VALUES))
        elif r < 0.65:
            del parent[path[-1]]
        elif r < 0.8:  # a value from elsewhere in the document (an rva where a patch is expected, ...)
            src = doc
            for k in rng.choice(paths):
                src = src[k]
            parent[path[-1]] = copy.deepcopy(src)
        elif r < 0.9 and isinstance(parent[path[-1]], str):
            s = parent[path[-1]]
            at = rng.randrange(len(s) + 1)
            parent[path[-1]] = s[:at] + rng.choice("0123456789abcdefx? -") + s[at + 1 :]
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))  # duplicates: overlapping patches, repeated entries
    out = json.dumps(doc).encode()
    if rng.random() < 0.1:  # and sometimes a broken document
        b = bytearray(out)
        b[rng.randrange(len(b))] = rng.getrandbits(8)
        out = bytes(b)
    return out


@dataclasses.dataclass(frozen=True)
class Target:
    run: Callable[[bytes], None]
    seeds: Callable[[], tuple[Any, ...]]
    mutate: Callable[[random.Random, tuple[Any, ...]], bytes]
    ext: str
    cost: float  # relative cost per case (the bounded test pass divides its budget by it)


TARGETS: dict[str, Target] = {
    "pe": Target(run_pe, pe_seeds, mutate_bytes, ".sys", 5.0),
    "pe-mapped": Target(run_pe_mapped, pe_seeds, mutate_bytes, ".bin", 5.0),
    "plan": Target(run_plan, plan_seeds, mutate_json, ".json", 3.0),
    "journal": Target(run_journal, journal_seeds, mutate_json, ".json", 4.0),
    "poolused": Target(run_poolused, functools.partial(text_seeds, "poolused"), mutate_text, ".txt", 1.0),
    "poolfind": Target(run_poolfind, functools.partial(text_seeds, "poolfind"), mutate_text, ".txt", 1.0),
    "poolmon": Target(run_poolmon, functools.partial(text_seeds, "poolmon"), mutate_text, ".txt", 1.0),
    "snapshot": Target(run_snapshot, functools.partial(text_seeds, ""), mutate_text, ".txt", 1.0),
}


# --- running -----------------------------------------------------------------------------------------------------


def signature(e: BaseException) -> str:
    """Exception type and the innermost frame inside tagsplit (function, not line: stable across edits)."""
    if isinstance(e, PropertyBroken):
        return f"PropertyBroken: {str(e).split(':')[0][:60]}"
    where = "?"
    for frame in traceback.extract_tb(e.__traceback__):
        if "/tagsplit/" in frame.filename.replace("\\", "/"):
            where = f"{frame.filename.replace(chr(92), '/').split('/tagsplit/')[-1]}:{frame.name}"
    return f"{type(e).__name__} in {where}"


@dataclasses.dataclass
class Finding:
    target: str
    signature: str
    data: bytes
    trace: str
    count: int = 1


def run_one(target: str, data: bytes) -> tuple[BaseException | None, float]:
    """(the unexpected exception or None, seconds)."""
    t = time.perf_counter()
    try:
        TARGETS[target].run(data)
    except TagsplitError:
        pass
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        return e, time.perf_counter() - t
    return None, time.perf_counter() - t


def regression_files(target: str | None = None) -> list[Path]:
    if not REGRESSIONS.is_dir():
        return []
    dirs = [REGRESSIONS / target] if target else sorted(p for p in REGRESSIONS.iterdir() if p.is_dir())
    return sorted(f for d in dirs if d.is_dir() for f in d.iterdir() if f.is_file() and not f.name.startswith("."))


def known_signatures(target: str) -> set[str]:
    """Signatures the regression corpus already holds (known bugs, xfail there), computed on the current code."""
    out = set()
    for f in regression_files(target):
        e, _ = run_one(target, f.read_bytes())
        if e is not None:
            out.add(signature(e))
    return out


def fuzz(target: str, *, cases: int = 0, seconds: float = 0.0, seed: int = 0,
         known: set[str] | None = None) -> tuple[int, dict[str, Finding], list[tuple[float, bytes]]]:
    """Mutation fuzzing of one target: (cases run, findings by signature, slow inputs)."""
    t = TARGETS[target]
    seeds = t.seeds()
    rng = random.Random(f"{target}:{seed}")
    findings: dict[str, Finding] = {}
    slow: list[tuple[float, bytes]] = []
    n = 0
    start = time.perf_counter()
    while (cases and n < cases) or (seconds and time.perf_counter() - start < seconds):
        data = t.mutate(rng, seeds)
        n += 1
        e, dt = run_one(target, data)
        if dt > SLOW:
            slow.append((dt, data))
        if e is None:
            continue
        sig = signature(e)
        if known and sig in known:
            continue
        f = findings.get(sig)
        if f is None:
            findings[sig] = Finding(target, sig, data, "".join(traceback.format_exception(type(e), e, e.__traceback__)))
        else:
            f.count += 1
            if len(data) < len(f.data):
                f.data = data
    return n, findings, slow


def minimize(target: str, data: bytes, sig: str, budget: float = 30.0) -> bytes:
    """A smaller input with the same failure signature: greedy removal of line chunks (text, JSON) or byte chunks
    from the end (binary), within `budget` seconds."""
    start = time.perf_counter()

    def same(d: bytes) -> bool:
        e, _ = run_one(target, d)
        return e is not None and signature(e) == sig

    if TARGETS[target].ext == ".txt":
        lines = data.split(b"\n")
        chunk = max(1, len(lines) // 2)
        while chunk >= 1 and time.perf_counter() - start < budget:
            i = 0
            while i < len(lines) and time.perf_counter() - start < budget:
                trial = lines[:i] + lines[i + chunk :]
                if same(b"\n".join(trial)):
                    lines = trial
                else:
                    i += chunk
            chunk //= 2
        return b"\n".join(lines)
    if TARGETS[target].ext in (".sys", ".bin"):
        cut = len(data) // 2
        while cut >= 16 and time.perf_counter() - start < budget:
            if same(data[: len(data) - cut]):
                data = data[: len(data) - cut]
            else:
                cut //= 2
    return data


def save(target: str, data: bytes) -> Path:
    folder = REGRESSIONS / target
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (hashlib.sha1(data).hexdigest()[:16] + TARGETS[target].ext)
    path.write_bytes(data)
    return path


# --- atheris -----------------------------------------------------------------------------------------------------


def _atheris_child(target: str, seconds: int, save_findings: bool) -> None:
    import atheris  # type: ignore[import-untyped,unused-ignore]

    known = known_signatures(target)
    seen: set[str] = set()
    corpus = Path(tempfile.mkdtemp(prefix=f"tagsplit-fuzz-{target}-"))
    for i, s in enumerate(TARGETS[target].seeds()):
        (corpus / f"seed{i}").write_bytes(s if isinstance(s, bytes) else s.encode("utf-8", errors="surrogatepass"))
    atheris.instrument_all()

    def one_input(data: bytes) -> None:
        e, dt = run_one(target, data)
        if dt > SLOW:
            print(f"fuzz: {target}: slow input ({dt:.1f} s)", file=sys.stderr, flush=True)
            if save_findings:
                print(f"fuzz: saved {save(target, data)}", file=sys.stderr, flush=True)
        if e is None:
            return
        sig = signature(e)
        if sig in known or sig in seen:
            return
        seen.add(sig)
        print(f"fuzz: {target}: NEW {sig}\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__)),
              file=sys.stderr, flush=True)
        if save_findings:
            print(f"fuzz: saved {save(target, minimize(target, data, sig))}", file=sys.stderr, flush=True)

    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-rss_limit_mb=4096", "-timeout=30",
                   "-max_len=1048576", "-print_final_stats=1"], one_input)
    atheris.Fuzz()


def run_atheris(target: str, seconds: int, save_findings: bool) -> tuple[int, int]:
    """Run atheris on one target in a child process; (cases run, new findings)."""
    import subprocess

    cmd = [sys.executable, __file__, "--atheris-child", target, "--seconds", str(seconds)] + (
        ["--save"] if save_findings else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    runs = 0
    for line in r.stderr.splitlines():
        if "stat::number_of_executed_units:" in line:
            runs = int(line.split(":")[-1])
        if line.startswith("fuzz:") or line.startswith("  ") or line.startswith("Traceback"):
            print(line, file=sys.stderr)
    return runs, r.stderr.count("fuzz: " + target + ": NEW")


# --- command line ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    ap.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    ap.add_argument("--engine", choices=("mutate", "atheris"), default="mutate")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--save", action="store_true", help="write each new failure to tests/regressions/<target>/")
    ap.add_argument("--atheris-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.atheris_child:
        _atheris_child(args.atheris_child, int(args.seconds), args.save)
        return 0
    targets = args.target or sorted(TARGETS)
    total_new = 0
    print(f"engine {args.engine}, seed {args.seed}, {args.seconds:g} s per target")
    for name in targets:
        if args.engine == "atheris":
            runs, new = run_atheris(name, int(args.seconds), args.save)
            print(f"{name:10s} {runs:9d} cases  {new} new failures")
            total_new += new
            continue
        known = known_signatures(name)
        n, findings, slow = fuzz(name, seconds=args.seconds, seed=args.seed, known=known)
        print(f"{name:10s} {n:9d} cases  {len(findings)} new failures  {len(slow)} slow  "
              f"({len(known)} known in tests/regressions)")
        for f in findings.values():
            print(f"  NEW {f.signature} ({f.count}x)\n" + "    " + f.trace.replace("\n", "\n    "))
            if args.save:
                print(f"  saved {save(name, minimize(name, f.data, f.signature))}")
        for dt, data in slow[:3]:
            print(f"  SLOW {dt:.1f} s" + (f", saved {save(name, data)}" if args.save else ""))
        total_new += len(findings) + len(slow)
    return 1 if total_new else 0


if __name__ == "__main__":
    sys.exit(main())
