"""Backends without an audio server: the simulated clock, the file backend, and the sounddevice
backend's state handling, rate fallback and watchdog against a fake `sounddevice` module."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from engine.audio import signals as S
from engine.audio.backends import BackendState, FileBackend, SimulatedBackend, SoundDeviceBackend
from engine.audio.backends import sounddevice_backend as sdb
from engine.audio.backends.file_backend import read_wav_24k, write_wav
from engine.audio.io import RingIO
from engine.errors import AudioError


# ------------------------------------------------------------------------------------ simulated
def test_simulated_backend_fires_callbacks_on_its_clock():
    b = SimulatedBackend(input_signal=S.sine(2.0, 440.0, 0.5))
    io = RingIO(48000)
    ticks = []
    b.tick_hook = lambda: ticks.append(b.now)
    b.start(io.on_input, io.on_output)
    b.advance(1.0)
    assert b.callbacks_in == 100 and b.callbacks_out == 100
    assert len(ticks) >= 300  # 200 ticks + one after each input callback
    got = io.in_ring.read()
    np.testing.assert_allclose(got, S.sine(1.0, 440.0, 0.5), atol=1e-6)
    idx, t = io.in_stamp
    assert idx == 24000 - 240 and t == pytest.approx(1.0 - 0.01 - 0.01)


def test_simulated_drift_stall_and_flags():
    b = SimulatedBackend(input_drift_ppm=1000.0)
    io = RingIO(96000)
    b.start(io.on_input, io.on_output)
    b.inject_stall(0.5, 0.2, direction="input", deliver_late=True)
    b.inject_flags(0.3, 4, direction="output")
    b.advance(10.0)
    assert b.callbacks_in == 1001  # 1000 ppm faster clock
    assert b.callbacks_out == 1000
    assert b.late_callbacks == 20
    assert io.flags_dict()["output_underflow"] == 1


def test_simulated_device_loss_fires_watchdog_and_recovers():
    b = SimulatedBackend()
    io = RingIO(48000)
    b.start(io.on_input, io.on_output)
    b.inject_device_loss(1.0, recover_after_s=2.0)
    b.advance(1.45)
    assert b.state is BackendState.RUNNING
    b.advance(0.1)
    assert b.state is BackendState.LOST and b.watchdog_fires == 1
    n = b.callbacks_in
    b.advance(1.0)
    assert b.callbacks_in == n
    b.advance(1.0)
    assert b.state is BackendState.RUNNING and b.restarts == 1 and b.generation == 2
    assert b.callbacks_in > n


# ------------------------------------------------------------------------------------ files
def test_read_wav_converts_to_24k_mono(tmp_path):
    import soundfile as sf

    x = S.sine(1.0, 1000.0, 0.5, rate=48000)
    sf.write(tmp_path / "a.wav", np.stack([x, x], axis=1), 48000, subtype="FLOAT")
    y = read_wav_24k(tmp_path / "a.wav")
    assert len(y) == pytest.approx(24000, abs=2)
    assert np.sqrt(np.mean(y[1000:-1000] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)
    with pytest.raises(AudioError, match="does not exist"):
        read_wav_24k(tmp_path / "missing.wav")
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    with pytest.raises(AudioError, match="not an audio file that can be read.*convert it"):
        read_wav_24k(tmp_path / "bad.wav")


def test_file_backend_bad_input_is_a_state_not_a_crash(tmp_path):
    b = FileBackend(tmp_path / "missing.wav")
    b.start(lambda *a: None, lambda *a: 0)
    assert b.state is BackendState.ERROR and "does not exist" in b.message


def test_file_backend_realtime_pace(tmp_path):
    write_wav(tmp_path / "in.wav", S.sine(0.5, 300.0, 0.3))
    b = FileBackend(tmp_path / "in.wav", tmp_path / "out.wav", realtime=True, tail_s=0.1)
    io = RingIO(48000)
    t0 = time.monotonic()
    b.start(io.on_input, io.on_output)
    assert b.wait_finished(5.0)
    dt = time.monotonic() - t0
    assert 0.55 <= dt < 1.5
    assert b.state is BackendState.FINISHED
    assert io.in_ring.available() == 0.6 * 24000
    assert (tmp_path / "out.wav").exists()


# ------------------------------------------------------------------------------------ sounddevice (faked)
class _FakeStream:
    def __init__(self, sd, device=None, samplerate=None, blocksize=None, channels=None, dtype=None, latency=None, callback=None, duplex=False):
        self.sd = sd
        self.samplerate = samplerate
        self.blocksize = blocksize or samplerate // 100
        self.callback = callback
        self.latency = (0.02, 0.03) if duplex else 0.02
        self.duplex = duplex
        self.kind = "out"
        self._stop = threading.Event()
        self._thread = None
        sd.streams.append(self)

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        n = self.blocksize
        t = 0.0
        status = SimpleNamespace(_flags=0)
        while not self._stop.is_set():
            time.sleep(n / self.samplerate)
            if not self.sd.alive:
                continue  # the server died: no more callbacks
            t += n / self.samplerate
            ti = SimpleNamespace(inputBufferAdcTime=t, outputBufferDacTime=t + 0.02, currentTime=t)
            data = np.zeros((n, 1), np.float32)
            if self.sd.signal is not None:
                k = int(round(t * self.samplerate))
                data[:, 0] = self.sd.signal(k, n, self.samplerate)
            if self.kind == "in":
                self.callback(data, n, ti, status)
            else:
                out = np.zeros((n, 1), np.float32)
                self.callback(out, n, ti, status)

    def abort(self, ignore_errors=True):
        if self.sd.hang_close and not self.sd.alive:
            threading.Event().wait()  # hangs forever, like a dead PulseAudio stream
        self._stop.set()

    def close(self, ignore_errors=True):
        self._stop.set()


class FakeSD:
    class PortAudioError(Exception):
        pass

    def __init__(self, devices=2, refuse=(), hang_close=False, signal=None):
        self.n = devices
        self.refuse = set(refuse)
        self.alive = True
        self.hang_close = hang_close
        self.signal = signal
        self.streams = []
        self.inits = 0
        self.default = SimpleNamespace(device=[0, 1])

    def get_portaudio_version(self):
        return (1, "FakeAudio V19")

    def _dev(self, i):
        return {"index": i, "name": f"fake{i}", "hostapi": 0, "max_input_channels": 2 if i == 0 else 0,
                "max_output_channels": 2 if i == 1 else 0, "default_samplerate": 48000.0}

    def query_devices(self, device=None, kind=None):
        if kind is None and device is None:
            return [self._dev(i) for i in range(self.n)]
        if self.n == 0:
            raise self.PortAudioError("Error querying device -1")
        return self._dev(0 if kind == "input" else 1)

    def query_hostapis(self):
        return [{"name": "fake"}]

    def check_input_settings(self, device=None, channels=None, dtype=None, samplerate=None):
        if samplerate in self.refuse or "all" in self.refuse:
            raise self.PortAudioError("Invalid sample rate")

    check_output_settings = check_input_settings

    def InputStream(self, **kw):
        s = _FakeStream(self, **kw)
        s.kind = "in"
        return s

    def OutputStream(self, **kw):
        return _FakeStream(self, **kw)

    def _terminate(self):
        pass

    def _initialize(self):
        self.inits += 1


def _use(monkeypatch, fake):
    monkeypatch.setattr(sdb, "import_sounddevice", lambda: (fake, "") if fake is not None else (None, "the PortAudio library was not found; install it with: apt-get install libportaudio2"))


def _wait(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_no_portaudio_is_a_clear_state(monkeypatch):
    _use(monkeypatch, None)
    b = SoundDeviceBackend()
    b.start(lambda *a: None, lambda *a: 0)
    assert b.state is BackendState.NO_PORTAUDIO and "libportaudio2" in b.message
    b.stop()
    assert b.devices() == []


def test_no_device_is_a_clear_state(monkeypatch):
    _use(monkeypatch, FakeSD(devices=0))
    b = SoundDeviceBackend()
    b.start(lambda *a: None, lambda *a: 0)
    assert b.state is BackendState.NO_DEVICE and "no audio device" in b.message
    b.stop()


def test_refused_device_is_a_clear_state(monkeypatch):
    _use(monkeypatch, FakeSD(refuse=("all",)))
    b = SoundDeviceBackend()
    b.start(lambda *a: None, lambda *a: 0)
    assert b.state is BackendState.REFUSED and "refused" in b.message
    b.stop()


def test_24k_first_then_native_rate(monkeypatch):
    fake = FakeSD()
    _use(monkeypatch, fake)
    b = SoundDeviceBackend(watchdog_s=5.0)
    io = RingIO(96000)
    b.start(io.on_input, io.on_output)
    assert b.state is BackendState.RUNNING and b.input_rate == 24000 and b.blocksize == 240
    b.stop()
    fake2 = FakeSD(refuse=(24000,))
    _use(monkeypatch, fake2)
    b2 = SoundDeviceBackend(watchdog_s=5.0)
    b2.start(io.on_input, io.on_output)
    assert b2.state is BackendState.RUNNING and b2.input_rate == 48000 and b2.output_rate == 48000
    assert b2.resampled and b2.blocksize == 480
    assert [d.name for d in b2.devices()] == ["fake0", "fake1"]
    b2.stop()
    assert b2.state is BackendState.CLOSED


def test_watchdog_fires_and_device_is_reopened(monkeypatch):
    fake = FakeSD(hang_close=True)
    _use(monkeypatch, fake)
    b = SoundDeviceBackend(watchdog_s=0.3, poll_s=0.05, reopen_interval_s=0.2, close_timeout_s=0.3)
    io = RingIO(96000)
    b.start(io.on_input, io.on_output)
    assert _wait(lambda: io.in_callbacks > 5)
    fake.alive = False  # the server dies: callbacks stop, abort() hangs
    t0 = time.monotonic()
    assert _wait(lambda: b.state is BackendState.LOST, 3.0)
    assert time.monotonic() - t0 < 1.5
    assert b.watchdog_fires == 1
    assert _wait(lambda: b.hung_closes == 1, 3.0)  # teardown gave up instead of hanging
    fake.alive = True  # the server is back
    assert _wait(lambda: b.state is BackendState.RUNNING and b.restarts == 1, 5.0)
    n = io.in_callbacks
    assert _wait(lambda: io.in_callbacks > n + 3)
    t1 = time.monotonic()
    fake.alive = False
    fake.hang_close = True
    b.stop()  # returns promptly although the streams hang
    assert time.monotonic() - t1 < 3.0
