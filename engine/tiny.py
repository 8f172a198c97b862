"""A tiny PersonaPlex-format model with random weights, written in the real checkpoint layout.

Tests build models with it and load them through the real loading code; `--model tiny` uses it as
a demo that needs no download (every front end labels it "random weights": the marker file
RANDOM_WEIGHTS in the directory says so). Its speech is noise-like babble, by design.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from engine.config import DEFAULT_LM, config_to_json, parse_model_config

TINY_VERSION = 1
VOICE_NAME = "TINY"

# MODEL.md §2.4, with the codec's SILENCE/SINE constants computed after the codec is written.
TINY_LM = {
    **DEFAULT_LM,
    "dim": 64, "text_card": 256, "card": 64, "num_heads": 4, "num_layers": 2,
    "depformer_dim": 32, "depformer_dim_feedforward": 132, "depformer_num_heads": 2,
    "depformer_num_layers": 1,
}
TINY_MIMI = {
    "sample_rate": 24000, "channels": 1, "frame_rate": 12.5,
    "seanet": {"channels": 1, "dimension": 32, "causal": True, "n_filters": 4,
               "n_residual_layers": 1, "activation": "ELU", "compress": 2, "dilation_base": 2,
               "disable_norm_outer_blocks": 0, "kernel_size": 7, "residual_kernel_size": 3,
               "last_kernel_size": 3, "norm": "none", "pad_mode": "constant",
               "ratios": [8, 6, 5, 4], "true_skip": True},
    "quantizer": {"dimension": 16, "n_q": 16, "bins": 64, "input_dimension": 32,
                  "output_dimension": 32},
    "transformer": {"d_model": 32, "num_heads": 2, "num_layers": 2, "causal": True,
                    "layer_scale": 0.01, "context": 250, "conv_layout": True, "max_period": 10000,
                    "gating": "none", "norm": "layer_norm", "positional_embedding": "rope",
                    "dim_feedforward": 64, "input_dimension": 32, "output_dimensions": [32]},
}

# Text the tiny SentencePiece model is trained on: the built-in prompts and everyday phrases.
_CORPUS = """\
You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way.
You enjoy having a good conversation. Have a relaxed chat about food, travel, music and the weather.
You work for a bank and your name is Alex. Information: the branch opens at nine and closes at five.
You work for a medical office and your name is Sam. Information: appointments can be moved online.
You are an astronaut on a long mission, talking to people back home about life in orbit.
Hello, how are you today? I am fine, thank you. What would you like to talk about?
Could you tell me more about that? That sounds interesting. I think so too. Really? Of course.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday morning afternoon evening night.
One two three four five six seven eight nine ten eleven twelve hundred thousand million.
The quick brown fox jumps over the lazy dog while the children laugh in the garden.
Please hold on a moment while I check your account, your order and your delivery address.
We can help you reset your password, change your plan or book a visit with the doctor.
"""


def default_cache_dir() -> Path:
    base = os.environ.get("PARLEY_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return (root / "parley") if not os.environ.get("PARLEY_CACHE_DIR") else root


def ensure_tiny_model(directory: Path | None = None) -> Path:
    """The generated tiny model in the user's cache, written once (atomically)."""
    target = directory or default_cache_dir() / f"tiny-random-v{TINY_VERSION}"
    if (target / "RANDOM_WEIGHTS").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_tiny_model(scratch)
        try:
            scratch.rename(target)
        except OSError:  # another process won the race
            if not (target / "RANDOM_WEIGHTS").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def write_tiny_model(directory: Path, seed: int = 1234, *, dep_q: int = 16,
                     context: int = 3000) -> Path:
    """Writes a complete tiny model directory (config, LM, Mimi, tokenizer, a WAV voice)."""
    from safetensors.numpy import save_file

    from engine.lm.random_weights import random_lm_weights
    from engine.mimi import Mimi
    from engine.mimi.weights import random_mimi_weights

    directory = Path(directory)
    (directory / "voices").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    speech = babble(rng, seconds=6.0)

    text_card = train_tokenizer(directory / "tokenizer_spm_32k_3.model")
    lm = {**TINY_LM, "text_card": text_card, "dep_q": dep_q, "context": context}
    placeholder = {"silence_tokens": [0] * 8, "sine_tokens": [0] * 8}  # computed below
    provisional = parse_model_config({"lm": lm, "mimi": TINY_MIMI, "lmgen": placeholder})

    mimi_file = directory / "tokenizer-e351c8d8-checkpoint125.safetensors"
    save_file(random_mimi_weights(provisional.mimi, seed, fit_pcm=speech), str(mimi_file))
    mimi = Mimi.load(mimi_file, provisional.mimi, num_codebooks=8)
    frame = provisional.mimi.frame_size
    silence = _codes_of(mimi, np.zeros(frame, np.float32))
    t = np.arange(frame) / provisional.mimi.sample_rate
    sine = _codes_of(mimi, (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32))

    config = config_to_json(provisional)
    config["lmgen"] = {"silence_tokens": silence, "sine_tokens": sine,
                       "audio_tokens_per_stream": 8, "zero_text_code": 3,
                       "audio_silence_frame_cnt": 6, "mimi_num_codebooks": 8}
    cfg = parse_model_config(config)
    weights = random_lm_weights(cfg.lm, seed, dtype="float32")
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config, indent=1))

    from engine.audiofile import write_wav

    write_wav(directory / "voices" / f"{VOICE_NAME}.wav", babble(rng, seconds=2.0),
              cfg.mimi.sample_rate)
    (directory / "RANDOM_WEIGHTS").write_text(
        "This model has random weights: it exists to exercise Parley without a download.\n"
    )
    return directory


def _codes_of(mimi, pcm: np.ndarray) -> list[int]:
    mimi.reset()
    codes = np.array(mimi.encode_step(pcm)).reshape(-1)
    mimi.reset()
    return [int(c) for c in codes]


def train_tokenizer(path: Path, vocab_size: int = 256) -> int:
    """Trains a small deterministic unigram SentencePiece model; returns its vocabulary size."""
    import sentencepiece as spm

    path = Path(path)
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "corpus.txt"
        corpus.write_text(_CORPUS * 4)
        cwd = os.getcwd()
        os.chdir(work)  # a relative prefix keeps the build path out of the model bytes
        try:
            spm.SentencePieceTrainer.train(
                input="corpus.txt", model_prefix="tok", vocab_size=vocab_size,
                model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                num_threads=1, shuffle_input_sentence=False, hard_vocab_limit=False,
                minloglevel=2,
            )
        finally:
            os.chdir(cwd)
        shutil.copyfile(Path(work) / "tok.model", path)
    return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()


def babble(rng: np.random.Generator, seconds: float, sr: int = 24000) -> np.ndarray:
    """Speech-like test audio: voiced harmonics with a wandering pitch, syllable envelopes, pauses."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.7 * t) + 20 * np.sin(2 * np.pi * 2.3 * t + 1.0)
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 3.1 * t) + 0.3 * rng.standard_normal() , 0, None)
    pauses = (np.sin(2 * np.pi * 0.4 * t) > -0.6).astype(float)
    noise = 0.05 * rng.standard_normal(n)
    pcm = (voiced * syllables * pauses + noise * pauses) * 0.15
    return pcm.astype(np.float32)
