"""Property-based fuzzing of the workflow loader and compiler as `fusion validate` runs them
(issue #8): whatever the text or the document, the only failure is WorkflowInvalid with
located issues -- no other exception, within bounded work (counted calls) and memory.

Deterministic (derandomized, no example database) and bounded, so it runs in `make test`."""

from __future__ import annotations

import io
import json
import math
import sys
import tracemalloc
from collections.abc import Callable
from types import FrameType
from typing import Any

from fuzz_strategies import FUZZ, workflows
from hypothesis import example, given
from hypothesis import strategies as st
from ruamel.yaml import YAML

from engine.dsl.compiler import compile_document
from engine.dsl.issues import WorkflowInvalid
from engine.dsl.source import Document, DocumentLimits, from_object, load_text
from engine.steps.registry import default_registry

# Generous bounds that still prove "did not blow up", counted rather than timed so they do
# not depend on the machine: a workflow of a few kilobytes is loaded and compiled in under
# 100,000 Python calls (lazy imports on the first one included) and a few megabytes.
MAX_CALLS = 2_000_000
MAX_PEAK_BYTES = 64 * 1024 * 1024
# Small limits, so the fuzzer reaches them with short inputs.
LIMITS = DocumentLimits(max_bytes=20_000, max_depth=16, max_nodes=2_000)
REGISTRY = default_registry()
KNOWN_WORKFLOWS = frozenset({"child_echo"})


def bounded(action: Callable[[], Any]) -> None:
    """Run `action`; it may only fail with WorkflowInvalid, each issue a located message."""
    calls = 0

    def count(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    tracemalloc.start()
    sys.setprofile(count)
    issues = []
    try:
        action()
    except WorkflowInvalid as exc:
        issues = exc.issues
        assert issues
    finally:
        sys.setprofile(None)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert calls < MAX_CALLS, f"{calls} calls"
    assert peak < MAX_PEAK_BYTES, f"peak {peak} bytes"
    for issue in issues:
        assert isinstance(issue.message, str)
        assert issue.message
        assert issue.text()  # formats, as `fusion validate` prints it


def validate_text(text: str) -> None:
    """What `fusion validate` does with one file's text."""
    doc = load_text(text, "fuzz.yaml", LIMITS)
    compile_document(doc, REGISTRY, workflow_ids=KNOWN_WORKFLOWS, default_id="fuzz")


def compile_object(data: dict[str, Any]) -> None:
    """What the compose API and orchestrate's custom definitions do with a parsed body."""
    doc: Document = from_object(data, limits=LIMITS)
    compile_document(doc, REGISTRY, workflow_ids=KNOWN_WORKFLOWS, default_id="fuzz")


# -- YAML-ish text ---------------------------------------------------------------------------

YAML_TOKENS = [
    *"[]{},:-?|>#'\"\n",
    ": ",
    "- ",
    "  ",
    "\t",
    "&a ",
    "*a",
    "&b ",
    "*b",
    "<<: ",
    "? ",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "%TAG ! tag:example.com,2000:\n",
    "!!int ",
    "!!float ",
    "!!bool ",
    "!!str ",
    "!!binary ",
    "!!timestamp ",
    "!!set ",
    "!!omap ",
    "!!map ",
    "!!seq ",
    "!!null ",
    "!!python/object:os.system ",
    "!local ",
    "1",
    "-0",
    "0x1F",
    "0o17",
    "1e400",
    ".nan",
    "-.inf",
    "2020-02-30",
    "2020-01-01T10:00:00Z",
    "yes",
    "null",
    "~",
    "9" * 4400,
    "\x00",
    "\ufeff",
    "\ud800",
    "\u2028",
    "é",
    "steps",
    "step_id",
    "type",
    "template",
    "value",
    "{{ input.x }}",
    "{{ steps.a.output }}",
]

yaml_texts = st.lists(
    st.sampled_from(YAML_TOKENS) | st.text(max_size=4), min_size=1, max_size=80
).map("".join)


@FUZZ
@given(yaml_texts)
def test_yaml_like_text_only_gives_issues(text: str) -> None:
    bounded(lambda: validate_text(text))


@FUZZ
@given(st.text(max_size=300))
def test_any_text_only_gives_issues(text: str) -> None:
    bounded(lambda: validate_text(text))


@st.composite
def alias_bombs(draw: st.DrawFn) -> str:
    """Anchors that alias earlier anchors any number of times, in flow or block style,
    as sequences or as merge keys: expansion reaches the value limit quickly."""
    levels = draw(st.integers(1, 12))
    lines = ["a0: &a0 " + draw(st.sampled_from(["lol", "[lol, lol]", "{x: lol, y: lol}"]))]
    for i in range(1, levels + 1):
        refs = [f"*a{draw(st.integers(0, i - 1))}" for _ in range(draw(st.integers(1, 12)))]
        if draw(st.booleans()):
            lines.append(f"a{i}: &a{i} [{', '.join(refs)}]")
        else:
            merges = ", ".join(refs) if refs[0] != "*a0" else "*a0"
            lines.append(f"a{i}: &a{i}\n  <<: [{merges}]\n  own: {i}")
    lines.append(f"steps: [{{step_id: s, type: template, value: *a{levels}}}]")
    return "\n".join(lines) + "\n"


@FUZZ
@given(alias_bombs())
def test_aliases_never_expand_past_the_limits(text: str) -> None:
    bounded(lambda: validate_text(text))


@FUZZ
@given(st.integers(1, 20_000), st.sampled_from(["[", "{a: ", "- ", "!!seq [", "&x ["]))
def test_deep_nesting_only_gives_issues(depth: int, opener: str) -> None:
    closer = {"[": "]", "{a: ": "}", "!!seq [": "]", "&x [": "]"}.get(opener, "")
    if opener == "- ":
        text = "".join(" " * i + "- \n" for i in range(min(depth, 150)))
    else:
        text = opener * depth + "1" + closer * depth
    bounded(lambda: load_text(text, "deep.yaml", DocumentLimits(10**6, 16, 10**6)))


# -- JSON, the compose API's format ------------------------------------------------------------

# Two limits of YAML itself, where JSON text is not read as JSON would be: json.dumps writes
# a character beyond the BMP as an escaped surrogate pair, which libyaml refuses ("invalid
# Unicode character escape code"; written raw, as editors write it, it loads), and YAML
# refuses a raw DEL (json.dumps leaves it unescaped). Both are issues, not crashes (the
# tests above); "<<" is YAML's merge key.
bmp_text = st.text(
    st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"], exclude_characters="\x7f"),
    max_size=20,
)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | bmp_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(bmp_text.filter(lambda k: k != "<<"), inner, max_size=5)
    ),
    max_leaves=30,
)


