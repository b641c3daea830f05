"""The YAML loader's merge keys, the graph's skip edges, and `fusion run` argument errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engine.dsl.compiler import compile_document
from engine.dsl.graph import mermaid
from engine.dsl.source import load_text
from engine.steps.registry import default_registry


def test_merge_key_before_own_keys_is_not_a_duplicate_and_own_keys_win() -> None:
    doc = load_text("base: &b {x: 1, y: 2}\nchild:\n  <<: *b\n  x: 10\n")
    assert doc.data["child"] == {"x": 10, "y": 2}
    assert doc.keys[("child", "x")] == (4, 3)


def test_skip_propagation_is_drawn_through_chains() -> None:
    wf = compile_document(
        load_text(
            """
steps:
  - {step_id: a, type: template, value: 1, when: "{{ input.go }}"}
  - {step_id: b, type: template, value: "{{ steps.a.output }}"}
  - {step_id: c, type: template, value: "{{ steps.b.output }}"}
  - {step_id: d, type: template, value: "{{ steps.c.ran }}"}
  - {step_id: e, type: template, value: "{{ steps.d.output }}"}
"""
        ),
        default_registry(),
    )
    chart = mermaid(wf)
    assert "a -. skip propagates .-> b" in chart
    assert "b -. skip propagates .-> c" in chart  # b is skipped whenever a is
    assert "c -. if ran .-> d" in chart
    assert "d --> e" in chart  # d handles the skip, so e never inherits it


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_run_refuses_non_object_json_and_missing_files(tmp_path: Path) -> None:
    flow = tmp_path / "flow.yaml"
    flow.write_text("steps:\n  - {step_id: a, type: template, value: 1}\n")
    bad_json = _run([str(flow), "--input-json", "[1]"], tmp_path)
    assert bad_json.returncode == 2
    assert "--input-json must be a JSON object" in bad_json.stderr
    missing = _run(["nothere.yaml"], tmp_path)
    assert missing.returncode == 2
    assert "no such workflow file" in missing.stderr


def test_a_broken_file_in_the_workflows_dir_does_not_stop_an_unrelated_run(
    tmp_path: Path,
) -> None:
    (tmp_path / "workflows").mkdir()
    (tmp_path / "workflows" / "broken.yaml").write_text("steps: [}\n")
    flow = tmp_path / "flow.yaml"
    flow.write_text("steps:\n  - {step_id: a, type: template, value: 7}\n")
    result = _run([str(flow)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert '"status": "completed"' in result.stdout
    assert "broken.yaml skipped" in result.stderr
