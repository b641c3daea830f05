"""The RAG provider's storage: collections, documents, chunks, an FTS5 index and vec0 vectors
in the engine's one SQLite database (`engine.store.Store`).

Schema (migrations 100-199)
    collections -> documents -> chunks, with ON DELETE CASCADE down the chain.
    `chunks.id` is the rowid shared by the FTS index and the vector tables.

    chunks_fts is an FTS5 *external content* table over `chunks.text` (porter + unicode61,
    good for English). Triggers on `chunks` write and delete its rows, so the index follows
    every way a chunk can disappear (document delete, collection delete, cascades) without
    each code path remembering to do it. The index's own row count is `chunks_fts_docsize`;
    `INSERT INTO chunks_fts(chunks_fts) VALUES('integrity-check')` proves it matches `chunks`.

    vec0 tables have a fixed dimension, so there is one per dimension (`vec_384`, ...),
    created on demand inside the transaction of the first ingest that needs it, with the
    collection as partition key so a query scans only its own collection. Each comes with
    an AFTER DELETE trigger on `chunks`, for the same reason as the FTS triggers.

Vectors
    Stored normalised to unit length (this module normalises; it does not trust callers),
    as float32 little-endian blobs, and searched by L2 distance: for unit vectors
    L2² = 2 - 2·cos, so the ranking equals cosine's and `cos = 1 - L2²/2`; sqlite-vec's
    L2 is faster than its cosine.

Exact search from memory (engine/rag/exact_index.py)
    `knn` and `similarities` use a resident float32 matrix of the collection when one is
    current, else build it (lazily, on the searching worker thread), else fall back to
    sqlite-vec (over `rag_index_max_mb`). `rag_generations` holds one counter per collection
    rowid, bumped by triggers in the transaction of every document insert or delete and
    every collection delete, so no writer (this process, another one, a cascade) can change
    a collection's vectors without the next search seeing it. Its rows are never deleted: a
    collection rowid reused after a delete keeps counting up, so an old matrix never matches.

Approximate search (engine/rag/hnsw_index.py)
    A collection's `index_kind` (migration 103) picks what `knn` builds: `exact` (the
    matrix), `hnsw` (a usearch graph, saved under `<db dir>/rag-index/`) or `auto` (the
    default: the graph from `rag_hnsw_min_vectors` vectors up, the matrix below). Both are
    cached, bounded and patched by the same `ExactIndex`, under the same generation rule.

Transactions
    Every mutating method is one `BEGIN IMMEDIATE ... COMMIT`: an exception or a SIGKILL in
    the middle leaves the database as it was before the call. Methods are synchronous; the
    service runs them in a worker thread (`Store` gives each thread its own connection).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, cast

import apsw
import numpy as np
import structlog

from engine.clock import utc_iso
from engine.config import Settings
from engine.errors import ErrorCode, InvalidRequest, NotFound
from engine.rag import hnsw_index
from engine.rag.exact_index import (
    EXACT,
    HNSW,
    ExactIndex,
    IndexInfo,
    Resident,
    Snapshot,
    aligned_matrix,
    exact_bytes,
)
from engine.rag.filters import SqlFilter
from engine.rag.types import CollectionInfo, DocumentInfo, Hit, NewDocument
from engine.store import Store, register_migration

# sqlite-vec refuses k above this in a KNN query.
MAX_K = 4096
# sqlite-vec's limit on a vector column's dimension.
MAX_DIMENSION = 8192
# A unit vector must be recognisably non-zero to be normalised meaningfully.
_MIN_NORM = 1e-12
# Bound the FTS5 expression: a pasted essay as a query must not become a 10k-term OR.
MAX_QUERY_TERMS = 64
MIB = 1024 * 1024
# A filtered search (docs/rag.md "Filters") scores a matching set of up to this many chunks
# directly from a graph's stored vectors; larger sets go through the graph first (reading
# a stored vector back costs ~3 us: 4,000 took 10 ms, a widened graph search ~1 ms).
FILTER_EXACT_ROWS = 1024
# A graph's filtered search asks for this many times the nearest neighbours that the
# filter's selectivity predicts it needs, and 4x more each time it finds fewer than k...
FILTER_OVERSAMPLE = 2
# ... until it would ask for more than a quarter of the matching set, or this many: then the
# set is scored exactly instead.
FILTER_WIDEST = 32_768
# Rowids scored per call when a set is scored exactly: bounds the vectors copied at once.
SCORE_BLOCK = 16_384

ProgressFn = Callable[[int, int], None]
log = structlog.get_logger(__name__)

_SCHEMA_SQL = """
CREATE TABLE collections (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    embedding_model TEXT NOT NULL,
    dimension INTEGER NOT NULL CHECK (dimension > 0),
    chunk_size INTEGER NOT NULL,
    overlap INTEGER NOT NULL,
    metadata TEXT NOT NULL CHECK (json_valid(metadata)),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
) STRICT;

CREATE TABLE documents (
    id INTEGER PRIMARY KEY,
    document_id TEXT NOT NULL UNIQUE,
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    filename TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    format TEXT NOT NULL,
    title TEXT,
    metadata TEXT NOT NULL CHECK (json_valid(metadata)),
    chunk_count INTEGER NOT NULL,
    ingested_at TEXT NOT NULL,
    UNIQUE (collection_id, content_hash)
) STRICT;

