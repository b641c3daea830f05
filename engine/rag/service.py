"""The RAG provider: ingest documents into collections and answer questions from them,
with the registry's embedding and chat models."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import structlog

from engine.config import Settings
from engine.errors import ErrorCode, InvalidRequest, PayloadTooLarge, ServiceUnavailable
from engine.models.backends import serving
from engine.models.backends.base import ChatParams
from engine.models.registry import ModelRegistry
from engine.models.types import Operation
from engine.rag.chunking import Tokenize, TooManyChunks, chunk_sections
from engine.rag.extract import extract_limits, extracted_from_payload
from engine.rag.filters import FilterLimits, SqlFilter, compile_filter
from engine.rag.formats.common import ExtractLimits
from engine.rag.prompt import answer_messages
from engine.rag.retrieval import Retriever
from engine.rag.store import MIB, RagStore, check_index_kind
from engine.rag.types import Chunk, Extracted, Hit, IngestResult, NewDocument, QueryResult
from engine.sandbox import SandboxError, SandboxMemoryError, SandboxTimeout, shared_sandbox
from engine.store import Store

log = structlog.get_logger(__name__)

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MIN_CHUNK = 16
EXTRACT_TARGET = "engine.rag.extract:extract_payload"
# Ingest progress: (stage, done, total). Stages in order: "extract" (files), "embed"
# (chunks), "store" (documents). Called from the event loop or a worker thread.
ProgressFn = Callable[[str, int, int], None]
PROGRESS_UNITS = {"extract": "files", "embed": "chunks", "store": "documents"}
# A progress log line at most this often per ingest (and always at a stage's end).
PROGRESS_LOG_INTERVAL_S = 1.0


@dataclass(frozen=True)
class IngestLimits:
    """Ingest's budgets, from Settings (docs/security.md lists them)."""

    extract: ExtractLimits
    max_chunks: int
    extract_timeout_s: float
    extract_memory_mb: int
    embed_batch: int
    metadata_max_depth: int
    metadata_max_bytes: int
    # Not an ingest budget, but the service's other memory setting from the same Settings.
    index_max_mb: int = Settings.rag_index_max_mb
    hnsw_min_vectors: int = Settings.rag_hnsw_min_vectors
    hnsw_save_delay_s: float = Settings.rag_hnsw_save_delay_s
    # Nor is this: the bounds on a retrieval's metadata filter.
    filter: FilterLimits = field(default_factory=FilterLimits)

    @classmethod
    def from_settings(cls, settings: Settings) -> IngestLimits:
        return cls(
            extract=extract_limits(settings),
            max_chunks=settings.rag_max_document_chunks,
            extract_timeout_s=settings.rag_extract_timeout_s,
            extract_memory_mb=settings.rag_extract_memory_mb,
            embed_batch=max(1, settings.rag_embed_batch),
            metadata_max_depth=settings.rag_metadata_max_depth,
            metadata_max_bytes=settings.rag_metadata_max_bytes,
            index_max_mb=settings.rag_index_max_mb,
            hnsw_min_vectors=settings.rag_hnsw_min_vectors,
            hnsw_save_delay_s=settings.rag_hnsw_save_delay_s,
            filter=FilterLimits.from_settings(settings),
        )


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes
    content_type: str | None = None


class _Progress:
    """The one progress mechanism of an ingest: every step goes to the caller's callback
    (the CLI's progress bar) and, throttled, to the `rag_ingest_progress` log event."""

    def __init__(self, collection: str, callback: ProgressFn | None) -> None:
        self.collection = collection
        self.callback = callback
        self._last_log = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.callback is not None:
            self.callback(stage, done, total)
        now = time.monotonic()
        if done >= total or now - self._last_log >= PROGRESS_LOG_INTERVAL_S:
            self._last_log = now
            log.info(
                "rag_ingest_progress",
                collection=self.collection,
                stage=stage,
                done=done,
                total=total,
                unit=PROGRESS_UNITS.get(stage, "items"),
            )

    def stage(self, stage: str) -> Callable[[int, int], None]:
        return lambda done, total: self(stage, done, total)


@dataclass(frozen=True)
class _Prepared:
    upload: Upload
    content_hash: str
    document: NewDocument | None  # None: already stored in the collection


def check_collection_name(name: str, param: str = "collection") -> str:
    if not isinstance(name, str) or not COLLECTION_NAME.match(name):
        raise InvalidRequest(
            f"collection name {name!r} is invalid: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
            param=param,
            code=ErrorCode.INVALID_COLLECTION,
        )
    return name


