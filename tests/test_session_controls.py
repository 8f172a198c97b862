"""Session controls on a simulated clock (issue 6 acceptance): every control does what it says.

The model is `ToneFrameModel` (deterministic; its tone frequency depends on the persona and its
amplitude encodes the step index); the backend is `SimulatedBackend` (10 ms device blocks)."""

import dataclasses
import threading

import numpy as np
import pytest

from engine.audio import signals as S
from engine.audio.backends import SimulatedBackend
from engine.session import EventKind, Session, SessionConfig, SessionState
from engine.session.fakes import SILENCE_TOKENS, ToneFrameModel, persona_freq

R = 24000


def make(model=None, cfg=None, persona="teacher", **backend_kw):
    model = model or ToneFrameModel(step_ms=30.0, start_s=0.2)
    backend_kw.setdefault("input_signal", S.speech_like(30.0, seed=1, level_dbfs=-25))
    b = SimulatedBackend(**backend_kw)
    s = Session(model, b, persona=persona, config=cfg or SessionConfig(echo_mode="headphones"), threaded=False)
    recs = []
    s.add_frame_listener(recs.append)
    s.start()
    return s, b, model, recs


def dominant_freq(x, rate=R):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spec))]


def after_call(b, t):
    """Output blocks whose callback came after the control call at sim time `t`."""
    return [x for tt, x in b.played_blocks() if tt - b.output_latency_s > t]


def assert_silent_from_next_block(b, t, fade=72):
    blocks = after_call(b, t)
    assert len(blocks) > 10
    assert not blocks[0][fade:].any()  # the very next callback fades out within 3 ms
    assert not np.concatenate(blocks[1:]).any()


def played_after(b, t0, t1=None):
    blocks = [(t, x) for t, x in b.played_blocks() if t >= t0 and (t1 is None or t < t1)]
    return np.concatenate([x for _, x in blocks]) if blocks else np.zeros(0, np.float32)


def test_session_runs_and_reports():
    s, b, m, recs = make()
    b.advance(3.0)
    snap = s.snapshot
    assert snap.state is SessionState.SPEAKING
    assert snap.frame_index == m.total_steps > 30
    assert snap.timings["total"].p50 == pytest.approx(30.0)
    assert snap.rtf_p50 == pytest.approx(30.0 / 80.0)
    assert snap.frames_per_s == pytest.approx(12.5, abs=0.6)
    assert snap.text_tokens_per_s > 2.0 and snap.transcript.startswith(" w0")
    assert snap.speaker.rms_dbfs > -30 and snap.model_out.rms_dbfs > -30
    assert snap.mic.rms_dbfs > -40
    assert snap.latency.p50_ms == pytest.approx(160.0, abs=10.0)  # 80 frame + 30 step + 20 pad + 20 out + 10 in
    assert snap.counters["out_starved_callbacks"] == 0 and snap.counters["catchup_drop_frames"] == 0
    assert snap.persona == "teacher" and snap.last_prompt_s == pytest.approx(0.2)
    assert snap.context_frames == 3000
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.state = SessionState.ERROR  # type: ignore[misc]
    with pytest.raises(TypeError):
        snap.counters["model_frames"] = 0  # type: ignore[index]
    kinds = {e.kind for e in s.events.drain()}
    assert {EventKind.STARTED, EventKind.PROMPTED, EventKind.TEXT, EventKind.STATE} <= kinds
    s.stop()
    assert s.snapshot.state is SessionState.STOPPED


def test_mute_mic_feeds_the_model_digital_zeros():
    s, b, m, recs = make()
    b.advance(1.5)
    assert all(nonzero for _, nonzero, _ in m.heard[-5:])
    s.set_mic_muted(True)
    n0 = m.total_steps
    b.advance(1.5)
    heard = m.heard[n0 + 1 :]  # the frame in flight at the moment of muting may still carry sound
    assert len(heard) > 10 and not any(nonzero for _, nonzero, _ in heard)
    snap = s.snapshot
    assert snap.state is SessionState.MUTED and snap.mic_muted
    assert snap.mic.rms_dbfs > -40  # the meter still shows the (raw) mic
    assert all(not r.model_in.any() for r in recs[-5:])
    s.set_mic_muted(False)
    n1 = m.total_steps
    b.advance(0.5)
    assert all(nonzero for _, nonzero, _ in m.heard[n1 + 1 :])
    assert s.snapshot.state is SessionState.SPEAKING