-- AUTOINCREMENT: a rowid is never reused, so a rowid a reader got from a search cannot
-- silently name a different chunk after a delete and a new ingest.
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chunk_id TEXT NOT NULL UNIQUE,
    document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    text TEXT NOT NULL,
    token_count INTEGER NOT NULL,
    page INTEGER,
    heading TEXT,
    UNIQUE (document_id, idx)
) STRICT;
CREATE INDEX chunks_by_collection ON chunks (collection_id);
"""

_FTS_SQL = """
CREATE VIRTUAL TABLE chunks_fts USING fts5(
    text,
    content = 'chunks',
    content_rowid = 'id',
    tokenize = 'porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER chunks_fts_insert AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts (rowid, text) VALUES (new.id, new.text);
END;
-- External content: a delete must hand FTS5 the old text to remove its terms.
CREATE TRIGGER chunks_fts_delete AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER chunks_fts_update AFTER UPDATE OF text ON chunks BEGIN
    INSERT INTO chunks_fts (chunks_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO chunks_fts (rowid, text) VALUES (new.id, new.text);
END;
"""

register_migration(100, "rag_tables", _SCHEMA_SQL)
register_migration(101, "rag_chunks_fts", _FTS_SQL)

# No foreign key on purpose: the row outlives its collection (see the module doc).
_GENERATIONS_SQL = """
CREATE TABLE rag_generations (
    collection_id INTEGER PRIMARY KEY,
    generation INTEGER NOT NULL
) STRICT;
CREATE TRIGGER rag_generation_document_insert AFTER INSERT ON documents BEGIN
    INSERT INTO rag_generations (collection_id, generation) VALUES (new.collection_id, 1)
    ON CONFLICT (collection_id) DO UPDATE SET generation = generation + 1;
END;
CREATE TRIGGER rag_generation_document_delete AFTER DELETE ON documents BEGIN
    INSERT INTO rag_generations (collection_id, generation) VALUES (old.collection_id, 1)
    ON CONFLICT (collection_id) DO UPDATE SET generation = generation + 1;
END;
CREATE TRIGGER rag_generation_collection_delete AFTER DELETE ON collections BEGIN
    INSERT INTO rag_generations (collection_id, generation) VALUES (old.id, 1)
    ON CONFLICT (collection_id) DO UPDATE SET generation = generation + 1;
END;
"""

register_migration(102, "rag_generations", _GENERATIONS_SQL)

INDEX_KINDS = (EXACT, HNSW, "auto")
# Existing collections get `auto`, which keeps them exact below the size the graph pays at.
_INDEX_KIND_SQL = """
ALTER TABLE collections ADD COLUMN index_kind TEXT NOT NULL DEFAULT 'auto'
    CHECK (index_kind IN ('exact', 'hnsw', 'auto'));
"""

register_migration(103, "rag_collection_index_kind", _INDEX_KIND_SQL)


@dataclass(frozen=True)
class _Collection:
    id: int
    name: str
    embedding_model: str
    dimension: int
    generation: int = 0  # rag_generations' value when read
    index_kind: str = "auto"  # one of INDEX_KINDS


class RagStore:
    """Synchronous access to the RAG tables of `store` (see the module doc)."""

    def __init__(
        self,
        store: Store,
        *,
        index_max_bytes: int = Settings.rag_index_max_mb * MIB,
        hnsw_min_vectors: int = Settings.rag_hnsw_min_vectors,
        hnsw_save_delay_s: float = Settings.rag_hnsw_save_delay_s,
    ) -> None:
        self._store = store
        self.index = ExactIndex(index_max_bytes)
        self.hnsw_min_vectors = hnsw_min_vectors
        # Beside the database, so a copy or backup of the data directory carries it along.
        self.hnsw_directory = store.path.parent / "rag-index"
        self.hnsw_saver = hnsw_index.Saver(hnsw_save_delay_s, self.index.build_lock)

    def flush_index(self) -> None:
        """Save the HNSW graphs patched since their last save (at shutdown)."""
        self.hnsw_saver.flush()

    # -- ingest --------------------------------------------------------------------------

    def ingest(
        self,
        collection: str,
        *,
        embedding_model: str,
        dimension: int,
        chunk_size: int,
        overlap: int,
        collection_metadata: dict[str, Any],
        documents: list[NewDocument],
        on_progress: ProgressFn | None = None,
        index_kind: str = "auto",
    ) -> list[str]:
        """Store `documents` in `collection` (created if absent) in one transaction.

        Returns the document ids in input order; a document whose content hash is already
        in the collection is not stored again and its existing id is returned.
        A new collection records `embedding_model`, `dimension`, `chunk_size`, `overlap` and
        `collection_metadata` and `index_kind` (exact, hnsw or auto: see the module doc); an
        existing one keeps what it was created with, and a different model or dimension is
        refused (nothing written).
        `on_progress(done, total)` is called inside the transaction after each document.
        """
        _check_dimension(dimension)
        check_index_kind(index_kind)
        # Validated and converted before taking the write lock: a bad vector fails fast and
        # the lock is held only for writing.
        matrices = [_document_matrix(doc, dimension) for doc in documents]
        outermost = not self._store.connection().in_transaction
        added: list[tuple[list[int], np.ndarray]] = []
        with self._store.transaction() as conn:
            coll = self._ensure_collection(
                conn,
                collection,
                embedding_model,
                dimension,
                chunk_size,
                overlap,
                collection_metadata,
                index_kind,
            )
            vec_table = _ensure_vec_table(conn, dimension)
            ids: list[str] = []
            wrote = False
            for done, (doc, matrix) in enumerate(zip(documents, matrices, strict=True), 1):
                existing = _existing_document(conn, coll.id, doc.content_hash)
                if existing is None:
                    added.append((_insert_document(conn, coll.id, vec_table, doc, matrix), matrix))
                    wrote = True
                ids.append(existing or doc.document_id)
                if on_progress is not None:
                    on_progress(done, len(documents))
            if wrote:
                _touch(conn, coll.id)
                after = _generation(conn, coll.id)
        # Committed: patch this process's matrix (a savepoint inside a caller's transaction
        # may still roll back, so then the generation check rebuilds instead).
        if wrote and outermost:
            self.index.append(
                coll.id,
                coll.generation,
                after,
                np.fromiter((r for rowids, _ in added for r in rowids), dtype=np.int64),
                np.concatenate([rows for _, rows in added]),
            )
        return ids

    def _ensure_collection(
        self,
        conn: apsw.Connection,
        name: str,
        embedding_model: str,
        dimension: int,
        chunk_size: int,
        overlap: int,
        metadata: dict[str, Any],
        index_kind: str,
    ) -> _Collection:
        coll = _find_collection(conn, name)
        if coll is None:
            now = utc_iso()
            conn.execute(
                "INSERT INTO collections (name, embedding_model, dimension, chunk_size, overlap,"
                " metadata, index_kind, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    embedding_model,
                    dimension,
                    chunk_size,
                    overlap,
                    _json(metadata),
                    index_kind,
                    now,
                    now,
                ),
            )
            rowid = conn.last_insert_rowid()
            return _Collection(
                rowid, name, embedding_model, dimension, _generation(conn, rowid), index_kind
            )
        _check_same_model(coll, embedding_model, dimension)
        return coll

    # -- search --------------------------------------------------------------------------

    def knn(
        self,
        collection: str,
        vector: Sequence[float],
        k: int,
        where: SqlFilter | None = None,
    ) -> list[tuple[int, float]]:
        """The `k` chunks of `collection` nearest to `vector`: (rowid, cosine), best first;
        with `where`, the `k` nearest of the chunks it matches (docs/rag.md "Filters")."""
        conn = self._store.connection()
        coll = _require_collection(conn, collection)
        query = _unit_vector(vector, coll.dimension, "vector")
        k = min(k, MAX_K)
        if k <= 0:
            return []
        allowed = None if where is None else _matching_rowids(conn, coll, where)
        if allowed is not None and not len(allowed):
            return []
        snapshot = self._resident(conn, coll)
        if allowed is not None:
            return _filtered_top(conn, coll, snapshot, query, k, allowed)
        if snapshot is not None:
            return snapshot.top(query, k)
        if not _vec_table_exists(conn, coll.dimension):
            return []
        rows: list[tuple[Any, ...]] = conn.execute(
            f"SELECT chunk_rowid, distance FROM {_vec_table(coll.dimension)}"
            " WHERE embedding MATCH ? AND k = ? AND collection_id = ? ORDER BY distance",
            (query.tobytes(), k, coll.id),
        ).fetchall()
        return [(int(rowid), 1.0 - float(distance) ** 2 / 2.0) for rowid, distance in rows]

    def matching_rowids(self, collection: str, where: SqlFilter) -> np.ndarray:
        """The rowids of `collection`'s chunks that `where` matches, ascending."""
        conn = self._store.connection()
        return _matching_rowids(conn, _require_collection(conn, collection), where)

    def similarities(
        self, collection: str, rowids: Sequence[int], vector: Sequence[float]
    ) -> dict[int, float]:
        """Cosine similarity of given chunks to `vector` (for matches found lexically)."""
        conn = self._store.connection()
        coll = _require_collection(conn, collection)
        if not len(rowids):
            return {}
        query = _unit_vector(vector, coll.dimension, "vector")
        snapshot = self._resident(conn, coll)
        if snapshot is not None:
            return snapshot.similarities(rowids, query)
        return _vec_similarities(conn, coll, rowids, query)

    def _resident(self, conn: apsw.Connection, coll: _Collection) -> Resident | None:
        """The collection's current index (matrix or graph), built now (or loaded from its
        file) if missing or stale; None when it cannot fit the bound (search through
        sqlite-vec)."""
        snapshot = self.index.current(coll.id, coll.generation)
        if snapshot is not None or self.index.refused(coll.id, coll.generation):
            return snapshot
        with self.index.build_lock(coll.id):
            # Before the read transaction: a million-vector file takes seconds to read, and
            # an open read transaction holds back WAL checkpoints.
            base = self._graph_base(coll)
            # Another thread may have built it while this one waited for the lock.
            with _snapshot(conn):
                generation = _generation(conn, coll.id)
                snapshot = self.index.current(coll.id, generation)
                if snapshot is not None or self.index.refused(coll.id, generation):
                    return snapshot
                count = _scalar(
                    conn, "SELECT count(*) FROM chunks WHERE collection_id = ?", coll.id
                )
                kind = self.index_kind(coll.index_kind, count)
                needed = (
                    hnsw_index.estimated_bytes(count, coll.dimension)
                    if kind == HNSW
                    else exact_bytes(count, coll.dimension)
                )
                if not self.index.admit(coll.id, generation, needed):
                    return None
                started = time.perf_counter()
                source, update = "sqlite", None
                if kind == HNSW and base is not None:
                    source, update = self._graph_update(conn, coll, *base)
                read = None if update else _read_snapshot(conn, coll, generation, count)
            # Outside the read transaction: adding to a graph is the long part and must not
            # hold back WAL checkpoints.
            resident: Resident | None
            if update is not None:
                resident = update.base.reconciled(generation, *update.changes)
            elif kind == HNSW:
                assert read is not None
                resident = hnsw_index.build(
                    self.hnsw_directory,
                    coll.id,
                    generation,
                    read.ids,
                    read.matrix,
                    self.hnsw_saver,
                )
            else:
                resident = read
            assert resident is not None  # updated, built, or read from SQLite
            log.info(
                "rag vector index built",
                collection=coll.name,
                kind=kind,
                source=source,
                vectors=resident.vectors,
                bytes=resident.nbytes,
                generation=generation,
                seconds=round(time.perf_counter() - started, 3),
            )
            return self.index.put(coll.id, resident)

    def _graph_base(self, coll: _Collection) -> tuple[str, hnsw_index.HnswSnapshot] | None:
        """A graph to bring up to SQLite instead of building one: the stale one in memory
        (another process changed the collection), else the newest saved file."""
        if coll.index_kind == EXACT:
            return None
        held = self.index.held(coll.id)
        if isinstance(held, hnsw_index.HnswSnapshot) and held.dimension == coll.dimension:
            return "memory", held
        loaded = hnsw_index.load(self.hnsw_directory, coll.id, coll.dimension, self.hnsw_saver)
        return None if loaded is None else ("file", loaded)

    def _graph_update(
        self, conn: apsw.Connection, coll: _Collection, source: str, base: hnsw_index.HnswSnapshot
    ) -> tuple[str, _GraphUpdate | None]:
        """What brings `base` to SQLite's rows, read in the caller's read transaction; None
        when it is too far behind (rebuild)."""
        ids = np.fromiter(
            (r for (r,) in conn.execute(_CHUNK_ROWIDS_SQL, (coll.id,))), dtype=np.int64
        )
        changes = base.changes(ids)
        if changes is None:
            return "sqlite", None
        gone, new = changes
        return source, _GraphUpdate(base, (gone, new, _read_vectors(conn, coll.dimension, new)))

    def index_kind(self, setting: str, vectors: int) -> str:
        """The index a collection with this `index_kind` setting and size gets."""
        if setting == "auto":
            return HNSW if vectors >= self.hnsw_min_vectors else EXACT
        return setting

    def index_info(self, name: str) -> IndexInfo:
        """How `name` is searched now (collection info's `index`)."""
        coll = _require_collection(self._store.connection(), name)
        return replace(self.index.info(coll.id, coll.generation), setting=coll.index_kind)

    def index_usage(self) -> dict[str, IndexInfo]:
        """Every collection with a resident matrix, by name (diagnostics)."""
        held = self.index.usage()
        if not held:
            return {}
        rows = self._store.query(
            f"{_FIND_COLLECTION_SQL} WHERE c.id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(held)),),
        )
        return {
            coll.name: replace(self.index.info(coll.id, coll.generation), setting=coll.index_kind)
            for coll in (_Collection(*row) for row in rows)
        }

    def lexical(
        self, collection: str, query: str, k: int, where: SqlFilter | None = None
    ) -> list[tuple[int, float]]:
        """The `k` chunks of `collection` best matching `query`'s words by BM25 (of those
        `where` matches, when given).

        Returns (rowid, score) best first, where score is -bm25() so that higher is better.
        Any word matches (OR); BM25 ranks chunks with more and rarer words first.
        """
        conn = self._store.connection()
        coll = _require_collection(conn, collection)
        expression = fts_expression(query)
        if expression is None or k <= 0:
            return []
        join, condition, params = "", "", ()
        if where is not None:
            join = " JOIN documents d ON d.id = c.document_id"
            condition, params = f" AND ({where.sql})", where.params
        rows: list[tuple[Any, ...]] = conn.execute(
            "SELECT chunks_fts.rowid, bm25(chunks_fts) AS rank FROM chunks_fts"
            f" JOIN chunks c ON c.id = chunks_fts.rowid{join}"
            f" WHERE chunks_fts MATCH ? AND c.collection_id = ?{condition}"
            " ORDER BY rank LIMIT ?",
            (expression, coll.id, *params, k),
        ).fetchall()
        return [(int(rowid), -float(rank)) for rowid, rank in rows]

    def hits(
        self,
        rowids: Sequence[int],
        scores: dict[int, float],
        rerank_scores: dict[int, float] | None = None,
    ) -> list[Hit]:
        """The chunks `rowids` as hits, in that order, scored from `scores` (and
        `rerank_scores`, when a reranker ordered them).

        Rowids no longer present (deleted since the search) are left out.
        """
        if not rowids:
            return []
        rows = self._store.query(
            "SELECT c.id, c.chunk_id, c.text, c.page, c.heading, d.document_id, d.filename,"
            " d.metadata FROM chunks c JOIN documents d ON d.id = c.document_id"
            " WHERE c.id IN (SELECT value FROM json_each(?))",
            (json.dumps([int(r) for r in rowids]),),
        )
        by_rowid = {row[0]: row for row in rows}
        reranked = rerank_scores or {}
        return [
            _hit(by_rowid[rowid], scores.get(rowid, 0.0), reranked.get(rowid))
            for rowid in rowids
            if rowid in by_rowid
        ]

    # -- collections and documents -------------------------------------------------------

    def list_collections(self) -> list[CollectionInfo]:
        rows = self._store.query(f"{_COLLECTION_INFO_SQL} ORDER BY c.name")
        return [_collection_info(row) for row in rows]

    def collection(self, name: str) -> CollectionInfo:
        found = self.find_collection(name)
        if found is None:
            raise _collection_not_found(name)
        return found

    def find_collection(self, name: str) -> CollectionInfo | None:
        rows = self._store.query(f"{_COLLECTION_INFO_SQL} WHERE c.name = ?", (name,))
        return _collection_info(rows[0]) if rows else None

    def document_by_hash(self, collection: str, content_hash: str) -> str | None:
        """The id of the collection's document with this content, if it has one."""
        conn = self._store.connection()
        coll = _find_collection(conn, collection)
        return None if coll is None else _existing_document(conn, coll.id, content_hash)

    def documents(self, name: str) -> list[DocumentInfo]:
        conn = self._store.connection()
        coll = _require_collection(conn, name)
        rows: list[tuple[Any, ...]] = conn.execute(
            "SELECT document_id, filename, content_hash, chunk_count, ingested_at, metadata"
            " FROM documents WHERE collection_id = ? ORDER BY id",
            (coll.id,),
        ).fetchall()
        return [
            DocumentInfo(
                document_id=row[0],
                filename=row[1],
                content_hash=row[2],
                chunk_count=row[3],
                ingested_at=row[4],
                metadata=json.loads(row[5]),
            )
            for row in rows
        ]

    def delete_document(self, collection: str, document_id: str) -> int:
        """Delete one document with its chunks, FTS and vector rows; returns chunks deleted."""
        outermost = not self._store.connection().in_transaction
        with self._store.transaction() as conn:
            coll = _require_collection(conn, collection)
            row = conn.execute(
                "SELECT id FROM documents WHERE collection_id = ? AND document_id = ?",
                (coll.id, document_id),
            ).fetchone()
            if row is None:
                raise NotFound(
                    f"document {document_id!r} not found in collection {collection!r}",
                    param="document_id",
                    code=ErrorCode.DOCUMENT_NOT_FOUND,
                )
            gone = np.array(
                [r[0] for r in conn.execute("SELECT id FROM chunks WHERE document_id = ?", row)],
                dtype=np.int64,
            )
            # Chunks, FTS rows and vectors follow by cascade and triggers.
            conn.execute("DELETE FROM documents WHERE id = ?", (row[0],))
            _touch(conn, coll.id)
            after = _generation(conn, coll.id)
        if outermost:
            self.index.remove(coll.id, coll.generation, after, gone)
        return len(gone)

    def delete_collection(self, name: str) -> tuple[int, int]:
        """Delete a collection and everything in it; returns (documents, chunks) deleted."""
        with self._store.transaction() as conn:
            coll = _require_collection(conn, name)
            documents = _scalar(
                conn, "SELECT count(*) FROM documents WHERE collection_id = ?", coll.id
            )
            chunks = _scalar(conn, "SELECT count(*) FROM chunks WHERE collection_id = ?", coll.id)
            conn.execute("DELETE FROM collections WHERE id = ?", (coll.id,))
        # Another process sees the delete through the generation; this one frees the memory
        # and the disk.
        self.index.drop(coll.id)
        with self.index.build_lock(coll.id):  # not while the saver writes its graph
            self.hnsw_saver.discard(coll.id)
            hnsw_index.remove_files(self.hnsw_directory, coll.id)
        return documents, chunks

    # -- diagnostics ---------------------------------------------------------------------

    def counts(self, name: str) -> dict[str, int]:
        """Row counts of one collection in each of its tables; all but documents agree."""
        with _snapshot(self._store.connection()) as conn:
            coll = _require_collection(conn, name)
            vector_rows = 0
            if _vec_table_exists(conn, coll.dimension):
                vector_rows = _scalar(
                    conn,
                    f"SELECT count(*) FROM {_vec_table(coll.dimension)} WHERE collection_id = ?",
                    coll.id,
                )
            return {
                "documents": _scalar(
                    conn, "SELECT count(*) FROM documents WHERE collection_id = ?", coll.id
                ),
                "chunks": _scalar(
                    conn, "SELECT count(*) FROM chunks WHERE collection_id = ?", coll.id
                ),
                # The index's own rows (docsize), not the content table's.
                "fts_rows": _scalar(
                    conn,
                    "SELECT count(*) FROM chunks_fts_docsize"
                    " WHERE id IN (SELECT id FROM chunks WHERE collection_id = ?)",
                    coll.id,
                ),
                "vector_rows": vector_rows,
            }

    def totals(self) -> dict[str, int]:
        """Whole-database counts; fts_rows and vector_rows also catch orphans."""
        with _snapshot(self._store.connection()) as conn:
            return {
                "collections": _scalar(conn, "SELECT count(*) FROM collections"),
                "documents": _scalar(conn, "SELECT count(*) FROM documents"),
                "chunks": _scalar(conn, "SELECT count(*) FROM chunks"),
                "fts_rows": _scalar(conn, "SELECT count(*) FROM chunks_fts_docsize"),
                "vector_rows": sum(
                    _scalar(conn, f"SELECT count(*) FROM {table}") for table in _vec_tables(conn)
                ),
            }


# -- FTS query -----------------------------------------------------------------------------

# unicode61 splits on everything that is not a letter, digit or private-use character; `\w`
# also keeps `_`, which the tokenizer splits again inside the quoted string, harmlessly.
_WORD = re.compile(r"\w+")
STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for
    from further had has have having he her here hers herself him himself his how i if in
    into is it its itself just me more most my myself no nor not of off on once only or
    other our ours ourselves out over own same she should so some such than that the their
    theirs them themselves then there these they this those through to too under until up
    very was we were what when where which while who whom why will with would you your
    yours yourself yourselves""".split()
)


def fts_expression(query: str) -> str | None:
    """`query`'s words as an FTS5 OR of quoted strings, or None if it has no words.

    Quoting makes every word a string token, so user text such as `"foo`, `a AND`,
    `NEAR(`, `col:x` or `*` can never be read as FTS5 syntax.
    """
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    # Function words match nearly every chunk and, OR-ed in, let a chunk that shares only
    # "the" outrank the best vector match in hybrid fusion; a query of nothing else keeps them.
    words = ([w for w in words if w not in STOP_WORDS] or words)[:MAX_QUERY_TERMS]
    if not words:
        return None
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in words)


# -- ingest helpers ------------------------------------------------------------------------


def _check_dimension(dimension: int) -> None:
    if isinstance(dimension, bool) or not isinstance(dimension, int):
        raise InvalidRequest(f"dimension must be an integer, not {dimension!r}", param="dimension")
    if not 0 < dimension <= MAX_DIMENSION:
        raise InvalidRequest(
            f"dimension must be between 1 and {MAX_DIMENSION}, not {dimension}", param="dimension"
        )


def _document_matrix(doc: NewDocument, dimension: int) -> np.ndarray:
    """The document's vectors as unit-norm float32 rows, one per chunk."""
    if len(doc.vectors) != len(doc.chunks):
        raise InvalidRequest(
            f"{doc.filename}: {len(doc.chunks)} chunks but {len(doc.vectors)} vectors",
            param="documents",
        )
    if len(doc.vectors) == 0:  # a list, or the service's float32 matrix
        return np.zeros((0, dimension), dtype="<f4")
    try:
        matrix = np.asarray(doc.vectors, dtype=np.float64)
    except ValueError:  # ragged: rows of different lengths
        matrix = None
    if matrix is None or matrix.shape != (len(doc.vectors), dimension):
        # The slow path only to name the offending vector in the error.
        for vector in doc.vectors:
            _unit_vector(vector, dimension, "documents", doc.filename)
        raise InvalidRequest(f"{doc.filename}: malformed vectors", param="documents")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms < _MIN_NORM):
        raise InvalidRequest(
            f"{doc.filename}: a vector is zero or not finite",
            param="documents",
            code=ErrorCode.INVALID_VECTOR,
        )
    return (matrix / norms).astype("<f4")


def _unit_vector(
    vector: Sequence[float], dimension: int, param: str, where: str = "vector"
) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float64)
    if array.shape != (dimension,):
        raise InvalidRequest(
            f"{where}: vector has shape {array.shape}, the collection's dimension is {dimension}",
            param=param,
            code=ErrorCode.DIMENSION_MISMATCH,
        )
    norm = float(np.linalg.norm(array))
    if not math.isfinite(norm) or norm < _MIN_NORM:
        raise InvalidRequest(
            f"{where}: vector is zero or not finite", param=param, code=ErrorCode.INVALID_VECTOR
        )
    return (array / norm).astype("<f4")


