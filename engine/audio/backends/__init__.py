"""Audio backends: real devices (sounddevice/PortAudio), WAV files, and a simulated clock for tests."""

from .base import AudioBackend, BackendState, DeviceInfo
from .fake_backend import SimulatedBackend
from .file_backend import FileBackend
from .sounddevice_backend import SoundDeviceBackend

__all__ = ["AudioBackend", "BackendState", "DeviceInfo", "FileBackend", "SimulatedBackend", "SoundDeviceBackend"]
