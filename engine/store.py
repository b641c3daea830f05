"""The one SQLite database, through apsw, with the sqlite-vec extension loaded.

Connections
    apsw connections must not be used by two threads at once, so `Store` hands each thread
    its own connection (`Store.connection()`), opened lazily with the same pragmas and the
    sqlite-vec extension. WAL lets those connections read while one of them writes.
    Async code must not hold a `transaction()` across an `await`: coroutines on the event
    loop thread share that thread's connection, so another coroutine would write into the
    open transaction. Do database work synchronously, or in a worker thread.

Storage errors
    A full file system, a read-only database and an unreachable file are not bugs of the
    caller: `query()`, `transaction()` and `storage_errors()` raise them as the domain
    errors of engine.errors (507 `insufficient_storage`, 503 `storage_read_only`, 503
    `storage_unavailable`), so every writer (runs, composed workflows, RAG, jobs) answers
    the same way, and the next write simply works again once space returns.
    `write_check()` is /health's probe.

Migrations
    Any module adds its tables by registering migrations at import time::

        from engine.store import register_migration

        register_migration(100, "rag_collections", "CREATE TABLE collections (...);")

    Rules:
    - `version` is a positive integer unique across the whole program. Each module owns a
      range, so nobody edits this file to add a table:
          1-99      core: engine/store.py (runs, /health's heartbeat), engine/fusion (runs
                    rebuilt, composed workflows)
          100-199   engine/rag
          200-299   engine/jobs (queue, webhooks, deliveries)
          300-399   engine/models
          1000+     third-party plugins
    - A migration is a SQL script or a callable taking the connection. Each runs in its own
      transaction, together with its ledger row, so it is applied entirely or not at all.
      A script must not contain BEGIN/COMMIT itself.
    - Applied migrations are never edited: change the schema with a new version. The name
      is recorded and checked on every open, so a renumbered migration is caught.
    - A migration may rely only on tables of lower versions in its own range or in the core
      range: pending migrations are applied in version order, but a database created before
      a module existed receives that module's migrations after later versions of others.
    - The module must be imported before the `Store` is opened (the lifespan does so for
      the server), or the service calls `store.migrate()` once it is imported.

    The ledger table `schema_migrations` is the source of truth; `PRAGMA user_version` is
    kept at the highest applied version so external tools see the schema level at a glance.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import sqlite_vec

from engine.clock import utc_iso
from engine.errors import (
    InsufficientStorage,
    StorageBusy,
    StorageError,
    StorageReadOnly,
    StorageUnavailable,
)

MigrationFn = Callable[[apsw.Connection], None]
Bindings = Sequence[Any] | Mapping[str, Any] | None

DEFAULT_BUSY_TIMEOUT_MS = 5000
MMAP_BYTES = 1 << 30


class StoreError(RuntimeError):
    """The database cannot be opened, migrated or used as configured."""


# What the operating system says when a write finds no room, or no permission to write.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def storage_error(
    exc: BaseException, path: Path | None = None, system_errno: int | None = None
) -> StorageError | None:
    """The domain error for an apsw error caused by the storage under the database (full,
    read-only, gone, or locked past the busy timeout), found in `exc` or the exceptions it
    was raised from; None for any other error (a constraint, a bug), which keeps its own
    meaning.

    `system_errno` is the connection's last OS error, when known: SQLite reports some
    failed writes (extending a file) as a generic I/O error that only errno explains."""
    where = f"the database {path}" if path is not None else "the database"
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, apsw.Error):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    if isinstance(cause, apsw.FullError) or (
        isinstance(cause, apsw.IOError) and system_errno in _NO_SPACE
    ):
        return _no_room(where)
    if isinstance(cause, apsw.ReadOnlyError) or (
        isinstance(cause, apsw.IOError) and system_errno in _NOT_WRITABLE
    ):
        return StorageReadOnly(
            f"{where} is read-only (its file, directory or file system cannot be written), "
            "so nothing can be stored"
        )
    if isinstance(cause, apsw.CantOpenError | apsw.IOError):
        return StorageUnavailable(f"{where} cannot be read or written: {cause}")
    if isinstance(cause, apsw.BusyError | apsw.LockedError):
        # Another writer held the lock past the busy timeout: a moment's congestion, not a
        # failure of the request or of the server.
        return StorageBusy(
            f"{where} stayed locked by another writer past the busy timeout; retry shortly",
            headers={"Retry-After": "1"},
        )
    return None


def _no_room(where: str) -> InsufficientStorage:
    return InsufficientStorage(
        f"{where} cannot grow: its file system is full (or the database reached its size "
        "limit). Nothing was written; free some space and retry, no restart is needed"
    )


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    apply: str | MigrationFn


_registry: dict[int, Migration] = {}
_registry_lock = threading.Lock()


def register_migration(version: int, name: str, apply: str | MigrationFn) -> Migration:
    """Register a schema migration for every `Store` opened afterwards (see module doc).

    Registering the same version again with the same name is a no-op, so re-importing a
    module is harmless; a different name for a taken version is an error.
    """
    migration = _validated(Migration(version, name, apply))
    with _registry_lock:
        existing = _registry.get(version)
        if existing is not None:
            if existing.name != name:
                raise StoreError(
                    f"migration version {version} is already registered as {existing.name!r}, "
                    f"cannot register {name!r}"
                )
            return existing
        _registry[version] = migration
    return migration


def registered_migrations() -> list[Migration]:
    """All registered migrations in the order they apply."""
    with _registry_lock:
        return sorted(_registry.values(), key=lambda m: m.version)


def _validated(migration: Migration) -> Migration:
    if isinstance(migration.version, bool) or not isinstance(migration.version, int):
        raise StoreError(f"migration version must be an int, not {migration.version!r}")
    if migration.version < 1:
        raise StoreError(f"migration version must be >= 1, not {migration.version}")
    if not migration.name:
        raise StoreError(f"migration {migration.version} needs a name")
    if not isinstance(migration.apply, str) and not callable(migration.apply):
        raise StoreError(f"migration {migration.version} must be SQL text or a callable")
    return migration


@dataclass(frozen=True)
class WriteCheck:
    """`Store.write_check()`'s answer. `error` says why the store cannot be written (the
    same error a write would raise); None means the probe write went through."""

    free_bytes: int
    error: StorageError | None = None

    @property
    def writable(self) -> bool:
        return self.error is None


_HEARTBEAT_SQL = (
    "INSERT INTO store_heartbeat (id, written_at) VALUES (1, ?) "
    "ON CONFLICT (id) DO UPDATE SET written_at = excluded.written_at"
)

_ROOM_SQL = "SELECT * FROM pragma_page_size(), pragma_page_count(), pragma_max_page_count()"

_LEDGER_SQL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at TEXT NOT NULL
) STRICT;
"""