def _check_same_model(coll: _Collection, embedding_model: str, dimension: int) -> None:
    if coll.dimension != dimension:
        raise InvalidRequest(
            f"collection {coll.name!r} holds {coll.dimension}-dimensional vectors "
            f"({coll.embedding_model}); this request has {dimension}",
            param="embedding_model",
            code=ErrorCode.DIMENSION_MISMATCH,
        )
    if coll.embedding_model != embedding_model:
        # Same dimension, different model: the vectors would not be comparable.
        raise InvalidRequest(
            f"collection {coll.name!r} was built with embedding model "
            f"{coll.embedding_model!r}, not {embedding_model!r}",
            param="embedding_model",
            code=ErrorCode.EMBEDDING_MODEL_MISMATCH,
        )


def _existing_document(conn: apsw.Connection, collection_id: int, content_hash: str) -> str | None:
    row = conn.execute(
        "SELECT document_id FROM documents WHERE collection_id = ? AND content_hash = ?",
        (collection_id, content_hash),
    ).fetchone()
    return None if row is None else str(row[0])


def _insert_document(
    conn: apsw.Connection, collection_id: int, vec_table: str, doc: NewDocument, matrix: np.ndarray
) -> list[int]:
    """Insert the document, its chunks and vectors; returns the chunks' rowids in row order."""
    conn.execute(
        "INSERT INTO documents (document_id, collection_id, filename, content_hash, format,"
        " title, metadata, chunk_count, ingested_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            doc.document_id,
            collection_id,
            doc.filename,
            doc.content_hash,
            doc.format,
            doc.title,
            _json(doc.metadata),
            len(doc.chunks),
            utc_iso(),
        ),
    )
    document_rowid = conn.last_insert_rowid()
    conn.executemany(
        "INSERT INTO chunks (chunk_id, document_id, collection_id, idx, text, token_count,"
        " page, heading) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            (
                f"{doc.document_id}_chunk_{chunk.index}",
                document_rowid,
                collection_id,
                chunk.index,
                chunk.text,
                chunk.token_count,
                chunk.page,
                chunk.heading,
            )
            for chunk in doc.chunks
        ),
    )
    rowids = _chunk_rowids(conn, document_rowid, [chunk.index for chunk in doc.chunks])
    conn.executemany(
        f"INSERT INTO {vec_table} (chunk_rowid, collection_id, embedding) VALUES (?, ?, ?)",
        ((rowid, collection_id, matrix[row].tobytes()) for row, rowid in enumerate(rowids)),
    )
    return rowids


