"""Tiny synthetic models that load through the real loaders, built offline in milliseconds.

They exist so that tests, benches and `make run` have a chat model, a vision-language model and
a sentence embedder without a model hub (none is reachable here) and without downloading
gigabytes. Their weights are random: the output is noise, not language. Callers should tag
them as such (the marker file tells them apart from real models).

- `build_lm`: qwen2 for mlx-lm, a byte-level BPE trained here, a ChatML template that also
  renders `tools` (Qwen 2.5 style, so tool-calling support is detected from the template).
- `build_vlm`: qwen2_vl for mlx-vlm, with the image/video processor configs it needs.
- `build_embedder`: a BERT sentence model in sentence-transformers layout (mean pooling,
  normalisation) for `mlx_vlm.embedding_loader.load_embedding_model`.
- `build_whisper`: a Whisper model (multilingual vocabulary, so the tokenizer bundled with
  mlx-whisper applies) for `mlx_whisper.load_models.load_model`.

A build takes 10-40 ms once mlx-lm / mlx-vlm are imported (about 2 s, paid once per process).
Each builder is deterministic for a given seed, writes `fusion_synthetic.json` last and is
idempotent: a directory that already holds the same complete model is returned untouched.
The weights are drawn from a numpy generator rather than MLX's initialisers so that building
never reseeds MLX's global random state (which would make later unseeded sampling in the same
process predictable).

Pitfalls met on mlx-lm 0.32 / mlx-vlm 0.7.10 / transformers 5 (see ../shared/FACTS.md):
- transformers 5 validates config value types: integers must be written as integers.
- transformers 5 writes `"tokenizer_class": "TokenizersBackend"`, which 4.x cannot load; the
  configs here are written by hand with `PreTrainedTokenizerFast` / `BertTokenizer`.
- `BertTokenizer.save_pretrained` no longer writes `vocab.txt`; it is written here.
- Any processor file missing from a directory makes transformers fall back to the hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import string
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

MARKER = "fusion_synthetic.json"
FORMAT_VERSION = 1  # bump when the files written change, so old builds are rebuilt

LM_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VISION_SPECIAL_TOKENS = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added as normal (non-special) tokens, like Qwen's: they must survive decoding, because the
# tool parser looks for them in the generated text.
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating food. A man is eating a piece of bread.",
    "Workflows run steps in order and in parallel, and record every result.",
    "The model server loads language, vision and embedding models on demand.",
    "Hello! How can I help you today? Please describe the picture.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 100 and symbols {} [] () : , . ; ' \" are common.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    'JSON looks like {"name": "get_weather", "arguments": {"city": "Paris"}}.',
)

# Qwen 2.5's template, trimmed: ChatML, a tools preamble listing the functions, assistant
# tool calls as <tool_call> JSON and tool results folded into a user turn. mlx-lm infers its
# `json_tools` parser from "<tool_call>" plus "tool_call.name" in the template.
CHATML_TOOLS_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\\n'
    "</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    # OpenAI clients send arguments as a JSON string; others as an object.
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2-VL's template: content parts of type image/video become the vision placeholders that
# the processor expands to one <|image_pad|> per merged patch.
QWEN2_VL_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for part in message.content %}"
    "{%- if part.type == 'image' or 'image' in part or 'image_url' in part %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part.type == 'video' or 'video' in part %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in part %}{{- part.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The VLM keeps 16-wide heads (its mrope sections split each head's rotary half in three).
_VLM_HEAD_DIM = 16
# Image geometry of the tiny VLM: 14-pixel patches merged 2x2, at most 56x56 pixels, so an
# image costs at most 4 tokens and the vision tower stays fast on CPU.
_VLM_PATCH = 14
_VLM_MERGE = 2
_VLM_TEMPORAL = 2
_VLM_MIN_PIXELS = 784
_VLM_MAX_PIXELS = 3136
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

LM_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
VLM_FILES = (
    *LM_FILES,
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
)
EMBEDDER_FILES = (
    "config.json",
    "model.safetensors",
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
)


# --- public builders ---------------------------------------------------------------------


def build_lm(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    context_length: int = 2048,
    head_dim: int = 64,
) -> Path:
    """Build a random-weight qwen2 chat model for `mlx_lm.load` into `path`. `head_dim`:
    the attention heads' width, 64 like real models by default (MLX-CUDA 0.32.4 fails in
    batched decoding with 16-wide heads: ../shared/gpu/README.md)."""
    _heads(hidden, head_dim)  # validate before touching the directory
    params = {
        "hidden": hidden,
        "layers": layers,
        "context_length": context_length,
        "head_dim": head_dim,
    }

    def write(out: Path) -> None:
        tokenizer = _train_bpe(LM_SPECIAL_TOKENS)
        ids = _special_ids(tokenizer, LM_SPECIAL_TOKENS)
        config = _qwen2_config(tokenizer, ids, hidden, layers, context_length, head_dim)
        _write_json(out / "config.json", config)
        _save_weights(out / "model.safetensors", _qwen2_lm_shapes(config), seed)
        _write_chat_tokenizer(out, tokenizer, CHATML_TOOLS_TEMPLATE, context_length)
        _write_generation_config(out, ids)

    return _build(Path(path), _marker("lm", seed, params), LM_FILES, write)


def build_vlm(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Build a random-weight qwen2_vl model for `mlx_vlm.load` into `path`."""
    hidden, layers, context_length = 64, 2, 2048

    def write(out: Path) -> None:
        specials = LM_SPECIAL_TOKENS + VISION_SPECIAL_TOKENS
        tokenizer = _train_bpe(specials)
        ids = _special_ids(tokenizer, specials)
        text = _qwen2_config(tokenizer, ids, hidden, layers, context_length, _VLM_HEAD_DIM)
        config = _qwen2_vl_config(text, ids)
        _write_json(out / "config.json", config)
        _save_weights(out / "model.safetensors", _qwen2_vl_shapes(config), seed)
        _write_chat_tokenizer(out, tokenizer, QWEN2_VL_TEMPLATE, context_length)
        _write_generation_config(out, ids)
        _write_vlm_processor(out)

    return _build(Path(path), _marker("vlm", seed, {"hidden": hidden}), VLM_FILES, write)


