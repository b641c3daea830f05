"""Uploaded audio to what Whisper takes: float32 mono samples at 16 kHz.

WAV files with PCM samples (8-bit unsigned, 16/24/32-bit signed, any rate, any number of
channels) are read with the standard library's `wave` module and numpy, downmixed by
averaging the channels and resampled with `scipy.signal.resample_poly`. Anything else is
refused with a 400 (`unsupported_audio`) naming the file: no codec library is bundled.
"""

from __future__ import annotations

import io
import math
import wave

import numpy as np

from engine.errors import ErrorCode, InvalidRequest

TARGET_RATE = 16_000


def decode_wav(data: bytes, filename: str) -> np.ndarray:
    """``data`` (a WAV file's bytes) as float32 mono samples at 16 kHz in [-1, 1]."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels = wav.getnchannels()
            width = wav.getsampwidth()
            rate = wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise _unsupported(filename, f"not a PCM WAV file ({exc})") from None
    if width not in (1, 2, 3, 4) or channels < 1 or rate < 1:
        raise _unsupported(filename, f"{8 * width}-bit samples are not supported")
    frames = len(raw) // (width * channels)
    if frames == 0:
        raise InvalidRequest(
            f"'{filename}' holds no audio samples", param="file", code=ErrorCode.EMPTY_AUDIO
        )
    samples = _pcm_to_float(raw[: frames * width * channels], width).reshape(frames, channels)
    mono = samples.mean(axis=1, dtype=np.float32) if channels > 1 else samples[:, 0]
    return resample(mono, rate)


def resample(samples: np.ndarray, rate: int, target: int = TARGET_RATE) -> np.ndarray:
    if rate == target:
        return np.ascontiguousarray(samples, dtype=np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(rate, target)
    return resample_poly(samples, target // g, rate // g).astype(np.float32)


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    if width == 1:  # 8-bit WAV is unsigned
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    if width == 3:  # little-endian 24-bit: widen to 32 bits, the sign in the top byte
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        value = np.where(value >= 1 << 23, value - (1 << 24), value)
        return value.astype(np.float32) / float(1 << 23)
    return (np.frombuffer(raw, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)


def _unsupported(filename: str, why: str) -> InvalidRequest:
    return InvalidRequest(
        f"cannot read audio file '{filename}': {why}; send a PCM WAV file "
        "(8, 16, 24 or 32-bit, any sample rate, mono or stereo)",
        param="file",
        code=ErrorCode.UNSUPPORTED_AUDIO,
    )