def _chunk_rowids(conn: apsw.Connection, document_rowid: int, indexes: list[int]) -> list[int]:
    """The rowids given to the document's chunks, in the order of `indexes`."""
    by_index: dict[int, int] = dict(
        conn.execute(  # type: ignore[arg-type]  # apsw types rows loosely; these are ints
            "SELECT idx, id FROM chunks WHERE document_id = ?", (document_rowid,)
        ).fetchall()
    )
    return [by_index[index] for index in indexes]


def check_index_kind(index_kind: str) -> None:
    if index_kind not in INDEX_KINDS:
        raise InvalidRequest(
            f"index must be one of {', '.join(INDEX_KINDS)}, not {index_kind!r}", param="index"
        )


def _generation(conn: apsw.Connection, collection_id: int) -> int:
    row = conn.execute(
        "SELECT generation FROM rag_generations WHERE collection_id = ?", (collection_id,)
    ).fetchone()
    return 0 if row is None else int(row[0])


def _read_snapshot(
    conn: apsw.Connection, coll: _Collection, generation: int, count: int
) -> Snapshot:
    """The collection's vectors from SQLite, inside the caller's read transaction, in which
    the collection has `count` chunks."""
    ids = np.zeros(count, dtype=np.int64)
    matrix = aligned_matrix(count, coll.dimension)
    if not count or not _vec_table_exists(conn, coll.dimension):
        return Snapshot(generation, ids[:0], matrix[:0])
    # Through chunks' collection index and vec0's rowid lookups: a scan of vec0 by its
    # partition key measured slower. Rows are copied as they come, so the blobs are never
    # all in memory beside the matrix.
    cursor = conn.execute(
        f"SELECT v.chunk_rowid, v.embedding FROM chunks c"
        f" JOIN {_vec_table(coll.dimension)} v ON v.chunk_rowid = c.id"
        " WHERE c.collection_id = ? ORDER BY c.id",
        (coll.id,),
    )
    read = 0
    for read, (rowid, blob) in enumerate(cursor, 1):
        ids[read - 1] = rowid
        matrix[read - 1] = np.frombuffer(blob, dtype="<f4")
    return Snapshot(generation, ids[:read], matrix[:read])


