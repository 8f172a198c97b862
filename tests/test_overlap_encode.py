"""`DuplexEngine(overlap_encode=True)`: Mimi's encode of each frame on a worker thread while the
LM step is issued gives exactly the frames of the one-thread engine, across a new conversation
and a persona switch."""

from __future__ import annotations

import threading

import numpy as np

from engine.duplex import DuplexEngine
from engine.personas import TEACHER_PROMPT, Persona


def _frames(engine, persona, pcm, n):
    out = []
    engine.start(persona)
    for j in range(n):
        r = engine.step(pcm[j])
        out.append((r.tokens.copy(), r.pcm.copy(), engine.last_user_codes.copy()))
    engine.reset()  # a new conversation: the worker must start its encoder afresh too
    for j in range(n, 2 * n):
        r = engine.step(pcm[j])
        out.append((r.tokens.copy(), r.pcm.copy(), engine.last_user_codes.copy()))
    return out


def _plain_and_overlapped(tiny_dir, seed: int, frames: int):
    """Noise frames, the teacher persona, a one-thread greedy engine and one with the encode
    worker on."""
    rng = np.random.default_rng(seed)
    pcm = (0.1 * rng.standard_normal((frames, 1920))).astype(np.float32)
    persona = Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0")
    plain = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0)
    overlapped = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0)
    overlapped.overlap_encode = True
    return pcm, persona, plain, overlapped


def test_overlapped_encode_gives_the_same_frames(tiny_dir):
    pcm, persona, plain, overlapped = _plain_and_overlapped(tiny_dir, seed=0, frames=24)
    overlapped.profile_stages = True  # the stage split is still reported
    a = _frames(plain, persona, pcm, 12)
    b = _frames(overlapped, persona, pcm, 12)
    assert overlapped._encode_pool is not None  # the worker really ran
    names = {t.name for t in threading.enumerate()}
    assert any(n.startswith("parley-encode") for n in names)
    assert len({tuple(x[2]) for x in a}) > 3  # the user codes vary
    for (ta, pa, ua), (tb, pb, ub) in zip(a, b):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(ua, ub)
        np.testing.assert_allclose(pa, pb, atol=1e-6)
    r = overlapped.step(pcm[0])
    assert set(r.timings_ms) >= {"encode", "temporal", "depth", "decode", "total"}


def test_overlap_can_be_switched_on_mid_conversation(tiny_dir):
    """Turned on between frames, the worker carries on from the encoder state this thread built
    (which it could not evaluate itself) and the frames stay those of the one-thread engine."""
    rng = np.random.default_rng(1)
    pcm = (0.1 * rng.standard_normal((16, 1920))).astype(np.float32)
    persona = Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0")
    plain = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0)
    switched = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0)
    for e in (plain, switched):
        e.start(persona)
    for j in range(16):
        if j == 6:
            switched.overlap_encode = True
        if j == 11:
            switched.overlap_encode = False
        a, b = plain.step(pcm[j]), switched.step(pcm[j])
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(plain.last_user_codes, switched.last_user_codes)
    switched.close()


def test_an_engine_with_a_worker_exits_cleanly(tiny_dir, tmp_path):
    """A process that used the worker exits normally. (With a ThreadPoolExecutor, whose thread
    exits at the interpreter's exit, about one run in three aborted inside MLX.)"""
    import subprocess
    import sys
    script = tmp_path / "run.py"
    script.write_text(
        "import numpy as np, sys\n"
        "from engine.duplex import DuplexEngine\n"
        "from engine.personas import Persona\n"
        f"e = DuplexEngine.load({str(tiny_dir)!r}, seed=0)\n"
        "e.overlap_encode = True\n"
        "e.start(Persona(name='p', prompt='hi', voice='TINY0'))\n"
        "for _ in range(3): e.step(np.zeros(e.frame_size, np.float32))\n")
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(  # keeps a PYTHONPATH that holds MLX
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p))
    for _ in range(4):
        r = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True,
                           text=True, timeout=120, env=env)
        assert r.returncode == 0, r.stderr[-2000:]


def test_the_frame_path_names_the_overlap(tiny_dir):
    from engine.lm import fused
    engine = DuplexEngine.load(str(tiny_dir), seed=0)
    engine.overlap_encode = False
    if not fused.enabled():  # a CPU: plain MLX operations, only the pre-submission
        assert engine.frame_path == "next temporal step submitted ahead"
        engine.gen.presubmit = False
        assert engine.frame_path == ""
        engine.gen.presubmit = True
    rest = engine.frame_path
    engine.overlap_encode = True
    assert engine.frame_path == ", ".join(p for p in ("encode overlapped", rest) if p)


