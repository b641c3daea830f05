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
    Building the graph is the slow part (minutes at a million vectors), so it is saved
    beside the database as `<db dir>/rag-index/<collection rowid>-<generation>.usearch`
    after every build and patch. A file is used only when its generation is SQLite's
    current one; any other (missing, stale after another process's write, left from a
    deleted collection whose rowid was reused: generations never go back) means a rebuild
    from SQLite. Files are written to a temporary name and renamed, so a crash leaves
    either the old file or the new one, never half of one.

Scores
    The graph uses usearch's cosine metric, so a hit's score is `1 - distance`: the same
    cosine as the exact path, up to f16 rounding of the stored vectors (~1e-3).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import structlog

from engine.rag.exact_index import HNSW

if TYPE_CHECKING:
    from usearch.index import Index

log = structlog.get_logger(__name__)

# usearch's defaults for the graph's degree and build beam; the search beam is raised from
# its 64 so top-10 recall stays >= 0.95 at a million 384-d vectors (bench/vector_search.py).
CONNECTIVITY = 16
EXPANSION_ADD = 128
EXPANSION_SEARCH = 128
DTYPE = "f16"
_SUFFIX = ".usearch"


def estimated_bytes(vectors: int, dimension: int) -> int:
    """Memory a graph of `vectors` takes, before building it: f16 vectors, the base
    layer's 2·CONNECTIVITY neighbour slots of 4 bytes, the key and level bookkeeping."""
    return vectors * (dimension * 2 + 2 * CONNECTIVITY * 4 + 16)


def index_path(directory: Path, collection_id: int, generation: int) -> Path:
    return directory / f"{collection_id}-{generation}{_SUFFIX}"


def remove_files(directory: Path, collection_id: int, keep: Path | None = None) -> None:
    """Delete the collection's saved graphs other than `keep` (stale generations)."""
    for path in directory.glob(f"{collection_id}-*{_SUFFIX}"):
        if path != keep:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


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


@dataclass(frozen=True)
class HnswSnapshot:
    """A collection's graph at one generation, and the file it is saved in."""

    generation: int
    index: Index
    directory: Path
    collection_id: int
    dimension: int

    kind = HNSW

    @property
    def nbytes(self) -> int:
        return int(self.index.memory_usage)

    @property
    def vectors(self) -> int:
        return len(self.index)

    def top(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        k = min(k, len(self.index))
        if k <= 0:
            return []
        # One query: the calling worker thread, not usearch's pool (its start-up costs more).
        matches = self.index.search(query, k, threads=1)
        scores = 1.0 - np.asarray(matches.distances, dtype=np.float64)
        keys = np.asarray(matches.keys, dtype=np.int64)
        # Best first, equal scores in rowid order, as the exact path orders them.
        order = np.lexsort((keys, -scores))
        return list(zip(keys[order].tolist(), scores[order].tolist(), strict=True))

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
        return self._saved(generation)

    def without_rows(self, generation: int, ids: np.ndarray) -> HnswSnapshot:
        if len(ids):
            self.index.remove(ids.astype(np.uint64))
        return self._saved(generation)

    def _saved(self, generation: int) -> HnswSnapshot:
        snapshot = HnswSnapshot(
            generation, self.index, self.directory, self.collection_id, self.dimension
        )
        snapshot.save()
        return snapshot

    def save(self) -> None:
        """Write the graph as this generation's file and delete older ones. A failure to
        write is logged, not raised: the graph in memory is right, and a restart rebuilds
        from SQLite."""
        path = index_path(self.directory, self.collection_id, self.generation)
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


def load(
    directory: Path, collection_id: int, generation: int, dimension: int
) -> HnswSnapshot | None:
    """The saved graph of this generation, or None when there is none (or it is unreadable:
    the caller rebuilds it)."""
    path = index_path(directory, collection_id, generation)
    if not path.exists():
        return None
    index = _new_index(dimension)
    try:
        index.load(str(path))
    except (OSError, RuntimeError, ValueError) as exc:
        log.warning("rag hnsw index unreadable, rebuilding", path=str(path), error=str(exc))
        return None
    # The search beam is not part of the file: `_new_index` set it and loading keeps it.
    if index.ndim != dimension:
        return None
    return HnswSnapshot(generation, index, directory, collection_id, dimension)


def build(
    directory: Path,
    collection_id: int,
    generation: int,
    ids: np.ndarray,
    matrix: np.ndarray,
) -> HnswSnapshot:
    """A new graph of the given unit vectors (keys: chunk rowids), saved."""
    index = _new_index(matrix.shape[1])
    if len(ids):
        index.add(ids.astype(np.uint64), matrix)
    snapshot = HnswSnapshot(generation, index, directory, collection_id, matrix.shape[1])
    snapshot.save()
    return snapshot
