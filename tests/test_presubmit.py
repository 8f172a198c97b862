"""Handing the next frame's temporal step to the device when a frame ends (`LMGen.presubmit`,
on by default) gives exactly the frames of an engine that builds each step inside its frame,
across sampling, interruptions, a new conversation, a persona switch and a ring wrap; anything
that changes the state first drops the early step and takes its position back off the ring."""

from __future__ import annotations

import numpy as np
import pytest

from engine.duplex import DuplexEngine
from engine.lm import lmgen
from engine.personas import TEACHER_PROMPT, Persona

TEACHER = Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0")
OTHER = Persona(name="o", prompt="You answer questions about the weather.", voice="TINY0")


def _engine(tiny_dir, presubmit: bool, **kw) -> DuplexEngine:
    engine = DuplexEngine.load(str(tiny_dir), seed=0, **kw)
    engine.gen.presubmit = presubmit
    return engine


def _session(engine, pcm) -> list:
    """Frames through a conversation with an interruption, a new conversation and a persona
    switch -> [(tokens, pcm, user codes, ring end)]."""
    out, wrapped = [], []

    def frame(j, **kw):
        r = engine.step(pcm[j], **kw)
        out.append((r.tokens.copy(), r.pcm.copy(), engine.last_user_codes.copy(),
                    engine.gen.kv.end - engine.gen.has_pending))

    engine.start(TEACHER)
    # Move the ring's clock on to a dozen positions before its end, so the session wraps it.
    engine.gen.kv.advance(engine.gen.kv.slots - engine.gen.kv.end - 12)
    for j in range(30):
        frame(j, force_agent_silence=10 <= j < 14)  # the user interrupts for 4 frames
    wrapped.append(engine.gen.kv.end > engine.gen.kv.slots)
    engine.reset()  # a new conversation with the same persona
    for j in range(30, 40):
        frame(j)
    engine.start(OTHER)  # a persona switch
    for j in range(40, 52):
        frame(j)
    assert wrapped == [True]
    return out


@pytest.mark.parametrize("greedy,chain,worker,after,on_device", [
    (True, False, False, False, False), (False, False, False, False, False),
    (True, True, False, False, False), (False, True, True, False, False),
    (False, True, True, True, False), (False, True, True, False, True),
    (True, True, True, True, True), (False, False, True, False, True)])
def test_the_frames_are_those_of_the_step_built_in_its_frame(tiny_dir, greedy, chain, worker,
                                                             after, on_device):
    """chain: the next step built before the frame's barrier from the samples on the device
    (chain_ahead); worker: the encode on its worker thread (the GPU default); after: that encode
    queued once the frame's own work is handed over (encode_after_issue); on_device: the
    worker's codes handed over as a device array once queued (codes_on_device)."""
    rng = np.random.default_rng(3)
    pcm = (0.1 * rng.standard_normal((52, 1920))).astype(np.float32)
    ahead = _engine(tiny_dir, True, greedy=greedy)
    ahead.gen.chain_ahead = chain
    ahead.overlap_encode = worker
    ahead.encode_after_issue = after
    ahead.codes_on_device = on_device
    ahead.stage_sample_every = 5  # some frames take the stage split (no chaining there)
    inside = _engine(tiny_dir, False, greedy=greedy)
    chained = []
    real = ahead.gen._chain_next
    ahead.gen._chain_next = lambda *a: (lambda p: (chained.append(p is not None), p)[1])(real(*a))
    a = _session(ahead, pcm)
    assert (sum(chained) > 30) is chain
    b = _session(inside, pcm)
    assert ahead.gen.has_pending and not inside.gen.has_pending
    assert ahead.gen.kv.end == inside.gen.kv.end + 1  # the early step holds the next position
    assert len({tuple(x[0]) for x in a}) > 5  # the tokens vary
    for j, ((ta, pa, ua, ea), (tb, pb, ub, eb)) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(ta, tb, err_msg=f"frame {j}")
        np.testing.assert_array_equal(ua, ub)
        np.testing.assert_allclose(pa, pb, atol=1e-6)
        assert ea == eb


