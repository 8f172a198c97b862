"""Real-time policies on a simulated clock (AUDIO.md §6, §7; issue 6 acceptance): counters move
when stalls are injected, and latency is bounded again after a stall."""

import numpy as np
import pytest

from engine.audio import signals as S
from engine.audio.backends import SimulatedBackend
from engine.session import EventKind, Session, SessionConfig, SessionState
from engine.session.fakes import ToneFrameModel

R = 24000
BASE_LATENCY = 160.0  # 80 ms frame + 30 ms step + 20 ms slack + 20 ms output + 10 ms input latency


def make(model=None, cfg=None, **backend_kw):
    model = model or ToneFrameModel(step_ms=30.0, start_s=0.2)
    backend_kw.setdefault("input_signal", S.speech_like(5.0, seed=1, level_dbfs=-25))
    backend_kw.setdefault("loop_input", True)
    b = SimulatedBackend(**backend_kw)
    s = Session(model, b, persona="teacher", config=cfg or SessionConfig(echo_mode="headphones"), threaded=False)
    recs = []
    s.add_frame_listener(recs.append)
    s.start()
    return s, b, model, recs


def latencies(recs, since_index=0):
    return [r.latency_ms for r in recs if r.latency_ms is not None and r.index >= since_index]


def test_steady_state_has_no_glitches_and_fixed_latency():
    s, b, m, recs = make()
    b.advance(10.0)
    c = s.snapshot.counters
    for k in ("catchup_drop_frames", "out_starved_callbacks", "out_trimmed_ms", "out_pad_ms", "in_ring_full_drops", "out_ring_full_drops"):
        assert c[k] == 0, k
    lat = latencies(recs)
    assert max(lat) - min(lat) < 1.0 and np.median(lat) == pytest.approx(BASE_LATENCY, abs=8)
    assert not s.snapshot.glitch and not s.snapshot.behind


def test_long_model_stall_drops_input_and_latency_recovers():
    model = ToneFrameModel(step_ms=30.0, start_s=0.2, stalls={40: 450.0})
    s, b, m, recs = make(model=model)
    b.advance(10.0)
    c = s.snapshot.counters
    assert c["catchup_drop_frames"] >= 1 and c["catchup_dropped_ms"] == 80 * c["catchup_drop_frames"]
    assert c["out_starved_callbacks"] >= 20 and c["out_starved_ms"] >= 200
    assert any(r.dropped == "catchup" for r in recs)
    stall_frame = next(r.index for r in recs if r.result is not None and m.total_steps and r.index >= 40)
    lat_after = latencies(recs, since_index=stall_frame + 20)
    # bounded again: at most the trim threshold above the slack target (60 - 20 ms) over the base
    assert len(lat_after) > 40 and max(lat_after) <= BASE_LATENCY + 45
    kinds = [(e.kind, e.data.get("counter")) for e in s.events.drain()]
    assert (EventKind.GLITCH, "catchup_drop_frames") in kinds and (EventKind.GLITCH, "out_starved_callbacks") in kinds


def test_short_stalls_are_trimmed_back():
    """Stalls short enough to keep all frames make the model catch up in a burst; the queued excess
    is trimmed afterwards (the no-trim policy would keep the extra latency forever)."""
    model = ToneFrameModel(step_ms=20.0, start_s=0.2, stalls={30: 200.0, 60: 200.0, 90: 200.0})
    s, b, m, recs = make(model=model)
    b.advance(12.0)
    c = s.snapshot.counters
    assert c["catchup_drop_frames"] == 0
    assert c["out_trimmed_ms"] > 50 and c["out_starved_callbacks"] > 0
    lat = latencies(recs)
    assert max(lat) > BASE_LATENCY + 60  # the burst pushed it up...
    assert max(latencies(recs, since_index=110)) <= BASE_LATENCY + 15  # ...and it came back down


def test_late_device_callbacks_burst_and_recover():
    s, b, m, recs = make()
    b.inject_stall(3.0, 0.35, direction="both", deliver_late=True)
    b.advance(8.0)
    c = s.snapshot.counters
    assert b.late_callbacks == 70
    assert m.total_steps >= 90  # every input frame still reached the model or was counted as dropped
    assert c["frames_in"] == c["model_frames"] + c["catchup_drop_frames"] + c["prompt_dropped_frames"] + c["pending_frames"]
    assert max(latencies(recs, since_index=60)) <= BASE_LATENCY + 45


def test_xrun_flags_are_counted():
    s, b, m, recs = make()
    b.inject_flags(1.0, 4, "output")  # output underflow
    b.inject_flags(1.5, 2, "input")  # input overflow
    b.advance(2.0)
    c = s.snapshot.counters
    assert c["output_underflow"] == 1 and c["input_overflow"] == 1
    assert s.snapshot.glitch


