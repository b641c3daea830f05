"""Approximate vector search for large collections: one HNSW graph per collection (usearch).

An exact scan costs O(n·d) a query; at a million chunks that is tens of milliseconds even
with BLAS. An HNSW graph answers a top-k in a few hundred distance computations, at a
recall just under 1. usearch was chosen for its SIMD kernels, f16 storage (half the
memory of float32 at no measurable recall cost for unit vectors) and save/load to a file.

Consistency is exact_index.py's, unchanged: an `HnswSnapshot` is a `Resident` at one
generation, cached, bounded and patched after commits by `ExactIndex`. Unlike a matrix,
the graph is patched in place (rebuilding a million-vector graph per ingest is not an
option): a search still holding the previous snapshot may then see rows committed a
moment ago (harmless) or miss ones deleted a moment ago (`RagStore.hits` drops rowids no
longer in SQLite, so a deleted chunk is never served).

Persistence
    Building the graph is the slow part (minutes at a million vectors), so it is kept beside
    the database as `<db dir>/rag-index/<collection rowid>-<generation>.usearch`. Writing a
    million-vector graph takes about a second, too much for every ingest: a patched graph
    is saved by a `Saver` at most `rag_hnsw_save_delay_s` after its first unsaved change
    (and when the server stops), so a crash loses at most that window of the file, never
    of SQLite. A file of any generation is a starting point: on load it is brought up to
    SQLite's rows (`reconciled`: rows SQLite no longer has are removed, rows it gained are
    added) instead of rebuilt. This is sound because a chunk's rowid is never reused
    (AUTOINCREMENT) and its vector never changes, so the key sets alone tell the
    difference. A graph too far from SQLite (more than half changed, e.g. a file left by a
    deleted collection whose rowid was reused) is rebuilt instead. Files are written to a
    temporary `.partial` name and renamed, so a crash leaves the old file or the new one,
    never half of one; partial files of processes that no longer run are deleted.

Scores
    The graph uses usearch's cosine metric, so a hit's score is `1 - distance`: the same
    cosine as the exact path, up to f16 rounding of the stored vectors (~1e-3).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import structlog

from engine.rag.exact_index import HNSW, Snapshot, aligned_copy

if TYPE_CHECKING:
    from usearch.index import Index

log = structlog.get_logger(__name__)

# usearch's defaults for the graph's degree and build beam; the search beam is raised from
# its 64 so top-10 recall stays >= 0.95 at a million 384-d vectors (bench/vector_search.py).
CONNECTIVITY = 16
EXPANSION_ADD = 128
EXPANSION_SEARCH = 128
DTYPE = "f16"
# Graphs this small, and searches for a quarter of a graph of up to 16 times as many, are
# scanned exactly from their stored vectors (reading one back costs ~3 us).
EXACT_SCAN_VECTORS = 1024
_SUFFIX = ".usearch"


def estimated_bytes(vectors: int, dimension: int) -> int:
    """Memory a graph of `vectors` takes, before building it: f16 vectors plus what usearch
    measured beyond them at 1M x 384 (1,334 bytes a vector in all: neighbour lists of every
    level, keys, its arena's slack), about 36 bytes per unit of CONNECTIVITY."""
    return vectors * (dimension * 2 + 36 * CONNECTIVITY)


def index_path(directory: Path, collection_id: int, generation: int) -> Path:
    return directory / f"{collection_id}-{generation}{_SUFFIX}"


def saved_generations(directory: Path, collection_id: int) -> list[int]:
    """Generations of the collection's saved graphs, newest first."""
    found = []
    for path in directory.glob(f"{collection_id}-*{_SUFFIX}"):
        generation = path.name[len(f"{collection_id}-") : -len(_SUFFIX)]
        if generation.isdigit():
            found.append(int(generation))
    return sorted(found, reverse=True)


def remove_files(directory: Path, collection_id: int, keep: Path | None = None) -> None:
    """Delete the collection's saved graphs other than `keep` (stale generations)."""
    for path in directory.glob(f"{collection_id}-*{_SUFFIX}"):
        if path != keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    remove_dead_partials(directory, collection_id)


def remove_dead_partials(directory: Path, collection_id: int) -> None:
    """Delete the collection's partial files whose writers no longer run (killed mid-save)."""
    for path in directory.glob(f"{collection_id}-*{_SUFFIX}.*.partial"):
        writer = path.name.split(".")[-3]
        if writer.isdigit() and not _running(int(writer)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _new_index(dimension: int) -> Index:
    # Imported here, after MLX: usearch's extension carries its own static libstdc++ and,
    # loaded first in a process, MLX's CPU kernel compiler then writes truncated C++
    # sources and every compiled MLX function fails (usearch 2.26.6, mlx 0.32.4). Loaded
    # after MLX, both work. Only processes that use an HNSW index pay the imports.
    with contextlib.suppress(ImportError):
        import mlx.core  # noqa: F401
    from usearch.index import Index

    return Index(
        ndim=dimension,
        metric="cos",
        dtype=DTYPE,
        connectivity=CONNECTIVITY,
        expansion_add=EXPANSION_ADD,
        expansion_search=EXPANSION_SEARCH,
    )


class Saver:
    """Writes patched graphs to their files, at most `delay_s` after each one's first
    unsaved change (see "Persistence"); 0 writes at once, in the patching thread.

    A save holds the collection's build lock (`lock_for`), the lock patches hold, so a
    graph is never written while it changes."""

    def __init__(self, delay_s: float, lock_for: Callable[[int], threading.Lock]) -> None:
        self.delay_s = max(0.0, float(delay_s))
        self._lock_for = lock_for
        self._cond = threading.Condition()
        # collection rowid -> (the latest snapshot to write, when it is due)
        self._pending: dict[int, tuple[HnswSnapshot, float]] = {}
        self._thread: threading.Thread | None = None

    def schedule(self, snapshot: HnswSnapshot) -> None:
        """Save `snapshot` (its collection's newest) once due. Called under the build lock."""
        if self.delay_s == 0:
            snapshot.save()
            return
        with self._cond:
            due = self._pending.get(snapshot.collection_id, (snapshot, 0.0))[1]
            self._pending[snapshot.collection_id] = (
                snapshot,
                due or time.monotonic() + self.delay_s,
            )
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="rag-hnsw-saver", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def discard(self, collection_id: int) -> None:
        """Forget an unsaved graph (its collection was deleted)."""
        with self._cond:
            self._pending.pop(collection_id, None)

    def pending(self) -> list[int]:
        with self._cond:
            return list(self._pending)

    def flush(self) -> None:
        """Save every pending graph now (at shutdown)."""
        for collection_id in self.pending():
            self._save(collection_id)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [c for c, (_, at) in self._pending.items() if at <= now]
                if not self._pending:
                    self._thread = None  # started again by the next schedule
                    return
                if not due:
                    self._cond.wait(min(at for _, at in self._pending.values()) - now)
                    continue
            for collection_id in due:
                self._save(collection_id)

    def _save(self, collection_id: int) -> None:
        with self._lock_for(collection_id):
            with self._cond:
                entry = self._pending.pop(collection_id, None)
            if entry is not None:
                entry[0].save()


@dataclass(frozen=True)
class HnswSnapshot:
    """A collection's graph at one generation, and the file it is saved in."""

    generation: int
    index: Index
    directory: Path
    collection_id: int
    dimension: int
    saver: Saver

    kind = HNSW

    @property
    def nbytes(self) -> int:
        return int(self.index.memory_usage)

    @property
    def vectors(self) -> int:
        return len(self.index)

    def top(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        n = len(self.index)
        k = min(k, n)
        if k <= 0:
            return []
        # A graph search is not exact (a graph patched by removals may even lose a
        # neighbourhood), and buys nothing here: score every stored vector.
        if n <= EXACT_SCAN_VECTORS:
            return self._small_matrix.top(query, k)
        if 4 * k >= n <= 16 * EXACT_SCAN_VECTORS:
            return self._scanned().top(query, k)
        # One query: the calling worker thread, not usearch's pool (its start-up costs more).
        matches = self.index.search(query, k, threads=1)
        scores = 1.0 - np.asarray(matches.distances, dtype=np.float64)
        keys = np.asarray(matches.keys, dtype=np.int64)
        # Best first, equal scores in rowid order, as the exact path orders them.
        order = np.lexsort((keys, -scores))
        return list(zip(keys[order].tolist(), scores[order].tolist(), strict=True))

    @cached_property
    def _small_matrix(self) -> Snapshot:
        """A small graph's vectors, read back once per generation (1.6 ms for 1,024 of
        384 dimensions, against 0.07 ms for a graph search)."""
        return self._scanned()

    def _scanned(self) -> Snapshot:
        """The graph's vectors as an exact matrix (small graphs only: see `top`)."""
        keys = np.sort(np.asarray(self.index.keys, dtype=np.int64))
        rows = np.asarray(self.index.get(keys.astype(np.uint64), dtype="f32"), dtype=np.float32)
        rows = rows.reshape(len(keys), self.dimension)
        # f16 rounding leaves stored vectors a little off unit length.
        rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        return Snapshot(self.generation, keys, aligned_copy(rows))

    def similarities(self, rowids: Sequence[int], query: np.ndarray) -> dict[int, float]:
        """Cosine of the given rowids in the graph, from its stored (f16) vectors."""
        if not rowids:
            return {}
        wanted = np.asarray(rowids, dtype=np.uint64)
        present = np.asarray(self.index.contains(wanted), dtype=bool).reshape(-1)
        if not present.any():
            return {}
        found = wanted[present]
        rows = np.asarray(self.index.get(found, dtype="f32"), dtype=np.float32)
        rows = rows.reshape(len(found), self.dimension)
        # f16 rounding leaves stored vectors a little off unit length: normalise, as the
        # cosine metric does for `top`.
        scores = (rows @ query) / np.maximum(np.linalg.norm(rows, axis=1), 1e-12)
        return dict(
            zip(found.astype(np.int64).tolist(), scores.astype(np.float64).tolist(), strict=True)
        )

    def added_bytes(self, rows: int) -> int:
        return estimated_bytes(rows, self.dimension)

    def with_rows(self, generation: int, ids: np.ndarray, rows: np.ndarray) -> HnswSnapshot:
        if len(ids):
            self.index.add(ids.astype(np.uint64), rows)
        return self._scheduled(generation)

    def without_rows(self, generation: int, ids: np.ndarray) -> HnswSnapshot:
        if len(ids):
            self.index.remove(ids.astype(np.uint64))
        return self._scheduled(generation)

    def changes(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """What brings this graph to SQLite's rows (`ids`: every chunk rowid of the
        collection, ascending): (rowids to remove, rowids to add), or None when more than
        half would change and a rebuild gives the better graph."""
        keys = np.sort(np.asarray(self.index.keys, dtype=np.int64))
        gone = np.setdiff1d(keys, ids, assume_unique=True)
        new = np.setdiff1d(ids, keys, assume_unique=True)
        if len(gone) + len(new) > max(len(ids), 1) / 2:
            return None
        return gone, new

    def reconciled(
        self, generation: int, gone: np.ndarray, new: np.ndarray, rows: np.ndarray
    ) -> HnswSnapshot:
        """The graph at `generation` after `changes`: `new`'s unit vectors are `rows`."""
        if len(gone):
            self.index.remove(gone.astype(np.uint64))
        if len(new):
            self.index.add(new.astype(np.uint64), rows)
        if not len(gone) and not len(new) and generation == self.generation:
            return self
        log.info(
            "rag hnsw index reconciled with sqlite",
            collection_id=self.collection_id,
            from_generation=self.generation,
            generation=generation,
            added=len(new),
            removed=len(gone),
        )
        return self._scheduled(generation)

    def _scheduled(self, generation: int) -> HnswSnapshot:
        snapshot = replace(self, generation=generation)
        self.saver.schedule(snapshot)
        return snapshot

    def save(self) -> None:
        """Write the graph as this generation's file and delete older ones. A failure to
        write is logged, not raised: the graph in memory is right, and a restart rebuilds
        from SQLite."""
        path = index_path(self.directory, self.collection_id, self.generation)
        if any(g > self.generation for g in saved_generations(self.directory, self.collection_id)):
            return  # another writer (or a rebuild) saved a newer graph: keep that one
        # Unique per writer: two processes (or threads) saving the same generation must
        # not write into one temporary file.
        partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.index.save(str(partial))
            os.replace(partial, path)
        except (OSError, RuntimeError) as exc:
            log.warning("rag hnsw index not saved", path=str(path), error=str(exc))
            with contextlib.suppress(OSError):
                partial.unlink()
            return
        remove_files(self.directory, self.collection_id, keep=path)


def load(directory: Path, collection_id: int, dimension: int, saver: Saver) -> HnswSnapshot | None:
    """The collection's newest saved graph, at the generation it was saved at (the caller
    reconciles it with SQLite), or None when there is none readable (the caller rebuilds)."""
    remove_dead_partials(directory, collection_id)
    for generation in saved_generations(directory, collection_id):
        path = index_path(directory, collection_id, generation)
        index = _new_index(dimension)
        try:
            index.load(str(path))
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("rag hnsw index unreadable", path=str(path), error=str(exc))
            continue
        # The search beam is not part of the file: `_new_index` set it and loading keeps it.
        if index.ndim == dimension:
            return HnswSnapshot(generation, index, directory, collection_id, dimension, saver)
    return None


def build(
    directory: Path,
    collection_id: int,
    generation: int,
    ids: np.ndarray,
    matrix: np.ndarray,
    saver: Saver,
) -> HnswSnapshot:
    """A new graph of the given unit vectors (keys: chunk rowids), saved at once: a
    rebuild is the costly thing a file saves."""
    saver.discard(collection_id)  # an older graph's pending save would be stale
    index = _new_index(matrix.shape[1])
    if len(ids):
        index.add(ids.astype(np.uint64), matrix)
    snapshot = HnswSnapshot(generation, index, directory, collection_id, matrix.shape[1], saver)
    snapshot.save()
    return snapshot
