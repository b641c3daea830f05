"""Speech recognition through mlx-whisper.

mlx-whisper is installed with ``--no-deps``: it declares torch, which only its weight
conversion script imports. Loading and decoding need numba, tiktoken, more-itertools,
scipy and tqdm (declared by this project). The tokenizer reads the tiktoken files bundled
in the package, so nothing is downloaded.

Decoding is greedy (temperature 0.0, no temperature fallback loop) and bounded: 30-second
windows, one after another, each yielding at most ``MAX_WINDOW_TOKENS`` tokens, with the
stop event checked between windows. Audio longer than the upload limit allows never
arrives here, so the work of a request is bounded too.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ErrorCode, InvalidRequest
from engine.models.backends.base import Backend, LoadedModel, loader_errors, read_config
from engine.models.backends.textgen import parameter_bytes
from engine.models.types import Capability, ModelType, Operation

if TYPE_CHECKING:
    import numpy as np

SAMPLE_RATE = 16_000
MAX_WINDOW_TOKENS = 224  # Whisper's own default: half the text context of 448
DIMENSIONS = (
    "n_mels",
    "n_audio_ctx",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_vocab",
    "n_text_ctx",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
)


class WhisperBackend(Backend):
    model_type = ModelType.WHISPER
    capabilities = (Capability.TRANSCRIPTION,)
    operations = frozenset({Operation.TRANSCRIBE})
    package = "mlx-whisper"
    module = "mlx_whisper"

    def load(self, path: Path, context_length: int | None) -> LoadedModel:
        from mlx_whisper.load_models import load_model

        config = read_config(path)
        missing = [name for name in DIMENSIONS if not isinstance(config.get(name), int)]
        if missing:
            raise InvalidRequest(
                f"model_path '{path}': config.json lacks Whisper's dimensions "
                f"({', '.join(missing)}): not an mlx-whisper model",
                param="model_path",
                code=ErrorCode.INVALID_MODEL_PATH,
            )
        if not any((path / name).is_file() for name in ("weights.safetensors", "weights.npz")):
            raise InvalidRequest(
                f"model_path '{path}' has neither weights.safetensors nor weights.npz "
                "(the layout mlx-whisper loads)",
                param="model_path",
                code=ErrorCode.INVALID_MODEL_PATH,
            )
        # A directory that exists: load_model reads it and never goes to the hub.
        with loader_errors(path, self.model_type):
            model = load_model(str(path))
        return WhisperModel(model, config)


class WhisperModel(LoadedModel):
    model_type = ModelType.WHISPER
    capabilities = frozenset(WhisperBackend.capabilities)

    def __init__(self, model: Any, config: dict[str, Any]) -> None:
        self.model = model
        self.family = config.get("model_type") or "whisper"
        self.context_length = int(config["n_text_ctx"])
        self.weight_bytes = parameter_bytes(model)

    def transcribe(
        self, audio: np.ndarray, language: str | None, stop: threading.Event
    ) -> dict[str, Any]:
        """Text of ``audio`` (float32, mono, 16 kHz). ``language`` is a code or name
        Whisper knows; None detects it (multilingual models) or assumes English."""
        import mlx.core as mx
        import numpy as np  # here, not at the top: the core install (no audio extra) has no numpy
        from mlx_whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim
        from mlx_whisper.decoding import DecodingOptions, decode

        model = self.model
        language = self._language(language)
        samples = np.asarray(audio, dtype=np.float32).reshape(-1)
        mel = log_mel_spectrogram(samples, n_mels=model.dims.n_mels, padding=N_SAMPLES)
        frames = mel.shape[-2] - N_FRAMES  # without the padding
        texts: list[str] = []
        detected = language
        windows = 0
        seek = 0
        while seek < frames:
            if stop.is_set():
                break
            segment = pad_or_trim(mel[seek : seek + N_FRAMES], N_FRAMES, axis=-2)
            options = DecodingOptions(
                language=detected,
                temperature=0.0,
                sample_len=min(MAX_WINDOW_TOKENS, model.dims.n_text_ctx // 2),
                without_timestamps=True,
                fp16=False,  # the model is loaded in float32
            )
            result = decode(model, segment.astype(mx.float32), options)
            detected = detected or result.language  # detected once, then kept
            if result.text:
                texts.append(result.text)
            windows += 1
            seek += N_FRAMES
        return {
            "text": " ".join(texts).strip(),
            "language": detected or "en",
            "segments": windows,
            "duration_s": round(len(samples) / SAMPLE_RATE, 3),
        }

    def _language(self, language: str | None) -> str | None:
        from mlx_whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

        if not language:
            return None if self.model.is_multilingual else "en"
        code = language.strip().lower()
        code = TO_LANGUAGE_CODE.get(code, code)
        if code not in LANGUAGES:
            raise InvalidRequest(
                f"unknown language '{language}' (an ISO-639-1 code such as 'en' or a "
                "language name Whisper knows)",
                param="language",
                code=ErrorCode.INVALID_LANGUAGE,
            )
        if code != "en" and not self.model.is_multilingual:
            raise InvalidRequest(
                "this Whisper model is English-only",
                param="language",
                code=ErrorCode.INVALID_LANGUAGE,
            )
        return code

    def close(self) -> None:
        self.model = None