class Store:
    """The SQLite database file at `path` (created with its parent directories).

    `migrations` defaults to the registry (`register_migration`), read each time
    `migrate()` runs; pass a list to use exactly those (tests, tools).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        migrations: Iterable[Migration] | None = None,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
    ) -> None:
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._migrations = None if migrations is None else [_validated(m) for m in migrations]
        self._local = threading.local()
        self._lock = threading.Lock()
        # Every connection opened, with its owner thread, so close() reaches all of them and
        # connections of threads that have ended can be closed instead of leaking.
        self._connections: list[tuple[weakref.ref[threading.Thread], apsw.Connection]] = []
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the data directory {self.path.parent} for the database: "
                f"{exc.strerror}. Make it writable or set data_dir to a writable directory"
            ) from exc
        try:
            self.migrate()
        except BaseException:
            self.close()
            raise

    @property
    def busy_timeout_ms(self) -> int:
        """How long a connection waits for another's lock before SQLITE_BUSY."""
        return self._busy_timeout_ms

    # -- connections ---------------------------------------------------------------------

    def connection(self) -> apsw.Connection:
        """This thread's connection, opened on first use."""
        conn: apsw.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._lock:
            if self._closed:
                raise StoreError(f"store {self.path} is closed")
            self._prune_dead_threads()
            conn = self._open_connection()
            self._connections.append((weakref.ref(threading.current_thread()), conn))
        self._local.conn = conn
        return conn

    def _open_connection(self) -> apsw.Connection:
        try:
            conn = apsw.Connection(str(self.path))
        except apsw.Error as exc:
            raise self._unwritable(f"cannot open database {self.path}: {exc}") from exc
        try:
            # Set first so that the pragmas below wait for another process's lock too.
            conn.set_busy_timeout(self._busy_timeout_ms)
            # SQLite opens the file (and WAL's -shm) only on first use: use it now, so an
            # unwritable path is reported as such, not as whatever statement came first.
            self._check_writable_file(conn)
            _load_sqlite_vec(conn)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchall()
            if not mode or str(mode[0][0]).lower() != "wal":
                raise StoreError(f"cannot enable WAL on {self.path} (journal_mode={mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            # sqlite-vec scans a partition's vector blobs on every KNN query: reading them
            # through a memory map instead of read() calls cut 100k-vector queries from
            # ~82 to ~52 ms here. The value only caps the mapping; it reserves nothing.
            conn.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_writable_file(self, conn: apsw.Connection) -> None:
        try:
            conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
            read_only = conn.readonly("main")
        except apsw.Error as exc:
            raise self._unwritable(f"cannot open database {self.path}: {exc}") from exc
        if read_only:
            raise self._unwritable(f"the database {self.path} opened read-only")

    def _unwritable(self, what: str) -> StoreError:
        return StoreError(
            f"{what} ({self._why_unwritable()}). Fusion writes runs, workflows and "
            "collections there: make it writable or set data_dir to a writable directory"
        )

    def _why_unwritable(self) -> str:
        """The likeliest reason the database file cannot be written, in words."""
        directory = self.path.parent
        try:
            if os.statvfs(directory).f_flag & os.ST_RDONLY:
                return f"the file system holding {directory} is mounted read-only"
        except OSError as exc:
            return f"{directory}: {exc.strerror}"
        if self.path.is_dir():
            return f"{self.path} is a directory"
        if not os.access(directory, os.W_OK | os.X_OK):
            return f"the directory {directory} is not writable by this user"
        if self.path.exists() and not os.access(self.path, os.W_OK):
            return f"the file {self.path} is not writable by this user"
        return "no permission problem is visible; check the file's owner and locks"

    def _prune_dead_threads(self) -> None:
        alive: list[tuple[weakref.ref[threading.Thread], apsw.Connection]] = []
        for owner, conn in self._connections:
            thread = owner()
            if thread is not None and thread.is_alive():
                alive.append((owner, conn))
            else:
                conn.close()
        self._connections = alive

    def close(self) -> None:
        """Close every connection. Further use raises StoreError. Idempotent."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for _, conn in connections:
            conn.close()
        self._local = threading.local()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries and transactions --------------------------------------------------------

    def query(self, sql: str, bindings: Bindings = None) -> list[tuple[Any, ...]]:
        """Run one statement on this thread's connection and return all rows."""
        with self.storage_errors():
            return self.connection().execute(sql, bindings).fetchall()

    @contextmanager
    def storage_errors(self) -> Iterator[None]:
        """Raise a full, read-only or unreachable database as the domain error that says
        so (507 `insufficient_storage`, 503 `storage_read_only`, 503
        `storage_unavailable`) instead of apsw's. `query()` and `transaction()` do this
        already; wrap direct use of `connection()` that writes."""
        try:
            yield
        except apsw.Error as exc:
            conn = getattr(self._local, "conn", None)
            error = storage_error(exc, self.path, conn.system_errno if conn else None)
            if error is None:
                raise
            raise error from exc

    @contextmanager
    def transaction(self) -> Iterator[apsw.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the block raises.

        IMMEDIATE takes the write lock up front, so a transaction that reads then writes
        cannot fail half-way on a lock upgrade. Nested use becomes a savepoint, so an inner
        failure undoes only the inner block.
        """
        conn = self.connection()
        with self.storage_errors():
            if conn.in_transaction:
                with _savepoint(conn):
                    yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                # SQLite may already have rolled back (a full disk can do that).
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # -- health --------------------------------------------------------------------------

    def ping(self) -> str:
        """A trivial round trip through SQLite and sqlite-vec; returns the vec version."""
        rows = self.query("SELECT 1, vec_version()")
        if not rows or rows[0][0] != 1:
            raise StoreError(f"unexpected ping result from {self.path}: {rows!r}")
        return str(rows[0][1])

    def write_check(self) -> WriteCheck:
        """Whether the database can be written now: a real write (the heartbeat row,
        committed, so the file system is really asked) and the room left to grow into (the
        file system's free space, capped by SQLite's max_page_count). Never waits for a
        lock: while another connection writes, the store is evidently writable."""
        conn = self.connection()
        page_size, room = self._room_to_grow()
        if conn.in_transaction:
            return WriteCheck(room)  # a caller's open transaction: not ours to commit
        conn.set_busy_timeout(0)
        try:
            with self.storage_errors():
                conn.execute(_HEARTBEAT_SQL, (utc_iso(),))
        except StorageBusy:
            pass
        except StorageError as exc:
            return WriteCheck(room, exc)
        finally:
            conn.set_busy_timeout(self._busy_timeout_ms)
        if room < page_size:
            # The heartbeat can succeed on a full file system (WAL rewrites its own file
            # after a checkpoint), but no table can take one more page.
            return WriteCheck(room, _no_room(f"the database {self.path}"))
        return WriteCheck(room)

    def _room_to_grow(self) -> tuple[int, int]:
        """(page size, bytes the database can still grow by): the smaller of the file
        system's free space for an unprivileged writer and the room under max_page_count."""
        with self.storage_errors():
            try:
                stats = os.statvfs(self.path.parent)
            except OSError as exc:
                raise StorageUnavailable(f"{self.path.parent}: {exc.strerror}") from exc
            # One statement for the three readings (/health asks on every call).
            # apsw types rows as any SQLite value; these are ints.
            rows: list[tuple[Any, ...]] = self.connection().execute(_ROOM_SQL).fetchall()
        page_size, pages, max_pages = (int(value) for value in rows[0])
        room = (max_pages - pages) * page_size
        return page_size, min(stats.f_bavail * stats.f_frsize, room)

    # -- migrations ----------------------------------------------------------------------

    def user_version(self) -> int:
        return int(self.query("PRAGMA user_version")[0][0])

    def applied_migrations(self) -> dict[int, str]:
        """version -> name of every migration recorded in this database."""
        return dict(self.query("SELECT version, name FROM schema_migrations ORDER BY version"))

    def migrate(self) -> list[int]:
        """Apply pending migrations in version order; returns the versions applied now."""
        migrations = registered_migrations() if self._migrations is None else self._migrations
        conn = self.connection()
        conn.execute(_LEDGER_SQL)
        done = self.applied_migrations()
        applied: list[int] = []
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version in done:
                _check_same(migration, done[migration.version])
                continue
            if self._apply(conn, migration):
                applied.append(migration.version)
        return applied

    def _apply(self, conn: apsw.Connection, migration: Migration) -> bool:
        with self.transaction():
            # Re-read under the write lock: another process may have applied it meanwhile.
            row = conn.execute(
                "SELECT name FROM schema_migrations WHERE version = ?", (migration.version,)
            ).fetchone()
            if row is not None:
                _check_same(migration, row[0])
                return False
            try:
                if isinstance(migration.apply, str):
                    for _ in conn.execute(migration.apply):
                        pass
                else:
                    migration.apply(conn)
            except Exception as exc:
                raise StoreError(
                    f"migration {migration.version} ({migration.name}) failed: {exc}"
                ) from exc
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, utc_iso()),
            )
            current = _pragma(conn, "user_version")
            # PRAGMA takes no bound parameters; the version is a validated int.
            conn.execute(f"PRAGMA user_version = {max(current, migration.version)}")
        return True


