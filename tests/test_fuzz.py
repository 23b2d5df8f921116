"""Fuzzing in the test suite: the regression corpus, a short bounded mutation pass, and hypothesis properties.

The harness (targets, seeds, mutators) is benchmarks/fuzz.py; run it for longer, or with atheris, from there:
`python benchmarks/fuzz.py --seconds 600 --save`. Every input that ever failed is kept in tests/regressions/<target>/
and replayed here. Inputs that still fail because of a bug in a file this test suite does not fix are listed in
KNOWN_BUGS and marked xfail(strict=True): when the bug is fixed the test says so.

The bounded pass is deterministic (seed TAGSPLIT_FUZZ_SEED, default 0; TAGSPLIT_FUZZ_SCALE multiplies the number of
cases) and takes about 20 seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import fuzz  # noqa: E402

from tagsplit.errors import PlanError, TagsplitError  # noqa: E402
from tagsplit.plan import model as pm  # noqa: E402

# Regression inputs that still fail, in files outside this change (tagsplit/sites/*, tagsplit/snapshots/*).
KNOWN_BUGS: dict[str, str] = {}  # both lone "-" inputs were fixed in snapshots/parse.py

SEED = int(os.environ.get("TAGSPLIT_FUZZ_SEED", "0"))
SCALE = float(os.environ.get("TAGSPLIT_FUZZ_SCALE", "1"))
BUDGET = 2500  # relative cost units per target (fuzz.Target.cost: a PE case costs 10, a text case 1)

HYPOTHESIS = settings(max_examples=int(60 * SCALE) or 1, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))


def _raise_unexpected(target: str, data: bytes) -> float:
    e, seconds = fuzz.run_one(target, data)
    if e is not None:
        raise e
    return seconds


# --- the regression corpus ---------------------------------------------------------------------------------------


def _rel(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


@pytest.mark.parametrize("path", fuzz.regression_files(), ids=_rel)
def test_regression_corpus(path: Path, request: pytest.FixtureRequest) -> None:
    reason = KNOWN_BUGS.get(_rel(path))
    if reason:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    seconds = _raise_unexpected(path.parent.name, path.read_bytes())
    assert seconds < fuzz.SLOW


def test_every_known_bug_is_in_the_corpus() -> None:
    files = {_rel(p) for p in fuzz.regression_files()}
    assert set(KNOWN_BUGS) <= files
    assert {p.parent.name for p in fuzz.regression_files()} <= set(fuzz.TARGETS)


# --- the bounded mutation pass -----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(fuzz.TARGETS))
def test_bounded_fuzz_pass(target: str) -> None:
    cases = max(1, int(BUDGET * SCALE / fuzz.TARGETS[target].cost))
    known = fuzz.known_signatures(target)  # the KNOWN_BUGS are reported once, above, not by every mutant
    n, findings, slow = fuzz.fuzz(target, cases=cases, seed=SEED, known=known)
    assert n == cases
    assert not findings, "\n\n".join(f"{f.signature} ({f.count}x)\n{f.trace}" for f in findings.values())
    assert not slow, [f"{dt:.1f} s" for dt, _ in slow]


# --- hypothesis --------------------------------------------------------------------------------------------------

_PE_SEEDS = fuzz.pe_seeds()


@HYPOTHESIS
@given(
    seed=st.integers(0, len(_PE_SEEDS) - 1),
    edits=st.lists(st.tuples(st.integers(0, 0x3FF), st.sampled_from(fuzz.INTERESTING) | st.integers(0, 2**32 - 1)),
                   min_size=1, max_size=6),
    cut=st.none() | st.integers(0, 0x3000),
)
def test_pe_header_dwords(seed: int, edits: list[tuple[int, int]], cut: int | None) -> None:
    """Any dwords written anywhere in the first KiB (every header field), optionally truncated."""
    d = bytearray(_PE_SEEDS[seed])
    for off, v in edits:
        if off + 4 <= len(d):
            struct.pack_into("<I", d, off, v)
    data = bytes(d[:cut] if cut is not None else d)
    _raise_unexpected("pe", data)
    _raise_unexpected("pe-mapped", data)


@HYPOTHESIS
@given(st.binary(max_size=2048).map(lambda b: b"MZ" + b))
def test_pe_random_bytes_after_mz(data: bytes) -> None:
    _raise_unexpected("pe", data)


_TEXT_TARGETS = ("poolused", "poolfind", "poolmon", "snapshot")


@HYPOTHESIS
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=400))
def test_parsers_on_any_text(text: str) -> None:
    data = text.encode("utf-8", errors="surrogatepass")
    for target in _TEXT_TARGETS:
        _raise_unexpected(target, data)


@HYPOTHESIS
@given(
    kind=st.sampled_from(("poolused", "poolfind", "poolmon")),
    which=st.integers(0, 100),
    line=st.integers(0, 200),
    insert=st.text(max_size=40),
    keep=st.integers(0, 200),
)
def test_parsers_on_a_sample_with_one_line_changed(kind: str, which: int, line: int, insert: str, keep: int) -> None:
    seeds = fuzz.text_seeds(kind)
    lines = seeds[which % len(seeds)].split("\n")
    i = line % len(lines)
    lines[i] = lines[i][: keep % (len(lines[i]) + 1)] + insert
    data = "\n".join(lines).encode("utf-8", errors="surrogatepass")
    e, _ = fuzz.run_one(kind, data)
    if e is not None and fuzz.signature(e) not in fuzz.known_signatures(kind):
        raise e


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


@HYPOTHESIS
@given(_JSON)
def test_plan_loader_on_any_json(doc: Any) -> None:
    with contextlib.suppress(PlanError):
        pm.from_json(doc)


def _replace(doc: Any, path_index: int, value: Any) -> Any:
    paths = fuzz._paths(doc)[1:]
    path = paths[path_index % len(paths)]
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value
    return doc


@HYPOTHESIS
@given(which=st.integers(0, 100), where=st.lists(st.tuples(st.integers(0, 10_000), _JSON), min_size=1, max_size=3))
def test_plan_with_any_field_replaced(which: int, where: list[tuple[int, Any]]) -> None:
    """A real plan with up to three fields replaced by any JSON: loads and round-trips, or one PlanError."""
    seeds = fuzz.plan_seeds()
    doc = json.loads(seeds[which % len(seeds)])
    for i, v in where:
        doc = _replace(doc, i, v)
    _raise_unexpected("plan", json.dumps(doc).encode())


@HYPOTHESIS
@given(which=st.integers(0, 100), where=st.lists(st.tuples(st.integers(0, 10_000), _JSON), min_size=1, max_size=3))
def test_journal_with_any_field_replaced(which: int, where: list[tuple[int, Any]]) -> None:
    seeds = fuzz.journal_seeds()
    doc = json.loads(seeds[which % len(seeds)])
    for i, v in where:
        doc = _replace(doc, i, v)
    _raise_unexpected("journal", json.dumps(doc).encode())


@pytest.mark.parametrize("depth", [10, 100_000])
def test_deeply_nested_json_is_a_plan_error(tmp_path: Path, depth: int) -> None:
    p = tmp_path / "deep.json"
    p.write_text("[" * depth + "]" * depth)
    with pytest.raises(PlanError):
        pm.load(p)
    from tagsplit.targets.apply import read_journal

    with pytest.raises(TagsplitError):
        read_journal(p)
