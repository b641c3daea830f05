"""What a model backend provides. Backend methods run on the MLX worker thread and may
block; the registry calls them through engine.models.worker.MLXWorker."""

from __future__ import annotations

import importlib.util
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import structlog

from engine.config import Settings
from engine.errors import ErrorCode, InvalidRequest
from engine.models.types import Capability, ModelType, Operation

log = structlog.get_logger(__name__)

# Files one of which holds a Hugging Face tokenizer's vocabulary. Without any of them
# transformers builds an empty tokenizer that loads but fails on first use.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.tiktoken",
    "tiktoken.model",
)


@dataclass(frozen=True)
class ChatDefaults:
    """The generation defaults of one API, for the options a request leaves out."""

    max_tokens: int
    temperature: float
    top_p: float = 1.0


# Fusion's own APIs: a model_call step's input, the RAG API's generation_config.
FUSION_CHAT_DEFAULTS = ChatDefaults(max_tokens=512, temperature=0.7)
# /v1/chat/completions: OpenAI's documented temperature, so clients written for OpenAI
# sample as they expect; a bounded length, since OpenAI's "up to the context" would let an
# omitted field hold a model slot for the whole context.
OPENAI_CHAT_DEFAULTS = ChatDefaults(max_tokens=256, temperature=1.0)


@dataclass
class ChatParams:
    max_tokens: int = FUSION_CHAT_DEFAULTS.max_tokens
    temperature: float = FUSION_CHAT_DEFAULTS.temperature
    top_p: float = FUSION_CHAT_DEFAULTS.top_p
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    tools: list[dict[str, Any]] | None = None

    OPTIONS: ClassVar[tuple[str, ...]] = ("max_tokens", "temperature", "top_p", "stop", "seed")

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, param: str) -> ChatParams:
        """Generation options as callers write them (the RAG API's ``generation_config``,
        a ``model_call`` step's input): ``max_tokens``, ``temperature``, ``top_p`` (their
        defaults FUSION_CHAT_DEFAULTS), ``stop`` (a string or a list) and ``seed``. Anything
        else is refused, naming ``param``."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise InvalidRequest(
                f"unknown {param} key(s): {', '.join(unknown)} "
                f"(known: {', '.join(sorted(cls.OPTIONS))})",
                param=param,
            )
        stop = options.get("stop") or []
        seed = options.get("seed")
        try:
            return cls(
                max_tokens=int(options.get("max_tokens", FUSION_CHAT_DEFAULTS.max_tokens)),
                temperature=float(options.get("temperature", FUSION_CHAT_DEFAULTS.temperature)),
                top_p=float(options.get("top_p", FUSION_CHAT_DEFAULTS.top_p)),
                stop=[stop] if isinstance(stop, str) else [str(s) for s in stop],
                seed=None if seed is None else int(seed),
            )
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"invalid {param}: {exc}", param=param) from None


@dataclass
class ChatChunk:
    """A piece of generated text; the last chunk carries the finish reason and counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV cache came from the prefix cache


@dataclass
class ChatResult:
    content: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class EmbedResult:
    vectors: list[list[float]]
    prompt_tokens: int
    truncated: list[bool]


class LoadedModel:
    """A model in memory. ``weight_bytes`` is what its parameters occupy."""

    model_type: ModelType
    family: str | None = None
    context_length: int | None = None
    weight_bytes: int = 0
    capabilities: frozenset[str] = frozenset()

    def chat_stream(
        self, messages: Sequence[dict[str, Any]], params: ChatParams, stop: threading.Event
    ) -> Iterator[ChatChunk]:
        raise InvalidRequest(
            f"a '{self.model_type}' model does not chat", code=ErrorCode.UNSUPPORTED
        )

    def embed(self, texts: Sequence[str], stop: threading.Event) -> EmbedResult:
        raise InvalidRequest(
            f"a '{self.model_type}' model does not embed", code=ErrorCode.UNSUPPORTED
        )

    def warmup(self, prompt: str, max_length: int) -> int:
        """Run a prefill of ``prompt`` (at most ``max_length`` tokens); tokens processed."""
        raise InvalidRequest(
            f"a '{self.model_type}' model has no warmup", code=ErrorCode.UNSUPPORTED
        )

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text``. Tokenizer work only, so callers may run it in any thread."""
        raise InvalidRequest(
            f"a '{self.model_type}' model has no tokenizer", code=ErrorCode.UNSUPPORTED
        )

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of each of ``text``'s tokens, special tokens excluded: what
        chunking counts. Tokenizer work only, so callers may run it in any thread."""
        raise InvalidRequest(
            f"a '{self.model_type}' model has no tokenizer", code=ErrorCode.UNSUPPORTED
        )

    def relevance(self, query: str, documents: Sequence[str], instruction: str) -> list[float]:
        """Relevance of each document to the query in [0, 1] (reranking)."""
        raise InvalidRequest(
            f"a '{self.model_type}' model cannot rerank", code=ErrorCode.UNSUPPORTED
        )

    def transcribe(self, audio: Any, language: str | None, stop: threading.Event) -> dict[str, Any]:
        """Text of ``audio`` (float32, mono, 16 kHz samples)."""
        raise InvalidRequest(
            f"a '{self.model_type}' model cannot transcribe", code=ErrorCode.UNSUPPORTED
        )

    def close(self) -> None:
        """Drop references to arrays so their memory can be reclaimed."""