_CHUNK_ROWIDS_SQL = "SELECT id FROM chunks WHERE collection_id = ? ORDER BY id"


@dataclass(frozen=True)
class _GraphUpdate:
    base: hnsw_index.HnswSnapshot
    changes: tuple[np.ndarray, np.ndarray, np.ndarray]  # rowids gone, rowids new, their rows


def _read_vectors(conn: apsw.Connection, dimension: int, rowids: np.ndarray) -> np.ndarray:
    """The stored unit vectors of `rowids`, in order (point lookups: few, as a rule)."""
    rows = aligned_matrix(len(rowids), dimension)
    sql = f"SELECT embedding FROM {_vec_table(dimension)} WHERE chunk_rowid = ?"
    for i, rowid in enumerate(rowids.tolist()):
        (blob,) = conn.execute(sql, (rowid,)).fetchall()[0]
        rows[i] = np.frombuffer(cast(bytes, blob), dtype="<f4")
    return rows


# -- filtered search -----------------------------------------------------------------------


def _matching_rowids(conn: apsw.Connection, coll: _Collection, where: SqlFilter) -> np.ndarray:
    """The rowids of the collection's chunks that `where` matches, ascending."""
    documents = "SELECT d.id FROM documents d WHERE d.collection_id = ?"
    params: tuple[Any, ...] = (coll.id,)
    if where.document_sql is not None:
        documents += f" AND ({where.document_sql})"
        params += where.document_params
    if where.chunk_sql is None:
        return _document_chunks(conn, documents, params)
    # Terms on page or heading are judged per chunk, only in the documents the rest admits.
    sql = (
        "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id"
        f" WHERE c.document_id IN ({documents}) AND ({where.chunk_sql}) ORDER BY c.id"
    )
    return np.fromiter(
        (rowid for (rowid,) in conn.execute(sql, (*params, *where.chunk_params))),
        dtype=np.int64,
    )