def _warm_pair(tiny_dir, seed: int, frames: int, warm: int):
    """Noise frames, and an engine that hands steps over early beside one that builds them in
    their frames (greedy), both started and run through the first `warm` frames."""
    rng = np.random.default_rng(seed)
    pcm = (0.1 * rng.standard_normal((frames, 1920))).astype(np.float32)
    ahead, inside = _engine(tiny_dir, True, greedy=True), _engine(tiny_dir, False, greedy=True)
    for e in (ahead, inside):
        e.start(TEACHER)
        for j in range(warm):
            e.step(pcm[j])
    return pcm, ahead, inside


def test_the_early_step_is_the_one_the_frame_would_have_built(tiny_dir):
    """The pending step is picked up (not rebuilt) and its hidden state is the same."""
    pcm, ahead, inside = _warm_pair(tiny_dir, 4, 6, 5)
    pending = ahead.gen._pending
    assert pending is not None and pending.s == ahead.gen.position
    ahead.step(pcm[5])
    inside.step(pcm[5])
    assert ahead.gen._last["hidden"] is pending.hn[0, 0] or np.array_equal(
        ahead.gen.last_hidden, np.array(pending.hn[0, 0]))
    np.testing.assert_array_equal(ahead.gen.last_hidden, inside.gen.last_hidden)


def test_a_changed_state_drops_the_early_step(tiny_dir):
    """A plain `step` after a live frame, or a ring moved on outside the frame, discards the early
    step and takes its position back; the frames then match an engine that never made it."""
    pcm, ahead, inside = _warm_pair(tiny_dir, 5, 12, 4)
    assert ahead.gen.has_pending
    end = ahead.gen.kv.end
    for e in (ahead, inside):  # a plain step (e.g. a caller driving the LM directly)
        e.gen.step(user_codes=np.array(e.last_user_codes))
    assert not ahead.gen.has_pending and ahead.gen.kv.end == end
    assert ahead.gen.kv.end == inside.gen.kv.end
    for j in range(4, 8):
        ta, tb = ahead.step(pcm[j]).tokens, inside.step(pcm[j]).tokens
        np.testing.assert_array_equal(ta, tb)
    assert ahead.gen.has_pending
    for e in (ahead, inside):  # the ring's clock moved on from outside (as the benchmark does)
        e.gen.kv.advance(e.gen.kv.slots)
    for j in range(8, 12):
        ta, tb = ahead.step(pcm[j]).tokens, inside.step(pcm[j]).tokens
        np.testing.assert_array_equal(ta, tb)
    assert ahead.gen.kv.end == inside.gen.kv.end + 1


def test_the_stage_split_counts_the_early_step(tiny_dir):
    """A sampled frame's temporal stage with a pending step is what it adds to the frame (issuing
    it, then the wait); the benchmark's stage split (profile_stages) builds each step in its
    frame, so no step is pending after such a frame."""
    rng = np.random.default_rng(6)
    pcm = (0.1 * rng.standard_normal((4, 1920))).astype(np.float32)
    engine = _engine(tiny_dir, True, greedy=True)
    engine.start(TEACHER)
    engine.stage_sample_every = 1
    engine.step(pcm[0])
    submit_ms = engine.gen._pending.submit_ms
    assert submit_ms > 0
    r = engine.step(pcm[1])
    assert r.timings_ms["temporal"] >= submit_ms
    engine.profile_stages = True
    r = engine.step(pcm[2])
    assert not engine.gen.has_pending
    assert set(r.timings_ms) >= {"encode", "temporal", "depth", "decode", "total"}


def test_presubmit_is_on_unless_switched_off(monkeypatch):
    monkeypatch.delenv("PARLEY_PRESUBMIT", raising=False)
    assert lmgen.default_presubmit()
    monkeypatch.setenv("PARLEY_PRESUBMIT", "0")
    assert not lmgen.default_presubmit()


