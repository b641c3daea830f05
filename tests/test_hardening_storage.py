"""Issue #8, finding 9: a full or read-only store.

Disk full gives 507 `insufficient_storage` and read-only storage 503 `storage_read_only`
wherever the store is written (a run, a composed workflow, a RAG ingest); a finished run
that cannot be stored is still answered, marked `stored: false`; /health answers 503
naming the store; writes work again as soon as space returns, with no restart; a
read-only data directory fails at start-up with its path and the reason.

Two kinds of full storage are used:
- SQLite's own limit: `PRAGMA max_page_count` at the current page count makes SQLite raise
  SQLITE_FULL for real, and raising it again is "space returns". The pragma belongs to one
  connection, so these tests write on the thread whose connection carries it.
- A real full file system: a small tmpfs mounted for the test and filled with a file. That
  needs root (mount); without it those tests skip and say so.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import httpx
import pytest
from serverutil import serve_app

from engine.config import Settings
from engine.errors import InsufficientStorage, RecordTooLarge, StorageReadOnly
from engine.fusion.runs import RunRequest, RunStore, StoredRun
from engine.fusion.service import RunOutcome
from engine.runtime.trace import RunResult
from engine.services import Engine
from engine.store import Store, StoreError, storage_error
from server.app import create_app

BIG = 200_000  # characters of output: more than a few free pages can hold
OUTPUT = {"out": "x" * BIG}  # what _big_run() answers


def _big_run(n: int = BIG) -> dict[str, Any]:
    """An inline workflow with no models whose output is `n` characters."""
    definition = {
        "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}},
        "steps": [{"step_id": "out", "type": "template", "value": "{{ 'x' * input.n }}"}],
    }
    return {"workflow": "custom", "definition": definition, "input": {"n": n}}


def _composed(name: str, description_chars: int = BIG) -> dict[str, Any]:
    return {
        "name": name,
        "description": "d" * description_chars,
        "steps": [{"step_id": "s", "type": "template", "value": "hi"}],
    }


def _fill(store: Store) -> None:
    """Cap the database at its current size, on this thread's connection."""
    pages = store.query("PRAGMA page_count")[0][0]
    store.query(f"PRAGMA max_page_count = {pages}")


def _make_room(store: Store) -> None:
    store.query("PRAGMA max_page_count = 1073741823")


def _big_body(run_id: str, output: Any = None) -> StoredRun:
    result = RunResult(
        run_id=run_id,
        workflow_id="w",
        workflow_version=1,
        status="completed",
        output={"text": "x" * BIG} if output is None else output,
        total_latency_ms=1.0,
        created_at="2026-11-27T00:00:00Z",
        completed_at="2026-11-27T00:00:01Z",
    )
    return StoredRun(result, "inline", {}, RunRequest(input={}, config=None))


