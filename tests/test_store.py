"""engine.store against real SQLite files and the real sqlite-vec extension."""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import apsw
import pytest

from engine import store as store_module
from engine.errors import ErrorCode, StorageBusy
from engine.store import Migration, Store, StoreError, register_migration, registered_migrations


def _f32(values: list[float]) -> bytes:
    return struct.pack(f"{len(values)}f", *values)


def test_opens_new_file_in_missing_dirs_with_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "fusion.sqlite3"
    with Store(path) as store:
        assert path.is_file()
        assert store.query("PRAGMA journal_mode")[0][0] == "wal"
        assert store.query("PRAGMA synchronous")[0][0] == 1  # NORMAL
        assert store.query("PRAGMA foreign_keys")[0][0] == 1
        assert store.query("PRAGMA busy_timeout")[0][0] > 0
        assert store.ping().startswith("v")


def test_core_migration_creates_runs_table(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        assert store.applied_migrations()[1] == "runs"
        assert store.user_version() == max(m.version for m in registered_migrations())
        columns = [row[1] for row in store.query("PRAGMA table_info(runs)")]
        # Migration 1's columns, in order; later core migrations append (engine/fusion/runs.py).
        assert columns[:11] == [
            "id",
            "workflow_id",
            "workflow_version",
            "status",
            "input",
            "result",
            "trace",
            "error",
            "created_at",
            "completed_at",
            "total_latency_ms",
        ]
        with store.transaction() as conn:
            conn.execute(
                "INSERT INTO runs (id, workflow_id, workflow_version, status, input, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                ("r1", "wf", 1, "running", json.dumps({"q": "x"}), "2025-01-01T00:00:00Z"),
            )
        with pytest.raises(apsw.ConstraintError), store.transaction() as conn:
            conn.execute(
                "INSERT INTO runs (id, workflow_id, status, input, created_at)"
                " VALUES ('r2', 'wf', 'running', 'not json', 'now')"
            )
        assert store.query("SELECT id FROM runs") == [("r1",)]


def test_migrations_apply_once_in_order_and_reopen_is_idempotent(tmp_path: Path) -> None:
    calls: list[int] = []

    def callable_migration(conn: apsw.Connection) -> None:
        calls.append(1)
        conn.execute("INSERT INTO t (v) VALUES ('from callable')")

    migrations = [
        Migration(20, "fill", callable_migration),
        Migration(10, "create_t", "CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('sql');"),
    ]
    path = tmp_path / "db.sqlite3"
    with Store(path, migrations=migrations) as store:
        assert store.user_version() == 20
        assert store.applied_migrations() == {10: "create_t", 20: "fill"}
        assert store.query("SELECT v FROM t") == [("sql",), ("from callable",)]
        assert store.migrate() == []
    for _ in range(2):
        with Store(path, migrations=migrations) as store:
            assert store.user_version() == 20
            assert store.query("SELECT count(*) FROM t") == [(2,)]
    assert calls == [1]


def test_later_migration_of_a_lower_version_is_still_applied(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with Store(path, migrations=[Migration(200, "jobs", "CREATE TABLE jobs (id TEXT)")]):
        pass
    extended = [
        Migration(200, "jobs", "CREATE TABLE jobs (id TEXT)"),
        Migration(2, "core_extra", "CREATE TABLE extra (id TEXT)"),
    ]
    with Store(path, migrations=extended) as store:
        assert store.applied_migrations() == {2: "core_extra", 200: "jobs"}
        assert store.user_version() == 200  # highest applied, never lowered
        assert store.query("SELECT count(*) FROM extra") == [(0,)]


def test_failing_migration_leaves_nothing_and_names_itself(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    bad = [
        Migration(1, "ok", "CREATE TABLE a (x)"),
        Migration(2, "bad", "CREATE TABLE b (x); INSERT INTO nope VALUES (1);"),
    ]
    with pytest.raises(StoreError, match=r"migration 2 \(bad\) failed"):
        Store(path, migrations=bad)
    with Store(path, migrations=bad[:1]) as store:
        assert store.applied_migrations() == {1: "ok"}
        assert store.user_version() == 1
        tables = {r[0] for r in store.query("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "b" not in tables


def test_renamed_migration_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    with Store(path, migrations=[Migration(1, "first", "CREATE TABLE a (x)")]):
        pass
    with pytest.raises(StoreError, match="recorded as 'first'"):
        Store(path, migrations=[Migration(1, "renamed", "CREATE TABLE a (x)")])


def test_register_migration_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "_registry", dict(store_module._registry))
    first = register_migration(4242, "test_table", "CREATE TABLE test_table (x)")
    assert register_migration(4242, "test_table", "CREATE TABLE test_table (x)") is first
    with pytest.raises(StoreError, match="already registered"):
        register_migration(4242, "other", "SELECT 1")
    with pytest.raises(StoreError, match=">= 1"):
        register_migration(0, "zero", "SELECT 1")
    with pytest.raises(StoreError, match="must be an int"):
        register_migration(True, "bool", "SELECT 1")  # type: ignore[arg-type]
    versions = [m.version for m in registered_migrations()]
    assert versions == sorted(versions)
    assert 4242 in versions


def test_registered_migration_reaches_store_through_migrate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_registry", dict(store_module._registry))
    with Store(tmp_path / "db.sqlite3") as store:
        register_migration(150, "late_module", "CREATE TABLE late (x)")
        assert store.migrate() == [150]
        assert store.query("SELECT count(*) FROM late") == [(0,)]


def test_vec0_table_knn(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        with store.transaction() as conn:
            conn.execute(
                "CREATE VIRTUAL TABLE vecs USING vec0("
                "collection TEXT PARTITION KEY, embedding float[3])"
            )
            rows = [
                (1, "a", [1.0, 0.0, 0.0]),
                (2, "a", [0.0, 1.0, 0.0]),
                (3, "a", [0.9, 0.1, 0.0]),
                (4, "b", [1.0, 0.0, 0.0]),
            ]
            for rowid, collection, vec in rows:
                conn.execute(
                    "INSERT INTO vecs (rowid, collection, embedding) VALUES (?, ?, ?)",
                    (rowid, collection, _f32(vec)),
                )
        hits = store.query(
            "SELECT rowid, distance FROM vecs WHERE embedding MATCH ? AND k = ? "
            "AND collection = ? ORDER BY distance",
            (_f32([1.0, 0.0, 0.0]), 2, "a"),
        )
        assert [h[0] for h in hits] == [1, 3]
        assert hits[0][1] == pytest.approx(0.0)


def test_transaction_that_raises_writes_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        store.query("CREATE TABLE t (v INTEGER)")

        def insert_then_fail() -> None:
            with store.transaction() as conn:
                conn.execute("INSERT INTO t VALUES (1)")
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            insert_then_fail()
        assert store.query("SELECT count(*) FROM t") == [(0,)]
        assert not store.connection().in_transaction


def test_nested_transaction_failure_undoes_only_inner_block(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        store.query("CREATE TABLE t (v INTEGER)")

        def inner_insert_then_fail() -> None:
            with store.transaction() as inner:
                inner.execute("INSERT INTO t VALUES (2)")
                raise ValueError("inner")

        with store.transaction() as conn:
            conn.execute("INSERT INTO t VALUES (1)")
            with pytest.raises(ValueError, match="inner"):
                inner_insert_then_fail()
            conn.execute("INSERT INTO t VALUES (3)")
        assert store.query("SELECT v FROM t ORDER BY v") == [(1,), (3,)]


def test_two_threads_write_concurrently_each_with_own_connection(tmp_path: Path) -> None:
    per_thread = 50
    with Store(tmp_path / "db.sqlite3") as store:
        store.query("CREATE TABLE t (thread INTEGER, i INTEGER)")
        connections: dict[int, int] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(2)

        def work(n: int) -> None:
            try:
                connections[n] = id(store.connection())
                start.wait(timeout=10)
                for i in range(per_thread):
                    with store.transaction() as conn:
                        conn.execute("INSERT INTO t VALUES (?, ?)", (n, i))
                    store.query("SELECT count(*) FROM t")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        assert connections[0] != connections[1]
        assert store.query("SELECT thread, count(*) FROM t GROUP BY thread ORDER BY thread") == [
            (0, per_thread),
            (1, per_thread),
        ]


def test_connections_of_finished_threads_are_closed(tmp_path: Path) -> None:
    with Store(tmp_path / "db.sqlite3") as store:
        opened: list[apsw.Connection] = []
        t = threading.Thread(target=lambda: opened.append(store.connection()))
        t.start()
        t.join()
        store.connection()
        other = threading.Thread(target=store.connection)
        other.start()
        other.join()
        # Opening a connection prunes connections whose thread has ended.
        with pytest.raises(apsw.ConnectionClosedError):
            opened[0].execute("SELECT 1")


def test_closed_store_refuses_use(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    conn = store.connection()
    store.close()
    store.close()
    with pytest.raises(apsw.ConnectionClosedError):
        conn.execute("SELECT 1")
    with pytest.raises(StoreError, match="closed"):
        store.query("SELECT 1")


def test_unopenable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "dir.sqlite3").mkdir()
    with pytest.raises(StoreError, match="cannot open database"):
        Store(tmp_path / "dir.sqlite3")


def test_a_lock_held_past_the_busy_timeout_is_503_storage_busy(tmp_path: Path) -> None:
    path = tmp_path / "busy.sqlite3"
    with Store(path) as holder, Store(path, busy_timeout_ms=50) as waiter:
        with holder.transaction() as conn:
            conn.execute("CREATE TABLE t (x INTEGER)")

        def write_while_held() -> BaseException | None:
            try:
                with waiter.transaction() as conn:
                    conn.execute("INSERT INTO t VALUES (1)")
            except BaseException as exc:
                return exc
            return None

        with holder.transaction():
            failures: list[BaseException | None] = []
            thread = threading.Thread(target=lambda: failures.append(write_while_held()))
            thread.start()
            thread.join(30)
        (failure,) = failures
        assert isinstance(failure, StorageBusy)
        assert failure.code == ErrorCode.STORAGE_BUSY
        assert failure.status == 503
        assert failure.headers["Retry-After"] == "1"
        assert waiter.query("SELECT count(*) FROM t") == [(0,)]


def test_the_write_check_does_not_wait_for_nor_fail_on_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "busy.sqlite3"
    with Store(path) as holder, Store(path) as checker:
        with holder.transaction():
            outcome: list[object] = []
            thread = threading.Thread(target=lambda: outcome.append(checker.write_check()))
            thread.start()
            thread.join(30)
        (check,) = outcome
        assert getattr(check, "error", "missing") is None
