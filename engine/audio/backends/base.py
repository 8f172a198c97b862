"""The audio backend interface (AUDIO.md §3 "Interfaces for testability").

A backend moves samples between devices (or files, or a simulation) and two callbacks:

* `on_input(samples, adc_time, flags)`: `samples` is a 1-D float32 view at `input_rate`, valid only
  during the call; `adc_time` is the device time of its first sample; `flags` are PortAudio's bits.
* `on_output(buffer, dac_time, flags) -> int`: fill the 1-D float32 `buffer` at `output_rate`;
  `dac_time` is when its first sample reaches the DAC. Returns how many queued samples were used
  (only the lock-step file backend cares).

Both come from `engine.audio.io.RingIO`; the session wires them. A backend never raises for device
problems: it sets `state` and a one-sentence `message` instead (no PortAudio, no device, refused,
lost), and keeps its own counters in `stats()`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import numpy as np

InputCallback = Callable[[np.ndarray, float, int], None]
OutputCallback = Callable[[np.ndarray, float, int], int]


class BackendState(str, Enum):
    CLOSED = "closed"  # not started, or stopped
    OPENING = "opening"
    RUNNING = "running"
    NO_PORTAUDIO = "no_portaudio"  # the PortAudio library is missing
    NO_DEVICE = "no_device"  # no input or output device
    REFUSED = "refused"  # the device would not open with any usable settings
    LOST = "lost"  # callbacks stopped (watchdog); recovering in the background
    FINISHED = "finished"  # a file backend reached the end of its input
    ERROR = "error"

    @property
    def ok(self) -> bool:
        return self in (BackendState.RUNNING, BackendState.FINISHED)

    @property
    def failed(self) -> bool:
        return self in (BackendState.NO_PORTAUDIO, BackendState.NO_DEVICE, BackendState.REFUSED, BackendState.ERROR)


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    max_input_channels: int
    max_output_channels: int
    default_samplerate: float
    hostapi: str = ""
    is_default_input: bool = False
    is_default_output: bool = False


class AudioBackend(ABC):
    """Base class. Subclasses set `input_rate` / `output_rate` when they open, bump `generation`
    on every (re)open, and keep `state` / `message` current."""

    name = "backend"
    #: False for the lock-step file backend: the session then never drops, pads or trims.
    realtime = True
    #: True when exact digital silence on the input means a permission / device problem.
    detects_silent_mic = False
    #: echo handling when the session config does not choose (files have no acoustic echo)
    default_echo_mode = "aec"

    def __init__(self) -> None:
        self.state = BackendState.CLOSED
        self.message = ""
        self.input_rate = 0
        self.output_rate = 0
        self.generation = 0
        self.input_device_name = ""
        self.output_device_name = ""
        self.input_latency_s = 0.0
        self.output_latency_s = 0.0
        self.blocksize = 0
        self.watchdog_fires = 0
        self.restarts = 0
        self._on_input: InputCallback | None = None
        self._on_output: OutputCallback | None = None
        self._wake: Callable[[], None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    @abstractmethod
    def start(self, on_input: InputCallback, on_output: OutputCallback, wake: Callable[[], None] | None = None) -> None:
        """Open and start. Never raises for device problems (see `state`). `wake`, when given, is
        called (outside any real-time callback) when the engine should look at the rings now."""

    @abstractmethod
    def stop(self) -> None:
        """Stop and close; must return promptly even when the device hangs."""

    def restart(self) -> None:
        """Close and reopen the devices (after a silent-mic warning or a device change)."""
        on_in, on_out, wake = self._on_input, self._on_output, self._wake
        self.stop()
        if on_in is not None and on_out is not None:
            self.start(on_in, on_out, wake)

    # -- information ------------------------------------------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        return []

    def clock(self) -> float:
        """The time base of the callback stamps (seconds)."""
        return time.monotonic()

    @property
    def finished(self) -> bool:
        return self.state is BackendState.FINISHED

    def stats(self) -> dict:
        return {
            "backend": self.name,
            "state": self.state.value,
            "message": self.message,
            "input_device": self.input_device_name,
            "output_device": self.output_device_name,
            "input_rate": self.input_rate,
            "output_rate": self.output_rate,
            "blocksize": self.blocksize,
            "input_latency_ms": round(self.input_latency_s * 1000, 1),
            "output_latency_ms": round(self.output_latency_s * 1000, 1),
            "generation": self.generation,
            "watchdog_fires": self.watchdog_fires,
            "restarts": self.restarts,
        }

    def _set_state(self, state: BackendState, message: str = "") -> None:
        self.state = state
        self.message = message
