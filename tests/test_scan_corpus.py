"""Real third-party drivers (../shared/corpus): every pool call site found, every constant tag resolved.

Skipped when ../shared/corpus is absent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from conftest import BIN, corpus_drivers
from oracle import iat_references

from tagsplit.errors import UnsupportedImageError
from tagsplit.image import load
from tagsplit.sites import scan_image

if TYPE_CHECKING:
    from pathlib import Path

DRIVERS = [p for p in corpus_drivers() if "arm64" not in p.name] + sorted(BIN.glob("*.sys"))

# Tags the corpus README's survey lists per driver; each must come out resolved as a constant.
EXPECTED_TAGS = {
    "kprocesshacker_amd64.sys": {"KphT", "KphC", "KphQ", "Kphb", "Kphv"},
    "kprocesshacker_i386.sys": {"KphT", "KphC", "KphQ", "Kphb", "Kphv"},
    "winpmem_x64.sys": {"PMEM", "FSPT", "SeSd", "SeAl", "SeTs", "PpRb", "PpUc"},
    "winpmem_x86.sys": {"PMEM", "FSPT", "SeSd", "SeAl", "SeTs", "PpRb", "PpUc"},
    "cancel.sys": {"CSAM", "dlyy", "SeSd", "SeAl", "SeTs", "PpRb", "PpUc"},
    "WinDivert.sys": {"WDiv"},
    "wdm_test_x64.sys": {"SeSd", "SeAl", "SeTs", "PpRb", "PpUc"},
    "wdm_test_x86.sys": {"SeSd", "SeAl", "SeTs", "PpRb", "PpUc"},
    "sioctl.sys": set(),
}


@pytest.mark.parametrize("path", DRIVERS, ids=lambda p: p.name)
def test_every_iat_reference_is_accounted_for(path: Path) -> None:
    image = load(path)
    scan = scan_image(image)
    sites = {s.rva: s for s in scan.sites}
    for rva, mnemonic, api in iat_references(image):
        if mnemonic == "mov":
            # a cached import pointer: some later `call reg` in the same function must be a site
            assert any(s.call == "register" and s.api == api and s.rva > rva for s in scan.sites), hex(rva)
            continue
        stub_of = {j: e for e, j in scan.stubs.items()}
        if rva in stub_of:
            # a small wrapper reached by calls: its callers are the sites
            assert any(f"stub at {stub_of[rva]:#x}" in " ".join(s.notes) for s in scan.sites), hex(rva)
            continue
        if rva in scan.import_thunks:
            if scan.import_thunks[rva]:
                assert any(s.call == "thunk" and s.api == api for s in scan.sites), hex(rva)
            continue
        assert rva in sites, f"{mnemonic} [IAT {api}] at {rva:#x} is not a site"
        assert sites[rva].api == api


@pytest.mark.parametrize("path", [p for p in corpus_drivers() if "arm64" not in p.name], ids=lambda p: p.name)
def test_constant_tags_resolved_and_others_explained(path: Path) -> None:
    scan = scan_image(load(path))
    resolved = {s.tag for s in scan.sites if s.tag_source.kind == "imm" and s.tag}
    assert EXPECTED_TAGS.get(path.name, set()) <= resolved
    for s in scan.sites:
        ts = s.tag_source
        if ts.kind == "imm":
            assert ts.value is not None
            assert ts.rva is not None
        else:
            assert ts.detail, f"site {s.rva:#x}: unresolved tag ({ts.kind}) without a reason"


def test_system_informer_wrappers_are_explained(corpus_dir: Path) -> None:
    path = corpus_dir / "winsiderss+systeminformer" / "systeminformer_amd64.sys"
    scan = scan_image(load(path))
    allocs = [s for s in scan.sites if s.role != "free"]
    assert allocs, "System Informer allocates through wrappers; their pool calls must still be found"
    # the wrappers pick the caller's tag or a default: a parameter meets a constant, so not one immediate
    assert all(s.tag_source.kind in ("computed", "param") for s in allocs)
    assert all("param" in s.tag_source.detail or s.tag_source.kind == "param" for s in allocs)


def test_arm64_is_refused_with_a_clear_message(corpus_dir: Path) -> None:
    path = corpus_dir / "winsiderss+systeminformer" / "systeminformer_arm64.sys"
    with pytest.raises(UnsupportedImageError, match="ARM64"):
        load(path)
