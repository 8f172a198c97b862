"""The audio panel: MIC / CLEAN / SPK meters, the voice-activity light, lanes, devices."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from .meters import Lane, LevelMeter, VadLight

SILENCE_DB = -45.0  # model output quieter than this counts as silent on the model lane
FLOOR_DB = -60.0


@dataclass(frozen=True)
class LevelView:
    rms_db: float
    peak_db: float | None = None
    hold_db: float | None = None
    clipped: bool = False


@dataclass(frozen=True)
class AudioView:
    mic: LevelView
    spk: LevelView
    clean: LevelView | None = None
    vad: bool = False
    mic_muted: bool = False
    spk_muted: bool = False


@dataclass(frozen=True)
class DeviceView:
    input_name: str = "–"
    output_name: str = "–"
    input_rate: str = ""
    output_rate: str = ""
    echo: str = ""  # "AEC on −41 dB", "headphones (no AEC)", "mic gate"


class AudioPanel(Vertical):
    DEFAULT_CSS = """
    AudioPanel { height: auto; }
    AudioPanel > #vad-row { height: 1; }
    AudioPanel > #vad-row > #echo {
        width: 1fr; color: $text-muted; padding-left: 2; text-wrap: nowrap; text-overflow: ellipsis;
    }
    AudioPanel > #lane-you > .lane--bar { color: $lane-you; }
    AudioPanel > #lane-model > .lane--bar { color: $lane-model; }
    AudioPanel > #devices {
        height: auto; color: $text-muted; text-wrap: nowrap; text-overflow: ellipsis;
    }
    AudioPanel > #silent-hint { height: auto; color: $error; text-style: bold; display: none; }
    AudioPanel.-silent-mic > #silent-hint { display: block; }
    """

    def __init__(self, *, show_clean: bool = False, lane_window_s: float = 20.0,
                 clock: Callable[[], float] = time.monotonic, id: str | None = None,
                 classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.show_clean = show_clean
        self.lane_window_s = lane_window_s
        self.clock = clock
        self._devices: DeviceView | None = None

    def compose(self) -> ComposeResult:
        yield LevelMeter("MIC", clock=self.clock, id="meter-mic")
        meter = LevelMeter("CLEAN", clock=self.clock, show_peak=False, id="meter-clean")
        meter.display = self.show_clean
        yield meter
        yield LevelMeter("SPK", clock=self.clock, id="meter-spk")
        with Horizontal(id="vad-row"):
            yield VadLight(id="vad")
            yield Static("", id="echo")
        yield Lane("you", window_s=self.lane_window_s, id="lane-you")
        yield Lane("model", window_s=self.lane_window_s, id="lane-model")
        yield Static("", id="devices")
        yield Static("", id="silent-hint")

    # -- updates ------------------------------------------------------------------------------

    def set_levels(self, view: AudioView) -> None:
        """Meters and the VAD light (the fast rate)."""
        mic = self.query_one("#meter-mic", LevelMeter)
        mic.set_level(view.mic.rms_db, view.mic.peak_db, view.mic.hold_db,
                      muted="MUTED" if view.mic_muted else None, clipped=view.mic.clipped)
        spk = self.query_one("#meter-spk", LevelMeter)
        spk.set_level(view.spk.rms_db, view.spk.peak_db, view.spk.hold_db,
                      muted="DEAFENED" if view.spk_muted else None, clipped=view.spk.clipped)
        clean = self.query_one("#meter-clean", LevelMeter)
        if view.clean is not None:
            if not clean.display:
                clean.display = True
            clean.set_level(view.clean.rms_db, view.clean.peak_db, view.clean.hold_db,
                            muted="MUTED" if view.mic_muted else None)
        self.query_one(VadLight).set_active(view.vad and not view.mic_muted)

    def push_lanes(self, t: float, vad: bool, model_db: float) -> None:
        self.query_one("#lane-you", Lane).push(t, 1.0 if vad else 0.0)
        level = 0.0
        if model_db is not None and model_db > SILENCE_DB:
            level = (model_db - FLOOR_DB) / -FLOOR_DB
        self.query_one("#lane-model", Lane).push(t, level)

    def update_graphs(self) -> None:
        self.query_one("#lane-you", Lane).update_display()
        self.query_one("#lane-model", Lane).update_display()

    def clear_lanes(self) -> None:
        self.query_one("#lane-you", Lane).clear()
        self.query_one("#lane-model", Lane).clear()

    def reset_peaks(self) -> None:
        for meter in self.query(LevelMeter):
            meter.reset_peaks()

    def set_devices(self, devices: DeviceView) -> None:
        if devices == self._devices:
            return
        self._devices = devices
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append("in  ", "bold")
        text.append(f"{devices.input_name} {devices.input_rate}".rstrip())
        text.append("\nout ", "bold")
        text.append(f"{devices.output_name} {devices.output_rate}".rstrip())
        self.query_one("#devices", Static).update(text)
        self.query_one("#echo", Static).update(devices.echo)

    def set_silent_mic(self, silent: bool) -> None:
        """Shows or hides the digital-silence hint (the macOS microphone-permission symptom)."""
        if silent == self.has_class("-silent-mic"):
            return
        self.set_class(silent, "-silent-mic")
        if silent:
            self.query_one("#silent-hint", Static).update(
                "⚠ SILENT MIC: the microphone delivers digital silence (exact zeros for over 2 s). "
                "Check the input device; on macOS give the terminal (or tmux / sshd) microphone "
                "permission in System Settings › Privacy & Security › Microphone.")