def _document_chunks(conn: apsw.Connection, documents: str, params: tuple[Any, ...]) -> np.ndarray:
    """The chunk rowids of the documents `documents` (a query) selects, ascending.

    A document's chunks are written in one statement of one transaction, so their rowids
    are as a rule one run: a document whose rowid span equals its chunk count is expanded
    from its span (reading a row per chunk costs more than the filter), the others are
    read one by one.
    """
    spans = np.array(
        conn.execute(
            "SELECT c.document_id, min(c.id), max(c.id), count(*) FROM chunks c"
            f" WHERE c.document_id IN ({documents}) GROUP BY c.document_id",
            params,
        ).fetchall(),
        dtype=np.int64,
    ).reshape(-1, 4)
    document, low, high, count = spans.T
    runs = high - low + 1 == count
    lengths = count[runs]
    # Every run's rowids at once: each position's offset into its run, plus the run's start.
    starts = np.repeat(low[runs] - (np.cumsum(lengths) - lengths), lengths)
    rowids = [starts + np.arange(int(lengths.sum()), dtype=np.int64)]
    if not runs.all():
        rowids.append(
            np.fromiter(
                (
                    rowid
                    for (rowid,) in conn.execute(
                        "SELECT id FROM chunks WHERE document_id IN"
                        " (SELECT value FROM json_each(?))",
                        (json.dumps(document[~runs].tolist()),),
                    )
                ),
                dtype=np.int64,
            )
        )
    return np.sort(np.concatenate(rowids))


