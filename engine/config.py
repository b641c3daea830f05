"""Settings: defaults, overridden by fusion.yaml, then FUSION_* environment variables,
then explicit keyword arguments (the CLI's flags)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

_ENV_PREFIX = "FUSION_"


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    # Host header names (optionally name:port) the server answers; None: the bind address
    # and the localhost names. ["*"] turns the check off (DNS rebinding, server/guards.py).
    allowed_hosts: list[str] | None = None
    # Origins whose browser requests are let in, with CORS headers; [] refuses every
    # cross-origin request (403). Entries may use "*" as Litestar's CORSConfig allows.
    cors_allow_origins: list[str] = field(default_factory=list)
    # Deepest nesting of arrays and objects a JSON request body may have (400 beyond).
    max_json_depth: int = 64
    # Seconds `fusion serve` waits for in-flight requests on shutdown before cancelling them.
    shutdown_timeout_s: int = 5
    data_dir: Path = Path("data")
    # /health says "degraded" when the database has less room to grow than this (its file
    # system's free space); with no room at all, or a failed write, it answers 503.
    store_min_free_mb: float = 64
    workflows_dir: Path = Path("workflows")
    # Seconds between looks at workflows_dir for new, changed and deleted files while the
    # engine runs (engine/fusion/reload.py); 0 turns reloading off.
    workflows_reload_interval_s: float = 1.0
    log_format: str = "console"  # console | json
    log_level: str = "info"
    max_parallel_steps: int = 16
    max_workflow_depth: int = 8
    # Per-run budgets (engine/runtime/executor.py RunLimits): step executions in a run and
    # the child runs it starts (each step, for_each item and repeat pass counts one), items
    # one for_each may map, JSON bytes of one step's output and of the run's output.
    run_max_steps: int = 10_000
    run_max_for_each_items: int = 10_000
    run_max_step_output_bytes: int = 16_777_216
    run_max_output_bytes: int = 16_777_216
    # Children one trace entry records (a for_each step's items, a repeat step's passes, a
    # workflow step's sub-run steps); beyond it they are counted in `children_omitted`,
    # and send no step_started/step_finished events.
    trace_max_children: int = 1000
    # Stored runs (GET /api/fusion/runs/{id}): how many are kept (oldest deleted first) and
    # the largest record one may have; a run over it is answered with stored: false.
    runs_max_stored: int = 10_000
    runs_max_stored_bytes: int = 33_554_432
    # A run's input or result (output), or a step's stored rendered input or output
    # (`?include=io`), larger than this (bytes of JSON) is stored as a {"$truncated": true,
    # ...} marker (docs/api.md); the orchestrate answer keeps it whole.
    runs_max_field_bytes: int = 1_048_576
    # Runs created more than runs_max_age_days ago are purged (0 keeps them forever), at
    # start-up and every runs_purge_interval_s seconds (engine/fusion/run_history.py).
    runs_max_age_days: float = 30
    runs_purge_interval_s: float = 3600
    # Live runs (engine/fusion/live.py): a running run's stored row is rewritten at most
    # once per runs_update_interval_s (seconds) as its steps finish, plus once at its end;
    # events kept in memory per run for late joiners of GET /api/fusion/runs/{id}/events
    # (beyond it the oldest token events go first), which also bounds each subscriber's
    # queue (a client that falls that far behind is dropped with an `error` event).
    runs_update_interval_s: float = 0.5
    run_events_max: int = 10_000
    # The sandbox (engine/sandbox.py): worker processes for templates outside the linear
    # subset, non-linear input schemas and document extraction, and the wall-clock seconds
    # and memory one template render / one input validation may use there.
    sandbox_workers: int = 2
    template_timeout_s: float = 5.0
    template_memory_mb: int = 256
    schema_timeout_s: float = 2.0
    schema_memory_mb: int = 256
    # Models. None budget: a share of device or system memory (engine.models.memory).
    model_memory_budget_gb: float | None = None
    # Requests a model serves at once unless its load sets max_concurrency: language
    # models decode up to model_max_batch sequences together (continuous batching,
    # engine/models/decoding.py); other types take model_max_concurrency, and their
    # requests share the one MLX worker thread in turn.
    model_max_concurrency: int = 1
    model_max_batch: int = 32
    model_max_queue: int = 100
    # A language model's prefix cache: KV caches of recent prompts and answers, which later
    # prompts sharing a prefix start from (MB per model, least recently used evicted; 0
    # turns it off).
    model_prompt_cache_mb: float = 512
    # Chunks a streaming reader may fall behind before its sequence leaves the batch (it
    # rejoins, where it stopped, when the reader has caught up half of them).
    model_stream_backlog_chunks: int = 64
    # Embedding requests that wait while a pass of their model runs share the next pass,
    # up to this many texts in all (engine/models/batching.py); a larger request goes alone.
    # An embeddings model admits at least this many requests at once (model_max_concurrency
    # otherwise, or the load's max_concurrency): admitted requests are what passes group.
    model_embed_batch_max_texts: int = 64
    # Longest model id a load may set or a request may name (engine/models/ids.py).
    model_id_max_chars: int = 256
    # Characters of text in one chat, warmup or count_tokens input, refused (400) before
    # tokenizing.
    model_max_prompt_chars: int = 1_000_000
    # Largest warmup max_length; the prompt is also cut to the model's context length.
    model_warmup_max_tokens: int = 4096
    # Prompt tokens per prefill forward pass (mlx-lm's prefill_step_size).
    model_prefill_step_tokens: int = 2048
    # Models loaded at start-up, each a /v1/models/load body. None: the demo setup (the
    # MiniLM embedder when installed and a tiny random-weight chat model); [] loads none.
    startup_models: list[dict[str, Any]] | None = None
    # Where multimodal requests may read image files from; None: no local files.
    image_root: Path | None = None
    # Outbound fetches (image URLs, webhooks) to private and loopback addresses.
    allow_private_urls: bool = False
    # Largest image a multimodal request may send (data: URI, file or URL).
    image_max_mb: float = 20
    # Total deadline for fetching one image URL, redirects and a slow body included.
    image_fetch_timeout_s: float = 10
    # RAG ingest uploads: the size limit of each file (spec §4.1: 10 MB), enforced while the
    # upload is read, and the most files one request may carry.
    rag_max_file_mb: float = 10
    rag_max_files: int = 100
    # RAG ingest budgets per document (docs/security.md); exceeding one answers 413.
    rag_max_document_chars: int = 5_000_000  # extracted characters
    rag_max_document_chunks: int = 10_000  # chunks after splitting
    rag_max_pdf_pages: int = 2_000
    rag_max_pdf_page_chars: int = 100_000  # extracted characters of one PDF page
    rag_max_html_depth: int = 512  # element nesting (parsing is quadratic in it)
    # Extraction runs in a sandbox worker under these budgets (timeout or memory: 413).
    rag_extract_timeout_s: float = 30.0
    rag_extract_memory_mb: int = 1024
    # Chunks embedded per model call: a query waits for at most one such call of an ingest.
    rag_embed_batch: int = 32
    # Ingest `metadata` (copied onto every document): its JSON nesting depth and size.
    rag_metadata_max_depth: int = 16
    rag_metadata_max_bytes: int = 16_384
    # Memory for in-memory vector search (engine/rag/exact_index.py): all collections'
    # float32 matrices (n vectors x (dimension x 4 + 8) bytes) and HNSW graphs (n x
    # (dimension x 2 + 576) bytes: 1.3 GB for 1M x 384) together stay under this many MiB;
    # a collection that cannot fit is searched through sqlite-vec (slower), and least
    # recently searched indexes make room. 0: always sqlite-vec.
    rag_index_max_mb: int = 2048
    # Collections with `index: auto` (the default) are searched through an approximate HNSW
    # graph (engine/rag/hnsw_index.py) from this many vectors up, exactly below: an exact
    # top-10 over 200k x 384 float32 takes ~10-30 ms on 2 cores, the graph ~1 ms.
    rag_hnsw_min_vectors: int = 200_000
    # An HNSW graph patched by an ingest or delete is saved to its file (rag-index/ beside
    # the database) at most this many seconds after its first unsaved change, and when the
    # server stops: writing a million-vector graph takes seconds. A crash loses only the
    # file's recent changes, which the next load takes from SQLite. 0: after every change.
    rag_hnsw_save_delay_s: float = 30.0
    # Metadata filters on retrieval (docs/rag.md "Filters"): the most conditions one filter
    # may hold (each operator on a field counts one) and the most values in one $in or $nin
    # list. Past either: 400 with param "filter".
    rag_filter_max_terms: int = 64
    rag_filter_max_values: int = 1024
    # /v1/audio/transcriptions: the size limit of the uploaded file (OpenAI's is 25 MB).
    audio_max_file_mb: float = 25
    # Workflow documents (files, compose bodies, custom definitions): the most bytes of
    # text, nesting levels, and values (YAML aliases counted as expanded) one may hold.
    workflow_max_bytes: int = 1_048_576
    workflow_max_depth: int = 64
    workflow_max_nodes: int = 100_000
    # The job queue (spec §5, engine/jobs): jobs waiting before submit answers 429
    # queue_full (with Retry-After: jobs_retry_after_s), claims before a job whose worker
    # keeps being lost ends failed, seconds of priority aging (a low job waits behind high
    # ones submitted at most 2 * jobs_aging_s after it), a claim's lease (renewed by
    # heartbeats every third of it), workflow jobs run at once, and how long finished jobs
    # are kept. jobs_enabled false: /api/mcp answers 404 and no worker runs.
    jobs_enabled: bool = True
    jobs_max_queued: int = 10_000
    jobs_max_attempts: int = 3
    jobs_aging_s: float = 30.0
    jobs_lease_s: float = 30.0
    jobs_retry_after_s: int = 5
    jobs_workflow_concurrency: int = 2
    jobs_retention_hours: float = 24.0
    jobs_metadata_max_bytes: int = 16_384
    # Webhook deliveries (spec §5.8): the deadline of one attempt, attempts per delivery
    # (exponential backoff from base to max seconds, with jitter, Retry-After honoured),
    # consecutive failed attempts after which a webhook is disabled, and deliveries in
    # flight at once. Outbound URLs obey allow_private_urls.
    webhook_timeout_s: float = 10.0
    webhook_max_attempts: int = 8
    webhook_backoff_base_s: float = 1.0
    webhook_backoff_max_s: float = 600.0
    webhook_disable_after_failures: int = 20
    webhook_max_concurrency: int = 4
    # Registered webhooks at most (409 beyond): each job event writes a delivery per webhook.
    webhook_max_count: int = 100
    # API keys (issue #11): name -> the key, or "sha256:<hex>" of it. Empty: no key needed;
    # otherwise every route but /health* needs `Authorization: Bearer <key>` (401).
    api_keys: dict[str, str] = field(default_factory=dict)
    # Rate limits (spec §8) per client and endpoint group, written as the `limits` package
    # parses them ("10/minute"); a group set to null is not limited. Groups: models
    # (/v1/models), fusion (/api/fusion), rag (/api/rag), mcp (/api/mcp), inference (the
    # OpenAI endpoints, not in the spec's table).
    rate_limit_enabled: bool = True
    rate_limits: dict[str, str | None] = field(
        default_factory=lambda: {
            "models": "10/minute",
            "fusion": "60/minute",
            "rag": "30/minute",
            "mcp": "100/minute",
            "inference": None,
        }
    )
    # Proxies (addresses or networks) whose X-Forwarded-For names the client; [] uses the
    # peer address only.
    trusted_proxies: list[str] = field(default_factory=list)
    # /internal/diagnostics: recent errors kept (those of the last 24 h, at most this many).
    diagnostics_max_errors: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "fusion.sqlite3"

    @classmethod
    def load(cls, config_file: Path | None = None, **overrides: Any) -> Settings:
        values: dict[str, Any] = {}
        path = config_file or Path(os.environ.get(f"{_ENV_PREFIX}CONFIG", "fusion.yaml"))
        if path.is_file():
            loaded = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of settings")
            values.update(loaded)
        for f in fields(cls):
            env = os.environ.get(f"{_ENV_PREFIX}{f.name.upper()}")
            if env is not None:
                values[f.name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})


def _coerce(cls: type[Settings], name: str, value: Any) -> Any:
    """Values from the environment arrive as strings: convert by the field's declared type."""
    kind = str(next(f for f in fields(cls) if f.name == name).type)
    if value is None or not isinstance(value, str):
        return Path(value) if "Path" in kind and value is not None else value
    if "Path" in kind:
        return Path(value)
    if kind.startswith("bool"):
        return value.lower() in {"1", "true", "yes", "on"}
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    if kind.startswith(("list", "dict")):
        return json.loads(value)
    return value