def check_metadata(metadata: dict[str, Any], limits: IngestLimits) -> dict[str, Any]:
    """Ingest metadata within its depth and size budgets (400 otherwise). The depth is
    measured without recursion: a body nested 10,000 deep must not overflow the stack."""
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata must be a JSON object", param="metadata")
    levels: list[tuple[Any, int]] = [(metadata, 1)]
    while levels:
        value, depth = levels.pop()
        if depth > limits.metadata_max_depth:
            raise metadata_too_deep(limits.metadata_max_depth)
        children = value.values() if isinstance(value, dict) else value
        levels.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    size = len(json.dumps(metadata, ensure_ascii=False).encode())
    if size > limits.metadata_max_bytes:
        raise InvalidRequest(
            f"metadata is {size:,} bytes as JSON; the limit is {limits.metadata_max_bytes:,} "
            "(setting rag_metadata_max_bytes)",
            param="metadata",
            code=ErrorCode.METADATA_TOO_LARGE,
        )
    return metadata


def metadata_too_deep(limit: int) -> InvalidRequest:
    return InvalidRequest(
        f"metadata nests deeper than {limit} levels (setting rag_metadata_max_depth)",
        param="metadata",
        code=ErrorCode.METADATA_TOO_DEEP,
    )


def _too_large(name: str, problem: str, setting: str) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{name}: {problem} (setting {setting})",
        param="files",
        code=ErrorCode.DOCUMENT_TOO_LARGE,
        details={"file": name},
    )


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RagService:
    def __init__(
        self, store: Store, models: ModelRegistry, limits: IngestLimits | None = None
    ) -> None:
        self.store = store
        self.limits = limits or IngestLimits.from_settings(Settings())
        self.db = RagStore(
            store,
            index_max_bytes=self.limits.index_max_mb * MIB,
            hnsw_min_vectors=self.limits.hnsw_min_vectors,
            hnsw_save_delay_s=self.limits.hnsw_save_delay_s,
        )
        self.models = models
        self.retriever = Retriever(self.db, models)

    # -- models ---------------------------------------------------------------------------
    def embedding_model(self, collection: str | None, requested: str | None) -> str:
        """The embedding model for a collection: the one asked for (404 when it is not
        loaded), else the one the collection was built with, else the loaded embeddings
        model (503 when the collection's is not loaded, or none is)."""
        entry = self.models.get(requested, "embedding_model") if requested else None
        if entry is None:
            existing = self.db.find_collection(collection) if collection else None
            # A real embedder first; else echo (tests and demos run RAG with no weights).
            default = (
                existing.embedding_model
                if existing
                else self.models.select("embeddings") or self.models.select("echo")
            )
            if default is None:
                raise ServiceUnavailable(
                    "no embedding model is loaded: load a model of type 'embeddings'",
                    param="embedding_model",
                    code=ErrorCode.MODEL_NOT_LOADED,
                )
            entry = self.models.find(default)
            if entry is None:
                raise ServiceUnavailable(
                    f"collection '{collection}' was embedded with '{default}', which is not "
                    "loaded: load it or pass embedding_model",
                    param="embedding_model",
                    code=ErrorCode.MODEL_NOT_LOADED,
                )
        if entry.type not in serving(Operation.EMBED):
            raise InvalidRequest(
                f"model '{entry.id}' is a '{entry.type}' model, which does not embed",
                param="embedding_model",
            )
        return entry.id

    def collection_embedder(self, collection: str, requested: str | None) -> str:
        """The embedding model to query a collection with: ``requested``, else the
        collection's own; it must be the collection's (two models' vectors do not compare).
        """
        info = self.db.collection(collection)
        embedder = self.embedding_model(collection, requested)
        if embedder != info.embedding_model:
            raise InvalidRequest(
                f"collection '{collection}' was embedded with '{info.embedding_model}', "
                f"not '{embedder}'",
                param="embedding_model",
                code=ErrorCode.EMBEDDING_MODEL_MISMATCH,
            )
        return embedder

    def totals(self) -> dict[str, int]:
        """Collections, documents and chunks in the database, for /metrics and diagnostics:
        the chunks are summed from the documents' own counts, which scans no chunk text or
        vector (RagStore.totals also counts the index rows, for consistency checks)."""
        ((collections, documents, chunks),) = self.store.query(
            "SELECT (SELECT count(*) FROM collections), count(*), coalesce(sum(chunk_count), 0) "
            "FROM documents"
        )
        return {"collections": collections, "documents": documents, "chunks": chunks}

    # -- ingest ---------------------------------------------------------------------------
    async def ingest(
        self,
        collection: str,
        files: Sequence[Upload],
        *,
        chunk_size: int = 512,
        overlap: int = 64,
        embedding_model: str | None = None,
        metadata: dict[str, Any] | None = None,
        on_progress: ProgressFn | None = None,
        index: str = "auto",
    ) -> IngestResult:
        """Extract and chunk every file, embed the chunks in bounded batches, then store
        everything in one short transaction: a bad file, a budget overrun, a crash or the
        caller's cancellation leaves the collection as it was.

        Extraction runs in the sandbox's worker processes, chunking in a thread, and the
        embedding model is asked for `limits.embed_batch` chunks at a time, so a query's
        own embedding waits for one batch at most, not for the whole ingest.
        `on_progress(stage, done, total)` follows the work (see ProgressFn); the same
        steps are logged as `rag_ingest_progress` events."""
        ingest_started = time.perf_counter()
        progress = _Progress(collection, on_progress)
        check_collection_name(collection)
        if not files:
            raise InvalidRequest("no files were uploaded", param="files")
        if chunk_size < MIN_CHUNK:
            raise InvalidRequest(f"chunk_size must be at least {MIN_CHUNK}", param="chunk_size")
        if not 0 <= overlap < chunk_size:
            raise InvalidRequest("overlap must be >= 0 and below chunk_size", param="overlap")
        # Before extraction and embedding, not only at the store's write.
        check_index_kind(index)
        metadata = check_metadata(metadata or {}, self.limits)
        model_id = await asyncio.to_thread(self.embedding_model, collection, embedding_model)
        model = self.models.get(model_id).model
        usable = model.max_seq_length - model.special_tokens  # type: ignore[attr-defined]
        size = min(chunk_size, usable)
        step_overlap = min(overlap, size // 2)
        # Tells the chunking thread to stop when this coroutine is cancelled (the client
        # left): a thread cannot be cancelled, it can only be asked.
        stop = threading.Event()
        try:
            prepared = await self._prepare(
                collection, files, size, step_overlap, model, metadata, stop, progress
            )
            new = [p.document for p in prepared if p.document is not None]
            started = time.perf_counter()
            matrices = await self._embed_chunks(model_id, new, progress.stage("embed"))
            embedding_ms = round((time.perf_counter() - started) * 1000, 3)
        except asyncio.CancelledError:
            stop.set()
            raise
        documents = [replace(d, vectors=m) for d, m in zip(new, matrices, strict=True)]
        ids = await asyncio.to_thread(
            self.db.ingest,
            collection,
            embedding_model=model_id,
            dimension=matrices[0].shape[1] if matrices else model.dimension,  # type: ignore[attr-defined]
            chunk_size=size,
            overlap=step_overlap,
            collection_metadata=metadata,
            documents=documents,
            on_progress=progress.stage("store"),
            index_kind=index,
        )
        stored = dict(zip((d.content_hash for d in documents), ids, strict=True))
        document_ids = []
        for p in prepared:
            known = stored.get(p.content_hash)
            if known is None:
                known = await asyncio.to_thread(
                    self.db.document_by_hash, collection, p.content_hash
                )
            document_ids.append(known)
        clamped = size != chunk_size or step_overlap != overlap
        chunks = sum(len(d.chunks) for d in documents)
        self.models.metrics.observe_ingest(
            len(documents), chunks, time.perf_counter() - ingest_started
        )
        return IngestResult(
            collection=collection,
            documents_ingested=len(documents),
            chunks_created=chunks,
            embedding_time_ms=embedding_ms,
            document_ids=document_ids,
            embedding_model=model_id,
            chunk_size=size,
            overlap=step_overlap,
            duplicates=[p.upload.filename for p in prepared if p.document is None],
            warnings=[
                f"chunk_size {chunk_size} / overlap {overlap} clamped to {size} / {step_overlap}: "
                f"'{model_id}' reads at most {usable} tokens per chunk"
            ]
            if clamped
            else [],
        )

    async def _prepare(
        self,
        collection: str,
        files: Sequence[Upload],
        size: int,
        overlap: int,
        model: Any,
        metadata: dict[str, Any],
        stop: threading.Event,
        progress: _Progress,
    ) -> list[_Prepared]:
        """Extract and chunk every file before anything is embedded or stored, so one
        bad file fails the request with nothing written. A file already in the
        collection (or earlier in this request) is neither extracted nor chunked again."""
        out: list[_Prepared] = []
        seen: set[str] = set()
        on_progress = progress.stage("extract")
        for done, upload in enumerate(files, 1):
            digest = await asyncio.to_thread(_digest, upload.data)
            duplicate = (
                digest in seen
                or (await asyncio.to_thread(self.db.document_by_hash, collection, digest))
                is not None
            )
            if duplicate:
                out.append(_Prepared(upload, digest, None))
                on_progress(done, len(files))
                continue
            seen.add(digest)
            extracted = await self._extract(upload)
            chunks = await asyncio.to_thread(
                self._chunk, upload.filename, extracted, model.token_offsets, size, overlap, stop
            )
            document = NewDocument(
                document_id=f"doc-{uuid.uuid4().hex[:12]}",
                filename=upload.filename,
                content_hash=digest,
                format=extracted.format,
                title=extracted.title,
                metadata=metadata,
                chunks=chunks,
                vectors=[],
            )
            out.append(_Prepared(upload, digest, document))
            on_progress(done, len(files))
        return out

    async def _extract(self, upload: Upload) -> Extracted:
        """`extract` in a sandbox worker, under the time and memory budgets."""
        name = upload.filename or "(unnamed file)"
        limits = self.limits
        payload = {
            "filename": upload.filename,
            "data": upload.data,
            "content_type": upload.content_type,
            "limits": asdict(limits.extract),
        }
        try:
            answer = await shared_sandbox("documents").call(
                EXTRACT_TARGET,
                payload,
                timeout_s=limits.extract_timeout_s,
                memory_mb=limits.extract_memory_mb,
            )
        except SandboxTimeout:
            raise _too_large(
                name,
                f"extraction took longer than {limits.extract_timeout_s:g} s",
                "rag_extract_timeout_s",
            ) from None
        except SandboxMemoryError:
            raise _too_large(
                name,
                f"extraction needed more than {limits.extract_memory_mb} MB",
                "rag_extract_memory_mb",
            ) from None
        except SandboxError as exc:  # the extractor crashed on hostile input: still a 400
            log.warning("rag.extract.failed", file=name, error=exc.message)
            raise InvalidRequest(
                f"{name}: the document could not be read ({exc.message})",
                param="files",
                code=ErrorCode.INVALID_DOCUMENT,
                details={"file": name},
            ) from None
        return extracted_from_payload(name, answer)

    def _chunk(
        self,
        filename: str,
        extracted: Extracted,
        tokenize: Tokenize,
        size: int,
        overlap: int,
        stop: threading.Event,
    ) -> list[Chunk]:
        limit = self.limits.max_chunks
        try:
            return chunk_sections(
                extracted.sections, tokenize, size, overlap, max_chunks=limit, stop=stop
            )
        except TooManyChunks:
            raise _too_large(
                filename or "(unnamed file)",
                f"it makes more than {limit:,} chunks",
                "rag_max_document_chunks",
            ) from None

    async def _embed_chunks(
        self,
        model_id: str,
        documents: list[NewDocument],
        on_progress: Callable[[int, int], None],
    ) -> list[np.ndarray]:
        """One float32 matrix per document (4 bytes a dimension, not a list of Python
        floats), from model calls of at most `limits.embed_batch` chunks."""
        batch = self.limits.embed_batch
        total = sum(len(d.chunks) for d in documents)
        done = 0
        on_progress(0, total)
        out: list[np.ndarray] = []
        for document in documents:
            rows: list[np.ndarray] = []
            for start in range(0, len(document.chunks), batch):
                texts = [c.text for c in document.chunks[start : start + batch]]
                result = await self.models.embed(model_id, texts)
                rows.append(np.asarray(result.vectors, dtype=np.float32))
                done += len(texts)
                on_progress(done, total)
            out.append(np.concatenate(rows))
        return out

    # -- search and query -----------------------------------------------------------------
    def compile_filter(self, metadata_filter: Any) -> SqlFilter | None:
        """A request's `filter` checked and compiled (400, param "filter", when malformed)."""
        return compile_filter(metadata_filter, self.limits.filter)

    async def search(
        self,
        collection: str,
        *,
        query: str | None = None,
        vector: Sequence[float] | None = None,
        embedding_model: str | None = None,
        top_k: int = 5,
        threshold: float = 0.0,
        hybrid: bool = False,
        metadata_filter: Any = None,
    ) -> list[Hit]:
        """Retrieval without generation, by exactly one of: ``query`` text (embedded with
        the collection's model; ``hybrid`` fuses BM25 matches by reciprocal rank fusion),
        or ``vector``, a query the caller embedded, of the collection's dimension.
        ``metadata_filter`` (a filter object, docs/rag.md "Filters") restricts the search
        to the chunks it matches."""
        if (query is None) == (vector is None):
            raise InvalidRequest("give either a query text or a query vector", param="query")
        where = self.compile_filter(metadata_filter)
        started = time.perf_counter()
        if query is not None:
            if not query.strip():
                raise InvalidRequest("query must not be empty", param="query")
            embedder = await asyncio.to_thread(
                self.collection_embedder, collection, embedding_model
            )
            hits = await self.retriever.retrieve(
                collection,
                query,
                embedder,
                top_k=top_k,
                threshold=threshold,
                rerank=hybrid,
                where=where,
            )
            self.models.metrics.observe_rag_query("search", time.perf_counter() - started)
            return hits
        assert vector is not None
        if hybrid:
            raise InvalidRequest(
                "hybrid search matches the query's words: give the query text, not a vector",
                param="hybrid",
            )
        info = await asyncio.to_thread(self.db.collection, collection)
        if embedding_model is not None and embedding_model != info.embedding_model:
            raise InvalidRequest(
                f"collection '{collection}' was embedded with '{info.embedding_model}', "
                f"not '{embedding_model}'",
                param="embedding_model",
                code=ErrorCode.EMBEDDING_MODEL_MISMATCH,
            )
        if len(vector) != info.dimension:
            raise InvalidRequest(
                f"the query vector has {len(vector)} dimensions; collection '{collection}' "
                f"holds {info.dimension}-dimensional vectors of '{info.embedding_model}'",
                param="query_embedding",
                code=ErrorCode.DIMENSION_MISMATCH,
            )
        hits = await self.retriever.by_vector(
            collection, vector, top_k=top_k, threshold=threshold, where=where
        )
        self.models.metrics.observe_rag_query("search", time.perf_counter() - started)
        return hits

    # -- query ----------------------------------------------------------------------------
    async def query(
        self,
        query: str,
        *,
        collection: str = "default",
        top_k: int = 5,
        model_id: str | None = None,
        embedding_model: str | None = None,
        include_sources: bool = True,
        similarity_threshold: float = 0.7,
        rerank: bool = False,
        rerank_model: str | None = None,
        generation_config: dict[str, Any] | None = None,
        metadata_filter: Any = None,
    ) -> QueryResult:
        if not query.strip():
            raise InvalidRequest("query must not be empty", param="query")
        where = self.compile_filter(metadata_filter)
        started = time.perf_counter()
        embedder = await asyncio.to_thread(self.collection_embedder, collection, embedding_model)
        if rerank and rerank_model:
            self.models.require(
                rerank_model, serving(Operation.RELEVANCE), "rerank_model", param="rerank_model"
            )
        if model_id:
            self.models.require(model_id, serving(Operation.CHAT), "model_id")
        hits = await self.retriever.retrieve(
            collection,
            query,
            embedder,
            top_k=top_k,
            threshold=similarity_threshold,
            rerank=rerank,
            rerank_model=rerank_model,
            where=where,
        )
        retrieval_ms = (time.perf_counter() - started) * 1000
        generator = model_id or self.models.select("lm")
        if generator is None:
            raise ServiceUnavailable(
                "no chat model is loaded to answer: load a model of type 'lm' or pass model_id",
                param="model_id",
                code=ErrorCode.MODEL_NOT_LOADED,
            )
        params = ChatParams.from_options(generation_config or {}, param="generation_config")
        gen_started = time.perf_counter()
        answer = await self.models.chat(generator, answer_messages(query, hits), params)
        generation_ms = (time.perf_counter() - gen_started) * 1000
        self.models.metrics.observe_rag_query("query", time.perf_counter() - started)
        return QueryResult(
            answer=answer.content.strip(),
            sources=list(hits) if include_sources else None,
            retrieval_latency_ms=round(retrieval_ms, 3),
            generation_latency_ms=round(generation_ms, 3),
            total_latency_ms=round((time.perf_counter() - started) * 1000, 3),
            collection=collection,
            top_k=top_k,
            model_id=generator,
            embedding_model=embedder,
            rerank=rerank,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
        )


def hit_json(hit: Any) -> dict[str, Any]:
    out = {"chunk_id": hit.chunk_id, "text": hit.text, "score": round(hit.score, 6)}
    if getattr(hit, "rerank_score", None) is not None:
        out["rerank_score"] = round(hit.rerank_score, 6)
    out["metadata"] = hit.metadata
    return out
