"""RAG Provider API (spec §4): ingest, query, collections list/info/delete, document delete.

Thin routes over `engine.rag.service.RagService`. The one piece of HTTP work done here is
the ingest upload: it is read as a stream (server/uploads.py) so the per-file size limit
(`Settings.rag_max_file_mb`) answers 413 while the file is arriving, and Litestar's
whole-body cap is off for that route (`request_max_body_size=None`), replaced by the
per-file, file-count and field bounds. Store reads and writes are synchronous SQLite and run
in worker threads.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from typing import Annotated, Any

import msgspec
from litestar import Request, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.params import FromPath, JSONBody
from msgspec import Meta

from engine.config import Settings
from engine.errors import InvalidRequest
from engine.rag.exact_index import IndexInfo
from engine.rag.service import (
    COLLECTION_NAME,
    MIN_CHUNK,
    RagService,
    Upload,
    hit_json,
    metadata_too_deep,
)
from server.openapi_docs import error_responses
from server.uploads import UploadLimits, read_multipart

TAGS = ["rag"]
FILE_FIELDS = frozenset({"files", "files[]"})
TEXT_FIELDS = frozenset(
    {"collection", "chunk_size", "overlap", "embedding_model", "metadata", "index"}
)
MAX_TOP_K = 1000


# -- request and response bodies ------------------------------------------------------------
class IngestResponse(msgspec.Struct, kw_only=True):
    collection: str
    documents_ingested: int
    chunks_created: int
    embedding_time_ms: float
    document_ids: list[str | None]
    status: str
    # Extensions (docs/api.md).
    embedding_model: str
    chunk_size: int
    overlap: int
    duplicates: list[str]
    warnings: list[str] = []


class QueryRequest(msgspec.Struct, forbid_unknown_fields=True):
    query: Annotated[str, Meta(min_length=1)]
    collection: Annotated[str, Meta(min_length=1)] = "default"
    top_k: Annotated[int, Meta(ge=1, le=MAX_TOP_K)] = 5
    model_id: Annotated[str, Meta(min_length=1)] | None = None
    embedding_model: Annotated[str, Meta(min_length=1)] | None = None
    include_sources: bool = True
    similarity_threshold: Annotated[float, Meta(ge=-1, le=1)] = 0.7
    rerank: bool = False
    # Extension: rerank with this loaded `lm` (yes/no relevance) instead of hybrid fusion.
    rerank_model: Annotated[str, Meta(min_length=1)] | None = None
    generation_config: dict[str, Any] | None = None
    # Extension: only chunks whose metadata match (docs/rag.md "Filters"); checked by the
    # service, which answers 400 with param "filter".
    filter: dict[str, Any] | None = None


class Source(msgspec.Struct, kw_only=True, omit_defaults=True):
    chunk_id: str
    text: str
    score: float
    rerank_score: float | None = None
    # The store's keys plus the document's own metadata from ingest.
    metadata: dict[str, Any]


class QueryUsage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int


class QueryMetadata(msgspec.Struct, kw_only=True):
    collection: str
    top_k: int
    model_id: str
    embedding_model: str
    rerank: bool
    usage: QueryUsage


class QueryResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    answer: str
    sources: list[Source] | None = None  # absent when include_sources is false
    retrieval_latency_ms: float
    generation_latency_ms: float
    total_latency_ms: float
    metadata: QueryMetadata


class CollectionSummary(msgspec.Struct, kw_only=True):
    name: str
    document_count: int
    chunk_count: int
    created_at: str
    updated_at: str
    metadata: dict[str, Any]


class CollectionList(msgspec.Struct):
    collections: list[CollectionSummary]


class DocumentSummary(msgspec.Struct, kw_only=True):
    document_id: str
    filename: str
    chunk_count: int
    ingested_at: str


class IndexDetail(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How a collection's vectors are searched (extension; docs/rag.md "Exact search")."""

    kind: str  # "exact": an in-memory matrix; "hnsw": an approximate graph; "sqlite-vec": none now
    bytes: int
    vectors: int
    generation: int
    reason: str | None = None  # why "sqlite-vec"
    setting: str | None = None  # the collection's `index` option: exact, hnsw or auto

    @classmethod
    def of(cls, info: IndexInfo) -> IndexDetail:
        return cls(**asdict(info))


class CollectionDetail(msgspec.Struct, kw_only=True):
    name: str
    document_count: int
    chunk_count: int
    created_at: str
    updated_at: str
    embedding_model: str
    dimension: int  # extension
    chunk_size: int
    overlap: int
    metadata: dict[str, Any]
    documents: list[DocumentSummary]
    index: IndexDetail  # extension


