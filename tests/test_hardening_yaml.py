"""Issue #8, finding 10: a workflow document cannot make the loader expand, nest or grow
without bound. `fusion validate` runs on untrusted pull requests, so a few hundred bytes of
YAML aliases must be refused at once, with file:line:col, in a few megabytes of memory."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from engine.config import Settings
from engine.dsl.issues import Issue, WorkflowInvalid
from engine.dsl.source import DocumentLimits, from_object, load_file, load_text

ROOT = Path(__file__).resolve().parent.parent
SMALL = DocumentLimits(max_bytes=4096, max_depth=8, max_nodes=200)
# Generous: loading a refused document allocates well under a megabyte.
PEAK_BYTES = 8 * 1024 * 1024


def laughs(levels: int = 9, fan: int = 9) -> str:
    """The billion-laughs document: each anchor a list of `fan` aliases to the one before,
    so the last expands to fan**levels strings."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * fan)}]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]")
    return "\n".join(lines) + "\nsteps: [{step_id: a, type: template, value: 1}]\n"


def refused(text: str, limits: DocumentLimits | None = None) -> Issue:
    tracemalloc.start()
    try:
        with pytest.raises(WorkflowInvalid) as caught:
            load_text(text, "bomb.yaml", limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < PEAK_BYTES, f"peak {peak} bytes while refusing"
    (issue,) = caught.value.issues
    assert issue.file == "bomb.yaml"
    assert issue.line is not None
    return issue


def test_billion_laughs_is_refused_at_the_alias_that_crosses_the_budget() -> None:
    text = laughs()
    assert len(text) < 700  # 9**9 (387 million) strings once expanded
    issue = refused(text)
    # a4 alone expands to 9**4 = 6561 strings; the fourth row of a5's aliases crosses 100k.
    assert (issue.line, issue.col) == (6, 10)
    assert "alias *a4 takes the document past 100000 values" in issue.message
    assert "workflow_max_nodes" in issue.message


def test_aliases_within_the_budget_still_expand() -> None:
    doc = load_text(laughs(levels=2, fan=3), limits=SMALL)
    assert doc.data["a2"] == [[["lol"] * 3] * 3] * 3
    with pytest.raises(WorkflowInvalid, match="past 200 values"):
        load_text(laughs(levels=4, fan=3), limits=SMALL)


def test_merge_keys_count_as_expansion() -> None:
    text = "base: &b {" + ", ".join(f"k{i}: {i}" for i in range(20)) + "}\n"
    text += "".join(f"m{i}: {{<<: *b}}\n" for i in range(3))
    doc = load_text(text, limits=SMALL)
    assert doc.data["m2"]["k19"] == 19
    issue = refused(text + "".join(f"n{i}: {{<<: *b}}\n" for i in range(3)), SMALL)
    assert "alias *b" in issue.message


@pytest.mark.parametrize(
    "text",
    [
        "[" * 200_000 + "]" * 200_000,  # flow sequences: a segfault in the C composer before
        "{a: " * 100_000 + "1" + "}" * 100_000,
        "".join(" " * i + "- \n" for i in range(100)),  # block sequences, by indentation
    ],
    ids=["flow-sequence", "flow-mapping", "block-sequence"],
)
def test_deep_nesting_is_an_issue_not_a_crash(text: str) -> None:
    issue = refused(text, DocumentLimits(max_bytes=10**7, max_depth=64, max_nodes=10**6))
    assert "nests deeper than 64 levels (setting workflow_max_depth)" in issue.message


def test_an_alias_that_contains_itself_is_refused() -> None:
    issue = refused("steps: &s [1, *s]\n")
    assert (issue.line, issue.col) == (1, 15)
    assert "alias *s refers to a value that contains it" in issue.message


def test_aliasing_a_deep_value_counts_its_depth() -> None:
    deep = "[" * 6 + "1" + "]" * 6
    load_text(f"a: &d {deep}\n", limits=SMALL)
    issue = refused(f"a: &d {deep}\nb: [[*d]]\n", SMALL)
    assert (issue.line, issue.col) == (2, 6)
    assert "alias *d nests deeper than 8 levels" in issue.message


def test_document_size_is_checked_before_parsing(tmp_path: Path) -> None:
    issue = refused("a: " + "x" * 5000, SMALL)
    assert issue.message == (
        "document is 5003 bytes, over the limit of 4096 (setting workflow_max_bytes)"
    )
    # Bytes, not characters: 2,100 "é" are 4,200 bytes in 2,103 characters.
    assert "4203 bytes" in refused("a: " + "é" * 2100, SMALL).message
    big = tmp_path / "big.yaml"
    big.write_text("a: " + "x" * 5000)
    with pytest.raises(WorkflowInvalid, match="over the limit of 4096"):
        load_file(big, SMALL)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: !!int abc", "cannot read 'abc' as int: invalid literal"),
        ("a: !!bool maybe", "cannot read 'maybe' as bool: not a valid value"),
        ("a: !!int ", "cannot read '' as int: not a valid value"),
        ("a: 2020-02-30", "cannot read '2020-02-30' as timestamp: day is out of range"),
        ("a: " + "9" * 5000, "as int: Exceeds the limit (4300 digits)"),
    ],
)
def test_a_value_its_tag_refuses_is_an_issue(text: str, message: str) -> None:
    issue = refused(text)
    assert (issue.line, issue.col) == (1, 4)
    assert message in issue.message


def test_a_lone_surrogate_is_an_issue() -> None:
    """A str from a JSON "\\ud800" escape is not UTF-8: refused, not a UnicodeEncodeError."""
    issue = refused("a: 1\nb: x\ud800")
    assert (issue.line, issue.col) == (2, 5)
    assert issue.message == "text is not valid Unicode: surrogates not allowed"


def test_parsed_documents_have_the_same_limits() -> None:
    """The compose API's body and custom definitions arrive parsed, not as YAML."""
    deep: object = 1
    for _ in range(5000):  # deeper than Python's recursion limit
        deep = [deep]
    with pytest.raises(WorkflowInvalid) as caught:
        from_object({"steps": deep})
    (issue,) = caught.value.issues
    assert issue.pointer == "/steps" + "/0" * 63  # the 65th level
    assert "nests deeper than 64 levels" in issue.message
    with pytest.raises(WorkflowInvalid, match="past 200 values"):
        from_object({"steps": list(range(300))}, limits=SMALL)


def test_limits_are_settings() -> None:
    limits = DocumentLimits.from_settings(Settings(workflow_max_nodes=7))
    assert limits.max_nodes == 7
    with pytest.raises(WorkflowInvalid, match="past 7 values"):
        load_text("[1, 2, 3, 4, 5, 6, 7]", limits=limits)


def test_fusion_validate_refuses_the_bomb_fast(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(laughs())
    # A memory cap the full expansion (hundreds of GB) could never fit in: the process
    # must finish well inside it, not be killed by it.
    program = (
        "import resource; resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30)); "
        "from engine.cli import main; raise SystemExit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, "validate", str(bomb)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith(f"{bomb}:6:10: <root>: alias *a4 takes the document past")
    assert "1 file(s) checked, 1 error(s) in 1 file(s)" in result.stderr
