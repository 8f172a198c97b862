"""Sampling (MODEL.md §9), checked statistically on fixed logits: only top-k candidates are drawn,
frequencies follow softmax(logits / temperature) renormalised over the top-k, lower temperature
concentrates, k is clamped to the vocabulary, greedy is the argmax, draws are seedable."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from engine.lm import SamplingParams  # noqa: E402
from engine.lm.sampling import sample  # noqa: E402

N = 20000


def draws(logits: np.ndarray, params: SamplingParams, seed: int = 0) -> np.ndarray:
    batch = mx.broadcast_to(mx.array(logits, dtype=mx.float32), (N, logits.shape[0]))
    return np.array(sample(batch, params, mx.random.key(seed)))


def expected(logits: np.ndarray, temp: float, k: int) -> np.ndarray:
    x = logits / temp
    top = np.argsort(-x)[:k]
    p = np.zeros_like(x)
    p[top] = np.exp(x[top] - x[top].max())
    return p / p.sum()


LOGITS = np.random.default_rng(1).normal(0, 2, 64).astype(np.float32)


@pytest.mark.parametrize("temp,k", [(0.8, 5), (0.7, 25), (1.5, 10), (0.8, 250)])
def test_frequencies_follow_tempered_topk_softmax(temp, k):
    got = draws(LOGITS, SamplingParams(temp, k))
    p = expected(LOGITS, temp, min(k, 64))
    freq = np.bincount(got, minlength=64) / N
    assert set(np.unique(got)) <= set(np.nonzero(p)[0])  # only top-k ids
    # Each probability within 5 standard errors (plus a small floor).
    se = np.sqrt(p * (1 - p) / N)
    assert np.all(np.abs(freq - p) <= 5 * se + 2e-3), np.abs(freq - p).max()


def test_temperature_concentrates():
    hot = draws(LOGITS, SamplingParams(2.0, 64))
    cold = draws(LOGITS, SamplingParams(0.3, 64))
    best = int(np.argmax(LOGITS))
    assert (cold == best).mean() > (hot == best).mean() + 0.2
    assert len(np.unique(cold)) < len(np.unique(hot))


def test_greedy_topk1_and_seeds():
    best = int(np.argmax(LOGITS))
    assert (draws(LOGITS, SamplingParams(0.0, 250)) == best).all()  # temperature 0 = argmax
    assert (draws(LOGITS, SamplingParams(0.8, 1)) == best).all()
    g = np.array(sample(mx.array(LOGITS), SamplingParams(0.8, 250), None, greedy=True))
    assert int(g) == best
    a = draws(LOGITS, SamplingParams(0.8, 25), seed=5)
    b = draws(LOGITS, SamplingParams(0.8, 25), seed=5)
    c = draws(LOGITS, SamplingParams(0.8, 25), seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