class Backend(ABC):
    """The loader of one model type, and the declaration of what its models can do: the
    single source the tables of types are derived from (engine/models/backends/__init__.py)."""

    model_type: ClassVar[ModelType]
    # What every model of the type can do (spec §3.3), the one that defines it first: that
    # one is the type's tag in model listings. A model may find more (tool_calling).
    capabilities: ClassVar[tuple[Capability, ...]]
    operations: ClassVar[frozenset[Operation]] = frozenset()
    package: ClassVar[str]  # the pip package that provides it, named in 'backend_unavailable'
    module: ClassVar[str] = ""  # the module it imports; found without importing it
    # Whether model_path names files the load reads; when not (echo), it is only a label.
    reads_files: ClassVar[bool] = True

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """The backend as the server's settings configure it."""
        return cls()

    def available(self) -> bool:
        return bool(self.module) and importlib.util.find_spec(self.module) is not None

    def unavailable_reason(self) -> str:
        return f"install the '{self.package}' package to load this type"

    @abstractmethod
    def load(self, path: Path, context_length: int | None) -> LoadedModel: ...


def hf_token_offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Token spans from a Hugging Face fast tokenizer (slow ones cannot report them)."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise InvalidRequest(
            "this model's tokenizer cannot report token offsets (it is not a fast tokenizer)",
            code=ErrorCode.UNSUPPORTED,
        ) from None
    return [(int(a), int(b)) for a, b in encoded["offset_mapping"]]


def read_config(path: Path) -> dict[str, Any]:
    config = path / "config.json"
    if not config.is_file():
        raise InvalidRequest(
            f"model_path '{path}' has no config.json: not a model directory",
            param="model_path",
            code=ErrorCode.INVALID_MODEL_PATH,
        )
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequest(
            f"model_path '{path}': config.json is unreadable: {exc}",
            param="model_path",
            code=ErrorCode.INVALID_MODEL_PATH,
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest(
            f"model_path '{path}': config.json is not a JSON object",
            param="model_path",
            code=ErrorCode.INVALID_MODEL_PATH,
        )
    return data


def _missing(path: Path, what: str) -> InvalidRequest:
    return InvalidRequest(
        f"model_path '{path}' has no {what}", param="model_path", code=ErrorCode.INVALID_MODEL_PATH
    )


def check_model_files(path: Path, model_type: str) -> dict[str, Any]:
    """The config of a Hugging Face-layout model directory (safetensors weights and a
    tokenizer), after checking those files are there: a clear 400 naming what is
    missing, before a loader fails on it somewhere deep."""
    config = read_config(path)
    if not any(path.glob("*.safetensors")):
        raise _missing(path, f"*.safetensors weight files (a '{model_type}' model needs them)")
    if not any(any(path.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise _missing(path, f"tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    return config


@contextmanager
def loader_errors(path: Path, model_type: str) -> Iterator[None]:
    """A library loader's failure on the files of a model directory, as a 400: what it
    raises there (missing keys, wrong types, malformed files) comes from the directory,
    which the request chose. Logged with its type, so a real bug stays visible."""
    try:
        yield
    except InvalidRequest:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        log.warning(
            "model_load_failed", path=str(path), model_type=model_type, error=repr(exc)[:500]
        )
        # Library messages can run to a page (mlx-vlm appends a conversion recipe).
        first_line = next(iter(str(exc).strip().splitlines()), "")
        raise InvalidRequest(
            f"model_path '{path}' cannot be loaded as a '{model_type}' model: "
            f"{type(exc).__name__}: {first_line}",
            param="model_path",
            code=ErrorCode.INVALID_MODEL_PATH,
        ) from None


def weight_file_bytes(path: Path) -> int:
    """Bytes of the weight files: the size estimate used before a load."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def context_length_of(config: dict[str, Any]) -> int | None:
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        value = config.get(key) or (config.get("text_config") or {}).get(key)
        if isinstance(value, int):
            return value
    return None
