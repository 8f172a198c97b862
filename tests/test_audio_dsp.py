"""Unit tests of the audio building blocks (AUDIO.md §14.1): rings, re-framing, resampling,
meters, VAD. No audio server, no device."""


import numpy as np
import pytest

from engine.audio import signals as S
from engine.audio.meters import LevelMeter, peak_dbfs, rms_dbfs
from engine.audio.reframe import Reframer
from engine.audio.resample import StreamResampler, make_resampler
from engine.audio.ring import SpscRing
from engine.audio.vad import EnergyVad, VadSmoother

R = 24000


# ------------------------------------------------------------------------------------ rings
def test_ring_wraps_around_and_keeps_order():
    ring = SpscRing(1000)
    src = np.arange(10_000, dtype=np.float32)
    got = []
    pos = 0
    rng = np.random.default_rng(0)
    out = np.zeros(1000, np.float32)
    while pos < len(src) or ring.available():
        n = int(rng.integers(1, 400))
        pos += ring.write(src[pos : pos + n]) if pos < len(src) else 0
        k = ring.read_into(out, int(rng.integers(1, 500)))
        got.append(out[:k].copy())
    got = np.concatenate(got)
    np.testing.assert_array_equal(got, src)
    assert ring.write_count == ring.read_count == 10_000


def test_ring_full_drops_excess_and_counts():
    ring = SpscRing(100)
    assert ring.write(np.ones(80, np.float32)) == 80
    assert ring.write(np.ones(50, np.float32)) == 20  # only 20 fit; caller counts the 30 dropped
    assert ring.space() == 0 and ring.available() == 100
    assert ring.skip(30) == 30
    assert ring.write_zeros(40) == 30
    assert ring.skip_to(ring.write_count - 10) > 0
    assert ring.available() == 10
    np.testing.assert_array_equal(ring.read(), np.zeros(10, np.float32))


def test_ring_peek_does_not_consume():
    ring = SpscRing(16)
    ring.write(np.arange(10, dtype=np.float32))
    buf = np.zeros(4, np.float32)
    assert ring.peek_into(buf) == 4 and ring.available() == 10
    np.testing.assert_array_equal(buf, [0, 1, 2, 3])


# ------------------------------------------------------------------------------------ reframer
@pytest.mark.parametrize("chunks", [[240] * 40, [1920] * 5, [1] * 3000 + [6600], [1000, 37, 5000, 3563]])
def test_reframer_is_invariant_to_chunking(chunks):
    x = np.random.default_rng(1).standard_normal(sum(chunks)).astype(np.float32)
    rf = Reframer(1920)
    frames = []
    pos = 0
    for n in chunks:
        rf.push(x[pos : pos + n])
        pos += n
        while (f := rf.pop()) is not None:
            frames.append(f)
    full = len(x) // 1920
    assert len(frames) == full
    np.testing.assert_array_equal(np.concatenate(frames), x[: full * 1920])
    assert len(rf) == len(x) - full * 1920


def test_reframer_drop_frames_counts_samples():
    rf = Reframer(1920)
    rf.push(np.zeros(1920 * 5 + 10, np.float32))
    assert rf.drop_frames(4) == 4
    assert rf.frames_ready == 1 and rf.samples_out == 4 * 1920


# ------------------------------------------------------------------------------------ resampling
@pytest.mark.parametrize("rates", [(48000, 24000), (24000, 48000), (44100, 24000)])
def test_streaming_resampler_equals_one_shot(rates):
    a, b = rates
    x = S.speech_like(1.0, rate=a, seed=2)
    one = StreamResampler(a, b)
    ref = np.concatenate([one.process(x), one.process(np.zeros(0, np.float32), end_of_input=True)])
    st = StreamResampler(a, b)
    rng = np.random.default_rng(3)
    parts, pos = [], 0
    while pos < len(x):
        n = int(rng.integers(50, 1500))
        parts.append(st.process(x[pos : pos + n]))
        pos += n
    parts.append(st.process(np.zeros(0, np.float32), end_of_input=True))
    y = np.concatenate(parts)
    assert abs(len(y) - len(ref)) <= 1
    n = min(len(y), len(ref))
    assert np.max(np.abs(y[:n] - ref[:n])) < 1e-6


def test_resampler_output_follows_nominal_ratio_over_time():
    rs = StreamResampler(48000, 24000)
    total_in = total_out = 0
    for _ in range(500):  # 5 s of 10 ms blocks
        y = rs.process(np.zeros(480, np.float32))
        total_in += 480
        total_out += len(y)
    assert abs(total_out - total_in / 2) < 100  # within the filter delay (~2 ms)


def test_resampler_drift_nudge_changes_output_rate():
    a, b = StreamResampler(48000, 24000), StreamResampler(48000, 24000)
    b.set_drift_ppm(300)
    na = nb = 0
    for _ in range(1000):
        na += len(a.process(np.zeros(480, np.float32)))
        nb += len(b.process(np.zeros(480, np.float32)))
    assert 55 <= nb - na <= 90  # +300 ppm of 240 000 output samples = 72