def test_chain_ahead_and_codes_on_the_device_are_the_cuda_defaults(tiny_dir, monkeypatch):
    """On MLX's CUDA backend the next step is chained ahead and takes the encode worker's codes
    on the device (session 14: 8.98 -> 7.58 ms a frame with the tensor cores); elsewhere
    neither; PARLEY_CHAIN_AHEAD / PARLEY_CODES_ON_DEVICE force them either way."""
    import mlx.core as mx

    from engine import duplex
    monkeypatch.delenv("PARLEY_CHAIN_AHEAD", raising=False)
    monkeypatch.delenv("PARLEY_CODES_ON_DEVICE", raising=False)
    on_cuda = bool(mx.cuda.is_available()) and mx.default_device().type == mx.DeviceType.gpu
    assert lmgen.fused.on_cuda() is on_cuda
    assert lmgen.default_chain_ahead() is on_cuda
    assert DuplexEngine.load(str(tiny_dir), seed=0).codes_on_device is on_cuda
    monkeypatch.setattr(lmgen.fused, "on_cuda", lambda: True)
    assert lmgen.default_chain_ahead()
    monkeypatch.setenv("PARLEY_CHAIN_AHEAD", "0")
    assert not lmgen.default_chain_ahead()
    monkeypatch.setattr(lmgen.fused, "on_cuda", lambda: False)
    monkeypatch.setenv("PARLEY_CHAIN_AHEAD", "1")
    assert lmgen.default_chain_ahead()
    engine = DuplexEngine.load(str(tiny_dir), seed=0)
    assert engine.gen.chain_ahead
    monkeypatch.setattr(duplex, "default_overlap_encode", lambda: True)
    assert DuplexEngine.load(str(tiny_dir), seed=0).codes_on_device
    monkeypatch.setenv("PARLEY_CODES_ON_DEVICE", "0")
    assert not DuplexEngine.load(str(tiny_dir), seed=0).codes_on_device
    monkeypatch.setattr(duplex, "default_overlap_encode", lambda: False)
    monkeypatch.setenv("PARLEY_CODES_ON_DEVICE", "1")
    assert DuplexEngine.load(str(tiny_dir), seed=0).codes_on_device


def test_a_live_session_hands_the_output_over_before_the_next_step(tiny_dir):
    """The model thread steps with defer_next and calls after_step once the result is queued:
    the frames are still those of an engine building each step in its frame, a step is pending
    between frames, and an after_step that fails ends in an error Done, not a dead thread."""
    import time

    from engine.session.runner import InFrame, ModelThread

    rng = np.random.default_rng(7)
    pcm = (0.1 * rng.standard_normal((8, 1920))).astype(np.float32)
    inside = _engine(tiny_dir, False, greedy=True)
    inside.start(TEACHER)
    built, calls = [], []

    def build():  # on the model thread, as the live session builds its engine
        engine = _engine(tiny_dir, True, greedy=True)
        engine.overlap_encode = True  # the GPU default: frames return before their encode
        after = engine.after_step
        engine.after_step = lambda: (calls.append(engine.gen.has_pending), after())
        built.append(engine)
        return engine

    runner = ModelThread(build)
    runner.start()

    def wait_for(kinds, n):
        got, deadline = [], time.monotonic() + 60
        while len(got) < n:
            got += [d for d in runner.poll(0.0) if d.kind in kinds]
            assert time.monotonic() < deadline, got
            time.sleep(0.002)
        return got

    try:
        runner.request_start(TEACHER, "test")
        assert [d.kind for d in wait_for(("start", "error"), 1)] == ["start"]
        got = []
        for j in range(8):
            runner.submit(InFrame(index=j, pcm=pcm[j], t_adc=None, epoch=runner.epoch))
            got += wait_for(("step", "error"), 1)
        assert [d.kind for d in got] == ["step"] * 8
        assert calls[:8] == [False] * 8  # the step itself left nothing pending: after_step did
        for j, d in enumerate(got):
            r = inside.step(pcm[j])
            np.testing.assert_array_equal(d.result.tokens, r.tokens)
            np.testing.assert_allclose(d.result.pcm, r.pcm, atol=1e-6)
        np.testing.assert_array_equal(built[0].last_user_codes, inside.last_user_codes)
        deadline = time.monotonic() + 10
        while not built[0].gen.has_pending:
            assert time.monotonic() < deadline
            time.sleep(0.002)

        def broken():
            raise MemoryError("out of memory")
        runner.set_model_attr("after_step", broken)
        runner.submit(InFrame(index=8, pcm=pcm[0], t_adc=None, epoch=runner.epoch))
        kinds = [d.kind for d in wait_for(("step", "error"), 2)]
        assert kinds == ["step", "error"] and runner.failed
    finally:
        runner.stop()


