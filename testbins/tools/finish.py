#!/usr/bin/env python3
"""Second half of build.sh: per-build truth files, manifest.json, and consistency checks.

    python3 tools/finish.py TESTBINS_DIR META_TSV

META_TSV has one line per built binary: source, build, arch, compiler description. For each binary this
  * sets IMAGE_SCN_MEM_DISCARDABLE on the INIT section of GNU ld images (gas cannot express it; lld-link gets
    /section:INIT,ERD), as the WDK's link does;
  * checks the export table against src/<source>.def and that every function named by the truth is exported
    from the section the truth says;
  * writes bin/<source>_<build>.truth.json: the hand-written src/<source>.truth.json entries that apply to this
    build, without their "builds"/"not_builds" fields;
and finally writes manifest.json and runs tools/check_calls.py (a mismatch is reported, not fatal).
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pefile

BUILDS = ["gcc_x64_O2", "gcc_x64_O0", "gcc_x86_O2", "gcc_x86_pushargs",
          "clang_x64", "clang_x64_tail", "clang_x86", "clang_gnu_x64"]
ROLES = {"alloc", "free", "lookaside"}
SOURCES_OF_TAG = {"imm", "param", "memory", "computed", "none"}
SECTIONS = {".text", "PAGE", "INIT"}
PROTECTED = 0x80000000
SCN_DISCARDABLE = 0x02000000


class Bad(Exception):
    pass


def check_source_truth(src_dir: Path, name: str, truth: dict) -> None:
    c_text = (src_dir / f"{name}.c").read_text()
    seen = set()
    for e in truth["sites"]:
        where = f"{name}.truth.json {e.get('function')}/{e.get('api')}"
        for k in ("function", "api", "role", "tag", "tag_value", "tag_source", "section"):
            if k not in e:
                raise Bad(f"{where}: missing {k}")
        if e["role"] not in ROLES or e["tag_source"] not in SOURCES_OF_TAG or e["section"] not in SECTIONS:
            raise Bad(f"{where}: bad role/tag_source/section")
        for k in ("builds", "not_builds"):
            for b in e.get(k) or []:
                if b not in BUILDS:
                    raise Bad(f"{where}: unknown build {b}")
        tag, value = e["tag"], e["tag_value"]
        if tag is not None:
            if len(tag) != 4:
                raise Bad(f"{where}: tag must be 4 characters")
            display_value = int.from_bytes(tag.encode("latin-1"), "little")
            v = int(value, 16)
            if (v & ~PROTECTED if e.get("protected") else v) != display_value:
                raise Bad(f"{where}: tag_value {value} does not match tag {tag!r}")
        if e["tag_source"] == "imm":
            if value is None:
                raise Bad(f"{where}: an imm site needs tag_value")
            v = int(value, 16) & ~PROTECTED
            raw = v.to_bytes(4, "little")
            literal = "'" + raw[::-1].decode("latin-1") + "'"
            if all(0x20 <= b < 0x7F for b in raw):
                found = literal in c_text or re.search(r"#define\s+\w+\s+" + re.escape(literal), c_text)
            else:
                found = re.search(rf"0x0*{v:x}\b", c_text, re.I)
            if not found:
                raise Bad(f"{where}: the literal {literal} / {value} does not occur in {name}.c")
        elif value is not None and e["tag_source"] in ("param", "memory", "computed", "none"):
            raise Bad(f"{where}: tag_source {e['tag_source']} must have tag_value null")
        for b in (e.get("builds") or BUILDS):
            if b in (e.get("not_builds") or []):
                continue
            key = (e["function"], e["api"], tag, value, b)
            if key in seen:
                raise Bad(f"{where}: duplicate entry for build {b}")
            seen.add(key)


def applies(e: dict, build: str) -> bool:
    if e.get("builds") is not None and build not in e["builds"]:
        return False
    return build not in (e.get("not_builds") or [])


def mark_init_discardable(path: Path) -> None:
    pe = pefile.PE(str(path))
    changed = False
    for s in pe.sections:
        if s.Name.rstrip(b"\0") == b"INIT" and not s.Characteristics & SCN_DISCARDABLE:
            s.Characteristics |= SCN_DISCARDABLE
            changed = True
    if changed:
        if pe.OPTIONAL_HEADER.CheckSum:
            pe.OPTIONAL_HEADER.CheckSum = pe.generate_checksum()
        data = pe.write()
        pe.close()
        path.write_bytes(data)
    else:
        pe.close()


def check_binary(path: Path, def_names: list[str], sites: list[dict]) -> None:
    pe = pefile.PE(str(path))
    base = pe.OPTIONAL_HEADER.ImageBase
    exports = {e.name.decode(): e.address for e in pe.DIRECTORY_ENTRY_EXPORT.symbols if e.name}
    if sorted(exports) != sorted(def_names):
        raise Bad(f"{path.name}: exports {sorted(set(exports) ^ set(def_names))} differ from the .def")
    imports = {i.name.decode().split("@")[0] for d in pe.DIRECTORY_ENTRY_IMPORT for i in d.imports if i.name}
    if pe.FILE_HEADER.Machine == 0x8664 and not pe.OPTIONAL_HEADER.DATA_DIRECTORY[3].Size:
        raise Bad(f"{path.name}: x64 image without exception directory (.pdata)")
    for e in sites:
        if e["function"] not in exports:
            raise Bad(f"{path.name}: truth function {e['function']} is not exported")
        sec = pe.get_section_by_rva(exports[e["function"]])
        name = sec.Name.rstrip(b"\0").decode()
        if name != e["section"]:
            raise Bad(f"{path.name}: {e['function']} is in {name}, truth says {e['section']}")
        if e["api"] not in imports:
            raise Bad(f"{path.name}: {e['api']} is not imported")
    del base


def main() -> int:
    here = Path(sys.argv[1]).resolve()
    meta = Path(sys.argv[2])
    src = here / "src"
    truths = {}
    defs = {}
    manifest = {}
    try:
        for line in meta.read_text().splitlines():
            source, build, arch, compiler = line.split("\t", 3)
            if source not in truths:
                truths[source] = json.loads((src / f"{source}.truth.json").read_text())
                check_source_truth(src, source, truths[source])
                defs[source] = [l.strip() for l in (src / f"{source}.def").read_text().splitlines()
                                if l.strip() and not l.startswith(";") and l.strip() != "EXPORTS"]
            truth = truths[source]
            binary = here / "bin" / f"{source}_{build}.sys"
            if build.startswith("gcc_"):
                mark_init_discardable(binary)
            sites = []
            for e in truth["sites"]:
                if applies(e, build):
                    sites.append({k: v for k, v in e.items() if k not in ("builds", "not_builds")})
            check_binary(binary, defs[source], sites)
            out = {"binary": f"bin/{binary.name}", "source": truth["source"], "build": build, "arch": arch,
                   "compiler": compiler, "expected_sites": sum(e.get("count", 1) for e in sites), "sites": sites}
            for extra in ("wrappers", "wrapper_calls", "workloads"):
                if extra in truth:
                    out[extra] = truth[extra]
            binary.with_suffix(".truth.json").write_text(json.dumps(out, indent=1) + "\n")
            data = binary.read_bytes()
            manifest[f"bin/{binary.name}"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                                              "source": truth["source"], "build": build, "arch": arch,
                                              "expected_sites": out["expected_sites"]}
    except Bad as exc:
        print(f"finish.py: {exc}", file=sys.stderr)
        return 1
    (here / "manifest.json").write_text(json.dumps({"binaries": dict(sorted(manifest.items()))}, indent=1) + "\n")
    r = subprocess.run([sys.executable, str(here / "tools" / "check_calls.py"), "--strict"], cwd=here, check=False)
    if r.returncode:
        print("finish.py: WARNING: call sites found in the binaries differ from the truth (see MISMATCH lines)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
