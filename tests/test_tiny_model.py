"""The tiny random-weights model generator: the real layout, loaded through the real code."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.model_dir import REQUIRED_FILES, check_layout, resolve_model
from engine.tiny import ensure_tiny_model, write_tiny_model


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=7)


def test_layout_and_tensor_counts(generated):
    from engine.lm.checkpoint import read_safetensors_header

    for name in REQUIRED_FILES:
        assert (generated / name).is_file()
    assert (generated / "RANDOM_WEIGHTS").exists()
    assert (generated / "voices" / "TINY.wav").exists()
    model = check_layout(generated)
    assert model.is_tiny_random
    lm_header = read_safetensors_header(generated / "model.safetensors")[0]
    mimi_header = read_safetensors_header(
        generated / "tokenizer-e351c8d8-checkpoint125.safetensors")[0]
    assert len(lm_header) == 115  # MODEL.md §4.1: tiny, dep_q 16
    assert len([k for k in mimi_header if not k.endswith("_initialized")]) >= 118


def test_tokenizer_matches_the_text_vocabulary(generated):
    import sentencepiece as spm

    cfg = json.loads((generated / "config.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(generated / "tokenizer_spm_32k_3.model"))
    assert sp.vocab_size() == cfg["lm"]["text_card"]
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]


def test_silence_and_sine_tokens_are_the_codecs_own(generated):
    from engine.mimi import Mimi

    model = check_layout(generated)
    cfg = model.config
    mimi = Mimi.load(model.mimi_path, cfg.mimi)
    frame = np.zeros(cfg.mimi.frame_size, np.float32)
    assert tuple(int(c) for c in np.array(mimi.encode_step(frame))) == cfg.lmgen.silence_tokens
    mimi.reset()
    t = np.arange(cfg.mimi.frame_size) / cfg.mimi.sample_rate
    sine = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    assert tuple(int(c) for c in np.array(mimi.encode_step(sine))) == cfg.lmgen.sine_tokens
    assert cfg.lmgen.silence_tokens != cfg.lmgen.sine_tokens


def test_generated_model_talks(generated):
    from engine.duplex import DuplexEngine
    from engine.personas import get_persona
    import dataclasses

    engine = DuplexEngine.load(str(generated), greedy=True)
    persona = dataclasses.replace(get_persona("teacher"), voice="TINY")
    engine.start(persona)
    rng = np.random.default_rng(0)
    outs = [engine.step((0.1 * rng.standard_normal(1920)).astype(np.float32)) for _ in range(12)]
    assert all(o.pcm.shape == (1920,) and np.isfinite(o.pcm).all() for o in outs)
    assert len({int(o.tokens[1]) for o in outs}) > 1  # the agent's codes vary


def test_ensure_is_cached_and_resolves_as_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("PARLEY_CACHE_DIR", str(tmp_path))
    first = ensure_tiny_model()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    model = resolve_model("tiny")
    assert model.path == first.resolve() and model.source == "tiny" and model.is_tiny_random
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # written once