def _blocked_encode(engine):
    """Makes the engine's encode worker wait for the returned Event before each frame."""
    import threading
    gate = threading.Event()
    real = engine._encode_frame

    def slow(pcm, **kw):
        assert gate.wait(10), "the encode was never let through"
        return real(pcm, **kw)
    engine._encode_frame = slow
    return gate


def test_a_deferred_frame_returns_before_its_encode_and_after_step_finishes_it(tiny_dir):
    """step(defer_next=True) with the encode worker returns the frame's audio and tokens while
    the frame's encode is still running (no frame needs its own user codes), and after_step
    writes them and issues the next step; the frames equal those of a plain engine, including
    when a persona switch comes before after_step."""
    rng = np.random.default_rng(8)
    pcm = (0.1 * rng.standard_normal((14, 1920))).astype(np.float32)
    live = _engine(tiny_dir, True, greedy=True)
    live.overlap_encode = True
    live.stage_sample_every = 0
    plain = _engine(tiny_dir, False, greedy=True)
    for e in (live, plain):
        e.start(TEACHER)
    for j in range(6):
        a = live.step(pcm[j], defer_next=True)
        b = plain.step(pcm[j])
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.pcm, b.pcm, atol=1e-6)
        live.after_step()
        assert live.gen.has_pending and not live.gen.frame_unfinished
        np.testing.assert_array_equal(live.last_user_codes, plain.last_user_codes)
    gate = _blocked_encode(live)
    a = live.step(pcm[6], defer_next=True)  # returns although its encode is held back
    assert live.gen.frame_unfinished and not gate.is_set()
    np.testing.assert_array_equal(a.tokens, plain.step(pcm[6]).tokens)
    gate.set()
    live.after_step()
    assert not live.gen.frame_unfinished and live.gen.has_pending
    np.testing.assert_array_equal(live.last_user_codes, plain.last_user_codes)
    live.step(pcm[7], defer_next=True)  # then a persona switch before after_step
    plain.step(pcm[7])
    for e in (live, plain):
        e.start(OTHER)
    assert not live.gen.frame_unfinished and not live.gen.has_pending
    for j in range(8, 14):
        a = live.step(pcm[j], defer_next=True)
        live.after_step()
        np.testing.assert_array_equal(a.tokens, plain.step(pcm[j]).tokens)


def test_the_kernel_check_reads_its_flags_before_the_next_step_is_issued(tiny_dir, monkeypatch):
    """Every DEPTH_CHECK_EVERY frames the step kernels' barrier flags are read: between the
    frame's barrier and the next step's submission (which writes them, so reading them later
    would wait for that whole step), and a switch's sentence reaches that frame's result."""
    engine = _engine(tiny_dir, True, greedy=True)
    engine.start(TEACHER)
    seen, chained = [], []
    real_chain = engine.gen._chain_next

    def chain(*a):
        chained.append(True)
        return real_chain(*a)

    def check():
        seen.append(engine.gen.has_pending or bool(chained))
        return "switched" if len(seen) == 2 else None

    monkeypatch.setattr(engine.gen, "check_depth_kernel", check)
    monkeypatch.setattr(engine.gen, "_chain_next", chain)

    def frame():
        chained.clear()
        return engine.step(np.zeros(1920, np.float32)).notice

    notices = [frame() for _ in range(60)]
    engine.gen.chain_ahead = True  # a checked frame does not chain the next step before it
    notices += [frame() for _ in range(30)]
    assert chained  # the frames after the last check chained theirs
    assert len(seen) >= 3 and not any(seen)
    assert [n for n in notices if n] == ["switched"]
    assert notices.index("switched") == [i for i in range(90)
                                         if (i + 1) % engine.DEPTH_CHECK_EVERY == 1][1]


