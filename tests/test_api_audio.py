"""Speech to text end to end: the tiny random-weight Whisper loaded through mlx-whisper's
own loader via the registry, and `POST /v1/audio/transcriptions` on a real server, called
with the official `openai` package and with raw HTTP. Random weights: the text is noise, so
the tests check status, shape and plumbing; decoding is bounded by its token limit."""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from api_helpers import load, running_server

from engine.errors import InvalidRequest
from engine.models.audio import decode_wav

WHISPER_ID = "tiny-whisper"
EMBED_ID = "tiny-embed"


def wav_bytes(samples: np.ndarray, rate: int = 16_000, width: int = 2, channels: int = 1) -> bytes:
    """A PCM WAV of ``samples`` (floats in [-1, 1], shape (frames,) or (frames, channels))."""
    frames = samples.reshape(len(samples), channels)
    if width == 1:
        raw = (np.clip(frames, -1, 1) * 127 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        ints = (np.clip(frames, -1, 1) * (2**23 - 1)).astype("<i4")
        raw = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        kind = {2: "<i2", 4: "<i4"}[width]
        raw = (np.clip(frames, -1, 1) * (2 ** (8 * width - 1) - 1)).astype(kind).tobytes()
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(raw)
    return out.getvalue()


def sine(seconds: float = 1.0, rate: int = 16_000, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@dataclass
class Api:
    client: httpx.Client
    oai: openai.OpenAI
    load_body: dict[str, Any]


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, tiny_whisper_dir: Path, tiny_embedder_dir: Path
) -> Iterator[Api]:
    with running_server(tmp_path_factory.mktemp("audio-api"), audio_max_file_mb=0.5) as client:
        body = load(client, tiny_whisper_dir, "whisper", model_id=WHISPER_ID)
        load(client, tiny_embedder_dir, "embeddings", model_id=EMBED_ID)
        oai = openai.OpenAI(
            base_url=f"{client.base_url}/v1", api_key="not-needed", max_retries=0, timeout=60
        )
        yield Api(client, oai, body)
        oai.close()


def _transcribe(api: Api, data: bytes, filename: str = "a.wav", **fields: str) -> httpx.Response:
    return api.client.post(
        "/v1/audio/transcriptions",
        data={"model": WHISPER_ID, **fields},
        files={"file": (filename, data, "audio/wav")},
    )


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


# -- loading -------------------------------------------------------------------------------------
def test_whisper_loads_through_mlx_whisper_with_measured_memory(api: Api) -> None:
    body = api.load_body
    assert body["model_id"] == WHISPER_ID
    assert body["vram_usage_gb"] > 0
    assert body["load_time_ms"] > 0
    assert body["metadata"]["type"] == "whisper"
    assert body["metadata"]["family"] == "whisper"
    assert body["metadata"]["context_length"] == 448
    info = api.client.get(f"/v1/models/{WHISPER_ID}/info")
    assert info.status_code == 200, info.text
    assert "transcription" in str(info.json())


# -- transcription -------------------------------------------------------------------------------
def test_transcription_with_the_openai_client(api: Api) -> None:
    result = api.oai.audio.transcriptions.create(
        model=WHISPER_ID, file=("tone.wav", wav_bytes(sine()), "audio/wav")
    )
    assert isinstance(result.text, str)
    stats = api.client.get(f"/v1/models/{WHISPER_ID}/stats")
    assert stats.status_code == 200, stats.text
    assert stats.json()["request_count"] >= 1


def test_stereo_44k_24bit_text_format(api: Api) -> None:
    left, right = sine(1.0, 44_100, 440.0), sine(1.0, 44_100, 660.0)
    data = wav_bytes(np.stack([left, right], axis=1), rate=44_100, width=3, channels=2)
    response = _transcribe(api, data, language="en", response_format="text")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")


def test_non_wav_upload_is_refused_naming_the_file(api: Api) -> None:
    response = _transcribe(api, b"ID3\x03\x00\x00\x00fake mp3 bytes", filename="song.mp3")
    error = _error(response, 400, "unsupported_audio")
    assert "song.mp3" in error["message"]


def test_unknown_model_is_404(api: Api) -> None:
    response = _transcribe(api, wav_bytes(sine(0.1)), model="no-such-model")
    error = _error(response, 404, "model_not_found")
    assert error["param"] == "model"


def test_a_non_whisper_model_is_400(api: Api) -> None:
    response = _transcribe(api, wav_bytes(sine(0.1)), model=EMBED_ID)
    _error(response, 400, "wrong_model_type")


def test_bad_language_and_format_are_400(api: Api) -> None:
    _error(_transcribe(api, wav_bytes(sine(0.1)), language="klingon"), 400, "invalid_language")
    response = _transcribe(api, wav_bytes(sine(0.1)), response_format="srt")
    assert response.status_code == 400, response.text


def test_upload_over_the_limit_is_413(api: Api) -> None:
    data = wav_bytes(np.zeros(300_000, np.float32))  # 600 KB > 0.5 MB
    response = _transcribe(api, data)
    assert response.status_code == 413, response.text


# -- WAV decoding --------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_decode_wav_sample_widths(width: int) -> None:
    tone = sine(0.5)
    decoded = decode_wav(wav_bytes(tone, width=width), "t.wav")
    assert decoded.dtype == np.float32
    assert decoded.shape == tone.shape
    assert np.max(np.abs(decoded - tone)) < (0.02 if width == 1 else 1e-3)


def test_decode_wav_downmixes_and_resamples() -> None:
    tone = sine(1.0, 44_100)
    stereo = np.stack([tone, tone], axis=1)
    decoded = decode_wav(wav_bytes(stereo, rate=44_100, channels=2), "s.wav")
    assert decoded.shape == (16_000,)
    reference = sine(1.0, 16_000)
    assert np.max(np.abs(decoded[100:-100] - reference[100:-100])) < 0.01


def test_decode_wav_refuses_other_formats() -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_wav(b"OggS\x00\x02", "voice.ogg")
    assert info.value.code == "unsupported_audio"
    assert "voice.ogg" in info.value.message
