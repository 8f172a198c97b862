"""`parley offline`: a whole conversation from a file, with the reference's output conventions.

The user's side is read from any WAV/FLAC (resampled to 24 kHz, downmixed), split into 1920-sample
frames (the last zero-padded) and run through the same per-frame step as a live session. One
output frame per input frame; the output WAV is trimmed to exactly the input's length; the JSON is
the reference's per-frame list of pieces ("EPAD"/"PAD" for ids 0/3). MODEL.md §8.3.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from engine.errors import AudioError
from engine.frames import STAGES, FrameResult


@dataclass
class OfflineResult:
    frames: int
    input_samples: int
    pcm: np.ndarray  # [input_samples] float32
    pieces: list[str]
    user_codes: np.ndarray  # [F, 8]
    out_tokens: np.ndarray  # [F, 17]
    pcm_frames: np.ndarray  # [F, 1920]
    prefill_s: float
    wall_s: float
    stage_ms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def audio_seconds(self) -> float:
        return self.input_samples / 24000

    @property
    def real_time_factor(self) -> float:
        """Processing time over audio time (below 1 is faster than real time)."""
        return self.wall_s / max(self.audio_seconds, 1e-9)


def run_offline(engine, persona, pcm: np.ndarray,
                on_frame: Callable[[int, int], None] | None = None) -> OfflineResult:
    """Runs `engine` (a DuplexEngine) over `pcm` (24 kHz mono float32) after prefilling `persona`."""
    frame = engine.frame_size
    n = int(pcm.shape[0])
    if n == 0:
        raise AudioError("The input audio is empty (0 samples); give a file with speech in it.")
    frames = -(-n // frame)
    padded = np.zeros(frames * frame, np.float32)
    padded[:n] = pcm
    prefill_s = engine.start(persona)
    stage_ms: dict[str, list[float]] = {k: [] for k in STAGES}
    pieces, tokens, user_codes, pcm_frames = [], [], [], []
    t0 = time.perf_counter()
    for j in range(frames):
        result: FrameResult = engine.step(padded[j * frame:(j + 1) * frame])
        pieces.append(engine.json_piece(result.text_id))
        tokens.append(result.tokens)
        user_codes.append(engine.last_user_codes)
        pcm_frames.append(result.pcm)
        for k, v in result.timings_ms.items():
            stage_ms.setdefault(k, []).append(v)
        if on_frame:
            on_frame(j + 1, frames)
    wall = time.perf_counter() - t0
    pcm_frames_arr = np.stack(pcm_frames).astype(np.float32)
    return OfflineResult(
        frames=frames, input_samples=n, pcm=pcm_frames_arr.reshape(-1)[:n].copy(), pieces=pieces,
        user_codes=np.stack(user_codes).astype(np.int64),
        out_tokens=np.stack(tokens).astype(np.int64), pcm_frames=pcm_frames_arr,
        prefill_s=prefill_s, wall_s=wall, stage_ms=stage_ms,
    )


def write_outputs(result: OfflineResult, output_wav: Path, text_json: Path | None = None,
                  tokens_npz: Path | None = None, sample_rate: int = 24000) -> None:
    """Writes the WAV (16-bit like the reference), JSON and NPZ, each atomically."""
    from engine.audiofile import write_wav

    write_wav(output_wav, result.pcm, sample_rate)
    if text_json is not None:
        _atomic_text(Path(text_json), json.dumps(result.pieces, ensure_ascii=False))
    if tokens_npz is not None:
        _atomic_npz(Path(tokens_npz), user_codes=result.user_codes,
                    out_tokens=result.out_tokens, pcm_frames=result.pcm_frames)


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_npz(path: Path, **arrays) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent or ".")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stage_summary(stage_ms: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """p50 / p95 / max milliseconds per stage."""
    out = {}
    for name, values in stage_ms.items():
        if not values:
            continue
        arr = np.sort(np.asarray(values))
        out[name] = {"p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)),
                     "max_ms": float(arr[-1])}
    return out
