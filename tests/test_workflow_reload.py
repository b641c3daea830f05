"""Hot reload of the workflows directory (issue #13): the reloader against real files, the
real compiler and a real catalog, one look at a time; then a real server that follows its
directory on its own (new, changed, broken and deleted files, composed workflows left
alone, a `workflow` step calling a reloaded file)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import running_server
from polling import until
from structlog.testing import capture_logs

from engine.dsl.catalog import WorkflowCatalog
from engine.dsl.compiler import compile_document
from engine.dsl.source import load_text
from engine.fusion.reload import WorkflowReloader
from engine.steps.registry import default_registry

INTERVAL_S = 0.02


def workflow(wf_id: str, text: str, *, version: int = 1, extra: str = "") -> str:
    return (
        f"id: {wf_id}\nversion: {version}\nsteps:\n"
        f"  - step_id: say\n    type: template\n    value: {text!r}\n"
        f"output: '{{{{ steps.say.output }}}}'\n{extra}"
    )


BROKEN = "id: hello\nsteps:\n  - step_id: say\n    type: nosuchtype\n"


def write(directory: Path, name: str, text: str) -> Path:
    """Write the file whole, as an editor that saves by renaming does: a server polling the
    directory never sees it half written (which would only log one failure more)."""
    path = directory / name
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
    return path


# -- the reloader, one look at a time ---------------------------------------------------------
@pytest.fixture
def wf_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "wf"
    directory.mkdir()
    write(directory, "hello.yaml", workflow("hello", "v1"))
    return directory


@pytest.fixture
def reloader(wf_dir: Path) -> WorkflowReloader:
    loaded = WorkflowReloader(WorkflowCatalog(default_registry()), wf_dir, INTERVAL_S)
    loaded.load()
    return loaded


def served(reloader: WorkflowReloader) -> dict[str, Any]:
    return {wf.id: wf.definition["steps"][0]["value"] for wf in reloader.catalog}


async def test_new_changed_and_deleted_files_follow_the_directory(
    reloader: WorkflowReloader, wf_dir: Path
) -> None:
    assert served(reloader) == {"hello": "v1"}
    (wf_dir / "nested").mkdir()
    write(wf_dir, "nested/bye.yml", workflow("bye", "ciao"))
    with capture_logs() as logs:
        await reloader.reload()
    assert served(reloader) == {"hello": "v1", "bye": "ciao"}
    assert [e["event"] for e in logs] == ["workflow_reloaded"]
    assert logs[0]["workflow_id"] == "bye"

    write(wf_dir, "hello.yaml", workflow("hello", "version two", version=2))
    before = reloader.catalog.get("hello")
    await reloader.reload()
    assert served(reloader)["hello"] == "version two"
    assert before.definition["steps"][0]["value"] == "v1"  # a run holding it keeps it

    (wf_dir / "nested" / "bye.yml").unlink()
    with capture_logs() as logs:
        await reloader.reload()
    assert served(reloader) == {"hello": "version two"}
    assert [(e["event"], e["workflow_id"]) for e in logs] == [("workflow_removed", "bye")]


async def test_a_broken_file_keeps_the_valid_version_and_is_logged_once(
    reloader: WorkflowReloader, wf_dir: Path
) -> None:
    write(wf_dir, "hello.yaml", BROKEN)
    with capture_logs() as logs:
        await reloader.reload()
        await reloader.reload()  # unchanged since: not reported again
    assert served(reloader) == {"hello": "v1"}
    (failed,) = logs
    assert failed["event"] == "workflow_reload_failed"
    assert failed["kept"] == "hello"
    (error,) = failed["errors"]
    assert error.startswith(f"{wf_dir / 'hello.yaml'}:4:11: ")
    assert "nosuchtype" in error

    write(wf_dir, "hello.yaml", workflow("hello", "fixed", version=3))
    await reloader.reload()
    assert served(reloader) == {"hello": "fixed"}


async def test_a_yaml_syntax_error_names_line_and_column(
    reloader: WorkflowReloader, wf_dir: Path
) -> None:
    write(wf_dir, "hello.yaml", "id: hello\nname: a: b\n")
    with capture_logs() as logs:
        await reloader.reload()
    assert served(reloader) == {"hello": "v1"}
    (error,) = logs[0]["errors"]
    assert error.startswith(f"{wf_dir / 'hello.yaml'}:2:8: ")
    assert "YAML syntax error" in error


async def test_a_renamed_file_keeps_its_workflow_and_a_duplicate_id_is_refused(
    reloader: WorkflowReloader, wf_dir: Path
) -> None:
    (wf_dir / "hello.yaml").rename(wf_dir / "greeting.yaml")
    with capture_logs() as logs:
        await reloader.reload()
    assert served(reloader) == {"hello": "v1"}
    assert [e["event"] for e in logs] == ["workflow_reloaded"]  # moved, not removed

    write(wf_dir, "zzz.yaml", workflow("hello", "impostor"))
    with capture_logs() as logs:
        await reloader.reload()
    assert served(reloader) == {"hello": "v1"}
    assert "also defined in" in logs[0]["errors"][0]

    # A file that changes its id: the old id goes, the new one comes.
    write(wf_dir, "greeting.yaml", workflow("greeting", "renamed"))
    (wf_dir / "zzz.yaml").unlink()
    await reloader.reload()
    assert served(reloader) == {"greeting": "renamed"}


async def test_composed_workflows_are_never_touched(
    reloader: WorkflowReloader, wf_dir: Path
) -> None:
    catalog = reloader.catalog
    composed = compile_document(load_text(workflow("mine", "composed")), catalog.registry)
    composed.file = None  # as the compose API's are: from a request, not a file
    catalog.add(composed)
    write(wf_dir, "mine.yaml", workflow("mine", "from a file"))
    with capture_logs() as logs:
        await reloader.reload()
    assert catalog.get("mine") is composed
    assert "composed workflow" in logs[0]["errors"][0]


async def test_a_deleted_callee_is_removed_and_its_callers_are_named(
    reloader: WorkflowReloader, wf_dir: Path
) -> None:
    caller = "id: caller\nsteps:\n  - step_id: call\n    type: workflow\n    workflow: hello\n"
    write(wf_dir, "caller.yaml", caller)
    await reloader.reload()
    assert reloader.catalog.ids() == {"hello", "caller"}
    (wf_dir / "hello.yaml").unlink()
    with capture_logs() as logs:
        await reloader.reload()
    (removed,) = logs
    assert removed["event"] == "workflow_removed"
    assert removed["log_level"] == "warning"
    assert removed["called_by"] == ["caller"]


async def test_reloading_starts_and_stops_with_its_task(
    reloader: WorkflowReloader, wf_dir: Path
) -> None:
    reloader.start()
    try:
        write(wf_dir, "late.yaml", workflow("late", "here"))
        await until(lambda: "late" in reloader.catalog.ids(), "the new file is loaded")
    finally:
        await reloader.stop()
    off = WorkflowReloader(reloader.catalog, wf_dir, 0)
    off.start()  # interval 0: reloading is off
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "workflow-reload"]
    await off.stop()


# -- a real server ------------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[httpx.Client, Path]]:
    directory = tmp_path / "wf"
    directory.mkdir()
    write(directory, "base.yaml", workflow("base", "base"))
    with running_server(
        tmp_path, workflows_dir=directory, workflows_reload_interval_s=INTERVAL_S
    ) as client:
        yield client, directory


def listed(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/api/fusion/workflows")
    assert response.status_code == 200, response.text
    return {w["id"]: w for w in response.json()["workflows"]}


def run(client: httpx.Client, wf_id: str) -> Any:
    response = client.post("/api/fusion/orchestrate", json={"workflow": wf_id})
    assert response.status_code == 200, response.text
    return response.json()["result"]


def reload_events(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [
        r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == event
    ]


@pytest.mark.e2e
async def test_the_server_follows_its_workflows_dir(
    server: tuple[httpx.Client, Path], caplog: pytest.LogCaptureFixture
) -> None:
    client, directory = server
    caplog.set_level(logging.INFO)
    assert set(listed(client)) == {"base"}

    write(directory, "extra.yaml", workflow("extra", "one"))
    await until(lambda: "extra" in listed(client), "the new file is listed")
    assert listed(client)["extra"]["source"] == "predefined"
    assert run(client, "extra") == "one"

    write(directory, "extra.yaml", workflow("extra", "two, longer", version=2))
    await until(lambda: listed(client)["extra"]["version"] == 2, "the changed file is served")
    assert run(client, "extra") == "two, longer"

    write(directory, "extra.yaml", BROKEN.replace("hello", "extra"))
    await until(
        lambda: bool(reload_events(caplog, "workflow_reload_failed")), "the failure is logged"
    )
    (failed,) = reload_events(caplog, "workflow_reload_failed")
    assert failed["errors"][0].startswith(f"{directory / 'extra.yaml'}:4:11: ")
    assert listed(client)["extra"]["version"] == 2
    assert run(client, "extra") == "two, longer"

    (directory / "extra.yaml").unlink()
    await until(lambda: "extra" not in listed(client), "the deleted file's workflow is gone")
    response = client.post("/api/fusion/orchestrate", json={"workflow": "extra"})
    assert response.status_code == 404
    assert set(listed(client)) == {"base"}


@pytest.mark.e2e
async def test_composed_workflows_and_callers_across_reloads(
    server: tuple[httpx.Client, Path], caplog: pytest.LogCaptureFixture
) -> None:
    client, directory = server
    caplog.set_level(logging.INFO)
    composed = {
        "name": "mine",
        "steps": [{"step_id": "say", "type": "template", "value": "composed"}],
        "output": "{{ steps.say.output }}",
    }
    assert client.post("/api/fusion/compose", json=composed).status_code == 201

    # A file may not take a composed workflow's id...
    write(directory, "mine.yaml", workflow("mine", "from a file"))
    await until(
        lambda: bool(reload_events(caplog, "workflow_reload_failed")), "the clash is logged"
    )
    assert listed(client)["mine"]["source"] == "custom"
    assert run(client, "mine") == "composed"
    # ... and a file's id, once loaded, is not one compose may take.
    write(directory, "later.yaml", workflow("later", "file"))
    await until(lambda: "later" in listed(client), "the new file is listed")
    composed["name"] = "later"
    assert client.post("/api/fusion/compose", json=composed).status_code == 409

    # A workflow step calls the callee's current version.
    caller = (
        "id: caller\nsteps:\n  - step_id: call\n    type: workflow\n    workflow: later\n"
        "output: '{{ steps.call.output }}'\n"
    )
    write(directory, "caller.yaml", caller)
    await until(lambda: "caller" in listed(client), "the caller is listed")
    assert run(client, "caller") == "file"
    write(directory, "later.yaml", workflow("later", "file, changed", version=2))
    await until(lambda: listed(client)["later"]["version"] == 2, "the callee is reloaded")
    assert run(client, "caller") == "file, changed"


async def test_files_that_are_not_workflows_are_neither_loaded_nor_reported(
    tmp_path: Path,
) -> None:
    # Test cases beside a workflow, a compose file, a hidden directory: engine.dsl.discovery.
    directory = tmp_path / "wf"
    (directory / ".github").mkdir(parents=True)
    write(directory, "hello.yaml", workflow("hello", "v1"))
    write(directory, "hello.test.yaml", "cases:\n  - name: one\n    input: {}\n")
    write(directory, "docker-compose.yml", "services: {}\n")
    write(directory, ".github/ci.yaml", "steps: [1\n")
    reloader = WorkflowReloader(WorkflowCatalog(default_registry()), directory, INTERVAL_S)
    reloader.load()  # would raise on a file taken for a broken workflow
    assert served(reloader) == {"hello": "v1"}
    write(directory, "other.test.yaml", "cases: []\n")
    write(directory, "hello.yaml", workflow("hello", "v2"))
    with capture_logs() as logs:
        await reloader.reload()
    assert [e["event"] for e in logs] == ["workflow_reloaded"]
    assert served(reloader) == {"hello": "v2"}
