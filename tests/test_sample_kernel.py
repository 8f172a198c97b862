"""engine/lm/sample_kernel.py: when the one-kernel top-k draw is taken and what each draw is given.

The kernel needs MLX's CUDA backend: `scripts/check_fused_kernels.py --sampler` checks it there
exactly against an oracle of its rule and statistically against softmax over the top-k; NVRTC
compiles it anywhere (`--nvrtc`). Here the kernels are stood in for.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from engine.lm import fused, sample_kernel
from tests.test_fused import _fake_cuda_kernels


def test_it_is_the_default_where_the_fused_kernels_run(monkeypatch):
    monkeypatch.delenv("PARLEY_FUSED_SAMPLING", raising=False)
    assert sample_kernel.enabled() is fused.enabled()  # this CPU: off
    monkeypatch.setattr(fused, "enabled", lambda: True)
    assert sample_kernel.enabled()
    monkeypatch.setenv("PARLEY_FUSED_SAMPLING", "0")
    assert not sample_kernel.enabled()
    monkeypatch.setattr(fused, "enabled", lambda: False)
    monkeypatch.setenv("PARLEY_FUSED_SAMPLING", "1")
    assert not sample_kernel.enabled()  # CUDA only, whatever the variable says


def _frame_draws(tiny_dir, monkeypatch, greedy: bool):
    """Runs one frame function of the tiny model with the draws spied on -> (draws, K)."""
    from engine.duplex import DuplexEngine
    made, draws = {}, []
    _fake_cuda_kernels(monkeypatch, made)
    real = sample_kernel.sample_topk

    def spy(logits, noise, temp, top_k, forced, j):
        draws.append({"V": logits.shape[-1], "noise": noise.shape, "temp": temp, "top_k": top_k,
                      "forced": forced.shape, "j": j})
        return real(logits, noise, temp, top_k, forced, j)

    monkeypatch.setattr(sample_kernel, "sample_topk", spy)
    monkeypatch.setattr(fused, "enabled", lambda: True)
    monkeypatch.setenv("PARLEY_FUSED_SAMPLING", "1")
    try:
        gen = DuplexEngine.load(str(tiny_dir), seed=0, dtype="float32", greedy=greedy).gen
        gen.depth_path = "mlx"  # the draws are what is looked at here, not the depth kernels
        K = gen.model.depformer_steps
        frame = gen._make_frame()
        hn = mx.zeros((1, 1, gen.cfg.dim))
        mask = mx.array([False] * (K + 1))
        outs = frame(hn, mask, mx.zeros((K + 1,), mx.int32), mx.random.key(0))
        mx.eval(outs)
        assert outs[0].shape == (K + 1,)
    finally:
        fused._kernel.cache_clear()
        sample_kernel._kernel.cache_clear()
    return draws, K, gen


def test_a_sampled_frame_draws_each_token_in_one_kernel(tiny_dir, monkeypatch):
    """Text token and every depth step: one draw each, with its own vocabulary, temperature and
    top-k, a Gumbel noise row of the vocabulary's size and the frame's forced pairs."""
    draws, K, gen = _frame_draws(tiny_dir, monkeypatch, greedy=False)
    assert [d["j"] for d in draws] == list(range(K + 1))
    text, audio = draws[0], draws[1:]
    assert text["V"] == gen.cfg.text_card and text["noise"] == (gen.cfg.text_card,)
    assert (text["temp"], text["top_k"]) == (gen.text_params.temp, gen.text_params.top_k)
    for d in audio:
        assert d["V"] == gen.cfg.card and d["noise"] == (gen.cfg.card,)
        assert (d["temp"], d["top_k"]) == (gen.audio_params.temp, gen.audio_params.top_k)
    assert all(d["forced"] == (K + 1, 2) for d in draws)


def test_greedy_frames_keep_the_argmax(tiny_dir, monkeypatch):
    draws, _, _ = _frame_draws(tiny_dir, monkeypatch, greedy=True)
    assert draws == []


def test_forced_pairs_are_mask_and_value():
    pairs = sample_kernel.forced_pairs(mx.array([True, False]), mx.array([5, 9], dtype=mx.int32))
    np.testing.assert_array_equal(np.array(pairs), [[1, 5], [0, 9]])