# -- the store layer: SQLite's own SQLITE_FULL and SQLITE_READONLY ----------------------------
def test_full_database_raises_507_everywhere_it_is_written_and_recovers(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        runs = RunStore(store)
        _fill(store)
        with pytest.raises(InsufficientStorage) as caught:
            runs.save(_big_body("r1"))
        assert (caught.value.status, caught.value.type) == (507, "internal_error")
        assert caught.value.code == "insufficient_storage"
        assert str(store.path) in caught.value.message
        assert isinstance(caught.value.__cause__, apsw.FullError)
        with pytest.raises(InsufficientStorage):
            runs.try_save(_big_body("r2"))  # autocommit, on the loop
        with pytest.raises(InsufficientStorage):
            store.query("CREATE TABLE filler AS SELECT ? AS text", ("x" * BIG,))
        check = store.write_check()
        assert not check.writable
        assert check.free_bytes == 0
        assert check.error is not None
        assert check.error.code == "insufficient_storage"
        assert store.query("SELECT count(*) FROM runs") == [(0,)]  # nothing half-written

        _make_room(store)  # space returns: the same store, the same connection
        runs.save(_big_body("r1"))
        assert runs.try_save(_big_body("r2"))
        assert store.write_check().writable
        assert store.query("SELECT count(*) FROM runs") == [(2,)]


def test_read_only_database_raises_503_storage_read_only(tmp_path: Path) -> None:
    """Root ignores file permissions, so the connection is made read-only with
    `PRAGMA query_only` (SQLite then answers SQLITE_READONLY to every write)."""
    with Store(tmp_path / "db.sqlite3") as store:
        store.query("PRAGMA query_only = 1")
        with pytest.raises(StorageReadOnly) as caught:
            RunStore(store).save(_big_body("r1"))
        assert (caught.value.status, caught.value.code) == (503, "storage_read_only")
        assert caught.value.type == "service_unavailable_error"
        check = store.write_check()
        assert check.error is not None
        assert check.error.code == "storage_read_only"
        store.query("PRAGMA query_only = 0")
        assert store.write_check().writable


def test_raw_apsw_error_found_through_a_chain_of_causes(tmp_path: Path) -> None:
    """The server's fallback (server/errors.py) reads an apsw error that escaped the store's
    own translation, even wrapped in another exception; other apsw errors stay 500s."""
    with Store(tmp_path / "db.sqlite3") as store:
        _fill(store)
        conn = store.connection()  # direct use, as a reader might: no translation
        with pytest.raises(apsw.FullError) as full:
            conn.execute("CREATE TABLE filler AS SELECT ? AS text", ("x" * BIG,))
    try:
        raise RuntimeError("wrapped by someone") from full.value
    except RuntimeError as wrapped:
        found = storage_error(wrapped)
    assert isinstance(found, InsufficientStorage)
    assert storage_error(apsw.ConstraintError("CHECK constraint failed")) is None
    assert storage_error(ValueError("not storage")) is None


async def test_orchestrate_keeps_the_result_when_the_run_cannot_be_stored(
    tmp_path: Path,
) -> None:
    """The service layer, streaming and not: the run's result comes back with
    `stored: false` and a warning; compose is refused with 507; both work again once
    there is room. (The event loop runs on this thread, so it uses the capped connection.)"""
    settings = Settings(data_dir=tmp_path, workflows_dir=tmp_path / "wf", startup_models=[])
    engine = await Engine.start(settings)
    try:
        fusion = engine.fusion
        assert fusion is not None
        _fill(engine.store)
        outcome = await fusion.orchestrate(**_big_run())
        assert outcome.result.status == "completed"
        assert outcome.result.output == OUTPUT
        assert outcome.stored is False
        assert isinstance(outcome.storage_error, InsufficientStorage)
        assert "full" in outcome.storage_error.message
        with pytest.raises(InsufficientStorage):
            fusion.compose(_composed("c1"))
        assert "c1" not in engine.catalog.ids()  # nothing half-done either

        events = [e async for e in fusion.stream(await fusion.prepare(**_big_run()))]
        last = events[-1]
        assert isinstance(last, RunOutcome)
        assert last.stored is False
        assert last.result.output == OUTPUT

        _make_room(engine.store)
        outcome = await fusion.orchestrate(**_big_run())
        assert outcome.stored is True
        assert outcome.storage_error is None
        assert fusion.get_run(outcome.result.run_id).result.output == OUTPUT
        assert fusion.compose(_composed("c1")).workflow_id == "c1"
    finally:
        await engine.stop()


# -- start-up on read-only storage ------------------------------------------------------------
def _assert_clear_start_up_error(message: str, path: Path, reason: str) -> None:
    assert str(path) in message
    assert reason in message
    assert "sqlite-vec" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions: see the tmpfs test")
def test_start_up_on_an_unwritable_directory_names_path_and_reason(tmp_path: Path) -> None:
    data = tmp_path / "data"
    Store(data / "fusion.sqlite3").close()
    (data / "fusion.sqlite3-wal").unlink(missing_ok=True)
    (data / "fusion.sqlite3-shm").unlink(missing_ok=True)
    data.chmod(0o500)
    try:
        with pytest.raises(StoreError) as caught:
            Store(data / "fusion.sqlite3")
        _assert_clear_start_up_error(str(caught.value), data / "fusion.sqlite3", "not writable")
    finally:
        data.chmod(0o700)


# -- a real full file system: a tmpfs mounted for the test (root only) ------------------------
@contextlib.contextmanager
def _tmpfs(where: Path, size_mb: int) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the SQLite-limit tests cover the rest")
    where.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _remount_read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


def _fill_file_system(filler: Path) -> None:
    """Write until the file system refuses even one more byte."""
    with filler.open("wb", buffering=0) as out:
        for size in (65536, 1):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * size)
    assert os.statvfs(filler.parent).f_bavail == 0


def test_start_up_on_a_read_only_file_system_names_path_and_reason(tmp_path: Path) -> None:
    """A data directory on a file system mounted read-only: the existing database (WAL needs
    its -shm file) and a new one both fail with the path and the reason."""
    with _tmpfs(tmp_path / "mnt", 8) as mnt:
        Store(mnt / "data" / "fusion.sqlite3").close()
        (mnt / "empty").mkdir()
        _remount_read_only(mnt)
        for path in (mnt / "data" / "fusion.sqlite3", mnt / "empty" / "fusion.sqlite3"):
            with pytest.raises(StoreError) as caught:
                Store(path)
            _assert_clear_start_up_error(str(caught.value), path, "mounted read-only")
        with pytest.raises(StoreError) as caught:
            Store(mnt / "missing" / "fusion.sqlite3")
        _assert_clear_start_up_error(str(caught.value), mnt / "missing", "Read-only file system")


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert set(error) >= {"type", "message", "param", "code"}
    return error


