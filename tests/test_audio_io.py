"""RingIO: the callback side (copy, stamp, count, fades, flush)."""

import numpy as np

from engine.audio.io import RingIO


def _out(io, n=240, t=0.0, flags=0):
    buf = np.full(n, 9.0, np.float32)  # garbage: the callback must overwrite all of it
    io.on_output(buf, t, flags)
    return buf


def test_input_callback_copies_stamps_and_counts():
    io = RingIO(1000)
    io.on_input(np.ones(240, np.float32), 1.5, 0)
    io.on_input(np.ones(240, np.float32), 1.51, 2)  # input overflow flag
    assert io.in_ring.available() == 480
    assert io.in_stamp == (240, 1.51)
    assert io.flags_dict()["input_overflow"] == 1
    io.on_input(np.ones(600, np.float32), 1.52, 0)  # ring full: 520 fit
    assert io.in_ring_full_drops == 80


def test_output_idle_before_first_write_is_not_starvation():
    io = RingIO(10_000)
    for _ in range(5):
        assert not _out(io).any()
    assert io.out_starved_callbacks == 0 and io.out_idle_samples == 1200
    assert io.played.available() == 1200


def test_output_starvation_is_counted_with_fades():
    io = RingIO(10_000, fade_samples=48)
    io.out_ring.write(np.ones(300, np.float32))
    a = _out(io)
    assert a[0] < 0.05 and a[-1] == 1.0  # fade-in at the start of playback
    b = _out(io)
    assert b[59] < 0.05 and b[0] == 1.0 and not b[60:].any()  # 60 left, faded out, then zeros
    assert io.out_starved_callbacks == 1 and io.out_starved_samples == 180 and io.starve_events == 1
    _out(io)
    assert io.out_starved_callbacks == 2 and io.starve_events == 1
    io.out_ring.write(np.ones(480, np.float32))
    c = _out(io)
    assert c[0] < 0.05 and c[-1] == 1.0  # fades back in
    played = io.played.read()
    assert len(played) == 4 * 240


def test_flush_takes_effect_at_the_next_callback():
    io = RingIO(10_000, fade_samples=48)
    io.out_ring.write(np.ones(5000, np.float32))
    _out(io)
    io.request_flush()
    assert io.flush_pending
    d = _out(io)
    assert d[0] > 0.9 and d[47] < 0.05 and not d[48:].any()
    assert io.out_ring.available() == 0 and io.flushed_samples == 5000 - 240 - 48
    e = _out(io)
    assert not e.any() and io.out_starved_callbacks == 0  # idle after a flush, not starvation
    assert not io.flush_pending


def test_lockstep_output_only_returns_what_is_queued():
    io = RingIO(10_000, lockstep=True)
    buf = np.zeros(1920, np.float32)
    assert io.on_output(buf, 0.0, 0) == 0
    io.out_ring.write(np.ones(1000, np.float32))
    assert io.on_output(buf, 0.0, 0) == 1000
    assert io.out_starved_callbacks == 0
