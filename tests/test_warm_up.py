"""`DuplexEngine.start` warms the live frame up (LMGen.warm_up): the compiled functions exist
before the first live frame, and the warm-up changes nothing a conversation can see."""

from __future__ import annotations

import numpy as np

from engine.duplex import DuplexEngine
from engine.lm import LMGen
from engine.personas import TEACHER_PROMPT, Persona


def _frames(engine, pcm):
    engine.start(Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"))
    return [(r.tokens.copy(), r.pcm.copy()) for r in map(engine.step, pcm)]


def test_start_compiles_the_live_frame_before_it_runs(tiny_dir):
    engine = DuplexEngine.load(str(tiny_dir), seed=0)
    assert engine.gen._frame is None
    engine.start(Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"))
    assert engine.gen._frame is not None
    assert False in engine.gen.model.temporal._step_fns  # the unfused step's functions


def test_the_warm_up_leaves_the_conversation_unchanged(tiny_dir, monkeypatch):
    """Sampled (not greedy) frames, so the sampling key's stream is checked too."""
    rng = np.random.default_rng(0)
    pcm = (0.1 * rng.standard_normal((10, 1920))).astype(np.float32)
    warmed = _frames(DuplexEngine.load(str(tiny_dir), seed=3), pcm)
    monkeypatch.setattr(LMGen, "warm_up", lambda self: None)
    cold = _frames(DuplexEngine.load(str(tiny_dir), seed=3), pcm)
    for (ta, pa), (tb, pb) in zip(warmed, cold):
        np.testing.assert_array_equal(ta, tb)
        np.testing.assert_array_equal(pa, pb)
