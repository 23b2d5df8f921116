"""Every call site in every testbins ground-truth file is found, with its tag and tag source, and nothing else.

The truth files are written from the C sources (testbins/src/*.truth.json), not from disassembly.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from conftest import truth_files

from tagsplit.image import load
from tagsplit.sites import scan_image

Key = tuple  # (function, api, role, tag, tag_source)


def _name(name: str | None, rva: int | None) -> str:
    if name is None:
        return f"sub_{rva or 0:x}"
    return re.sub(r"@\d+$", "", name.lstrip("_"))


def _expected(truth: dict) -> tuple[Counter, list[dict]]:
    want: Counter = Counter()
    for e in truth["sites"]:
        want[(e["function"], e["api"], e["role"], e["tag"], e["tag_source"])] += e.get("count", 1)
    return want, truth["sites"]


@pytest.mark.parametrize("truth_path", truth_files(), ids=lambda p: p.name.replace(".truth.json", ""))
def test_scan_matches_truth(truth_path: Path) -> None:
    truth = json.loads(truth_path.read_text())
    binary = truth_path.parent / Path(truth["binary"]).name
    scan = scan_image(load(binary))
    got: Counter = Counter()
    by_key: dict[Key, list] = {}
    for s in scan.sites:
        key = (_name(s.function_name, s.function_rva), s.api, s.role, s.tag, s.tag_source.kind)
        got[key] += 1
        by_key.setdefault(key, []).append(s)
    want, entries = _expected(truth)
    missing = want - got
    extra = got - want
    assert not missing, f"missing: {dict(missing)}\nunexpected: {dict(extra)}"
    assert not extra, f"unexpected: {dict(extra)}"
    for e in entries:
        key = (e["function"], e["api"], e["role"], e["tag"], e["tag_source"])
        for s in by_key[key]:
            if e.get("tag_value"):
                assert s.tag_value == int(e["tag_value"], 16), (key, hex(s.tag_value or 0))
            if "shared" in e and e["shared"] is not None:
                assert bool(s.shared_with) == e["shared"], (key, s.shared_with)
            if e.get("section"):
                assert s.section.upper().startswith(e["section"].upper().rstrip(".")) or s.section == e["section"], key
            if s.tag_source.kind == "imm" and s.tag_source.imm_offset is not None:
                # the 4 bytes the plan will rewrite hold the tag (a constant without its instruction fails here too)
                raw = s.tag_source.insn.raw if s.tag_source.insn is not None else b""
                imm = raw[s.tag_source.imm_offset : s.tag_source.imm_offset + 4]
                assert int.from_bytes(imm, "little") == s.tag_value, (key, raw.hex())


def test_truth_files_exist() -> None:
    assert len(truth_files()) >= 16, "testbins/bin should hold ground truth for every build of every source"