def build_embedder(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    max_seq_length: int = 128,
) -> Path:
    """Build a random-weight BERT sentence embedder (mean pooling, normalised) into `path`.

    Like all-MiniLM-L6-v2, the position table and the tokenizer's `model_max_length` (512)
    are longer than the sentence-transformers `max_seq_length`, so a backend that truncates
    at the tokenizer's limit instead of `sentence_bert_config.json` shows up in tests.
    """
    _heads(hidden)  # validate before touching the directory
    # Like all-MiniLM-L6-v2: 512 positions, whatever the sentence-transformers limit.
    positions = max(512, max_seq_length)
    params = {"hidden": hidden, "layers": layers, "max_seq_length": max_seq_length}

    def write(out: Path) -> None:
        tokenizer = _wordpiece()
        config = _bert_config(tokenizer, hidden, layers, positions)
        _write_json(out / "config.json", config)
        _save_weights(out / "model.safetensors", _bert_shapes(config), seed)
        _write_bert_tokenizer(out, tokenizer, positions)
        _write_sentence_transformers(out, hidden, max_seq_length)

    return _build(Path(path), _marker("embedder", seed, params), EMBEDDER_FILES, write)


WHISPER_FILES = ("config.json", "weights.safetensors")


def build_whisper(
    path: str | os.PathLike[str], *, seed: int = 0, state: int = 64, layers: int = 2
) -> Path:
    """Build a random-weight Whisper model for `mlx_whisper.load_models.load_model`.

    Real Whisper's audio geometry (80 mel bins, 1500 audio positions: 30-s windows of 3000
    mel frames halved by the stride-2 convolution) and the multilingual vocabulary (51865,
    the size of the tiktoken encoding mlx-whisper ships), so real decoding code runs
    unchanged; only the widths and depths are tiny. 448 text positions, as in Whisper.
    """
    params = {"state": state, "layers": layers}

    def write(out: Path) -> None:
        config = {
            "n_mels": 80,
            "n_audio_ctx": 1500,
            "n_audio_state": state,
            "n_audio_head": 2,
            "n_audio_layer": layers,
            "n_vocab": 51865,
            "n_text_ctx": 448,
            "n_text_state": state,
            "n_text_head": 2,
            "n_text_layer": layers,
            "model_type": "whisper",
        }
        _write_json(out / "config.json", config)
        _save_weights(out / "weights.safetensors", _whisper_shapes(config), seed)

    return _build(Path(path), _marker("whisper", seed, params), WHISPER_FILES, write)