class DocumentDeleted(msgspec.Struct, kw_only=True):
    collection: str
    document_id: str
    chunks_deleted: int
    status: str = "deleted"


class CollectionDeleted(msgspec.Struct, kw_only=True):
    collection: str
    documents_deleted: int
    chunks_deleted: int
    status: str = "deleted"


# -- OpenAPI for the hand-read multipart body -------------------------------------------------
def _property(kind: OpenAPIType, description: str, **extra: Any) -> Schema:
    return Schema(type=kind, description=description, **extra)


_INGEST_FORM = Schema(
    type=OpenAPIType.OBJECT,
    required=["collection", "files"],
    properties={
        "collection": Schema(
            type=OpenAPIType.STRING, description="Collection name", pattern=COLLECTION_NAME.pattern
        ),
        "files": Schema(
            type=OpenAPIType.ARRAY,
            items=Schema(type=OpenAPIType.STRING, format=OpenAPIFormat.BINARY),
            min_items=1,
            description="Documents (PDF, TXT, MD, HTML); `files[]` is accepted too",
        ),
        "chunk_size": _property(
            OpenAPIType.INTEGER, "Chunk size in model tokens", default=512, minimum=MIN_CHUNK
        ),
        "overlap": _property(
            OpenAPIType.INTEGER, "Overlap between chunks, below chunk_size", default=64, minimum=0
        ),
        "embedding_model": _property(OpenAPIType.STRING, "Embeddings model id"),
        "metadata": _property(OpenAPIType.STRING, "A JSON object, kept on every document"),
        "index": _property(
            OpenAPIType.STRING,
            "A new collection's vector index: exact, hnsw (approximate) or auto (hnsw from"
            " rag_hnsw_min_vectors vectors up)",
            default="auto",
        ),
    },
    # Another field is refused (400), as the JSON bodies refuse theirs.
    additional_properties=False,
)


