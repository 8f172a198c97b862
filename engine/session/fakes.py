"""A small deterministic `FrameModel` for tests, demos and front-end development (no MLX).

`ToneFrameModel` answers every frame at once with:
* `mode="tone"`: a sine whose frequency depends on the persona (so a persona switch is audible and
  testable) and whose amplitude encodes the step index: `0.05 * (1 + k % 8)` (see `step_of`);
* `mode="echo"`: the input frame itself (a pass-through model, for latency measurements);
* `mode="signal"`: consecutive 1920-sample slices of `signal` (looped), e.g. speech-like audio for
  echo-cancellation tests.

`force_agent_silence=True` returns zeros, text PAD (3) and the SILENCE tokens, like the real model.
Reported timings are `step_ms` (+ any `stalls[n]` for the n-th step of the model's life), split
over the stages on every frame (it has no `profile_stages` / `stage_sample_every` switch); with
`sleep=True` the call really takes that long (threaded tests), otherwise the simulated runner just
uses the figure. `available_voices()` lists `voices` (names only: the tone ignores them).
"""

from __future__ import annotations

import time
import zlib
from typing import Any, Sequence

import numpy as np

from ..frames import FrameResult

SILENCE_TOKENS = (39, 28, 11, 1, 52, 0, 54, 9)  # the tiny fixture's codes of one silent frame
PAD = 3


def persona_freq(persona: Any) -> float:
    """The tone frequency used for `persona` (200..1000 Hz, stable)."""
    if persona is None:
        return 440.0
    return 200.0 + (zlib.crc32(str(persona).encode()) % 800)


def step_of(pcm: np.ndarray) -> int:
    """Recovers `k % 8` from a tone frame's peak amplitude."""
    amp = float(np.max(np.abs(pcm)))
    return int(round(amp / 0.05)) - 1


class ToneFrameModel:
    sample_rate = 24000
    frame_size = 1920

    def __init__(
        self,
        step_ms: float = 20.0,
        start_s: float = 0.05,
        stalls: dict[int, float] | None = None,
        sleep: bool = False,
        mode: str = "tone",
        signal: np.ndarray | None = None,
        text_every: int = 4,
        context_frames: int = 3000,
        voices: Sequence[str] = ("NATF2", "NATM0"),
    ):
        self.step_ms = step_ms
        self.start_s = start_s
        self.stalls = dict(stalls or {})
        self.sleep = sleep
        self.mode = mode
        self.signal = None if signal is None else np.asarray(signal, dtype=np.float32)
        self.text_every = text_every
        self.context_frames = context_frames
        self.voices = tuple(voices)
        self.persona: Any = None
        self.starts = 0
        self.steps = 0  # steps since the last start
        self.total_steps = 0
        self.heard: list[tuple[int, bool, float]] = []  # (total step, any non-zero input, input RMS)
        self.forced: list[int] = []  # total step numbers that ran forced
        self.thread_ids: set[int] = set()
        self._phase = 0.0

    def available_voices(self) -> list[str]:
        """The voice names this model offers (like `DuplexEngine.available_voices`)."""
        return list(self.voices)

    @property
    def prompt_state(self) -> Any:
        """What the last prefill installed (the persona)."""
        return self.persona

    def start(self, persona: Any) -> float:
        import threading

        self.thread_ids.add(threading.get_ident())
        self.persona = persona
        self.starts += 1
        self.steps = 0
        self._phase = 0.0
        if self.sleep:
            time.sleep(self.start_s)
        return self.start_s

    def reset(self) -> None:
        self.steps = 0
        self._phase = 0.0

    def step(self, pcm_in: np.ndarray, *, force_agent_silence: bool = False) -> FrameResult:
        import threading

        self.thread_ids.add(threading.get_ident())
        n = self.frame_size
        x = np.asarray(pcm_in, dtype=np.float32)
        k = self.steps
        life = self.total_steps
        self.steps += 1
        self.total_steps += 1
        self.heard.append((life, bool(np.any(x)), float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) if len(x) else 0.0))
        tokens = np.zeros(17, dtype=np.int64)
        if force_agent_silence:
            self.forced.append(life)
            pcm = np.zeros(n, np.float32)
            tokens[0] = PAD
            tokens[1:9] = SILENCE_TOKENS
            text_id, text = PAD, None
        else:
            if self.mode == "echo":
                pcm = x[:n].copy() if len(x) >= n else np.concatenate([x, np.zeros(n - len(x), np.float32)])
            elif self.mode == "signal" and self.signal is not None and len(self.signal):
                L = len(self.signal)
                idx = (np.arange(k * n, (k + 1) * n)) % L
                pcm = self.signal[idx].astype(np.float32)
            else:
                f = persona_freq(self.persona)
                amp = 0.05 * (1 + k % 8)
                t = np.arange(n) / self.sample_rate
                pcm = (amp * np.sin(self._phase + 2 * np.pi * f * t)).astype(np.float32)
                self._phase = float((self._phase + 2 * np.pi * f * n / self.sample_rate) % (2 * np.pi))
            tokens[1:9] = (np.arange(8) + k) % 64
            if self.text_every and k % self.text_every == 0:
                text_id, text = 100 + k % 100, f" w{k}"
            else:
                text_id, text = PAD, None
            tokens[0] = text_id
        total = self.step_ms + self.stalls.get(life, 0.0)
        if self.sleep and total > 0:
            time.sleep(total / 1000.0)
        timings = {
            "encode": 0.1 * total,
            "temporal": 0.6 * total,
            "depth": 0.2 * total,
            "decode": 0.1 * total,
            "total": total,
        }
        return FrameResult(pcm=pcm, tokens=tokens, text_id=int(text_id), text=text, timings_ms=timings)
