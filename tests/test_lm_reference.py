"""LM parity with Kyutai's PyTorch `moshi` 0.2.13 (tests/fixtures/reference/, README there):
teacher-forced text and audio logits, greedy streaming for dep_q 8 and 16, and streaming past a
context-8 attention window (Kyutai's exact-window ring rule)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from engine.config import DEFAULT_LM, LMConfig  # noqa: E402
from engine.lm import LMGen, LMModel  # noqa: E402

REF = Path(__file__).parent / "fixtures" / "reference"
TOL = 1e-4


def load_variant(name: str, depformer_steps=None):
    d = REF / name
    assert (d / "fixture.npz").exists(), f"committed fixture {name} is missing"
    raw = json.loads((d / "config.json").read_text())
    cfg = LMConfig.from_dict({**DEFAULT_LM, **raw["lm"]}, "lm")
    fx = dict(np.load(d / "fixture.npz"))
    model = LMModel.load(d / "lm.safetensors", cfg, dtype="float32",
                         depformer_steps=depformer_steps or cfg.dep_q)
    return cfg, fx, model, raw["meta"]


def stream(model, cfg, fx, *, with_user: bool, rule: str = "kyutai"):
    """Kyutai step s = flat step s (README "Position picture"): rows step_input[s] as user codes of
    flat steps 0..48, plus one more flat step."""
    gen = LMGen(model, None, greedy=True, reference=rule)
    text_logits, audio_sampled, text_sampled, outs = [], [], [], []
    n = len(fx["step_input"])
    for s in range(n + 1):
        uc = fx["step_input"][s] if (with_user and s < n) else None
        if with_user and s == n:
            uc = fx["step_input"][-1]  # lands on positions >= 49: never read
        out = gen.step(user_codes=uc)
        if s >= 1:
            text_logits.append(gen.last_text_logits)
            text_sampled.append(gen.last_text_sampled)
            audio_sampled.append(gen.last_audio_sampled)
        if s >= 2:
            outs.append(out)
        else:
            assert out is None
    return gen, np.array(text_logits), np.array(text_sampled), np.array(audio_sampled), np.array(outs)


def audio_logits_run(model, cfg, fx, *, with_user: bool, rule="kyutai"):
    gen = LMGen(model, None, greedy=True, reference=rule, keep_audio_logits=True)
    n = len(fx["step_input"])
    res = []
    for s in range(n + 1):
        uc = fx["step_input"][min(s, n - 1)] if with_user else None
        gen.step(user_codes=uc)
        if s >= 1:
            res.append(np.array(gen.last_audio_logits))
    return np.array(res)


@pytest.mark.parametrize("variant", ["lm_dep8", "lm_dep16"])
def test_teacher_forced_logits(variant):
    cfg, fx, model, meta = load_variant(variant)
    text, audio = model.teacher_forced_logits(fx["tf_codes"])
    nan_ref = np.isnan(fx["tf_logits"])
    np.testing.assert_array_equal(np.isnan(audio), nan_ref)
    np.testing.assert_array_equal(np.isnan(text), np.isnan(fx["tf_text_logits"]))
    te = np.nanmax(np.abs(text - fx["tf_text_logits"]))
    ae = np.nanmax(np.abs(audio - fx["tf_logits"]))
    print(f"{variant}: teacher-forced max err text {te:.2e}, audio {ae:.2e}")
    assert te < TOL and ae < TOL


@pytest.mark.parametrize("variant", ["lm_dep8", "lm_dep16"])
def test_greedy_streaming(variant):
    cfg, fx, model, meta = load_variant(variant)
    with_user = cfg.dep_q < cfg.n_q  # Kyutai's LMGen with dep_q 16 takes no user input
    gen, tl, ts, aus, outs = stream(model, cfg, fx, with_user=with_user)
    K = cfg.dep_q
    assert outs.shape == (48, 17)
    np.testing.assert_array_equal(outs[:, : 1 + K].T, fx["lm_tokens"])
    if with_user:  # the user channels we emit are the user codes, delayed
        np.testing.assert_array_equal(outs[:, 9], fx["user_codes"][:, 0])
        np.testing.assert_array_equal(outs[:, 10:], fx["user_codes"][:, 1:])
    np.testing.assert_array_equal(ts, fx["text_sampled"])
    np.testing.assert_array_equal(aus, fx["audio_sampled"])
    te = np.abs(tl - fx["text_logits"]).max()
    al = audio_logits_run(model, cfg, fx, with_user=with_user)
    ae = np.abs(al - fx["audio_logits"]).max()
    print(f"{variant}: streaming {len(outs)} frames identical; max err text logits {te:.2e}, "
          f"audio logits {ae:.2e}")
    assert te < TOL and ae < TOL


def test_context8_streaming_past_the_window():
    cfg, fx, model, meta = load_variant("lm_ctx8")
    assert cfg.context == 8 and len(fx["lm_tokens"][0]) >= 2 * cfg.context
    gen, tl, ts, aus, outs = stream(model, cfg, fx, with_user=True, rule="kyutai")
    np.testing.assert_array_equal(outs[:, :9].T, fx["lm_tokens"])
    np.testing.assert_array_equal(ts, fx["text_sampled"])
    np.testing.assert_array_equal(aus, fx["audio_sampled"])
    te = np.abs(tl - fx["text_logits"]).max()
    print(f"lm_ctx8: 48 frames identical past the 8-slot window; max text-logit err {te:.2e}")
    assert te < TOL
    # The ring really wrapped: before position 7 (the first full ring) NVIDIA's rule agrees.
    _, tl_nv, *_ = stream(model, cfg, fx, with_user=True, rule="nvidia")
    d = np.abs(tl_nv - fx["text_logits"]).max(axis=1)
    assert d[:5].max() < TOL and d.max() > 1e-2


@pytest.mark.parametrize("rule", ["nvidia", "kyutai"])
def test_kv_ring_window_rule(rule):
    """Each query sees exactly the keys of its rule, through several wraps, for steps and for the
    batched (prefill) chunk."""
    from engine.lm.kv_ring import KVRing

    C, H, hd, n = 5, 2, 4, 17
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n, H, hd)).astype(np.float32)
    k = rng.standard_normal((n, H, hd)).astype(np.float32)
    v = rng.standard_normal((n, H, hd)).astype(np.float32)

    def expected(p):
        lo = max(0, p - C + (2 if rule == "nvidia" else 1))
        s = np.einsum("hd,thd->ht", q[p], k[lo:p + 1]) / np.sqrt(hd)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        return np.einsum("ht,thd->hd", w, v[lo:p + 1])

    ring = KVRing(1, H, hd, C, mx.float32, rule)
    for p in range(n):
        t = lambda a: mx.array(a[p][None, :, None, :])  # noqa: E731
        out = ring.attend_step(0, t(q), t(k), t(v), 1 / np.sqrt(hd))
        ring.advance(1)
        np.testing.assert_allclose(np.array(out)[0, :, 0], expected(p), atol=1e-5)
    chunk = KVRing(1, H, hd, C, mx.float32, rule)
    t = lambda a, s: mx.array(a[s].transpose(1, 0, 2)[None])  # noqa: E731
    out1 = chunk.attend_chunk(0, t(q, slice(0, 9)), t(k, slice(0, 9)), t(v, slice(0, 9)), 1 / np.sqrt(hd))
    chunk.advance(9)
    out2 = chunk.attend_chunk(0, t(q, slice(9, n)), t(k, slice(9, n)), t(v, slice(9, n)), 1 / np.sqrt(hd))
    chunk.advance(n - 9)
    got = np.concatenate([np.array(out1)[0], np.array(out2)[0]], axis=1).transpose(1, 0, 2)
    np.testing.assert_allclose(got, np.stack([expected(p) for p in range(n)]), atol=1e-5)
    np.testing.assert_allclose(np.array(chunk.keys[0]), np.array(ring.keys[0]), atol=0)


def test_context8_prefill_matches_steps():
    """The batched prefill uses the per-step window rule, also past the window."""
    cfg, fx, model, meta = load_variant("lm_ctx8")
    frames = np.concatenate([np.tile([[3] + [5] * 8], (20, 1)), fx["user_codes"][:20]], axis=1)
    for rule in ("kyutai", "nvidia"):
        a = LMGen(model, None, greedy=True, reference=rule)
        for f in frames:
            a.step(forced=f)
        b = LMGen(model, None, greedy=True, reference=rule)
        b.prefill(None, frames)
        np.testing.assert_allclose(a.last_text_logits, b.last_text_logits, atol=1e-5)
        for uc in fx["user_codes"][20:26]:
            np.testing.assert_array_equal(a.step(user_codes=uc), b.step(user_codes=uc))