def test_device_loss_fires_watchdog_keeps_model_fed_and_recovers():
    s, b, m, recs = make()
    b.inject_device_loss(2.0, recover_after_s=2.5)
    b.advance(2.6)
    snap = s.snapshot
    assert snap.state is SessionState.DEVICE_LOST and "no callbacks" in snap.message
    assert snap.counters["watchdog_fires"] == 1
    n = m.total_steps
    b.advance(1.5)
    assert m.total_steps - n >= 17  # silent frames keep the model's clock running
    assert s.snapshot.counters["synth_frames"] >= 20
    assert all(not r.model_in.any() for r in recs if r.index >= recs[-1].index - 10)
    b.advance(4.0)
    snap = s.snapshot
    assert snap.state is SessionState.SPEAKING and snap.counters["device_reopens"] == 1
    last = recs[-1].index
    lat = latencies(recs, since_index=last - 30)
    assert len(lat) > 25 and max(lat) <= BASE_LATENCY + 45
    kinds = [e.kind for e in s.events.drain()]
    assert EventKind.WATCHDOG in kinds and EventKind.AUDIO in kinds


@pytest.mark.parametrize("ppm", [+3000.0, -3000.0])
def test_clock_drift_between_devices_stays_bounded(ppm):
    s, b, m, recs = make(input_drift_ppm=ppm)
    b.advance(30.0)
    c = s.snapshot.counters
    lat = latencies(recs, since_index=200)
    # a sawtooth between the slack target and the trim threshold (60 ms), never beyond
    assert BASE_LATENCY - 30 < min(lat) and max(lat) < BASE_LATENCY + 60
    if ppm > 0:
        assert c["out_trimmed_ms"] > 30  # the input (and so the model) runs fast: excess trimmed
    else:
        assert c["out_pad_ms"] + c["out_starved_ms"] > 30  # it runs slow: re-primed with silence


def test_resampled_devices_at_48k_with_drift_correction():
    model = ToneFrameModel(step_ms=30.0, start_s=0.2, mode="echo")
    sine48 = S.sine(20.0, 1000.0, 0.5, rate=48000)
    s, b, m, recs = make(model=model, input_rate=48000, output_rate=48000, input_signal=sine48, output_drift_ppm=-200.0)
    b.advance(15.0)
    snap = s.snapshot
    assert snap.audio.resampled and snap.audio.input_rate == 48000
    # what the model heard: a clean 1 kHz sine at 24 kHz
    mic = np.concatenate([r.mic for r in recs[20:40]])
    assert np.sqrt(np.mean(mic**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)
    played = b.played_audio()[-48000 * 3 :]
    assert np.sqrt(np.mean(played**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
    spec = np.abs(np.fft.rfft(played * np.hanning(len(played))))
    assert np.fft.rfftfreq(len(played), 1 / 48000)[np.argmax(spec)] == pytest.approx(1000.0, abs=2)
    assert snap.counters["out_starved_callbacks"] <= 2
    assert abs(snap.counters["drift_ppm"]) > 0  # the output ratio is being nudged
    lat = latencies(recs, since_index=100)
    assert max(lat) - min(lat) < 20


def test_silent_mic_is_reported():
    s, b, m, recs = make(input_signal=np.zeros(R, np.float32), loop_input=False)
    b.advance(2.5)
    snap = s.snapshot
    assert snap.mic_silent and any("permission" in w for w in snap.warnings)
    ev = [e for e in s.events.drain() if e.kind == EventKind.WARNING]
    assert ev and ev[0].data["code"] == "silent_mic"


def test_echo_cancelled_inside_the_session():
    pytest.importorskip("pywebrtc_audio", reason="pywebrtc-audio is not installed (a dependency of parley: reinstall it)")
    far = S.speech_like(20.0, seed=3, f0=110, level_dbfs=-14, pause_every_s=1.6)
    model = ToneFrameModel(step_ms=30.0, start_s=0.2, mode="signal", signal=far)
    s, b, m, recs = make(
        model=model, cfg=SessionConfig(echo_mode="aec"), input_signal=S.brown_noise(20.0, -70, seed=4),
        echo_gain_db=-9.3, echo_delay_ms=25.0,
    )
    b.advance(10.0)
    seg = [r for r in recs if 40 <= r.index < 120]
    mic = np.concatenate([r.mic for r in seg])
    clean = np.concatenate([r.clean for r in seg])
    erle = 10 * np.log10(np.sum(mic**2) / np.sum(clean**2))
    assert erle > 30.0, erle
    assert s.snapshot.aec_reduction_db is not None and s.snapshot.aec_reduction_db > 20
    assert s.snapshot.counters["aec_ref_missing_ms"] < 100