def _check_same(migration: Migration, recorded_name: str) -> None:
    if recorded_name != migration.name:
        raise StoreError(
            f"database has migration {migration.version} recorded as {recorded_name!r}, "
            f"but the code defines it as {migration.name!r}"
        )


@contextmanager
def _savepoint(conn: apsw.Connection) -> Iterator[None]:
    name = f"sp_{uuid.uuid4().hex}"
    conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        conn.execute(f"ROLLBACK TO {name}")
        conn.execute(f"RELEASE {name}")
        raise
    conn.execute(f"RELEASE {name}")


def _load_sqlite_vec(conn: apsw.Connection) -> None:
    path = sqlite_vec.loadable_path()
    try:
        conn.enable_load_extension(True)
        conn.load_extension(path)
        version = conn.execute("SELECT vec_version()").fetchall()[0][0]
    except apsw.Error as exc:
        raise StoreError(
            f"the sqlite-vec extension did not load from {path}: {exc}. "
            "Is the sqlite-vec package installed for this platform?"
        ) from exc
    finally:
        # Loading stays possible only for the moment we need it, so SQL cannot load
        # arbitrary libraries through load_extension().
        conn.enable_load_extension(False)
    if not version:
        raise StoreError(f"sqlite-vec loaded from {path} but vec_version() returned nothing")


register_migration(
    1,
    "runs",
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        workflow_id TEXT NOT NULL,
        workflow_version INTEGER,
        status TEXT NOT NULL,
        input TEXT CHECK (input IS NULL OR json_valid(input)),
        result TEXT CHECK (result IS NULL OR json_valid(result)),
        trace TEXT CHECK (trace IS NULL OR json_valid(trace)),
        error TEXT,
        created_at TEXT NOT NULL,
        completed_at TEXT,
        total_latency_ms REAL
    ) STRICT;
    CREATE INDEX runs_by_workflow ON runs (workflow_id, created_at);
    CREATE INDEX runs_by_status ON runs (status, created_at);
    """,
)

# One row, rewritten by each write_check(): /health's proof that the file can be written.
register_migration(
    4,
    "store_heartbeat",
    """
    CREATE TABLE store_heartbeat (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        written_at TEXT NOT NULL
    ) STRICT;
    """,
)


def _pragma(conn: apsw.Connection, name: str) -> int:
    """An integer PRAGMA's value (apsw types rows as any SQLite value)."""
    rows: list[tuple[Any, ...]] = conn.execute(f"PRAGMA {name}").fetchall()
    return int(rows[0][0])
