"""Folder scan: `tagsplit scan DIR --tag TAG` against `grep -r -l` for the tag's bytes, on the same folder, same run.

    python benchmarks/bench_batch.py [--files 320] [--tag Leak] [--repeat 5] [--seed 1] [--scale 1] [--no-real]

The folder holds `--files` generated drivers (benchmarks/synthdrv.py, x64 and x86, sizes drawn like a real
drivers folder: mostly 10 KB-1.5 MB of code, a few up to 6 MB; `--scale` multiplies every size) plus the real ones
(testbins/bin, tagsplit/data and ../shared/corpus if present). It is built once and cached in the temp folder.

Ground truth: the generator's sites. In 1 % of the generated drivers (at least 3) the tag immediate of one call site
is rewritten to TAG (one of them to TAG with PROTECTED_POOL set, which a byte search for TAG cannot find), so those
drivers use TAG and no other does. TAG's bytes are also planted where no call site can pass them, as real drivers
carry them: in a data section (a string) or in the overlay after the last section (the certificate area), in 5 % of
the generated drivers. grep reports those (false hits); tagsplit must not, and must find every user.

Timing: the page cache is warmed first; each tool runs `--repeat` times, alternating, and the fastest and median
wall times are shown. tagsplit runs as `python -m tagsplit.cli` with the real interpreter (no shim), on every core;
its start-up alone (`--version`) and a one-core run (TAGSPLIT_JOBS=1) are shown for reference. grep runs with
LC_ALL=C (its fastest byte search). The verdict: tagsplit within 3x grep's time, no false hits, no misses.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import synthdrv  # noqa: E402

from tagsplit import tags  # noqa: E402
from tagsplit.image import parse  # noqa: E402

CORPUS = ROOT.parent / "shared" / "corpus" / "github"
FORMAT = 2  # bump when the folder layout changes (invalidates the cache)


def _size(rng: random.Random, scale: float) -> int:
    """Bytes of code: log-uniform 10 KB-1.5 MB for 93 % of drivers, 1.5-6 MB for the rest."""
    lo, hi = (10 << 10, 1536 << 10) if rng.random() < 0.93 else (1536 << 10, 6 << 20)
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))) * scale)


def _retag(data: bytes, site: synthdrv.TruthSite, new: int) -> bytes:
    """`data` with the tag immediate of `site` replaced by `new` (the file offset found through the section table)."""
    image = parse(data, "gen.sys")
    assert site.tag is not None
    assert site.tag_rva is not None
    old = site.tag.encode("latin-1")
    at = image.mem.find(old, site.tag_rva, site.tag_rva + 16)
    off = image.rva_to_offset(at) if at >= 0 else None
    assert off is not None, f"tag of site {site.rva:#x} not found"
    out = bytearray(data)
    out[off : off + 4] = struct.pack("<I", new)
    return bytes(out)


def _plant(data: bytes, needle: bytes, rng: random.Random) -> tuple[bytes, str]:
    """TAG's bytes where no site can pass them: a string in a data section's file slack, else the overlay."""
    image = parse(data, "gen.sys")
    out = bytearray(data)
    text = b"pool tag " + needle + b"\0"
    for sec in image.sections:
        if sec.executable or not sec.raw_size:
            continue
        used = sec.virtual_size or sec.raw_size
        if sec.raw_size - used >= len(text) + 8 and rng.random() < 0.6:
            off = sec.raw_offset + used + 4
            out[off : off + len(text)] = text
            return bytes(out), f"data section {sec.name}"
    blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(200, 2000)))
    cut = rng.randrange(len(blob))
    return bytes(out) + blob[:cut] + needle + blob[cut:], "overlay"


def build_folder(folder: Path, files: int, seed: int, scale: float, tag: int, real: bool) -> dict[str, Any]:
    """Write the drivers; returns the truth: {"users": [...], "protected": [...], "planted": {...}}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n_users = max(3, files // 100)
    users = set(rng.sample(range(files), n_users))
    candidates = [i for i in range(files) if i not in users]
    planted_at = set(rng.sample(candidates, max(1, files // 20)))
    needle = struct.pack("<I", tag)
    truth: dict[str, Any] = {"users": [], "protected": [], "planted": {}, "generated": files}
    owed = 0  # users still to place: a drawn driver with no constant-tag allocation passes its turn to the next
    t0 = time.perf_counter()
    for i in range(files):
        r = random.Random(seed * 100_003 + i)
        arch = "x86" if r.random() < 0.3 else "x64"
        code = _size(r, scale)
        sites = max(4, int(code / (1 << 20) * 150))
        drv = synthdrv.build_driver(code, sites, seed * 100_003 + i, arch)
        data = drv.data
        name = f"gen{i:04d}_{arch}.sys"
        owed += i in users
        site = next((s for s in drv.truth
                     if s.tag is not None and s.tag_rva is not None and s.api != "ExFreePoolWithTag"), None)
        if owed and site is not None and i not in planted_at:
            protected = not truth["protected"]  # the first user passes TAG | PROTECTED_POOL
            data = _retag(data, site, tag | tags.PROTECTED_POOL if protected else tag)
            truth["users"].append(name)
            if protected:
                truth["protected"].append(name)
            owed -= 1
        elif i in planted_at:
            data, where = _plant(data, needle, r)
            truth["planted"][name] = where
        (folder / name).write_bytes(data)
        if (i + 1) % 50 == 0:
            print(f"  generated {i + 1}/{files} drivers ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    if real:
        sources = sorted((ROOT / "testbins" / "bin").glob("*.sys")) + sorted((ROOT / "tagsplit" / "data").glob("*.sys"))
        if CORPUS.is_dir():
            sources += sorted(CORPUS.glob("*/*.sys"))
        for p in sources:
            shutil.copy(p, folder / f"real_{p.parent.name}_{p.name}")
    return truth


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t, r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=320, help="generated drivers (default 320)")
    ap.add_argument("--tag", default="Leak")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every generated driver's size")
    ap.add_argument("--no-real", action="store_true", help="generated drivers only")
    ap.add_argument("--folder", help="build/use this folder (default: a cache in the temp folder)")
    args = ap.parse_args(argv)
    tag = tags.parse(args.tag)
    key = hashlib.sha1(f"{FORMAT}:{args.files}:{args.seed}:{args.scale}:{tag}:{not args.no_real}".encode()).hexdigest()
    folder = Path(args.folder) if args.folder else Path(tempfile.gettempdir()) / f"tagsplit-bench-batch-{key[:12]}"
    truth_file = folder / "truth.json"  # next to drivers/, the folder both tools scan
    if not truth_file.is_file():
        print(f"building {folder} ...", file=sys.stderr)
        truth = build_folder(folder / "drivers", args.files, args.seed, args.scale, tag, not args.no_real)
        truth_file.write_text(json.dumps(truth, indent=1))
    truth = json.loads(truth_file.read_text())
    drivers = folder / "drivers"
    files = sorted(p for p in drivers.iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    users = set(truth["users"])
    needle_text = struct.pack("<I", tag).decode("latin-1")

    for p in files:  # warm the page cache
        p.read_bytes()
    grep = ["grep", "-r", "-l", "-F", "-e", needle_text, str(drivers)]
    grep_env = dict(os.environ, LC_ALL="C")
    ts = [sys.executable, "-m", "tagsplit.cli", "scan", str(drivers), "--tag", args.tag, "--json"]
    one_core = dict(os.environ, TAGSPLIT_JOBS="1")
    times: dict[str, list[float]] = {"grep": [], "tagsplit": [], "startup": []}
    grep_out = ts_out = None
    for _ in range(args.repeat):
        dt, grep_out = _timed(grep, grep_env)
        times["grep"].append(dt)
        dt, ts_out = _timed(ts)
        times["tagsplit"].append(dt)
        dt, _ = _timed([sys.executable, "-m", "tagsplit.cli", "--version"])
        times["startup"].append(dt)
    one_dt, one_out = _timed(ts, one_core)
    assert grep_out is not None
    assert ts_out is not None
    if ts_out.returncode not in (0, 1):
        print(ts_out.stderr, file=sys.stderr)
        return 2
    grep_hits = {Path(line).name for line in grep_out.stdout.splitlines() if line}
    doc = json.loads(ts_out.stdout)
    ts_hits = {Path(d["path"]).name for d in doc["drivers"]}
    errors = doc.get("errors", [])
    same_one_core = {Path(d["path"]).name for d in json.loads(one_out.stdout)["drivers"]} == ts_hits

    g, t = min(times["grep"]), min(times["tagsplit"])
    ratio = t / g
    ts_false, ts_missed = sorted(ts_hits - users), sorted(users - ts_hits)
    grep_false, grep_missed = sorted(grep_hits - users), sorted(users - grep_hits)
    planted = set(truth["planted"])
    real_false = [n for n in grep_false if n.startswith("real_")]
    other_false = [n for n in grep_false if n not in planted and not n.startswith("real_")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n_real = len(files) - truth["generated"]
    print(f"folder: {len(files)} driver files ({truth['generated']} generated, {n_real} real), "
          f"{total / 2**20:.1f} MiB, {cores} cores; tag '{args.tag}' ({tags.hex_value(tag)})")
    print(f"truth: {len(users)} drivers use it ({len(truth['protected'])} with PROTECTED_POOL set); its bytes are "
          f"planted outside code in {len(truth['planted'])} others")
    print()
    print(f"{'':28} {'fastest':>9} {'median':>9}  {'reported':>8} {'false hits':>10} {'missed':>6}")
    print(f"{'grep -r -l -F (LC_ALL=C)':28} {g:8.3f}s {statistics.median(times['grep']):8.3f}s  {len(grep_hits):8d} "
          f"{len(grep_false):10d} {len(grep_missed):6d}")
    print(f"{'tagsplit scan DIR --tag':28} {t:8.3f}s {statistics.median(times['tagsplit']):8.3f}s  {len(ts_hits):8d} "
          f"{len(ts_false):10d} {len(ts_missed):6d}")
    print(f"{'  of which start-up':28} {min(times['startup']):8.3f}s {statistics.median(times['startup']):8.3f}s")
    print(f"{'  on one core':28} {one_dt:8.3f}s {'':9}  {'same' if same_one_core else 'DIFFERENT'}")
    print()
    print(f"grep's {len(grep_false)} false hits: {len(planted & set(grep_false))} planted in generated drivers, "
          f"{len(real_false)} real drivers (the bytes in export names or strings), {len(other_false)} other")
    print(f"tagsplit / grep: {ratio:.2f}x end to end; {(t - min(times['startup'])) / g:.2f}x without tagsplit's "
          f"interpreter start-up")
    if errors:
        print(f"tagsplit reported {len(errors)} unreadable files: " + "; ".join(e["error"] for e in errors[:3]))
    for name in grep_missed:
        print(f"grep misses {name}" + (" (protected tag)" if name in truth["protected"] else ""))
    for name in ts_false + ts_missed:
        print(f"tagsplit {'FALSE HIT' if name in ts_false else 'MISSED'}: {name}")
    ok = ratio <= 3.0 and not ts_false and not ts_missed
    print(f"\nverdict: {'PASS' if ok else 'FAIL'} (within 3x grep: {'yes' if ratio <= 3.0 else 'no'}; "
          f"no false hits: {'yes' if not ts_false else 'no'}; no misses: {'yes' if not ts_missed else 'no'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
