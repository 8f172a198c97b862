"""Audio files: read anything soundfile reads as 24 kHz mono float32, write WAVs atomically.

`read_audio` turns every failure (missing, empty, not audio, unreadable, no samples) into an
`AudioError` with one sentence saying what is wrong and what to do.

`write_wav` writes 16-bit PCM the way the reference does (`int16 = trunc(float32(x) * 32767)` after
clipping to [-1, 1], no dither), or 32-bit float, through a temporary file in the same folder that
is renamed into place, so a crash never leaves a half-written file under the requested name.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Literal, Union

import numpy as np
import soundfile as sf

from .errors import AudioError

SAMPLE_RATE = 24000

PathLike = Union[str, os.PathLike]


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().rstrip(".")
    # libsndfile messages look like "Error opening 'x.wav': Format not recognised."
    if ": " in text and text.startswith("Error opening"):
        text = text.split(": ", 1)[1]
    return text or type(exc).__name__


def resample(x: np.ndarray, sr: int, target_sr: int) -> np.ndarray:
    """Resample a 1-D float32 signal with libsamplerate's best sinc converter.

    The result has exactly `round(len(x) * target_sr / sr)` samples (libsamplerate's own count can
    be off by one; the tail is zero-padded or trimmed).
    """
    if sr == target_sr or x.shape[0] == 0:
        return np.ascontiguousarray(x, dtype=np.float32)
    import samplerate

    expected = int(round(x.shape[0] * target_sr / sr))
    y = samplerate.resample(np.ascontiguousarray(x, dtype=np.float32), target_sr / sr,
                            "sinc_best")
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    if y.shape[0] < expected:
        y = np.concatenate([y, np.zeros(expected - y.shape[0], np.float32)])
    return np.ascontiguousarray(y[:expected])


def read_audio(path: PathLike, target_sr: int = SAMPLE_RATE,
               mono: Literal["mix", "first"] = "mix") -> np.ndarray:
    """Read a WAV/FLAC/OGG (anything libsndfile reads) as mono float32 at `target_sr`.

    mono="mix" averages the channels (user input in offline mode); mono="first" keeps channel 0,
    as the reference does for voice prompts. Samples are scaled as soundfile does (int16 / 32768).
    """
    if mono not in ("mix", "first"):
        raise ValueError(f"mono must be 'mix' or 'first', not {mono!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise AudioError(f"Audio file {path} does not exist; check the path.")
    if path.is_dir():
        raise AudioError(f"{path} is a folder, not an audio file; give a WAV or FLAC file.")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise AudioError(f"Audio file {path} cannot be read ({exc.strerror or exc}); check its "
                         "permissions.") from None
    if size == 0:
        raise AudioError(f"Audio file {path} is empty (0 bytes); record or choose another file.")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise AudioError(f"Audio file {path} cannot be read ({exc.strerror or exc}); check its "
                         "permissions.") from None
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise AudioError(
            f"{path} is not an audio file that can be read ({_describe(exc)}); convert it to a WAV "
            "or FLAC file."
        ) from None
    except MemoryError:
        raise AudioError(f"Audio file {path} is too large to load into memory; cut it into shorter "
                         "pieces.") from None
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise AudioError(f"Audio file {path} contains no audio samples; record or choose a longer "
                         "file.")
    if mono == "first" or data.shape[1] == 1:
        x = data[:, 0]
    else:
        x = (data.astype(np.float64).sum(axis=1) / data.shape[1]).astype(np.float32)
    if not np.isfinite(x).all():
        raise AudioError(f"Audio file {path} contains NaN or infinite samples; re-export it as "
                         "16-bit PCM.")
    try:
        return resample(x, int(sr), int(target_sr))
    except Exception as exc:  # samplerate raises its own error types
        raise AudioError(f"Audio file {path} could not be resampled from {sr} Hz to {target_sr} Hz "
                         f"({_describe(exc)}); convert it to {target_sr} Hz yourself.") from None


def pcm16(x: np.ndarray) -> np.ndarray:
    """Float audio to int16 as the reference writes it: trunc(clip(x, -1, 1) * 32767) in float32."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0)
    return np.trunc(np.clip(x, -1.0, 1.0) * np.float32(32767)).astype(np.int16)


def write_wav(path: PathLike, pcm: np.ndarray, sr: int = SAMPLE_RATE, *,
              float32: bool = False) -> Path:
    """Write mono audio to a WAV file atomically: 16-bit PCM (reference rounding) or 32-bit float.

    `pcm` is a 1-D float array (a [1, T] or [T, 1] array is accepted too).
    """
    path = Path(path).expanduser()
    x = np.asarray(pcm)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise AudioError(f"Cannot write {path}: expected mono audio, got an array of shape "
                         f"{list(np.shape(pcm))}.")
    if path.is_dir():
        raise AudioError(f"Cannot write {path}: it is a folder; give a file name ending in .wav.")
    folder = path.parent
    if not folder.is_dir():
        raise AudioError(f"Cannot write {path}: the folder {folder} does not exist; create it "
                         "first.")
    data = np.ascontiguousarray(x, dtype=np.float32) if float32 else pcm16(x)
    subtype = "FLOAT" if float32 else "PCM_16"
    # A hidden sibling created with the default mode (umask applies, unlike mkstemp's 0600).
    tmp = folder / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        fh = open(tmp, "xb")
    except OSError as exc:
        raise AudioError(f"Cannot write {path} ({exc.strerror or exc}); check that the folder is "
                         "writable.") from None
    try:
        with fh:
            sf.write(fh, data, int(sr), subtype=subtype, format="WAV")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise AudioError(f"Cannot write {path} ({exc.strerror or exc}); check free disk space "
                             "and permissions.") from None
        raise
    return path