def test_early_submit_is_the_gpu_default(monkeypatch):
    import mlx.core as mx

    from engine.lm import lmgen
    monkeypatch.delenv("PARLEY_EARLY_SUBMIT", raising=False)
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    assert lmgen.default_early_submit() is on_gpu
    monkeypatch.setattr(lmgen.mx, "default_device", lambda: mx.Device(mx.DeviceType.gpu))
    assert lmgen.default_early_submit()
    monkeypatch.setenv("PARLEY_EARLY_SUBMIT", "0")
    assert not lmgen.default_early_submit()
    monkeypatch.setattr(lmgen.mx, "default_device", lambda: mx.Device(mx.DeviceType.cpu))
    monkeypatch.setenv("PARLEY_EARLY_SUBMIT", "1")
    assert lmgen.default_early_submit()


def test_early_submit_gives_the_same_frames(tiny_dir, monkeypatch):
    """PARLEY_EARLY_SUBMIT=1 hands the temporal step and the depth chain to the device as they
    are built (mx.async_eval, no barrier): sampled frames (seeded) stay exactly those of the
    one-barrier engine, with the encode overlapped too."""
    rng = np.random.default_rng(3)
    pcm = (0.1 * rng.standard_normal((24, 1920))).astype(np.float32)
    persona = Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0")
    monkeypatch.setenv("PARLEY_EARLY_SUBMIT", "0")  # the default on a GPU
    plain = DuplexEngine.load(str(tiny_dir), seed=5)
    monkeypatch.setenv("PARLEY_EARLY_SUBMIT", "1")
    early = DuplexEngine.load(str(tiny_dir), seed=5)
    assert early.gen.early_submit and not plain.gen.early_submit
    early.overlap_encode = True
    calls = []
    import mlx.core as mx
    real = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: (calls.append(len(a)), real(*a))[1])
    a = _frames(plain, persona, pcm, 12)
    b = _frames(early, persona, pcm, 12)
    assert len(calls) >= 2 * 24 - 2 * 24 // plain.stage_sample_every - 4  # two a frame, live
    for (ta, pa, ua), (tb, pb, ub) in zip(a, b):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(ua, ub)
        np.testing.assert_allclose(pa, pb, atol=1e-6)


def test_encode_after_issue_queues_the_encode_behind_the_frame_and_keeps_the_frames(
        tiny_dir, monkeypatch):
    """encode_after_issue (PARLEY_ENCODE_AFTER=1): each live frame's encode is queued only after
    the frame's outputs were handed to the device, and the frames (also deferred ones, finished
    by after_step) equal those of the one-thread engine."""
    import mlx.core as mx
    monkeypatch.delenv("PARLEY_ENCODE_AFTER", raising=False)
    monkeypatch.setenv("PARLEY_CODES_ON_DEVICE", "0")  # its encodes queue otherwise
    assert not DuplexEngine.load(str(tiny_dir), seed=0).encode_after_issue
    monkeypatch.setenv("PARLEY_ENCODE_AFTER", "1")
    pcm, persona, plain, after = _plain_and_overlapped(tiny_dir, seed=5, frames=30)
    assert after.encode_after_issue
    events = []
    real_async = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: (events.append("handed over"),
                                                      real_async(*a))[1])
    worker = after._encode_worker()
    real_submit_to = worker.submit_to
    monkeypatch.setattr(worker, "submit_to", lambda *a: (events.append("encode queued"),
                                                         real_submit_to(*a))[1])
    a = _frames(plain, persona, pcm, 12)
    b = _frames(after, persona, pcm, 12)
    queued = [i for i, e in enumerate(events) if e == "encode queued"]
    assert len(queued) >= 20  # the live frames of both conversations
    for i, j in zip([-1] + queued, queued):
        assert "handed over" in events[i + 1:j]  # this frame's outputs first
    for (ta, pa, ua), (tb, pb, ub) in zip(a, b):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(ua, ub)
        np.testing.assert_allclose(pa, pb, atol=1e-6)
    for j in range(24, 30):  # deferred frames, finished by after_step
        r = after.step(pcm[j], defer_next=True)
        after.after_step()
        np.testing.assert_array_equal(r.tokens, plain.step(pcm[j]).tokens)
        np.testing.assert_array_equal(after.last_user_codes, plain.last_user_codes)
