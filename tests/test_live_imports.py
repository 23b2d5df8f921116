"""The debugger side (`tagsplit.live`) needs only the standard library: the Python inside WinDbg has no capstone,
keystone, pefile or unicorn. Proven in a subprocess where importing any of them fails, including a full apply,
status and revert through the pykd stand-in built from raw memory bytes (prepared here, in the parent, with pefile).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from test_live_pykd import X64, X86, imm_plan, session, write_plan

from tagsplit.image import load
from tagsplit.targets.pykd import UNAVAILABLE

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("capstone", "keystone", "pefile", "unicorn")

CHILD = textwrap.dedent(
    """
    import json, sys
    for m in {heavy!r}:
        sys.modules[m] = None  # any `import m` now raises ImportError
    import tagsplit.live
    from tagsplit.emu.pykd_standin import PykdStandIn

    meta = json.load(open(sys.argv[1]))
    mem = open(sys.argv[2], "rb").read()
    s = PykdStandIn(is64=meta["is64"])
    s.add_module(meta["name"], meta["base"], mem, timestamp=meta["timestamp"], checksum=meta["checksum"],
                 size=meta["size"])
    before = s.module_memory(meta["name"])
    out = tagsplit.live.apply_live(meta["plan"], pykd=s)
    after = s.module_memory(meta["name"])
    changed = sorted(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
    assert tagsplit.live.main(["status", meta["plan"]], pykd=s) == 0
    back = tagsplit.live.revert_live(out.journal, pykd=s)
    assert s.module_memory(meta["name"]) == before, "revert did not restore the module"
    loaded = sorted(m for m in {heavy!r} if sys.modules.get(m) is not None)
    print(json.dumps({{"written": out.written, "reverted": back.written, "changed": changed, "loaded": loaded}}))
    """
).format(heavy=HEAVY)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # the current interpreter, with this checkout first on the path
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"},
        check=False,
    )


def test_live_side_imports_nothing_heavy_and_applies_and_reverts(tmp_path: Path) -> None:
    for driver in (X64[0], X86[1]):
        s, image, mod = session(driver)
        plan = imm_plan(image)
        plan_path = write_plan(tmp_path, plan, f"{mod}.json")
        info = s.module_info(mod)
        (tmp_path / "mem.bin").write_bytes(s.module_memory(mod))
        meta = {
            "is64": image.arch == "x64",
            "name": mod,
            "base": info.begin,
            "timestamp": info.timestamp,
            "checksum": info.checksum,
            "size": info.size,
            "plan": str(plan_path),
        }
        (tmp_path / "meta.json").write_text(json.dumps(meta))
        (tmp_path / "child.py").write_text(CHILD)
        r = _run([str(tmp_path / "child.py"), str(tmp_path / "meta.json"), str(tmp_path / "mem.bin")], tmp_path)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["loaded"] == []
        assert res["written"] == res["reverted"] == len(plan.patches())
        want = {
            i for p in plan.patches() for i in range(p.rva, p.end) if p.original[i - p.rva] != p.replacement[i - p.rva]
        }
        assert set(res["changed"]) == want


def test_import_alone_loads_nothing_heavy(tmp_path: Path) -> None:
    code = (
        "import sys; import tagsplit.live, tagsplit.targets.pykd, tagsplit.emu.pykd_standin; "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    r = _run(["-c", code], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_without_pykd_the_cli_says_so_in_one_line(tmp_path: Path) -> None:
    plan_path = write_plan(tmp_path, imm_plan(load(X64[0])))
    code = (
        "import sys; sys.modules['pykd'] = None; import runpy; runpy.run_module('tagsplit.live', run_name='__main__')"
    )
    r = _run(["-c", code, "status", str(plan_path)], tmp_path)
    assert r.returncode == 3
    assert r.stderr.splitlines() == [f"tagsplit: error: {UNAVAILABLE}"]
    assert r.stdout == ""
