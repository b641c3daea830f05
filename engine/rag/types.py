"""The RAG provider's records, shared by extraction, chunking, the store and the service."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Section:
    """A run of extracted text with where it came from."""

    text: str
    page: int | None = None  # 1-based, for paged formats (PDF)
    heading: str | None = None  # the enclosing heading path, e.g. "Install > Linux"


@dataclass(frozen=True)
class Extracted:
    format: str  # pdf | html | markdown | text
    title: str | None
    sections: list[Section]


@dataclass(frozen=True)
class Chunk:
    index: int  # position in the document, 0-based
    text: str
    token_count: int  # in the embedding model's own tokens
    page: int | None = None
    heading: str | None = None


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    embedding_model: str
    dimension: int
    chunk_size: int
    overlap: int
    metadata: dict[str, Any]
    created_at: str
    updated_at: str
    document_count: int
    chunk_count: int


@dataclass(frozen=True)
class DocumentInfo:
    document_id: str
    filename: str
    content_hash: str
    chunk_count: int
    ingested_at: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NewDocument:
    """A document ready to store: its chunks and one unit vector per chunk."""

    document_id: str
    filename: str
    content_hash: str
    format: str
    title: str | None
    metadata: dict[str, Any]
    chunks: list[Chunk]
    vectors: list[list[float]] | np.ndarray  # one row per chunk (the service: float32)


@dataclass(frozen=True)
class Hit:
    chunk_id: str  # "{document_id}_chunk_{n}"
    document_id: str
    text: str
    score: float  # cosine similarity in [-1, 1] for vector hits
    metadata: dict[str, Any]  # file, page, heading, document_id and the user's metadata
    rerank_score: float | None = None  # the reranker's score, when reranking ordered it


@dataclass(frozen=True)
class IngestResult:
    """What one ingest request did (spec §4.1's answer, before the server shapes it)."""

    collection: str
    documents_ingested: int
    chunks_created: int
    embedding_time_ms: float
    # One per uploaded file, duplicates included; None only when a concurrent delete removed
    # the already-stored document a duplicate pointed to.
    document_ids: list[str | None]
    embedding_model: str
    chunk_size: int  # as used: clamped to what the embedder reads
    overlap: int
    duplicates: list[str]  # filenames whose content the collection already had
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class QueryResult:
    """A RAG answer with what produced it (spec §4.2's answer, before the server shapes it)."""

    answer: str
    sources: list[Hit] | None  # None when the caller asked for no sources
    retrieval_latency_ms: float
    generation_latency_ms: float
    total_latency_ms: float
    collection: str
    top_k: int
    model_id: str
    embedding_model: str
    rerank: bool
    prompt_tokens: int
    completion_tokens: int
