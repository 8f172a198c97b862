"""Token sampling on the device (MODEL.md §9): softmax(logits / temperature) in float32 restricted
to the top-k (k clamped to the vocabulary), one categorical draw; argmax when greedy or
temperature 0. The reference's "exponential race" draw has the same distribution as MLX's
categorical draw over the renormalised top-k; the random numbers differ, so sampled tokens are
only comparable statistically.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.8
    top_k: int = 250

    @property
    def greedy(self) -> bool:
        return self.temp <= 0.0


TEXT_DEFAULT = SamplingParams(temp=0.7, top_k=25)
AUDIO_DEFAULT = SamplingParams(temp=0.8, top_k=250)


def sample(logits: mx.array, params: SamplingParams, key: mx.array | None, greedy: bool = False) -> mx.array:
    """logits [..., V] -> int32 tokens [...] (lazy, on the device)."""
    if greedy or params.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    V = logits.shape[-1]
    x = logits.astype(mx.float32) / params.temp
    k = V if params.top_k is None or params.top_k <= 0 else min(int(params.top_k), V)
    if k < V:
        # Exactly k candidates: the indices of the k largest logits.
        idx = mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]
        vals = mx.take_along_axis(x, idx, axis=-1)
        choice = mx.random.categorical(vals, axis=-1, key=key)
        return mx.take_along_axis(idx, choice[..., None], axis=-1)[..., 0].astype(mx.int32)
    return mx.random.categorical(x, axis=-1, key=key).astype(mx.int32)
