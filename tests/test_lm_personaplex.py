"""End-to-end LM parity with NVIDIA's PersonaPlex reference run on the tiny model
(tests/fixtures/personaplex-tiny, README there): greedy fp32 streaming through the voice replay,
silence spacers, text prompt and 96 user frames reproduces every recorded hidden state, text logit,
sampled token and emitted frame; the batched prefill leaves the frame-by-frame state.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from engine.config import load_model_config  # noqa: E402
from engine.lm import LMGen, LMModel  # noqa: E402
from engine.voices import load_voice  # noqa: E402

TOL = 1e-4
VOICE, SILENCE1, TEXT, SILENCE2, USER = 1, 2, 3, 4, 5


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    cfg = load_model_config(tiny_dir)
    ref = dict(np.load(tiny_dir / "reference" / "tokens.npz"))
    voice = load_voice(tiny_dir / "voices" / "TINY0.pt")
    return tiny_dir, cfg, ref, voice


def prompt_frame(cfg, text: int) -> list[int]:
    return [text] + list(cfg.lmgen.silence_tokens) + list(cfg.lmgen.sine_tokens)


def text_prompt_ids(ref) -> list[int]:
    """The 43 text-prompt ids: the tokens forced at positions 50..92 (from the record, so this
    test does not depend on the tokenizer)."""
    sel = ref["step_phase"] == TEXT
    return [int(t) for t in ref["step_target"][sel, 0]]


def prompt_frames(cfg, ref) -> np.ndarray:
    pad = cfg.lm.existing_text_padding_id
    n_sil = cfg.lmgen.audio_silence_frame_cnt
    frames = [prompt_frame(cfg, pad)] * n_sil
    frames += [prompt_frame(cfg, t) for t in text_prompt_ids(ref)]
    frames += [prompt_frame(cfg, pad)] * n_sil
    return np.array(frames, dtype=np.int64)


def run_session(model, cfg, ref, voice, *, batched: bool, record: bool = True, compile=True):
    """Drives LMGen through the reference session; returns per-step records and the outputs."""
    gen = LMGen(model, cfg.lmgen, greedy=True, compile=compile)
    gen.reset()
    rec = {"hidden": [], "text_logits": [], "text": [], "audio": [], "emitted": []}
    frames = prompt_frames(cfg, ref)

    def note(out):
        if record:
            rec["hidden"].append(gen.last_hidden)
            rec["text_logits"].append(gen.last_text_logits)
            rec["text"].append(gen.last_text_sampled)
            rec["audio"].append(gen.last_audio_sampled)
            rec["emitted"].append(out)

    if batched:
        gen.prefill(voice.embeddings, frames, token_cache=voice.cache)
    else:
        assert gen.step() is None  # step 0 only writes (the lost first voice frame)
        for e in voice.embeddings:
            note(gen.step(embedding=e))
        gen.set_token_cache(voice.cache)
        for f in frames:
            note(gen.step(forced=f))
    prefill_state = (gen.last_hidden.copy(), gen.last_text_logits.copy())
    outs = []
    for uc in ref["user_codes"]:
        out = gen.step(user_codes=uc)
        note(out)
        outs.append(out)
    return gen, rec, np.array(outs), prefill_state


@pytest.mark.parametrize("steps,compile", [(16, True), (8, True), (8, False)])
def test_streaming_matches_reference_run(tiny, steps, compile):
    tiny_dir, cfg, ref, voice = tiny
    model = LMModel.load(tiny_dir / "model.safetensors", cfg.lm, dtype="float32",
                         depformer_steps=steps)
    gen, rec, outs, _ = run_session(model, cfg, ref, voice, batched=False, compile=compile)
    S = len(ref["step_offset"])
    assert len(rec["hidden"]) == S
    assert gen.position == int(ref["step_offset"][-1]) + 1
    # Every emitted frame, and the output tokens, exactly.
    np.testing.assert_array_equal(outs, ref["out_tokens"])
    for i in range(S):
        em = ref["step_emitted"][i]
        if rec["emitted"][i] is None:
            assert (em == -100).all(), i
        else:
            np.testing.assert_array_equal(rec["emitted"][i], em, err_msg=f"step {i}")
    hid = np.abs(np.stack(rec["hidden"]) - ref["step_hidden"]).max()
    tl = np.abs(np.stack(rec["text_logits"]) - ref["step_text_logits"]).max()
    print(f"depformer_steps={steps} compile={compile}: max |hidden| err {hid:.2e}, max |text logits| err {tl:.2e}")
    assert hid < TOL and tl < TOL
    np.testing.assert_array_equal(np.array(rec["text"]), ref["step_text_sampled"])
    np.testing.assert_array_equal(np.stack(rec["audio"]), ref["step_audio_sampled"][:, :steps])


def test_batched_prefill_equals_frame_by_frame(tiny):
    tiny_dir, cfg, ref, voice = tiny
    model = LMModel.load(tiny_dir / "model.safetensors", cfg.lm, dtype="float32")
    assert model.depformer_steps == 8
    frames = prompt_frames(cfg, ref)

    step_gen = LMGen(model, cfg.lmgen, greedy=True)
    step_gen.step()
    for e in voice.embeddings:
        step_gen.step(embedding=e)
    step_gen.set_token_cache(voice.cache)
    for f in frames:
        step_gen.step(forced=f)

    batch_gen = LMGen(model, cfg.lmgen, greedy=True)
    batch_gen.prefill(voice.embeddings, frames, token_cache=voice.cache)

    P = len(voice.embeddings) + 1 + len(frames)
    assert step_gen.position == batch_gen.position == P == 99
    # The token window: positions P-1..P+1, tokens and forced flags.
    for p in range(P - 2, P + 2):
        np.testing.assert_array_equal(step_gen.tokens_at(p), batch_gen.tokens_at(p))
        np.testing.assert_array_equal(step_gen.forced_at(p), batch_gen.forced_at(p))
    # At P only the delayed channels are forced (MODEL.md §7.5 step 3).
    np.testing.assert_array_equal(batch_gen.forced_at(P), np.array(cfg.lm.delays) > 0)
    # KV ring contents.
    assert step_gen.kv.end == batch_gen.kv.end == P - 1
    kv_err = max(float(mx.abs(a - b).max()) for a, b in zip(step_gen.kv.arrays(), batch_gen.kv.arrays()))
    assert kv_err < 1e-5
    # The last prefill position's outputs, and the recorded reference at that step.
    np.testing.assert_allclose(batch_gen.last_hidden, step_gen.last_hidden, atol=1e-5)
    np.testing.assert_allclose(batch_gen.last_text_logits, step_gen.last_text_logits, atol=1e-5)
    # Next-step logits and outputs are identical; then the whole live session matches.
    errs = []
    for j, uc in enumerate(ref["user_codes"]):
        a = step_gen.step(user_codes=uc)
        b = batch_gen.step(user_codes=uc)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(b, ref["out_tokens"][j])
        errs.append(np.abs(step_gen.last_text_logits - batch_gen.last_text_logits).max())
    print(f"prefill: KV max err {kv_err:.2e}, next-step text logits err {errs[0]:.2e}, "
          f"max over session {max(errs):.2e}")
    assert errs[0] < 1e-5


def test_prefill_wav_style_and_checks(tiny):
    """Without embeddings the first frame is the lost step-0 frame (WAV voices); prefill refuses
    a used state; step() refuses to read a position whose user channels were never given."""
    tiny_dir, cfg, ref, voice = tiny
    model = LMModel.load(tiny_dir / "model.safetensors", cfg.lm)
    frames = prompt_frames(cfg, ref)[:10]
    a = LMGen(model, cfg.lmgen, greedy=True)
    for f in frames:
        a.step(forced=f)
    b = LMGen(model, cfg.lmgen, greedy=True)
    b.prefill(None, frames)
    assert a.position == b.position == 10
    np.testing.assert_allclose(a.last_text_logits, b.last_text_logits, atol=1e-5)
    with pytest.raises(RuntimeError):
        b.prefill(None, frames)
    c = LMGen(model, cfg.lmgen, greedy=True)
    c.step(forced=frames[0])
    c.step()  # position 1 user cb0 never given: read by the next step
    with pytest.raises(RuntimeError, match="no token for channel 9"):
        c.step()
    d = LMGen(model, cfg.lmgen, greedy=True)
    with pytest.raises(ValueError, match="step 0 only writes"):
        d.step(embedding=voice.embeddings[0])
    with pytest.raises(ValueError, match="out of range"):
        d.step(user_codes=[cfg.lm.card + 1] * 8)
    with pytest.raises(ValueError, match="out of range"):
        d.step(forced={0: -2})


def test_force_agent_silence(tiny):
    tiny_dir, cfg, ref, voice = tiny
    model = LMModel.load(tiny_dir / "model.safetensors", cfg.lm)
    gen = LMGen(model, cfg.lmgen, greedy=True)
    gen.prefill(voice.embeddings, prompt_frames(cfg, ref), token_cache=voice.cache)
    for uc in ref["user_codes"][:5]:
        gen.step(user_codes=uc)
    s = gen.position
    gen.step(user_codes=ref["user_codes"][5], force_agent_silence=True)
    out = gen.step(user_codes=ref["user_codes"][6])  # emits frame s: the forced silence frame
    assert out[0] == cfg.lm.existing_text_padding_id
    np.testing.assert_array_equal(out[1:9], cfg.lmgen.silence_tokens)
    assert gen.forced_at(s)[:2].all() and gen.forced_at(s + 1)[2:9].all()


def test_sampling_is_seeded(tiny):
    tiny_dir, cfg, ref, voice = tiny
    model = LMModel.load(tiny_dir / "model.safetensors", cfg.lm)
    from engine.lm import SamplingParams

    def run(seed):
        gen = LMGen(model, cfg.lmgen, text=SamplingParams(0.7, 25), audio=SamplingParams(0.8, 250),
                    seed=seed)
        gen.prefill(voice.embeddings, prompt_frames(cfg, ref), token_cache=voice.cache)
        return np.array([gen.step(user_codes=uc) for uc in ref["user_codes"][:12]])

    a, b, c = run(1), run(1), run(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (a[:, 1:9] < cfg.lm.card).all() and (a[:, 0] < cfg.lm.text_card).all()


def test_changing_sampling_settings_takes_effect(tiny):
    """The compiled frame bakes the sampling settings in; assigning new ones rebuilds it."""
    tiny_dir, cfg, ref, voice = tiny
    from engine.lm import SamplingParams
    model = LMModel.load(tiny_dir / "model.safetensors", cfg.lm)

    def run(gen):
        gen.reset(3)
        gen.prefill(voice.embeddings, prompt_frames(cfg, ref), token_cache=voice.cache)
        return np.array([gen.step(user_codes=uc) for uc in ref["user_codes"][:8]])

    gen = LMGen(model, cfg.lmgen, text=SamplingParams(1.0, 250), audio=SamplingParams(1.0, 250))
    first = run(gen)
    gen.text_params = SamplingParams(0.0, 25)
    gen.audio_params = SamplingParams(0.0, 250)
    np.testing.assert_array_equal(run(gen), ref["out_tokens"][:8])  # temperature 0 = greedy
    gen.text_params = SamplingParams(1.0, 250)
    gen.audio_params = SamplingParams(1.0, 250)
    np.testing.assert_array_equal(run(gen), first)  # same seed, same settings