# ------------------------------------------------------------------------------------ meters
def test_full_scale_sine_reads_minus_3_01_rms_and_0_peak():
    x = S.sine(1.0, 1000.0, 1.0)
    assert rms_dbfs(x) == pytest.approx(-3.01, abs=0.01)
    assert peak_dbfs(x) == pytest.approx(0.0, abs=0.01)
    m = LevelMeter(R)
    m.process(x)
    r = m.reading()
    assert r.rms_dbfs == pytest.approx(-3.01, abs=0.02)
    assert r.peak_dbfs == pytest.approx(0.0, abs=0.01)
    assert r.clipped and r.clip_count > 0


def test_square_wave_reads_0_dbfs():
    x = np.sign(S.sine(0.5, 100.0) + 1e-9).astype(np.float32)
    assert rms_dbfs(x) == pytest.approx(0.0, abs=0.01)


def test_vu_ballistics_checkpoints():
    """A -20 dBFS (peak) sine burst reads -24.5 / -23.4 / -23.0 dB RMS after 80 / 160 / 320 ms."""
    m = LevelMeter(R)
    burst = S.sine(0.32, 1000.0, 0.1)
    got = {}
    for i in range(0, len(burst), 240):
        m.process(burst[i : i + 240])
        t_ms = (i + 240) / R * 1000
        for cp in (80, 160, 320):
            if abs(t_ms - cp) < 1e-6:
                got[cp] = m.rms_dbfs
    assert got[80] == pytest.approx(-24.5, abs=0.15)
    assert got[160] == pytest.approx(-23.4, abs=0.15)
    assert got[320] == pytest.approx(-23.0, abs=0.15)


def test_meter_is_chunk_size_invariant():
    x = S.speech_like(1.0, seed=4)
    a, b = LevelMeter(R), LevelMeter(R)
    a.process(x)
    for i in range(0, len(x), 77):
        b.process(x[i : i + 77])
    assert a.reading() == b.reading()


def test_peak_hold_then_release_at_11_8_db_per_s():
    m = LevelMeter(R)
    m.process(S.sine(0.1, 1000.0, 0.1))  # -20 dBFS peak
    silence = np.zeros(240, np.float32)
    holds = []
    peaks = []
    for _ in range(300):  # 3 s of 10 ms blocks
        m.process(silence)
        holds.append(m.hold_dbfs)
        peaks.append(m.peak_dbfs)
    holds = np.array(holds)
    # held for 1.5 s
    assert np.all(np.abs(holds[:149] - (-20.0)) < 0.05)
    # then falls at 11.8 dB/s
    assert holds[199] == pytest.approx(-20.0 - 11.8 * 0.5, abs=0.3)
    # the peak itself releases at 11.8 dB/s from the start: 20 dB in ~1.7 s
    assert peaks[99] == pytest.approx(-20.0 - 11.8 * 1.0, abs=0.2)
    m.reset_peaks()
    assert not m.reading().clipped


# ------------------------------------------------------------------------------------ VAD
def _vad_scene():
    """3 'sentences' with 1.5 s gaps in brown noise at -45 dBFS; labels per 80 ms frame."""
    noise = S.brown_noise(12.0, -45.0, seed=9)
    x = noise.copy()
    labels = np.zeros(len(x) // 1920, bool)
    for k, start in enumerate((1.0, 4.5, 8.0)):
        sp = S.speech_like(2.0, seed=20 + k, f0=140 + 30 * k, level_dbfs=-22.0, pause_every_s=0)
        a = int(start * R)
        x[a : a + len(sp)] += sp
        labels[int(start * R) // 1920 : (a + len(sp)) // 1920] = True
    return x, labels


def test_energy_vad_on_synthetic_scene():
    x, labels = _vad_scene()
    vad = EnergyVad(R)
    pred = np.array([vad.process(x[i * 1920 : (i + 1) * 1920]) >= 0.5 for i in range(len(labels))])
    tp = np.sum(pred & labels)
    fp = np.sum(pred & ~labels)
    fn = np.sum(~pred & labels)
    f1 = 2 * tp / (2 * tp + fp + fn)
    assert f1 > 0.9, (tp, fp, fn)


def test_vad_smoother_on_after_2_off_after_4():
    sm = VadSmoother()
    seq = [1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    out = [sm.update(v) for v in seq]
    assert out == [False, False, False, True, True, True, True, True, True, True, True, True, False, False]


def test_webrtc_speech_probability_on_scene():
    pytest.importorskip("pywebrtc_audio", reason="pywebrtc-audio is not installed (a dependency of parley: reinstall it)")
    from engine.audio.aec import create_echo_canceller

    x, labels = _vad_scene()
    hp = create_echo_canceller("headphones", R)
    probs = []
    for i in range(len(labels)):
        hp.process(x[i * 1920 : (i + 1) * 1920], np.zeros(1920, np.float32))
        probs.append(hp.speech_probability)
    pred = np.array(probs) >= 0.5
    acc = np.mean(pred == labels)
    assert acc > 0.8
