"""Integration tests through a real PulseAudio server with null sinks (AUDIO.md §12, §14.2).

The server is started by `scripts/ci_audio_setup.sh` (which also installs PortAudio/PulseAudio when
missing and allowed). These tests skip — with the reason — only when that fails. Each scenario runs
in a child process with a hard timeout, so a hung device can never hang the test run.

Routing (§12.4): the app's default devices are pointed with PULSE_SINK / PULSE_SOURCE; its output
is recorded from `vspk.monitor`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "ci_audio_setup.sh"
TINY = ROOT / "tests" / "fixtures" / "personaplex-tiny"

pytestmark = [pytest.mark.audio, pytest.mark.slow]


def _setup(*args: str) -> tuple[bool, str]:
    if not SETUP.exists():
        return False, f"{SETUP} is missing"
    try:
        p = subprocess.run(["bash", str(SETUP), *args], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return False, "ci_audio_setup.sh timed out"
    return p.returncode == 0, (p.stderr or p.stdout).strip()


@pytest.fixture(scope="module")
def pulse():
    ok, why = _setup("--no-echo")
    if not ok:
        pytest.skip(f"PulseAudio could not be started: {why}")
    try:
        import sounddevice  # noqa: F401
    except OSError as e:
        pytest.skip(f"PortAudio is not usable: {e}")
    yield
    _setup("--no-echo")


def _ensure_server() -> None:
    ok, why = _setup()
    assert ok, why


def _child(code: str | list[str], env_extra: dict[str, str], timeout: float) -> dict:
    if isinstance(code, list):
        code = "\n".join(textwrap.dedent(c) for c in code)
    env = dict(os.environ)
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    wall = time.monotonic() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"child failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    res = json.loads(lines[-1][len("RESULT ") :])
    res["_wall"] = wall
    return res


def _record_monitor(path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["parecord", "-d", "vspk.monitor", "--raw", "--format=float32le", "--rate=24000", "--channels=1", "--latency-msec=20", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _tiny_model_code() -> str:
    """Python that defines `model` (a factory, so the model is built on the session's model
    thread) and `persona` for the real tiny model."""
    return f"""
    from engine.duplex import DuplexEngine
    from engine.personas import TEACHER_PROMPT, Persona
    _d = {str(TINY)!r}
    def model():
        return DuplexEngine.load(_d, dtype="float32", greedy=True)
    persona = Persona(name="TinyTeacher", prompt=TEACHER_PROMPT, voice=_d + "/voices/TINY0.pt")
    KIND = "tiny"
    """


def test_real_device_session_runs_10_s_and_reaches_the_sink(pulse, tmp_path):
    _ensure_server()
    rec = tmp_path / "monitor.f32"
    recorder = _record_monitor(rec)
    time.sleep(0.3)
    try:
        res = _child(
            [_tiny_model_code(), f"""
    import json, time, numpy as np
    from engine.audio.backends import SoundDeviceBackend
    from engine.session import Session, SessionConfig
    s = Session(model, SoundDeviceBackend(), persona=persona, config=SessionConfig(echo_mode="aec"),
                record_dir={str(tmp_path / "rec")!r})
    s.start()
    t0 = time.monotonic()
    states = set()
    while time.monotonic() - t0 < 10.5:
        time.sleep(0.05)
        states.add(s.snapshot.state.value)
    snap = s.stop()
    c = dict(snap.counters)
    print("RESULT " + json.dumps(dict(kind=KIND, frames=snap.frame_index, states=sorted(states), counters=c,
          latency=snap.latency.p50_ms, latency95=snap.latency.p95_ms, audio=snap.audio.__dict__,
          step_p50=snap.timings["total"].p50 if "total" in snap.timings else None)))
    """],
            {"PULSE_SINK": "vspk", "PULSE_SOURCE": "vmic.monitor"},
            timeout=60,
        )
    finally:
        _stop(recorder)
    c = res["counters"]
    assert res["frames"] >= 110, res  # >= 8.8 s of model frames within the 10.5 s run
    assert "ERROR" not in res["states"] and "NO AUDIO DEVICE" not in res["states"]
    assert res["audio"]["input_rate"] == 24000 and res["audio"]["blocksize"] == 240
    # Callbacks flowed: on this 2-core VM PulseAudio's null sink has twice (sessions 12 and 14, in
    # ~8 full runs) gone 0.5 s without a callback once; the watchdog reopened the stream and the
    # session went on (frames above). One such recovered stall is allowed; a second is a bug.
    assert c["watchdog_fires"] <= 1 and c["in_callbacks"] > 900 and c["out_callbacks"] > 900
    assert res["latency"] is not None and 80 < res["latency"] < 600
    # what reached the speaker sink
    y = np.fromfile(rec, dtype=np.float32)
    assert len(y) > 9 * 24000
    import soundfile as sf

    model_out, _ = sf.read(tmp_path / "rec" / "model.wav", dtype="float32")
    model_rms = float(np.sqrt(np.mean(model_out[24000:] ** 2)))
    sink_rms = float(np.sqrt(np.mean(y[24000:] ** 2)))
    assert model_rms > 1e-4, "the model produced silence"
    # the sink got the model's output at about its level (PulseAudio converts, nothing else)
    assert 0.5 * model_rms < sink_rms < 2.0 * model_rms, (sink_rms, model_rms)
    print(f"\n[{res['kind']}] frames {res['frames']} m2e p50 {res['latency']} ms, step p50 {res['step_p50']} ms, sink rms {sink_rms:.4f} vs model {model_rms:.4f}")


def test_killing_the_audio_server_fires_the_watchdog_without_hanging(pulse):
    _ensure_server()
    try:
        res = _child(
            f"""
    import json, subprocess, time
    from engine.audio.backends import SoundDeviceBackend
    from engine.session import Session, SessionConfig
    from engine.session.fakes import ToneFrameModel
    model = ToneFrameModel(step_ms=5.0, start_s=0.05, sleep=True)
    s = Session(model, SoundDeviceBackend(), persona="teacher", config=SessionConfig(echo_mode="headphones"))
    s.start()
    time.sleep(2.0)
    frames_before = s.snapshot.frame_index
    t_kill = time.monotonic()
    subprocess.run(["pulseaudio", "--kill"], timeout=10)
    t_lost = None
    while time.monotonic() - t_kill < 3.0:
        if s.snapshot.state.value == "DEVICE LOST" and t_lost is None:
            t_lost = time.monotonic() - t_kill
        time.sleep(0.01)
    lost_snap = s.snapshot
    # bring the server back: the backend reopens on its own
    subprocess.run(["bash", {str(SETUP)!r}, "--no-install"], timeout=60)
    t_back = None
    t1 = time.monotonic()
    while time.monotonic() - t1 < 8.0:
        if s.snapshot.state.value in ("LISTENING", "SPEAKING") and s.backend.restarts >= 1:
            t_back = time.monotonic() - t1
            break
        time.sleep(0.05)
    time.sleep(0.5)
    t_stop = time.monotonic()
    snap = s.stop()
    stop_s = time.monotonic() - t_stop
    print("RESULT " + json.dumps(dict(t_lost=t_lost, lost_state=lost_snap.state.value, lost_message=lost_snap.message,
          fires=snap.counters["watchdog_fires"], synth=snap.counters["synth_frames"],
          frames_before=frames_before, frames_after=snap.frame_index, stop_s=stop_s, t_back=t_back,
          restarts=snap.counters["device_restarts"], hung=s.backend.hung_closes)))
    """,
            {"PULSE_SINK": "vspk", "PULSE_SOURCE": "vmic.monitor"},
            timeout=60,
        )
    finally:
        _ensure_server()
    assert res["t_lost"] is not None and res["t_lost"] <= 1.0, res  # watchdog within 1 s
    assert res["fires"] >= 1 and res["lost_state"] == "DEVICE LOST"
    assert res["synth"] >= 10  # the model kept getting (silent) frames meanwhile
    assert res["frames_after"] > res["frames_before"] + 20
    assert res["stop_s"] < 3.0 and res["_wall"] < 45
    print(f"\nwatchdog after {res['t_lost'] * 1000:.0f} ms; reopened after {res['t_back']} s; stop took {res['stop_s']:.2f} s; hung closes {res['hung']}")


def test_echo_is_reduced_by_30_db_through_the_loopback(pulse):
    try:
        import pywebrtc_audio  # noqa: F401
    except ImportError:
        pytest.fail("pywebrtc-audio is not installed; it is a dependency of parley: pip install '.[test]'")
    ok, why = _setup("--echo")
    assert ok, why
    # Real-time audio through PulseAudio: one run in several on a loaded 2-core runner has been
    # seen to converge late (25.9 dB once, 43-56 dB otherwise), so a run gets one retry; an
    # echo canceller that does not work fails both.
    attempts = []
    try:
        for _ in range(2):
            attempts.append(_echo_run())
            if attempts[-1]["erle"] >= 30.0:
                break
    finally:
        _setup("--no-echo")
    res = attempts[-1]
    assert res["n_far"] >= 40 and res["mic_dbfs"] > -45, res  # the echo really reached the mic
    assert res["erle"] >= 30.0, attempts
    assert res["dt_loss"] < 6.0, res  # the user's speech is kept
    print(f"\necho reduction {res['erle']:.1f} dB (mic {res['mic_dbfs']:.1f} -> {res['clean_dbfs']:.1f} dBFS), double-talk loss {res['dt_loss']:.1f} dB"
          + (f"; first attempt {attempts[0]['erle']:.1f} dB" if len(attempts) > 1 else ""))


def _echo_run() -> dict:
    return _child(
            """
    import json, subprocess, time, threading
    import numpy as np
    from engine.audio import signals as S
    from engine.audio.backends import SoundDeviceBackend
    from engine.session import Session, SessionConfig
    from engine.session.fakes import ToneFrameModel
    far = S.speech_like(20.0, seed=3, f0=110, level_dbfs=-14, pause_every_s=1.6)
    model = ToneFrameModel(step_ms=5.0, start_s=0.05, sleep=True, mode="signal", signal=far)
    s = Session(model, SoundDeviceBackend(), persona="far", config=SessionConfig(echo_mode="aec"))
    frames = {}
    def on_frame(r):
        frames[r.index] = (float(np.dot(r.mic, r.mic)), float(np.dot(r.clean, r.clean)), r.result is not None)
    s.add_frame_listener(on_frame)
    s.start()
    time.sleep(7.0)
    # the user talks into the room for 2.5 s (double talk)
    user = S.speech_like(2.5, seed=11, f0=220, level_dbfs=-20)
    t_user = s.snapshot.frame_index
    first_user = max(frames) + 1
    p = subprocess.Popen(["pacat", "--playback", "-d", "vmic", "--raw", "--format=float32le", "--rate=24000",
                          "--channels=1", "--latency-msec=20"], stdin=subprocess.PIPE)
    p.stdin.write(user.astype(np.float32).tobytes()); p.stdin.close()
    p.wait(10)
    time.sleep(0.5)
    last_user = max(frames)
    snap = s.stop()
    idx = sorted(frames)
    far_only = [i for i in idx if 25 <= i < first_user - 2]
    em = sum(frames[i][0] for i in far_only); ec = sum(frames[i][1] for i in far_only)
    # near-end loss: the user's energy as injected vs what is left after the AEC over the whole
    # stretch (the residual echo is ~-70 dBFS, so the cleaned energy there is the user's)
    dt = [i for i in idx if first_user <= i <= last_user]
    dm = float(np.dot(user, user)); dc = sum(frames[i][1] for i in dt)
    print("RESULT " + json.dumps(dict(erle=10*np.log10(em/max(ec,1e-20)), mic_dbfs=10*np.log10(em/(len(far_only)*1920)),
          clean_dbfs=10*np.log10(max(ec,1e-20)/(len(far_only)*1920)), dt_loss=10*np.log10(dm/max(dc,1e-20)),
          n_far=len(far_only), n_dt=len(dt), snapshot_erle=snap.aec_reduction_db,
          resyncs=snap.counters["aec_ref_resyncs"], missing=snap.counters["aec_ref_missing_ms"])))
    """,
            {"PULSE_SINK": "vspk", "PULSE_SOURCE": "vmic.monitor"},
            timeout=60,
        )


def test_pass_through_end_to_end_matches_the_injected_audio(pulse, tmp_path):
    """AUDIO.md §14.2: audio played into the room comes out of the speaker, intact, through a
    pass-through model. Correlation is taken per 0.5 s chunk (a device underflow on a loaded
    runner shifts the lag by a few ms without hurting the pipeline)."""
    _ensure_server()
    from engine.audio import signals as S

    x = S.speech_like(3.0, seed=21, level_dbfs=-20, pause_every_s=1.0)
    np.save(tmp_path / "in.npy", x)
    rec = tmp_path / "out.f32"
    recorder = _record_monitor(rec)
    time.sleep(0.3)
    try:
        res = _child(
            f"""
    import json, subprocess, time
    import numpy as np
    from engine.audio.backends import SoundDeviceBackend
    from engine.session import Session, SessionConfig
    from engine.session.fakes import ToneFrameModel
    model = ToneFrameModel(step_ms=5.0, start_s=0.05, sleep=True, mode="echo")
    s = Session(model, SoundDeviceBackend(), config=SessionConfig(echo_mode="headphones"))
    s.start()
    time.sleep(1.0)
    x = np.load({str(tmp_path / "in.npy")!r})
    p = subprocess.Popen(["pacat", "--playback", "-d", "vmic", "--raw", "--format=float32le", "--rate=24000",
                          "--channels=1", "--latency-msec=20"], stdin=subprocess.PIPE)
    p.stdin.write(x.astype(np.float32).tobytes()); p.stdin.close(); p.wait(10)
    time.sleep(0.8)
    snap = s.stop()
    print("RESULT " + json.dumps(dict(m2e=snap.latency.p50_ms, frames=snap.frame_index)))
    """,
            {"PULSE_SINK": "vspk", "PULSE_SOURCE": "vmic.monitor"},
            timeout=60,
        )
    finally:
        _stop(recorder)
    y = np.fromfile(rec, dtype=np.float32)
    corrs, lags = [], []
    for a in range(0, len(x) - 12000, 12000):
        seg = x[a : a + 12000]
        if np.sqrt(np.mean(seg**2)) < 0.01:
            continue
        c = np.correlate(y, seg, "valid")
        k = int(np.argmax(np.abs(c)))
        ys = y[k : k + 12000]
        corrs.append(float(np.dot(ys, seg) / np.sqrt(np.dot(ys, ys) * np.dot(seg, seg) + 1e-20)))
        lags.append((k - a) / 24.0)
    good = [c for c in corrs if c > 0.9]
    assert len(corrs) >= 4 and len(good) >= 0.75 * len(corrs), corrs
    # One consistent delay, give or take one device hiccup: on the 2-core CI machine PulseAudio's
    # null sink once slipped 154 ms in the last chunk of five (1620.5 ms x4, then 1774.1).
    med = float(np.median(lags))
    steady = [lag for lag in lags if abs(lag - med) < 30]
    assert len(steady) >= max(4, len(lags) - 1), lags
    print(f"\npass-through: chunk correlations {np.round(corrs, 3).tolist()}, session m2e p50 {res['m2e']} ms")