def read_marker(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The synthetic-model marker of a model directory, or None for any other directory."""
    try:
        data = json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- build protocol: lock, build into a temporary directory, rename -----------------------


def _marker(kind: str, seed: int, params: Mapping[str, int]) -> dict[str, Any]:
    return {"kind": kind, "seed": seed, "params": dict(params), "format": FORMAT_VERSION}


def _is_complete(path: Path, marker: Mapping[str, Any], files: tuple[str, ...]) -> bool:
    return read_marker(path) == marker and all((path / name).is_file() for name in files)


def _build(
    path: Path,
    marker: dict[str, Any],
    files: tuple[str, ...],
    write: Callable[[Path], None],
) -> Path:
    path = path.absolute()
    if _is_complete(path, marker, files):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        # Another process may have finished the same build while this one waited.
        if _is_complete(path, marker, files):
            return path
        if path.exists() and any(path.iterdir()) and read_marker(path) is None:
            raise FileExistsError(f"{path} is not empty and holds no synthetic model")
        # Build beside the target and rename, so a reader never sees a half-written model.
        # (Not tempfile.mkdtemp: its mode 0700 would survive the rename.)
        tmp = path.parent / f".{path.name}.building"
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a killed build; we hold the lock
        tmp.mkdir()
        try:
            write(tmp)
            _write_json(tmp / MARKER, marker)  # last: its presence means "complete"
            if path.exists():
                shutil.rmtree(path)  # an empty directory, or an older synthetic build
            tmp.rename(path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    # A sibling lock file: concurrent builders (test workers, two servers) serialise here.
    lock_path = path.parent / f".{path.name}.lock"
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- configs ---------------------------------------------------------------------------------


def _qwen2_config(
    tokenizer: Any,
    ids: Mapping[str, int],
    hidden: int,
    layers: int,
    context_length: int,
    head_dim: int,
) -> dict[str, Any]:
    heads, kv_heads = _heads(hidden, head_dim)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": context_length,  # what the registry reports as context
        "sliding_window": context_length,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        # Exactly the tokenizer's size: a padded vocabulary would let random weights sample
        # ids that decode to nothing.
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "torch_dtype": "float32",
    }


def _qwen2_vl_config(text: dict[str, Any], ids: Mapping[str, int]) -> dict[str, Any]:
    """Qwen2-VL's flat layout: the text model's keys at the top, plus `vision_config`."""
    half_head = text["hidden_size"] // text["num_attention_heads"] // 2
    return {
        **text,
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        # mrope splits each head's rotary half into (temporal, height, width) sections;
        # they must add up to head_dim / 2.
        "rope_scaling": {"type": "mrope", "mrope_section": _mrope_sections(half_head)},
        "vision_config": {
            "model_type": "qwen2_vl",
            "depth": 2,
            # embed_dim >= patch size: mlx-vlm guesses from the patch-embedding weight's shape
            # whether it is in PyTorch layout and must be transposed.
            "embed_dim": 32,
            "hidden_size": text["hidden_size"],  # the merger projects into the text width
            "num_heads": 2,
            "mlp_ratio": 2,  # an int: transformers 5 rejects 2.0 where it declares int
            "in_channels": 3,
            "in_chans": 3,
            "patch_size": _VLM_PATCH,
            "spatial_patch_size": _VLM_PATCH,
            "spatial_merge_size": _VLM_MERGE,
            "temporal_patch_size": _VLM_TEMPORAL,
        },
    }


def _bert_config(tokenizer: Any, hidden: int, layers: int, positions: int) -> dict[str, Any]:
    heads, _ = _heads(hidden)
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": positions,
        "type_vocab_size": 2,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "pad_token_id": tokenizer.token_to_id("[PAD]"),
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }


# --- weights ---------------------------------------------------------------------------------


def _heads(hidden: int, head_dim: int = 16) -> tuple[int, int]:
    """Attention heads of width `head_dim` (and half as many key/value heads, grouped-query
    style)."""
    if head_dim < 8 or head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8, got {head_dim}")
    if hidden < max(32, head_dim) or hidden % head_dim:
        raise ValueError(
            f"hidden must be a multiple of head_dim ({head_dim}) and at least "
            f"{max(32, head_dim)}, got {hidden}"
        )
    heads = hidden // head_dim
    return heads, max(1, heads // 2)


def _mrope_sections(half_head: int) -> list[int]:
    temporal = half_head // 4
    height = (half_head - temporal) // 2
    return [temporal, height, half_head - temporal - height]


def _qwen2_lm_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from mlx_lm.models import qwen2

    args = qwen2.ModelArgs.from_dict(config)
    return _parameter_shapes(qwen2.Model(args))


def _qwen2_vl_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from mlx_vlm.models import qwen2_vl

    text = qwen2_vl.TextConfig.from_dict(config)
    vision = qwen2_vl.VisionConfig.from_dict(config["vision_config"])
    model_config = qwen2_vl.ModelConfig.from_dict(dict(config))
    model_config.text_config, model_config.vision_config = text, vision
    return _parameter_shapes(qwen2_vl.Model(model_config))


def _bert_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from mlx_vlm.models import bert

    return _parameter_shapes(bert.Model(bert.ModelConfig.from_dict(config)))


def _whisper_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    import mlx.core as mx
    from mlx_whisper.whisper import ModelDimensions, Whisper

    dims = ModelDimensions(**{k: v for k, v in config.items() if k != "model_type"})
    shapes = _parameter_shapes(Whisper(dims, mx.float32))
    # `alignment_heads` (integer head indices for word timestamps) is not a weight: the
    # model computes its own default.
    return {k: v for k, v in shapes.items() if k.startswith(("encoder.", "decoder."))}


def _parameter_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    # The names and shapes are exactly what the loader's model expects (strict loading);
    # the values the model's own initialisers drew are discarded (see _random_weights).
    from mlx.utils import tree_flatten

    leaves = dict(tree_flatten(model.parameters()))
    return {name: tuple(value.shape) for name, value in leaves.items()}


def _random_weights(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    # Sorted names: the draws do not depend on the model's attribute order.
    rng = np.random.default_rng(seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) == 1 and not name.endswith("bias"):
            weights[name] = np.ones(shape, np.float32)  # norm scales: keep activations sane
        else:
            weights[name] = rng.normal(0.0, 0.02, shape).astype(np.float32)
    return weights


def _save_weights(path: Path, shapes: Mapping[str, tuple[int, ...]], seed: int) -> None:
    import mlx.core as mx

    arrays = {name: mx.array(value) for name, value in _random_weights(shapes, seed).items()}
    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx"})


# --- tokenizers ------------------------------------------------------------------------------


def _train_bpe(special_tokens: tuple[str, ...]) -> Any:
    """A byte-level BPE (GPT-2/Qwen style), so any text encodes without unknown tokens.

    Training is reproducible across processes only because the initial alphabet holds all 256
    byte symbols: token ids then never depend on the trainer's hash-map order (WordPiece
    training, which numbers "##" pieces in that order, is not; see `_wordpiece`).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=1,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer.add_tokens([AddedToken(token, normalized=False) for token in TOOL_TOKENS])
    return tokenizer


