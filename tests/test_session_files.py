"""The threaded session through the file backend, recording, run_headless, and audio failures as
states (no PortAudio / no device) — still no audio server."""

import json
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from engine.audio import signals as S
from engine.audio.backends import BackendState, FileBackend, SoundDeviceBackend
from engine.audio.backends import sounddevice_backend as sdb
from engine.audio.backends.file_backend import write_wav
from engine.errors import AudioError
from engine.session import Session, SessionConfig, SessionState, run_headless
from engine.session.fakes import ToneFrameModel

R = 24000


def test_lockstep_file_run_is_one_frame_per_frame_and_bit_exact(tmp_path):
    x = S.speech_like(3.03, seed=5, level_dbfs=-20)
    write_wav(tmp_path / "in.wav", x)
    xin, _ = sf.read(tmp_path / "in.wav", dtype="float32")
    model = ToneFrameModel(step_ms=1.0, start_s=0.0, mode="echo")
    b = FileBackend(tmp_path / "in.wav", tmp_path / "out.wav", realtime=False)
    s = Session(model, b, config=SessionConfig(), threaded=True)
    s.start()
    assert b.wait_finished(30)
    snap = s.stop()
    y, rate = sf.read(tmp_path / "out.wav", dtype="float32")
    assert rate == R and len(y) == len(xin)
    np.testing.assert_array_equal(y, xin)  # pass-through model: exactly the input, aligned
    assert model.total_steps == int(np.ceil(len(xin) / 1920))
    assert snap.counters["catchup_drop_frames"] == 0 and snap.counters["prompt_dropped_frames"] == 0
    assert snap.audio.echo_mode == "headphones"


def test_realtime_file_run_with_recording(tmp_path):
    x = S.speech_like(1.5, seed=6, level_dbfs=-20)
    write_wav(tmp_path / "in.wav", x)
    model = ToneFrameModel(step_ms=10.0, start_s=0.05, sleep=True)
    b = FileBackend(tmp_path / "in.wav", tmp_path / "out.wav", realtime=True, tail_s=0.3)
    s = Session(model, b, persona="teacher", threaded=True, record_dir=tmp_path / "rec")
    t0 = time.monotonic()
    s.start()
    assert b.wait_finished(10)
    snap = s.stop()
    assert time.monotonic() - t0 >= 1.7
    y, _ = sf.read(tmp_path / "out.wav", dtype="float32")
    assert len(y) == pytest.approx(1.8 * R, abs=240)
    assert np.sqrt(np.mean(y[R // 2 :] ** 2)) > 0.05  # the tone played
    assert snap.frame_index >= 15
    assert snap.latency.p50_ms is not None and 90 <= snap.latency.p50_ms <= 260
    mic, _ = sf.read(tmp_path / "rec" / "mic.wav", dtype="float32")
    out, _ = sf.read(tmp_path / "rec" / "model.wav", dtype="float32")
    mix, _ = sf.read(tmp_path / "rec" / "mix.wav", dtype="float32")
    assert len(mic) == len(out) == len(mix) and len(mic) % 1920 == 0 and mix.shape[1] == 2
    np.testing.assert_allclose(mix[:, 0], mic, atol=1e-4)
    np.testing.assert_allclose(mix[:, 1], out, atol=1e-4)
    lines = [json.loads(line) for line in (tmp_path / "rec" / "events.jsonl").read_text().splitlines()]
    kinds = {e["kind"] for e in lines}
    assert {"started", "prompted", "text", "stopped"} <= kinds
    assert any(e.get("piece") == " w0" for e in lines)


def test_run_headless_files_and_status(tmp_path):
    write_wav(tmp_path / "in.wav", S.speech_like(1.0, seed=7))
    seen = []
    res = run_headless(
        ToneFrameModel(step_ms=1.0, start_s=0.0), input_wav=tmp_path / "in.wav", output_wav=tmp_path / "out.wav",
        realtime=False, status_callback=seen.append, status_interval_s=0.05,
    )
    assert res.frames == 13 and not res.interrupted and seen and seen[-1].state is SessionState.STOPPED
    assert sf.info(tmp_path / "out.wav").frames == 24000
    with pytest.raises(AudioError, match="does not exist"):
        run_headless(ToneFrameModel(), input_wav=tmp_path / "nope.wav", status_callback=lambda s: None)


def test_no_portaudio_is_a_session_state_and_a_clear_headless_error(monkeypatch):
    monkeypatch.setattr(sdb, "import_sounddevice", lambda: (None, "the PortAudio library was not found; install it with: apt-get install libportaudio2"))
    model = ToneFrameModel(start_s=0.0)
    s = Session(model, SoundDeviceBackend(), threaded=True)
    s.start()
    time.sleep(0.2)
    snap = s.snapshot
    assert snap.state is SessionState.NO_AUDIO_DEVICE and "libportaudio2" in snap.message
    assert snap.audio.state == BackendState.NO_PORTAUDIO.value
    s.stop()
    with pytest.raises(AudioError, match="PortAudio"):
        run_headless(ToneFrameModel(start_s=0.0), duration_s=1.0, status_callback=lambda s: None)


def test_model_errors_become_an_error_state():
    class Broken(ToneFrameModel):
        failed_once = False

        def step(self, pcm_in, *, force_agent_silence=False):
            if self.total_steps >= 3 and not self.failed_once:
                self.failed_once = True
                raise RuntimeError("boom")
            return super().step(pcm_in, force_agent_silence=force_agent_silence)

    from engine.audio.backends import SimulatedBackend

    b = SimulatedBackend()
    s = Session(Broken(start_s=0.0), b, config=SessionConfig(echo_mode="headphones"), threaded=False)
    s.start()
    b.advance(1.0)
    snap = s.snapshot
    assert snap.state is SessionState.ERROR and "boom" in snap.message
    assert any(e.kind == "error" for e in s.events.drain())
    # a new prefill recovers
    n = s.snapshot.frame_index
    s.reset_conversation()
    b.advance(0.5)
    assert s.snapshot.state is not SessionState.ERROR and s.snapshot.frame_index > n


def test_event_stream_is_bounded_and_listeners_do_not_block():
    from engine.session import EventStream, SessionEvent

    es = EventStream(maxsize=4)
    got = []
    es.add_listener(got.append)
    es.add_listener(lambda e: 1 / 0)  # a broken listener is counted, not raised
    for i in range(10):
        es.put(SessionEvent("text", 0.0, i))
    assert len(es) == 4 and es.dropped == 6 and len(got) == 10 and es.listener_errors == 10
    assert [e.frame for e in es.drain()] == [6, 7, 8, 9]
    assert es.get(timeout=0.01) is None
    threading.Timer(0.05, lambda: es.put(SessionEvent("x", 0.0, 0))).start()
    assert es.get(timeout=2.0).kind == "x"