@dataclass
class IngestOperation(Operation):
    """The ingest body is read by hand (streamed), so Litestar cannot infer it."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={"multipart/form-data": OpenAPIMediaType(schema=_INGEST_FORM)}, required=True
        )


# -- helpers ----------------------------------------------------------------------------------
def _limits(settings: Settings) -> UploadLimits:
    return UploadLimits(
        max_file_bytes=int(settings.rag_max_file_mb * 1_000_000),
        max_files=settings.rag_max_files,
    )


def _int_field(fields: dict[str, str], name: str, default: int) -> int:
    raw = fields.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, not {raw!r}", param=name) from None


def _metadata_field(raw: str | None, max_depth: int) -> dict[str, Any] | None:
    if raw is None or not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"metadata is not valid JSON: {exc}", param="metadata") from None
    except RecursionError:  # deeper than the parser's stack; the service checks the rest
        raise metadata_too_deep(max_depth) from None
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"metadata must be a JSON object, not {type(value).__name__}", param="metadata"
        )
    return value


# -- routes -------------------------------------------------------------------------------------
@post(
    "/api/rag/ingest",
    status_code=200,
    tags=TAGS,
    summary="Ingest documents into a collection (§4.1)",
    description="multipart/form-data; each file is limited in size while it is read (413).",
    request_max_body_size=None,  # bounded per file and per field in server/uploads.py
    operation_class=IngestOperation,
    responses=error_responses(400, 404, 413, 429, 503),
)
async def ingest(
    request: Request[Any, Any, Any],
    rag: NamedDependency[RagService],
    settings: NamedDependency[Settings],
) -> IngestResponse:
    # 503 before reading a large upload when there is nothing to embed it with.
    await asyncio.to_thread(rag.embedding_model, None, None)
    form = await read_multipart(
        request, _limits(settings), file_fields=FILE_FIELDS, text_fields=TEXT_FIELDS
    )
    fields = form.fields
    collection = fields.get("collection", "").strip()
    if not collection:
        raise InvalidRequest("the form field 'collection' is required", param="collection")
    if not form.files:
        raise InvalidRequest("upload at least one file in the form field 'files'", param="files")
    result = await rag.ingest(
        collection,
        [Upload(f.filename, f.data, f.content_type) for f in form.files],
        chunk_size=_int_field(fields, "chunk_size", 512),
        overlap=_int_field(fields, "overlap", 64),
        embedding_model=fields.get("embedding_model", "").strip() or None,
        metadata=_metadata_field(fields.get("metadata"), rag.limits.metadata_max_depth),
        index=fields.get("index", "").strip() or "auto",
    )
    return IngestResponse(**asdict(result), status="completed")


@post(
    "/api/rag/query",
    status_code=200,
    tags=TAGS,
    summary="RAG query (§4.2)",
    responses=error_responses(400, 404, 429, 503, 504),
)
async def query(rag: NamedDependency[RagService], data: JSONBody[QueryRequest]) -> QueryResponse:
    if data.rerank_model is not None and not data.rerank:
        raise InvalidRequest("rerank_model needs rerank: true", param="rerank_model")
    result = await rag.query(
        data.query,
        collection=data.collection,
        top_k=data.top_k,
        model_id=data.model_id,
        embedding_model=data.embedding_model,
        include_sources=data.include_sources,
        similarity_threshold=data.similarity_threshold,
        rerank=data.rerank,
        rerank_model=data.rerank_model,
        generation_config=data.generation_config,
        metadata_filter=data.filter,
    )
    return QueryResponse(
        answer=result.answer,
        sources=None
        if result.sources is None
        else [msgspec.convert(hit_json(hit), Source) for hit in result.sources],
        retrieval_latency_ms=result.retrieval_latency_ms,
        generation_latency_ms=result.generation_latency_ms,
        total_latency_ms=result.total_latency_ms,
        metadata=QueryMetadata(
            collection=result.collection,
            top_k=result.top_k,
            model_id=result.model_id,
            embedding_model=result.embedding_model,
            rerank=result.rerank,
            usage=QueryUsage(
                prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens
            ),
        ),
    )


@get("/api/rag/collections", tags=TAGS, summary="List collections (§4.3)")
async def list_collections(rag: NamedDependency[RagService]) -> CollectionList:
    found = await asyncio.to_thread(rag.db.list_collections)
    return CollectionList(
        collections=[
            CollectionSummary(
                name=c.name,
                document_count=c.document_count,
                chunk_count=c.chunk_count,
                created_at=c.created_at,
                updated_at=c.updated_at,
                metadata=c.metadata,
            )
            for c in found
        ]
    )


@get(
    "/api/rag/collections/{collection_name:str}",
    tags=TAGS,
    summary="Collection info (§4.4)",
    responses=error_responses(400, 404),
)
async def collection_info(
    rag: NamedDependency[RagService], collection_name: FromPath[str]
) -> CollectionDetail:
    db = rag.db

    def read() -> CollectionDetail:
        # One thread, so info and documents come from the same connection.
        info = db.collection(collection_name)
        documents = db.documents(collection_name)
        index = db.index_info(collection_name)
        return CollectionDetail(
            name=info.name,
            document_count=info.document_count,
            chunk_count=info.chunk_count,
            created_at=info.created_at,
            updated_at=info.updated_at,
            embedding_model=info.embedding_model,
            dimension=info.dimension,
            chunk_size=info.chunk_size,
            overlap=info.overlap,
            metadata=info.metadata,
            documents=[
                DocumentSummary(
                    document_id=d.document_id,
                    filename=d.filename,
                    chunk_count=d.chunk_count,
                    ingested_at=d.ingested_at,
                )
                for d in documents
            ],
            index=IndexDetail.of(index),
        )

    return await asyncio.to_thread(read)


@delete(
    "/api/rag/documents/{collection:str}/{document_id:str}",
    status_code=200,
    tags=TAGS,
    summary="Delete a document (§4.5)",
    responses=error_responses(400, 404),
)
async def delete_document(
    rag: NamedDependency[RagService], collection: FromPath[str], document_id: FromPath[str]
) -> DocumentDeleted:
    db = rag.db
    chunks = await asyncio.to_thread(db.delete_document, collection, document_id)
    return DocumentDeleted(collection=collection, document_id=document_id, chunks_deleted=chunks)


@delete(
    "/api/rag/collections/{collection_name:str}",
    status_code=200,
    tags=TAGS,
    summary="Delete a collection (§4.6)",
    responses=error_responses(400, 404, 409),
)
async def delete_collection(
    rag: NamedDependency[RagService], collection_name: FromPath[str]
) -> CollectionDeleted:
    db = rag.db
    documents, chunks = await asyncio.to_thread(db.delete_collection, collection_name)
    return CollectionDeleted(
        collection=collection_name, documents_deleted=documents, chunks_deleted=chunks
    )


ROUTES = [ingest, query, list_collections, collection_info, delete_document, delete_collection]