def _wordpiece() -> Any:
    """A lower-casing BERT WordPiece with [CLS] ... [SEP] framing, like bert-base-uncased.

    The vocabulary is listed, not trained: `WordPieceTrainer` numbers the "##" pieces in hash
    map order, which changes from one process to the next. Here it is: the special tokens,
    every ASCII letter, digit and punctuation mark alone and as a "##" continuation (so any
    English word splits into known pieces instead of [UNK]), then the corpus's words, sorted.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = {
        word
        for text in _CORPUS
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    }
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    tokens = [*BERT_SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    tokens += sorted(words - set(tokens))
    vocab = {token: index for index, token in enumerate(tokens)}

    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.add_special_tokens(list(BERT_SPECIAL_TOKENS))  # never split, skipped on decode
    return tokenizer


def _special_ids(tokenizer: Any, tokens: tuple[str, ...]) -> dict[str, int]:
    return {token: tokenizer.token_to_id(token) for token in tokens}


def _write_chat_tokenizer(
    out: Path, tokenizer: Any, chat_template: str, model_max_length: int
) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        # Not "TokenizersBackend" (what transformers 5 writes): 4.x cannot load that.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "split_special_tokens": False,
        "chat_template": chat_template,
    }
    _write_json(out / "tokenizer_config.json", config)


def _write_generation_config(out: Path, ids: Mapping[str, int]) -> None:
    # Both end markers stop generation, as in Qwen's own generation_config.json.
    config = {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
    }
    _write_json(out / "generation_config.json", config)


def _write_vlm_processor(out: Path) -> None:
    # All three files and the template must exist locally: when one is missing, transformers
    # looks for it on the hub, which is unreachable here.
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": _CLIP_MEAN,
        "image_std": _CLIP_STD,
        "patch_size": _VLM_PATCH,
        "merge_size": _VLM_MERGE,
        "temporal_patch_size": _VLM_TEMPORAL,
        "min_pixels": _VLM_MIN_PIXELS,
        "max_pixels": _VLM_MAX_PIXELS,
        "size": {"shortest_edge": _VLM_MIN_PIXELS, "longest_edge": _VLM_MAX_PIXELS},
    }
    video = {**image, "video_processor_type": "Qwen2VLVideoProcessor"}
    del video["image_processor_type"]
    _write_json(out / "preprocessor_config.json", image)
    _write_json(out / "video_preprocessor_config.json", video)
    _write_json(out / "processor_config.json", {"processor_class": "Qwen2VLProcessor"})
    _write_json(out / "chat_template.json", {"chat_template": QWEN2_VL_TEMPLATE})


def _write_bert_tokenizer(out: Path, tokenizer: Any, model_max_length: int) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    # Written by hand: BertTokenizer.save_pretrained no longer writes vocab.txt, and the
    # slow tokenizer and other tools read it. One token per line, in id order.
    lines = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    (out / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    specials = {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "model_max_length": model_max_length,
        **specials,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", specials)


def _write_sentence_transformers(out: Path, hidden: int, max_seq_length: int) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    pooling = {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    _write_json(out / "modules.json", modules)
    _write_json(out / "1_Pooling" / "config.json", pooling)
    (out / "2_Normalize").mkdir()  # Normalize has no parameters: an empty module directory
    _write_json(
        out / "sentence_bert_config.json",
        {"max_seq_length": max_seq_length, "do_lower_case": False},
    )
    _write_json(
        out / "config_sentence_transformers.json",
        {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