@FUZZ
@given(json_values, st.sampled_from([None, 2]))
def test_json_text_loads_as_the_same_values(value: Any, indent: int | None) -> None:
    """JSON is read as the YAML subset it is: the loader returns exactly what was dumped."""
    text = json.dumps(value, indent=indent)
    doc = load_text(text, "fuzz.json", DocumentLimits(10**6, 64, 10**6))
    assert _same(doc.data, value)


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, float) and not isinstance(got, bool):
        return isinstance(got, int | float) and math.isclose(got, want, rel_tol=1e-15)
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and got.keys() == want.keys()
            and all(_same(got[k], v) for k, v in want.items())
        )
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(got) == len(want)
            and all(_same(g, w) for g, w in zip(got, want, strict=True))
        )
    return type(got) is type(want) and got == want


# -- workflow-shaped documents -----------------------------------------------------------------


@FUZZ
@given(workflows)
# Found by this test: a step plugin's check() ran on parameters the schema had refused.
@example({"steps": [{"step_id": "a", "type": "model_call", "operation": []}]})
def test_workflow_shaped_objects_only_give_issues(data: dict[str, Any]) -> None:
    bounded(lambda: compile_object(data))


@FUZZ
@given(workflows, st.sampled_from(["json", "flow", "block"]))
def test_workflow_shaped_text_only_gives_issues(data: dict[str, Any], style: str) -> None:
    bounded(lambda: validate_text(_dump(data, style)))


def _dump(data: Any, style: str) -> str:
    """JSON text, or YAML in flow or block style as ruamel writes it."""
    if style == "json":
        return json.dumps(data)
    yaml = YAML(typ="safe")
    yaml.default_flow_style = style == "flow"
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()
