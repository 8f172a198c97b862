"""Echo handling (AUDIO.md §8): what the model hears is the mic minus its own voice.

Modes, chosen by a flag (`EchoMode`):
* `aec` (default): WebRTC AEC3 through pywebrtc-audio's `AudioProcessor` at 24 kHz, NS and AGC off.
  Fed in 10 ms steps with the mic and the reference (exactly what played, time-aligned by the
  session). Its `speech_probability` doubles as the VAD.
* `headphones`: no echo cancellation (pass-through); the same processor, with everything off, still
  gives the speech probability when pywebrtc-audio is installed.
* `gate`: mic gate, ducking the mic by 25 dB while the model's output is loud. For rooms where the
  AEC cannot converge; it breaks barge-in, so it is a user choice.

When `aec` is asked for and pywebrtc-audio is missing, `create_echo_canceller` falls back to the
gate and says so in `fallback_reason`. One instance per thread (the WebRTC objects are not
thread-safe); the session uses it on its engine thread only.
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np


class EchoMode(str, Enum):
    AEC = "aec"
    HEADPHONES = "headphones"
    GATE = "gate"

    @classmethod
    def parse(cls, value: "EchoMode | str") -> "EchoMode":
        if isinstance(value, EchoMode):
            return value
        v = str(value).strip().lower()
        aliases = {"off": "headphones", "none": "headphones", "webrtc": "aec", "on": "aec", "mic-gate": "gate", "micgate": "gate"}
        v = aliases.get(v, v)
        try:
            return cls(v)
        except ValueError:
            raise ValueError(f"unknown echo mode {value!r}: use aec, headphones or gate") from None

    def next(self) -> "EchoMode":
        order = [EchoMode.AEC, EchoMode.HEADPHONES, EchoMode.GATE]
        return order[(order.index(self) + 1) % len(order)]


def webrtc_available() -> bool:
    try:
        import pywebrtc_audio  # noqa: F401
    except Exception:
        return False
    return True


class EchoCanceller:
    """Interface: `process(mic, ref)` returns the cleaned mic (same length, float32)."""

    mode: EchoMode = EchoMode.HEADPHONES
    fallback_reason: str | None = None

    def process(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def speech_probability(self) -> float | None:
        """Mean speech probability over the last `process` call, or None when not computed."""
        return None

    @property
    def sub_probabilities(self) -> list[float]:
        return []

    def set_delay_ms(self, ms: int) -> None:
        pass

    def reset(self) -> None:
        pass

    def describe(self) -> str:
        return self.mode.value


class _WebRtcBase(EchoCanceller):
    def __init__(self, sample_rate: int, aec: bool, delay_ms: int = 0, noise_suppression: bool = False):
        from pywebrtc_audio import AudioProcessor

        self.sample_rate = int(sample_rate)
        self.sub = self.sample_rate // 100
        self._aec = aec
        self._ap = AudioProcessor(
            sample_rate=self.sample_rate,
            num_channels=1,
            echo_cancellation=aec,
            noise_suppression=noise_suppression,
            high_pass_filter=False,
            auto_gain_control=False,
            stream_delay_ms=int(delay_ms),
        )
        self._probs: list[float] = []

    def _run(self, mic: np.ndarray, ref: np.ndarray | None) -> np.ndarray:
        mic = np.ascontiguousarray(mic, dtype=np.float32)
        n = len(mic)
        out = np.empty(n, dtype=np.float32)
        probs = []
        sub = self.sub
        ap = self._ap
        for i in range(0, n - n % sub, sub):
            m = mic[i : i + sub]
            if ref is not None:
                out[i : i + sub] = ap.process(m, np.ascontiguousarray(ref[i : i + sub], dtype=np.float32))
            else:
                out[i : i + sub] = ap.process(m)
            probs.append(float(ap.speech_probability))
        if n % sub:  # not expected (frames are multiples of 10 ms): pass the tail through
            out[n - n % sub :] = mic[n - n % sub :]
        self._probs = probs
        return out

    @property
    def speech_probability(self) -> float | None:
        if not self._probs:
            return None
        return float(np.mean(self._probs))

    @property
    def sub_probabilities(self) -> list[float]:
        return list(self._probs)

    def set_delay_ms(self, ms: int) -> None:
        self._ap.stream_delay_ms = int(max(0, ms))

    def reset(self) -> None:
        self._ap.reset()


class WebRtcEchoCanceller(_WebRtcBase):
    """AEC3 (pywebrtc-audio 0.2.0 `AudioProcessor`), 10 ms steps, NS/AGC off by default."""

    mode = EchoMode.AEC

    def __init__(self, sample_rate: int = 24000, delay_ms: int = 0, noise_suppression: bool = False):
        super().__init__(sample_rate, aec=True, delay_ms=delay_ms, noise_suppression=noise_suppression)

    def process(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        return self._run(mic, ref)

    def describe(self) -> str:
        return "aec (WebRTC AEC3)"


class HeadphonesMode(EchoCanceller):
    """No echo cancellation. Uses the WebRTC analysis (everything off) for speech probability when
    pywebrtc-audio is installed; the mic passes through unchanged."""

    mode = EchoMode.HEADPHONES

    def __init__(self, sample_rate: int = 24000):
        self._vad = None
        if webrtc_available():
            try:
                self._vad = _WebRtcBase(sample_rate, aec=False)
            except Exception:
                self._vad = None

    def process(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        mic = np.asarray(mic, dtype=np.float32)
        if self._vad is not None:
            self._vad._run(mic, None)
        return mic

    @property
    def speech_probability(self) -> float | None:
        return None if self._vad is None else self._vad.speech_probability

    @property
    def sub_probabilities(self) -> list[float]:
        return [] if self._vad is None else self._vad.sub_probabilities

    def reset(self) -> None:
        if self._vad is not None:
            self._vad.reset()

    def describe(self) -> str:
        return "headphones (echo cancellation off)"


class MicGate(EchoCanceller):
    """Ducks the mic by `duck_db` while the reference (what played) is above `threshold_dbfs`.

    The reference envelope attacks at once and releases after `hold_ms` plus the echo tail; the gain
    ramps down in `attack_ms` and back up in `release_ms` so there are no clicks."""

    mode = EchoMode.GATE

    def __init__(
        self,
        sample_rate: int = 24000,
        threshold_dbfs: float = -45.0,
        duck_db: float = 25.0,
        hold_ms: float = 150.0,
        attack_ms: float = 5.0,
        release_ms: float = 60.0,
    ):
        self.sample_rate = int(sample_rate)
        self.sub = self.sample_rate // 100
        self.threshold_ms = 10.0 ** (threshold_dbfs / 10.0)
        self.duck_gain = 10.0 ** (-duck_db / 20.0)
        self._hold_blocks = int(round(hold_ms / 10.0))
        self._down_step = (1.0 - self.duck_gain) / max(1.0, attack_ms / 1000.0 * self.sample_rate)
        self._up_step = (1.0 - self.duck_gain) / max(1.0, release_ms / 1000.0 * self.sample_rate)
        self.reset()

    def reset(self) -> None:
        self._gain = 1.0
        self._hold = 0
        self.ducked_fraction = 0.0

    def process(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        mic = np.asarray(mic, dtype=np.float32)
        ref = np.asarray(ref, dtype=np.float32)
        n = len(mic)
        out = np.empty(n, dtype=np.float32)
        sub = self.sub
        ducked = 0
        nb = 0
        for i in range(0, n, sub):
            m = mic[i : i + sub]
            r = ref[i : i + sub] if i < len(ref) else np.zeros(0, np.float32)
            level = float(np.dot(r, r)) / max(1, len(r))
            if level > self.threshold_ms:
                self._hold = self._hold_blocks
            elif self._hold > 0:
                self._hold -= 1
            target = self.duck_gain if self._hold > 0 else 1.0
            k = len(m)
            if target < self._gain:
                g = np.maximum(self._gain - self._down_step * np.arange(1, k + 1), target)
            elif target > self._gain:
                g = np.minimum(self._gain + self._up_step * np.arange(1, k + 1), target)
            else:
                g = None
            if g is None:
                out[i : i + k] = m * self._gain
            else:
                out[i : i + k] = m * g.astype(np.float32)
                self._gain = float(g[-1])
            ducked += self._hold > 0
            nb += 1
        self.ducked_fraction = ducked / max(1, nb)
        return out

    def describe(self) -> str:
        return "gate (mic ducked while the model speaks)"


def create_echo_canceller(
    mode: EchoMode | str = EchoMode.AEC,
    sample_rate: int = 24000,
    delay_ms: int = 0,
    noise_suppression: bool = False,
) -> EchoCanceller:
    """The canceller for `mode`. `aec` without pywebrtc-audio falls back to the mic gate; the reason
    is in `.fallback_reason`."""
    mode = EchoMode.parse(mode)
    if mode is EchoMode.AEC:
        try:
            return WebRtcEchoCanceller(sample_rate, delay_ms=delay_ms, noise_suppression=noise_suppression)
        except ImportError:
            gate = MicGate(sample_rate)
            gate.fallback_reason = (
                "echo cancellation needs pywebrtc-audio (pip install pywebrtc-audio==0.2.0); using the mic gate"
            )
            return gate
        except Exception as e:  # a broken binary wheel must not stop the session
            gate = MicGate(sample_rate)
            gate.fallback_reason = f"echo cancellation failed to start ({e}); using the mic gate"
            return gate
    if mode is EchoMode.GATE:
        return MicGate(sample_rate)
    return HeadphonesMode(sample_rate)


def erle_db(mic: np.ndarray, clean: np.ndarray) -> float:
    """Echo return loss enhancement: mic energy over cleaned energy, in dB."""
    em = float(np.dot(mic, mic))
    ec = float(np.dot(clean, clean))
    if em <= 1e-20:
        return 0.0
    return 10.0 * math.log10(em / max(ec, 1e-20))