def test_mute_speaker_plays_nothing_while_the_model_keeps_talking():
    s, b, m, recs = make()
    b.advance(1.5)
    t = b.now
    s.set_speaker_muted(True)
    n0 = m.total_steps
    b.advance(1.5)
    assert_silent_from_next_block(b, t)
    assert m.total_steps - n0 >= 17  # still stepping
    snap = s.snapshot
    assert snap.speaker_muted and snap.model_out.rms_dbfs > -30 and snap.speaker.rms_dbfs < -60
    assert snap.state is SessionState.SPEAKING  # the model is still talking
    s.set_speaker_muted(False)
    t2 = b.now
    b.advance(0.5)
    assert np.abs(played_after(b, t2 + 0.15)).max() > 0.04


def test_interrupt_flushes_within_one_block_and_forces_silence_tokens():
    s, b, m, recs = make()
    b.advance(2.013)
    t = b.now
    queued = s.io.out_ring.available()
    assert queued > 240  # more than one device block was queued
    s.interrupt()
    b.advance(0.0101)  # one device block later the queue is gone
    assert s.io.out_ring.available() == 0 and not s.io.flush_pending
    assert s.snapshot.counters["out_flushed_ms"] > 0 or s.io.flushed_samples > 0
    b.advance(1.5)
    blocks = after_call(b, t)
    assert not blocks[0][72:].any()  # faded out within 3 ms of the first callback after the call
    # silence through the forced window (6 frames = 480 ms after the frame in flight)
    assert not np.concatenate(blocks[1:45]).any()
    assert np.abs(played_after(b, t + 0.9)).max() > 0.04  # and the agent talks again
    forced = [r for r in recs if r.forced]
    assert len(forced) == 6 and m.forced == list(range(m.forced[0], m.forced[0] + 6))
    for r in forced:
        assert r.result.text_id == 3 and r.result.text is None
        assert tuple(r.result.tokens[1:9]) == SILENCE_TOKENS
        assert not r.played.any()
    assert s.snapshot.counters["interrupts"] == 1 and s.snapshot.counters["forced_frames"] == 6
    assert any(e.kind == EventKind.CONTROL and e.data.get("control") == "interrupt" for e in s.events.drain())


def test_persona_switch_changes_prompt_state_while_audio_keeps_flowing():
    model = ToneFrameModel(step_ms=30.0, start_s=0.5)
    s, b, m, recs = make(model=model)
    b.advance(2.0)
    assert dominant_freq(played_after(b, 1.5, 1.9)) == pytest.approx(persona_freq("teacher"), abs=15)
    cb = b.callbacks_in
    starved = s.snapshot.counters["out_starved_callbacks"]
    t = b.now
    s.switch_persona("pirate")
    b.advance(0.25)
    assert s.snapshot.state is SessionState.PROMPTING
    b.advance(1.75)
    assert m.prompt_state == "pirate" and m.starts == 2
    assert b.callbacks_in - cb == 200  # the device never stopped
    assert s.snapshot.counters["out_starved_callbacks"] == starved  # silence during the prefill is not a glitch
    snap = s.snapshot
    assert snap.persona == "pirate" and snap.last_prompt_s == pytest.approx(0.5)
    assert snap.counters["persona_switches"] == 1 and snap.counters["prompt_dropped_frames"] > 3
    assert snap.frames_since_prompt < 20
    assert dominant_freq(played_after(b, t + 1.5, t + 1.9)) == pytest.approx(persona_freq("pirate"), abs=15)
    ev = [e for e in s.events.drain() if e.kind == EventKind.PROMPTED]
    assert ev[-1].data["reason"] == "switch" and ev[-1].data["persona"] == "pirate"


def test_reset_conversation_restarts_the_model():
    s, b, m, recs = make()
    b.advance(2.0)
    steps_before = m.steps
    s.reset_conversation()
    b.advance(1.0)
    assert m.starts == 2 and m.prompt_state == "teacher"
    assert m.steps < steps_before
    assert s.snapshot.counters["resets"] == 1


def test_pause_stops_steps_and_plays_silence():
    s, b, m, recs = make()
    b.advance(1.5)
    s.set_paused(True)
    t = b.now
    b.advance(0.05)
    n = m.total_steps
    b.advance(1.0)
    assert m.total_steps == n
    assert_silent_from_next_block(b, t)
    snap = s.snapshot
    assert snap.state is SessionState.PAUSED and snap.counters["paused_frames"] >= 12
    assert snap.counters["out_starved_callbacks"] == 0
    s.set_paused(False)
    b.advance(0.5)
    assert m.total_steps > n


def test_echo_mode_can_be_changed_live():
    s, b, m, recs = make(cfg=SessionConfig(echo_mode="aec"))
    b.advance(0.5)
    s.set_echo_mode("gate")
    b.advance(0.1)
    assert s.snapshot.audio.echo_mode == "gate"
    assert s.cycle_echo_mode().value == "aec"
    b.advance(0.1)
    assert s.snapshot.audio.echo_mode in ("aec", "gate")  # gate if pywebrtc-audio is missing


