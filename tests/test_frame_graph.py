"""The live frame's graph keeps the structure its speed depends on (docs/benchmarks.md, session
2): on MLX's CUDA backend a gather costs ~27 µs to issue and an index-array `slice_update` copies
the whole KV ring, so a frame holds gathers only for its embedding and codebook lookups, and the
ring is written with static slice updates. Counts, not timings: they do not depend on the
machine."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from engine.duplex import DuplexEngine
from engine.mxops import at, primitive_counts, unbatch
from engine.personas import TEACHER_PROMPT, Persona


def test_live_frame_gathers_only_what_it_looks_up(tiny_dir):
    engine = DuplexEngine.load(str(tiny_dir), greedy=True, seed=0)
    engine.start(Persona(name="t", prompt=TEACHER_PROMPT, voice="TINY0"))
    rng = np.random.default_rng(0)
    for _ in range(3):
        engine.step((0.05 * rng.standard_normal(engine.frame_size)).astype(np.float32))
    gen, model, mimi = engine.gen, engine.gen.model, engine.mimi

    # temporal step (the compiled per-layer path): one gather over the 16 stacked audio
    # embeddings, one over the text table; the ring written in place
    x = model.embed_step(gen.tokens_at(gen.position - 1), compiled=True)
    hn = model.hidden(x, gen.kv, compiled=True)
    temporal = primitive_counts(hn, *gen.kv.arrays())
    assert temporal["Gather"] == 2, temporal
    assert temporal["DynamicSliceUpdate"] == 0 and temporal["SliceUpdate"] > 0, temporal
    mx.eval(hn, *gen.kv.arrays())

    # depth chain: one embedding lookup per step, nothing else gathered
    K = model.depformer_steps
    frame = gen._make_frame()
    outs = frame(hn, mx.zeros((K + 1,), mx.bool_), mx.zeros((K + 1,), mx.int32), gen._key)
    assert primitive_counts(outs[0])["Gather"] == K

    # Mimi: codebook lookups only (encode: the residual of every level but the last of each
    # branch; decode: one per quantizer branch)
    n = mimi.num_codebooks
    enc = primitive_counts(mimi.encode_step(np.zeros(engine.frame_size, np.float32)))
    assert enc["Gather"] <= n - 1, enc
    dec = primitive_counts(mimi.decode_step(mx.zeros((n,), mx.int32)))
    assert dec["Gather"] == 2, dec  # one per quantizer branch, over its stacked tables


def test_views_instead_of_gathers():
    a = mx.arange(12).reshape(3, 4)
    assert primitive_counts(a[1])["Gather"] == 1  # what MLX does for one integer index
    assert primitive_counts(at(a, 1))["Gather"] == 0
    assert np.array_equal(np.array(at(a, 1)), np.array(a)[1])
    b = a[None]
    assert primitive_counts(unbatch(b))["Gather"] == 0
    assert np.array_equal(np.array(unbatch(b)), np.array(a))


@pytest.mark.parametrize("k, stride, dilation", [(7, 1, 1), (3, 1, 3), (4, 2, 1), (8, 4, 1)])
def test_streaming_conv_im2col_is_one_view_not_a_concatenation_of_taps(k, stride, dilation):
    """A streaming conv's window matrix is one strided view (one copy to make it contiguous),
    not a concatenation of its k taps (k copy kernels on CUDA); its output still equals
    mx.conv1d over the same padded input."""
    from engine.mimi.conv import StreamingConv1d
    rng = np.random.default_rng(k)
    w = rng.standard_normal((6, 5, k)).astype(np.float32)
    conv = StreamingConv1d(w, stride=stride, dilation=dilation)
    assert conv.mode == "matmul"
    x = mx.array(rng.standard_normal((1, 4 * stride, 5)).astype(np.float32))
    y = conv(x)
    counts = primitive_counts(y)
    assert counts["Concatenate"] == 1, counts  # only the carried samples joined to the input
    assert counts["AsStrided"] == 1, counts
    padded = mx.concatenate([mx.zeros((1, conv.context, 5)), x], axis=1)
    want = mx.conv1d(padded, mx.array(w.transpose(0, 2, 1)), stride=stride, dilation=dilation)
    np.testing.assert_allclose(np.array(y), np.array(want), rtol=1e-5, atol=1e-5)