def _filtered_top(
    conn: apsw.Connection,
    coll: _Collection,
    resident: Resident | None,
    query: np.ndarray,
    k: int,
    allowed: np.ndarray,
) -> list[tuple[int, float]]:
    """The `k` of the chunks `allowed` (ascending rowids) nearest to `query`."""
    if resident is None:
        return _vec_filtered_knn(conn, coll, query, k, allowed)
    if isinstance(resident, Snapshot):
        return _masked_top(resident, query, k, allowed)
    if len(allowed) > FILTER_EXACT_ROWS:
        found = _widened_top(resident, query, k, allowed)
        if found is not None:
            return found
    return _set_top(resident, query, k, allowed)


def _masked_top(
    snapshot: Snapshot, query: np.ndarray, k: int, allowed: np.ndarray
) -> list[tuple[int, float]]:
    """Exact: the matrix's rows of `allowed` scored, the best `k` kept."""
    ids = snapshot.ids
    if not len(ids):
        return []
    positions = np.minimum(np.searchsorted(ids, allowed), len(ids) - 1)
    positions = positions[ids[positions] == allowed]
    if len(positions) * 4 > len(ids):
        # Most rows: one matrix-vector product beats copying them out first.
        scores = (snapshot.matrix @ query)[positions]
    else:
        scores = snapshot.matrix[positions] @ query
    return _best(ids[positions], scores, k)


