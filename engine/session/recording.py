"""`--record DIR`: the session's audio and text, for debugging and demos.

Files (24 kHz, 16-bit PCM):
* `mic.wav`    — the raw microphone, every input frame, as the engine received it;
* `model.wav`  — the model's output for every input frame (zeros where no step ran: dropped,
  paused, prompting), even while the speaker is muted;
* `mix.wav`    — stereo, left = mic, right = model, frame-aligned as the model saw them
  (one model step's output next to the input frame it answered);
* `events.jsonl` — one JSON object per line: every session event (text pieces, state changes,
  controls, glitches, errors) with wall time and frame index.

Writes happen on a writer thread fed by a bounded queue, so disk stalls never reach the engine;
if the queue overflows, frames are dropped and counted in `dropped`.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

import numpy as np


class Recorder:
    def __init__(self, directory: str | Path, sample_rate: int = 24000, frame_size: int = 1920, max_queue: int = 2000):
        import soundfile as sf

        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sample_rate = sample_rate
        self.frame_size = frame_size
        self._mic = sf.SoundFile(str(self.dir / "mic.wav"), "w", sample_rate, 1, "PCM_16")
        self._model = sf.SoundFile(str(self.dir / "model.wav"), "w", sample_rate, 1, "PCM_16")
        self._mix = sf.SoundFile(str(self.dir / "mix.wav"), "w", sample_rate, 2, "PCM_16")
        self._jsonl = open(self.dir / "events.jsonl", "w", encoding="utf-8")
        self._q: queue.Queue = queue.Queue(maxsize=max_queue)
        self._pending_mic: dict[int, np.ndarray] = {}
        self._next_model = None  # the next frame index expected in model.wav
        self.dropped = 0
        self.frames_written = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="parley-recorder", daemon=True)
        self._thread.start()

    # -- producer side (engine thread) ------------------------------------------------------------
    def mic(self, index: int, pcm: np.ndarray) -> None:
        self._put(("mic", index, np.array(pcm, dtype=np.float32, copy=True)))

    def model(self, index: int, pcm: np.ndarray | None) -> None:
        self._put(("model", index, None if pcm is None else np.array(pcm, dtype=np.float32, copy=True)))

    def event(self, obj: dict) -> None:
        self._put(("event", 0, obj))

    def _put(self, item) -> None:
        if self._closed:
            return
        try:
            self._q.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._q.put(("close", 0, None), timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    # -- writer thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                kind, index, payload = self._q.get()
                if kind == "close":
                    break
                try:
                    if kind == "mic":
                        self._mic.write(np.clip(payload, -1, 1))
                        self._pending_mic[index] = payload
                    elif kind == "model":
                        self._write_model(index, payload)
                    elif kind == "event":
                        self._jsonl.write(json.dumps(payload, ensure_ascii=False) + "\n")
                except Exception:  # noqa: BLE001 - keep recording what we can
                    self.dropped += 1
        finally:
            for idx in sorted(self._pending_mic):
                self._write_model(idx, None)
            for f in (self._mic, self._model, self._mix):
                try:
                    f.close()
                except Exception:  # noqa: BLE001
                    pass
            self._jsonl.close()

    def _write_model(self, index: int, pcm: np.ndarray | None) -> None:
        fs = self.frame_size
        # earlier mic frames that never got a model frame: pair them with silence
        for idx in sorted(k for k in self._pending_mic if k < index):
            self._emit(idx, self._pending_mic.pop(idx), np.zeros(fs, np.float32))
        mic = self._pending_mic.pop(index, None)
        if mic is None:
            mic = np.zeros(fs, np.float32)
        out = np.zeros(fs, np.float32) if pcm is None else pcm[:fs]
        self._emit(index, mic, out)

    def _emit(self, index: int, mic: np.ndarray, out: np.ndarray) -> None:
        fs = self.frame_size
        if len(out) < fs:
            out = np.concatenate([out, np.zeros(fs - len(out), np.float32)])
        if len(mic) < fs:
            mic = np.concatenate([mic, np.zeros(fs - len(mic), np.float32)])
        out = np.clip(out, -1, 1)
        self._model.write(out)
        self._mix.write(np.stack([np.clip(mic[:fs], -1, 1), out], axis=1))
        self.frames_written += 1
