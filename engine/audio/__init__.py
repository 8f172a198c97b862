"""The real-time audio layer (see docs in ../shared/spec/AUDIO.md): lock-free rings, re-framing,
streaming resampling, meters, VAD, echo handling and the device/file/simulated backends.

Nothing here imports a UI toolkit, and importing this package never touches PortAudio: the
sounddevice backend imports it only when it starts.
"""

from .aec import EchoCanceller, EchoMode, create_echo_canceller
from .backends.base import AudioBackend, BackendState, DeviceInfo
from .io import RingIO
from .meters import LevelMeter, LevelReading
from .reframe import Reframer
from .resample import StreamResampler, make_resampler
from .ring import SpscRing
from .vad import EnergyVad, VadSmoother

__all__ = [
    "AudioBackend",
    "BackendState",
    "DeviceInfo",
    "EchoCanceller",
    "EchoMode",
    "EnergyVad",
    "LevelMeter",
    "LevelReading",
    "Reframer",
    "RingIO",
    "SpscRing",
    "StreamResampler",
    "VadSmoother",
    "create_echo_canceller",
    "make_resampler",
]