def _widened_top(
    resident: Resident, query: np.ndarray, k: int, allowed: np.ndarray
) -> list[tuple[int, float]] | None:
    """The graph's nearest neighbours that are `allowed`, from ever wider searches; None
    when the search would grow wider than scoring the set exactly."""
    total, matching = resident.vectors, len(allowed)
    want = min(total, max(2 * k, math.ceil(FILTER_OVERSAMPLE * k * total / matching)))
    while want <= min(matching // 4, FILTER_WIDEST):
        found = resident.top(query, want)
        keys = np.fromiter((rowid for rowid, _ in found), dtype=np.int64, count=len(found))
        kept = allowed[np.minimum(np.searchsorted(allowed, keys), matching - 1)] == keys
        if int(kept.sum()) >= k or want >= total:
            return [pair for pair, keep in zip(found, kept.tolist(), strict=True) if keep][:k]
        want = min(total, want * 4)
    return None


def _set_top(
    resident: Resident, query: np.ndarray, k: int, rowids: np.ndarray
) -> list[tuple[int, float]]:
    """Exact over `rowids`: each scored by the index's own vectors, in bounded blocks."""
    best_ids, best_scores = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    for start in range(0, len(rowids), SCORE_BLOCK):
        got = resident.similarities(rowids[start : start + SCORE_BLOCK].tolist(), query)
        ids = np.concatenate([best_ids, np.fromiter(got, dtype=np.int64, count=len(got))])
        scores = np.concatenate(
            [best_scores, np.fromiter(got.values(), dtype=np.float64, count=len(got))]
        )
        order = _best_order(ids, scores, k)
        best_ids, best_scores = ids[order], scores[order]
    return list(zip(best_ids.tolist(), best_scores.tolist(), strict=True))


def _best_order(ids: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the `k` best scores, best first, equal scores in rowid order (as
    `Snapshot.top` orders them)."""
    n = len(ids)
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    candidates = np.argpartition(scores, n - k)[n - k :] if k < n else np.arange(n)
    return candidates[np.lexsort((ids[candidates], -scores[candidates]))]


def _best(ids: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    order = _best_order(ids, scores, k)
    return list(zip(ids[order].tolist(), scores[order].astype(np.float64).tolist(), strict=True))


def _vec_filtered_knn(
    conn: apsw.Connection, coll: _Collection, query: np.ndarray, k: int, allowed: np.ndarray
) -> list[tuple[int, float]]:
    """sqlite-vec's exact KNN over the collection's chunks restricted to `allowed`."""
    if not _vec_table_exists(conn, coll.dimension):
        return []
    rows: list[tuple[Any, ...]] = conn.execute(
        f"SELECT chunk_rowid, distance FROM {_vec_table(coll.dimension)}"
        " WHERE embedding MATCH ? AND k = ? AND collection_id = ?"
        " AND chunk_rowid IN (SELECT value FROM json_each(?)) ORDER BY distance",
        (query.tobytes(), k, coll.id, json.dumps(allowed.tolist())),
    ).fetchall()
    return [(int(rowid), 1.0 - float(distance) ** 2 / 2.0) for rowid, distance in rows]


def _vec_similarities(
    conn: apsw.Connection, coll: _Collection, rowids: Sequence[int], query: np.ndarray
) -> dict[int, float]:
    if not _vec_table_exists(conn, coll.dimension):
        return {}
    # One JSON array, not a parameter each: SQLite caps the number of parameters.
    rows: list[tuple[Any, ...]] = conn.execute(
        f"SELECT chunk_rowid, vec_distance_l2(embedding, ?) FROM {_vec_table(coll.dimension)}"
        " WHERE collection_id = ? AND chunk_rowid IN (SELECT value FROM json_each(?))",
        (query.tobytes(), coll.id, json.dumps([int(r) for r in rowids])),
    ).fetchall()
    return {int(rowid): 1.0 - float(distance) ** 2 / 2.0 for rowid, distance in rows}


def _touch(conn: apsw.Connection, collection_id: int) -> None:
    conn.execute("UPDATE collections SET updated_at = ? WHERE id = ?", (utc_iso(), collection_id))


# -- vector tables -------------------------------------------------------------------------


def _vec_table(dimension: int) -> str:
    # Only ever built from a validated int, so it is safe to put into SQL text.
    return f"vec_{int(dimension)}"


def _vec_table_exists(conn: apsw.Connection, dimension: int) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (_vec_table(dimension),)
    ).fetchone()
    return row is not None


def _vec_tables(conn: apsw.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_schema WHERE type = 'table' AND sql LIKE 'CREATE VIRTUAL TABLE%'"
        " AND name GLOB 'vec_[0-9]*' AND name NOT GLOB 'vec_*_*'"
    ).fetchall()
    return [str(row[0]) for row in rows]


def _ensure_vec_table(conn: apsw.Connection, dimension: int) -> str:
    """The vec0 table for `dimension`, created (in the caller's transaction) if absent."""
    table = _vec_table(dimension)
    if _vec_table_exists(conn, dimension):
        return table
    conn.execute(
        f"CREATE VIRTUAL TABLE {table} USING vec0("
        "chunk_rowid INTEGER PRIMARY KEY,"
        " collection_id INTEGER PARTITION KEY,"
        f" embedding float[{int(dimension)}])"
    )
    conn.execute(
        f"CREATE TRIGGER {table}_chunk_delete AFTER DELETE ON chunks BEGIN"
        f" DELETE FROM {table} WHERE chunk_rowid = old.id; END"
    )
    return table


# -- reading helpers -----------------------------------------------------------------------

_COLLECTION_INFO_SQL = """
SELECT c.name, c.embedding_model, c.dimension, c.chunk_size, c.overlap, c.metadata,
       c.created_at, c.updated_at,
       (SELECT count(*) FROM documents d WHERE d.collection_id = c.id),
       (SELECT count(*) FROM chunks k WHERE k.collection_id = c.id)
FROM collections c
"""


def _collection_info(row: Sequence[Any]) -> CollectionInfo:
    return CollectionInfo(
        name=row[0],
        embedding_model=row[1],
        dimension=row[2],
        chunk_size=row[3],
        overlap=row[4],
        metadata=json.loads(row[5]),
        created_at=row[6],
        updated_at=row[7],
        document_count=row[8],
        chunk_count=row[9],
    )


def _hit(row: Sequence[Any], score: float, rerank_score: float | None = None) -> Hit:
    _, chunk_id, text, page, heading, document_id, filename, metadata = row
    # The user's metadata first: the store's own keys must not be overridden by it.
    meta = {
        **json.loads(metadata),
        "file": filename,
        "page": page,
        "heading": heading,
        "document_id": document_id,
    }
    return Hit(
        chunk_id=chunk_id,
        document_id=document_id,
        text=text,
        score=score,
        metadata=meta,
        rerank_score=rerank_score,
    )


# The collection and its generation in one indexed read: a search checks both every time.
# (A correlated subquery: ~3.5 us a query here, a LEFT JOIN ~10.)
_FIND_COLLECTION_SQL = """
SELECT c.id, c.name, c.embedding_model, c.dimension,
       coalesce((SELECT g.generation FROM rag_generations g WHERE g.collection_id = c.id), 0),
       c.index_kind
FROM collections c
"""


def _find_collection(conn: apsw.Connection, name: str) -> _Collection | None:
    row = conn.execute(f"{_FIND_COLLECTION_SQL} WHERE c.name = ?", (name,)).fetchone()
    return None if row is None else _Collection(*row)


def _require_collection(conn: apsw.Connection, name: str) -> _Collection:
    coll = _find_collection(conn, name)
    if coll is None:
        raise _collection_not_found(name)
    return coll


def _collection_not_found(name: str) -> NotFound:
    return NotFound(
        f"collection {name!r} not found", param="collection", code=ErrorCode.COLLECTION_NOT_FOUND
    )


def _scalar(conn: apsw.Connection, sql: str, *bindings: Any) -> int:
    rows: list[tuple[Any, ...]] = conn.execute(sql, bindings).fetchall()
    return int(rows[0][0])


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


@contextmanager
def _snapshot(conn: apsw.Connection) -> Iterator[apsw.Connection]:
    """A read transaction, so several counts see one state; no write lock (unlike IMMEDIATE)."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN DEFERRED")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")  # nothing was written; ending the read is all we need
