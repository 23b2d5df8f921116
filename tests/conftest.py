"""Shared fixtures: the committed sample drivers (required) and the third-party corpus (optional)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTBINS = ROOT / "testbins"
BIN = TESTBINS / "bin"
CORPUS = ROOT.parent / "shared" / "corpus" / "github"
GOLDEN = Path(__file__).resolve().parent / "golden"


def pytest_sessionstart(session: pytest.Session) -> None:
    manifest = TESTBINS / "manifest.json"
    if not manifest.is_file():
        raise pytest.UsageError(f"{manifest} is missing: the committed sample drivers are required (git checkout?)")
    binaries = json.loads(manifest.read_text())["binaries"]
    for name, meta in binaries.items():
        path = TESTBINS / name
        digest = meta["sha256"]
        data = path.read_bytes() if path.is_file() else b""
        if data.startswith(b"version https://git-lfs"):
            raise pytest.UsageError(f"{path} is a Git LFS pointer: run `git lfs pull`")
        if hashlib.sha256(data).hexdigest() != digest:
            raise pytest.UsageError(f"{path} does not match testbins/manifest.json (rebuild with testbins/build.sh)")


def truth_files() -> list[Path]:
    return sorted(BIN.glob("*.truth.json"))


def corpus_drivers() -> list[Path]:
    return sorted(CORPUS.glob("*/*.sys")) if CORPUS.is_dir() else []


def corpus_param(name: str) -> Path:
    """A corpus driver by file name; the test is skipped when ../shared/corpus is absent."""
    hits = [p for p in corpus_drivers() if p.name == name]
    if not hits:
        pytest.skip(f"../shared/corpus not present ({name})")
    return hits[0]


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    if not CORPUS.is_dir():
        pytest.skip("../shared/corpus not present")
    return CORPUS
