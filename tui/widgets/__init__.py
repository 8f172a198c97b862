"""Dashboard widgets. They take plain view objects; `tui.app` maps the session's telemetry onto them."""

from .audio import AudioPanel, AudioView, DeviceView, LevelView
from .meters import Lane, LevelMeter, PeakHold, VadLight
from .panels import EnginePanel, EngineView, LatencyPanel, LatencyView, StageView
from .status import StatusStrip, StatusView
from .transcript import Transcript, TranscriptBuffer

__all__ = [
    "AudioPanel", "AudioView", "DeviceView", "LevelView", "Lane", "LevelMeter", "PeakHold",
    "VadLight", "EnginePanel", "EngineView", "LatencyPanel", "LatencyView", "StageView",
    "StatusStrip", "StatusView", "Transcript", "TranscriptBuffer",
]