def test_chained_steps_are_built_before_the_barrier(tiny_dir, monkeypatch):
    """chain_ahead: the next step is built (and handed over) before the frame's final eval, and
    that pending step is what the next frame uses."""
    import mlx.core as mx
    rng = np.random.default_rng(9)
    pcm = (0.1 * rng.standard_normal((6, 1920))).astype(np.float32)
    engine = _engine(tiny_dir, True, greedy=True)
    engine.gen.chain_ahead = True
    engine.stage_sample_every = 0
    engine.start(TEACHER)
    engine.step(pcm[0])
    order = []
    gen = engine.gen
    real_chain, real_eval = gen._chain_next, mx.eval
    monkeypatch.setattr(gen, "_chain_next", lambda *a: (order.append("chain"), real_chain(*a))[1])
    monkeypatch.setattr(mx, "eval", lambda *a: (order.append("eval"), real_eval(*a))[1])
    for j in range(1, 6):
        before = gen._pending
        engine.step(pcm[j])
        assert gen._pending is not before and gen._pending.s == gen.position
    assert order[:2] == ["chain", "eval"] and order.count("chain") == 5


def test_the_simulated_runner_reports_a_failed_after_step_after_its_step():
    """InlineRunner (the tests' stand-in for the model thread) calls after_step too, and a
    failure there arrives after the frame's step Done, as it does from the thread."""
    from engine.session.fakes import ToneFrameModel
    from engine.session.runner import InFrame, InlineRunner

    class Model(ToneFrameModel):
        def step(self, pcm_in, *, force_agent_silence=False, defer_next=False):
            self.deferred = defer_next
            return super().step(pcm_in, force_agent_silence=force_agent_silence)

        def after_step(self):
            raise MemoryError("out of memory")

    model = Model()
    runner = InlineRunner(model, step_ms=10)
    runner.submit(InFrame(index=0, pcm=np.zeros(1920, np.float32), t_adc=None, epoch=0))
    got = runner.poll(0.0) + runner.poll(1.0)
    assert [d.kind for d in got] == ["step", "error"] and model.deferred
    assert "out of memory" in got[1].error and runner.failed


def test_a_frames_output_does_not_depend_on_its_own_audio(tiny_dir):
    """What lets a live frame return before its encode (and could let a frame's output be made
    before its audio arrives): with the default depth steps, frame s's tokens and audio are the
    same whatever audio frame s carries; frame s+1's differ."""
    rng = np.random.default_rng(11)
    pcm = (0.1 * rng.standard_normal((12, 1920))).astype(np.float32)
    other = (0.3 * rng.standard_normal(1920)).astype(np.float32)
    a, b = _engine(tiny_dir, True, greedy=True), _engine(tiny_dir, True, greedy=True)
    assert a.gen.model.depformer_steps == a.gen.cfg.n_q // 2
    for e in (a, b):
        e.start(TEACHER)
        for j in range(8):
            e.step(pcm[j])
    ra, rb = a.step(pcm[8]), b.step(other)  # frame 8: different audio
    np.testing.assert_array_equal(ra.tokens, rb.tokens)
    np.testing.assert_array_equal(ra.pcm, rb.pcm)
    assert not np.array_equal(a.last_user_codes, b.last_user_codes)
    later = [(a.step(pcm[j]), b.step(pcm[j])) for j in range(9, 12)]
    assert any(not np.array_equal(x.tokens, y.tokens) or not np.array_equal(x.pcm, y.pcm)
               for x, y in later)