def _health(client: httpx.Client) -> httpx.Response:
    return client.get("/health")  # the client's timeout is the hang guard


def _stream_result(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    with client.stream("POST", "/api/fusion/orchestrate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        results = [
            json.loads(line[len("data: ") :])
            for line in r.iter_lines()
            if line.startswith("data: ") and '"workflow_id"' in line
        ]
    assert results, "the stream ended without its result event"
    return results[-1]


def test_full_file_system_end_to_end(tmp_path: Path, tiny_embedder_dir: Path) -> None:
    """A real uvicorn whose data directory is a 16 MB tmpfs, filled by a file: compose and
    RAG ingest answer 507, orchestrate answers its result with `stored: false` (streaming
    too), /health answers 503 naming the store; deleting the file is enough for
    everything to work again."""
    with _tmpfs(tmp_path / "mnt", 16) as mnt:
        settings = Settings(
            data_dir=mnt / "data",
            workflows_dir=tmp_path / "wf",
            log_level="warning",
            store_min_free_mb=1,
            startup_models=[
                {
                    "model_path": str(tiny_embedder_dir),
                    "model_type": "embeddings",
                    "model_id": "emb",
                }
            ],
        )
        with (
            serve_app(create_app(settings)) as server,
            httpx.Client(base_url=server.base_url, timeout=60.0) as client,
        ):
            assert _health(client).json()["status"] == "ok"
            filler = mnt / "filler"
            _fill_file_system(filler)

            health = _health(client)
            assert health.status_code == 503
            assert health.json()["status"] == "unhealthy"
            assert health.json()["persistence"]["store_writable"] is False
            assert health.json()["error"]["code"] == "insufficient_storage"

            error = _error(
                client.post("/api/fusion/compose", json=_composed("c1")),
                507,
                "insufficient_storage",
            )
            assert error["type"] == "internal_error"
            assert "full" in error["message"]
            ingest = client.post(
                "/api/rag/ingest",
                data={"collection": "docs"},
                files=[("files", ("a.txt", ("word " * 40_000).encode(), "text/plain"))],
            )
            _error(ingest, 507, "insufficient_storage")
            response = client.post("/api/fusion/orchestrate", json=_big_run())
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["result"] == OUTPUT
            assert body["stored"] is False
            assert body["warning"]["code"] == "insufficient_storage"
            _error(client.get(f"/api/fusion/runs/{body['workflow_id']}"), 404, "run_not_found")
            streamed = _stream_result(client, _big_run())
            assert streamed["stored"] is False
            assert streamed["result"] == OUTPUT
            assert _health(client).status_code == 503  # still answering, still honest

            filler.unlink()  # space returns; no restart

            assert _health(client).json()["status"] == "ok"
            assert client.post("/api/fusion/compose", json=_composed("c1")).status_code == 201
            assert (
                client.post(
                    "/api/rag/ingest",
                    data={"collection": "docs"},
                    files=[("files", ("a.txt", ("word " * 40_000).encode(), "text/plain"))],
                ).status_code
                == 200
            )
            body = client.post("/api/fusion/orchestrate", json=_big_run()).json()
            assert body["stored"] is True
            stored = client.get(f"/api/fusion/runs/{body['workflow_id']}")
            assert stored.status_code == 200
            assert stored.json()["result"] == OUTPUT
            assert _stream_result(client, _big_run())["stored"] is True


# -- retention and record size (issue #8, finding 4: "a 50 MB output is stored forever") ---------
def test_stored_runs_are_bounded_in_number_and_size(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        runs = RunStore(store, max_runs=3, max_run_bytes=2 * BIG)
        for i in range(5):
            if i % 2:
                runs.save(_big_body(f"r{i}"))
            else:
                assert runs.try_save(_big_body(f"r{i}"))
        kept = [row[0] for row in store.query("SELECT id FROM runs ORDER BY rowid")]
        assert kept == ["r2", "r3", "r4"]  # the oldest went first
        huge = _big_body("r5", output="x" * 3 * BIG)
        with pytest.raises(RecordTooLarge) as caught:
            runs.try_save(huge)
        assert caught.value.status == 413
        assert "runs_max_stored_bytes" in caught.value.message
        with pytest.raises(RecordTooLarge):
            runs.save(huge)
        # The limit is in bytes: 0.8 BIG characters of 3-byte text are 2.4 BIG bytes.
        with pytest.raises(RecordTooLarge):
            runs.save(_big_body("r6", output="€" * (BIG * 4 // 5)))
        assert store.query("SELECT count(*) FROM runs") == [(3,)]