def test_controls_from_other_threads_and_model_on_one_thread():
    model = ToneFrameModel(step_ms=5.0, start_s=0.05, sleep=True)
    b = SimulatedBackend(input_signal=S.speech_like(10.0, seed=2), autorun=True)
    s = Session(model, b, persona="a", config=SessionConfig(echo_mode="headphones"), threaded=True)
    s.start(wait_ready=True, timeout=10)
    errors = []

    def hammer(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(60):
                c = int(rng.integers(0, 6))
                if c == 0:
                    s.toggle_mic_muted()
                elif c == 1:
                    s.toggle_speaker_muted()
                elif c == 2:
                    s.interrupt()
                elif c == 3:
                    s.toggle_paused()
                elif c == 4:
                    _ = s.snapshot.counters["model_frames"]
                else:
                    s.switch_persona(f"p{int(rng.integers(0, 3))}")
                threading.Event().wait(0.01)
        except Exception as e:  # pragma: no cover
            errors.append(e)

    ts = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    s.set_paused(False)
    s.set_mic_muted(False)
    threading.Event().wait(0.6)
    snap = s.stop()
    assert not errors
    assert snap.state is SessionState.STOPPED and snap.frame_index > 5
    assert len(model.thread_ids) == 1 and threading.get_ident() not in model.thread_ids


def test_fake_model_lists_its_voices():
    assert ToneFrameModel().available_voices() == ["NATF2", "NATM0"]
    assert ToneFrameModel(voices=("A", "B", "C")).available_voices() == ["A", "B", "C"]


def test_detailed_timing_is_harmless_on_a_model_without_the_switch():
    s, b, m, recs = make()
    assert not hasattr(m, "profile_stages")
    b.advance(1.0)
    frames = s.snapshot.frame_index
    assert not s.snapshot.detailed_timing and s.snapshot.stage_sample_every is None
    s.set_detailed_timing(True)
    assert s.detailed_timing  # the request is visible at once
    b.advance(1.0)
    snap = s.snapshot
    assert not hasattr(m, "profile_stages")  # nothing was added to the model
    assert not snap.detailed_timing and snap.stage_sample_every is None
    assert snap.frame_index > frames + 8 and snap.state is SessionState.SPEAKING
    assert "profile_stages" in s._runner.unsupported_settings
    controls = [e.data for e in s.events.drain() if e.kind == EventKind.CONTROL]
    assert {"control": "detailed_timing", "value": True}.items() <= controls[-1].items()
    s.set_detailed_timing(False)
    b.advance(0.3)
    assert not s.detailed_timing
    s.stop()


class SwitchableToneModel(ToneFrameModel):
    """A fake with the engine's stage-timing switch; records the thread that set it."""

    stage_sample_every = 8

    def __init__(self, **kw):
        super().__init__(**kw)
        self._profile = False
        self.profile_set_on: list[tuple[int, bool]] = []

    @property
    def profile_stages(self) -> bool:
        return self._profile

    @profile_stages.setter
    def profile_stages(self, on: bool) -> None:
        self.profile_set_on.append((threading.get_ident(), on))
        self._profile = on


def test_detailed_timing_is_set_on_the_model_thread_and_shown_in_the_snapshot():
    model = SwitchableToneModel(step_ms=5.0, start_s=0.05, sleep=True)
    b = SimulatedBackend(input_signal=S.speech_like(10.0, seed=2), autorun=True)
    s = Session(model, b, persona="a", config=SessionConfig(echo_mode="headphones"), threaded=True)
    s.start(wait_ready=True, timeout=10)
    try:
        snap = s.snapshot
        assert not snap.detailed_timing and snap.stage_sample_every == 8
        s.set_detailed_timing(True)
        end = threading.Event()
        for _ in range(200):
            if s.snapshot.detailed_timing:
                break
            end.wait(0.01)
        assert model.profile_stages and s.snapshot.detailed_timing
        s.set_detailed_timing(False)
        for _ in range(200):
            if not s.snapshot.detailed_timing:
                break
            end.wait(0.01)
        assert not model.profile_stages and not s.snapshot.detailed_timing
        assert [on for _, on in model.profile_set_on] == [True, False]
        # set between two steps on the model's own thread, never on the caller's
        assert {t for t, _ in model.profile_set_on} <= model.thread_ids
        assert threading.get_ident() not in {t for t, _ in model.profile_set_on}
    finally:
        s.stop()
